"""Rollout latency against N: N samples of one GRPO prompt with common.sample (one prefill, the cache
copied to N rows), fixed length. The paper saw two regimes on a GPU: sublinear growth up to N=32
(launch and weight-loading overhead amortised), near-linear from 64 (KV traffic dominates).
The reference in the same run is N=1: each row prints latency / latency(N=1) against N itself.
Each N runs in every --dtypes (fp32: the trained weights; bfloat16: the rollout copy from
common.rollout_copy), interleaved, --repeats times: median [min, max], and the bf16 speed-up over
fp32 at the same N (a ratio within one repeat, then its median [min, max]).

    python bench/bench_rollouts.py                          # CPU, N = 1 2 4 8 16 32 64 128, fp32 and bf16
    python bench/bench_rollouts.py --device cuda --new-tokens 128
"""
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import grpo_introspect  # noqa: E402


def spread(xs, fmt=".2f"):
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", type=common.device_name, default=None)
    p.add_argument("--dtypes", nargs="+", type=common.ranged(str, lambda v: v in common.DTYPE_NAMES,
                   f"expected one of {', '.join(common.DTYPE_NAMES)}", "a dtype name"),
                   default=["float32", "bfloat16"], help="rollout dtypes to time")
    p.add_argument("--data", default="data/procedural.jsonl")
    p.add_argument("--N", type=common.at_least(1), nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--new-tokens", type=common.at_least(1), default=32)
    p.add_argument("--repeats", type=common.at_least(1), default=3, help="timed runs per setting (median, min, max)")
    args = p.parse_args()
    model, tok = common.load_model(args.model, args.device, "float32")
    models = {dt: common.rollout_copy(model, dt) for dt in args.dtypes}
    dev = next(model.parameters()).device
    q = common.load_questions(args.data)[0]
    prompt = common.question_prompt(tok, q, instruction=grpo_introspect.INTROSPECT_HINT)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"device {dev}, native bf16 on this CPU: {common.cpu_has_fast_bf16()}")
    print(f"# prompt {len(common.encode(tok, prompt))} tokens, {args.new_tokens} new tokens forced, T=0.7, "
          f"{args.repeats} repeats: median [min, max]")
    for m in models.values():
        common.sample(m, tok, [prompt], n=2, max_new_tokens=4, temperature=0.7)   # warm-up

    def run(m, n):
        t0 = time.perf_counter()
        common.sample(m, tok, [prompt], n=n, max_new_tokens=args.new_tokens,
                      min_new_tokens=args.new_tokens, temperature=0.7, max_rows=max(256, n))
        sync()
        return time.perf_counter() - t0

    print(f"{'N':>5} {'dtype':>9} {'seconds':>20} {'tok/s':>20} {'x N=1':>7} {'fp32 / this':>20}")
    base = {}
    for n in args.N:
        t = {dt: [] for dt in args.dtypes}
        for _ in range(args.repeats):
            for dt, m in models.items():
                t[dt].append(run(m, n))
        for dt in args.dtypes:
            med = statistics.median(t[dt])
            base.setdefault(dt, med)
            vs = spread([f / b for f, b in zip(t["float32"], t[dt])]) + "x" if "float32" in t else "-"
            print(f"{n:>5} {dt:>9} {spread(t[dt]):>20} {spread([n * args.new_tokens / s for s in t[dt]], '.1f'):>20} "
                  f"{med / base[dt]:>7.2f} {vs:>20}", flush=True)


if __name__ == "__main__":
    common.run_main(main)
