"""The shared training primitives of common.py: paired scoring, the paired bootstrap, the optimizer
step, the policy loader, the teacher-forced answer log-prob, the flag types and md_table."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import common
from conftest import save_tiny_model


# ---------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_keeps_the_pairing():
    """Two arms whose per-question means differ by a constant: a paired contrast is exact (zero
    width, flagged), while the arms' own spread is large."""
    rng = np.random.default_rng(0)
    a = rng.random((20, 4))
    ci = common.paired_bootstrap({"a": a, "b": a + 0.1}, lambda m: m["b"] - m["a"])
    assert ci["mean"] == pytest.approx(0.1)
    assert ci["hi"] - ci["lo"] < 1e-9 and "no variation" in ci["note"]
    spread = common.paired_bootstrap({"a": a}, lambda m: m["a"])
    assert spread["hi"] - spread["lo"] > 0.1


def test_paired_bootstrap_is_narrower_than_unpaired_for_correlated_arms():
    rng = np.random.default_rng(1)
    q = rng.random((30, 1)) * 2                                  # a question effect both arms share
    a = q + rng.normal(0, 0.1, (30, 3))
    b = q + 0.05 + rng.normal(0, 0.1, (30, 3))
    paired = common.paired_bootstrap({"a": a, "b": b}, lambda m: m["b"] - m["a"])
    unpaired_b = common.paired_bootstrap({"b": b}, lambda m: m["b"])
    assert paired["hi"] - paired["lo"] < (unpaired_b["hi"] - unpaired_b["lo"]) / 3
    assert paired["lo"] < 0.05 < paired["hi"]


def test_paired_bootstrap_gives_no_interval_below_five_clusters():
    ci = common.paired_bootstrap({"a": np.ones((4, 8)), "b": np.zeros((4, 8))}, lambda m: m["a"] - m["b"])
    assert ci["mean"] == 1.0 and np.isnan(ci["lo"]) and "4 clusters (< 5)" in ci["note"]
    assert "no interval" in common.fmt_ci(ci)
    ok = common.paired_bootstrap({"a": np.eye(5)}, lambda m: m["a"])
    assert np.isfinite(ok["lo"])


def test_paired_bootstrap_ratio_uses_the_same_resamples_and_refuses_an_undefined_one():
    rng = np.random.default_rng(2)
    a = rng.random((12, 2)) * 0.2
    b, c = a + 0.5, a + 0.25                       # c closes half the gap in every resample
    G = common.paired_bootstrap({"a": a, "b": b, "c": c}, lambda m: (m["c"] - m["a"]) / (m["b"] - m["a"]))
    assert G["mean"] == pytest.approx(0.5) and G["hi"] - G["lo"] < 1e-9
    undefined = common.paired_bootstrap({"a": a, "b": a, "c": c}, lambda m: (m["c"] - m["a"]) / (m["b"] - m["a"]))
    assert "undefined" in undefined.get("note", "") or not np.isfinite(undefined["mean"])


def test_paired_bootstrap_refuses_arms_of_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        common.paired_bootstrap({"a": np.ones((5, 2)), "b": np.ones((5, 3))}, lambda m: m["a"])


# ---------------------------------------------------------------------------- paired scoring


def q(i, cluster="c"):
    return common.Question(f"q{i}", cluster, f"Pick {i}?", "B", "mcq", choices=["x", "y", "z"])


def test_score_pairs_rows_by_question_id_whatever_the_prompt_or_batch(tiny):
    """Row j of a question draws the same random numbers in every call of the same stream, with
    or without a lesson, alone or batched with other questions: that is what pairs two arms."""
    model, tok = tiny
    qs = [q(0), q(1)]
    kw = dict(max_new_tokens=6, temperature=1.0)
    both = common.score(model, tok, qs, [common.question_prompt(tok, x) for x in qs], 3, 0, "test", (7,), **kw)
    alone = common.score(model, tok, qs[1:], [common.question_prompt(tok, qs[1])], 3, 0, "test", (7,), **kw)
    assert both.rewards.shape == (2, 3) and len(both.answers[1]) == 3
    assert [s.token_ids for s in both.samples[1]] == [s.token_ids for s in alone.samples[0]]
    other = common.score(model, tok, qs[1:], [common.question_prompt(tok, qs[1])], 3, 0, "other", (7,), **kw)
    assert [s.token_ids for s in other.samples[0]] != [s.token_ids for s in alone.samples[0]]


def test_score_verifies_each_row_against_its_own_question(monkeypatch, tiny):
    model, tok = tiny
    answers = iter([" B", " A", " C", " B"])

    def fake(model, tok, prompts, n, row_seeds, **kw):
        return [common.Sample(0, next(answers), [1], [0.0], "eos") for _ in range(len(prompts) * n)]
    monkeypatch.setattr(common, "sample", fake)
    qa, qc = q(0), common.Question("q9", "c", "?", "C", "mcq", choices=["x", "y", "z"])
    res = common.score(model, tok, [qa, qc], ["p0", "p1"], 2, 0, "s")
    assert res.rewards.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert res.answers == [["B", "A"], ["C", "B"]]


# ---------------------------------------------------------------------------- optimizer step


def tiny_policy(tiny, opt="sgd", lr=0.1):
    model, tok = tiny
    model = __import__("copy").deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return common.Policy(model, model, tok, params, common.make_optimizer(params, opt, lr))


def test_optimizer_step_clips_steps_measures_and_zeroes(tiny):
    policy = tiny_policy(tiny)
    before = [p.detach().clone() for p in policy.params]
    lp = common.token_logprobs(policy.model, [[2, 5, 6]], [[7, 8]])
    (-lp["logprobs"].sum()).backward()
    raw = float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in policy.params if p.grad is not None)))
    rec = common.optimizer_step(policy, clip=1e-3, measure=True)
    assert rec["grad_norm"] == pytest.approx(raw, rel=1e-4) and rec["skipped"] is None
    # SGD at lr 0.1 on a gradient clipped to 1e-3 moves the weights by exactly 1e-4 in norm
    assert rec["weight_change"]["norm"] == pytest.approx(0.1 * 1e-3, rel=1e-3)
    assert rec["weight_change"] == common.weight_delta(policy.params, before)
    assert all(p.grad is None for p in policy.params)
    assert rec["rollout_sync_s"] == 0.0                       # the rollout model is the model itself


def test_optimizer_step_skips_a_non_finite_gradient(tiny):
    policy = tiny_policy(tiny)
    before = [p.detach().clone() for p in policy.params]
    lp = common.token_logprobs(policy.model, [[2, 5, 6]], [[7, 8]])
    (lp["logprobs"].sum() * float("nan")).backward()
    rec = common.optimizer_step(policy, clip=1.0, measure=True)
    assert rec["skipped"].startswith("non-finite gradient norm") and "weight_change" not in rec
    assert all(torch.equal(p, b) for p, b in zip(policy.params, before))
    assert all(p.grad is None for p in policy.params)


def test_optimizer_step_syncs_the_rollout_copy(tiny):
    policy = tiny_policy(tiny)
    policy.rollout = common.rollout_copy(policy.model, "bfloat16")
    lp = common.token_logprobs(policy.model, [[2, 5, 6]], [[7, 8]])
    (-lp["logprobs"].sum()).backward()
    common.optimizer_step(policy, clip=1.0)
    trained = dict(policy.model.named_parameters())
    assert all(torch.equal(p, trained[n].detach().to(torch.bfloat16)) for n, p in policy.rollout.named_parameters())


# ---------------------------------------------------------------------------- the policy loader


def test_load_policy_resumes_weights_optimizer_step_and_cuts_metrics(tmp_path, tiny_tok):
    folder = save_tiny_model(tmp_path / "model", tiny_tok)
    out = tmp_path / "run"
    out.mkdir()
    args = SimpleNamespace(model=str(folder), device="cpu", dtype=None, activation_checkpointing=False,
                           rollout_dtype="float32", lr=0.05, optimizer="adamw", resume=False)
    fresh = common.load_policy(args, out)
    assert fresh.step == 0 and isinstance(fresh.opt, torch.optim.AdamW) and fresh.rollout is fresh.model
    lp = common.token_logprobs(fresh.model, [[2, 5, 6]], [[7, 8]])
    (-lp["logprobs"].sum()).backward()
    common.optimizer_step(fresh, 1.0)
    common.save_checkpoint(out, fresh.model, fresh.tok, fresh.opt, step=3, extra={"k": 1})
    common.write_jsonl(out / "metrics.jsonl", [{"step": s} for s in range(5)])
    args.resume = True
    back = common.load_policy(args, out)
    assert back.step == 3 and back.extra == {"k": 1}
    assert [m["step"] for m in common.read_metrics(out)] == [0, 1, 2]
    a, b = fresh.model.state_dict(), back.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.opt.state_dict()["state"].keys() == fresh.opt.state_dict()["state"].keys()


# ---------------------------------------------------------------------------- answer log-prob


def test_answer_logprob_is_the_sum_of_the_answer_tokens_log_probs(tiny):
    model, tok = tiny
    prompts, answers = ["Question: 1+1?\nAnswer:", "Question: 1+1?\nAnswer:"], [" 2", " 22"]
    got = common.answer_logprob(model, tok, prompts, answers)
    for p, a, g in zip(prompts, answers, got):
        ids = common.encode(tok, p) + tok(a, add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        n = len(common.encode(tok, p))
        want = sum(float(ref[t - 1, ids[t]]) for t in range(n, len(ids)))
        assert g == pytest.approx(want, abs=1e-4)
    assert got[1] < got[0]                        # one more token can only lower the sum


# ---------------------------------------------------------------------------- flags and tables


def parser():
    p = common.ArgumentParser()
    p.add_argument("--N", type=common.at_least(1), default=4)
    p.add_argument("--lr", type=common.positive, default=1e-6)
    p.add_argument("--alpha", type=common.unit_interval, default=0.5)
    p.add_argument("--mode", choices=["a", "b"], default="a")
    return p


@pytest.mark.parametrize("argv, line", [
    (["--N", "0"], "--N 0: must be at least 1"),
    (["--N", "x"], "--N x: not an integer"),
    (["--lr", "0"], "--lr 0.0: must be a number greater than 0"),
    (["--lr", "inf"], "--lr inf: must be a number greater than 0"),
    (["--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
    (["--mode", "c"], "--mode invalid choice"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_flag_types_refuse_out_of_range_values_in_one_line(argv, line):
    with pytest.raises(common.UserError) as e:
        parser().parse_args(argv)
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_flag_types_accept_their_range():
    a = parser().parse_args(["--N", "1", "--lr", "1e-7", "--alpha", "0"])
    assert (a.N, a.lr, a.alpha) == (1, 1e-7, 0.0)


def test_md_table_escapes_pipes_and_newlines():
    assert common.md_table(["a", "b"], [["x|y", "1\n2"]]) == ["| a | b |", "|---|---|", "| x\\|y | 1 2 |"]


def test_write_report_is_atomic_and_read_metrics_drops_a_torn_last_line(tmp_path):
    common.write_report(tmp_path, ["# r", "x"])
    assert (tmp_path / "report.md").read_text() == "# r\nx\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n" + '{"step": 1, "lo')
    assert common.read_metrics(tmp_path) == [{"step": 0}]


def test_text_key_ignores_case_punctuation_and_option_order():
    a = common.Question("a", "c", "In Brill, what is tesk?", "A", "mcq", choices=["fire", "sun"], cue="In Brill, tesk means")
    b = common.Question("b", "c", "in brill what is TESK", "B", "mcq", choices=["sun", "fire"], cue="In Brill tesk means")
    c = common.Question("c", "c", "In Brill, what is sel?", "A", "mcq", choices=["fire", "sun"], cue="In Brill, sel means")
    assert common.text_key(a) == common.text_key(b) != common.text_key(c)
