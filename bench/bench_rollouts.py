"""Rollout latency against N: N samples of one GRPO prompt with common.sample (one prefill, the cache
copied to N rows), fixed length. The paper saw two regimes on a GPU: sublinear growth up to N=32
(launch and weight-loading overhead amortised), near-linear from 64 (KV traffic dominates).
The reference in the same run is N=1: each row prints latency / latency(N=1) against N itself.

    python bench/bench_rollouts.py                          # CPU, N = 1 2 4 8 16 32 64 128
    python bench/bench_rollouts.py --device cuda --new-tokens 128
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import grpo_introspect  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--data", default="data/procedural.jsonl")
    p.add_argument("--N", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev = next(model.parameters()).device
    q = common.load_questions(args.data)[0]
    prompt = common.question_prompt(tok, q, instruction=grpo_introspect.INTROSPECT_HINT)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"device {dev}, dtype {next(model.parameters()).dtype}")
    print(f"# prompt {len(common.encode(tok, prompt))} tokens, {args.new_tokens} new tokens forced, T=0.7")
    common.sample(model, tok, [prompt], n=2, max_new_tokens=4, temperature=0.7)   # warm-up
    print(f"{'N':>5} {'seconds':>9} {'tok/s':>8} {'x N=1':>7} {'N':>5}")
    base = None
    for n in args.N:
        t0 = time.perf_counter()
        common.sample(model, tok, [prompt], n=n, max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, temperature=0.7, max_rows=max(256, n))
        sync()
        dt = time.perf_counter() - t0
        base = base or dt
        print(f"{n:>5} {dt:>9.2f} {n * args.new_tokens / dt:>8.1f} {dt / base:>7.2f} {n:>5}", flush=True)


if __name__ == "__main__":
    main()
