"""Calibrate question sets on a model: does each cluster's known-good lesson change its accuracy?

For every question, S samples in each of three arms, with the same row seeds in every arm (paired
sampling, so arm differences are not drowned in sampling noise):
    (a) base       the question alone
    (b) lesson     the cluster's (sub-type's) own `lesson` injected before the question
    (c) unrelated  the lesson of another cluster of the same file injected (a null lesson)
Reported per cluster/sub-type: each accuracy, the oracle advantage (b - a) and the null advantage
(c - a), each with a 95% interval from a two-stage bootstrap (resample questions, then samples
within each question; arms resampled jointly so the pairing is kept). The interval is wider than a
Wilson interval over all samples, honestly: samples of one question are not independent.

Verdict per row: `signal` when the base accuracy is within [10%, 80%] and the lesson arm's interval
lies wholly above the base arm's; `weak` when only the oracle advantage's interval is above 0;
`none` otherwise.

    python data/calibrate.py --data data/procedural.jsonl data/obstetrics.jsonl --samples 8     # as data/calibration.md (16 before 2026-12-02)
"""
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

ARMS = ("base", "lesson", "unrelated")


def unrelated_lessons(questions):
    """For each question, the lesson of the next cluster (sorted, cyclic) that is not one of its
    own or its components': a lesson of the same file that should not help."""
    first = {}
    for q in questions:
        first.setdefault(q.cluster, q.lesson)
    clusters = sorted(c for c, lesson in first.items() if lesson)
    out = []
    for q in questions:
        own = {q.cluster} | {c.split("/")[0] for c in q.meta.get("components", [])}
        i = clusters.index(q.cluster) if q.cluster in clusters else -1
        order = clusters[i + 1:] + clusters[:i + 1]
        out.append(first[next(c for c in order if c not in own)])
    return out


def bootstrap(arms: dict, B: int, rng) -> dict:
    """arms: name -> (Q, S) rewards with rows paired across arms. Returns means and 95% intervals
    of each arm and of lesson - base and unrelated - base, resampling questions then samples."""
    Q, S = next(iter(arms.values())).shape
    qi = rng.integers(0, Q, (B, Q))                                   # (B, Q)
    si = rng.integers(0, S, (B, Q, S))                                # (B, Q, S)
    boot = {k: v[qi[:, :, None], si].mean(axis=(1, 2)) for k, v in arms.items()}   # (B,)
    point = {k: float(v.mean()) for k, v in arms.items()}
    for adv, arm in (("oracle_adv", "lesson"), ("null_adv", "unrelated")):
        if arm in arms:                                               # a set without lessons has base only
            boot[adv], point[adv] = boot[arm] - boot["base"], point[arm] - point["base"]
    return {k: {"mean": point[k], "lo": float(np.percentile(boot[k], 2.5)),
                "hi": float(np.percentile(boot[k], 97.5)), "n": Q * S} for k in point}


def verdict(r) -> str:
    if "lesson" not in r:
        return "base only (no lessons)"
    in_range = 0.10 <= r["base"]["mean"] <= 0.80
    if in_range and r["lesson"]["lo"] > r["base"]["hi"]:
        return "signal"
    if r["oracle_adv"]["lo"] > 0:
        return "weak" if in_range else "weak (base out of range)"
    return "none"


def fmt(x, signed=False):
    if x is None:
        return "-"
    s = "+" if signed else ""
    return f"{x['mean']:{s}.2f} [{x['lo']:{s}.2f}, {x['hi']:{s}.2f}]"


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma", help="'gemma' or 'smollm2' (embedded, offline) or a local HF folder / hub id")
    p.add_argument("--device", type=common.device_name, default=None)
    p.add_argument("--dtype", choices=list(common.DTYPE_NAMES), default=None)
    p.add_argument("--rollout-dtype", default=None,
                   type=common.ranged(str, lambda v: v == "auto" or v in common.DTYPE_NAMES,
                                      f"expected auto or one of {', '.join(common.DTYPE_NAMES)}", "a dtype name"),
                   help="dtype to sample in: auto (default: bfloat16 on CUDA and on CPUs with native bf16, "
                        "else the weights' dtype) | float32 | bfloat16")
    p.add_argument("--seed", type=common.at_least(0), default=0)
    p.add_argument("--data", nargs="+", default=["data/procedural.jsonl", "data/obstetrics.jsonl"])
    p.add_argument("--samples", type=common.at_least(1), default=16, help="samples per question and arm")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--max-new-tokens", type=common.at_least(1), default=16)
    p.add_argument("--bootstrap", type=common.at_least(1), default=2000)
    p.add_argument("--report", default="data/calibration.md")
    args = p.parse_args()
    sets = {path: common.load_questions(path) for path in args.data}   # bad data fails before the model
    model, tok = common.load_model(args.model, args.device, args.dtype)
    model = common.rollout_copy(model, args.rollout_dtype)       # nothing is trained: sample from the copy only
    print(f"sampling in {next(model.parameters()).dtype}")
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    rows, raw = [], {}
    for path, questions in sets.items():
        arms, missing = ARMS, sum(not q.lesson for q in questions)
        if missing:                 # imported sets (data/import.py) have no lessons
            arms = ("base",)
            print(f"{path}: {missing} of {len(questions)} questions have no `lesson`: "
                  f"lesson and unrelated arms skipped, base accuracy only")
        elif len({q.cluster for q in questions}) == 1:
            arms = ("base", "lesson")
            print(f"{path}: one cluster, so no unrelated lesson: unrelated arm skipped")
        lessons = {"base": [None] * len(questions), "lesson": [q.lesson for q in questions],
                   "unrelated": unrelated_lessons(questions) if "unrelated" in arms else None}
        rewards = {}
        for arm in arms:
            prompts = [common.question_prompt(tok, q, lesson=l) for q, l in zip(questions, lessons[arm])]
            # Same seed in every arm: row j of question i gets the same uniforms in all three arms.
            out = common.sample(model, tok, prompts, n=args.samples, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, stop=["\n"], seed=args.seed,
                                progress=f"{Path(path).name}: {arm}")
            r = np.array([common.verify(questions[s.prompt_idx], s.text)[0] for s in out])
            rewards[arm] = r.reshape(len(questions), args.samples)                # (Q, S)
        groups = {}
        for i, q in enumerate(questions):
            groups.setdefault((q.cluster, q.subtype or "-"), []).append(i)
        for (cluster, sub), idx in groups.items():
            res = bootstrap({a: rewards[a][idx] for a in arms}, args.bootstrap, rng)
            rows.append({"set": Path(path).name, "cluster": cluster, "subtype": sub,
                         "questions": len(idx), **res})
        raw[path] = {"ids": [q.id for q in questions],
                     **{a: rewards[a].mean(1).round(4).tolist() for a in arms}}
    elapsed = time.time() - t0

    dev = next(model.parameters())
    lines = [
        "# Calibration",
        "",
        f"Model `{args.model}` ({dev.dtype}, {dev.device}), {args.samples} samples per question and arm, "
        f"T={args.temperature}, up to {args.max_new_tokens} new tokens, stop at the first newline, "
        f"seed {args.seed}; {elapsed / 60:.1f} min on {platform.machine()} with {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}.",
        "",
        "Accuracy per arm and advantages with 95% two-stage bootstrap intervals (questions, then "
        "samples). n = questions x samples per arm. Oracle = lesson - base; null = unrelated - base.",
        "",
        "| set | cluster | sub-type | n | base (a) | own lesson (b) | unrelated lesson (c) | oracle adv (b-a) | null adv (c-a) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['set']} | {r['cluster']} | {r['subtype']} | {r['questions']}x{args.samples} | "
                     f"{fmt(r['base'])} | {fmt(r.get('lesson'))} | {fmt(r.get('unrelated'))} | "
                     f"{fmt(r.get('oracle_adv'), True)} | {fmt(r.get('null_adv'), True)} | {verdict(r)} |")
    Path(args.report).write_text("\n".join(lines) + "\n")
    common.atomic_write_json(Path(args.report).with_suffix(".json"),
                             {"config": vars(args), "rows": rows, "per_question": raw})
    print("\n".join(lines[8:]))
    print(f"wrote {args.report} and {Path(args.report).with_suffix('.json')}")


if __name__ == "__main__":
    common.run_main(main)
