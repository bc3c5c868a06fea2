"""The learning-rate sweep behind sft_recall.py's default --lr, on a finished run's own data.

Takes a finished `sft_recall.py` run folder (its config, split, selection, labels and the exact SFT
examples) and, for each --lrs value, trains the base model on those examples exactly as the run
did (same epochs, batch, warmup, clip; only the lr differs), then measures what may choose an lr:
nothing held out is touched.

- dev loss: the recall-SFT loss (decision + recall block + EOS tokens) on the dev questions, which
  are never trained on: recall rows with r* for recall-labelled dev questions, plain rows (the
  decision token of the gold answer) for the others;
- dev recall rate on the recall-labelled and on the plain dev questions, at the threshold tuned
  on dev as the run tunes it (so optimistic, alike for every lr);
- forgetting: the canary (other clusters) answered free after training, paired row by row with the
  base model's canary answers in the run's eval_base.json (same seed stream), with a 95% interval
  clustered by question.

The rule, fixed before looking: among the lrs whose canary change interval does not lie wholly below
0, the lowest dev loss; ties to the smaller lr.

    python bench/sweep_sft_lr.py --run runs/sft-default --lrs 1e-5 3e-5 1e-4 3e-4
"""
import json
import os
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import sft_recall as s  # noqa: E402


def dev_loss(model, tok, rows, args) -> dict:
    """Mean NLL over the trained roles of held-apart SFT rows (token-level, like the training loss)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(rows), args.batch_size):
            batch = rows[b:b + args.batch_size]
            lp = common.token_logprobs(model, [e["prompt_ids"] for e in batch], [e["completion_ids"] for e in batch],
                                       pad_id=tok.pad_token_id)["logprobs"]
            mask = s.role_mask(batch, "dre", lp.shape[1]).to(lp.device)
            total += float(-(lp * mask).sum())
            n += int(mask.sum())
    return {"loss": total / n if n else None, "tokens": n}


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished sft_recall.py run folder")
    p.add_argument("--lrs", type=common.positive, nargs="+", default=[1e-5, 3e-5, 1e-4, 3e-4])
    p.add_argument("--out", default=None, help="where sweep.json and sweep.md go (default: the run folder)")
    a = p.parse_args()
    run = Path(a.run)
    for f in ("config.json", "selection.json", "labels.json", "sft_data.jsonl", "eval_base.json"):
        if not (run / f).exists():
            raise common.UserError(f"--run {run}: no {f} (not a finished sft_recall.py run)")
    cfg = json.loads((run / "config.json").read_text())
    args = Namespace(**{k: v for k, v in cfg.items() if k not in ("stage", "argv")})
    args.resume = False
    args.rollout_dtype = getattr(args, "rollout_dtype", None)      # runs made before the precision policy
    out = Path(a.out) if a.out else run
    out.mkdir(parents=True, exist_ok=True)

    questions = common.load_questions(args.data)
    split = s.split_questions(questions, args.holdout, args.dev, args.seed)
    labels = json.loads((run / "labels.json").read_text())
    examples = [json.loads(ln) for ln in (run / "sft_data.jsonl").read_text().splitlines()]
    selection = common.load_bank(run / "selection.json", s.SELECTION_KIND)
    rstar = {f"{e['cluster']}/{e['subtype']}" if e["subtype"] else e["cluster"]: e for e in selection["entries"]}
    base = json.loads((run / "eval_base.json").read_text())
    canary = s.spread(common.load_questions(args.canary), args.canary_questions) if args.canary else []
    assert all(split[e["question_id"]] == "train" for e in examples), "SFT rows must all be training questions"

    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev = [q for q in questions if split[q.id] == "dev" and labels[q.id]["label"] != "left_out"]
    dev_rec = [q for q in dev if labels[q.id]["label"] == "recall"]
    dev_rows = [s.make_example(tok, q, rstar[s.type_key(q)]["lesson"] if q in dev_rec else None,
                               s.gold_text(q), args) for q in dev]
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"sweep over lr {a.lrs} on {len(examples)} SFT rows of {run}; dev {len(dev)} questions "
          f"({len(dev_rec)} recall), canary {len(canary)}")

    results = [{"lr": 0.0, "dev": dev_loss(model, tok, dev_rows, args), "note": "the base model"}]
    for lr in a.lrs:
        t0 = time.time()
        model.load_state_dict(theta0)
        s.set_trainable(model, args)
        args.lr = lr
        with tempfile.TemporaryDirectory() as tmp:
            s.train_sft(model, tok, examples, args, Path(tmp), Path(tmp) / "metrics.jsonl", f"lr {lr:g}")
            train = [json.loads(ln) for ln in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        model.eval()
        res = {"lr": lr, "train_loss_last": train[-1]["loss"], "dev": dev_loss(model, tok, dev_rows, args)}
        p_dev = s.p_recall(model, tok, dev)
        lab = np.array([q in dev_rec for q in dev], bool)
        tau = s.tune_threshold(p_dev, lab)                     # as the run does: tuned on dev
        res["tau"] = tau
        res["dev_recall_rate"] = {"recall": float((p_dev[lab] >= tau).mean()) if lab.any() else None,
                                  "plain": float((p_dev[~lab] >= tau).mean()) if (~lab).any() else None}
        if canary:
            roll = common.rollout_copy(model, args.rollout_dtype)
            free = s.run_free(model, tok, canary, args.eval_samples, args, tau, progress=f"canary lr {lr:g}", roll=roll)
            del roll
            after = [np.asarray(r["c"], float) for r in free]
            before = [np.asarray(base["canary"][q.id]["a"], float) for q in canary]
            res["canary_before"] = common.cluster_bootstrap_ci(before, seed=args.seed)
            res["canary_after"] = common.cluster_bootstrap_ci(after, seed=args.seed)
            res["canary_change"] = common.cluster_bootstrap_ci([x - y for x, y in zip(after, before)], seed=args.seed)
        res["seconds"] = time.time() - t0
        results.append(res)
        print(f"lr {lr:g}: dev loss {res['dev']['loss']:.3f}, canary change "
              f"{common.fmt_ci(res['canary_change']) if canary else '-'}, {res['seconds']:.0f} s")

    ok = [r for r in results[1:] if not canary or r["canary_change"]["hi"] >= 0]
    chosen = min(ok, key=lambda r: (r["dev"]["loss"], r["lr"]))["lr"] if ok else None
    common.atomic_write_json(out / "sweep.json", {"run": str(run), "lrs": a.lrs, "chosen": chosen,
                                                  "rule": "lowest dev loss among lrs without significant forgetting",
                                                  "results": results, "argv": common.command_line()})
    L = [f"# Recall-SFT learning-rate sweep on `{run}`", "", f"`{common.command_line()}`", "",
         f"Same {len(examples)} SFT rows, epochs {args.epochs}, batch {args.batch_size}, warmup {args.warmup}, "
         f"clip {args.clip}; dev: {len(dev)} questions never trained on ({len(dev_rec)} recall-labelled); "
         f"canary: {len(canary)} questions x {args.eval_samples} samples from `{args.canary}`, paired with the base.",
         "", "| lr | last train loss | dev loss (tokens) | dev recall rate: recall / plain | canary after | "
         "canary change (95% CI, clustered by question) | seconds |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["lr"] == 0.0:
            L.append(f"| base | - | {r['dev']['loss']:.3f} ({r['dev']['tokens']}) | - | "
                     f"{common.fmt_ci(results[1]['canary_before'], False) if canary and len(results) > 1 else '-'} | - | - |")
            continue
        rr = r["dev_recall_rate"]
        L.append(f"| {r['lr']:g} | {r['train_loss_last']:.3f} | {r['dev']['loss']:.3f} ({r['dev']['tokens']}) | "
                 f"{fmt_rate(rr['recall'])} / {fmt_rate(rr['plain'])} | "
                 f"{common.fmt_ci(r['canary_after'], False) if canary else '-'} | "
                 f"{common.fmt_ci(r['canary_change']) if canary else '-'} | {r['seconds']:.0f} |")
    L += ["", "Rule (fixed in advance): among the lrs whose canary change interval does not lie wholly below 0, "
          "the lowest dev loss; ties to the smaller lr.", "",
          f"Chosen: **{chosen:g}**" if chosen is not None else "Chosen: none (every lr forgets significantly)"]
    (out / "sweep.md").write_text("\n".join(L) + "\n")
    print(f"chosen lr: {chosen}\nsweep: {out / 'sweep.md'}")


def fmt_rate(x):
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    common.run_main(main)
