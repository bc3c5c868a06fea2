"""A malformed data file stops with one line naming file, line and field; no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"id": "a", "cluster": "c", "question": "2+2?", "answer": 4, "answer_type": "number"}
GOOD2 = {**GOOD, "id": "b"}
MCQ = {"id": "m", "cluster": "c", "question": "?", "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq"}


def write(tmp_path, *lines):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_shipped_sample_loads():
    qs = common.load_questions(ROOT / "data" / "sample.jsonl")
    assert len({q.cluster for q in qs}) >= 2 and all(q.lesson for q in qs)


def test_valid_file_loads_with_types(tmp_path):
    qs = common.load_questions(write(tmp_path, GOOD, "", GOOD2, MCQ))
    assert [q.id for q in qs] == ["a", "b", "m"]
    assert qs[0].answer == "4" and qs[2].choices == ["x", "y", "z"]


@pytest.mark.parametrize("lines, where, field", [
    ([GOOD, '{"id": "b", "cluster": '], ":2:", "invalid JSON"),
    ([GOOD, "[1, 2]"], ":2:", "expected a JSON object"),
    ([GOOD, {k: v for k, v in GOOD2.items() if k != "question"}], ":2:", "field 'question': missing"),
    ([GOOD, {**GOOD2, "cluster": 3}], ":2:", "field 'cluster': expected a string"),
    ([GOOD, {**GOOD2, "answer_type": "essay"}], ":2:", "field 'answer_type'"),
    ([GOOD, GOOD], ":2:", "field 'id': duplicate id 'a' (first on line 1)"),
    ([GOOD, {**MCQ, "answer": "D"}, {**MCQ, "id": "m2"}], ":2:", "field 'answer': 'D' is not an option letter"),
    ([GOOD, GOOD2, {**MCQ, "choices": "x, y"}], ":3:", "field 'choices'"),
    ([GOOD, GOOD2, {**MCQ, "choices": ["only one"]}], ":3:", "field 'choices'"),
    ([GOOD, {**GOOD2, "answer": "four"}], ":2:", "field 'answer': 'four' is not a number"),
    ([GOOD, {**GOOD2, "lessson": "typo"}], ":2:", "field 'lessson': unknown field"),
    ([GOOD, GOOD2, {**GOOD, "id": "z", "cluster": "alone"}], ":3:", "cluster 'alone' has only one question"),
    ([GOOD, {**GOOD2, "answer": True}], ":2:", "field 'answer'"),
])
def test_malformed_file_names_file_line_and_field(tmp_path, lines, where, field):
    p = write(tmp_path, *lines)
    with pytest.raises(common.DataError) as e:
        common.load_questions(p)
    msg = str(e.value)
    assert msg.startswith(str(p) + where), msg
    assert field in msg, msg
    assert "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(common.DataError, match="no such data file"):
        common.load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(common.DataError, match="no questions"):
        common.load_questions(write(tmp_path, ""))


def test_stage_script_prints_one_line_without_traceback(tmp_path):
    """What a user sees: one line on stderr, exit code 2, no traceback; data is read before the model."""
    p = write(tmp_path, GOOD, '{"id": oops}')
    r = subprocess.run([sys.executable, str(ROOT / "grpo_introspect.py"), "--data", str(p),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "INTROSPECT_CACHE": str(tmp_path / "no-model-needed")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}:2: invalid JSON"), r.stderr


def test_procedural_data_regenerates_from_the_script(tmp_path):
    out = tmp_path / "p.jsonl"
    subprocess.run([sys.executable, str(ROOT / "data" / "make_procedural.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_text() == (ROOT / "data" / "procedural.jsonl").read_text()


def test_procedural_families_have_distinct_subtype_lessons_and_composed_questions():
    qs = common.load_questions(ROOT / "data" / "procedural.jsonl")
    lessons = {}
    for q in qs:
        lessons.setdefault(q.cluster, {}).setdefault(q.subtype, set()).add(q.lesson)
    for cluster, subs in lessons.items():
        assert all(len(v) == 1 for v in subs.values()), f"{cluster}: one lesson per sub-type"
        if cluster != "composed":
            assert len(subs) >= 2 and len({next(iter(v)) for v in subs.values()}) == len(subs), cluster
    composed = [q for q in qs if q.cluster == "composed"]
    assert composed and all(len(q.meta["components"]) == 2 for q in composed)
    own = {f"{q.cluster}/{q.subtype}": q.lesson for q in qs}
    assert all(q.lesson == " ".join(own[c] for c in q.meta["components"]) for q in composed)


def test_shipped_obstetrics_set_matches_the_issue():
    qs = common.load_questions(ROOT / "data" / "obstetrics.jsonl")
    assert len(qs) >= 40 and len({q.cluster for q in qs}) >= 6
    assert all(q.answer_type == "mcq" and 4 <= len(q.choices) <= 5 and q.lesson for q in qs)
    assert {q.subtype for q in qs if q.cluster == "pre-eclampsia"} == {"A", "B", "C", "D"}
