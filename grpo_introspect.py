"""Phase 1 of the Introspection GRPO paper: GRPO rewarded by the introspection advantage.

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
     forward/backward at all; a non-finite loss or gradient norm skips the update and is logged.
     At these settings an update moves the weights by at most 1e-6 in norm: the realised change
     is measured and logged after every step (weight_change), never inferred from lr x grad.

Beyond the paper: separate seed streams for sampling on Q, scoring, canary and report (the noise
that selected a lesson never evaluates it), paired sampling with its variance reduction logged, a
95% interval on every A_intro (honest at small M), the oracle (Q's known-good lesson scored
through the same machinery; --no-oracle to skip), a canary with an alarm, a transfer matrix
between sub-types re-scored on fresh questions, and --correction-turns with a meta-gaming flag.

    python grpo_introspect.py --model gemma                        # default CPU run, ~5 min
    python grpo_introspect.py --model gemma --steps 40 --N 16 --M 8 --device cuda
    python grpo_introspect.py --out runs/NAME --resume              # continue after a kill or Ctrl-C
"""
import argparse
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
CORRECTION_TURN = "That answer is wrong. Try again."
CORRECTION = f"\n{CORRECTION_TURN}\nAnswer:"

# Lessons about test-taking rather than the domain (paper, "Meta-Gaming").
META_GAMING = re.compile(
    r"\b(option|options|choice|choices|letter|multiple[- ]choice|rejected|extreme|exam|test[- ]taking"
    r"|guess|eliminat\w*|the answer is (usually|often|always))\b", re.I)


OPEN, CLOSE = "<introspection>", "</introspection>"


def correction_prompt(tok, prompt: str, text: str) -> str:
    """prompt + a wrong answer + "wrong, try again": plain text for a base model; under a chat
    template the answer closes the assistant turn and the retry request is a new user turn."""
    if not getattr(tok, "chat_template", None):
        return prompt + text + CORRECTION
    def turns(m):
        return tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    first = [{"role": "user", "content": "Q"}]
    retry = first + [{"role": "assistant", "content": text}, {"role": "user", "content": CORRECTION_TURN}]
    return prompt + turns(retry)[len(turns(first)):]


def introspection_span(text: str) -> tuple[int, int] | None:
    """The character span of a rollout's closed introspection, from its opening tag to the end of
    its closing tag; None if there is none. The rollout stopped at the first closing tag, and a tag
    opened twice before it counts from the last opening (the lesson is what follows it). This one
    span defines both the lesson that is scored and the tokens that are trained."""
    close = text.find(CLOSE)
    start = text.rfind(OPEN, 0, close) if close >= 0 else -1
    return None if start < 0 else (start, close + len(CLOSE))


def extract_introspection(tok, ids: list[int]) -> str | None:
    """The lesson of a rollout (its completion ids): the text inside its closed introspection, or None."""
    text = tok.decode(ids, skip_special_tokens=True)
    span = introspection_span(text)
    if span is None:
        return None
    body = text[span[0] + len(OPEN):span[1] - len(CLOSE)].strip()
    return body or None


def introspection_mask(tok, ids: list[int]) -> list[bool]:
    """True on the completion tokens whose characters overlap the introspection span.

    Both tags are trained: the opening tag is the model's decision to write a lesson, the closing
    tag its decision to stop. Gemma's tokenizer merges punctuation with tags (".<" in
    "fire.<introspection>", ">." at the end), so a token can straddle the span's edge; it is
    trained too, because it is the token that opens (or closes) the tag and cannot be split.
    Characters are located by decoding growing prefixes, which matches the decoded text exactly."""
    text = tok.decode(ids, skip_special_tokens=True)
    span = introspection_span(text)
    if span is None:
        return [False] * len(ids)
    ends, e = [], 0
    for j in range(len(ids)):
        e = max(e, len(tok.decode(ids[:j + 1], skip_special_tokens=True)))
        ends.append(e)
    starts = [0] + ends[:-1]
    return [st < span[1] and en > span[0] for st, en in zip(starts, ends)]


# ----------------------------------------------------------------------------
# the advantage (pure maths, tested on hand-made numbers)


def paired_advantage(with_r, base) -> dict:
    """A = R_bar(Q' + r) - R_bar(Q') for one lesson, from rows paired across the two arms.

    with_r, base: lists with one array of 0/1 rewards per Q' (row j of both arms on one Q' shared
    its random numbers). The interval is honest at small M: on one Q', Newcombe's paired-binary
    interval over the M pairs (never zero width, unlike a t interval on four equal differences);
    on several Q', a bootstrap clustered by Q'. Also the variance an unpaired estimate would have
    had, to log what pairing saves."""
    w = [np.asarray(x, float).ravel() for x in with_r]
    b = [np.asarray(x, float).ravel() for x in base]
    d = [x - y for x, y in zip(w, b)]
    W, Bs = np.concatenate(w), np.concatenate(b)
    ci = (common.paired_binary_ci(W, Bs) if len(d) == 1
          else common.cluster_bootstrap_ci(d, seed=0))
    n = len(W)
    D = W - Bs
    var_paired = D.var(ddof=1) / n if n > 1 else float("nan")
    var_unpaired = (W.var(ddof=1) + Bs.var(ddof=1)) / n if n > 1 else float("nan")
    return {**ci, "var_paired": var_paired, "var_unpaired": var_unpaired, "diffs": D}


def pooled_advantage(advs: list[dict]) -> dict:
    """The mean over every paired difference of a step's lessons, with a bootstrap clustered by
    baseline row: all lessons on one Q' share its M baseline rows and their random numbers, so
    row j of every lesson is one cluster, not independent draws."""
    D = np.stack([a["diffs"] for a in advs])                     # (lessons, K*M)
    return common.cluster_bootstrap_ci([D[:, j] for j in range(D.shape[1])], seed=0)


pg_loss = common.pg_loss     # -sum_i A_i sum_t log pi(y_it) / number of trained tokens (token-mean)


def canary_alarm(c: dict, c0: dict) -> bool:
    """Alarm when the canary's whole interval lies below the run's first canary accuracy."""
    return bool(c["hi"] < c0["mean"])


# ----------------------------------------------------------------------------
# transfer: score lessons on other questions of the same type


def score_lessons(model, tok, pairs, M, temperature, seed, stream, key, max_new_tokens, progress=None):
    """pairs: list of (question, [lesson, ...]). For each question, M baseline rows and M rows per
    lesson, in one sampler call, paired by common.score's row-seed rule (row j of every arm on a
    question shares its random numbers, drawn from the stream's own seeds).
    Returns, per pair, (base rewards (M,), [rewards with lesson (M,), ...])."""
    qs = [q for q, lessons in pairs for _ in range(1 + len(lessons))]
    prompts = [common.question_prompt(tok, q, lesson=r) for q, lessons in pairs for r in [None] + lessons]
    rewards = common.score(model, tok, qs, prompts, M, seed, stream, key, max_new_tokens=max_new_tokens,
                           temperature=temperature, stop=ANSWER_STOP, progress=progress).rewards   # (P, M)
    results, k = [], 0
    for q, lessons in pairs:
        results.append((rewards[k], list(rewards[k + 1:k + 1 + len(lessons)])))
        k += 1 + len(lessons)
    return results


def transfer_pool(questions, q, by):
    key = (lambda x: (x.cluster, x.subtype)) if by == "subtype" else (lambda x: x.cluster)
    return [x for x in questions if key(x) == key(q) and x.id != q.id]


# ----------------------------------------------------------------------------
# train


def train(args, out, split) -> common.Policy:
    """The paper's loop: per step, rollouts on Q, introspections, transfer, A_intro, update."""
    policy = common.load_policy(args, out)
    library = resume_library(out, policy.step) if args.resume else common.load_bank(out / "library.json", "introspection-library")
    metrics = common.read_metrics(out)
    # the alarm compares with the run's first canary, also after a resume
    canary0 = next((m["canary"] for m in metrics if "canary" in m), None)
    print(f"weights in {next(policy.model.parameters()).dtype}, rollouts in {next(policy.rollout.parameters()).dtype}")
    bar = tqdm(range(policy.step, args.steps), desc="GRPO steps", initial=policy.step, total=args.steps)
    for step in bar:
        t0 = time.time()
        Q = split["order"][step % len(split["order"])]
        rec = {"step": step, "question": Q.id, "cluster": Q.cluster, "subtype": Q.subtype}
        if step % args.canary_every == 0 or step == policy.step:
            canary0 = check_canary(args, policy, split["canary"], rec, canary0)
        rollouts, turns = rollouts_on_Q(args, policy, Q, step, rec)                     # 1. N rollouts on Q
        cands = introspections(policy.tok, rollouts, args.max_intros, rec)              # 2. lessons r_i
        same_type = transfer_pool(split["pool"], Q, args.transfer_by)
        Q_prime = random.Random(common.stream_seed(args.seed, "pick-Q'", step)).sample(
            same_type, min(args.transfer_questions, len(same_type)))
        A, val = transfer(args, policy, Q, Q_prime, [r for _, r in cands], step, rec)   # 3-4. A_intro
        upd = [(i, a["mean"]) for (i, _), a in zip(cands, A) if a["mean"] > 0]
        rec.update(updated=len(upd), grad_norm=None, loss=None, skipped=None, weight_change=None)
        if upd:                                                                         # 5. policy gradient
            rec.update(update(args, policy, [rollouts[i] for i, _ in upd], [a for _, a in upd]))
        # record: library and metrics first, checkpoint last, so a kill anywhere between them only
        # repeats this step (--resume drops what a step past the checkpoint logged)
        record_library(library, out, Q, Q_prime, step, cands, A, val, turns, {i for i, _ in upd})
        rec.update(step_time=time.time() - t0, peak_memory_mb=common.peak_memory_mb(policy.device))
        common.append_jsonl(out / "metrics.jsonl", rec)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            common.save_checkpoint(out, policy.model, policy.tok, policy.opt, step=step + 1)
        bar.set_postfix(acc=f"{rec['accuracy_Q']['mean']:.2f}", intro=f"{rec['introspected']:.2f}", upd=rec["updated"])
    return policy


# ----------------------------------------------------------------------------
# the pieces, in the order train() calls them


def resume_library(out, start):
    """The library without the introspections of steps past the checkpoint (they are redone)."""
    library = common.load_bank(out / "library.json", "introspection-library")
    n = len(library["entries"])
    library["entries"] = [e for e in library["entries"] if e["step"] < start]
    common.save_bank(out / "library.json", library)
    print(f"resuming {out} at step {start} ({len(library['entries'])} introspections in the library, "
          f"{n - len(library['entries'])} past the checkpoint dropped and redone)")
    return library


def check_canary(args, policy, canary, rec, canary0):
    """Accuracy on held-out questions without introspection (the paper's collapse to "N/A"), with the
    same row seeds at every check, so a change is the model's, not the noise's."""
    res = score_lessons(policy.rollout, policy.tok, [(q, []) for q in canary], args.canary_samples,
                        args.temperature, args.seed, "canary", (), args.answer_tokens, progress="canary")
    c = common.cluster_bootstrap_ci([b for b, _ in res], seed=0)      # clustered by question
    canary0 = canary0 or c
    rec["canary"], rec["canary_alarm"] = c, canary_alarm(c, canary0)
    if rec["canary_alarm"]:
        tqdm.write(f"ALARM step {rec['step']}: canary accuracy {common.fmt_ci(c, False)} fell below its start {canary0['mean']:.2f}")
    return canary0


def rollouts_on_Q(args, policy, Q, step, rec):
    """N rollouts on Q on their own seed stream, then --correction-turns retries of the wrong ones.
    Returns ([Rollout] (N,), the turn each final rollout came from)."""
    tok, prompt = policy.tok, common.question_prompt(policy.tok, Q, instruction=INTROSPECT_HINT)
    prompts = [prompt] * args.N
    samples = common.sample(policy.rollout, tok, [prompt], n=args.N, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, stop=ROLLOUT_STOP, progress="rollouts on Q",
                            row_seeds=[common.stream_seed(args.seed, "rollout", step, j) for j in range(args.N)])
    rewards, turns = [common.verify(Q, s.text)[0] for s in samples], [0] * args.N
    rec["accuracy_Q_first_turn"] = common.mean_ci(rewards, binary=True)
    for turn in range(1, args.correction_turns + 1):
        wrong = [i for i, r in enumerate(rewards) if r == 0]
        if not wrong:
            break
        retry = [correction_prompt(tok, prompts[i], samples[i].text) for i in wrong]
        again = common.sample(policy.rollout, tok, retry, n=1, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, stop=ROLLOUT_STOP,
                              row_seeds=[common.stream_seed(args.seed, "correction", step, turn, i) for i in wrong])
        for i, p_i, s in zip(wrong, retry, again):
            prompts[i], samples[i], turns[i], rewards[i] = p_i, s, turn, common.verify(Q, s.text)[0]
    if args.correction_turns:
        rec["correct_by_turn"] = [sum(1 for i in range(args.N) if turns[i] == t and rewards[i] == 1)
                                  for t in range(args.correction_turns + 1)]
    rec["accuracy_Q"] = common.mean_ci(rewards, binary=True)
    rollouts = [common.Rollout(Q, common.encode(tok, p), s.token_ids, s.text, r, "", s.logprobs)
                for p, s, r in zip(prompts, samples, rewards)]
    return rollouts, turns


def introspections(tok, rollouts, max_intros, rec):
    """(rollout index, lesson) of correct rollouts that wrote a closed introspection, at most max_intros."""
    intros = [(i, extract_introspection(tok, r.completion_ids)) for i, r in enumerate(rollouts)]
    wrote = [i for i, r in intros if r is not None]
    rec["introspected"] = len(wrote) / len(rollouts)
    rec["intro_tokens"] = float(np.mean([sum(introspection_mask(tok, rollouts[i].completion_ids))
                                         for i in wrote])) if wrote else 0.0
    return [(i, r) for i, r in intros if r is not None and rollouts[i].reward == 1][:max_intros]


def transfer(args, policy, Q, Q_prime, lessons, step, rec):
    """A_intro of each lesson on the K questions Q' and its validation on Q, paired, on the
    "transfer" stream; Q's known-good lesson (the oracle) goes through the same machinery, never
    trained on. Returns ([A per lesson], [validation per lesson])."""
    oracle = Q.lesson if args.oracle and Q.lesson else None
    scored = lessons + ([oracle] if oracle else [])
    if not scored:
        return [], []
    res = score_lessons(policy.rollout, policy.tok, [(q, scored) for q in Q_prime + [Q]], args.M, args.temperature,
                        args.seed, "transfer", (step,), args.answer_tokens, progress="transfer rollouts")
    K = len(Q_prime)
    both = [paired_advantage([res[j][1][k] for j in range(K)], [res[j][0] for j in range(K)]) for k in range(len(scored))]
    both_val = [paired_advantage([res[-1][1][k]], [res[-1][0]]) for k in range(len(scored))]
    if oracle:
        drop = ("diffs", "var_paired", "var_unpaired")
        rec["A_oracle"] = {**{k: v for k, v in both[-1].items() if k not in drop}, "diffs": both[-1]["diffs"].tolist()}
        rec["val_oracle"] = {k: v for k, v in both_val[-1].items() if k not in drop}
    # how much pairing cuts the variance of the estimate, over every lesson scored (oracle too)
    rec["var_paired"] = float(np.nansum([a["var_paired"] for a in both]))
    rec["var_unpaired"] = float(np.nansum([a["var_unpaired"] for a in both]))
    A, val = both[:len(lessons)], both_val[:len(lessons)]
    if A:
        rec["A_intro"], rec["validation"] = pooled_advantage(A), pooled_advantage(val)
    return A, val


def update(args, policy, rollouts, advantages) -> dict:
    """The policy gradient on the introspection tokens of positively scored rollouts."""
    comp = [r.completion_ids for r in rollouts]
    lp = common.token_logprobs(policy.model, [r.prompt_ids for r in rollouts], comp,
                               temperature=args.temperature, pad_id=policy.tok.pad_token_id)
    mask = torch.zeros_like(lp["mask"])
    for b, c in enumerate(comp):
        mask[b, :len(c)] = torch.tensor(introspection_mask(policy.tok, c))
    adv = torch.tensor([max(a, 0.0) for a in advantages], device=policy.device)    # clamp(A_intro, min=0)
    loss = pg_loss(lp["logprobs"], mask, adv)
    # how far the rollout policy (a bf16 copy) is from the trained one, on the trained tokens
    rec = {"loss": float(loss.detach()),
           "logprob_mismatch": common.logprob_mismatch([r.logprobs for r in rollouts], lp["logprobs"], mask)}
    if not torch.isfinite(loss):
        policy.opt.zero_grad(set_to_none=True)
        rec["skipped"] = f"non-finite loss {float(loss)}"
    else:
        loss.backward()
        # measured, not lr x grad: at SGD lr 1e-6 and clip 1 most weights do not move
        rec.update(common.optimizer_step(policy, args.clip, measure=True))
    if rec.get("skipped"):
        tqdm.write(f"step: {rec['skipped']}, update skipped")
    return rec


def record_library(library, out, Q, Q_prime, step, cands, A, val, turns, updated):
    for (i, r), a, v in zip(cands, A, val):
        library["entries"].append({
            "id": f"s{step:04d}-r{i:02d}", "text": r, "cluster": Q.cluster, "subtype": Q.subtype,
            "source_question": Q.id, "step": step, "turn": turns[i],
            "A_intro": {**{x: a[x] for x in ("mean", "lo", "hi", "n")}, "transfer_questions": [q.id for q in Q_prime]},
            "validation": {x: v[x] for x in ("mean", "lo", "hi", "n")},
            "used_for_update": i in updated, "meta_gaming": bool(META_GAMING.search(r))})
    common.save_bank(out / "library.json", library)


# ----------------------------------------------------------------------------
# flags and main


def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]), data="data/procedural.jsonl")
    count = common.at_least(1)
    p.add_argument("--steps", type=count, default=20, help="training steps (one question Q each)")
    p.add_argument("--N", type=count, default=16, help="rollouts on Q (the paper's N)")
    p.add_argument("--M", type=count, default=4, help="transfer rollouts per arm on each Q'")
    p.add_argument("--transfer-questions", type=count, default=1, help="K questions Q' per introspection")
    p.add_argument("--transfer-by", choices=["subtype", "cluster"], default="subtype")
    p.add_argument("--max-intros", type=count, default=4, help="at most this many introspections scored per step")
    # log-probs are divided by the temperature in training: 0 would make every update NaN
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--max-new-tokens", type=count, default=64, help="rollout length on Q")
    p.add_argument("--answer-tokens", type=count, default=16, help="rollout length on Q' (answer only)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd (the paper: no momentum) or adamw (torch defaults: betas 0.9/0.999, weight decay 0.01)")
    p.add_argument("--lr", type=common.positive, default=1e-6)
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--canary-every", type=count, default=4)
    p.add_argument("--canary-samples", type=count, default=4)
    p.add_argument("--save-every", type=count, default=1, help="checkpoint every this many steps")
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="also score Q's known-good lesson through the same machinery (no update)")
    p.add_argument("--correction-turns", type=common.at_least(0), default=0, help="multi-turn ablation: 'wrong, try again' turns")
    p.add_argument("--matrix-M", type=common.at_least(0), default=4, help="rollouts per arm in the final transfer matrix (0: skip)")
    p.add_argument("--include-controls", action="store_true", help="also train on negative-control clusters")
    return p


def make_split(args):
    """Canary (the first question of each sub-type), the pool the rest of the run draws from, and the
    training order. Data first: a bad file fails before the model loads."""
    questions = common.load_questions(args.data)
    canary = list({(q.cluster, q.subtype): q for q in reversed(questions)}.values())
    canary_ids = {q.id for q in canary}
    pool = [q for q in questions if q.id not in canary_ids]
    train = [q for q in pool if (args.include_controls or not q.meta.get("negative_control"))
             and transfer_pool(pool, q, args.transfer_by)]
    if not train:
        raise common.UserError(f"{args.data}: no question has a Q' of the same {args.transfer_by} outside "
                               f"the canary set (the first question of each sub-type); every type needs at least 3")
    order = [train[i] for i in np.random.default_rng(args.seed).permutation(len(train))]
    return {"canary": canary, "pool": pool, "train": train, "order": order}


def main():
    args = build_parser().parse_args()
    split = make_split(args)
    out = common.setup_run(args, "grpo_introspect")
    print(f"run folder: {out}\ntraining on {len(split['train'])} questions, canary {len(split['canary'])}, data {args.data}")
    if args.oracle and not any(q.lesson for q in split["train"]):
        print(f"note: {args.data} has no 'lesson' fields, so the oracle is skipped")
    policy = train(args, out, split)
    write_report(out, args, policy.rollout, policy.tok, common.load_bank(out / "library.json", "introspection-library"),
                 split["pool"])
    print(f"library: {out / 'library.json'}\nmetrics: {out / 'metrics.jsonl'}\nreport:  {out / 'report.md'}")


# ----------------------------------------------------------------------------
# report


def type_key(t):
    """Sort key of a (cluster, subtype) type; a cluster may mix named sub-types and none."""
    return t[0], t[1] or ""


def by_step(entries, key):
    """Per-step groups of one value per introspection: lessons of one step share Q', its baseline
    rows and their random numbers, so the step (not the lesson) is the independent unit."""
    groups = {}
    for e in entries:
        groups.setdefault(e["step"], []).append(e[key]["mean"])
    return list(groups.values())


def write_report(out, args, model, tok, library, pool):
    fmt = common.fmt_ci
    metrics = common.read_metrics(out)
    entries = library["entries"]
    lines = [f"# GRPO on the introspection advantage: {out.name}", "",
             f"`{common.command_line()}`", "",
             "Intervals are 95%: Newcombe's paired-binary interval for one lesson on one Q' (M pairs); "
             "bootstraps clustered by baseline row (a step's lessons), by step (the run's lessons) and "
             "by question (the canary), since those samples are not independent.", "",
             "## Per step", "",
             "| step | Q | acc on Q | introspected | A_intro (pooled over r) | validation | oracle A | updated | "
             "grad norm | weight change | canary |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        wc = m.get("weight_change")
        wc = f"{wc['norm']:.1e} ({wc['frac_changed']:.0%} moved)" if wc else "-"
        lines.append(f"| {m['step']} | {m['question']} | {fmt(m['accuracy_Q'], False)} | {m['introspected']:.2f} | "
                     f"{fmt(m.get('A_intro'))} | {fmt(m.get('validation'))} | {fmt(m.get('A_oracle'))} | "
                     f"{m['updated']} | {'-' if m['grad_norm'] is None else round(m['grad_norm'], 3)} | {wc} | "
                     f"{fmt(m.get('canary'), False)}{' ALARM' if m.get('canary_alarm') else ''} |")
    vp, vu = sum(m.get("var_paired", 0) for m in metrics), sum(m.get("var_unpaired", 0) for m in metrics)
    oracle = [m["A_oracle"]["diffs"] for m in metrics if m.get("A_oracle")]
    changes = [m["weight_change"] for m in metrics if m.get("weight_change")]
    lines += ["", "## Summary", "",
              f"- introspections scored: {len(entries)}; used for an update: {sum(e['used_for_update'] for e in entries)}",
              f"- regularisation advantage (A_intro on Q' != Q), mean over introspections, clustered by step: "
              f"{fmt(common.cluster_bootstrap_ci(by_step(entries, 'A_intro')))}",
              f"- validation advantage (same question Q): {fmt(common.cluster_bootstrap_ci(by_step(entries, 'validation')))}",
              f"- oracle (the data's known-good lesson) A on Q', paired differences clustered by step: "
              f"{fmt(common.cluster_bootstrap_ci(oracle)) if oracle else 'not run (--no-oracle, or no lessons in the data)'}",
              f"- variance of the A estimates, paired / unpaired sampling: {vp / vu:.2f} (summed over every lesson scored)"
              if vu > 0 else "- paired / unpaired variance: no lesson scored with any variance",
              f"- meta-gaming flagged: {sum(e['meta_gaming'] for e in entries)} of {len(entries)}"]
    if changes:
        lines.append(f"- realised weight change per update ({args.optimizer}, lr {args.lr:g}): norm "
                     f"{min(c['norm'] for c in changes):.1e} to {max(c['norm'] for c in changes):.1e}, "
                     f"share of weights that moved {min(c['frac_changed'] for c in changes):.1%} to "
                     f"{max(c['frac_changed'] for c in changes):.1%} ({len(changes)} updates)")
    else:
        lines.append("- no update was applied, so the weights are the starting ones")
    by_turn = {}
    for e in entries:
        by_turn.setdefault(e["turn"], []).append(e["meta_gaming"])
    if args.correction_turns:
        lines += ["", "| correction turn | introspections | meta-gaming flagged |", "|---|---|---|"]
        lines += [f"| {t} | {len(v)} | {np.mean(v):.0%} |" for t, v in sorted(by_turn.items())]
    lines += ["", "## Best introspections per sub-type (by lower bound of A_intro)", ""]
    best = {}
    for e in sorted(entries, key=lambda e: -e["A_intro"]["lo"]):
        best.setdefault((e["cluster"], e["subtype"]), []).append(e)
    for (c, s), es in sorted(best.items(), key=lambda kv: type_key(kv[0])):
        for e in es[:2]:
            lines.append(f"- **{c}/{s}** A_intro {fmt(e['A_intro'])}: {e['text'][:200]!r}")

    # Transfer matrix: the best introspection of sub-type X re-scored on a question of sub-type Y.
    # The rows were chosen by their lower bound, so reusing the scores that chose them would carry
    # the winner's curse: every cell is a fresh measurement, on a question that was neither the
    # source Q nor a Q' of any row's lesson, with its own seed stream.
    if args.matrix_M and best:
        keys = sorted({(q.cluster, q.subtype) for q in pool}, key=type_key)
        rows = {k: v[0] for k, v in best.items()}
        used = {e["source_question"] for e in rows.values()} | {
            q for e in rows.values() for q in e["A_intro"]["transfer_questions"]}
        rng = random.Random(common.stream_seed(args.seed, "matrix-target"))
        target = {}
        for k in keys:
            fresh = [q for q in pool if (q.cluster, q.subtype) == k and q.id not in used]
            if fresh:
                target[k] = rng.choice(fresh)
        cols = [k for k in keys if k in target]
        res = score_lessons(model, tok, [(target[k], [rows[x]["text"] for x in rows]) for k in cols], args.matrix_M,
                            args.temperature, args.seed, "matrix", (), args.answer_tokens, progress="transfer matrix")
        lines += ["", f"## Transfer matrix (rows: best introspection from sub-type X; columns: a fresh question of "
                      f"sub-type Y, never its Q or Q'; A = R(Y + r) - R(Y), {args.matrix_M} paired rollouts per cell, "
                      f"Newcombe 95% interval)", ""]
        if len(cols) < len(keys):
            lines += [f"No fresh question left for: {', '.join(f'{c}/{s}' for c, s in keys if (c, s) not in target)}.", ""]
        lines += ["| from \\ on | " + " | ".join(f"{c}/{s}" for c, s in cols) + " |", "|---|" + "---|" * len(cols)]
        for ri, x in enumerate(rows):
            cells = []
            for ci in range(len(cols)):
                d = common.paired_binary_ci(res[ci][1][ri], res[ci][0])
                cells.append(f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]")
            lines.append(f"| {x[0]}/{x[1]} | " + " | ".join(cells) + " |")
    common.write_report(out, lines)


if __name__ == "__main__":
    common.run_main(main)
