"""dream.py: the label-free reward, the split and variations, the update, the guardrails, the
measurement, the lesson sources, and a run on the tiny model."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_gemma, save_tiny_model

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


# ---- inputs


def test_split_keeps_dream_dev_and_eval_disjoint():
    qs = [q for q in common.load_questions(DATA) if q.subtype == "hands"]
    for seed in range(5):
        dream, dev, ev = d.split_type(qs, 4, 8, seed)
        ids = [set(q.id for q in part) for part in (dream, dev, ev)]
        assert len(ids[1]) == 4 and len(ids[2]) == 8 and len(ids[0]) == len(qs) - 12
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
        assert set().union(*ids) == {q.id for q in qs}


def test_fresh_instances_are_new_questions_of_the_type_never_a_dev_or_eval_question():
    qs = [q for q in common.load_questions(DATA) if q.subtype == "hands"]
    fresh = d.fresh_instances("velt-code", "hands", 12, seed=1, avoid=qs)
    assert len(fresh) == 12
    key = lambda q: (q.question, tuple(q.choices), q.cue)                   # noqa: E731
    assert not {key(q) for q in fresh} & {key(q) for q in qs}
    assert all(q.cluster == "velt-code" and q.subtype == "hands" for q in fresh)
    assert len({key(q) for q in fresh}) == 12
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


def test_placebo_is_another_types_lesson_of_the_same_length():
    r = "Velt hand signals: palm means turn right, fist means turn left."
    others = ["In the Brill dialect mova means water, tesk means fire, lun means tree and dar means stone.",
              "Short one.", r]
    pl = d.placebo_lesson(r, others)
    assert pl != r and len(pl.split()) == len(r.split()) and pl.startswith("In the Brill dialect")
    assert d.placebo_lesson(r, [r]) is None


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


def test_one_dream_step_changes_the_weights_and_only_under_grad(tiny):
    _, tok = tiny
    model = make_tiny_gemma(len(tok), seed=5)
    params = list(model.parameters())
    w0 = d.snapshot(model)
    q = common.Question("q", "c", "Hi?", "A", "mcq", choices=["x", "y"])
    prompt = common.question_prompt(tok, q, examples=False)
    roll = common.sample(model, tok, [prompt], n=4, max_new_tokens=3, temperature=0.7, seed=0)
    with torch.no_grad():
        common.token_logprobs(model, [common.encode(tok, prompt)] * 4, [s.token_ids for s in roll], temperature=0.7)
    assert all(torch.equal(w0[k], v) for k, v in model.state_dict().items()), "sampling or scoring moved a weight"
    assert all(p.grad is None for p in params)
    A, keep = d.group_advantages(np.array([[1.0, 0.0, 0.0, 0.5]]))
    assert keep.all()
    lp = common.token_logprobs(model, [common.encode(tok, prompt)] * 4, [s.token_ids for s in roll], temperature=0.7,
                               pad_id=tok.pad_token_id)
    d.pg_loss(lp["logprobs"], lp["mask"], torch.tensor(A[0], dtype=torch.float32)).backward()
    torch.optim.SGD(params, lr=0.1).step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(w0[k], v)]
    assert changed, "the update did not move any weight"


# ---- guardrails


def test_rollback_restores_the_earlier_weights(tiny):
    _, tok = tiny
    model = make_tiny_gemma(len(tok), seed=6)
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
    d.restore(model, guard["last_good"][1])
    assert all(torch.equal(w2[k], v) for k, v in model.state_dict().items())
    # without --rollback the alarm is raised but the weights still compete on dev
    assert d.guard_step(guard, 6, 0.1, can0, 0.9, False, lambda: d.snapshot(model)) == "alarm"
    assert guard["best"][1] == 6


def test_gate_needs_an_interval_above_zero():
    assert d.gate_passes({"mean": 0.3, "lo": 0.05, "hi": 0.5})
    assert not d.gate_passes({"mean": 0.3, "lo": -0.05, "hi": 0.6})
    assert not d.gate_passes({"mean": 0.0, "lo": float("nan"), "hi": float("nan")})


# ---- measurement


def test_internalisation_ratio_on_hand_made_arms():
    before_x = np.zeros((8, 4))
    before_xr = np.tile([1.0, 1.0, 0.0, 0.0], (8, 1))                       # the lesson adds +0.5
    after_x = np.tile([1.0, 0.0, 0.0, 0.0], (8, 1))                         # dreaming recovers +0.25
    ir = d.internalisation(before_x, before_xr, after_x, B=500, seed=0)
    assert ir["IR"]["mean"] == pytest.approx(0.5)
    assert ir["IR"]["lo"] <= 0.5 <= ir["IR"]["hi"]
    assert ir["numerator"]["mean"] == pytest.approx(0.25) and ir["denominator"]["mean"] == pytest.approx(0.5)
    # no lesson effect (denominator spans 0): no ratio, the two parts instead
    noisy = np.tile([1.0, 0.0, 0.0, 0.0], (8, 1))
    ir = d.internalisation(noisy, np.roll(noisy, 1, axis=1), after_x, B=500, seed=0)
    assert ir["IR"] is None and ir["denominator"]["lo"] <= 0 <= ir["denominator"]["hi"]


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


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_tok):
    dd = tmp_path_factory.mktemp("dream")
    save_tiny_model(dd / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} {i}?", "choices": ["x", "y"],
             "answer": "AB"[i % 2], "answer_type": "mcq", "lesson": f"{c} is y."}
            for c, n in (("k", 6), ("f", 3), ("g", 3)) for i in range(n)]
    (dd / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dd


def run_tiny(files, out, *extra, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["dream.py", "--model", str(files / "model"), "--data", str(files / "q.jsonl"),
                                      "--out", str(out), "--cluster", "k", "--dev-questions", "2",
                                      "--eval-questions", "2", "--gate-samples", "2", "--dev-samples", "2",
                                      "--eval-samples", "2", "--teacher-samples", "2", "--N", "2",
                                      "--answer-tokens", "2", "--canary-questions", "2", "--canary-samples", "1",
                                      "--replay-questions", "1", "--bootstrap", "50", "--fresh", "0", *extra])
    common.run_main(d.main)


def test_gate_stops_a_lesson_with_no_effect(tiny_files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_tiny(tiny_files, out, monkeypatch=monkeypatch)          # a random model: no lesson changes anything
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1].startswith("no context effect on dev") and "--force" in said[-1]
    assert not (out / "checkpoint").exists() and "nothing to internalise" in (out / "report.md").read_text()


def test_forced_run_writes_report_record_and_the_dev_selected_checkpoint(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_tiny(tiny_files, out, "--force", "--method", "distill", "--steps", "2", "--canary-every", "2",
             "--optimizer", "sgd", "--lr", "0.05", "--kl", "0.1", monkeypatch=monkeypatch)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if m.get("method") == "distill" and "check" not in m and "phase" not in m]
    assert [m["step"] for m in steps] == [1, 2] and all(m["updated"] and m["grad_norm"] > 0 for m in steps)
    assert {m["arm"] for m in lines if m.get("phase") == "result"} == {"distill", "placebo", "dream"}
    report = (out / "report.md").read_text()
    assert "| distill (distill)" in report and "| placebo (distill)" in report and "| dream (dream)" in report
    rec = common.load_bank(out / "dreamt.json", "dream-record")["entries"][0]
    assert rec["lesson"] == "k is y." and "IR_denominator" in rec
    # dev saw no gain on a random model, so the pre-dream weights are kept, although training moved them
    result = next(m for m in lines if m.get("phase") == "result" and m["arm"] == "distill")
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()
    orig = AutoModelForCausalLM.from_pretrained(tiny_files / "model").state_dict()
    same = all(torch.equal(saved[k], orig[k]) for k in orig)
    assert same == (result["selected_step"] == 0)


def test_distillation_term_trains_even_where_grpo_has_no_signal(tiny_files, tmp_path, monkeypatch):
    """A random model earns reward 0 everywhere, so every GRPO group is skipped; the differentiable
    context-distillation KL against the frozen teacher on x' + r still updates every rollout."""
    out = tmp_path / "run"
    run_tiny(tiny_files, out, "--force", "--reward", "verifier", "--cd-coef", "1", "--cd-top-k", "4", "--steps", "1",
             "--no-controls", "--optimizer", "sgd", "--lr", "0.05", "--rollout-dtype", "float32",
             monkeypatch=monkeypatch)      # pinned: "auto" picks bf16 on CPUs with avx512_bf16 / AMX
    step = next(json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
                if '"step": 1' in ln and '"check"' not in ln and '"phase"' not in ln)
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
    run_tiny(tiny_files, tmp_path / "run", "--force", "--method", "distill", "--steps", "2",
             "--canary-every", "1", "--no-controls", "--optimizer", "sgd", "--lr", "0.05",
             "--rollout-dtype", "bfloat16", monkeypatch=monkeypatch)
    assert bf16_rollouts and all(c["bf16"] and c["synced"] for c in bf16_rollouts)
    assert len({c["weights"] for c in bf16_rollouts}) > 1, "the weights never moved between samples"
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m.get("updated")]
    assert steps and all(m["rollout_sync_s"] > 0 for m in steps)
