"""Our sampler (common.sample) vs Hugging Face `generate`, same model, prompt and settings, one run,
in each rollout dtype: fp32 (the trained weights themselves) and the bf16 rollout copy that
common.rollout_copy makes (the copy every stage samples from where bf16 is fast).

Both sample at the same temperature and top-p (HF's top-k switched off), and both are forced to
write exactly --new-tokens tokens (EOS masked until then: HF's min_new_tokens, our
min_new_tokens), so the tokens/s compare like with like. HF generate runs on the very same module
(the fp32 model, or the bf16 copy). Each setting is timed --repeats times, interleaved (HF then
ours, dtype after dtype), and printed as median [min, max]; a ratio is taken within one repeat,
between runs seconds apart, then its median [min, max] over repeats. The last lines compare our
bf16 sampler with HF generate in bf16 (like for like) and in fp32 (what a user gets by default).
HF generate runs on HF's default attention (sdpa), ours on the engine's (common._packed_decode); a
third column runs HF generate on the engine's attention too, so the attention's share is visible.

    python bench/bench_sampler.py                      # embedded Gemma, n = 1 8 16 32, fp32 and bf16
    python bench/bench_sampler.py --n 16 --top-p 0.95  # one setting
"""
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402

PROMPT = ("Question: A train leaves at 22:40 and the journey takes 95 minutes. At what time does it "
          "arrive? Give the time on a 24-hour clock.\nAnswer:")


def spread(xs, fmt=".1f"):
    """'median [min, max]' of a list."""
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", type=common.device_name, default=None)
    p.add_argument("--dtypes", nargs="+", type=common.ranged(str, lambda v: v in common.DTYPE_NAMES,
                   f"expected one of {', '.join(common.DTYPE_NAMES)}", "a dtype name"),
                   default=["float32", "bfloat16"], help="rollout dtypes to time")
    p.add_argument("--n", type=common.at_least(1), nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--new-tokens", type=common.at_least(1), default=64)
    p.add_argument("--temperature", type=common.positive, default=1.0)
    p.add_argument("--top-p", type=common.probability, default=1.0)
    p.add_argument("--repeats", type=common.at_least(1), default=3, help="timed runs per setting (median, min, max)")
    args = p.parse_args()

    model, tok = common.load_model(args.model, args.device, "float32")
    models = {dt: common.rollout_copy(model, dt) for dt in args.dtypes}
    dev = next(model.parameters()).device
    enc = tok(PROMPT, return_tensors="pt").to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, device {dev}, native bf16 on this CPU: {common.cpu_has_fast_bf16()}")
    print(f"# prompt {enc.input_ids.shape[1]} tokens, {args.new_tokens} new tokens forced, "
          f"T={args.temperature}, top_p={args.top_p}, {args.repeats} repeats: median [min, max]")

    def ours(m, n):
        t0 = time.perf_counter()
        out = common.sample(m, tok, [PROMPT], n=n, max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=0)
        sync()
        assert all(len(s.token_ids) == args.new_tokens for s in out)
        return time.perf_counter() - t0

    def hf(m, n, attention="sdpa"):
        m.set_attn_implementation(attention)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                             top_k=0, num_return_sequences=n, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
        sync()
        assert out.shape[1] - enc.input_ids.shape[1] == args.new_tokens
        t = time.perf_counter() - t0
        common.packed_decode_attention(m)       # back to the engine's attention
        return t

    for m in models.values():  # warm-up
        ours(m, 2), hf(m, 2)
    print(f"{'n':>4} {'dtype':>9} {'HF tok/s':>20} {'HF, our attention':>20} {'ours tok/s':>20} {'ours / HF':>22}")
    summary = []
    for n in args.n:
        t = {(dt, who): [] for dt in args.dtypes for who in ("hf", "hf+", "ours")}
        for _ in range(args.repeats):
            for dt, m in models.items():
                t[dt, "hf"].append(hf(m, n))
                t[dt, "hf+"].append(hf(m, n, common.DECODE_ATTENTION))
                t[dt, "ours"].append(ours(m, n))
        tokens = n * args.new_tokens
        for dt in args.dtypes:
            ratio = [h / o for h, o in zip(t[dt, "hf"], t[dt, "ours"])]
            print(f"{n:>4} {dt:>9} {spread([tokens / s for s in t[dt, 'hf']]):>20} {spread([tokens / s for s in t[dt, 'hf+']]):>20} "
                  f"{spread([tokens / s for s in t[dt, 'ours']]):>20} {spread(ratio, '.2f'):>21}x", flush=True)
        if {"float32", "bfloat16"} <= set(args.dtypes):
            summary.append(f"n={n}: ours bf16 vs HF bf16 {spread([h / o for h, o in zip(t['bfloat16', 'hf'], t['bfloat16', 'ours'])], '.2f')}x, "
                           f"vs HF fp32 {spread([h / o for h, o in zip(t['float32', 'hf'], t['bfloat16', 'ours'])], '.2f')}x, "
                           f"vs HF bf16 on our attention {spread([h / o for h, o in zip(t['bfloat16', 'hf+'], t['bfloat16', 'ours'])], '.2f')}x, "
                           f"ours bf16 vs ours fp32 {spread([f / b for f, b in zip(t['float32', 'ours'], t['bfloat16', 'ours'])], '.2f')}x")
    for line in summary:
        print("# " + line)


if __name__ == "__main__":
    common.run_main(main)
