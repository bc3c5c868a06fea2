"""The sweep behind grpo_introspect.py's default --preset, on dev-only quantities.

One run of grpo_introspect.py per preset, all with the same seed (so the same questions in the same
order) and --eval-on dev: the before/after evaluation reads only the dev facts (one held-out fact
per type, never a Q or Q' of training and never an evaluation fact) and the canary (dev questions
too). The evaluation facts are never read. Then the rule of results/grpo-optimizer-sweep/RULE.md,
written and committed before any run, picks the default (choose() below).

The step-0 measurement is taken once, in the first preset's run, and copied into the others before
they start (seed_before): the base weights, the seeds and the dev questions are the same, so each
run would measure the same thing again (on the 2-core CPU that saves ~6 min a run under load).

    python bench/sweep_grpo_optimizer.py --steps 8 --runs runs/grpo-sweep --out results/grpo-optimizer-sweep
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import grpo_introspect as g  # noqa: E402

KEEP = ("config.json", "split.json", "metrics.jsonl", "library.json", "eval.json", "report.md", "time.txt")
RATE, CLOSED = "introspection rate", "closed the tag (share of opened)"
A, GAP = "A_intro on a same-fact Q'", "log-prob gap, type's lesson - wrong lesson (nats)"


def bound(ci, side):
    """The interval's bound, or None where there is none (a note): then it is neither > 0 nor < 0."""
    x = ci.get(side) if ci else None
    return None if x is None or ci.get("note") or not np.isfinite(x) else float(x)


def choose(runs: dict) -> tuple[str, list[str]]:
    """RULE.md, step by step. runs: preset -> {"changes": eval.json's changes, "alarm": bool, "dtheta": float}."""
    log, ok = [], []
    for p, r in runs.items():
        hi_rate, hi_closed = bound(r["changes"][RATE]["change"], "hi"), bound(r["changes"][CLOSED]["change"], "hi")
        why = [w for w, bad in (("canary alarm", r["alarm"]), ("introspection rate fell", hi_rate is not None and hi_rate < 0),
                                ("closed share fell", hi_closed is not None and hi_closed < 0)) if bad]
        log.append(f"1. {p}: " + (", ".join(why) + " -> out" if why else "passes the safety step"))
        if not why:
            ok.append(p)
    for step, key in ((2, A), (3, GAP)):
        lows = {p: bound(runs[p]["changes"].get(key, {}).get("change"), "lo") for p in ok}
        log.append(f"{step}. lower bound of the change in {key}: " + ", ".join(f"{p} {'none' if v is None else f'{v:+.3f}'}" for p, v in lows.items()))
        pos = [p for p, v in lows.items() if v is not None and v > 0]
        if pos:
            best = max(pos, key=lambda p: (lows[p], -runs[p]["dtheta"]))
            log.append(f"   -> {best}")
            return best, log
    log.append("4. no preset's change is distinguishable from zero on dev -> paper stays the default")
    return "paper", log


def seed_before(first: Path, d: Path, preset: str) -> None:
    """d's config.json as its own fresh run would write it, and eval.json holding first's step-0
    measurement; the run then starts with --resume (no checkpoint: from step 0, the before kept)."""
    cfg = json.loads((first / "config.json").read_text())
    opt, lr, clip = g.PRESETS[preset]
    argv = cfg["argv"].replace(f"--preset {cfg['preset']}", f"--preset {preset}").replace(str(first), str(d))
    d.mkdir(parents=True, exist_ok=True)
    common.atomic_write_json(d / "config.json", {**cfg, "preset": preset, "optimizer": opt, "lr": lr, "clip": clip,
                                                 "out": str(d), "argv": argv})
    common.atomic_write_json(d / "eval.json", {"before": json.loads((first / "eval.json").read_text())["before"]})


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", choices=list(g.PRESETS), default=list(g.PRESETS))
    p.add_argument("--steps", type=common.at_least(1), default=8)
    p.add_argument("--runs", default="runs/grpo-sweep", help="run folders (checkpoints: keep out of git)")
    p.add_argument("--out", default="results/grpo-optimizer-sweep")
    p.add_argument("--extra", default="--transfer-by fact", help="flags every run gets (RULE.md)")
    a = p.parse_args()
    runs, out = {}, Path(a.out)
    for preset in a.presets:
        d, first = Path(a.runs) / preset, Path(a.runs) / a.presets[0]
        if preset != a.presets[0] and not (d / "config.json").exists():
            seed_before(first, d, preset)
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else {}
        if "changes" not in ev or ev["after"]["step"] != a.steps:         # not run, or run for fewer steps
            cmd = [sys.executable, "grpo_introspect.py", "--model", "gemma", "--preset", preset, "--eval-on", "dev",
                   "--steps", str(a.steps), "--out", str(d), *a.extra.split()] + (["--resume"] if (d / "config.json").exists() else [])
            print(" ".join(cmd), flush=True)
            d.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["/usr/bin/time", "-v", "-o", str(d.parent / f"{preset}.time.txt")] + cmd, check=True)
            shutil.move(str(d.parent / f"{preset}.time.txt"), d / "time.txt")
        metrics = common.read_metrics(d)
        moves = [m["weight_change"]["norm"] for m in metrics if m.get("weight_change")]
        runs[preset] = {"changes": json.loads((d / "eval.json").read_text())["changes"],
                        "alarm": any(m.get("canary_alarm") for m in metrics), "dtheta": float(np.mean(moves)) if moves else 0.0,
                        "moves": moves, "moved_share": [m["weight_change"]["frac_changed"] for m in metrics if m.get("weight_change")],
                        "updates": len(moves), "step_time": [round(m["step_time"], 1) for m in metrics]}
        (out / preset).mkdir(parents=True, exist_ok=True)
        for f in KEEP:
            if (d / f).exists():
                shutil.copy(d / f, out / preset / f)
    best, log = choose(runs)
    fmt = common.fmt_ci
    lines = [f"# Optimizer sweep: {a.steps} steps per preset, dev questions only", "",
             f"`python bench/sweep_grpo_optimizer.py --steps {a.steps} --extra '{a.extra}'`; the rule: RULE.md "
             "(committed before the runs). Paired changes (end - step 0) on the dev facts, 95% paired bootstrap.", ""]
    rows = [[pr, r["updates"], f"{min(r['moves']):.1e} to {max(r['moves']):.1e}" if r["moves"] else "-",
             f"{min(r['moved_share']):.0%} to {max(r['moved_share']):.0%}" if r["moves"] else "-", "yes" if r["alarm"] else "no"]
            + [fmt(r["changes"][k]["change"]) if k in r["changes"] else "-" for k, _, _ in g.MEASURES] for pr, r in runs.items()]
    lines += common.md_table(["preset", "updates", "||dtheta|| per update", "weights moved", "canary alarm"]
                             + [k for k, _, _ in g.MEASURES], rows)
    lines += ["", "## The rule applied", ""] + [f"    {x}" for x in log] + ["", f"**Chosen: {best}**"]
    common.atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    common.atomic_write_json(out / "sweep.json", {"steps": a.steps, "extra": a.extra, "chosen": best, "log": log,
                                                  "runs": {k: {x: v[x] for x in ("alarm", "dtheta", "moves", "moved_share", "updates", "step_time")}
                                                           for k, v in runs.items()}})
    print("\n".join(log) + f"\nchosen: {best}")


if __name__ == "__main__":
    common.run_main(main)
