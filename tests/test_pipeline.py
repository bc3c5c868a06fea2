"""The paper's cycle on the tiny model: grpo_introspect -> sft_recall -> dream -> grpo_introspect.

Each stage reads what the previous one wrote: the library and checkpoint of Phase 1, the recall
run (selection.json, recalls.jsonl, checkpoint) of Phase 2, the dreamt checkpoint. Phase 1 runs
with the scripted sampler of test_grpo.py, so its library really holds a scored lesson (a random
tiny model never writes one); every later stage runs for real. Sizes are minimal: this checks the
plumbing between stages, not what they learn.
"""
import json
import sys

import pytest
from conftest import save_tiny_model
from test_grpo import scripted_sampler

import common
import dream
import grpo_introspect as g
import sft_recall


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("cycle")
    save_tiny_model(d / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq", "lesson": f"{c} means y."}
            for c, n in (("k", 8), ("f", 6), ("g", 4)) for i in range(n)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(monkeypatch, module, argv):
    monkeypatch.setattr(sys, "argv", argv)
    common.run_main(module.main)


def test_one_full_cycle(files, tmp_path, monkeypatch):
    A, B, C, D = (tmp_path / x for x in "ABCD")
    data = str(files / "q.jsonl")

    # Phase 1 (scripted sampler): a library with a scored lesson, and a checkpoint
    with monkeypatch.context() as m:
        m.setattr(common, "sample", scripted_sampler([]))
        run(m, g, ["grpo_introspect.py", "--model", str(files / "model"), "--data", data, "--out", str(A),
                   "--steps", "2", "--N", "2", "--M", "2", "--max-intros", "1", "--matrix-M", "0", "--lr", "0.05"])
    lib = common.load_bank(A / "library.json", "introspection-library")["entries"]
    assert lib and (A / "checkpoint" / "model.safetensors").exists()

    # Phase 2: recall SFT continues the Phase 1 run (its library and its weights)
    run(monkeypatch, sft_recall, ["sft_recall.py", "--library", str(A / "library.json"), "--model", str(A / "checkpoint"),
                                  "--data", data, "--out", str(B), "--canary", "", "--fresh", "0", "--samples", "2",
                                  "--eval-samples", "1", "--answer-tokens", "3", "--recall-tokens", "8",
                                  "--epochs", "1", "--batch-size", "8"])
    assert json.loads((B / "config.json").read_text())["model"] == str(A / "checkpoint")
    sel = common.load_bank(B / "selection.json", sft_recall.SELECTION_KIND)["entries"]
    k = next(e for e in sel if e["cluster"] == lib[0]["cluster"])
    assert k["lesson"] == lib[0]["text"] and k["source"] == "library", "Phase 2 selected Phase 1's lesson"
    rows = common.read_jsonl(B / "sft_data.jsonl")
    assert k["beneficial"] and any(r["kind"] == "recall" and r["lesson"] == lib[0]["text"] for r in rows), \
        "Phase 2 trained Phase 1's lesson into its recall rows"
    assert (B / "recalls.jsonl").exists() and (B / "checkpoint" / "model.safetensors").exists()

    # Test-time dreaming of the lesson the Phase 2 run recalls (or selected), on its weights
    run(monkeypatch, dream, ["dream.py", "--recall-from", str(B), "--model", str(B / "checkpoint"), "--data", data,
                             "--out", str(C), "--cluster", "k", "--subtype", "s", "--force",
                             "--dev-questions", "2", "--eval-questions", "2", "--gate-samples", "2",
                             "--dev-samples", "2", "--eval-samples", "2", "--teacher-samples", "2", "--N", "2",
                             "--steps", "1", "--answer-tokens", "2", "--canary-questions", "2",
                             "--canary-samples", "1", "--replay-questions", "1", "--bootstrap", "50",
                             "--fresh", "0", "--no-controls"])
    rec = common.load_bank(C / "dreamt.json", "dream-record")["entries"]
    assert rec and str(B) in rec[-1]["source"], rec[-1]["source"]      # the lesson came from Phase 2's run
    assert (C / "checkpoint" / "model.safetensors").exists()

    # ... and back to Phase 1, from the dreamt weights
    run(monkeypatch, g, ["grpo_introspect.py", "--model", str(C / "checkpoint"), "--data", data, "--out", str(D),
                         "--steps", "1", "--N", "2", "--M", "1", "--max-new-tokens", "6", "--answer-tokens", "2",
                         "--matrix-M", "0"])
    assert json.loads((D / "config.json").read_text())["model"] == str(C / "checkpoint")
    assert len(common.read_jsonl(D / "metrics.jsonl")) == 1
