"""The hand-written sampler: parity with HF greedy, shared prefixes, seeds, distribution, stops."""
import numpy as np
import pytest
import torch
from conftest import ScriptedLM

import common

PROMPTS = ["Question: 2+2?\nAnswer:", "Hi", "A much longer prompt, longer than the sliding window.\n"]


def hf_greedy(model, tok, prompts, max_new_tokens):
    """HF generate greedy on a left-padded batch; each row cut after its first EOS."""
    enc = [common.encode(tok, p) for p in prompts]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, top_k=None, top_p=None,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    eos = common.eos_ids(model, tok)
    rows = []
    for row in out[:, L:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def assert_greedy_parity(model, tok, prompts, max_new_tokens, tie_tol):
    """Ours == HF token for token; a divergence passes only where the top-two logits at that
    position are within tie_tol of each other (float noise), which this checks."""
    ours = common.sample(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0)
    ref = hf_greedy(model, tok, prompts, max_new_tokens)
    for p, s, r in zip(prompts, ours, ref):
        if s.token_ids == r:
            continue
        j = next(i for i, (a, b) in enumerate(zip(s.token_ids, r)) if a != b)
        ids = torch.tensor([common.encode(tok, p) + r[:j]])
        with torch.no_grad():
            top2 = model(input_ids=ids).logits[0, -1].float().topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < tie_tol, f"{p!r}: diverges from HF at token {j} with a top-2 logit gap of {gap}"


def test_sampler_matches_hf_greedy_ragged_batch(tiny):
    assert_greedy_parity(*tiny, PROMPTS, max_new_tokens=24, tie_tol=1e-4)


@pytest.mark.gemma
def test_sampler_matches_hf_greedy_real_gemma(gemma):
    prompts = ["Question: What is 12 + 7?\nAnswer:",
               "The three primary colours are",
               "Question: A patient has a blood pressure of 150/95 mmHg at 34 weeks of pregnancy with "
               "proteinuria. What is the most likely diagnosis?\nAnswer:"]
    assert_greedy_parity(*gemma, prompts, max_new_tokens=32, tie_tol=1e-3)


def test_shared_prefix_gives_same_samples_as_unshared(tiny):
    model, tok = tiny
    seeds = [common.row_seed(7, p, j) for p in range(2) for j in range(3)]
    shared = common.sample(model, tok, PROMPTS[:2], n=3, max_new_tokens=16, seed=7)
    unshared = common.sample(model, tok, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, n=1,
                             max_new_tokens=16, row_seeds=seeds)
    assert [s.token_ids for s in shared] == [s.token_ids for s in unshared]
    for a, b in zip(shared, unshared):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert len({tuple(s.token_ids) for s in shared[:3]}) > 1, "the 3 samples of one prompt should differ"


def test_a_row_does_not_depend_on_its_batch(tiny):
    """Padding, other prompts and compaction must not change a row's sample (paired sampling
    relies on this: a row's random numbers are its own)."""
    model, tok = tiny
    seed = [12345]
    alone = common.sample(model, tok, [PROMPTS[2]], n=1, max_new_tokens=20, row_seeds=seed)[0]
    batch = common.sample(model, tok, PROMPTS, n=1, max_new_tokens=20, row_seeds=[1, 2] + seed)[2]
    assert alone.token_ids == batch.token_ids


def test_same_seed_same_samples_other_seed_differs(tiny):
    model, tok = tiny
    a = common.sample(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=3)
    b = common.sample(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=3)
    c = common.sample(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=4)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def first_token_probs(model, tok, prompt, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([common.encode(tok, prompt)])).logits[0, -1]
    return torch.softmax(logits / temperature, -1).numpy()


def test_first_token_frequencies_match_softmax(tiny):
    model, tok = tiny
    N, T = 4000, 1.3
    p = first_token_probs(model, tok, PROMPTS[0], T)
    out = common.sample(model, tok, [PROMPTS[0]], n=N, max_new_tokens=1, temperature=T, seed=0)
    freq = np.bincount([s.token_ids[0] for s in out], minlength=len(p)) / N
    assert np.all(np.abs(freq - p) <= 4.5 * np.sqrt(p * (1 - p) / N) + 2e-3)
    # and the log-prob the sampler reports is that of the distribution it sampled from
    for s in out[:50]:
        assert s.logprobs[0] == pytest.approx(np.log(p[s.token_ids[0]]), abs=1e-5)


def test_top_p_samples_only_the_nucleus_renormalised(tiny):
    model, tok = tiny
    N, T, top_p = 3000, 2.0, 0.5
    p = first_token_probs(model, tok, PROMPTS[1], T)
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    nucleus = order[before < top_p]
    assert 2 < len(nucleus) < len(p) / 2, "test needs a non-trivial nucleus"
    q = np.zeros_like(p)
    q[nucleus] = p[nucleus] / p[nucleus].sum()
    out = common.sample(model, tok, [PROMPTS[1]], n=N, max_new_tokens=1, temperature=T, top_p=top_p)
    freq = np.bincount([s.token_ids[0] for s in out], minlength=len(p)) / N
    assert freq[q == 0].sum() == 0, "sampled a token outside the nucleus"
    assert np.all(np.abs(freq - q) <= 4.5 * np.sqrt(q * (1 - q) / N) + 2e-3)
    for s in out[:50]:
        assert s.logprobs[0] == pytest.approx(np.log(q[s.token_ids[0]]), abs=1e-5)


def test_wide_nucleus_falls_back_to_exact_sort():
    """A flat distribution whose nucleus is wider than the topk shortcut is still sampled exactly."""
    V = 5000
    logits = torch.zeros(2, V)
    logits[1, :10] = 20.0                        # row 1 peaked, row 0 flat: nucleus of ~4500 tokens
    u = torch.tensor([0.999, 0.5])
    tokens, logp = common.draw_tokens(logits, u, temperature=1.0, top_p=0.9)
    assert tokens[0] >= 1024                     # the 0.999 quantile of a 4500-token nucleus
    assert logp[0].item() == pytest.approx(-np.log(int(np.ceil(0.9 * V))), abs=1e-3)
    assert tokens[1] < 10


def test_sampled_logprobs_equal_training_logprobs(tiny):
    """What the sampler reports is what the trainer computes for the same tokens at the same
    temperature (a mismatch silently biases importance ratios)."""
    model, tok = tiny
    T = 0.8
    out = common.sample(model, tok, PROMPTS, n=2, max_new_tokens=14, temperature=T, seed=1)
    prompts = [common.encode(tok, PROMPTS[s.prompt_idx]) for s in out]
    with torch.no_grad():
        res = common.token_logprobs(model, prompts, [s.token_ids for s in out], temperature=T,
                                    pad_id=tok.pad_token_id)
    for i, s in enumerate(out):
        got = res["logprobs"][i, :len(s.token_ids)].numpy()
        np.testing.assert_allclose(got, s.logprobs, atol=1e-4)


def scripted(tiny, prompt, script_text, eos_after=False):
    model, tok = tiny
    script = tok(script_text, add_special_tokens=False).input_ids
    if eos_after:
        script = script + [tok.eos_token_id]
    return ScriptedLM(model, script, len(common.encode(tok, prompt))), tok


def test_stop_string_cuts_text_and_keeps_stop_tokens_for_training(tiny):
    prompt = "Question: 1+1?\nAnswer:"
    model, tok = scripted(tiny, prompt, " 2\nQuestion: 3+3?\nAnswer: 6")
    s = common.sample(model, tok, [prompt], n=2, max_new_tokens=40, stop=["\nQuestion:"])[0]
    assert s.finish == "stop"
    assert s.text == " 2"
    # ids run through the token that completed the stop string, and no further
    assert tok.decode(s.token_ids) == " 2\nQuestion:"


def test_earliest_stop_string_wins(tiny):
    prompt = "Q"
    model, tok = scripted(tiny, prompt, "ab</introspection>cd\nQuestion:")
    s = common.sample(model, tok, [prompt], max_new_tokens=40, stop=["\nQuestion:", "</introspection>"])[0]
    assert s.text == "ab" and tok.decode(s.token_ids) == "ab</introspection>"


def test_eos_is_kept_in_token_ids_but_not_text(tiny):
    prompt = "Q"
    model, tok = scripted(tiny, prompt, "ok", eos_after=True)
    s = common.sample(model, tok, [prompt], max_new_tokens=10)[0]
    assert s.finish == "eos" and s.text == "ok"
    assert s.token_ids[-1] == tok.eos_token_id and len(s.token_ids) == 3


def test_length_limit(tiny):
    model, tok = scripted(tiny, "Q", "abcdefgh")
    s = common.sample(model, tok, ["Q"], max_new_tokens=5)[0]
    assert s.finish == "length" and s.text == "abcde" and len(s.logprobs) == 5


def test_finished_rows_leave_the_batch(tiny):
    """Every decode forward runs only rows still writing: the rows the model processes after
    prefill add up to exactly sum(len - 1) over samples."""
    model, tok = tiny
    seen = []
    h = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        out = common.sample(model, tok, PROMPTS, n=4, max_new_tokens=30, temperature=1.0, seed=5,
                            stop=list("aeiou"))
    finally:
        h.remove()
    lengths = [len(s.token_ids) for s in out]
    assert len(set(lengths)) > 1, "test needs rows that finish at different times"
    assert seen[0] == (3, max(len(common.encode(tok, p)) for p in PROMPTS)), "one prefill row per distinct prompt"
    assert sum(s[0] for s in seen[1:]) == sum(n - 1 for n in lengths)


def test_sampler_runs_under_no_grad_and_returns_plain_data(tiny):
    model, tok = tiny
    grad_on = []
    h = model.register_forward_pre_hook(lambda m, a: grad_on.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            out = common.sample(model, tok, PROMPTS, n=2, max_new_tokens=8)
    finally:
        h.remove()
    assert grad_on and not any(grad_on)
    for s in out:
        assert all(isinstance(x, int) for x in s.token_ids) and all(isinstance(x, float) for x in s.logprobs)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.gemma
def test_real_gemma_stops_at_next_question(gemma):
    model, tok = gemma
    s = common.sample(model, tok, ["Question: What is 12 + 7?\nAnswer:"], max_new_tokens=40,
                      temperature=0, stop=common.STOP)[0]
    assert s.finish == "stop" and "19" in s.text and "Question" not in s.text
    assert tok.decode(s.token_ids).endswith("\nQuestion:")


def test_a_uniform_that_rounds_to_one_never_draws_a_zero_probability_token():
    """u is drawn in [0, 1) in float64; one that rounds to 1.0 in float32 must still pick the last
    token with non-zero probability, never the vocabulary's last (zero-probability) entry."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -float("inf"), -float("inf")]] * 2)
    u = torch.tensor([1.0, float(np.nextafter(np.float32(1), np.float32(0)))])
    tokens, lp = common.draw_tokens(logits, u, temperature=1.0, top_p=1.0)
    assert tokens.tolist() == [2, 2]                    # the last token with probability > 0
    assert torch.isfinite(lp).all()
    tokens, lp = common.draw_tokens(logits, u, temperature=1.0, top_p=0.5)
    assert tokens.tolist() == [2, 2]                    # the nucleus is {2} alone (p = 0.67)
    assert torch.isfinite(lp).all()


def test_preallocated_kv_cache_gives_hf_cache_samples(tiny, monkeypatch):
    """The sampler's KV buffers (common._preallocate) against HF's torch.cat cache: same tokens and
    log-probs, through compaction, buffer growth (SPARE_KV 3) and sliding layers past their window."""
    model, tok = tiny
    monkeypatch.setattr(common, "SPARE_KV", 3)
    kw = dict(n=4, max_new_tokens=30, temperature=1.0, seed=5, stop=list("aeiou"))
    grown = []
    real = common._growing_update
    monkeypatch.setattr(common, "_growing_update", lambda layer, k, *a, **b: grown.append(k.shape[-2]) or real(layer, k, *a, **b))
    ours = common.sample(model, tok, PROMPTS, **kw)
    assert grown, "the sampler must use the preallocated cache"
    monkeypatch.setattr(common, "_preallocate", lambda layer: None)
    ref = common.sample(model, tok, PROMPTS, **kw)
    assert len({len(s.token_ids) for s in ref}) > 1 and max(len(s.token_ids) for s in ref) > 8
    assert [s.token_ids for s in ours] == [s.token_ids for s in ref]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)


@pytest.mark.parametrize("sliding", [False, True])
def test_preallocated_layer_returns_what_hf_layer_returns(sliding, monkeypatch):
    """Step by step, a preallocated cache layer returns the keys/values and mask sizes HF's does,
    across buffer growth, a batch compaction and (sliding) the window's edge."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    monkeypatch.setattr(common, "SPARE_KV", 2)
    make = (lambda: DynamicSlidingWindowLayer(sliding_window=6)) if sliding else DynamicLayer
    ours, ref = make(), make()
    common._preallocate(ours)
    g = torch.Generator().manual_seed(0)
    for step, t in enumerate([3] + [1] * 8):
        if step == 4:
            for layer in (ours, ref):
                layer.batch_select_indices(torch.tensor([0, 2]))
        k, v = (torch.randn(3 if step < 4 else 2, 1, t, 4, generator=g) for _ in range(2))
        for a, b in zip(ours.update(k, v), ref.update(k, v)):
            assert torch.equal(a, b), f"step {step}"
        assert ours.get_seq_length() == ref.get_seq_length() and ours.get_mask_sizes(1) == ref.get_mask_sizes(1)


def test_two_level_inverse_cdf_is_the_float64_inverse_cdf_and_never_draws_a_dead_token():
    """draw_tokens' block-wise inverse CDF (common._inverse_cdf) against one float64 cumsum, on a
    vocabulary that is not a multiple of CDF_BLOCK, with dead (-inf) tokens, dead whole blocks and
    a dead last block, for uniforms up to the largest float32 below 1."""
    g = torch.Generator().manual_seed(0)
    V = 3 * common.CDF_BLOCK + 77
    logits = torch.randn(8, V, generator=g) * 2
    logits[torch.rand(8, V, generator=g) < 0.5] = -float("inf")
    logits[:, common.CDF_BLOCK:2 * common.CDF_BLOCK] = -float("inf")     # a dead block inside
    logits[:, 3 * common.CDF_BLOCK - 5:] = -float("inf")                  # the tail dead, across a block edge
    p64 = torch.softmax(logits.double(), -1)
    cdf64 = p64.cumsum(-1)
    agree = total = 0
    for u in [torch.rand(8, generator=g) for _ in range(100)] + [torch.zeros(8), torch.ones(8)]:
        tokens, lp = common.draw_tokens(logits, u, temperature=1.0, top_p=1.0)
        assert (p64.gather(1, tokens[:, None]) > 0).all(), "drew a zero-probability token"
        np.testing.assert_allclose(lp.double(), p64.gather(1, tokens[:, None])[:, 0].log(), atol=1e-5)
        exact = torch.searchsorted(cdf64, (u.double().clamp(0, 1 - 2 ** -24) * cdf64[:, -1])[:, None], right=True)[:, 0]
        exact = torch.minimum(exact, torch.tensor(3 * common.CDF_BLOCK - 6))
        agree, total = agree + int((tokens == exact).sum()), total + 8
    assert agree >= 0.99 * total
    # a block's sum can exceed its cumsum's last value: a target in between must not take a dead token
    B = common.CDF_BLOCK
    w = torch.rand(256, B, generator=torch.Generator().manual_seed(1))
    w[:, B - 8:] = 0
    u = torch.full((256,), 1 - 2 ** -24)
    assert (u * w.sum(-1) > w.cumsum(-1)[:, -1]).any(), "the case needs rows where the two round apart"
    tokens, _ = common._inverse_cdf(w, u)
    assert (w.gather(1, tokens[:, None]) > 0).all()


@pytest.mark.parametrize("heads, kv_heads, masked", [(4, 1, False), (8, 2, False), (8, 2, True), (4, 4, False)])
def test_packed_decode_attention_is_hf_sdpa_attention(heads, kv_heads, masked):
    """common._packed_decode against HF's own sdpa attention: one query token (grouped query heads,
    with and without a padding mask, key/value as views of a longer buffer), and several query
    tokens, which it hands to HF as they are."""
    from types import SimpleNamespace
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    g = torch.Generator().manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    B, L, D = 3, 11, 16
    k, v = (torch.randn(B, kv_heads, L + 5, D, generator=g)[:, :, :L] for _ in range(2))
    for q_len in (1, 4):
        q = torch.randn(B, q_len, heads, D, generator=g).transpose(1, 2)          # (B, H, q, D), as HF's
        mask = None
        if masked:
            mask = torch.ones(B, 1, q_len, L, dtype=torch.bool).tril(L - q_len)
            mask[0, ..., :4] = False                                                # a left-padded row
        for m in [mask] + ([mask.expand(B, heads, q_len, L).clone()] if masked else []):   # per-head too
            ours, _ = common._packed_decode(module, q, k, v, m, scaling=0.3, dropout=0.0)
            ref, _ = sdpa_attention_forward(module, q, k, v, m, scaling=0.3, dropout=0.0)
            assert ours.shape == ref.shape == (B, q_len, heads, D)
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_load_model_decodes_with_packed_attention_as_with_sdpa(tmp_path, tiny_tok, monkeypatch):
    """load_model switches an sdpa model to the packed decode attention; one prompt's n rows (no
    padding mask, the case HF sends to SDPA's slower enable_gqa) sample the tokens and log-probs
    that HF's sdpa attention gives; a saved checkpoint still names plain sdpa."""
    from conftest import save_tiny_model
    model, tok = common.load_model(str(save_tiny_model(tmp_path / "m", tiny_tok)))
    assert model.config._attn_implementation == common.DECODE_ATTENTION
    calls = []
    real = common._packed_decode
    monkeypatch.setattr(common, "_packed_decode", lambda m, q, *a, **k: calls.append(q.shape[2]) or real(m, q, *a, **k))
    from transformers import AttentionInterface
    AttentionInterface.register(common.DECODE_ATTENTION, common._packed_decode)
    kw = dict(n=4, max_new_tokens=20, temperature=1.0, seed=3)
    try:
        ours = common.sample(model, tok, ["Question: 2+2?\nAnswer:"], **kw)
    finally:
        AttentionInterface.register(common.DECODE_ATTENTION, real)
    assert 1 in calls, "the decode steps must run the packed attention"
    model.set_attn_implementation("sdpa")
    ref = common.sample(model, tok, ["Question: 2+2?\nAnswer:"], **kw)
    assert [s.token_ids for s in ours] == [s.token_ids for s in ref]
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    model.set_attn_implementation(common.DECODE_ATTENTION)
    model.save_pretrained(tmp_path / "saved")
    assert common.DECODE_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
