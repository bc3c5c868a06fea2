"""Phase 1 of introspection-grpo.txt: GRPO rewarded by the introspection advantage
A_intro(r) = R_bar(Q' + r) - R_bar(Q').

NOT IMPLEMENTED YET: the GRPO loop lands with its own issue ("grpo_introspect.py: Phase 1").
Until then this script is a smoke run of the foundation it will stand on: it loads the data and
the model, samples N rollouts per question with the shared-prefix sampler, scores them with the
verifiers, and reports accuracy with a 95% interval, with and without each cluster's lesson.

    python grpo_introspect.py --model gemma
"""
import argparse
import time

import common


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data="data/sample.jsonl")
    p.add_argument("--N", type=int, default=8, help="rollouts per question")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args()
    questions = common.load_questions(args.data)          # before the model: bad data fails fast
    out = common.setup_run(args, "grpo_introspect")
    model, tok = common.load_model(args.model, args.device, args.dtype)

    t0 = time.time()
    report = {}
    for arm in ("no lesson", "cluster lesson"):
        prompts = [common.question_prompt(tok, q, lesson=q.lesson if arm != "no lesson" else None)
                   for q in questions]
        samples = common.sample(model, tok, prompts, n=args.N, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, stop=common.STOP, seed=args.seed,
                                progress=f"rollouts ({arm})")
        rewards = [common.verify(questions[s.prompt_idx], s.text)[0] for s in samples]
        report[arm] = common.mean_ci(rewards)
        common.append_jsonl(out / "metrics.jsonl", {"arm": arm, **report[arm]})
        example = samples[0]
        print(f"  e.g. {questions[example.prompt_idx].id}: {example.text.strip()[:70]!r} -> "
              f"{common.verify(questions[example.prompt_idx], example.text)[1]}")
    for arm, r in report.items():
        print(f"{arm:>15}: accuracy {r['mean']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}] (n={r['n']})")
    print(f"smoke run took {time.time() - t0:.0f} s; metrics in {out / 'metrics.jsonl'}")
    print("GRPO training on the introspection advantage is not implemented yet (issue: grpo_introspect.py Phase 1).")


if __name__ == "__main__":
    common.run_main(main)
