"""Where one decode step of common.sample goes, at n rows of one prompt, in each rollout dtype.

    python bench/profile_decode.py                    # embedded Gemma, n=16, 64 forced tokens
    python bench/profile_decode.py --n 16 --dtypes bfloat16 --ops 15

The real sampler runs (common._prefill then common._decode, EOS masked so every row writes
--new-tokens tokens), with timers hooked around its pieces, not a copy of its loop: the decoder
layers (model.model), the LM head, draw_tokens and _record (no stop string, as bench_sampler.py). "rest" is the
step's wall time minus those: the mask concatenation, cache compaction, .tolist() and Python.
Each dtype is timed --repeats times (median [min, max] of the per-step mean), with the sampler's
preallocated KV buffers (common._preallocate) and with HF's torch.cat cache, interleaved; then one
run under torch.profiler lists the ops with the most self CPU time.
"""
import os
import platform
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
from bench_sampler import PROMPT  # noqa: E402

PARTS = ("decoder layers", "LM head", "draw_tokens", "_record", "rest")


class Timers:
    """Seconds per part, from forward hooks on two modules and wrappers around two functions."""

    def __init__(self, model):
        self.t = defaultdict(float)
        self.start, self.handles = {}, []
        for name, mod in (("decoder layers", model.model), ("LM head", model.lm_head)):
            self.handles += [
                mod.register_forward_pre_hook(lambda m, a, name=name: self.start.__setitem__(name, time.perf_counter())),
                mod.register_forward_hook(lambda m, a, o, name=name: self._stop(name))]

    def _stop(self, name):
        self.t[name] += time.perf_counter() - self.start[name]

    def wrap(self, name, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += time.perf_counter() - t0
        return timed


def decode_once(model, tok, n, new_tokens, timers) -> tuple[float, dict]:
    """One prefill (untimed) and one timed decode loop; returns (s per step, s per step by part)."""
    state = common._prefill(model, tok, [PROMPT], n, [common.row_seed(0, 0, j) for j in range(n)], new_tokens)
    timers.t.clear()
    bar = common.tqdm(disable=True)
    t0 = time.perf_counter()
    common._decode(model, tok, state, 1.0, 1.0, [], new_tokens, bar)    # no stop string, as bench_sampler
    wall = time.perf_counter() - t0
    steps = new_tokens - 1                                  # the first token comes from the prefill's logits
    parts = {k: timers.t[k] for k in PARTS[:-1]}
    parts["rest"] = wall - sum(parts.values())
    return wall / steps, {k: v / steps for k, v in parts.items()}


def spread(xs):
    return f"{1e3 * statistics.median(xs):6.1f} [{1e3 * min(xs):.1f}, {1e3 * max(xs):.1f}]"


def ratio(a, b) -> str:
    r = [x / y for (x, _), (y, _) in zip(a, b)]
    return f"{statistics.median(r):.2f}x [{min(r):.2f}, {max(r):.2f}] (paired by repeat)"


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--n", type=common.at_least(1), default=16)
    p.add_argument("--new-tokens", type=common.at_least(2), default=64)
    p.add_argument("--repeats", type=common.at_least(1), default=3)
    p.add_argument("--ops", type=common.at_least(0), default=12, help="profiler rows to print (0: none)")
    args = p.parse_args()
    model, tok = common.load_model(args.model, None, "float32")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"native bf16: {common.cpu_has_fast_bf16()}; n={args.n}, {args.new_tokens} tokens forced, "
          f"ms per decode step, median [min, max] of {args.repeats}")
    real_draw, real_record, real_prealloc = common.draw_tokens, common._record, common._preallocate
    for dt in args.dtypes:
        m = common.rollout_copy(model, dt)
        timers = Timers(m)
        common.draw_tokens, common._record = timers.wrap("draw_tokens", real_draw), timers.wrap("_record", real_record)
        decode_once(m, tok, args.n, 8, timers)                # warm-up
        runs, hf = [], []
        for _ in range(args.repeats):
            runs.append(decode_once(m, tok, args.n, args.new_tokens, timers))
            common._preallocate = lambda layer: None
            hf.append(decode_once(m, tok, args.n, args.new_tokens, timers))
            common._preallocate = real_prealloc
        print(f"\n{dt}: step {spread([s for s, _ in runs])} ms; with HF's torch.cat cache "
              f"{spread([s for s, _ in hf])} ms; ours / HF cache {ratio(runs, hf)}")
        for part in PARTS:
            xs = [d[part] for _, d in runs]
            share = statistics.median(d[part] / s for s, d in runs)
            print(f"  {part:15s} {spread(xs)} ms  ({share:.0%}; HF cache {spread([d[part] for _, d in hf])})")
        if args.ops:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                decode_once(m, tok, args.n, args.new_tokens, timers)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))
        common.draw_tokens, common._record = real_draw, real_record
        for h in timers.handles:
            h.remove()


if __name__ == "__main__":
    main()
