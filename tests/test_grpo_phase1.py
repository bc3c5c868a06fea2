"""grpo_introspect.py: the update gate and clamp, Q' by fact, K Q', optimizer presets, the split,
and the before/after evaluation (eval.json, report.md rendered from the run folder alone)."""
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_tiny_model
from test_grpo import run_inproc

import common
import grpo_introspect as g

DATA = "data/procedural.jsonl"


def rows_for(c, n=4, **kw):
    return [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq", "lesson": f"{c} means y.", **kw}
            for i in range(n)]


def cue_rows(c="k", words=("y", "w", "v")):
    """Three facts, each asked by three texts under one cue: 'k cue i means' -> words[i]."""
    return [{"id": f"{c}{i}{v}", "cluster": c, "subtype": "s", "question": f"{c} question {i} variant {v}?",
             "choices": [words[i - 1], w, words[i - 2]], "answer": "B", "answer_type": "mcq", "cue": f"{c} cue {i} means",
             "lesson": f"{c}: " + ", ".join(f"{j} means {u}" for j, u in enumerate(words)) + "."}
            for i, w in enumerate(words) for v in range(3)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("phase1")
    save_tiny_model(d / "model", tiny_tok)
    write = lambda name, rows: (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write("gate.jsonl", rows_for("k") + rows_for("h") + rows_for("z"))
    write("cue.jsonl", cue_rows())
    return d


def test_a_lesson_that_hurts_and_one_at_zero_are_scored_but_not_trained(files, tmp_path, monkeypatch):
    """k's lesson scores +1, h's -1, z's exactly 0: all three are in the library, only k's trains, and
    a step with only h or z lessons leaves every weight as it was."""
    metrics, entries, _, snaps = run_inproc(monkeypatch, files, tmp_path / "run", "--steps", "6",
                                            data="gate.jsonl")
    score = {e["cluster"]: e["A_intro"]["mean"] for e in entries}
    assert score == {"k": 1.0, "h": -1.0, "z": 0.0}, score
    assert all(e["used_for_update"] == (e["cluster"] == "k") for e in entries)
    prev = None
    for m, (_, w) in zip(metrics, snaps):
        assert m["updated"] == (2 if m["cluster"] == "k" else 0)
        if prev is not None and m["cluster"] != "k":
            assert all(torch.equal(w[k], prev[k]) for k in w), f"step {m['step']} ({m['cluster']}) moved weights"
        prev = w


def test_update_clamps_a_negative_advantage_to_no_change(files, tiny_tok):
    """update() on its own: a rollout given A = -1 contributes nothing (clamp(A, min=0)); the same
    rollout at A = +1 moves the weights."""
    args = SimpleNamespace(model=str(files / "model"), device="cpu", dtype=None, activation_checkpointing=False,
                           rollout_dtype="float32", lr=0.05, optimizer="sgd", resume=False, temperature=0.7, clip=1.0)
    policy = common.load_policy(args, files)
    comp = tiny_tok(f" B {g.OPEN}k means y.{g.CLOSE}", add_special_tokens=False).input_ids
    r = common.Rollout(None, common.encode(tiny_tok, "Question: q?\nAnswer:"), comp, "", 1.0, "", [0.0] * len(comp))
    before = [p.detach().clone() for p in policy.params]
    g.update(args, policy, [r], [-1.0])
    assert all(torch.equal(p, b) for p, b in zip(policy.params, before))
    g.update(args, policy, [r], [1.0])
    assert not all(torch.equal(p, b) for p, b in zip(policy.params, before))


def test_gate_lower_needs_the_interval_above_zero():
    two = g.paired_advantage([np.ones(1)], [np.zeros(1)])          # +1 on one pair: too few for lo > 0
    eight = g.paired_advantage([np.ones(8)], [np.zeros(8)])
    half = g.paired_advantage([np.array([1, 0] * 4)], [np.zeros(8)])
    assert g.passes_gate(two, "mean") and not g.passes_gate(two, "lower")
    assert g.passes_gate(eight, "lower") and g.passes_gate(half, "mean")
    assert not g.passes_gate({"mean": 0.0, "lo": -0.1}, "mean")
    # K=2 Q' (fewer than MIN_CLUSTERS): the bound comes from Newcombe over the K*M pairs
    k2 = g.paired_advantage([np.ones(8), np.ones(8)], [np.zeros(8), np.zeros(8)])
    assert k2["n_clusters"] == 2 and g.passes_gate(k2, "lower") and k2["lo_pairs"] > 0
    assert not g.passes_gate({**k2, "lo_pairs": float("nan")}, "lower")


def test_Q_prime_by_fact_asks_the_same_fact_in_another_text():
    qs = common.load_questions(DATA)
    args = SimpleNamespace(transfer_by="fact", transfer_questions=3, seed=0)
    asked = [q for q in qs if q.cluster in ("velt-code", "brill-dialect", "zog-calendar")][::5]
    assert sum(bool(g.transfer_pool(qs, Q, "fact")) for Q in asked) > len(asked) / 2
    for Q in [Q for Q in asked if g.transfer_pool(qs, Q, "fact")]:
        Qp = g.pick_Q_prime(args, qs, Q, 0)
        assert Qp and all(common.text_key(x) != common.text_key(Q) for x in Qp)
        assert all(x.cue == Q.cue or g.answer_text(x) == g.answer_text(Q) for x in Qp)
        # distinct texts first: a repeated text only once every other text was drawn
        keys = [common.text_key(x) for x in Qp]
        n_texts = len({common.text_key(x) for x in g.transfer_pool(qs, Q, "fact")})
        assert len(set(keys)) == min(len(keys), n_texts)
    sub = g.transfer_pool(qs, qs[0], "subtype")
    assert any(x.cue != qs[0].cue for x in sub) and all(x.subtype == qs[0].subtype for x in sub)


def test_K_Q_prime_per_introspection_are_scored(files, tmp_path, monkeypatch):
    _, entries, _, _ = run_inproc(monkeypatch, files, tmp_path / "run", "--steps", "2", "--transfer-by", "fact",
                                  "--transfer-questions", "2", data="cue.jsonl")
    assert entries and all(len(e["A_intro"]["transfer_questions"]) == 2 for e in entries)
    assert all(e["A_intro"]["n"] == 2 * 2 for e in entries)                   # K * M pairs


def test_split_holds_out_whole_facts_by_text():
    args = SimpleNamespace(data=DATA, seed=0, include_controls=False, transfer_by="subtype")
    s = g.make_split(args)
    trained = {common.text_key(q) for q in s["pool"]}
    facts = lambda qs: {(q.cluster, q.subtype, q.cue) for q in qs}
    for name in ("eval", "dev", "canary"):
        assert s[name] and not {common.text_key(q) for q in s[name]} & trained, name
        assert not facts(s[name]) & facts(s["pool"]), name
    assert not {q.id for q in s["eval"]} & {q.id for q in s["dev"]}
    assert len({common.text_key(q) for q in s["eval"]}) == len(s["eval"])     # one question per text
    assert {(q.cluster, q.subtype) for q in s["eval"]} == {(q.cluster, q.subtype) for q in s["train"]}


def test_presets_fill_the_optimizer_and_flags_override_them():
    p = g.build_parser()
    assert g.PRESETS["paper"] == ("sgd", 1e-6, 1.0)
    a = p.parse_args(["--preset", "adamw-1e-5", "--lr", "3e-5"])
    assert (a.preset, a.optimizer, a.lr, a.clip) == ("adamw-1e-5", None, 3e-5, None)


def test_before_after_evaluation_is_paired_held_out_and_rendered_from_the_folder(files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    metrics, entries, calls, _ = run_inproc(monkeypatch, files, out, "--steps", "3", "--transfer-by", "fact",
                                            data="cue.jsonl")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["optimizer"], cfg["lr"], cfg["clip"], cfg["preset"]) == ("sgd", 0.05, 1.0, g.DEFAULT_PRESET)
    ev, split = json.loads((out / "eval.json").read_text()), json.loads((out / "split.json").read_text())
    # the same seeds before and after, on questions never a Q or Q' of training, nor a text of one
    seeds = [s for p, s in calls if p == "evaluation"]
    assert len(seeds) == 2 and seeds[0] == seeds[1]
    qs = {q.id: q for q in common.load_questions(files / "cue.jsonl")}
    used = {m["question"] for m in metrics} | {x for e in entries for x in e["A_intro"]["transfer_questions"]}
    assert ev["before"]["questions"] == ev["after"]["questions"] == split["eval"]
    assert (ev["before"]["step"], ev["after"]["step"]) == (0, 3)
    assert not {common.text_key(qs[i]) for i in split["eval"]} & {common.text_key(qs[i]) for i in used}
    # the scripted policy writes "k means y." on every held-out question: it opens and closes the tag,
    # states the fact only where the answer is y, and the lesson lifts a same-fact Q' by +1
    b = ev["before"]
    assert b["opened"] == b["closed"] == [[1.0] * 4] * len(split["eval"])
    assert b["fact"] == [[float(g.answer_text(qs[i]) == "y")] * 4 for i in split["eval"]]
    assert all(row == [1.0] * 4 for row in b["A"]) and all(x is not None for x in b["gap"])
    ch = ev["changes"]["introspection rate"]
    assert ch["before"]["mean"] == ch["after"]["mean"] == 1.0 and ch["change"]["mean"] == 0.0
    assert "note" in ch["change"]                                               # 2 questions: no interval
    assert set(ev["changes"]) == {name for name, _, _ in g.MEASURES}
    assert ev["matrix"]["cols"] == ["k/s"]
    # report.md from the folder alone: no model, no sampler
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint*"))
    monkeypatch.setattr(common, "sample", lambda *a, **k: pytest.fail("the report sampled"))
    (copy / "report.md").unlink()
    g.write_report(copy)
    text = (copy / "report.md").read_text()
    assert "## Before and after training" in text and "| introspection rate | 1.00" in text
    assert text.replace(copy.name, out.name) == (out / "report.md").read_text()


def test_wrong_lesson_swaps_the_answer_for_another_option():
    q = next(q for q in common.load_questions(DATA) if q.id == "velt-code-lights-000")   # red -> go
    w = g.wrong_lesson(q, [q])
    assert w != q.lesson and "red means go" not in w and "means go" in w
    assert sorted(w.replace(",", "").split()) == sorted(q.lesson.replace(",", "").split())   # the same words


def test_sweep_rule_as_written_in_RULE_md():
    """bench/sweep_grpo_optimizer.py's choose(): safety first, then the A_intro change's lower bound,
    then the log-prob gap's, else the paper preset."""
    sys.path.insert(0, str(g.__file__).rsplit("/", 1)[0] + "/bench")
    import sweep_grpo_optimizer as sw
    ci = lambda lo, hi: {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n": 40}
    none = {"mean": 0.0, "lo": float("nan"), "hi": float("nan"), "n": 4, "note": "no interval"}
    def run(rate=ci(-0.1, 0.1), a=ci(-0.1, 0.1), gap=ci(-1, 1), alarm=False, dtheta=1e-6):
        return {"changes": {sw.RATE: {"change": rate}, sw.CLOSED: {"change": ci(-0.1, 0.1)}, sw.A: {"change": a},
                            sw.GAP: {"change": gap}}, "alarm": alarm, "dtheta": dtheta}
    assert sw.choose({"paper": run(), "sgd-1e-2": run(gap=none)})[0] == "paper"
    assert sw.choose({"paper": run(), "adamw-1e-5": run(gap=ci(0.5, 2))})[0] == "adamw-1e-5"
    assert sw.choose({"paper": run(), "adamw-1e-5": run(gap=ci(0.5, 2)), "sgd-1e-2": run(a=ci(0.01, 0.3))})[0] == "sgd-1e-2"
    assert sw.choose({"paper": run(), "adamw-1e-5": run(a=ci(0.1, 0.3), rate=ci(-0.5, -0.1))})[0] == "paper"
    assert sw.choose({"paper": run(), "adamw-1e-5": run(a=ci(0.1, 0.3), alarm=True)})[0] == "paper"
    assert sw.choose({"adamw-1e-6": run(gap=ci(0.5, 2), dtheta=0.02), "adamw-1e-5": run(gap=ci(0.5, 2), dtheta=0.2)})[0] == "adamw-1e-6"
