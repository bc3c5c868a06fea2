"""Wall clock and peak RSS of a whole stage run, as the code is and with one change taken out.

    python bench/bench_stage_wall.py -- grpo_introspect.py --model gemma
    python bench/bench_stage_wall.py --repeats 2 -- pmd_distill.py --model gemma --method sdpo
    python bench/bench_stage_wall.py --before sdpa-decode -- grpo_introspect.py --model gemma

Each run is a fresh process of the stage script with the given flags and its own --out under
runs/bench-wall/. The "before" run takes out one change, so the pair differs in that one thing:
  unshared     common._completion_hidden on its share_prompts=False path (every row forwards its
               own copy of the prompt), the code before the shared-prompt change;
  sdpa-decode  HF's sdpa attention at decode, not common._packed_decode.
Repeats alternate the order. The metrics of each pair are compared key by key (timings excepted):
they can drift, because both changes agree with the code before them to float rounding only.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TIMING_KEYS = ("time", "_s", "peak_memory")

CHILD = """
import atexit, json, resource, runpy, sys
sys.path.insert(0, {root!r})
import common
if {before!r} == "sdpa-decode":
    common.packed_decode_attention = lambda model: False
if {before!r} == "unshared":
    shared = common._completion_hidden
    def _completion_hidden(model, prompt_ids, completion_ids, pad_id, share_prompts=True):
        return shared(model, prompt_ids, completion_ids, pad_id, False)
    common._completion_hidden = _completion_hidden
atexit.register(lambda: print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_once(stage_argv: list[str], out: Path, before: str | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(ROOT / stage_argv[0]), *stage_argv[1:], "--out", str(out)]
    code = CHILD.format(root=str(ROOT), before=before, argv=argv)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(stage_argv)} (before={before}) failed:\n{p.stderr[-3000:]}")
    peak = [float(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("PEAK_RSS_MB")]
    return {"wall_s": wall, "peak_rss_mb": peak[-1] if peak else float("nan"), "out": str(out)}


def metrics(out: str) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in rows]


def same_metrics(a: str, b: str) -> str:
    ra, rb = metrics(a), metrics(b)
    equal = sum(x == y for x, y in zip(ra, rb))
    return f"{equal} of {max(len(ra), len(rb))} metrics rows equal (timings excepted)"


def med(xs) -> str:
    return f"{np.median(xs):.1f} [{min(xs):.1f}, {max(xs):.1f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--before", choices=["unshared", "sdpa-decode"], default="unshared", help="the change the 'before' run takes out")
    p.add_argument("stage", nargs=argparse.REMAINDER, help="-- <stage script> <its flags>")
    args = p.parse_args()
    stage = [a for a in args.stage if a != "--"]
    if not stage or not (ROOT / stage[0]).exists():
        sys.exit("give the stage after --, e.g. -- grpo_introspect.py --model gemma")
    name = Path(stage[0]).stem
    before = args.before
    runs = {"as is": [], before: []}
    for r in range(args.repeats):
        order = ("as is", before) if r % 2 == 0 else (before, "as is")
        for v in order:
            out = ROOT / "runs" / "bench-wall" / f"{name}-{v.replace(' ', '-')}-r{r}"
            runs[v].append(run_once(stage, out, None if v == "as is" else before))
            print(f"repeat {r} {v}: {runs[v][-1]['wall_s']:.1f} s, peak RSS {runs[v][-1]['peak_rss_mb']:.0f} MB",
                  flush=True)
    print(f"\n`python {' '.join(stage)}`, {args.repeats} repeat(s) each, median [min, max]\n")
    print("| run | wall s | peak RSS MB |\n|---|---|---|")
    for v, rs in runs.items():
        print(f"| {v} | {med([x['wall_s'] for x in rs])} | {med([x['peak_rss_mb'] for x in rs])} |")
    ratios = [s["wall_s"] / u["wall_s"] for s, u in zip(runs["as is"], runs[before])]
    print(f"\nas is / {before} wall clock, paired by repeat: {np.median(ratios):.2f}x "
          f"[{min(ratios):.2f}, {max(ratios):.2f}]")
    for s, u in zip(runs["as is"], runs[before]):
        print(same_metrics(s["out"], u["out"]))


if __name__ == "__main__":
    main()
