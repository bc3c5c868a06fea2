"""One GRPO step of the main job with fp32 rollouts against bf16 rollouts, in one process.

Runs grpo_introspect.py's main() in-process for --steps steps (default 1: step 0, which holds the
canary check, the N=16 rollouts on Q, the paired transfer rollouts and the update if any) with
each --rollout-dtype in turn, interleaved, --repeats times, and reads step_time from
metrics.jsonl (model loading is not in it). Every other flag is the main job's default. The two
dtypes sample slightly different rollouts, so the work of a step (introspections to score, an
update or not) can differ; the table prints it beside the time.

    python bench/bench_grpo_step.py                    # embedded Gemma, step 0, 3 repeats
    python bench/bench_grpo_step.py --steps 2 --repeats 1
"""
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import grpo_introspect  # noqa: E402


def spread(xs, fmt=".1f"):
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}, {max(xs):{fmt}}]"


def main():
    p = common.ArgumentParser()
    p.add_argument("--model", default="gemma")
    p.add_argument("--data", default="data/procedural.jsonl")
    p.add_argument("--dtypes", nargs="+", type=common.ranged(str, lambda v: v in common.DTYPE_NAMES,
                   f"expected one of {', '.join(common.DTYPE_NAMES)}", "a dtype name"), default=["float32", "bfloat16"])
    p.add_argument("--steps", type=common.at_least(1), default=1, help="steps per run (each step timed)")
    p.add_argument("--repeats", type=common.at_least(1), default=3)
    p.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    args = p.parse_args()
    times = {dt: [] for dt in args.dtypes}          # per repeat: total seconds of the timed steps
    work = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.out or tmp
        for r in range(args.repeats):
            for dt in args.dtypes:
                out = Path(tmp) / f"{dt}-{r}"
                sys.argv = ["grpo_introspect.py", "--model", args.model, "--data", args.data, "--out", str(out),
                            "--steps", str(args.steps), "--matrix-M", "0", "--rollout-dtype", dt]
                grpo_introspect.main()
                m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
                times[dt].append(sum(x["step_time"] for x in m))
                work[dt] = [(x["step"], x["introspected"], x["A_intro"]["n"] if "A_intro" in x else 0,
                             x["updated"]) for x in m]
                print(f"# repeat {r} {dt}: {times[dt][-1]:.1f} s", flush=True)
    print(f"\n{args.steps} step(s) of the default main job; {args.repeats} repeats: median [min, max]")
    print(f"{'rollout dtype':>14} {'seconds':>22} {'fp32 / this':>20}   work per step (step, introspected, A_intro n, updated)")
    for dt in args.dtypes:
        vs = spread([f / b for f, b in zip(times["float32"], times[dt])], ".2f") + "x" if "float32" in times else "-"
        print(f"{dt:>14} {spread(times[dt]):>22} {vs:>20}   {work[dt]}")


if __name__ == "__main__":
    common.run_main(main)
