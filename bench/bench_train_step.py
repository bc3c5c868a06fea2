"""Time one training step of each pmd_distill.py method at a fixed configuration, broken down into
rollouts, teacher forward, student forward + backward (+ optimizer step), and memory update, with
the peak memory of the process. Each (method, repeat) runs in a fresh subprocess, so the peak RSS
is that step's own; the table gives the median of --repeats runs with min and max.

    python bench/bench_train_step.py --model gemma            # B=2, G=8, 16 new tokens
    python bench/bench_train_step.py --model gemma --methods grpo --repeats 3

The step is the loop of pmd_distill.py, phase by phase, on the same fixed questions and seeds
(the memory for pmd is pre-filled by one untimed batch, so retrieval has something to find).
One untimed step (--warmup) runs first, on other seeds, as TRL's first step does below.
Each method also runs as "<method> unshared", with token_logprobs(share_prompts=False), so every
row runs its own copy of the prompt through the decoder; the last column is the shared student
forward + backward over the unshared one (--no-unshared skips those runs).
`--trl` adds a row for TRL's GRPOTrainer on the same model, prompts, G, sampling temperature,
micro-batch and new tokens: loss_type "dapo" (token-level over the active tokens, as ours), no std
scaling, beta 0 (no reference model), one iteration per batch, AdamW at the same lr and clip. Its
step is one optimizer step (generation included), timed by a callback; the second step is the one
reported, after a first that warms up. TRL is not a requirement of this project: install it in
another environment and point `--trl-python` at that interpreter, e.g.

    python -m venv /tmp/trl && echo "$(python -c 'import site; print(site.getsitepackages()[0])')" \
        > "$(/tmp/trl/bin/python -c 'import site; print(site.getsitepackages()[0])')/main.pth"
    /tmp/trl/bin/pip install trl
    python bench/bench_train_step.py --model gemma --methods grpo --trl --trl-python /tmp/trl/bin/python \
        --min-new-tokens 16

Memory: ours always takes the sparse lookup gradient of a tied embedding (common.py, "training
memory"); TRL gets the model as HF ships it. Per-layer activation checkpointing is on for both
sides by default (ours: --activation-checkpointing; TRL's GRPOConfig: gradient_checkpointing, its
default too), and `--no-activation-checkpointing` turns it off for both.

Ours samples from common.rollout_copy, as pmd_distill.py does: the bf16 copy where bf16 is fast,
refreshed after the step (its sync counts as rollout time). TRL generates with the fp32 model
itself, so `--rollout-dtype float32` is the like-for-like comparison.

With --min-new-tokens equal to --max-new-tokens every completion has the same length in both,
so both train the same number of tokens (TRL's generation has no stop string; ours drops its stop
string when --min-new-tokens is set).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import pmd_distill as pmd  # noqa: E402

PHASES = ("rollouts", "teacher_forward", "student_fwd_bwd", "memory_update", "total")
UNSHARED = " unshared"    # a method run with token_logprobs(share_prompts=False): every row its own prompt
TRL = "trl-grpo"


def one_step(args) -> dict:
    share = not args.method.endswith(UNSHARED)
    method = args.method.removesuffix(UNSHARED)
    model, tok = common.load_model(args.model, args.device, args.dtype, args.activation_checkpointing)
    qs = [q for q in common.load_questions(args.data) if not q.meta.get("negative_control")]
    qs = pmd.stratified_take(qs, 1)[:args.B]
    sampler = common.rollout_copy(model, args.rollout_dtype)   # as pmd_distill.py: bf16 where fast
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    teacher = None
    if method != "grpo":
        teacher = __import__("copy").deepcopy(model).eval()
        teacher.requires_grad_(False)
    prompts = [common.question_prompt(tok, q) for q in qs]
    mem = pmd.new_memory()
    G, T = args.G, args.temperature

    def rollouts(seed):
        seeds = [common.row_seed(seed, b, j) for b in range(len(qs)) for j in range(G)]
        roll = common.sample(sampler, tok, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=T,
                             stop=None if args.min_new_tokens else pmd.ANSWER_STOP, row_seeds=seeds,
                             min_new_tokens=args.min_new_tokens)
        ver = [common.verify(qs[i // G], s.text) for i, s in enumerate(roll)]
        return roll, [r for r, _ in ver], [f for _, f in ver]

    if method == "pmd":   # untimed: one batch of experience so retrieval has entries
        roll, rw, fb = rollouts(1)
        for i, s in enumerate(roll):
            pmd.add_experience(mem, qs[i // G], s.text, rw[i], fb[i], 0, 0)

    def step(seed):
        t = {}
        t0 = time.perf_counter()
        roll, rewards, feedback = rollouts(seed)
        t["rollouts"] = time.perf_counter() - t0
        comp = [s.token_ids for s in roll]
        s_ids = [common.encode(tok, prompts[i // G]) for i in range(len(roll))]
        t["teacher_forward"] = t["logprob_fwd_bwd"] = 0.0
        t1 = time.perf_counter()
        if method == "grpo":
            A = pmd.grpo_advantages(torch.tensor(rewards).view(len(qs), G)).view(-1)
            rows = list(range(len(roll)))
            n_active = sum(len(comp[i]) for i in rows)
            for s in range(0, len(rows), args.micro_batch):
                mb = rows[s:s + args.micro_batch]
                ta = time.perf_counter()
                lp = common.token_logprobs(model, [s_ids[i] for i in mb], [comp[i] for i in mb], temperature=T,
                                           pad_id=tok.pad_token_id, share_prompts=share)
                (pmd.grpo_loss(lp["logprobs"], lp["mask"], A[mb]) * (lp["mask"].sum() / n_active)).backward()
                t["logprob_fwd_bwd"] += time.perf_counter() - ta
        else:
            rolls = [common.Rollout(qs[i // G], s_ids[i], comp[i], s.text, rewards[i], feedback[i], s.logprobs)
                     for i, s in enumerate(roll)]
            cargs = SimpleNamespace(G=G, method=method, feedback="without-solution", levels=",".join(pmd.LEVELS),
                                    memory_tokens=64, teacher_format="sdpo")
            ctx = [c.prompt for c in pmd.teacher_contexts(cargs, tok, qs, rolls, mem, {})]
            rows = [i for i, c in enumerate(ctx) if c is not None]
            n_active = sum(len(comp[i]) for i in rows)
            k = min(100, model.config.vocab_size)
            for s in range(0, len(rows), args.micro_batch):
                mb = rows[s:s + args.micro_batch]
                ta = time.perf_counter()
                st = common.student_topk(model, [s_ids[i] for i in mb], [comp[i] for i in mb], k, temperature=T,
                                         pad_id=tok.pad_token_id, share_prompts=share)
                t["logprob_fwd_bwd"] += time.perf_counter() - ta
                ta = time.perf_counter()
                with torch.no_grad():
                    te = common.logprobs_at(teacher, [common.encode(tok, ctx[i]) for i in mb], [comp[i] for i in mb],
                                            st["student_topk_ids"], temperature=T, pad_id=tok.pad_token_id,
                                            share_prompts=share)
                t["teacher_forward"] += time.perf_counter() - ta
                ta = time.perf_counter()
                pmd.sdpo_loss(st["student_topk_logprobs"], te["extra_logprobs"], st["mask"], 0.5, n_active=n_active).backward()
                t["logprob_fwd_bwd"] += time.perf_counter() - ta
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            pmd.ema_update(teacher, model, 0.05)
        t["student_fwd_bwd"] = time.perf_counter() - t1 - t["teacher_forward"]
        t["rollouts"] += common.sync_rollout(sampler, model)    # refreshing the bf16 copy: rollout cost
        t2 = time.perf_counter()
        if method == "pmd":
            for i, s in enumerate(roll):
                pmd.add_experience(mem, qs[i // G], s.text, rewards[i], feedback[i], 0, 1)
            for q in qs:
                pmd.retrieve(mem, q, pmd.LEVELS, tok, 64)
        t["memory_update"] = time.perf_counter() - t2
        t["total"] = time.perf_counter() - t0
        return t, rows, n_active

    for w in range(args.warmup):     # untimed: first calls pay for allocation and kernel set-up
        step(100 + w)
    t, rows, n_active = step(0)
    dev = next(model.parameters()).device
    return {**t, "peak_mb": common.peak_memory_mb(dev), "rows": len(qs) * G, "trained_rows": len(rows),
            "tokens": n_active}


def one_step_trl(args) -> dict:
    """One optimizer step of TRL's GRPOTrainer, configured as our grpo step (see the docstring)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tok = common.load_model(args.model, args.device, args.dtype)
    model.get_input_embeddings().sparse = False    # as HF ships it: TRL gets none of our memory savings
    qs = [q for q in common.load_questions(args.data) if not q.meta.get("negative_control")]
    qs = pmd.stratified_take(qs, 1)[:args.B]
    by_id = {q.id: q for q in qs}
    rows = args.B * args.G
    if rows % args.micro_batch:
        raise common.flag_error("micro_batch", args.micro_batch, f"must divide B x G = {rows} for TRL's accumulation")
    data = Dataset.from_list([{"prompt": common.question_prompt(tok, q), "qid": q.id} for q in qs] * 2)

    def reward(prompts, completions, qid, **_):
        return [common.verify(by_id[i], c)[0] for c, i in zip(completions, qid)]

    class Timer(TrainerCallback):
        times = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    gen = {"min_new_tokens": args.min_new_tokens} if args.min_new_tokens else None
    cfg = GRPOConfig(output_dir=str(Path(args.trl_dir)), per_device_train_batch_size=args.micro_batch,
                     gradient_accumulation_steps=rows // args.micro_batch, num_generations=args.G,
                     max_completion_length=args.max_new_tokens, temperature=args.temperature,
                     loss_type="dapo", scale_rewards="none", beta=0.0, num_iterations=1, learning_rate=1e-6,
                     max_grad_norm=1.0, lr_scheduler_type="constant", optim="adamw_torch", max_steps=2,
                     use_cpu=args.device == "cpu", bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                     shuffle_dataset=False, seed=args.seed, generation_kwargs=gen,
                     gradient_checkpointing=args.activation_checkpointing)   # on: TRL's default too
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    dev = next(model.parameters()).device
    return {"rollouts": float("nan"), "teacher_forward": 0.0, "student_fwd_bwd": float("nan"), "memory_update": 0.0,
            "logprob_fwd_bwd": float("nan"),
            "total": Timer.times[-1], "first_step": Timer.times[0], "peak_mb": common.peak_memory_mb(dev),
            "rows": rows, "trained_rows": rows, "tokens": "-"}


def run_all(args) -> dict:
    """Every (method, repeat) in a fresh process. Each method runs twice, with and without prompt
    sharing (unless --no-unshared); repeat r of every variant runs before repeat r + 1 of any, so a
    change in the machine's load hits the variants alike and the paired ratios stay meaningful."""
    variants = [v for m in args.methods.split(",") for v in ([m] if args.no_unshared else [m, m + UNSHARED])]
    variants += [TRL] if args.trl else []
    done = {v: [] for v in variants}
    for r in range(args.repeats):
        for m in variants:
            py = args.trl_python if m == TRL else sys.executable
            out = subprocess.run([py, __file__, "--method", m] + sys.argv[1:], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-2000:])
            done[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{m} run {r + 1}: " + ", ".join(f"{k} {done[m][-1][k]:.2f}" for k in PHASES + ("logprob_fwd_bwd",)),
                  file=sys.stderr)
    return done


def ratio(a_runs, b_runs, key) -> str:
    """Repeat r of a against repeat r of b: median [min, max] of the paired ratios."""
    t = np.array([a[key] / b[key] for a, b in zip(a_runs, b_runs)])
    return f"{np.median(t):.2f}x [{t.min():.2f}, {t.max():.2f}]"


def print_table(args, done: dict) -> None:
    print(f"\nmodel {args.model}, B={args.B}, G={args.G}, up to {args.max_new_tokens} new tokens "
          f"(min {args.min_new_tokens}), micro-batch {args.micro_batch}; seconds, median [min, max] of {args.repeats}")
    print("logprob_fwd_bwd: token_logprobs + backward of the student only (no teacher, clip or AdamW); "
          "last column: that time over the same method's unshared one, paired by repeat\n")
    cols = PHASES + ("logprob_fwd_bwd",)
    print("| method | " + " | ".join(cols) + " | peak RSS MB | trained rows / tokens | fwd+bwd shared / unshared |")
    print("|---|" + "---|" * (len(cols) + 3))
    for m, runs in done.items():
        cells = []
        for k in cols:
            v = np.array([x[k] for x in runs])
            cells.append(f"{np.median(v):.2f} [{v.min():.2f}, {v.max():.2f}]")
        cells.append(f"{np.median([x['peak_mb'] for x in runs]):.0f}")
        vs = ratio(runs, done[m + UNSHARED], "logprob_fwd_bwd") if m + UNSHARED in done else "-"
        print(f"| {m} | " + " | ".join(cells) + f" | {runs[0]['trained_rows']} / {runs[0]['tokens']} | {vs} |")
    if TRL in done and "grpo" in done:
        print(f"\ngrpo / TRL GRPOTrainer step time: {ratio(done['grpo'], done[TRL], 'total')} (goal <= 0.5x); "
              f"peak RSS: {ratio(done['grpo'], done[TRL], 'peak_mb')} (goal <= 1x); "
              f"TRL's first (warm-up) step: {np.median([x['first_step'] for x in done[TRL]]):.1f} s")


def main():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data=str(ROOT / "data" / "procedural.jsonl"))
    p.add_argument("--methods", default="grpo,sdpo,pmd")
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)      # the subprocess's one step (or TRL's)
    p.add_argument("--B", type=common.at_least(1), default=2)
    p.add_argument("--G", type=common.at_least(1), default=8)
    p.add_argument("--max-new-tokens", type=common.at_least(1), default=16)
    p.add_argument("--min-new-tokens", type=common.at_least(0), default=0, help="force this many tokens (fixed shapes; also drops the stop string)")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--micro-batch", type=common.at_least(1), default=4)
    p.add_argument("--repeats", type=common.at_least(1), default=3)
    p.add_argument("--warmup", type=common.at_least(0), default=1, help="untimed steps before the timed one (TRL's: always 1)")
    p.add_argument("--no-unshared", action="store_true", help="skip the unshared variants (share_prompts=False)")
    p.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer (needs trl, see --trl-python)")
    p.add_argument("--trl-python", default=sys.executable, help="the interpreter that has trl installed")
    p.add_argument("--trl-dir", default="/tmp/bench_trl", help=argparse.SUPPRESS)
    args = p.parse_args()
    bad = [m for m in args.methods.split(",") if m not in pmd.METHODS]
    if bad:
        raise common.flag_error("methods", args.methods, f"unknown method {bad[0]!r}; choose from {', '.join(pmd.METHODS)}")
    common.load_questions(args.data)
    if args.method:
        common.seed_everything(args.seed)
        print(json.dumps(one_step_trl(args) if args.method == TRL else one_step(args)))
        return
    print_table(args, run_all(args))

if __name__ == "__main__":
    common.run_main(main)
