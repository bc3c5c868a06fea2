"""Phase 1 of introspection-grpo.txt: GRPO rewarded by the introspection advantage.

Per training step, on one question Q (paper, "GRPO Training Procedure"):
  1. N rollouts on Q. The prompt allows, never forces, <introspection>...</introspection> after
     the answer. Reward from the verifier (common.verify).
  2. An introspection r_i is taken from each correct rollout that wrote one and closed its tag.
  3. Transfer: for each r_i, K questions Q' != Q of the same sub-type (or cluster). On each Q', M
     rollouts with r_i injected and M fresh baseline rollouts without it, all in one sampler call,
     the baseline shared by every r_i on that Q'. Row j of every arm on one Q' uses the same random
     numbers (paired sampling). The validation advantage is the same measurement on Q itself.
  4. A_intro(r_i) = R_bar(Q' + r_i) - R_bar(Q'), averaged over the K questions Q'.
  5. Policy gradient through the original rollout's log-probs, weighted by clamp(A_intro, min=0),
     only on the introspection tokens (opening to closing tag).

Deliberate simplifications against textbook GRPO, all as in the paper:
  1. No KL penalty and no reference model.
  2. One gradient step per batch of rollouts (on-policy), so the PPO ratio is 1: no clipping.
  3. The advantage is A_intro, not R - mean(R), and negative advantages are clamped to 0.
  4. Token-level normalisation: the loss is divided by the step's total number of updated
     introspection tokens (a global count; per-sequence averaging would bias towards length).
  5. SGD, lr 1e-6, no momentum; clip_grad_norm 1.0; a step with no positive advantage runs no
     forward/backward at all; a non-finite loss skips the update and is logged.

Beyond the paper: paired sampling with its variance reduction logged, a 95% interval on every
A_intro, the oracle (Q's known-good lesson scored through the same machinery; on by default,
--no-oracle to skip), a canary
with an alarm, a transfer matrix between sub-types, and --correction-turns with a meta-gaming flag.

    python grpo_introspect.py --model gemma                        # default CPU run, ~5 min
    python grpo_introspect.py --model gemma --steps 40 --N 16 --M 8 --device cuda
    python grpo_introspect.py --out runs/NAME --resume              # continue after a kill or Ctrl-C
"""
import argparse
import json
import random
import re
import time

import numpy as np
import torch
from tqdm import tqdm

import common

# ----------------------------------------------------------------------------
# prompts

# A base model has never seen the tag: two solved examples show the format, one per answer style
# (a letter; words after a cue), on topics that are none of the data's clusters. Their lessons are
# about the domain, never about test-taking. With one example the embedded Gemma wrote no
# introspection in 32 rollouts; with these two, 14 of 32 (4 questions x 8, T=0.7).
INTROSPECT_HINT = (
    "After the answer you may write a lesson that would help with similar questions, inside "
    "<introspection> and </introspection>.\n\n"
    "Question: In the game of Tarn, which piece moves first?\nA) the king\nB) the pawn\nC) the rook\n"
    "Answer: C <introspection>In Tarn the rook always moves first, before any other piece.</introspection>\n\n"
    "Question: In the Orra tongue, what does the word sel mean?\nA) salt\nB) sun\nC) sea\n"
    "Answer: In Orra, sel means sun. <introspection>In Orra, sel means sun and mar means sea.</introspection>")
ROLLOUT_STOP = ["</introspection>", "\nQuestion:", "\n\n"]
ANSWER_STOP = ["\n"]
CORRECTION = "\nThat answer is wrong. Try again.\nAnswer:"

# Lessons about test-taking rather than the domain (paper, "Meta-Gaming").
META_GAMING = re.compile(
    r"\b(option|options|choice|choices|letter|multiple[- ]choice|rejected|extreme|exam|test[- ]taking"
    r"|guess|eliminat\w*|the answer is (usually|often|always))\b", re.I)


def extract_introspection(tok, s: common.Sample) -> str | None:
    """The introspection of a rollout, if it wrote one and closed the tag."""
    if s.finish != "stop" or not tok.decode(s.token_ids).endswith("</introspection>"):
        return None
    if "<introspection>" not in s.text:
        return None
    body = s.text.rsplit("<introspection>", 1)[1].strip()       # a tag opened twice: keep the last
    return body or None


def introspection_mask(tok, ids: list[int]) -> list[bool]:
    """True on the completion tokens from the one where "<introspection>" starts to the end
    (the closing tag is the last token, where the rollout stopped)."""
    text = tok.decode(ids)
    start = text.find("<introspection>")
    if start < 0:
        return [False] * len(ids)
    for j in range(len(ids)):
        if len(tok.decode(ids[:j + 1])) > start:
            return [k >= j for k in range(len(ids))]
    return [False] * len(ids)


# ----------------------------------------------------------------------------
# the advantage (pure maths, tested on hand-made numbers)


def paired_advantage(with_r: np.ndarray, base: np.ndarray) -> dict:
    """A = mean(with_r) - mean(base) over paired rows, with a 95% interval from the paired
    differences, and the variance an unpaired estimate would have had (to log the reduction)."""
    with_r, base = np.asarray(with_r, float).ravel(), np.asarray(base, float).ravel()
    d = with_r - base
    ci = common.mean_ci(d, binary=False)
    n = len(d)
    var_paired = d.var(ddof=1) / n if n > 1 else float("nan")
    var_unpaired = (with_r.var(ddof=1) + base.var(ddof=1)) / n if n > 1 else float("nan")
    return {**ci, "var_paired": var_paired, "var_unpaired": var_unpaired, "diffs": d}


def pg_loss(logprobs: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """-sum_i A_i * sum_t log pi(y_it) over masked (introspection) tokens / number of those tokens.
    logprobs, mask (B, T); adv (B,), already clamped at 0."""
    mask = mask.float()
    return -(adv[:, None] * logprobs * mask).sum() / mask.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------
# transfer: score lessons on other questions of the same type


def score_lessons(model, tok, pairs, M, temperature, seed, max_new_tokens, progress=None):
    """pairs: list of (question, [lesson, ...]). For each question, M baseline rows and M rows per
    lesson, in one sampler call; row j of every arm on a question shares its random numbers.
    Returns, per pair, (base rewards (M,), [rewards with lesson (M,), ...])."""
    prompts, seeds = [], []
    for qi, (q, lessons) in enumerate(pairs):
        for lesson in [None] + lessons:
            prompts.append(common.question_prompt(tok, q, lesson=lesson))
            seeds += [common.row_seed(seed, qi, j) for j in range(M)]
    out = common.sample(model, tok, prompts, n=M, max_new_tokens=max_new_tokens, temperature=temperature,
                        stop=ANSWER_STOP, row_seeds=seeds, progress=progress)
    owner = [q for q, lessons in pairs for _ in range(1 + len(lessons)) for _ in range(M)]
    rewards = np.array([common.verify(owner[i], s.text)[0] for i, s in enumerate(out)])
    results, k = [], 0
    for q, lessons in pairs:
        block = rewards[k:k + (1 + len(lessons)) * M].reshape(1 + len(lessons), M)
        results.append((block[0], list(block[1:])))
        k += (1 + len(lessons)) * M
    return results


def transfer_pool(questions, q, by):
    key = (lambda x: (x.cluster, x.subtype)) if by == "subtype" else (lambda x: x.cluster)
    return [x for x in questions if key(x) == key(q) and x.id != q.id]


# ----------------------------------------------------------------------------
# main


def main():
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data="data/procedural.jsonl")
    p.add_argument("--steps", type=int, default=20, help="training steps (one question Q each)")
    p.add_argument("--N", type=int, default=16, help="rollouts on Q (the paper's N)")
    p.add_argument("--M", type=int, default=4, help="transfer rollouts per arm on each Q'")
    p.add_argument("--transfer-questions", type=int, default=1, help="K questions Q' per introspection")
    p.add_argument("--transfer-by", choices=["subtype", "cluster"], default="subtype")
    p.add_argument("--max-intros", type=int, default=4, help="at most this many introspections scored per step")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=64, help="rollout length on Q")
    p.add_argument("--answer-tokens", type=int, default=16, help="rollout length on Q' (answer only)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--canary-every", type=int, default=4)
    p.add_argument("--canary-samples", type=int, default=4)
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every this many steps")
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="also score Q's known-good lesson through the same machinery (no update)")
    p.add_argument("--correction-turns", type=int, default=0, help="multi-turn ablation: 'wrong, try again' turns")
    p.add_argument("--matrix-M", type=int, default=4, help="rollouts per arm in the final transfer matrix (0: skip)")
    p.add_argument("--include-controls", action="store_true", help="also train on negative-control clusters")
    args = p.parse_args()
    common.check_common_args(args)

    # ---- setup: data first (a bad file fails before the model loads)
    questions = common.load_questions(args.data)
    canary = list({(q.cluster, q.subtype): q for q in reversed(questions)}.values())  # first of each sub-type
    canary_ids = {q.id for q in canary}
    pool = [q for q in questions if q.id not in canary_ids]
    train = [q for q in pool if args.include_controls or not q.meta.get("negative_control")]
    train = [q for q in train if transfer_pool(pool, q, args.transfer_by)]
    if not train:
        raise common.UserError(f"{args.data}: no question has a Q' of the same {args.transfer_by} outside the canary set")
    out = common.setup_run(args, "grpo_introspect")
    order = [train[i] for i in np.random.default_rng(args.seed).permutation(len(train))]
    library_path, metrics_path = out / "library.json", out / "metrics.jsonl"
    library = common.load_bank(library_path, "introspection-library")

    ckpt = out / "checkpoint"
    model, tok = common.load_model(str(ckpt) if args.resume and ckpt.exists() else args.model, args.device, args.dtype)
    device = next(model.parameters()).device
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = (torch.optim.SGD(params, lr=args.lr, momentum=0.0) if args.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=args.lr))
    rollout = common.rollout_copy(model, args.rollout_dtype)  # bf16 copy where bf16 is fast, else model itself
    start = 0
    if args.resume:
        state = common.load_resume_state(out, opt)
        start = state["step"] if state else 0
        # Anything logged by a step that the checkpoint does not include is dropped, then redone.
        library["entries"] = [e for e in library["entries"] if e["step"] < start]
        common.save_bank(library_path, library)
        if metrics_path.exists():
            keep = [ln for ln in metrics_path.read_text().splitlines() if json.loads(ln)["step"] < start]
            common.atomic_write_text(metrics_path, "".join(ln + "\n" for ln in keep))
        print(f"resuming {out} at step {start} ({len(library['entries'])} introspections in the library)")
    print(f"run folder: {out}\ntraining on {len(train)} questions, canary {len(canary)}, data {args.data}")
    print(f"weights in {next(model.parameters()).dtype}, rollouts in {next(rollout.parameters()).dtype}")

    def canary_accuracy():
        res = score_lessons(rollout, tok, [(q, []) for q in canary], args.canary_samples, args.temperature,
                            seed=args.seed, max_new_tokens=args.answer_tokens, progress="canary")
        return common.mean_ci(np.concatenate([b for b, _ in res]), binary=True)

    # the alarm compares with the run's first canary, also after a resume
    canary0 = next((json.loads(ln)["canary"] for ln in metrics_path.read_text().splitlines()
                    if "canary" in json.loads(ln)), None) if metrics_path.exists() else None
    bar = tqdm(range(start, args.steps), desc="GRPO steps", initial=start, total=args.steps)
    for step in bar:
        t0 = time.time()
        seed = int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0])
        Q = order[step % len(order)]
        rec = {"step": step, "question": Q.id, "cluster": Q.cluster, "subtype": Q.subtype}

        # ---- canary: accuracy on held-out questions without introspection (paper: collapse to "N/A")
        if step % args.canary_every == 0 or step == start:
            c = canary_accuracy()
            canary0 = canary0 or c
            rec["canary"] = c
            rec["canary_alarm"] = c["hi"] < canary0["mean"]
            if rec["canary_alarm"]:
                tqdm.write(f"ALARM step {step}: canary accuracy {c['mean']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}] "
                           f"fell below its start {canary0['mean']:.2f}")

        # ---- 1. N rollouts on Q (optionally with correction turns)
        prompt = common.question_prompt(tok, Q, instruction=INTROSPECT_HINT)
        prompts = [prompt] * args.N
        rollouts = common.sample(rollout, tok, [prompt], n=args.N, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, stop=ROLLOUT_STOP, seed=seed, progress="rollouts on Q")
        rewards = [common.verify(Q, s.text)[0] for s in rollouts]
        turns = [0] * args.N
        first_try = common.mean_ci(rewards, binary=True)
        for turn in range(1, args.correction_turns + 1):
            wrong = [i for i, r in enumerate(rewards) if r == 0]
            if not wrong:
                break
            retry = [prompts[i] + rollouts[i].text + CORRECTION for i in wrong]
            again = common.sample(rollout, tok, retry, n=1, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, stop=ROLLOUT_STOP, seed=seed + turn)
            for i, p_i, s in zip(wrong, retry, again):
                prompts[i], rollouts[i], turns[i], rewards[i] = p_i, s, turn, common.verify(Q, s.text)[0]
        if args.correction_turns:
            rec["correct_by_turn"] = [sum(1 for i in range(args.N) if turns[i] == t and rewards[i] == 1)
                                      for t in range(args.correction_turns + 1)]
        intros = [(i, extract_introspection(tok, s)) for i, s in enumerate(rollouts)]
        wrote = [i for i, r in intros if r is not None]
        rec.update(accuracy_Q=common.mean_ci(rewards, binary=True), accuracy_Q_first_turn=first_try,
                   introspected=len(wrote) / args.N,
                   intro_tokens=float(np.mean([sum(introspection_mask(tok, rollouts[i].token_ids))
                                               for i in wrote])) if wrote else 0.0)

        # ---- 2. introspections from successful rollouts
        cands = [(i, r) for i, r in intros if r is not None and rewards[i] == 1][:args.max_intros]
        lessons = [r for _, r in cands]

        # ---- 3-4. transfer to K questions Q' (and validation on Q itself), paired
        same_type = transfer_pool(pool, Q, args.transfer_by)
        Qp = random.Random(seed).sample(same_type, min(args.transfer_questions, len(same_type)))
        scored = lessons + ([Q.lesson] if args.oracle and Q.lesson else [])
        A, val = [], []
        if scored:
            res = score_lessons(rollout, tok, [(q, scored) for q in Qp + [Q]], args.M, args.temperature,
                                seed=seed, max_new_tokens=args.answer_tokens, progress="transfer rollouts")
            for k in range(len(scored)):
                A.append(paired_advantage(np.concatenate([res[j][1][k] for j in range(len(Qp))]),
                                          np.concatenate([res[j][0] for j in range(len(Qp))])))
                val.append(paired_advantage(res[-1][1][k], res[-1][0]))
        if A:  # how much pairing cuts the variance of the estimate, over every lesson scored (oracle too)
            rec["var_paired"] = float(np.nansum([a["var_paired"] for a in A]))
            rec["var_unpaired"] = float(np.nansum([a["var_unpaired"] for a in A]))
        if args.oracle and Q.lesson:
            rec["A_oracle"], rec["val_oracle"] = [{k: v for k, v in x.pop().items() if k != "diffs"} for x in (A, val)]
        if A:
            # pooled over every paired difference of the step: n = introspections x K x M
            rec["A_intro"] = common.mean_ci(np.concatenate([a["diffs"] for a in A]), binary=False)
            rec["validation"] = common.mean_ci(np.concatenate([v["diffs"] for v in val]), binary=False)

        # ---- 5. policy gradient on the introspection tokens of positively scored rollouts
        upd = [(i, a["mean"]) for (i, _), a in zip(cands, A) if a["mean"] > 0]
        rec.update(updated=len(upd), grad_norm=None, loss=None, skipped=None)
        if upd:  # no positive advantage -> no forward/backward at all
            ids = [common.encode(tok, prompts[i]) for i, _ in upd]
            comp = [rollouts[i].token_ids for i, _ in upd]
            lp = common.token_logprobs(model, ids, comp, temperature=args.temperature, pad_id=tok.pad_token_id)
            mask = torch.zeros_like(lp["mask"])
            for b, c in enumerate(comp):
                mask[b, :len(c)] = torch.tensor(introspection_mask(tok, c))
            adv = torch.tensor([max(a, 0.0) for _, a in upd], device=device)    # clamp(A_intro, min=0)
            loss = pg_loss(lp["logprobs"], mask, adv)
            # how far the rollout policy (a bf16 copy) is from the trained one, on the trained tokens
            rec["logprob_mismatch"] = common.logprob_mismatch([rollouts[i].logprobs for i, _ in upd],
                                                              lp["logprobs"], mask)
            if torch.isfinite(loss):
                loss.backward()
                rec["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.clip))
                opt.step()
                rec["rollout_sync_s"] = common.sync_rollout(rollout, model)
                rec["loss"] = float(loss)
            else:
                rec["skipped"] = f"non-finite loss {float(loss)}"
                tqdm.write(f"step {step}: {rec['skipped']}, update skipped")
            opt.zero_grad(set_to_none=True)

        # ---- record: library first, then checkpoint, so a kill between them only repeats a step
        updated = {i for i, _ in upd}
        for (i, r), a, v in zip(cands, A, val):
            library["entries"].append({
                "id": f"s{step:04d}-r{i:02d}", "text": r, "cluster": Q.cluster, "subtype": Q.subtype,
                "source_question": Q.id, "step": step, "turn": turns[i],
                "A_intro": {**{x: a[x] for x in ("mean", "lo", "hi", "n")}, "transfer_questions": [q.id for q in Qp]},
                "validation": {x: v[x] for x in ("mean", "lo", "hi", "n")},
                "used_for_update": i in updated, "meta_gaming": bool(META_GAMING.search(r))})
        common.save_bank(library_path, library)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(out, model, tok, opt, step=step + 1)
        rec.update(step_time=time.time() - t0, peak_memory_mb=common.peak_memory_mb(device))
        common.append_jsonl(metrics_path, rec)
        bar.set_postfix(acc=f"{rec['accuracy_Q']['mean']:.2f}", intro=f"{rec['introspected']:.2f}",
                        upd=rec["updated"])

    # ---- report
    write_report(out, args, rollout, tok, library, pool)
    print(f"library: {library_path}\nmetrics: {metrics_path}\nreport:  {out / 'report.md'}")


# ----------------------------------------------------------------------------
# report


def fmt(ci, signed=True):
    if not ci or ci.get("n", 0) == 0:
        return "-"
    s = "+" if signed else ""
    return f"{ci['mean']:{s}.2f} [{ci['lo']:{s}.2f}, {ci['hi']:{s}.2f}] (n={ci['n']})"


def write_report(out, args, model, tok, library, pool):
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    entries = library["entries"]
    lines = [f"# GRPO on the introspection advantage: {out.name}", "",
             f"`{' '.join(['python grpo_introspect.py'] + [f'--{k.replace(chr(95), chr(45))} {v}' for k, v in vars(args).items() if v not in (None, False)])}`", "",
             "## Per step", "",
             "| step | Q | acc on Q | introspected | A_intro (mean over r) | validation | oracle A | updated | grad norm | canary |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m['step']} | {m['question']} | {fmt(m['accuracy_Q'], False)} | {m['introspected']:.2f} | "
                     f"{fmt(m.get('A_intro'))} | {fmt(m.get('validation'))} | {fmt(m.get('A_oracle'))} | "
                     f"{m['updated']} | {m['grad_norm'] if m['grad_norm'] is None else round(m['grad_norm'], 3)} | "
                     f"{fmt(m.get('canary'), False)}{' ALARM' if m.get('canary_alarm') else ''} |")
    allA = [e["A_intro"]["mean"] for e in entries]
    allV = [e["validation"]["mean"] for e in entries]
    vp, vu = sum(m.get("var_paired", 0) for m in metrics), sum(m.get("var_unpaired", 0) for m in metrics)
    oracle = [m["A_oracle"]["mean"] for m in metrics if m.get("A_oracle")]
    lines += ["", "## Summary", "",
              f"- introspections scored: {len(entries)}; used for an update: {sum(e['used_for_update'] for e in entries)}",
              f"- regularisation advantage (A_intro on Q' != Q), mean over introspections: {fmt(common.mean_ci(allA, binary=False))}",
              f"- validation advantage (same question Q): {fmt(common.mean_ci(allV, binary=False))}",
              f"- oracle (known-good lesson) A on Q': {fmt(common.mean_ci(oracle, binary=False)) if oracle else 'not run (--oracle)'}",
              f"- variance of the A estimates, paired / unpaired sampling: {vp / vu:.2f} (summed over every lesson scored)"
              if vu > 0 else "- paired / unpaired variance: no lesson scored with any variance",
              f"- meta-gaming flagged: {sum(e['meta_gaming'] for e in entries)} of {len(entries)}"]
    by_turn = {}
    for e in entries:
        by_turn.setdefault(e["turn"], []).append(e["meta_gaming"])
    if args.correction_turns:
        lines += ["", "| correction turn | introspections | meta-gaming flagged |", "|---|---|---|"]
        lines += [f"| {t} | {len(v)} | {np.mean(v):.0%} |" for t, v in sorted(by_turn.items())]
    lines += ["", "## Best introspections per cluster (by lower bound of A_intro)", ""]
    best = {}
    for e in sorted(entries, key=lambda e: -e["A_intro"]["lo"]):
        best.setdefault((e["cluster"], e["subtype"]), []).append(e)
    for (c, s), es in sorted(best.items()):
        for e in es[:2]:
            lines.append(f"- **{c}/{s}** A_intro {fmt(e['A_intro'])}: {e['text'][:200]!r}")

    # transfer matrix: the best introspection of sub-type X scored on a question of sub-type Y
    if args.matrix_M and best:
        keys = sorted({(q.cluster, q.subtype) for q in pool})
        rows = {k: v[0] for k, v in best.items()}
        target = {k: next(q for q in pool if (q.cluster, q.subtype) == k) for k in keys}
        res = score_lessons(model, tok, [(target[k], [rows[x]["text"] for x in rows]) for k in keys], args.matrix_M,
                            args.temperature, seed=args.seed + 1, max_new_tokens=args.answer_tokens, progress="transfer matrix")
        lines += ["", f"## Transfer matrix (rows: best introspection from sub-type X; columns: one question of sub-type Y; "
                      f"A = R(Y + r) - R(Y), {args.matrix_M} paired rollouts per cell)", "",
                  "| from \\ on | " + " | ".join(f"{c}/{s}" for c, s in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for ri, x in enumerate(rows):
            cells = [f"{paired_advantage(res[ci][1][ri], res[ci][0])['mean']:+.2f}" for ci in range(len(keys))]
            lines.append(f"| {x[0]}/{x[1]} | " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    common.run_main(main)
