"""Our sampler (common.sample) vs Hugging Face `generate`, same model, prompt and settings, one run.

Both sample at the same temperature and top-p (HF's top-k switched off), and both are forced to
write exactly --new-tokens tokens (EOS masked until then: HF's min_new_tokens, our
min_new_tokens), so the tokens/s compare like with like. Prints one row per n and the ratio.

    python bench/bench_sampler.py                      # embedded Gemma, n = 1 8 16 32
    python bench/bench_sampler.py --n 16 --top-p 0.95  # one setting
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402

PROMPT = ("Question: A train leaves at 22:40 and the journey takes 95 minutes. At what time does it "
          "arrive? Give the time on a 24-hour clock.\nAnswer:")


def time_it(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--n", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=1, help="best of this many timed runs")
    args = p.parse_args()

    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev = next(model.parameters()).device
    enc = tok(PROMPT, return_tensors="pt").to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, device {dev}, dtype {next(model.parameters()).dtype}")
    print(f"# prompt {enc.input_ids.shape[1]} tokens, {args.new_tokens} new tokens forced, "
          f"T={args.temperature}, top_p={args.top_p}")

    def ours(n):
        out = common.sample(model, tok, [PROMPT], n=n, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=0)
        sync()
        assert all(len(s.token_ids) == args.new_tokens for s in out)

    def hf(n):
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 top_k=0, num_return_sequences=n, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        sync()
        assert out.shape[1] - enc.input_ids.shape[1] == args.new_tokens

    ours(2), hf(2)  # warm-up
    print(f"{'n':>4} {'HF tok/s':>10} {'ours tok/s':>11} {'ratio':>7}")
    for n in args.n:
        t_hf = time_it(lambda: hf(n), args.repeats)
        t_us = time_it(lambda: ours(n), args.repeats)
        tokens = n * args.new_tokens
        print(f"{n:>4} {tokens / t_hf:>10.1f} {tokens / t_us:>11.1f} {t_hf / t_us:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
