"""Does memory grow across GRPO steps? The paper's bug: rollouts outside no_grad kept the KV cache
in the autograd graph and reserved GPU memory went from 10.4 GB to 41 GB.

Runs the pieces of a grpo_introspect.py step for --steps steps on one question: N rollouts
(common.sample), then an update on every rollout (advantage forced to 1, so every step does a
forward and a backward; a real run skips steps with no positive advantage). Prints peak and
current memory per step, and the growth of the peak from the end of step 1 (after the first
backward has allocated gradients and activations) to the last step. Target: under 5%.

    python bench/bench_memory.py                  # CPU: peak RSS
    python bench/bench_memory.py --device cuda    # GPU: max reserved
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import grpo_introspect as g  # noqa: E402


def current_mb(device):
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device) / 2**20
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", type=common.device_name, default=None)
    p.add_argument("--dtype", choices=list(common.DTYPE_NAMES), default=None)
    p.add_argument("--data", default="data/procedural.jsonl")
    p.add_argument("--steps", type=common.at_least(1), default=20)
    p.add_argument("--N", type=common.at_least(1), default=4)
    p.add_argument("--max-new-tokens", type=common.at_least(1), default=48)
    p.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=True,
                   help="force every rollout to --max-new-tokens (default) or let them stop as in training")
    args = p.parse_args()
    if not os.path.exists(args.data):
        raise common.UserError(f"--data {args.data}: no such data file")
    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev = next(model.parameters()).device
    q = common.load_questions(args.data)[0]
    prompt = common.question_prompt(tok, q, instruction=g.INTROSPECT_HINT)
    prompt_ids = common.encode(tok, prompt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.0)
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"device {dev}, dtype {next(model.parameters()).dtype}; N={args.N}, {args.max_new_tokens} new tokens, "
          f"an update every step, fixed length: {args.fixed_length}")
    print(f"{'step':>4} {'seconds':>8} {'peak MB':>9} {'current MB':>11}")
    peaks = []
    for step in range(args.steps):
        t0 = time.time()
        # Every step has the same shapes (length forced, no stop), so the peak can only grow by
        # retention; with sampled lengths it also tracks the longest batch seen so far.
        stop, min_len = (None, args.max_new_tokens) if args.fixed_length else (g.ROLLOUT_STOP, 0)
        out = common.sample(model, tok, [prompt], n=args.N, max_new_tokens=args.max_new_tokens,
                            min_new_tokens=min_len, temperature=0.7, stop=stop, seed=step)
        comp = [s.token_ids for s in out]
        lp = common.token_logprobs(model, [prompt_ids] * args.N, comp, temperature=0.7, pad_id=tok.pad_token_id)
        loss = g.pg_loss(lp["logprobs"], lp["mask"], torch.ones(args.N, device=dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(common.peak_memory_mb(dev))
        print(f"{step + 1:>4} {time.time() - t0:>8.1f} {peaks[-1]:>9.0f} {current_mb(dev):>11.0f}", flush=True)
    growth = (peaks[-1] - peaks[0]) / peaks[0]
    print(f"peak memory growth from step 1 to step {args.steps}: {growth:+.1%} (target: under +5%)")
    if args.steps > 3:   # the allocator keeps pages freed by the first backward passes
        print(f"after a 3-step warm-up (step 3 to {args.steps}): {(peaks[-1] - peaks[2]) / peaks[2]:+.2%}")


if __name__ == "__main__":
    common.run_main(main)
