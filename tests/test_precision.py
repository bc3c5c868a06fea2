"""The precision policy: fp32 trained weights, rollouts on a bf16 copy, the copy synced after a step.

Parity of the bf16 copy with the fp32 model it copies (greedy agreement, divergences only at float
ties, log-prob gap), the copy really refreshed after an update, and --rollout-dtype float32 being
exactly the old path (the sampler gets the trained model itself).
"""
import json

import pytest
import torch
from conftest import check_bf16_rollout, make_tiny_gemma, save_tiny_model

import common

PROMPTS = [f"Question {i}: what is {i} + {3 * i}?\nAnswer:" for i in range(12)] + \
          ["Hi", "A much longer prompt, longer than the sliding window.\n"]


def bf16_copy(model):
    return common.rollout_copy(model, "bfloat16")


# ----------------------------------------------------------------------------
# the policy


def test_trained_weights_are_fp32_on_every_device_by_default():
    assert common.pick_dtype(torch.device("cpu")) == torch.float32
    assert common.pick_dtype(torch.device("cuda")) == torch.float32      # was bf16: updates rounded away
    assert common.pick_dtype(torch.device("cuda"), "bfloat16") == torch.bfloat16  # an explicit --dtype still wins


def test_small_update_is_a_no_op_on_bf16_weights_but_not_on_fp32():
    """Why master weights are fp32: a change below |w| * 2^-8 rounds away in bf16."""
    w = torch.full((4,), 0.02)
    step = torch.full((4,), 2e-5)                   # ~|w| * 2^-10, far above lr 1e-6 x a clipped grad
    assert torch.all((w.bfloat16() - step.bfloat16()) == w.bfloat16())
    assert torch.all((w - step) != w)


def test_auto_rollout_dtype_follows_the_hardware(tiny, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: False)
    assert common.rollout_copy(model) is model and common.rollout_copy(model, "auto") is model
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    assert next(common.rollout_copy(model).parameters()).dtype == torch.bfloat16


def test_float32_rollouts_are_the_trained_model_itself(tiny):
    """--rollout-dtype float32 is today's behaviour exactly: no copy, no sync, the same samples."""
    model, tok = tiny
    rollout = common.rollout_copy(model, "float32")
    assert rollout is model
    assert common.sync_rollout(rollout, model) == 0.0
    a = common.sample(rollout, tok, PROMPTS[:3], n=3, max_new_tokens=12, temperature=0.7, seed=5)
    b = common.sample(model, tok, PROMPTS[:3], n=3, max_new_tokens=12, temperature=0.7, seed=5)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]


def test_copy_casts_parameters_keeps_buffers_ties_and_the_original(tiny):
    model, _ = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rollout = bf16_copy(model)
    assert rollout is not model and not rollout.training
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in rollout.parameters())
    # RoPE inverse frequencies stay fp32 (bf16 would put the rotation angles off)
    assert all(b.dtype == torch.float32 for b in rollout.buffers())
    assert rollout.lm_head.weight is rollout.model.embed_tokens.weight      # tied weights stay tied
    for n, p in model.named_parameters():                                   # the trained model untouched
        assert p.dtype == torch.float32 and p.requires_grad and torch.equal(p, before[n])
        assert torch.equal(dict(rollout.named_parameters())[n], p.detach().bfloat16())


def test_paired_sampling_still_pairs_in_bf16(tiny):
    """Within one dtype, the same row seeds give the same draws."""
    model, tok = tiny
    rollout = bf16_copy(model)
    seeds = [common.row_seed(9, 0, j) for j in range(4)]
    a = common.sample(rollout, tok, [PROMPTS[0]], n=4, max_new_tokens=16, temperature=0.7, row_seeds=seeds)
    b = common.sample(rollout, tok, [PROMPTS[0], PROMPTS[1]], n=4, max_new_tokens=16, temperature=0.7,
                      row_seeds=seeds + seeds)[:4]
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


# ----------------------------------------------------------------------------
# parity of the bf16 copy with fp32


def greedy_agreement(model, rollout, tok, prompts, max_new_tokens, tie_tol, logit_tol):
    """Greedy on the fp32 model and on its bf16 copy. Returns (rows identical, tokens agreeing before
    the first divergence, tokens compared). Checks that the copy's logits are within logit_tol of
    fp32 along the fp32 path, and that every divergence sits where the fp32 top-two logits are
    within tie_tol (a float tie that bf16 rounding may break either way)."""
    ref = common.sample(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0)
    got = common.sample(rollout, tok, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0)
    same_rows = agree = total = 0
    for p, r, s in zip(prompts, ref, got):
        ids = torch.tensor([common.encode(tok, p) + r.token_ids])
        with torch.no_grad():
            lf = model(input_ids=ids).logits[0].float()                       # (T, V)
            lb = rollout(input_ids=ids).logits[0].float()
        n_p = len(ids[0]) - len(r.token_ids)
        err = (lf - lb)[n_p - 1:].abs().max().item()
        assert err < logit_tol, f"{p!r}: bf16 logits off by {err} along the fp32 path"
        j = next((i for i, (a, b) in enumerate(zip(r.token_ids, s.token_ids)) if a != b), None)
        total += len(r.token_ids)
        if j is None:
            same_rows += r.token_ids == s.token_ids
            agree += len(r.token_ids)
            continue
        agree += j
        top2 = lf[n_p - 1 + j].topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < tie_tol, f"{p!r}: bf16 diverges at token {j} where fp32's top-2 logit gap is {gap}"
    return same_rows, agree, total


def test_bf16_copy_greedy_agrees_with_fp32_up_to_float_ties(tiny, record_property):
    model, tok = tiny
    # tiny logits are O(5): bf16 rounding moves them by a few hundredths
    rows, agree, total = greedy_agreement(model, bf16_copy(model), tok, PROMPTS, 24, tie_tol=0.1, logit_tol=0.1)
    record_property("greedy_agreement", f"{rows}/{len(PROMPTS)} rows, {agree}/{total} tokens")
    print(f"bf16 vs fp32 greedy (tiny): {rows}/{len(PROMPTS)} rows identical, {agree}/{total} tokens before a divergence")
    assert rows >= len(PROMPTS) // 2, "nearly every row diverges: not a rounding effect"


def test_sampler_trainer_logprob_gap(tiny):
    """The mismatch a bf16 run logs: small, and float noise when rollouts are fp32."""
    model, tok = tiny
    gaps = {}
    for name, rollout in (("fp32", model), ("bf16", bf16_copy(model))):
        s = common.sample(rollout, tok, PROMPTS, n=2, max_new_tokens=24, temperature=0.7, seed=1)
        ids = [common.encode(tok, PROMPTS[x.prompt_idx]) for x in s]
        with torch.no_grad():
            lp = common.token_logprobs(model, ids, [x.token_ids for x in s], temperature=0.7,
                                       pad_id=tok.pad_token_id)
        gaps[name] = common.logprob_mismatch([x.logprobs for x in s], lp["logprobs"], lp["mask"])
    assert gaps["fp32"]["max"] < 1e-4
    assert 1e-4 < gaps["bf16"]["mean"] < 0.02 and gaps["bf16"]["max"] < 0.3, gaps


def test_logprob_mismatch_on_hand_made_numbers():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    sampler = [[-1.1, -2.0, -9.0], [-9.0, -0.5]]          # ragged, as Sample.logprobs are
    m = common.logprob_mismatch(sampler, trainer, mask)
    assert m["n"] == 3 and m["max"] == pytest.approx(0.25) and m["mean"] == pytest.approx(0.35 / 3)
    assert common.logprob_mismatch(sampler, trainer, torch.zeros_like(mask))["n"] == 0


# ----------------------------------------------------------------------------
# the copy follows the trained weights


def test_copy_is_refreshed_after_an_optimizer_step(tiny_tok):
    tok = tiny_tok
    model = make_tiny_gemma(len(tok), seed=4)
    rollout = bf16_copy(model)
    prompt = PROMPTS[0]
    old = common.sample(rollout, tok, [prompt], n=1, max_new_tokens=8, temperature=0)[0].token_ids
    # one real optimizer step that makes the fp32 model prefer "Z" after the prompt
    target = tok.convert_tokens_to_ids("Z")
    assert old[0] != target
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    lp = common.token_logprobs(model, [common.encode(tok, prompt)], [[target]], pad_id=tok.pad_token_id)
    (-lp["logprobs"].sum()).backward()
    opt.step()
    new_fp32 = common.sample(model, tok, [prompt], n=1, max_new_tokens=8, temperature=0)[0].token_ids
    assert new_fp32[0] == target, "the step should change the greedy answer (test set-up)"
    stale = common.sample(rollout, tok, [prompt], n=1, max_new_tokens=8, temperature=0)[0].token_ids
    assert stale == old, "the copy must not share storage with the trained weights"
    secs = common.sync_rollout(rollout, model)
    assert 0 < secs < 60
    for n, p in rollout.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n].detach().bfloat16()), n
    fresh = common.sample(rollout, tok, [prompt], n=1, max_new_tokens=8, temperature=0)[0].token_ids
    assert fresh[0] == target
    assert fresh == common.sample(bf16_copy(model), tok, [prompt], n=1, max_new_tokens=8, temperature=0)[0].token_ids


# ----------------------------------------------------------------------------
# the main job uses it: the sampler gets the trained model itself in fp32, the copy in bf16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_samples_from_the_rollout_model(tiny_tok, tmp_path, monkeypatch, dtype):
    import sys

    import grpo_introspect as g
    model_dir = tmp_path / "model"
    save_tiny_model(model_dir, tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq"} for c in ("k", "f") for i in range(6)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded, seen = [], []
    real_load, real_sample = common.load_model, common.sample
    monkeypatch.setattr(common, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    monkeypatch.setattr(common, "sample", lambda m, *a, **k: seen.append(m) or real_sample(m, *a, **k))
    monkeypatch.setattr(sys, "argv", ["grpo_introspect.py", "--model", str(model_dir), "--data", str(tmp_path / "q.jsonl"),
                                      "--out", str(tmp_path / "run"), "--steps", "1", "--N", "2", "--M", "1",
                                      "--max-new-tokens", "6", "--answer-tokens", "3", "--matrix-M", "0",
                                      "--rollout-dtype", dtype])
    g.main()
    trained = loaded[0][0]
    assert seen and trained.dtype == torch.float32
    if dtype == "float32":
        assert all(m is trained for m in seen)
    else:
        assert all(m is not trained and next(m.parameters()).dtype == torch.bfloat16 for m in seen)
        assert len({id(m) for m in seen}) == 1, "one copy for the run, synced in place"


# ----------------------------------------------------------------------------
# the real embedded Gemma


@pytest.mark.gemma
def test_bf16_copy_greedy_agrees_with_fp32_real_gemma(gemma, record_property):
    model, tok = gemma
    prompts = ["Question: What is 12 + 7?\nAnswer:",
               "The three primary colours are",
               "Question: A patient has a blood pressure of 150/95 mmHg at 34 weeks of pregnancy with "
               "proteinuria. What is the most likely diagnosis?\nAnswer:",
               "Question: In Brill, what does the word tesk mean?\nA) water\nB) fire\nC) stone\nAnswer:",
               "The capital of France is",
               "def fibonacci(n):\n",
               "Once upon a time, in a small village,",
               "Question: How many legs does a spider have?\nAnswer:"]
    # Gemma's logits are O(10-30); bf16 rounding through 18 layers moves them by up to ~1
    rows, agree, total = greedy_agreement(model, bf16_copy(model), tok, prompts, 32, tie_tol=1.0, logit_tol=2.0)
    record_property("greedy_agreement", f"{rows}/{len(prompts)} rows, {agree}/{total} tokens")
    print(f"bf16 vs fp32 greedy: {rows}/{len(prompts)} rows identical, {agree}/{total} tokens before a divergence")
    assert agree >= total // 2


@pytest.mark.gemma
def test_bf16_logprob_gap_and_refresh_real_gemma(gemma):
    model, tok = gemma
    rollout = bf16_copy(model)
    check_bf16_rollout(model, tok, rollout, "Question: What is 12 + 7?\nAnswer:", max_new_tokens=24)


def test_lm_head_of_the_rollout_copy_gets_a_contiguous_input(tiny):
    """HF slices hidden[:, -1:] (a non-contiguous view) before the head; torch's bf16 linear on
    such an input transiently allocated ~300 MB per row on this CPU (21 GB for the transfer
    matrix). The copy's head must see a contiguous tensor, and give the same logits."""
    model, tok = tiny
    copy_ = common.rollout_copy(model, "bfloat16")
    seen = []
    # Dense strides, not just is_contiguous(): a one-prompt prefill's hidden[:, -1:] has shape
    # (1, 1, H) and strides (L*H, H, 1), which is_contiguous() accepts and bf16 matmul punishes.
    copy_.get_output_embeddings().register_forward_pre_hook(
        lambda m, a: seen.append(a[0].stride() == torch.empty(a[0].shape).stride()))
    ids = torch.randint(3, len(tok), (3, 7))
    with torch.no_grad():
        one = copy_(input_ids=ids[:1], logits_to_keep=1).logits
        got = copy_(input_ids=ids, logits_to_keep=1).logits
    torch.testing.assert_close(one, got[:1])
    with torch.no_grad():
        h = copy_.model(input_ids=ids).last_hidden_state[:, -1:].contiguous()
        want = copy_.get_output_embeddings().weight @ h[:, 0].T
    assert len(seen) == 2 and all(seen)
    torch.testing.assert_close(got[:, 0].float(), want.T.float() if not copy_.config.final_logit_softcapping
                               else torch.tanh(want.T.float() / copy_.config.final_logit_softcapping)
                               * copy_.config.final_logit_softcapping, atol=0.1, rtol=0.05)
