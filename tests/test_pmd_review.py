"""pmd_distill.py, the review's items: feedback modes and redaction, the answer-format diagnostics,
retrieval by type, the gate, --seed-memory, warm-up and the EMA after a real step only, option
rotations, the training-set control; and the tests the old suite could not fail: GRPO's signs, the
teacher input on the training path, no context no loss, student vs teacher top-k, --freeze policy
evaluated with memory."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_gemma
from test_pmd import fake_verify, files, mcq, run  # noqa: F401  (the tiny-run fixture and helpers)

import common
import pmd_distill as pmd


def rollouts_of(q, texts, rewards, prompt_ids=(2,), comps=None):
    comps = comps or [[3 + i] for i in range(len(texts))]
    return [common.Rollout(q, list(prompt_ids), c, t, float(r), common.verify(q, t)[1] if r != 1 else "correct", [0.0] * len(c))
            for t, r, c in zip(texts, rewards, comps)]


def ctx_args(**kw):
    base = dict(G=4, method="sdpo", feedback="none", levels="experience,insight,behavior", memory_tokens=200,
                teacher_format="sdpo")
    return SimpleNamespace(**{**base, **kw})


def feedback_part(prompt):
    key = "unsuccessful earlier attempt:\n\n"
    return prompt.split(key, 1)[1].split("\n\n")[0] if prompt and key in prompt else None


# ----------------------------------------------------------------------------
# 1. feedback


def test_feedback_defaults_to_none_for_multiple_choice():
    a = pmd.build_parser().parse_args([])
    pmd.check_args(a, [mcq("q1"), mcq("q2")])
    assert a.feedback == "none"
    a = pmd.build_parser().parse_args([])
    pmd.check_args(a, [mcq("q1"), common.Question(id="n", cluster="c", question="2+2?", answer="4", answer_type="number")])
    assert a.feedback == "without-solution"


def test_feedback_modes_follow_the_reference(tiny_tok):
    q = mcq("q1")
    solved = rollouts_of(q, [" gold word", " A", " C", " A"], [1, 0, 0, 0])
    unsolved = rollouts_of(q, [" A", " C", " A", " C"], [0, 0, 0, 0])
    fb = lambda mode, rolls: [feedback_part(c.prompt) for c in pmd.teacher_contexts(ctx_args(feedback=mode), tiny_tok, [q], rolls, None, {})]
    assert fb("none", solved) == [None] * 4 and fb("none", unsolved) == [None] * 4
    assert fb("without-solution", solved) == [None] * 4              # a success is shown: no feedback
    assert all(f is not None for f in fb("without-solution", unsolved))
    assert fb("always", solved)[0] is None and all(f is not None for f in fb("always", solved)[1:])


def test_gold_answer_the_policy_did_not_produce_is_redacted_from_every_feedback_string(tiny_tok):
    q = mcq("q1")
    unsolved = rollouts_of(q, [" A", " C", " A", " C"], [0, 0, 0, 0])
    for mode in ("without-solution", "always"):
        for c in pmd.teacher_contexts(ctx_args(feedback=mode), tiny_tok, [q], unsolved, None, {}):
            f = feedback_part(c.prompt)
            assert f.startswith("wrong: got ") and "B" not in f and "gold word" not in f.lower(), f
    # the group produced the gold answer (and succeeded): the line may keep it
    solved = rollouts_of(q, [" gold word", " A", " C", " A"], [1, 0, 0, 0])
    assert feedback_part(pmd.teacher_contexts(ctx_args(feedback="always"), tiny_tok, [q], solved, None, {})[1].prompt) == "expected B, got A"
    assert pmd.redact(q, "expected B, no option letter found") == "wrong: no option letter found"
    assert "gold word" not in pmd.redact(q, "expected B, got 'gold word and more'").lower()


def test_the_setting_that_ran_is_in_the_report(files, tmp_path, monkeypatch):
    out = tmp_path / "fb"
    run(files, out, monkeypatch, "--method", "sdpo")
    assert "feedback none" in (out / "report.md").read_text()
    assert json.loads((out / "eval.json").read_text())["settings"]["feedback"] == "none"


# ----------------------------------------------------------------------------
# 2. the answer format


class Peaked(torch.nn.Module):
    """A stand-in model whose next-token distribution puts all mass on one id."""

    def __init__(self, V, tok_id):
        super().__init__()
        self.w, self.V, self.tok_id = torch.nn.Parameter(torch.zeros(1)), V, tok_id
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def forward(self, input_ids):
        logits = torch.full((1, input_ids.shape[1], self.V), -1e9)
        logits[0, -1, self.tok_id] = 0.0
        return SimpleNamespace(logits=logits)


def test_first_token_mass_counts_stop_and_option_ids(tiny_tok):
    q = mcq("q1")
    V = len(tiny_tok)
    on = lambda i: pmd.first_token_mass(Peaked(V, i), tiny_tok, [q], ["Question: x\nAnswer:"])
    assert on(tiny_tok.eos_token_id)["p_stop"] == pytest.approx(1.0)
    nl = tiny_tok("\n", add_special_tokens=False).input_ids[0]
    assert on(nl)["p_stop"] == pytest.approx(1.0) and on(nl)["p_option"] == pytest.approx(0.0)
    b = tiny_tok("B", add_special_tokens=False).input_ids[0]
    assert on(b)["p_option"] == pytest.approx(1.0) and on(b)["p_stop"] == pytest.approx(0.0)
    z = tiny_tok("Z", add_special_tokens=False).input_ids[0]
    assert on(z)["p_option"] == pytest.approx(0.0)


def test_no_answer_share_and_teacher_probes_are_logged(files, tmp_path, monkeypatch):
    out = tmp_path / "na"
    run(files, out, monkeypatch, "--method", "pmd", "--epochs", "2")
    rows = common.read_metrics(out)
    assert all(0 <= m["no_answer"] <= 1 for m in rows)
    per_epoch = len(rows) // 2
    probed = [m["step"] for m in rows if "probe" in m]
    assert probed == [0, per_epoch]                                   # step 0, then each epoch's first step
    for m in rows:
        if "probe" in m:
            assert set(m["probe"]) == {"with_context", "without"} and m["probe"]["without"]["n"] > 0
    s = json.loads((out / "eval.json").read_text())["summary"]
    assert "no_answer" in s["base"] and "no_answer" in s["final"]


# ----------------------------------------------------------------------------
# 3. retrieval by type


def test_memory_retrieves_other_questions_of_the_type_from_the_first_step(tiny_tok):
    q1, q2, q3 = mcq("q1"), mcq("q2"), mcq("q3", cluster="other")
    mem = pmd.new_memory()
    pmd.add_experience(mem, q2, " gold word", 1.0, "correct: B", epoch=0, step=0)
    pmd.add_experience(mem, q3, " gold word", 1.0, "correct: B", epoch=0, step=0)
    own, block, used = pmd.retrieve(mem, q1, pmd.LEVELS, tiny_tok, 400)
    assert own is None and "What is q2?" in block and "B) gold word" in block and "q3" not in block
    rec = {}
    rolls = rollouts_of(q1, [" A", " C", " A", " C"], [0, 0, 0, 0])
    ctx = pmd.teacher_contexts(ctx_args(method="pmd"), tiny_tok, [q1], rolls, mem, rec)
    assert rec["memory_contexts"] == 4 and rec["group_contexts"] == 0 and all("What is q2?" in c.prompt for c in ctx)


def test_memory_gain_is_logged_for_pmd(files, tmp_path, monkeypatch):
    out = tmp_path / "mg"
    run(files, out, monkeypatch, "--method", "pmd", "--train-per-type", "2", "--B", "1")
    gains = [m["memory_gain"] for m in common.read_metrics(out) if "memory_gain" in m]
    assert gains and all(np.isfinite(g["mean"]) for g in gains)
    assert all(k in m for m in common.read_metrics(out) for k in ("memory_contexts", "group_contexts", "feedback_contexts"))


# ----------------------------------------------------------------------------
# 4. the gate


def gate_world(tiny, gains_by_sibling, n_siblings):
    """Four training questions of one cluster (q0 the source), the fake teacher's gain per sibling."""
    model, tok = tiny
    train = [mcq(f"q{i}") for i in range(n_siblings + 1)]
    seen = []

    def fake_logprob(teacher, tok_, prompts, answers):
        qid = next(q.id for q in train if f"Question: What is {q.id}?" in prompts[0])
        seen.append(qid)
        return np.array([gains_by_sibling.get(qid, 0.0), 0.0])

    args = SimpleNamespace(gate_siblings=3, seed=0, temperature=0.7, reflector="template", levels="experience,insight",
                           insights_per_question=2, insights_per_subtype=4)
    st = pmd.State(memory=pmd.new_memory(), epoch_rollouts=[{"q": "q0", "text": " gold word", "reward": 1.0, "feedback": "correct"}])
    policy = SimpleNamespace(rollout=model, tok=tok)
    return args, policy, st, train, fake_logprob, seen


@pytest.mark.parametrize("gains, n_sib, admitted", [
    ({"q1": 0.5, "q2": 0.6, "q3": 0.7}, 3, 1),       # lower bound above 0
    ({"q1": 0.5, "q2": -0.4, "q3": 0.7}, 3, 0),      # mean > 0, lower bound below 0: not admitted
    ({"q1": 1.0, "q2": 1.01}, 2, 0),                 # two siblings only (however clear): nothing admitted, it says so
])
def test_gate_admits_on_the_lower_bound_over_three_siblings_never_a_source(tiny, monkeypatch, gains, n_sib, admitted):
    args, policy, st, train, fake, seen = gate_world(tiny, gains, n_sib)
    monkeypatch.setattr(common, "answer_logprob", fake)
    info = pmd.epoch_end(args, policy, None, st, train, epoch=0)
    assert info["admitted"] == admitted and info["candidates"] == 1
    assert "q0" not in seen and len(seen) == n_sib                    # never scored on its source
    if n_sib < 3:
        assert info["untestable"] == 1 and info["admit_rate"] is None and "nothing admitted" in info["note"]
    else:
        assert info["admit_rate"]["n"] == 1


def test_old_insight_is_rescored_without_any_of_its_sources(tiny, monkeypatch):
    args, policy, st, train, fake, seen = gate_world(tiny, {"q0": 1.0, "q2": -5.0, "q3": 1.1, "q4": 1.2}, 5)
    monkeypatch.setattr(common, "answer_logprob", fake)
    pmd.add_insight(st.memory, {"cluster": "c", "subtype": "s", "question": "q1", "scope": "subtype", "kind": "strategy",
                                "text": "merged lesson about zorbs", "epoch": -1, "sources": ["q1", "q2"]}, 2, 4)
    st.epoch_rollouts = []
    pmd.epoch_end(args, policy, None, st, train, epoch=1)
    assert seen == ["q0", "q3", "q4"]                     # not q1 or q2, its sources
    e = next(e for e in st.memory["entries"] if e["level"] == "insight")
    assert e["helpful"] == 2 and e["harmful"] == 0


# ----------------------------------------------------------------------------
# 5. --seed-memory data


def test_seed_memory_puts_the_data_lessons_in_as_insights(tiny_tok):
    qs = [common.Question(id=f"q{i}", cluster="c", subtype="s", question=f"Q{i}?", choices=["a", "b"], answer="A",
                          answer_type="mcq", lesson="In c, always a.") for i in range(3)]
    mem = pmd.new_memory()
    pmd.seed_memory(mem, qs)
    ins = [e for e in mem["entries"] if e["level"] == "insight"]
    assert len(ins) == 1 and ins[0]["text"] == "In c, always a." and set(ins[0]["sources"]) == {"q0", "q1", "q2"}
    pmd.check_no_heldout(mem, {"q0", "q1", "q2"})
    assert "In c, always a." in pmd.retrieve(mem, qs[0], pmd.LEVELS, tiny_tok, 100)[1]


# ----------------------------------------------------------------------------
# 6. warm-up and the EMA after a real step only


def test_warmup_factor():
    assert [pmd.warmup_factor(s, 10) for s in (0, 4, 9, 30)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    assert pmd.warmup_factor(0, 0) == 1.0


def tiny_policy(tiny_tok, lr=1e-2):
    model = make_tiny_gemma(len(tiny_tok), seed=4)
    params = [p for p in model.parameters() if p.requires_grad]
    return common.Policy(model, model, tiny_tok, params, torch.optim.AdamW(params, lr=lr))


def test_update_warms_the_lr_up_and_reports_no_step_without_a_loss(tiny_tok):
    policy = tiny_policy(tiny_tok)
    args = SimpleNamespace(lr=1e-2, warmup=10, clip=1.0)
    before = [p.detach().clone() for p in policy.params]
    rec = {}
    assert pmd.update(args, policy, 0, [None], rec) is False and rec["grad_norm"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, policy.params))
    lp = common.token_logprobs(policy.model, [[2, 5, 6]], [[7, 8]], pad_id=1)
    (-lp["logprobs"].sum()).backward()
    rec = {}
    assert pmd.update(args, policy, 0, [1.0], rec) is True
    assert policy.opt.param_groups[0]["lr"] == pytest.approx(1e-3) and rec["lr"] == pytest.approx(1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.params))


def test_ema_teacher_moves_only_after_an_optimizer_step(files, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pmd, "ema_update", lambda *a: calls.append(1))
    out = tmp_path / "ema"
    run(files, out, monkeypatch, "--method", "sdpo", "--epochs", "1")
    moved = [m for m in common.read_metrics(out) if m["grad_norm"] is not None and not m.get("skipped")]
    assert len(calls) == len(moved) > 0
    calls.clear()
    out = tmp_path / "ema0"          # no success anywhere and --feedback none: no context, no loss, no step
    run(files, out, monkeypatch, "--method", "sdpo", "--epochs", "1", verify=lambda q, t: (0.0, "expected B, got A"))
    assert calls == [] and all(m["grad_norm"] is None for m in common.read_metrics(out))


# ----------------------------------------------------------------------------
# 7. option rotations


def test_rotations_move_the_gold_answer_over_every_letter():
    q = common.Question(id="q", cluster="c", question="Which?", choices=["w", "x", "y", "z"], answer="C", answer_type="mcq")
    rots = [pmd.rotated(q, k) for k in range(4)]
    assert sorted(r.answer for r in rots) == ["A", "B", "C", "D"]
    assert all(r.choices[common.LETTERS.index(r.answer)] == "y" for r in rots)
    assert len({r.id for r in rots}) == 4 and all(r.meta["source"] == "q" for r in rots)


def test_score_set_scores_every_rotation_with_the_same_rows_for_any_model(tiny, monkeypatch):
    model, tok = tiny
    calls = []
    real = common.score

    def spy(m, t, qs, prompts, n, seed, stream, keys=(), **kw):
        calls.append(([q.id for q in qs], [q.answer for q in qs]))
        return real(m, t, qs, prompts, n, seed, stream, keys, **kw)

    monkeypatch.setattr(common, "score", spy)
    args = SimpleNamespace(permutations=3, levels="experience", memory_tokens=50, seed=0, max_new_tokens=2, temperature=0.7)
    qs = [mcq("q1"), mcq("q2", answer="A")]
    a = pmd.score_set(args, model, tok, qs, "eval", 2)
    b = pmd.score_set(args, make_tiny_gemma(len(tok), seed=9), tok, qs, "eval", 2)
    assert calls[0] == calls[1] and len(calls[0][0]) == 6 and len(set(calls[0][1][:3])) == 3
    assert [len(p["rewards"]) for p in a] == [6, 6] and [p["id"] for p in a] == [p["id"] for p in b] == ["q1", "q2"]


# ----------------------------------------------------------------------------
# 8. the training-set control


def test_training_questions_are_scored_before_and_after_on_the_same_rows(files, tmp_path, monkeypatch):
    out, seen, real = tmp_path / "ctl", [], pmd.score_set
    monkeypatch.setattr(pmd, "score_set", lambda args, m, *a: seen.append((a[2], [q.id for q in a[1]])) or real(args, m, *a))
    run(files, out, monkeypatch, "--method", "grpo", "--lr", "1e-3")
    assert [s for s, _ in seen].count("train-control") == 2              # before and after, the same stream
    ev, split = json.loads((out / "eval.json").read_text()), json.loads((out / "split.json").read_text())
    assert [p["id"] for p in ev["base"]["train"]] == [p["id"] for p in ev["final"]["train"]] == split["train"]
    assert ev["summary"]["train_control"]["n"] == len(split["train"]) * 2
    assert "Positive control" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------
# the tests that could not fail


def test_grpo_advantages_on_hand_made_rewards():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    A = pmd.grpo_advantages(R)
    torch.testing.assert_close(A, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]))
    lp, mask = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]), torch.tensor([[True, True], [True, False]])
    # -(A_0 (lp_00 + lp_01) + A_1 lp_10) / 3 tokens
    assert float(pmd.grpo_loss(lp, mask, torch.tensor([1.0, -1.0]))) == pytest.approx(-(1 * -3 + -1 * -3) / 3)
    assert float(pmd.grpo_loss(lp, mask, torch.tensor([2.0, 0.0]))) == pytest.approx(2.0)


def test_grpo_step_raises_the_rewarded_completion_and_skips_zero_variance_groups(tiny_tok):
    policy = tiny_policy(tiny_tok)
    q, comps = mcq("q1"), [[10, 11], [12, 13], [10, 11], [12, 13]]
    rolls = rollouts_of(q, ["a", "b", "c", "d"] * 2, [1, 0, 1, 0, 1, 1, 1, 1], prompt_ids=(2, 5, 6), comps=comps * 2)
    args = SimpleNamespace(G=4, method="grpo", grpo_blend=0.0, micro_batch=3, temperature=1.0)
    lp = lambda c: float(common.token_logprobs(policy.model, [[2, 5, 6]], [c], pad_id=1)["logprobs"].sum())
    before = (lp([10, 11]), lp([12, 13]))
    rec = {}
    assert pmd.grpo_loss_on(args, policy, rolls, rec) is not None
    assert rec["groups_used"] == 1 and rec["active_tokens"] == 8           # the all-1 group is skipped
    with torch.no_grad():
        for p in policy.params:
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert lp([10, 11]) > before[0] and lp([12, 13]) < before[1]


def test_teacher_input_on_the_training_path_and_no_context_no_loss(tiny_tok, monkeypatch):
    policy, teacher = tiny_policy(tiny_tok), make_tiny_gemma(len(tiny_tok), seed=8)
    q = mcq("q1")
    comps = [[10, 11, 1], [12, 1], [13, 14], [15]]
    rolls = rollouts_of(q, [" gold word", " A", " C", " A"], [1, 0, 0, 0], prompt_ids=(2, 5, 6), comps=comps)
    ctx = [pmd.Context(None), pmd.Context("T one"), pmd.Context(None), pmd.Context("T three")]
    calls = []
    real = common._logprobs          # behind every scoring entry point

    def spy(model, prompt_ids, completion_ids, **kw):
        calls.append((model, prompt_ids, completion_ids))
        return real(model, prompt_ids, completion_ids, **kw)

    monkeypatch.setattr(common, "_logprobs", spy)
    args = SimpleNamespace(micro_batch=8, top_k=6, temperature=0.7, alpha=0.5, tail=True, grpo_blend=0.0)
    st = pmd.State(memory=pmd.new_memory())
    assert pmd.sdpo_loss_on(args, policy, teacher, rolls, ctx, st, {}) > 0
    (s_model, s_p, s_c), (t_model, t_p, t_c) = calls
    assert s_model is policy.model and s_p == [[2, 5, 6]] * 2 and s_c == [comps[1], comps[3]]
    assert t_model is teacher and t_p == [common.encode(tiny_tok, "T one"), common.encode(tiny_tok, "T three")]
    assert t_c == [comps[1], comps[3]]                                  # the student's SAME ids
    # no context anywhere: no loss, no gradient
    policy.opt.zero_grad(set_to_none=True)
    assert pmd.sdpo_loss_on(args, policy, teacher, rolls, [pmd.Context(None)] * 4, st, {}) is None
    assert all(p.grad is None for p in policy.params)


def test_divergence_uses_the_students_top_k_not_the_teachers(tiny):
    model, tok = tiny
    teacher = make_tiny_gemma(len(tok), seed=5)
    prompts, comps, T, k = [[2, 30, 31]], [[40, 41, 42]], 0.7, 5
    st = common.student_topk(model, prompts, comps, k, temperature=T, pad_id=1)
    with torch.no_grad():
        te = common.logprobs_at(teacher, prompts, comps, st["student_topk_ids"], temperature=T, pad_id=1)
    ours = float(pmd.sdpo_loss(st["student_topk_logprobs"], te["extra_logprobs"], st["mask"], 0.5, True))
    full = lambda m: torch.log_softmax(m(input_ids=torch.tensor([prompts[0] + comps[0]])).logits[0, 2:5] / T, -1)
    with torch.no_grad():
        s_log, t_log = full(model), full(teacher)
    ref = lambda ids: float(common.alpha_divergence(common.add_tail(s_log.gather(-1, ids)), common.add_tail(t_log.gather(-1, ids)), 0.5).mean())
    s_ids, t_ids = s_log.topk(k, -1).indices, t_log.topk(k, -1).indices
    assert not torch.equal(s_ids.sort(-1).values, t_ids.sort(-1).values)   # the two top-k sets differ here
    assert ours == pytest.approx(ref(s_ids), abs=1e-5) and abs(ours - ref(t_ids)) > 1e-4


def test_freeze_policy_is_evaluated_with_memory_and_the_others_without(files, tmp_path, monkeypatch):
    seen = []
    real = pmd.score_set
    monkeypatch.setattr(pmd, "score_set", lambda args, m, tok, qs, stream, n, mem=None: seen.append((args.freeze, stream, mem is not None))
                        or real(args, m, tok, qs, stream, n, mem))
    run(files, tmp_path / "fp", monkeypatch, "--method", "pmd", "--freeze", "policy")
    run(files, tmp_path / "pm", monkeypatch, "--method", "pmd")
    final = [(f, s, m) for f, s, m in seen if s in ("eval", "train-control")]
    base = final[:2]
    assert base == [("policy", "eval", False), ("policy", "train-control", False)]      # the base is memory-free
    assert ("policy", "eval", True) in final and ("policy", "dev", True) in seen
    assert all(not m for f, s, m in seen if f is None)


def test_mitigation_rule_as_written_in_rule_md():
    sys.path.insert(0, str(Path(common.__file__).parent / "bench"))
    import pmd_mitigation as pm
    row = lambda name, acc, na: {"name": name, "accuracy": acc, "no_answer": na}
    # a candidate that worsens the format is never eligible, however accurate
    assert pm.choose([row("reference", 0.30, 0.10), row("alpha-1", 0.60, 0.20)], 64) == "reference"
    # the highest accuracy among the eligible
    assert pm.choose([row("reference", 0.30, 0.10), row("alpha-1", 0.40, 0.05), row("no-tail", 0.50, 0.10)], 64) == "no-tail"
    # a difference under one sample is a tie: the lower no-answer share, then list order (the reference)
    assert pm.choose([row("reference", 0.30, 0.10), row("alpha-1", 0.31, 0.10)], 64) == "reference"
    assert pm.choose([row("reference", 0.30, 0.10), row("alpha-1", 0.30, 0.05)], 64) == "alpha-1"


def test_memory_gain_gets_no_interval_from_fewer_than_five_steps():
    rows = [{"step": i, "memory_gain_values": [1.0 + i, 2.0 - i]} for i in range(4)]
    few = pmd.pooled_memory_gain(rows)
    assert "no interval: 4 steps < 5" in few and "[" not in few and few.startswith("+1.50")
    rows.append({"step": 4, "memory_gain_values": [0.5, 1.5]})
    many = pmd.pooled_memory_gain(rows)
    assert many.startswith("+1.40 [") and "5 clusters" in many
    assert pmd.mean_n({"mean": 0.674, "lo": -42.0, "hi": 43.0, "n": 2}) == "+0.67 (n=2)"     # per step: no interval


def test_contrast_between_runs_is_paired_and_refuses_unpaired_runs(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import pmd_contrast
    ids = [f"q{i}" for i in range(6)]
    base = [{"id": q, "rewards": [0.0, 1.0]} for q in ids]

    def run(name, final, base_rows=base, **settings):
        res = {"settings": {"method": "pmd", **settings}, "base": {"test": base_rows},
               "final": {"test": [{"id": q, "rewards": r} for q, r in zip(ids, final)]},
               "summary": {"final": {"accuracy": None, "no_answer": None}, "train_control": None}}
        common.atomic_write_json(tmp_path / name / "eval.json", res)
        return tmp_path / name
    ref = run("ref", [[0.0, 1.0]] * 6)
    better = run("better", [[1.0, 1.0]] * 6, seed_memory="data")
    (row,) = pmd_contrast.contrasts(ref, [better])
    assert row[1] == "seed_memory data"
    assert row[-1].startswith("+0.50") and row[-2].startswith("+0.50")       # vs ref and vs base: +1 on half the rows
    with pytest.raises(common.UserError, match="not paired"):
        pmd_contrast.contrasts(ref, [run("reseeded", [[1.0, 1.0]] * 6, base_rows=[{"id": q, "rewards": [1.0, 0.0]} for q in ids])])
    with pytest.raises(common.UserError, match="rows differ"):
        pmd_contrast.contrasts(ref, [run("short", [[1.0]] * 6)])
