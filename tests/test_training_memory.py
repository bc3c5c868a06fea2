"""The lean backward of common.py ("training memory"): a sparse lookup gradient for a tied embedding
and per-layer activation checkpointing. Both must leave every gradient what it was; the benchmark
(bench/bench_train_step.py) measures what they save.
"""
import copy
import json
import sys

import torch
from conftest import make_tiny_gemma, save_tiny_model

import common

PROMPTS = ["Question 1: what is 1 + 3?\nAnswer:", "Hi", "A prompt longer than the sliding window.\n"]
COMPLETIONS = [" 4\n", " there, how are you", " yes"]


def loss_and_grads(model, tok, rounds: int = 2) -> tuple[list[float], dict]:
    """Two micro-batches accumulated into .grad, as the stages do; the second backward is the one
    where a dense .grad already exists."""
    model.zero_grad(set_to_none=True)
    p_ids = [common.encode(tok, p) for p in PROMPTS]
    c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    losses = []
    for r in range(rounds):
        lp = common.token_logprobs(model, p_ids, c_ids, temperature=0.7, pad_id=tok.pad_token_id)
        loss = -(lp["logprobs"] * lp["mask"]).sum() / lp["mask"].sum() * (r + 1)
        loss.backward()
        losses.append(float(loss.detach()))
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a: dict, b: dict, rtol: float = 1e-5):
    assert a.keys() == b.keys()
    for n in a:
        assert not a[n].is_sparse and not b[n].is_sparse, n
        scale = float(a[n].abs().max()) + 1e-12
        diff = float((a[n] - b[n]).abs().max())
        assert diff <= rtol * scale, (n, diff, scale)


def test_sparse_lookup_gradient_of_a_tied_embedding_equals_the_dense_one(tiny_tok):
    dense = make_tiny_gemma(len(tiny_tok))
    sparse = copy.deepcopy(dense)
    assert dense.get_input_embeddings().weight is dense.get_output_embeddings().weight    # tied
    assert common.sparse_tied_embedding_grad(sparse) and sparse.get_input_embeddings().sparse
    assert not dense.get_input_embeddings().sparse
    la, ga = loss_and_grads(dense, tiny_tok)
    lb, gb = loss_and_grads(sparse, tiny_tok)
    assert la == lb, (la, lb)
    assert_same_grads(ga, gb)
    # the rows no token touched get the head's gradient only, and those rows are not zero
    emb = gb["model.embed_tokens.weight"]
    assert emb.abs().sum(1).gt(0).all(), emb.abs().sum(1).eq(0).nonzero().flatten().tolist()
    torch.optim.AdamW(sparse.parameters(), lr=1e-3).step()      # AdamW takes it (no sparse grads)


def test_untied_embedding_keeps_the_dense_lookup(tiny_tok):
    model = make_tiny_gemma(len(tiny_tok))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untie
    assert not common.sparse_tied_embedding_grad(model)
    assert not model.get_input_embeddings().sparse


def test_a_backward_through_the_lookup_alone_still_gives_a_dense_gradient(tiny_tok):
    model = make_tiny_gemma(len(tiny_tok))
    common.sparse_tied_embedding_grad(model)
    model.get_input_embeddings()(torch.tensor([[3, 4, 4]])).sum().backward()
    g = model.get_input_embeddings().weight.grad
    assert not g.is_sparse and g.shape == model.get_input_embeddings().weight.shape
    assert g[4].abs().sum() > 0 and g[5].abs().sum() == 0


def saved_bytes(model, tok) -> int:
    """Bytes autograd saves for the backward during one training forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        common.token_logprobs(model, [common.encode(tok, p) for p in PROMPTS],
                              [tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS],
                              temperature=0.7, pad_id=tok.pad_token_id)
    return total


def test_checkpointed_layers_give_the_same_gradients_and_save_less(tiny_tok):
    plain = make_tiny_gemma(len(tiny_tok))
    ckpt = copy.deepcopy(plain)
    assert common.checkpoint_layers(ckpt) == plain.config.num_hidden_layers
    assert not ckpt.training                                      # eval mode: dropout stays off
    la, ga = loss_and_grads(plain, tiny_tok)
    lb, gb = loss_and_grads(ckpt, tiny_tok)
    assert la == lb
    assert_same_grads(ga, gb, rtol=1e-6)
    kept, full = saved_bytes(ckpt, tiny_tok), saved_bytes(plain, tiny_tok)
    assert kept < full / 2, (kept, full)
    with torch.no_grad():                                          # sampling: the layers run as they are
        a = common.sample(plain, tiny_tok, PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=3)
        b = common.sample(ckpt, tiny_tok, PROMPTS, n=2, max_new_tokens=8, temperature=0.7, seed=3)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


def test_a_deep_copy_of_a_checkpointed_model_runs_its_own_weights(tiny_tok):
    """Rollout copies and EMA teachers are deep copies: the wrapped forward must rebind to the copy,
    or the copy would silently run the original's weights."""
    model = make_tiny_gemma(len(tiny_tok))
    common.checkpoint_layers(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.model.layers[0].parameters():
            p.mul_(0.5)
    ids = torch.tensor([common.encode(tiny_tok, PROMPTS[0])])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert not torch.allclose(model(ids).logits, twin(ids).logits)
    copied = common.rollout_copy(model, "bfloat16")
    assert copied.model.layers[0].forward.__self__ is copied.model.layers[0]


def test_the_flag_reaches_a_stage_and_changes_no_number(tiny_tok, tmp_path, monkeypatch):
    """grpo_introspect.py on the tiny model with --activation-checkpointing (the default) and
    --no-activation-checkpointing: the same losses, gradient norms and rewards, step for step."""
    import grpo_introspect as g
    model_dir = save_tiny_model(tmp_path / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq"} for c in ("k", "f") for i in range(6)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wrapped = []
    real_ckpt = common.checkpoint_layers
    monkeypatch.setattr(common, "checkpoint_layers", lambda m: wrapped.append(m) or real_ckpt(m))
    metrics = {}
    for flag in (["--no-activation-checkpointing"], ["--activation-checkpointing"]):
        out = tmp_path / flag[0].strip("-")
        monkeypatch.setattr(sys, "argv", ["grpo_introspect.py", "--model", str(model_dir), "--data", str(tmp_path / "q.jsonl"),
                                          "--out", str(out), "--steps", "2", "--N", "2", "--M", "1", "--lr", "1e-2",
                                          "--max-new-tokens", "6", "--answer-tokens", "3", "--matrix-M", "0",
                                          "--rollout-dtype", "float32", *flag])
        g.main()
        steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        metrics[flag[0]] = [{k: v for k, v in m.items() if k in ("step", "loss", "grad_norm", "reward_mean",
                                                                     "weight_change")} for m in steps]
    assert len(wrapped) == 1
    off, on = metrics["--no-activation-checkpointing"], metrics["--activation-checkpointing"]
    assert any("grad_norm" in m for m in off)
    assert off == on
