"""Memory-safe per-token log-probs: equal to a full log_softmax reference, in value and gradient."""
import pytest
import torch

import common

PROMPTS = ["Question: 2+2?\nAnswer:", "Hi", "A longer prompt than the sliding window of eight."]
COMPLETIONS = [" 4\nQuestion:", " there, how are you doing today", "!"]


def batch(tok, eos_last=True):
    prompts = [common.encode(tok, p) for p in PROMPTS]
    comps = [tok(c, add_special_tokens=False).input_ids for c in COMPLETIONS]
    if eos_last:
        comps[2] = comps[2] + [tok.eos_token_id]   # pad id == eos id in the tiny tokenizer
    return prompts, comps


def reference(model, prompts, comps, temperature):
    """One sequence at a time, no padding, full (T, V) log_softmax."""
    out = []
    for p, c in zip(prompts, comps):
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
        logp = torch.log_softmax(logits / temperature, -1)[len(p) - 1:len(p) - 1 + len(c)]
        out.append((logp.gather(1, torch.tensor(c)[:, None])[:, 0], logp))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_full_log_softmax_reference(tiny, temperature):
    model, tok = tiny
    prompts, comps = batch(tok)
    with torch.no_grad():
        res = common.token_logprobs(model, prompts, comps, temperature=temperature, chunk=5,
                                    pad_id=tok.pad_token_id)
        ref = reference(model, prompts, comps, temperature)
    for i, (r, _) in enumerate(ref):
        assert res["mask"][i].sum() == len(comps[i])
        torch.testing.assert_close(res["logprobs"][i, :len(comps[i])], r, atol=1e-4, rtol=0)
    assert (res["logprobs"][~res["mask"]] == 0).all()


def test_gradients_equal_reference(tiny):
    model, tok = tiny
    prompts, comps = batch(tok)
    weights = [torch.linspace(-1, 1, len(c)) for c in comps]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return g

    res = common.token_logprobs(model, prompts, comps, chunk=4, pad_id=tok.pad_token_id)
    g_ours = grads(sum((res["logprobs"][i, :len(c)] * weights[i]).sum() for i, c in enumerate(comps)))
    ref = reference(model, prompts, comps, 1.0)
    g_ref = grads(sum((r * w).sum() for (r, _), w in zip(ref, weights)))
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_ours[n], g_ref[n], atol=1e-4, rtol=1e-3, msg=n)


def test_stop_token_equal_to_pad_is_trained(tiny):
    """The EOS ending row 2 has the pad id; the mask is by position, so it is still scored."""
    model, tok = tiny
    prompts, comps = batch(tok)
    assert comps[2][-1] == tok.pad_token_id
    res = common.token_logprobs(model, prompts, comps, pad_id=tok.pad_token_id)
    j = len(comps[2]) - 1
    assert res["mask"][2, j] and res["logprobs"][2, j].requires_grad
    res["logprobs"][2, j].backward()
    assert model.get_output_embeddings().weight.grad[tok.eos_token_id].abs().sum() > 0
    model.zero_grad()


def test_full_vocabulary_logits_never_materialised(tiny, monkeypatch):
    """The LM head runs only on completion positions, at most `chunk` rows at a time."""
    model, tok = tiny
    prompts, comps = batch(tok)
    rows = []
    real_linear = torch.nn.functional.linear

    def spy(x, w, b=None):
        if w.shape[0] == model.config.vocab_size:
            rows.append(x.shape[0])
        return real_linear(x, w, b)

    monkeypatch.setattr(common.F, "linear", spy)
    h = model.lm_head.register_forward_hook(lambda *a: pytest.fail("lm_head ran on all positions"))
    try:
        res = common.token_logprobs(model, prompts, comps, chunk=6, pad_id=tok.pad_token_id)
        res["logprobs"].sum().backward()
    finally:
        h.remove()
        model.zero_grad()
    n_tokens = sum(map(len, comps))
    assert max(rows) <= 6
    assert sum(rows) == 2 * n_tokens   # forward once, recomputed once in the backward (checkpointing)


def test_topk_and_extra_ids_match_reference(tiny):
    """The PMD/SDPO teacher's top-k log-probs, and a student's log-probs at the teacher's ids."""
    model, tok = tiny
    prompts, comps = batch(tok)
    with torch.no_grad():
        teacher = common.teacher_topk(model, prompts, comps, 5, chunk=7, pad_id=tok.pad_token_id)
        ref = reference(model, prompts, comps, 1.0)
    student = common.logprobs_at(model, prompts, comps, teacher["topk_ids"], chunk=3,
                                    pad_id=tok.pad_token_id)
    assert student["extra_logprobs"].requires_grad
    for i, (_, full) in enumerate(ref):
        n = len(comps[i])
        v, idx = full.topk(5, -1)
        torch.testing.assert_close(teacher["topk_logprobs"][i, :n], v, atol=1e-4, rtol=0)
        assert torch.equal(teacher["topk_ids"][i, :n], idx)
        torch.testing.assert_close(student["extra_logprobs"][i, :n].detach(), v, atol=1e-4, rtol=0)


@pytest.mark.gemma
def test_logprobs_equal_reference_real_gemma(gemma):
    model, tok = gemma
    prompts, comps = batch(tok, eos_last=False)
    comps[2] = comps[2] + [tok.eos_token_id]
    with torch.no_grad():
        res = common.token_logprobs(model, prompts, comps, temperature=0.9, chunk=8, pad_id=tok.pad_token_id)
        ref = reference(model, prompts, comps, 0.9)
    for i, (r, _) in enumerate(ref):
        torch.testing.assert_close(res["logprobs"][i, :len(comps[i])], r, atol=1e-4, rtol=0)


def test_temperature_zero_is_refused():
    """Training divides log-probs by the temperature: 0 must be an error, not NaN updates."""
    model = type("M", (), {})()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        common.token_logprobs(model, [[2]], [[5]], temperature=0.0)


def test_lm_head_check_matches_model_logits_with_softcapping(tiny_tok):
    """token_logprobs re-implements the LM head; with Gemma's final_logit_softcapping set it must
    still equal model(...).logits, and a head it does not handle is refused, not silently wrong."""
    from conftest import make_tiny_gemma
    model = make_tiny_gemma(len(tiny_tok), seed=1)
    model.config.final_logit_softcapping = 2.0          # small, so the tanh really bends the logits
    assert common.check_lm_head(model) < 1e-4
    model.config.logit_scale = 0.5
    with pytest.raises(common.UserError, match="logit_scale"):
        common.check_lm_head(model)
    del model.config.logit_scale
    model.lm_head = torch.nn.Linear(64, len(tiny_tok), bias=True)
    with pytest.raises(common.UserError, match="bias"):
        common.check_lm_head(model)


def test_lm_head_check_catches_a_mismatch(tiny_tok, monkeypatch):
    """If the re-implemented head disagreed with the model (here: a softcap the model does not
    apply), the check fails loudly."""
    from conftest import make_tiny_gemma
    model = make_tiny_gemma(len(tiny_tok), seed=1)
    real = common._head_logprobs
    monkeypatch.setattr(common, "_head_logprobs", lambda w, s, t, h: real(w, 1.0, t, h))
    with pytest.raises(common.UserError, match="differs from model"):
        common.check_lm_head(model)
