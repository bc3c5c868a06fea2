"""data/import.py: benchmark files in their saved layouts -> question files that common.load_questions
accepts, with the answer on the right option, and every problem reported per row (no downloads:
each fixture is written here, in the layout `datasets.Dataset.to_json` or the original release uses)."""
import csv
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent


def load_script(rel):
    spec = importlib.util.spec_from_file_location("script_" + Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


imp = load_script("data/import.py")        # "import" is a keyword: loaded by path


def jsonl(rows, ascii=True):
    return "".join(json.dumps(r, ensure_ascii=ascii) + "\n" for r in rows)


def to_csv(rows):
    f = io.StringIO()
    csv.writer(f).writerows(rows)
    return f.getvalue()


@pytest.fixture
def convert(tmp_path, monkeypatch, capsys):
    """convert(name, text, *flags) -> (questions as load_questions reads them, stdout)."""
    def run(name, text, *flags, encoding="utf-8"):
        src = tmp_path / name
        src.write_text(text, encoding=encoding)
        out = tmp_path / "out.jsonl"
        monkeypatch.setattr(sys, "argv", ["import.py", str(src), "--out", str(out), *flags])
        imp.main()
        return common.load_questions(out), capsys.readouterr().out
    return run


@pytest.fixture
def fails(tmp_path, monkeypatch, capsys):
    """fails(name, text, *flags) -> the one error line, after checking exit 2 and nothing written."""
    def run(name, text, *flags):
        d = tmp_path / "failing"
        d.mkdir(exist_ok=True)
        src, out = d / name, d / "out.jsonl"
        src.write_text(text, encoding="utf-8")
        monkeypatch.setattr(sys, "argv", ["import.py", str(src), "--out", str(out), *flags])
        with pytest.raises(SystemExit) as e:
            common.run_main(imp.main)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert [p.name for p in d.iterdir()] == [name], "something was written"
        return err[0], str(src)
    return run


MMLU = [  # cais/mmlu rows as Dataset.to_json writes them: choices a list, answer an index (ClassLabel)
    {"question": "Which nerve supplies the diaphragm?", "subject": "anatomy",
     "choices": ["vagus", "phrenic", "ulnar", "radial"], "answer": 1},
    {"question": "Which bone is in the β-region\u2028(thigh)?", "subject": "anatomy",
     "choices": ["femur", "tibia", "radius", "ulna"], "answer": 0},
    {"question": "Which virus causes measles?", "subject": "virology",
     "choices": ["paramyxovirus", "rotavirus"], "answer": 0},
    {"question": "Which is autosomal dominant?", "subject": "medical_genetics",
     "choices": ["cystic fibrosis", "Huntington disease", "PKU", "sickle cell"], "answer": 1},
    {"question": "Which is X-linked?", "subject": "medical_genetics",
     "choices": ["haemophilia A", "Marfan", "achondroplasia", "NF1"], "answer": 0},
]


def test_mmlu_as_saved_by_datasets_round_trips(convert):
    text = jsonl(MMLU[:1]) + jsonl(MMLU[1:2], ascii=False) + jsonl(MMLU[2:])   # one raw U+2028 inside a string
    qs, out = convert("mmlu-test.jsonl", text, "--format", "mmlu")
    assert [q.id for q in qs] == ["mmlu-test-00001", "mmlu-test-00002", "mmlu-test-00004", "mmlu-test-00005"]
    assert [q.cluster for q in qs] == ["anatomy", "anatomy", "medical_genetics", "medical_genetics"]
    assert [q.answer for q in qs] == ["B", "A", "B", "A"] and all(q.answer_type == "mcq" for q in qs)
    assert qs[1].question == MMLU[1]["question"] and qs[0].lesson is None
    assert common.verify(qs[0], " B")[0] == 1.0 and common.verify(qs[0], " phrenic")[0] == 1.0
    assert "dropped 1 question: 1 cluster with a single question" in out and "'virology'" in out
    assert "wrote 4 questions in 2 clusters (mcq 4)" in out


def test_mmlu_original_csv_without_header_quotes_and_non_ascii(convert):
    rows = [['A man says "it hurts", then,\nafter a pause, faints. Which nerve?',
             "Café nerve", "vagus, left", "ulnar", "radial", "B"],
            ["Which muscle flexes the elbow?", "biceps", "triceps", "deltoid", "trapezius", "A"]]
    qs, out = convert("anatomy_test.csv", to_csv(rows), "--format", "mmlu")
    assert [q.cluster for q in qs] == ["anatomy", "anatomy"]        # the subject is in the file name
    assert qs[0].question == rows[0][0] and qs[0].choices == ["Café nerve", "vagus, left", "ulnar", "radial"]
    assert [q.answer for q in qs] == ["B", "A"]
    assert [q.id for q in qs] == ["anatomy_test-00001", "anatomy_test-00003"]   # the second record starts on line 3


GSM8K = [
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens?",
     "answer": "It has 1000+234=<<1000+234=1234>>1234 hens.\n#### 1,234"},
    {"question": "Tom owes 5 and pays 8. What is his balance?", "answer": "5-8=-3\n#### -3"},
    {"question": "Half of 1?", "answer": "1/2=0.5\n#### 0.5"},
    {"question": "How many?", "answer": "There are five.\n#### five"},
    {"question": "No marker?", "answer": "42"},
]


def test_gsm8k_final_answer_becomes_a_number_question(convert):
    qs, out = convert("gsm8k.jsonl", jsonl(GSM8K), "--format", "gsm8k")
    assert [(q.answer, q.answer_type) for q in qs] == [("1234", "number"), ("-3", "number"), ("0.5", "number")]
    assert {q.cluster for q in qs} == {"gsm8k"}                      # no topic field: one cluster, the file's name
    assert qs[0].meta["solution"].endswith("1234 hens.") and qs[0].meta["imported_from"] == "gsm8k.jsonl:1"
    assert common.verify(qs[0], " 1,234")[0] == 1.0 and common.verify(qs[1], " -3")[0] == 1.0
    assert "gsm8k.jsonl:4: field 'answer': the final answer 'five' is not a number" in out
    assert "gsm8k.jsonl:5: field 'answer': no final answer '#### N'" in out
    assert "skipped 2 rows (answer: 2)" in out


def test_gsm8k_cluster_from_a_field(convert):
    rows = [{**r, "level": lv} for r, lv in zip(GSM8K[:3], ["easy", "easy", "hard"])] + [{**GSM8K[0], "level": "hard"}]
    qs, out = convert("gsm8k.jsonl", jsonl(rows), "--format", "gsm8k", "--cluster-field", "level")
    assert [q.cluster for q in qs] == ["easy", "easy", "hard", "hard"] and "clusters from field 'level'" in out


MEDQA_OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Labetalol"}


def test_medqa_options_as_dict_list_or_key_value_and_answer_as_letter_or_text(convert):
    rows = [  # GBaker/MedQA-USMLE-4-options: options a dict, answer_idx a letter, answer its text
        {"question": "Q1", "answer": "Warfarin", "options": MEDQA_OPTIONS, "meta_info": "step1", "answer_idx": "C"},
        {"question": "Q2", "answer": "Heparin", "options": MEDQA_OPTIONS, "meta_info": "step1", "answer_idx": "C"},
        # BigBio med_qa source schema: options as [{"key", "value"}]
        {"question": "Q3", "options": [{"key": "A", "value": "Aspirin"}, {"key": "B", "value": "Labetalol"}],
         "answer_idx": "B", "meta_info": "step2&3"},
        # options a list, the answer given only as text (case differs)
        {"question": "Q4", "options": ["Aspirin", "Labetalol", "Heparin"], "answer": "heparin", "meta_info": "step1"},
    ]
    qs, out = convert("medqa.jsonl", jsonl(rows), "--format", "medqa", "--cluster-field", "meta_info")
    assert [(q.id, q.answer, q.cluster) for q in qs] == [
        ("medqa-00001", "C", "step1"), ("medqa-00004", "C", "step1")]         # step2&3 alone: dropped
    assert qs[0].choices == list(MEDQA_OPTIONS.values())
    assert "medqa.jsonl:2: field 'answer': the text 'Heparin' is option B, answer_idx says C" in out
    assert "dropped 1 question" in out


def test_medmcqa_cop_is_read_0_or_1_based_from_the_file(convert):
    def row(i, cop):
        return {"id": f"u{i}", "question": f"M{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop,
                "choice_type": "single", "exp": "why", "subject_name": "Anatomy", "topic_name": None}
    hf = [row(1, 0), row(2, 3), row(3, -1)]                           # the HF dataset: 0-3, test split -1
    qs, out = convert("medmcqa.jsonl", jsonl(hf), "--format", "medqa")
    assert [q.answer for q in qs] == ["A", "D"] and {q.cluster for q in qs} == {"Anatomy"}
    assert qs[0].meta["exp"] == "why" and qs[0].meta["id"] == "u1"
    assert "cop read as 0-based" in out and "field 'cop': -1: no answer given" in out
    original = [row(1, 1), row(2, 4)]                                 # the original release: 1-4
    qs, out = convert("medmcqa.jsonl", jsonl(original), "--format", "medqa")
    assert [q.answer for q in qs] == ["A", "D"] and "cop read as 1-based" in out


def test_columns_answer_as_letter_text_or_index(convert):
    rows = [["stem", "a", "b", "c", "d", "key", "topic", "rule"],
            ["Which is sweet?", "salt", "sugar", "lemon", "vinegar", "B", "taste", "Sugar is sweet."],
            ["Which is sour?", "salt", "sugar", "lemon", "bread", "lemon", "taste", "Lemon is sour."],
            ["Which is salty?", "salt", "sugar", "lemon", "bread", "0", "taste", "Salt is salty."],
            ["Which is bitter?", "salt", "coffee", "lemon", "bread", "b", "taste", "Coffee is bitter."],
            ["How many?", "1", "2", "3", "4", "1", "taste", "x"]]             # index 1 = B, text '1' = A
    qs, out = convert("mine.csv", to_csv(rows), "--format", "columns", "--map",
                      "question=stem,choices=a|b|c|d,answer=key,cluster=topic,lesson=rule", encoding="utf-8-sig")
    assert [q.answer for q in qs] == ["B", "C", "A", "B"]
    assert qs[1].lesson == "Lemon is sour." and qs[0].choices == ["salt", "sugar", "lemon", "vinegar"]
    assert "mine.csv:6: field 'key': '1' is ambiguous: option B by its index, option A by its text" in out
    assert "4 with a lesson" in out


def test_columns_without_choices_gives_number_and_text_questions(convert):
    rows = [{"q": "Capital of France?", "a": "Paris", "t": "geo"}, {"q": "Capital of Japan?", "a": "Tokyo", "t": "geo"},
            {"q": "2 + 2?", "a": 4, "t": "sums"}, {"q": "Big sum?", "a": "1,000", "t": "sums"}]
    qs, out = convert("mine.jsonl", jsonl(rows), "--format", "columns", "--map", "question=q,answer=a,cluster=t")
    assert [(q.answer, q.answer_type) for q in qs] == [
        ("Paris", "text"), ("Tokyo", "text"), ("4", "number"), ("1000", "number")]
    assert "(text 2, number 2)" in out


def test_json_array_tsv_and_number_edge_cases(convert, fails):
    rows = [{"question": "Q1", "subject": "s", "choices": ["x", "y"], "answer": 1.0},     # a float column
            {"question": "Q2", "subject": "s", "choices": ["x", "y"], "answer": 0.5},
            {"question": "Q3", "subject": "s", "choices": ["x", "y"], "answer": "(A)"}]
    qs, out = convert("arr.json", json.dumps(rows, indent=1), "--format", "mmlu")     # a JSON array: rows by position
    assert [(q.id, q.answer) for q in qs] == [("arr-00001", "B"), ("arr-00003", "A")]
    assert "arr.json:2: field 'answer': index 0.5 is not one of 0..1" in out
    tsv = 'q\ta\tt\nList two, "quoted"?\t1, 2\tx\nHow many?\t1,000\tx\nDollars?\t$5.\tx\n'
    qs, _ = convert("t.tsv", tsv, "--format", "columns", "--map", "question=q,answer=a,cluster=t")
    assert qs[0].question == 'List two, "quoted"?'
    assert [(q.answer, q.answer_type) for q in qs] == [("1, 2", "text"), ("1000", "number"), ("5", "number")]
    msg, src = fails("bad.csv", "", "--format", "columns", "--map", "question=q,answer=a")
    assert msg == f"error: {src}: no rows"


@pytest.mark.parametrize("raw, keys, ways, pos", [
    (2, None, ("index", "letter"), 2), (2.0, None, ("index",), 2), ("2", None, ("index", "letter"), 2),
    ("C", None, ("index", "letter"), 2), ("(c)", None, ("letter",), 2), ("C.", None, ("letter",), 2),
    ("opc", ["opa", "opb", "opc"], ("key",), 2), ("C", ["A", "B", "C"], ("key",), 2),
    ("  CHEESE ", None, ("text",), 2), ("cheese", None, ("letter", "index", "text"), 2),
])
def test_answer_as_index_letter_key_or_text(raw, keys, ways, pos):
    assert imp.answer_position(raw, keys, ["bread", "butter", "Cheese"], "answer", ways) == pos


def test_options_as_list_dict_key_value_or_a_list_in_a_cell():
    assert imp.options_of(["x", " y ", 3], "c") == (None, ["x", "y", "3"])
    assert imp.options_of({"B": "y", "A": "x"}, "c") == (["A", "B"], ["x", "y"])       # letter keys sorted
    assert imp.options_of([{"key": "A", "value": "x"}, {"key": "B", "value": "y"}], "c") == (["A", "B"], ["x", "y"])
    assert imp.options_of('["x", "y"]', "c") == imp.options_of("['x', 'y']", "c") == (None, ["x", "y"])
    with pytest.raises(imp.RowError, match="field 'c': 11 options"):
        imp.options_of(list("abcdefghijk"), "c")


def test_empty_and_duplicate_options_reported_per_row(convert):
    rows = [{"question": "Q1", "subject": "s", "choices": ["femur", "", "tibia", "Femur "], "answer": 2},
            {"question": "Q2", "subject": "s", "choices": ["x", "x", "y"], "answer": 0},
            {"question": "Q3", "subject": "s", "choices": ["p", "q"], "answer": 1},
            {"question": "Q4", "subject": "s", "choices": ["p", ""], "answer": 0}]
    qs, out = convert("dups.jsonl", jsonl(rows), "--format", "mmlu")
    assert [q.id for q in qs] == ["dups-00001", "dups-00003"]
    assert qs[0].choices == ["femur", "tibia", "Femur"] and qs[0].answer == "B"     # the letter follows the drop
    assert "dups.jsonl:1: field 'choices': option B empty, dropped" in out
    assert "dups.jsonl:1: field 'choices': options A and D are the same ('femur'), kept" in out
    assert "dups.jsonl:2: field 'choices': options A and B read the same ('x') and one is the answer" in out
    assert "dups.jsonl:4: field 'choices': fewer than two non-empty options" in out


def test_wrong_format_is_one_line_naming_expected_and_found_fields(fails):
    msg, src = fails("gsm8k.jsonl", jsonl(GSM8K), "--format", "mmlu")
    assert msg == (f"error: {src}: not an mmlu file: expected fields question, choices (a list), answer (an index), "
                   f"subject; found question, answer; for another layout: --format columns --map ...")
    msg, src = fails("gsm8k.jsonl", jsonl(GSM8K), "--format", "columns", "--map", "question=stem,answer=key")
    assert msg == f"error: {src}: expected fields stem, key (from --map); found question, answer"


def test_strict_stops_at_the_row_naming_file_row_and_field(fails, convert):
    rows = MMLU[:1] + [{**MMLU[0], "answer": 7}, *MMLU[3:]]
    msg, src = fails("mmlu.jsonl", jsonl(rows), "--format", "mmlu", "--strict")
    assert msg.startswith(f"error: {src}:2: field 'answer': index 7 is not one of 0..3")
    qs, out = convert("mmlu.jsonl", jsonl(rows), "--format", "mmlu")            # without --strict: skipped
    assert len(qs) == 2 and "skipped 1 row (answer: 1)" in out


def test_flags_checked_before_reading(fails):
    msg, _ = fails("m.jsonl", jsonl(MMLU), "--format", "mmlu", "--cluster-field", "topic")
    assert msg.startswith("error: --cluster-field topic: no such field in") and "found question, subject" in msg
    msg, _ = fails("m.jsonl", jsonl(MMLU), "--format", "mmlu", "--limit", "1")
    assert msg == "error: --limit 1: must be at least 2"


def test_limit_never_leaves_a_cluster_of_one_and_follows_the_seed():
    qs = [{"id": str(i), "cluster": c} for i, c in enumerate("aaabbbbcdddde")]
    for limit in range(2, 12):
        for seed in range(5):
            got = imp.pick(qs, limit, seed)
            sizes = [sum(q["cluster"] == c for q in got) for c in {q["cluster"] for q in got}]
            assert len(got) == limit and min(sizes) >= 2, (limit, seed, got)
            assert [q["id"] for q in got] == sorted((q["id"] for q in got), key=int)     # file order kept
    assert imp.pick(qs, 5, 0) == imp.pick(qs, 5, 0)
    assert len({tuple(q["id"] for q in imp.pick(qs, 5, s)) for s in range(10)}) > 1


def test_ids_are_stable_across_runs_and_limits(convert):
    rows = [{"question": f"Q{i}", "subject": "abc"[i % 3], "choices": ["x", "y"], "answer": i % 2} for i in range(30)]
    full, _ = convert("m.jsonl", jsonl(rows), "--format", "mmlu")
    again, _ = convert("m.jsonl", jsonl(rows), "--format", "mmlu")
    some, out = convert("m.jsonl", jsonl(rows), "--format", "mmlu", "--limit", "7", "--seed", "3")
    assert [q.id for q in full] == [q.id for q in again]
    by_id = {q.id: q for q in full}
    assert len(some) == 7 and all(by_id[q.id] == q for q in some) and "kept 7 of 30" in out


# ----------------------------------------------------------------------------
# the stages on an imported set (no `lesson` field): they run and say what they skip


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tok):
    from conftest import save_tiny_model
    d = tmp_path_factory.mktemp("tiny") / "model"
    return save_tiny_model(d, tiny_tok)


def test_stages_run_on_an_imported_set_and_say_what_they_skip(convert, tiny_folder, tmp_path, monkeypatch, capsys):
    rows = [{"question": f"Which {s} thing {i}?", "subject": s, "choices": ["x", "y", "z"], "answer": i % 3}
            for s in ("anat", "viro") for i in range(4)]
    convert("mm.jsonl", jsonl(rows), "--format", "mmlu")
    data = str(tmp_path / "out.jsonl")

    g = load_script("grpo_introspect.py")
    monkeypatch.setattr(sys, "argv", ["grpo_introspect.py", "--model", str(tiny_folder), "--data", data,
                                      "--out", str(tmp_path / "run"), "--steps", "1", "--N", "2", "--M", "1",
                                      "--max-new-tokens", "6", "--answer-tokens", "3", "--canary-samples", "1",
                                      "--matrix-M", "0"])
    g.main()
    capsys.readouterr()
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "A_oracle" not in metrics[0]        # the oracle needs a lesson: skipped
    oracle_line = [ln for ln in (tmp_path / "run" / "report.md").read_text().splitlines() if ln.startswith("- oracle")]
    assert len(oracle_line) == 1 and "not run" in oracle_line[0]

    cal = load_script("data/calibrate.py")
    report = tmp_path / "cal.md"
    monkeypatch.setattr(sys, "argv", ["calibrate.py", "--model", str(tiny_folder), "--data", data, "--samples", "1",
                                      "--bootstrap", "10", "--max-new-tokens", "3", "--report", str(report)])
    cal.main()
    out = capsys.readouterr().out
    assert f"{data}: 8 of 8 questions have no `lesson`: lesson and unrelated arms skipped, base accuracy only" in out
    table = [ln for ln in report.read_text().splitlines() if ln.startswith("| out.jsonl")]
    assert len(table) == 2 and all(ln.endswith("| - | - | - | - | base only (no lessons) |") for ln in table)
