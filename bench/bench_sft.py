"""One SFT step with sft_recall.py's loss against the plain Hugging Face loss, in one run.

Same fixed batch (B rows of T tokens, the last C of each row trained, EOS included), same model:
  ours  common.token_logprobs (the LM head and log-softmax only at trained positions, in
        checkpointed chunks) + sft_recall.sft_loss (token-level mean), backward, clip, AdamW step
  hf    model(input_ids, labels=...) with -100 on prompt positions (full (B, T, V) logits), the
        same backward, clip and AdamW step
Checks that the two losses and gradient norms agree, then reports peak memory above the loaded
model (CPU: VmHWM after resetting it through /proc/self/clear_refs; CUDA: max allocated) and the
time per step; median of --repeats, with min and max. Goals: memory ratio ours/hf at most 0.6,
time ratio no more than 1.1.

    python bench/bench_sft.py                        # embedded Gemma, 8 x 256 tokens, CPU
    python bench/bench_sft.py --device cuda --repeats 5
"""
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import sft_recall  # noqa: E402


def rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field)) / 1024


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev) / 2**20
    with open("/proc/self/clear_refs", "w") as f:      # "5": reset the peak RSS (VmHWM) to now
        f.write("5")
    return rss_mb()


def peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return rss_mb("VmHWM")


def step_ours(model, prompt_ids, comp_ids, pad_id):
    lp = common.token_logprobs(model, prompt_ids, comp_ids, pad_id=pad_id)
    return sft_recall.sft_loss(lp["logprobs"], lp["mask"])


def step_hf(model, prompt_ids, comp_ids, pad_id):
    ids = torch.tensor([p + c for p, c in zip(prompt_ids, comp_ids)])
    labels = ids.clone()
    labels[:, :len(prompt_ids[0])] = -100                  # by position: the EOS (= pad) stays trained
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), labels=labels.to(dev), use_cache=False).loss


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--device", type=common.device_name, default=None)
    p.add_argument("--dtype", choices=list(common.DTYPE_NAMES), default=None)
    p.add_argument("--batch", type=common.at_least(1), default=8)
    p.add_argument("--tokens", type=int, default=256, help="tokens per row (prompt + completion); at least --trained + 1")
    p.add_argument("--trained", type=common.at_least(1), default=64, help="trained (completion) tokens per row")
    p.add_argument("--repeats", type=common.at_least(1), default=3)
    args = p.parse_args()
    if args.tokens < args.trained + 1:                    # at least one prompt token before the trained ones
        raise common.flag_error("tokens", args.tokens, f"must be at least {args.trained + 1}")
    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev = next(model.parameters()).device
    model.get_input_embeddings().weight.requires_grad_(False)   # as sft_recall.py trains by default
    params = [x for x in model.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)               # lr 0: every repeat sees the same weights
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    rows = torch.randint(3, min(V, 50000), (args.batch, args.tokens), generator=g).tolist()
    prompt_ids = [r[:args.tokens - args.trained] for r in rows]
    comp_ids = [r[args.tokens - args.trained:-1] + [tok.eos_token_id] for r in rows]
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, device {dev}, "
          f"dtype {next(model.parameters()).dtype}; batch {args.batch} x {args.tokens} tokens, {args.trained} trained per row")
    res = {"ours": {"s": [], "mb": []}, "hf": {"s": [], "mb": []}}
    check = {}
    for rep in range(args.repeats + 1):                   # repeat 0 is a warm-up, not counted
        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            base = reset_peak(dev)
            t0 = time.time()
            loss = fn(model, prompt_ids, comp_ids, tok.pad_token_id)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.time() - t0
            check[name] = (loss.item(), gn)
            if rep:
                res[name]["s"].append(dt)
                res[name]["mb"].append(peak(dev) - base)
            print(f"repeat {rep} {name:>4}: loss {loss.item():.5f}  grad norm {gn:.4f}  {dt:6.2f} s  "
                  f"peak +{peak(dev) - base:7.0f} MB", flush=True)
    (lo, go), (lh, gh) = check["ours"], check["hf"]
    print(f"parity: loss ours {lo:.6f} vs hf {lh:.6f} (diff {abs(lo - lh):.2e}); "
          f"grad norm {go:.5f} vs {gh:.5f} (rel diff {abs(go - gh) / max(gh, 1e-12):.2e})")
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in res.items()}
    for k in res:
        print(f"{k:>4}: time median {med[k]['s']:.2f} s (min {min(res[k]['s']):.2f}, max {max(res[k]['s']):.2f}); "
              f"peak memory above the model median {med[k]['mb']:.0f} MB (min {min(res[k]['mb']):.0f}, "
              f"max {max(res[k]['mb']):.0f})")
    ratio = med["ours"]["mb"] / med["hf"]["mb"] if med["hf"]["mb"] > 0 else float("nan")
    print(f"memory ratio ours/hf {ratio:.2f} (goal <= 0.6); "
          f"time ratio ours/hf {med['ours']['s'] / med['hf']['s']:.2f} (goal <= 1.1)")


if __name__ == "__main__":
    common.run_main(main)
