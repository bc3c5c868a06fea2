"""Calibrate dream.py's default optimizer and budget on DEV ONLY, by the rule fixed in advance in
results/dream-calibration/RULE.md: the dream arm for each optimizer / lr of the grid, scored by
dev agreement with the real lesson's teacher majority (label-free), canary alarms excluded. No
evaluation question is ever sampled (measure_before and evaluate_after are not called).

    python bench/calibrate_dream.py --model gemma --cluster brill-dialect --out results/dream-calibration
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import dream  # noqa: E402

GRID = [("adamw", 1e-6), ("sgd", 1e-2)]
FALLBACK = ("adamw", 1e-6, 6)
TIE = 0.05


def choose(rows: list[dict]):
    """RULE.md: the highest dev gain among canary-ok rows; ties within TIE to fewer steps, then the
    smaller ||theta - theta0||, then grid order; nothing above 0 -> FALLBACK."""
    ok = [r for r in rows if r["canary_ok"] and r["step"] > 0]
    if not ok or max(r["gain"] for r in ok) <= 0:
        return None
    top = max(r["gain"] for r in ok)
    return min((r for r in ok if r["gain"] >= top - TIE), key=lambda r: (r["step"], r["moved"], r["grid"]))


def main():
    argv = sys.argv[1:] + ["--select", "final", "--no-controls", "--no-positive-control", "--force", "--steps", "6",
                           "--canary-every", "3"]
    args = dream.build_parser().parse_args(argv)
    questions = common.load_questions(args.data)
    spec = dream.resolve_lesson(args, questions)
    split = dream.split_inputs(args, questions, spec[1], spec[2], spec[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    run = dream.load_run(args, out, split, spec[0], {"arms": {}})
    run.ev["before"] = {"canary": None}
    can = dream.canary(run)                                    # theta0's canary: the alarm's reference
    run.ev["before"]["canary"] = None if can is None else can.tolist()
    run.canary0 = dream.boot(run, {"c": can}, lambda m: m["c"], "canary-boot") if can is not None else None
    dream.evaluate_after = lambda run, arm: arm                # dev only: no evaluation question is sampled
    rows = []
    for g, (opt, lr) in enumerate(GRID):
        args.optimizer, args.lr = opt, lr
        arm = dream.run_arm(run, f"{opt}-{lr:g}", "dream", spec[0], "teacher")
        steps = [m for m in common.read_metrics(out) if m.get("phase") == "step" and m["arm"] == arm["arm"]]
        d0 = arm["checks"][0]["dev_agreement"]
        for s, c in sorted(arm["checks"].items()):
            moved = c["distance_theta0"]
            rows.append({"grid": g, "optimizer": opt, "lr": lr, "step": s, "dev_agreement": c["dev_agreement"],
                         "gain": c["dev_agreement"] - d0, "canary": c["canary_mean"], "moved": moved,
                         "canary_ok": c["canary_mean"] is None or run.canary0 is None
                         or not np.isfinite(run.canary0["lo"]) or c["canary_mean"] >= run.canary0["lo"],
                         "step_time": float(np.mean([m["step_time"] for m in steps]))})
    pick = choose(rows)
    choice = ({"optimizer": pick["optimizer"], "lr": pick["lr"], "steps": pick["step"], "found": True} if pick
              else {"optimizer": FALLBACK[0], "lr": FALLBACK[1], "steps": FALLBACK[2], "found": False})
    common.atomic_write_json(out / "calibration.json", {"rows": rows, "choice": choice,
                                                        "dev": [q.id for q in split["dev"]]})
    lines = ["# dream.py calibration (dev only; rule: RULE.md)", "", f"Lesson: {spec[0]!r}", ""]
    lines += common.md_table(["optimizer", "lr", "step", "dev agreement", "gain over step 0", "canary", "canary ok",
                              "||theta - theta0||", "s/step (under load)"],
                             [[r["optimizer"], f"{r['lr']:g}", r["step"], f"{r['dev_agreement']:.2f}", f"{r['gain']:+.2f}",
                               "-" if r["canary"] is None else f"{r['canary']:.2f}", r["canary_ok"], f"{r['moved']:.3g}",
                               f"{r['step_time']:.1f}"] for r in rows])
    lines += ["", f"Choice: {json.dumps(choice)}" + ("" if choice["found"] else " (nothing scored above 0: the fallback)")]
    common.write_report(out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
