"""Paired contrasts between finished pmd_distill runs that share a split and evaluation seeds.

Each run folder holds eval.json; runs made with the same --data, --test-per-type, --seed and
--eval-samples score the same held-out rows (the same questions, option rotations and row seeds),
so any two can be compared row by row, as --compare does within one folder. Refuses runs whose
held-out questions or row counts differ.

    python bench/pmd_contrast.py --ref results/pmd-compare-procedural-default/pmd \\
        results/pmd-followups/seed-memory results/pmd-followups/reflector-self --out results/pmd-followups
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import pmd_distill as pmd  # noqa: E402


def load(folder: Path) -> dict:
    path = folder / "eval.json"
    if not path.exists():
        raise common.UserError(f"{path}: no such file (not a finished pmd_distill run)")
    return json.loads(path.read_text())


def rows(res: dict, where: str) -> list[dict]:
    return res[where]["test"] if where == "base" else res["final"]["test"]


def contrasts(ref: Path, runs: list[Path], seed: int = 0) -> list[list[str]]:
    """One table row per run: its accuracy, no-answer share, training control, and run - ref and
    run - base on the held-out rows, paired."""
    r = load(ref)
    table = []
    for folder in runs:
        e = load(folder)
        a, b, base = rows(e, "final"), rows(r, "final"), rows(r, "base")
        if [p["id"] for p in a] != [p["id"] for p in b] or [len(p["rewards"]) for p in a] != [len(p["rewards"]) for p in b]:
            raise common.UserError(f"{folder}: its held-out rows differ from {ref}'s (another split or --eval-samples)")
        if [p["rewards"] for p in rows(e, "base")] != [p["rewards"] for p in base]:
            raise common.UserError(f"{folder}: its starting model scored other rewards than {ref}'s on the same rows "
                                   "(other evaluation seeds or another model): not paired")
        s = e["summary"]
        table.append([folder.name, ", ".join(f"{k} {v}" for k, v in e["settings"].items() if v != r["settings"].get(k)) or "-",
                      pmd.fmt(s["final"]["accuracy"]), pmd.fmt(s["final"]["no_answer"]), pmd.fmt(s["train_control"], True),
                      pmd.fmt(pmd.contrast(a, base, seed), True), pmd.fmt(pmd.contrast(a, b, seed), True)])
    return table


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders to compare with --ref")
    p.add_argument("--ref", type=Path, required=True, help="the reference run folder")
    p.add_argument("--out", type=Path, default=None, help="write contrasts.md here (else print it)")
    a = p.parse_args()
    lines = [f"# Paired contrasts against {a.ref}", "",
             "Held-out rows paired by question, option rotation and sample; 95% paired bootstrap.", ""]
    lines += common.md_table(["run", "settings that differ from the reference", "accuracy", "no answer",
                              "training control", "run - base", "run - reference"], contrasts(a.ref, a.runs))
    text = "\n".join(lines) + "\n"
    if a.out:
        common.atomic_write_text(a.out / "contrasts.md", text)
        print(f"wrote {a.out / 'contrasts.md'}")
    else:
        print(text)


if __name__ == "__main__":
    common.run_main(main)
