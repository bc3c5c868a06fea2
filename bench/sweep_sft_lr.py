"""The learning-rate sweep behind sft_recall.py's default --lr, on a run's own SFT rows.

Takes a sft_recall.py run folder whose data phase is done (config.json, split.json, selection.json,
labels.json, sft_data.jsonl) and, for each --lrs value, trains the base model on those rows exactly
as the run does (sft_recall.train: same epochs, batch, warmup, clip; only the lr differs). It
measures only what may choose an lr; nothing the run reports is touched:

- dev loss: the recall-SFT loss (recall block + closing tag + EOS tokens, and the decision on the
  recall-opening token) on the dev questions (text-disjoint from train and held-out): recall rows
  with r* for recall-labelled dev questions, plain rows for the others;
- forgetting on split.json's "canary_select" questions, a set disjoint (by text) from the "canary"
  set the run reports: the trained model with the recall opening masked (the run's arm d), paired
  row by row with the base model on a seed stream of the sweep's own ("sweep-canary");
- the spurious recall rate there (p(open) >= the threshold tuned on dev), reported, not used.

The rule is in results/sft-lr-sweep-v2/RULE.md, committed before the sweep ran: among the lrs whose
canary_select change interval does not lie wholly below 0, the lowest dev loss; ties to the smaller lr.

    python bench/sweep_sft_lr.py --run runs/sft-default --lrs 1e-5 3e-5 1e-4 --out runs/sft-lr-sweep-v2
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

NEEDED = ("config.json", "split.json", "selection.json", "labels.json", "sft_data.jsonl")


@torch.no_grad()
def dev_loss(model, tok, rows, batch_size) -> dict:
    """The training loss on held-apart rows: token-level, each row's decision one more token."""
    total, n = 0.0, 0
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        lp, lp_open = s.batch_logprobs(model, tok, batch)
        up = torch.tensor([e["kind"] == "recall" for e in batch], device=lp.device)
        mask = s.role_mask(batch, "re", lp.shape[1]).to(lp.device)
        k = int(mask.sum()) + len(batch)
        total += float(s.sft_loss(lp, mask, lp_open, up)) * k
        n += k
    return {"loss": total / n if n else None, "tokens": n}


def canary_rows(roll, tok, args, qs, ban=()):
    """(Q, n) rewards on the canary_select questions, plain prompt (the opening ids in `ban`
    masked at the decision slot, as arm d), on the sweep's own seed stream."""
    with s.recall_banned(roll, set(ban)):
        return common.score(roll, tok, qs, [common.question_prompt(tok, q) for q in qs], args.canary_samples,
                            args.seed, "sweep-canary", **s.sampling(args)).rewards


def build_rows(tok, args, dev, labels, rstar):
    return [s.make_example(tok, q, rstar[s.type_key(q)]["lesson"] if labels[q.id]["label"] == "recall" else None,
                           s.gold_text(q), args) for q in dev]


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a sft_recall.py run folder whose data phase is done")
    p.add_argument("--lrs", type=common.positive, nargs="+", default=[1e-5, 3e-5, 1e-4])
    p.add_argument("--epochs", type=common.at_least(1), default=None, help="default: the run's")
    p.add_argument("--canary-samples", type=common.at_least(1), default=2)
    p.add_argument("--out", default=None, help="where sweep.json and sweep.md go (default: the run folder)")
    a = p.parse_args()
    run = Path(a.run)
    for f in NEEDED:
        if not (run / f).exists():
            raise common.UserError(f"--run {run}: no {f} (not a finished sft_recall.py run); its data phase must be done")
    cfg = json.loads((run / "config.json").read_text())
    args = Namespace(**{k: v for k, v in cfg.items() if k not in ("stage", "argv")})
    args.resume, args.canary_samples = False, a.canary_samples
    args.epochs = a.epochs or args.epochs
    out = Path(a.out) if a.out else run
    out.mkdir(parents=True, exist_ok=True)
    split, labels = (json.loads((run / f).read_text()) for f in ("split.json", "labels.json"))
    examples = common.read_jsonl(run / "sft_data.jsonl")
    rstar = {s.type_key(e): e for e in common.load_bank(run / "selection.json", s.SELECTION_KIND)["entries"]}
    questions = {q.id: q for q in common.load_questions(args.data)}
    dev = [questions[i] for i in split["dev"] if labels[i]["label"] != "left_out"]
    canary = {q.id: q for q in common.load_questions(args.canary)} if args.canary else {}
    sel_qs = [canary[i] for i in split["canary_select"]]
    assert not set(split["canary_select"]) & set(split["canary"]), "the selection canary must not be the reported one"
    assert all(e["question_id"] in set(split["train"]) for e in examples), "SFT rows must all be training questions"

    model, tok = common.load_model(args.model, args.device, args.dtype)
    dev_rows = build_rows(tok, args, dev, labels, rstar)
    roll = common.rollout_copy(model, args.rollout_dtype)
    results = [{"lr": 0.0, "dev": dev_loss(model, tok, dev_rows, args.batch_size), "note": "the base model"}]
    before = canary_rows(roll, tok, args, sel_qs) if sel_qs else None
    del model, roll
    print(f"sweep over lr {a.lrs} on {len(examples)} SFT rows of {run}, {args.epochs} epochs; dev {len(dev)} questions "
          f"({sum(labels[q.id]['label'] == 'recall' for q in dev)} recall); canary_select {len(sel_qs)} x {a.canary_samples}")
    for lr in a.lrs:
        t0, args.lr = time.time(), lr
        with tempfile.TemporaryDirectory() as tmp:
            policy = s.train(args, Path(tmp), examples, tag=f"lr {lr:g}")
            train_rows = common.read_metrics(tmp)
        res = {"lr": lr, "train_loss_last": train_rows[-1]["loss"], "dev": dev_loss(policy.model, tok, dev_rows, args.batch_size)}
        lab = np.array([labels[q.id]["label"] == "recall" for q in dev], bool)
        res["tau"] = s.tune_threshold(s.p_recall(policy.model, tok, dev), lab)
        if sel_qs:
            after = canary_rows(policy.rollout, tok, args, sel_qs, {s.open_id(tok, s.prompt_parts(tok, q)[0]) for q in sel_qs})
            res["canary_change"] = common.paired_bootstrap({"after": after, "before": before},
                                                           lambda m: m["after"] - m["before"], seed=args.seed)
            res["canary_after"] = common.paired_bootstrap({"x": after}, lambda m: m["x"], seed=args.seed)
            res["spurious_recall"] = float((s.p_recall(policy.model, tok, sel_qs) >= res["tau"]).mean())
        res["seconds"] = time.time() - t0
        results.append(res)
        del policy
        print(f"lr {lr:g}: dev loss {res['dev']['loss']:.3f}, canary_select change "
              f"{common.fmt_ci(res['canary_change']) if sel_qs else '-'}, {res['seconds']:.0f} s", flush=True)
        write(out, run, a, args, results, before, len(examples), len(dev), len(sel_qs))


def write(out, run, a, args, results, before, n_rows, n_dev, n_sel):
    ok = [r for r in results[1:] if "canary_change" not in r or not r["canary_change"]["hi"] < 0]
    chosen = min(ok, key=lambda r: (r["dev"]["loss"], r["lr"]))["lr"] if ok else None
    common.atomic_write_json(out / "sweep.json", {"run": str(run), "lrs": a.lrs, "epochs": args.epochs, "chosen": chosen,
                                                  "rule": "results/sft-lr-sweep-v2/RULE.md", "results": results,
                                                  "argv": common.command_line()})
    f = common.fmt_ci
    base_acc = f(common.paired_bootstrap({"x": before}, lambda m: m["x"]), False) if before is not None else "-"
    L = [f"# Recall-SFT learning-rate sweep on `{run}`", "", f"`{common.command_line()}`", "",
         f"{n_rows} SFT rows, {args.epochs} epochs, batch {args.batch_size}, warmup {args.warmup}, clip {args.clip}; dev: "
         f"{n_dev} questions never trained on; canary_select: {n_sel} questions x {a.canary_samples} samples "
         f"(disjoint from the reported canary), recall opening masked, paired with the base ({base_acc}).", ""]
    L += common.md_table(["lr", "last train loss", "dev loss (tokens)", "canary_select after", "change (paired)",
                          "spurious recall", "seconds"],
                         [["base", "-", f"{r['dev']['loss']:.3f} ({r['dev']['tokens']})", base_acc, "-", "-", "-"] if r["lr"] == 0 else
                          [f"{r['lr']:g}", f"{r['train_loss_last']:.3f}", f"{r['dev']['loss']:.3f} ({r['dev']['tokens']})",
                           f(r.get("canary_after"), False), f(r.get("canary_change")), f"{r.get('spurious_recall', float('nan')):.2f}",
                           f"{r['seconds']:.0f}"] for r in results])
    L += ["", "Rule (RULE.md, fixed in advance): among the lrs whose canary_select change interval does not lie wholly "
          "below 0, the lowest dev loss; ties to the smaller lr.", "",
          f"Chosen: **{chosen:g}**" if chosen is not None else "Chosen: none (every lr forgets significantly)"]
    (out / "sweep.md").write_text("\n".join(L) + "\n")
    print(f"chosen lr so far: {chosen}\nsweep: {out / 'sweep.md'}")


if __name__ == "__main__":
    common.run_main(main)
