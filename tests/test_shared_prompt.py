"""Shared-prompt scoring: a group's prompt runs through the decoder once, and every log-prob and
every parameter gradient equals the one-row-per-completion computation."""
import copy

import pytest
import torch
from conftest import make_tiny_gemma

import common

LONG = "A prompt longer than the sliding window of eight tokens."   # tiny window: 8
# Mixed groups: LONG x 3 with ragged lengths (one of length 1), "Hi" alone, "Q: 2+2?" x 2.
ROWS = [(LONG, " four and a half, or so they say"), ("Hi", " there"), (LONG, "!"),
        ("Q: 2+2?", " 4"), (LONG, " seventeen tokens of text"), ("Q: 2+2?", " 5, surely not")]


def batch(tok, rows=ROWS, eos_last=True):
    prompts = [common.encode(tok, p) for p, _ in rows]
    comps = [tok(c, add_special_tokens=False).input_ids for _, c in rows]
    if eos_last:
        comps[0] = comps[0] + [tok.eos_token_id]   # an EOS equal to the pad id (tiny: pad == eos)
    return prompts, comps


def weights_like(x, seed):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def run(model, prompts, comps, share, **kw):
    """The scoring loop (every entry point's), then the gradients of a fixed random weighting of every
    output with grad."""
    model.zero_grad(set_to_none=True)
    res = common._logprobs(model, prompts, comps, share_prompts=share, **kw)
    loss = (res["logprobs"] * weights_like(res["logprobs"], 0)).sum()
    for i, key in enumerate(("extra_logprobs", "student_topk_logprobs")):
        if key in res:
            loss = loss + (res[key] * weights_like(res[key], i + 1)).sum()
    loss.backward()
    grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in res.items()}, grads


def count_shared(monkeypatch):
    calls = []
    real = common._completion_hidden_shared

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(common, "_completion_hidden_shared", spy)
    return calls


def assert_same(model, prompts, comps, monkeypatch, expect_shared=True, **kw):
    calls = count_shared(monkeypatch)
    got, g_got = run(model, prompts, comps, True, **kw)
    assert bool(calls) == expect_shared
    ref, g_ref = run(model, prompts, comps, False, **kw)
    assert len(calls) == int(expect_shared)    # the unshared run never took the shared path
    assert got.keys() == ref.keys() and torch.equal(got["mask"], ref["mask"])
    for k in ref:
        if k.endswith("ids"):
            assert torch.equal(got[k], ref[k]), k
        elif k != "mask":
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0, msg=k)
    assert g_got.keys() == g_ref.keys()
    for n, g in g_ref.items():
        rel = float((g_got[n] - g).norm() / g.norm().clamp_min(1e-30))
        assert rel <= 1e-4, f"{n}: relative gradient difference {rel:.2e}"


def checkpointed(model):
    """As load_model trains it: per-layer activation checkpointing and a sparse lookup gradient."""
    model = copy.deepcopy(model)
    common.checkpoint_layers(model)
    common.sparse_tied_embedding_grad(model)
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_shared_prompt_logprobs_and_gradients_equal_unshared(tiny, monkeypatch, temperature, ckpt):
    model, tok = tiny
    model = checkpointed(model) if ckpt else model
    prompts, comps = batch(tok)
    assert min(map(len, comps)) == 1 and len(prompts[0]) > model.config.sliding_window
    assert_same(model, prompts, comps, monkeypatch, temperature=temperature, chunk=5, pad_id=tok.pad_token_id)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_student_topk_extra_ids_and_teacher_topk_paths_equal_unshared(tiny, monkeypatch, ckpt):
    model, tok = tiny
    model = checkpointed(model) if ckpt else model
    prompts, comps = batch(tok)
    kw = dict(temperature=0.8, chunk=7, pad_id=tok.pad_token_id)
    assert_same(model, prompts, comps, monkeypatch, own_k=6, **kw)
    monkeypatch.undo()
    assert_same(model, prompts, comps, monkeypatch, teacher_k=5, **kw)
    monkeypatch.undo()
    with torch.no_grad():
        ids = common.teacher_topk(model, prompts, comps, 4, pad_id=tok.pad_token_id)["topk_ids"]
    assert_same(model, prompts, comps, monkeypatch, extra_ids=ids, **kw)


@pytest.mark.parametrize("cap", [2048, 100])
def test_one_long_group_crosses_the_sliding_window_many_times(tiny, monkeypatch, cap):
    """G=8 completions of up to 30 tokens: the packed sequence is ~20x the window of 8, so a wrong
    window (by packed index instead of position) would show. With a cap of 100 packed tokens the
    group is split into several packs, each with its own copy of the prompt."""
    model, tok = tiny
    texts = [" " + "abcdefghijklmnopqrstuvwxyz0123"[:n] for n in (30, 1, 12, 29, 3, 17, 8, 25)]
    prompts, comps = batch(tok, [(LONG, t) for t in texts], eos_last=False)
    monkeypatch.setattr(common, "PACK_TOKENS", cap)
    packs = common._packs(prompts, comps)
    assert len(packs) == (1 if cap == 2048 else 4) and sorted(sum(packs, [])) == list(range(8))
    assert all(len(prompts[0]) + sum(len(comps[b]) - 1 for b in p) <= cap for p in packs)
    assert_same(model, prompts, comps, monkeypatch, chunk=64, pad_id=tok.pad_token_id)


def test_groups_of_one_take_the_unshared_path(tiny, monkeypatch):
    model, tok = tiny
    prompts, comps = batch(tok, ROWS[:2])
    assert_same(model, prompts, comps, monkeypatch, expect_shared=False, pad_id=tok.pad_token_id)


def test_an_empty_completion_is_scored_as_nothing(tiny, monkeypatch):
    model, tok = tiny
    prompts, comps = batch(tok, ROWS[:3])
    comps[1] = []
    assert_same(model, prompts, comps, monkeypatch, pad_id=tok.pad_token_id)


def test_pad_id_different_from_eos(tiny_tok, monkeypatch):
    """A model whose pad id (0) is not its EOS (1), as the embedded Gemma: padding is pad 0 and the
    EOS ending a completion is trained in both paths."""
    model = make_tiny_gemma(len(tiny_tok), seed=1)
    model.config.pad_token_id = 0
    prompts, comps = batch(tiny_tok)
    assert comps[0][-1] == 1
    assert_same(model, prompts, comps, monkeypatch, pad_id=0)


def test_eager_attention_takes_an_additive_mask(tiny_tok, monkeypatch):
    model = make_tiny_gemma(len(tiny_tok), seed=2)
    model.set_attn_implementation("eager")
    assert common._packed_mask_format(model)[2] is False
    prompts, comps = batch(tiny_tok)
    assert_same(model, prompts, comps, monkeypatch, pad_id=1)


def test_llama_without_sliding_layers_takes_one_4d_mask(tiny_tok, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    assert common._packed_mask_format(model) == ({"full_attention"}, None, True)
    prompts, comps = batch(tiny_tok)
    assert_same(model, prompts, comps, monkeypatch, pad_id=0)


def test_unsupported_attention_falls_back_to_unshared(tiny_tok, monkeypatch):
    model = make_tiny_gemma(len(tiny_tok), seed=3)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert common._packed_mask_format(model) is None
    monkeypatch.setattr(model.config, "layer_types", ["chunked_attention"] * 4)
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")
    assert common._packed_mask_format(model) is None


def test_the_prompt_runs_once_per_group(tiny, monkeypatch):
    """What sharing saves: the decoder sees each group's prompt once, not once per row."""
    model, tok = tiny
    prompts, comps = batch(tok)
    seen = []
    hook = model.base_model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.no_grad():
            common.token_logprobs(model, prompts, comps, pad_id=tok.pad_token_id)
    finally:
        hook.remove()
    n_groups, longest = 3, max(len(prompts[g]) + sum(len(comps[b]) - 1 for b in rows)
                               for g, rows in [(0, [0, 2, 4]), (1, [1]), (3, [3, 5])])
    assert seen == [torch.Size([n_groups, longest])]


@pytest.mark.gemma
def test_shared_prompt_equals_unshared_real_gemma(gemma, monkeypatch):
    model, tok = gemma
    model = checkpointed(model)
    prompts, comps = batch(tok, [(LONG, c) for _, c in ROWS[:3]] + [("Question: 2+2?\nAnswer:", " 4")] * 2,
                           eos_last=False)
    comps[0] = comps[0] + [tok.eos_token_id]
    assert_same(model, prompts, comps, monkeypatch, temperature=0.7, chunk=8, pad_id=tok.pad_token_id)
