"""The answer-format mitigation trial of pmd_distill (its rule: results/pmd-mitigation/RULE.md).

Each candidate trains sdpo on the same split and budget; only the dev questions are scored (the split's
test questions are never touched). The rule then picks one; choice.json and report.md say which.

    python bench/pmd_mitigation.py --out results/pmd-mitigation            # obstetrics, as RULE.md says
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import pmd_distill as pmd  # noqa: E402

CANDIDATES = [("reference", []), ("student-format", ["--teacher-format", "student"]), ("alpha-1", ["--alpha", "1"]),
              ("no-tail", ["--no-tail"]), ("grpo-blend", ["--grpo-blend", "0.5"])]
# --grpo-blend 0 first: the trial's baseline is SDPO as the reference runs it, whatever pmd_distill's default
TRIAL = ["--method", "sdpo", "--grpo-blend", "0", "--data", "data/obstetrics.jsonl", "--test-per-type", "4",
         "--train-per-type", "1", "--epochs", "1"]


def choose(rows: list[dict], n_rows: int) -> str:
    """RULE.md: eligible if no-answer share <= the reference's; highest accuracy; ties (< one sample)
    to the lower no-answer share, then to list order."""
    ref = rows[0]
    eligible = [r for r in rows if r["no_answer"] <= ref["no_answer"] + 1e-12]
    best = max(r["accuracy"] for r in eligible)
    tied = [r for r in eligible if best - r["accuracy"] < 1.0 / n_rows - 1e-12]
    low = min(r["no_answer"] for r in tied)
    return next(r["name"] for r in tied if r["no_answer"] <= low + 1e-12)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/pmd-mitigation")
    p.add_argument("--model", default="gemma")
    a = p.parse_args()
    out = Path(a.out)
    rows = []
    for name, flags in CANDIDATES:
        args = pmd.build_parser().parse_args(["--model", a.model, *TRIAL, *flags, "--out", str(out / name), "--resume"])
        split = pmd.make_split(args)
        trial = {"train": split["train"], "dev": split["dev"], "test": split["dev"]}    # dev only
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        common.atomic_write_json(d / "config.json", {"stage": "pmd_distill", **vars(args)})
        args.base_file = str(out / "base.json")
        common.seed_everything(args.seed)
        print(f"==== {name} ====", flush=True)
        res = pmd.train_and_evaluate(args, d, trial)
        s = res["summary"]["final"]
        rows.append({"name": name, "flags": " ".join(flags), "accuracy": s["accuracy"]["mean"],
                     "no_answer": s["no_answer"]["mean"], "acc_ci": s["accuracy"], "na_ci": s["no_answer"],
                     "vs_base": res["summary"]["final_vs_base"]})
    n_rows = res["summary"]["final"]["n_questions"] * res["summary"]["final"]["n_samples"]
    base = res["summary"]["base"]
    pick = choose(rows, n_rows)
    common.atomic_write_json(out / "choice.json", {"choice": pick, "flags": next(r["flags"] for r in rows if r["name"] == pick),
                                                   "rows": rows, "base": base})
    lines = ["# Answer-format mitigation trial (dev only; rule: RULE.md)", "",
             f"Dev: {base['n_questions']} questions x {base['n_samples']} rows. Base: accuracy {common.fmt_ci(base['accuracy'], False)}, "
             f"no answer {common.fmt_ci(base['no_answer'], False)}.", ""]
    lines += common.md_table(["candidate", "flags", "dev accuracy", "dev no-answer share", "vs base (paired)"],
                             [[r["name"], r["flags"] or "-", common.fmt_ci(r["acc_ci"], False), common.fmt_ci(r["na_ci"], False),
                               common.fmt_ci(r["vs_base"])] for r in rows])
    lines += ["", f"Chosen by the rule: **{pick}**."]
    common.write_report(out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
