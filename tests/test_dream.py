"""dream.py: the label-free reward, the split and variations, the update, the guardrails, the
measurement, the lesson sources, and a run on the tiny model."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killing_cmd, make_tiny_gemma, save_tiny_model

import common
import dream as d

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "procedural.jsonl"


# ---- the target without labels and the reward, on hand-made teacher distributions


def test_teacher_reward_is_the_teachers_probability_of_the_students_answer():
    p_T = d.teacher_distribution(["A", "A", "B", None])     # 4 samples, one unreadable
    assert p_T == {"A": 0.5, "B": 0.25}                     # the unreadable one stays in the denominator
    student = ["A", "B", "C", None]
    assert d.rewards(student, p_T, "teacher").tolist() == [0.5, 0.25, 0.0, 0.0]
    assert d.rewards(student, p_T, "majority").tolist() == [1.0, 0.0, 0.0, 0.0]
    # the labelled upper bound ignores the teacher altogether
    assert d.rewards(student, p_T, "verifier", labels=["B"] * 4).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_majority_ties_do_not_depend_on_order_and_no_answer_means_no_target():
    assert d.majority({"B": 0.5, "A": 0.5}) == ("A", 0.5) == d.majority({"A": 0.5, "B": 0.5})
    assert d.majority(d.teacher_distribution([None, None])) == (None, 0.0)
    assert d.rewards(["A", None], {}, "majority").tolist() == [0.0, 0.0]   # None never matches None


def test_answers_are_read_with_the_verifiers_rules():
    q = common.Question("q", "c", "Officer shows a palm?", "D", "mcq", choices=["stop", "go", "turn left", "turn right"],
                        cue="For a Velt officer, palm means")
    assert d.answer_of(q, " turn right, fist means turn left") == "D"      # cue continuation -> option
    assert d.answer_of(q, " something else") is None
    n = common.Question("n", "c", "How many?", "12", "number")
    assert d.answer_of(n, " 3 blips are 12 metres") == 12.0


# ---- inputs: disjoint by TEXT, checked with a key written here, not the code's


def own_key(q):
    """Lower-case words of the question and of the cue, punctuation dropped: what the model reads
    before its answer, whatever the ids and the option order."""
    words = lambda t: " ".join("".join(c if c.isalnum() else " " for c in (t or "").lower()).split())   # noqa: E731
    return words(q.question), words(q.cue)


def split_args(**kw):
    a = d.build_parser().parse_args(["--cluster", "x"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


@pytest.mark.parametrize("cluster, subtype", [("velt-code", "hands"), ("brill-dialect", None)])
def test_split_keeps_dream_dev_and_eval_disjoint_by_text(cluster, subtype):
    qs = common.load_questions(DATA)
    for seed in range(4):
        a = split_args(seed=seed, data=str(DATA), dev_questions=2 if subtype else 5, eval_questions=2 if subtype else 6,
                       fresh=8)
        s = d.split_inputs(a, qs, cluster, subtype, "some lesson")
        texts = {k: [own_key(q) for q in s[k]] for k in ("dream", "fresh", "dev", "eval", "permuted")}
        for k in ("dream", "fresh", "dev", "eval"):
            assert len(set(texts[k])) == len(texts[k]), f"{k} holds one text twice"
        for x, y in [("dream", "dev"), ("dream", "eval"), ("dev", "eval"), ("fresh", "dev"), ("fresh", "eval"),
                     ("fresh", "dream")]:
            assert not set(texts[x]) & set(texts[y]), (x, y)
        assert set(texts["permuted"]) <= set(texts["dream"])          # a permuted copy is its dream text
        assert len(s["dev"]) == a.dev_questions and len(s["eval"]) == a.eval_questions
        assert all(q.cluster != cluster for q in s["canary"] + s["replay"])
        assert not {own_key(q) for q in s["canary"]} & {own_key(q) for q in s["replay"]}


def test_fresh_instances_are_new_texts_not_reshuffled_options():
    qs = [q for q in common.load_questions(DATA) if q.subtype == "verbs"]
    fresh = d.fresh_instances("brill-dialect", "verbs", 12, seed=1, avoid=qs)
    # 4 verbs x 2 question templates = 8 texts; the data holds 7, so one new text exists
    assert len({own_key(q) for q in qs}) == 7
    assert len(fresh) == 1 and own_key(fresh[0]) not in {own_key(q) for q in qs}
    assert fresh[0].cluster == "brill-dialect" and fresh[0].subtype == "verbs"
    many = d.fresh_instances("norvale-triage", "fever", 12, seed=1, avoid=[])
    assert len(many) == 12 and len({own_key(q) for q in many}) == 12
    assert d.fresh_instances("pre-eclampsia", "A", 4, seed=1, avoid=[]) == []   # not a procedural family


def test_option_permutation_remaps_the_answer():
    import itertools
    q = common.Question("q", "c", "Officer shows a fist?", "B", "mcq", choices=["go", "turn left", "stop", "turn right"])
    for perm in itertools.permutations(range(4)):
        p = d.permute_options(q, list(perm), "p")
        assert p.choices == [q.choices[j] for j in perm]
        assert p.choices[common.LETTERS.index(p.answer)] == "turn left"      # the answer follows its option
        assert common.verify(p, f"Answer: {p.answer}")[0] == 1.0
        assert common.verify(p, " turn left")[0] == 1.0                    # read through the option text too
    assert q.answer == "B" and q.choices[1] == "turn left"                 # the original is untouched


def test_placebo_is_other_types_lessons_of_the_same_length():
    r = "Velt hand signals: palm means turn right, fist means turn left."
    others = ["In the Brill dialect mova means water, tesk means fire, lun means tree and dar means stone.",
              "Short one.", r]
    pl = d.placebo_lesson(r, others)
    assert pl != r and len(pl.split()) == len(r.split()) and pl.startswith("In the Brill dialect")
    assert d.placebo_lesson(r, [r]) is None
    long = " ".join([r] * 2)                                                # longer than any other lesson: joined
    pl = d.placebo_lesson(long, others[:2] + ["Zog units are odd and many."])
    assert len(pl.split()) == len(long.split()) and "Velt" not in pl


# ---- the update


def test_advantages_are_group_relative_and_zero_variance_groups_are_skipped():
    A, keep = d.group_advantages(np.array([[1.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    assert A[0].tolist() == [0.5, -0.5, 0.0, 0.0] and keep.tolist() == [True, False]


def test_pg_loss_trains_every_completion_token_stop_token_included():
    logprobs = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, False, False]])        # row 1: one token (its EOS)
    d.pg_loss(logprobs, mask, torch.tensor([0.5, -1.0])).backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, -0.5, -0.5], [1.0, 0.0, 0.0]]) / 4)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_plus_tail_kl_is_the_full_kl_when_the_tail_is_one_token(direction):
    """With k = V - 1 the tail bucket is exactly the last token, so the bucketed KL is the full KL:
    this pins the direction (forward = KL(teacher || student))."""
    torch.manual_seed(0)
    t = torch.log_softmax(torch.randn(2, 3, 5), -1)
    s = torch.log_softmax(torch.randn(2, 3, 5), -1).requires_grad_(True)
    order = t.argsort(-1, descending=True)[..., :4]
    mask = torch.ones(2, 3, dtype=torch.bool)
    got = common.distill_loss(s.gather(-1, order), t.gather(-1, order), mask, d.CD_ALPHA[direction])
    full = (t.exp() * (t - s)).sum(-1).mean() if direction == "forward" else (s.exp() * (s - t)).sum(-1).mean()
    assert torch.allclose(got, full, atol=1e-5)
    got.backward()
    assert s.grad.abs().sum() > 0                                           # a loss term: it has a gradient
    same = common.distill_loss(t.gather(-1, order), t.gather(-1, order), mask, d.CD_ALPHA[direction])
    assert abs(float(same)) < 1e-6


# ---- guardrails


def test_rollback_restores_the_earlier_weights(tiny):
    _, tok = tiny
    model = make_tiny_gemma(len(tok), seed=6)
    policy = SimpleNamespace(model=model, rollout=model)
    w0 = d.snapshot(model)
    can0 = {"mean": 0.5, "lo": 0.4, "hi": 0.6}
    guard = {"best": (0.2, 0, w0), "last_good": (0, w0)}
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)                         # step 2: a change the canary accepts
    assert d.guard_step(guard, 2, 0.45, can0, 0.1, True, lambda: d.snapshot(model)) == "ok"
    w2 = d.snapshot(model)
    assert guard["last_good"][0] == 2 and guard["best"][1] == 0            # dev 0.1 < 0.2: step 0 stays selected
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)                          # step 4: the canary collapses
    assert d.guard_step(guard, 4, 0.1, can0, 0.9, True, lambda: d.snapshot(model)) == "rollback"
    assert guard["best"][1] == 0                                           # a rolled-back step is never selected
    d.restore(policy, guard["last_good"][1])
    assert all(torch.equal(w2[k], v) for k, v in model.state_dict().items())
    # without --rollback the alarm is raised but the weights still compete on dev
    assert d.guard_step(guard, 6, 0.1, can0, 0.9, False, lambda: d.snapshot(model)) == "alarm"
    assert guard["best"][1] == 6
    # --select final: no dev score, so nothing is ever selected on dev; no canary interval: no alarm
    assert d.guard_step(guard, 8, 0.0, {"mean": 0.5, "lo": float("nan")}, None, True, lambda: d.snapshot(model)) == "ok"
    assert guard["best"][1] == 6


# ---- measurement


def test_arm_statistics_on_hand_made_arms():
    """IR on accuracy and IR_lp on the target's log-prob, each a paired ratio with its interval;
    none where the lesson effect's interval spans 0."""
    before = {"acc_x": np.zeros((8, 4)), "acc_xr": np.tile([1.0, 1.0, 0.0, 0.0], (8, 1)),   # the lesson: +0.5
              "agree_x": np.zeros((8, 4)), "lp_x": [-4.0, -3.0] * 4, "lp_xr": [-2.0, -1.0] * 4, "canary": None}
    after = {"acc_x": np.tile([1.0, 0.0, 0.0, 0.0], (8, 1)), "acc_xr": np.ones((8, 4)),     # dreaming: +0.25
             "agree_x": np.ones((8, 4)), "lp_x": [-3.5, -2.5] * 4, "canary": None}
    bs = lambda arms, stat: common.paired_bootstrap(arms, stat, seed=0, n_boot=500)          # noqa: E731
    s = d.arm_stats(before, after, bs)
    assert s["change_x"]["mean"] == pytest.approx(0.25) and s["IR"]["mean"] == pytest.approx(0.5)
    assert s["IR"]["lo"] <= 0.5 <= s["IR"]["hi"]
    assert s["lp_change"]["mean"] == pytest.approx(0.5) and s["IR_lp"]["mean"] == pytest.approx(0.25)
    assert s["agreement_change"]["mean"] == pytest.approx(1.0) and "forgetting" not in s
    noisy = {**before, "acc_xr": np.roll(np.tile([1.0, 0.0, 0.0, 0.0], (8, 1)), 1, axis=1),
             "acc_x": np.tile([1.0, 0.0, 0.0, 0.0], (8, 1))}
    s = d.arm_stats(noisy, after, bs)
    assert s["IR"] is None and s["lesson_effect"]["lo"] <= 0 <= s["lesson_effect"]["hi"]


# ---- lesson sources


def write_library(path):
    bank = {"schema": "introspect-bank", "version": 1, "kind": "introspection-library", "entries": [
        {"id": "s0001-r00", "text": "palm means turn right", "cluster": "velt-code", "subtype": "hands",
         "A_intro": {"mean": 0.5, "lo": -0.1, "hi": 1.0, "n": 4}},
        {"id": "s0002-r03", "text": "wave means stop", "cluster": "velt-code", "subtype": "hands",
         "A_intro": {"mean": 0.25, "lo": 0.05, "hi": 0.4, "n": 4}},
        {"id": "s0003-r01", "text": "tesk means fire", "cluster": "brill-dialect", "subtype": "nouns",
         "A_intro": {"mean": 0.9, "lo": 0.6, "hi": 1.0, "n": 4}}]}
    path.write_text(json.dumps(bank))
    return path


def test_library_best_entry_is_by_lower_bound(tmp_path):
    lib = common.load_bank(write_library(tmp_path / "library.json"), "introspection-library")
    assert d.best_library_entry(lib, "velt-code", "hands")["id"] == "s0002-r03"
    assert d.best_library_entry(lib, "velt-code", None)["id"] == "s0002-r03"
    assert d.best_library_entry(lib, "zog-units", None) is None


def fake_recall_run(tmp_path, recalls):
    """The sft_recall.py run-folder contract: selection.json (a recall-selection bank) + recalls.jsonl."""
    run = tmp_path / "sft"
    run.mkdir()
    common.save_bank(run / "selection.json", {"schema": "introspect-bank", "version": 1, "kind": "recall-selection",
                                              "entries": [{"cluster": "velt-code", "subtype": "hands",
                                                           "lesson": "selected hands lesson",
                                                           "A": {"mean": 0.3, "lo": 0.1, "hi": 0.5, "n": 16},
                                                           "source": "library", "beneficial": True}]})
    (run / "recalls.jsonl").write_text("".join(json.dumps({"question_id": f"q{i}", "cluster": c, "subtype": s,
                                                           "recalled": t, "reward": 1.0}) + "\n"
                                               for i, (c, s, t) in enumerate(recalls)))
    return run


def test_recall_from_takes_the_most_frequent_recall_of_the_type(tmp_path):
    run = fake_recall_run(tmp_path, [("velt-code", "hands", "wave means stop"), ("velt-code", "hands", None),
                                     ("velt-code", "hands", "palm means turn right"),
                                     ("velt-code", "hands", "palm means turn right"),
                                     ("brill-dialect", "nouns", "tesk means fire"),
                                     ("brill-dialect", "nouns", "tesk means fire"),
                                     ("brill-dialect", "nouns", "tesk means fire")])
    text, source = d.recalled_lesson(run, "velt-code", "hands")
    assert text == "palm means turn right" and "2 of 3" in source


def test_recall_from_falls_back_to_the_selection_when_nothing_was_recalled(tmp_path):
    run = fake_recall_run(tmp_path, [("velt-code", "hands", None), ("velt-code", "hands", None)])
    assert d.recalled_lesson(run, "velt-code", "hands")[0] == "selected hands lesson"
    assert d.recalled_lesson(run, "zog-units", "time")[0] is None


# ---- bad input: one line, exit 2, nothing loaded or written


def trap(*a, **k):
    raise AssertionError("loaded a model or created a run folder before checking the input")


@pytest.mark.parametrize("argv, names", [
    (["--lesson", "  "], "empty lesson"),
    (["--lesson", "x", "--cluster", "nowhere"], "type nowhere is not in"),
    (["--library", "LIB", "--entry", "s9999-r99"], "--entry s9999-r99: no such entry"),
    (["--lesson", "x", "--cluster", "velt-code", "--subtype", "hands", "--eval-questions", "12"], "too few"),
    (["--lesson", "x", "--cluster", "velt-code", "--model", "MODEL"], "not a checkpoint"),
    (["--recall-from", "RECALL"], "needs --cluster"),
    (["--lesson", "x", "--library", "LIB"], "at most one of"),
    (["--lesson", "x", "--cluster", "velt-code", "--subtype", "hands", "--dev-questions", "2", "--eval-questions", "4"],
     "16 questions in"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(argv, names, tmp_path, monkeypatch, capsys):
    lib = write_library(tmp_path / "library.json")
    (tmp_path / "notackpt").mkdir()
    argv = [{"LIB": str(lib), "MODEL": str(tmp_path / "notackpt"), "RECALL": str(tmp_path)}.get(a, a) for a in argv]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(common, "load_model", trap)
    monkeypatch.setattr(common, "setup_run", trap)
    monkeypatch.setattr(sys, "argv", ["dream.py", "--data", str(DATA), "--out", str(work / "run"), *argv])
    with pytest.raises(SystemExit) as e:
        common.run_main(d.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and names in err[0], err
    assert list(work.iterdir()) == []


# ---- runs on the tiny model
# Cluster k: 12 questions but 8 texts ("k 0?" .. "k 7?"), the copies with their options swapped,
# as procedural generators and option permutation produce them.


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_tok):
    dd = tmp_path_factory.mktemp("dream")
    save_tiny_model(dd / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} {i % 8}?",
             "choices": ["x", "y"] if i < 8 else ["y", "x"], "answer": "AB"[(i % 8) % 2] if i < 8 else "BA"[(i % 8) % 2],
             "answer_type": "mcq", "lesson": f"{c} is y."} for c, n in (("k", 12), ("f", 3), ("g", 3)) for i in range(n)]
    (dd / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dd


TINY = ["--cluster", "k", "--dev-questions", "2", "--eval-questions", "5", "--gate-samples", "2", "--dev-samples", "2",
        "--eval-samples", "2", "--teacher-samples", "2", "--N", "2", "--answer-tokens", "2", "--canary-questions", "2",
        "--canary-samples", "1", "--replay-questions", "1", "--bootstrap", "50", "--fresh", "0"]


def tiny_argv(files, out, *extra):
    return ["dream.py", "--model", str(files / "model"), "--data", str(files / "q.jsonl"), "--out", str(out), *TINY, *extra]


def run_tiny(files, out, *extra, monkeypatch):
    monkeypatch.setattr(sys, "argv", tiny_argv(files, out, *extra))
    common.run_main(d.main)


def tiny_run_object(files, out, *extra):
    """A Run as main() builds it, before any arm: for calling run_arm itself."""
    args = d.build_parser().parse_args(tiny_argv(files, out, *extra)[1:])
    questions = common.load_questions(args.data)
    lesson, cluster, subtype, _ = d.resolve_lesson(args, questions)
    split = d.split_inputs(args, questions, cluster, subtype, lesson)
    out.mkdir()
    run = d.load_run(args, out, split, lesson, {"arms": {}, "before": {"canary": None}})
    return run, split


def test_gate_stops_a_lesson_with_no_effect(tiny_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_tiny(tiny_files, out, monkeypatch=monkeypatch)          # a random model: no lesson changes anything
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1].startswith("no context effect on dev") and "--force" in said[-1]
    assert not (out / "checkpoint").exists() and "nothing to internalise" in (out / "report.md").read_text()


def test_split_json_is_disjoint_by_text_and_each_text_once(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_tiny(tiny_files, out, monkeypatch=monkeypatch)
    split = json.loads((out / "split.json").read_text())["ids"]
    by_id = {q.id: q for q in common.load_questions(tiny_files / "q.jsonl")}
    texts = {k: [own_key(by_id[i.split("~")[0]]) for i in v] for k, v in split.items()}
    assert set(split) == {"dream", "permuted", "fresh", "dev", "eval", "canary", "replay"}
    for k in ("dream", "dev", "eval"):
        assert len(set(texts[k])) == len(texts[k])
    assert not set(texts["dream"]) & set(texts["eval"]) and not set(texts["dev"]) & set(texts["eval"])
    assert not set(texts["dream"]) & set(texts["dev"])
    assert len(texts["dream"]) == 8 - 2 - 5                    # 8 texts, not 12 ids


def test_run_arm_own_update_moves_the_weights_and_dev_selection_can_undo_it(tiny_files, tmp_path, monkeypatch):
    """run_arm itself, not a rebuilt step: its distill update moves every trained weight tensor that
    gets a gradient, logs the realised change, and leaves the rollout copy synced; --select dev on a
    random model (no dev gain) restores theta0."""
    run, _ = tiny_run_object(tiny_files, tmp_path / "a", "--steps", "2", "--canary-every", "1", "--optimizer", "sgd",
                             "--lr", "0.05", "--rollout-dtype", "float32")
    monkeypatch.setattr(d, "evaluate_after", lambda run, arm: arm)
    theta0 = {k: v.clone() for k, v in run.policy.model.state_dict().items()}
    arm = d.run_arm(run, "distill", "distill", run.lesson, "teacher")
    moved = [k for k, v in run.policy.model.state_dict().items() if not torch.equal(theta0[k], v)]
    assert arm["selected_step"] == 2 and moved
    steps = [m for m in common.read_metrics(run.out) if m.get("phase") == "step"]
    assert [m["step"] for m in steps] == [1, 2] and all(m["updated"] and m["grad_norm"] > 0 for m in steps)
    checks = [m for m in common.read_metrics(run.out) if m.get("phase") == "check"]
    assert checks[0]["distance_theta0"] == 0 and all(m["distance_theta0"] > 0 for m in checks[1:])
    assert run.policy.rollout is run.policy.model
    run.args.select = "dev"
    arm = d.run_arm(run, "distill", "distill", run.lesson, "teacher")
    assert arm["selected_step"] == 0
    assert all(torch.equal(theta0[k], v) for k, v in run.policy.model.state_dict().items())


def test_each_arm_is_selected_on_its_own_teachers_dev_target(tiny_files, tmp_path, monkeypatch):
    run, split = tiny_run_object(tiny_files, tmp_path / "a", "--steps", "1", "--select", "dev", "--optimizer", "sgd",
                                 "--lr", "0.05")
    monkeypatch.setattr(d, "evaluate_after", lambda run, arm: arm)
    asked = []
    real_ask = d.ask

    def ask(run, qs, lesson, n, stream):
        asked.append((stream, lesson))
        return real_ask(run, qs, lesson, n, stream)
    monkeypatch.setattr(d, "ask", ask)
    placebo = split["placebo"]
    arm = d.run_arm(run, "placebo", "dream", placebo, "teacher")
    assert ("dev-teacher", placebo) in asked and ("dev-teacher", run.lesson) not in asked
    assert arm["dev_target"] == [a for a, _ in d.teacher_target(run, placebo, "dev")["majority"]]


def test_forced_run_pairs_the_arms_and_stores_per_question_arrays(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_tiny(tiny_files, out, "--force", "--steps", "2", "--canary-every", "2", "--optimizer", "sgd", "--lr", "0.05",
             "--kl", "0.1", "--cd-coef", "1", "--cd-top-k", "4", monkeypatch=monkeypatch)
    metrics = common.read_metrics(out)
    steps = {a: [m for m in metrics if m.get("phase") == "step" and m["arm"] == a] for a in ("dream", "placebo", "verifier")}
    # dream and placebo (and the verifier arm): the same x' and the same rollout seeds at every step
    for a in ("placebo", "verifier"):
        assert [(m["inputs"], m["rollout_seed"]) for m in steps[a]] == [(m["inputs"], m["rollout_seed"]) for m in steps["dream"]]
    ev = json.loads((out / "eval.json").read_text())
    assert list(ev["arms"]) == ["dream", "placebo", "distill", "verifier"]
    for a in ev["arms"].values():
        assert np.shape(a["after"]["acc_x"]) == (5, 2) == np.shape(ev["before"]["acc_x"])
        assert len(a["after"]["lp_x"]) == 5
    assert set(ev["contrasts"]) == {"dream - placebo", "dream - distill", "verifier - dream"}
    dp = ev["contrasts"]["dream - placebo"]["acc_x"]
    diff = np.mean(ev["arms"]["dream"]["after"]["acc_x"]) - np.mean(ev["arms"]["placebo"]["after"]["acc_x"])
    assert dp["mean"] == pytest.approx(diff) and dp["n_clusters"] == 5
    report = (out / "report.md").read_text()
    assert "LABELLED upper bound" in report and "dream - placebo" in report and "IR_lp" in report
    rec = common.load_bank(out / "dreamt.json", "dream-record")["entries"]
    assert len(rec) == 1 and rec[0]["lesson"] == "k is y." and "IR_lp" in rec[0]
    assert (out / "checkpoint" / "model.safetensors").exists()


def test_distillation_term_trains_even_where_grpo_has_no_signal(tiny_files, tmp_path, monkeypatch):
    """A random model earns reward 0 everywhere, so every GRPO group is skipped; the differentiable
    context-distillation KL against the frozen teacher on x' + r still updates every rollout."""
    out = tmp_path / "run"
    run_tiny(tiny_files, out, "--force", "--reward", "verifier", "--cd-coef", "1", "--cd-top-k", "4", "--steps", "1",
             "--no-controls", "--optimizer", "sgd", "--lr", "0.05", "--rollout-dtype", "float32",
             monkeypatch=monkeypatch)      # pinned: "auto" picks bf16 on CPUs with avx512_bf16 / AMX
    step = next(m for m in common.read_metrics(out) if m.get("phase") == "step")
    assert step["skipped_groups"] == 2 and step["pg_loss"] == 0.0
    assert step["cd_kl"] > 0 and step["updated"] and step["grad_norm"] > 0
    assert step["logprob_mismatch"]["n"] > 0 and step["logprob_mismatch"]["max"] < 1e-3   # fp32: float noise


@pytest.mark.parametrize("source", ["library", "recall"])
def test_library_and_recall_sources_resolve_through_main(source, tmp_path, monkeypatch, capsys):
    """Each lesson source is read and its type checked before anything loads: with too many
    evaluation questions asked for, the run stops at the split check, after the lesson resolved."""
    if source == "library":
        flags = ["--library", str(write_library(tmp_path / "library.json")), "--cluster", "velt-code", "--subtype", "hands"]
    else:
        run = fake_recall_run(tmp_path, [("velt-code", "hands", "palm means turn right")])
        flags = ["--recall-from", str(run), "--cluster", "velt-code", "--subtype", "hands"]
    monkeypatch.setattr(common, "load_model", trap)
    monkeypatch.setattr(common, "setup_run", trap)
    monkeypatch.setattr(sys, "argv", ["dream.py", "--data", str(DATA), *flags, "--eval-questions", "99"])
    with pytest.raises(SystemExit):
        common.run_main(d.main)
    assert "velt-code/hands has 16 questions" in capsys.readouterr().err


def test_bf16_rollout_copy_is_synced_after_every_update_and_restore(tiny_files, tmp_path, monkeypatch, bf16_rollouts):
    """--rollout-dtype bfloat16: every sample (gate, teacher, rollouts, canary, dev, eval after the
    dev-selected restore) comes from the bf16 copy, equal at that moment to the trained weights."""
    run_tiny(tiny_files, tmp_path / "run", "--force", "--method", "distill", "--steps", "2", "--select", "dev",
             "--canary-every", "1", "--no-controls", "--no-positive-control", "--optimizer", "sgd", "--lr", "0.05",
             "--rollout-dtype", "bfloat16", monkeypatch=monkeypatch)
    assert bf16_rollouts and all(c["bf16"] and c["synced"] for c in bf16_rollouts)
    assert len({c["weights"] for c in bf16_rollouts}) > 1, "the weights never moved between samples"
    steps = [m for m in common.read_metrics(tmp_path / "run") if m.get("updated")]
    assert steps and all(m["rollout_sync_s"] > 0 for m in steps)


# ---- --resume: kill a real tiny run at two points, resume it, get the uninterrupted result


def subprocess_run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_a_killed_run_resumes_the_arm_it_was_in_and_keeps_finished_arms(tiny_files, tmp_path):
    flags = ["--force", "--steps", "2", "--canary-every", "1", "--optimizer", "sgd", "--lr", "0.05",
             "--rollout-dtype", "float32"]
    cmd = lambda out, *x: [sys.executable, str(ROOT / "dream.py"), *tiny_argv(tiny_files, out, *flags)[1:], *x]  # noqa: E731
    ref = tmp_path / "ref"
    assert subprocess_run(cmd(ref)).returncode == 0
    rows = common.read_metrics(ref)
    first = lambda arm: next(i for i, m in enumerate(rows) if m.get("arm") == arm and m["phase"] == "step")  # noqa: E731
    want = json.loads((ref / "eval.json").read_text())["arms"]
    for point in (first("dream") + 1, first("distill") + 2):       # inside the main arm; inside a later arm
        out = tmp_path / f"k{point}"
        r = subprocess_run(killing_cmd(cmd(out), f"after_metrics:{point}"))
        assert r.returncode == -9, r.stderr[-2000:]
        r = subprocess_run(cmd(out, "--resume"))
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads((out / "eval.json").read_text())["arms"]
        assert list(got) == list(want)
        for a in want:
            assert got[a]["after"] == want[a]["after"] and got[a]["selected_step"] == want[a]["selected_step"], a
        kept = [a for a in want if f"{a}: finished before the resume, kept" in r.stdout]
        assert kept == ([] if point == first("dream") + 1 else ["dream", "placebo"])
        steps = [(m["arm"], m["step"]) for m in common.read_metrics(out) if m.get("phase") == "step"]
        assert len(steps) == len(set(steps)) == 2 * len(want)      # every step once: none lost, none twice
