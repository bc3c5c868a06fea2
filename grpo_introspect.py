"""Phase 1 of the Introspection GRPO paper: GRPO rewarded by the introspection advantage.

Per step, on one question Q ("GRPO Training Procedure"): 1. N rollouts on Q; the prompt allows, never
forces, <introspection>...</introspection> after the answer. 2. A lesson r_i from each correct
rollout that closed its tag. 3. Transfer: M rollouts on each of K questions Q' with r_i injected,
and M without, paired row by row. 4. A_intro(r_i) = R_bar(Q' + r_i) - R_bar(Q'). 5. Policy gradient
on the introspection tokens, weighted by clamp(A_intro, min=0).

Deviations, numbered:
  1. No KL and no reference model; one step per batch (on-policy), so no PPO ratio or clipping.
  2. Token-level normalisation by the step's total count of trained introspection tokens.
  3. --gate mean trains a lesson whose mean A_intro > 0 (the paper); --gate lower only one whose
     95% lower bound is > 0. --transfer-by fact draws Q' that ask the same fact as Q.
  4. --preset paper is the paper's SGD lr 1e-6, clip 1: a step moves ||dtheta|| <= 1e-6, so the
     realised change is logged per update (weight_change), never inferred from lr x grad.
  5. Beyond the paper: own seed streams per purpose, paired sampling, a 95% interval on every
     A_intro, the oracle (the data's lesson scored alike), a canary with an alarm, a before/after
     evaluation on held-out facts (eval.json), and --correction-turns with a meta-gaming flag.

    python grpo_introspect.py --model gemma                               # default CPU run
    python grpo_introspect.py --model gemma --transfer-by fact --gate lower --steps 200 --device cuda
    python grpo_introspect.py --out runs/NAME --resume                     # continue after a kill
"""
import argparse
import json
import math
import random
import re
import time

import numpy as np
import torch
from tqdm import tqdm

import common

# A base model has never seen the tag: two solved examples show the format, one per answer style
# (a letter; words after a cue), on topics that are none of the data's clusters. With one example
# the embedded Gemma wrote no introspection in 32 rollouts; with these two, 14 of 32.
INTROSPECT_HINT = (
    "After the answer you may write a lesson that would help with similar questions, inside "
    "<introspection> and </introspection>.\n\n"
    "Question: In the game of Tarn, which piece moves first?\nA) the king\nB) the pawn\nC) the rook\n"
    "Answer: C <introspection>In Tarn the rook always moves first, before any other piece.</introspection>\n\n"
    "Question: In the Orra tongue, what does the word sel mean?\nA) salt\nB) sun\nC) sea\n"
    "Answer: In Orra, sel means sun. <introspection>In Orra, sel means sun and mar means sea.</introspection>")
OPEN, CLOSE = "<introspection>", "</introspection>"
ROLLOUT_STOP, ANSWER_STOP = [CLOSE, "\nQuestion:", "\n\n"], ["\n"]
CORRECTION_TURN = "That answer is wrong. Try again."
# Lessons about test-taking rather than the domain (paper, "Meta-Gaming").
META_GAMING = re.compile(
    r"\b(option|options|choice|choices|letter|multiple[- ]choice|rejected|extreme|exam|test[- ]taking"
    r"|guess|eliminat\w*|the answer is (usually|often|always))\b", re.I)
# --preset: (optimizer, lr, clip). "paper" is the paper's; the default was chosen by the recorded
# sweep in results/grpo-optimizer-sweep/ (its rule fixed in RULE.md before the runs).
PRESETS = {"paper": ("sgd", 1e-6, 1.0), "sgd-1e-2": ("sgd", 1e-2, 1.0),
           "adamw-1e-6": ("adamw", 1e-6, 1.0), "adamw-1e-5": ("adamw", 1e-5, 1.0)}
DEFAULT_PRESET = "paper"

# ----------------------------------------------------------------------------
# the maths

def introspection_span(text: str) -> tuple[int, int] | None:
    """The span from the (last) opening tag to the end of the first closing tag, or None: the one
    span that defines both the lesson scored and the tokens trained."""
    close = text.find(CLOSE)
    start = text.rfind(OPEN, 0, close) if close >= 0 else -1
    return None if start < 0 else (start, close + len(CLOSE))

def extract_introspection(tok, ids: list[int]) -> str | None:
    """The lesson of a rollout (its completion ids): the text inside its closed introspection, or None."""
    text = tok.decode(ids, skip_special_tokens=True)
    span = introspection_span(text)
    return (text[span[0] + len(OPEN):span[1] - len(CLOSE)].strip() if span else "") or None

def introspection_mask(tok, ids: list[int]) -> list[bool]:
    """True on the completion tokens whose characters overlap the introspection span. Both tags are
    trained (the decisions to write and to stop); Gemma merges punctuation with tags (".<", ">."),
    so a token straddling the span's edge is trained too. Characters come from decoded prefixes."""
    span = introspection_span(tok.decode(ids, skip_special_tokens=True))
    if span is None:
        return [False] * len(ids)
    ends, e = [], 0
    for j in range(len(ids)):
        e = max(e, len(tok.decode(ids[:j + 1], skip_special_tokens=True)))
        ends.append(e)
    return [st < span[1] and en > span[0] for st, en in zip([0] + ends[:-1], ends)]

def paired_binary_ci(a, b) -> dict:
    """95% interval for mean(a) - mean(b) over paired 0/1 outcomes: Newcombe's hybrid score
    interval (1998, method 10). Never zero width: four pairs all differing by 1 give about
    [+0.2, +1.0], four equal pairs about [-0.5, +0.5]."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    n = len(a)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if not np.all(np.isin(a, (0, 1)) & np.isin(b, (0, 1))):
        raise ValueError("paired_binary_ci needs 0/1 values")
    e, f = float(np.sum((a == 1) & (b == 1))), float(np.sum((a == 1) & (b == 0)))
    g, h = float(np.sum((a == 0) & (b == 1))), float(np.sum((a == 0) & (b == 0)))
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = common.wilson(e + f, n)
    l2, u2 = common.wilson(e + g, n)
    den = (e + f) * (g + h) * (e + g) * (f + h)
    # Newcombe's corrected phi: a positive correlation is shrunk by n/2, else all-equal pairs give zero width
    num = e * h - f * g
    num = max(num - n / 2, 0.0) if num > 0 else num
    phi = num / math.sqrt(den) if den > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return {"mean": d, "lo": max(lo, -1.0), "hi": min(hi, 1.0), "n": n}


def paired_advantage(with_r, base) -> dict:
    """A = R_bar(Q' + r) - R_bar(Q') for one lesson; with_r, base: one 0/1 array per Q' (row j of
    both arms on one Q' shared its random numbers). Interval: Newcombe's paired-binary one over
    the M pairs on one Q', a bootstrap clustered by Q' on several. lo_pairs: Newcombe's over all
    K*M pairs (what --gate lower uses below MIN_CLUSTERS Q'). Also the unpaired variance."""
    w, b = [np.asarray(x, float).ravel() for x in with_r], [np.asarray(x, float).ravel() for x in base]
    W, Bs = np.concatenate(w), np.concatenate(b)
    pairs, n = paired_binary_ci(W, Bs), len(W)
    ci = pairs if len(w) == 1 else common.cluster_bootstrap_ci([x - y for x, y in zip(w, b)], seed=0)
    var = lambda f: f() / n if n > 1 else float("nan")
    return {**ci, "lo_pairs": pairs["lo"], "var_paired": var(lambda: (W - Bs).var(ddof=1)),
            "var_unpaired": var(lambda: W.var(ddof=1) + Bs.var(ddof=1)), "diffs": W - Bs}

def pooled_advantage(advs: list[dict]) -> dict:
    """The mean over every paired difference of a step's lessons, bootstrapped by baseline row: the
    lessons on one Q' share its M baseline rows and their random numbers."""
    D = np.stack([a["diffs"] for a in advs])                     # (lessons, K*M)
    return common.cluster_bootstrap_ci([D[:, j] for j in range(D.shape[1])], seed=0)

def passes_gate(a: dict, gate: str) -> bool:
    """--gate mean: A_intro's mean > 0 (the paper). --gate lower: its 95% lower bound > 0, the bound
    over Q' clusters when there are MIN_CLUSTERS of them, else Newcombe's over the K*M pairs; an
    interval that could not be formed (nan) never passes; one pair of +1 gives lo = -0.12, two +0.07."""
    if gate == "mean":      # the paper
        return a["mean"] > 0
    lo = a["lo"] if a.get("n_clusters", common.MIN_CLUSTERS) >= common.MIN_CLUSTERS else a["lo_pairs"]
    return bool(np.isfinite(lo) and lo > 0)

pg_loss = common.pg_loss     # -sum_i A_i sum_t log pi(y_it) / number of trained tokens (token-mean)

def canary_alarm(c: dict, c0: dict) -> bool:
    """Alarm when the canary's whole interval lies below the run's first canary accuracy."""
    return bool(c["hi"] < c0["mean"])


# ----------------------------------------------------------------------------
# train

def train(args, out, split) -> common.Policy:
    """The paper's loop: per step, rollouts on Q, introspections, transfer, A_intro, update. The
    policy is evaluated once before its first step (evaluate, "before")."""
    policy = common.load_policy(args, out)
    library = resume_library(out, policy.step) if args.resume else common.load_bank(out / "library.json", "introspection-library")
    # the alarm compares with the run's first canary, also after a resume
    canary0 = next((m["canary"] for m in common.read_metrics(out) if "canary" in m), None)
    print(f"weights in {next(policy.model.parameters()).dtype}, rollouts in {next(policy.rollout.parameters()).dtype}")
    if policy.step == 0:
        evaluate(args, policy, split, out, "before")
    bar = tqdm(range(policy.step, args.steps), desc="GRPO steps", initial=policy.step, total=args.steps)
    for step in bar:
        t0 = time.time()
        Q = split["order"][step % len(split["order"])]
        rec = {"step": step, "question": Q.id, "cluster": Q.cluster, "subtype": Q.subtype}
        if step % args.canary_every == 0 or step == policy.step:
            canary0 = check_canary(args, policy, split["canary"], rec, canary0)
        rollouts, turns = rollouts_on_Q(args, policy, Q, step, rec)                     # 1. N rollouts on Q
        cands = introspections(policy.tok, rollouts, args.max_intros, rec)              # 2. lessons r_i
        Q_prime = pick_Q_prime(args, split["pool"], Q, step)                            # 3. K questions Q'
        A, val = transfer(args, policy, Q, Q_prime, [r for _, r in cands], step, rec)   # 3-4. A_intro
        upd = [(i, a["mean"]) for (i, _), a in zip(cands, A) if passes_gate(a, args.gate)]
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
    policy.step = args.steps
    return policy


# ----------------------------------------------------------------------------
# the pieces, in the order train() calls them

def resume_library(out, start):
    """The library without the introspections of steps past the checkpoint (they are redone)."""
    library = common.load_bank(out / "library.json", "introspection-library")
    n, library["entries"] = len(library["entries"]), [e for e in library["entries"] if e["step"] < start]
    common.save_bank(out / "library.json", library)
    print(f"resuming {out} at step {start} ({len(library['entries'])} introspections kept, {n - len(library['entries'])} redone)")
    return library

def check_canary(args, policy, canary, rec, canary0):
    """Accuracy on held-out questions without introspection (the paper's collapse to "N/A"), with the
    same row seeds at every check, so a change is the model's, not the noise's."""
    if not canary:          # a type without a dev fact has no canary question
        return canary0
    res = score_lessons(policy.rollout, policy.tok, [(q, []) for q in canary], args.canary_samples,
                        args.temperature, args.seed, "canary", (), args.answer_tokens, progress="canary")
    c = common.cluster_bootstrap_ci([b for b, _ in res], seed=0)      # clustered by question
    canary0 = canary0 or c
    rec["canary"], rec["canary_alarm"] = c, canary_alarm(c, canary0)
    if rec["canary_alarm"]:
        tqdm.write(f"ALARM step {rec['step']}: canary accuracy {common.fmt_ci(c, False)} fell below its start {canary0['mean']:.2f}")
    return canary0

def score_lessons(model, tok, pairs, M, temperature, seed, stream, key, max_new_tokens, progress=None):
    """pairs: (question, [lesson, ...]). M baseline rows and M rows per lesson on each question, in
    one sampler call, paired by common.score's row-seed rule. Per pair: (base (M,), [with r (M,)])."""
    qs = [q for q, lessons in pairs for _ in range(1 + len(lessons))]
    prompts = [common.question_prompt(tok, q, lesson=r) for q, lessons in pairs for r in [None] + lessons]
    rewards = common.score(model, tok, qs, prompts, M, seed, stream, key, max_new_tokens=max_new_tokens,
                           temperature=temperature, stop=ANSWER_STOP, progress=progress).rewards   # (P, M)
    starts = np.cumsum([0] + [1 + len(lessons) for _, lessons in pairs])
    return [(rewards[k], list(rewards[k + 1:k + 1 + len(ls)])) for k, (_, ls) in zip(starts, pairs)]

def correction_prompt(tok, prompt: str, text: str) -> str:
    """prompt + a wrong answer + "wrong, try again": plain text for a base model; under a chat
    template the answer closes the assistant turn and the retry request is a new user turn."""
    if not getattr(tok, "chat_template", None):
        return prompt + text + f"\n{CORRECTION_TURN}\nAnswer:"
    turns = lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
    first = [{"role": "user", "content": "Q"}]
    retry = first + [{"role": "assistant", "content": text}, {"role": "user", "content": CORRECTION_TURN}]
    return prompt + turns(retry)[len(turns(first)):]

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
        rec["correct_by_turn"] = [sum(t == u and r == 1 for u, r in zip(turns, rewards)) for t in range(args.correction_turns + 1)]
    rec["accuracy_Q"] = common.mean_ci(rewards, binary=True)
    return [common.Rollout(Q, common.encode(tok, p), s.token_ids, s.text, r, "", s.logprobs)
            for p, s, r in zip(prompts, samples, rewards)], turns

def introspections(tok, rollouts, max_intros, rec):
    """(rollout index, lesson) of correct rollouts that wrote a closed introspection, at most max_intros."""
    intros = [(i, extract_introspection(tok, r.completion_ids)) for i, r in enumerate(rollouts)]
    wrote = [i for i, r in intros if r is not None]
    rec["introspected"] = len(wrote) / len(rollouts)
    rec["intro_tokens"] = float(np.mean([sum(introspection_mask(tok, rollouts[i].completion_ids)) for i in wrote] or [0]))
    return [(i, r) for i, r in intros if r is not None and rollouts[i].reward == 1][:max_intros]

def answer_text(q) -> str:
    """The words of q's right answer: the right option's text, or the answer itself."""
    return q.choices[common.LETTERS.index(q.answer)] if q.choices else q.answer

def mentions(text: str, words: str) -> bool:     # as whole words, any case
    return re.search(rf"\b{re.escape(words)}\b", text, re.I) is not None

def same_fact(q, x) -> bool:
    """x asks q's fact: the same cue stem ("In Brill, tesk means"), or the same type and answer words."""
    norm = common.normalise_text
    return (bool(q.cue and x.cue) and norm(q.cue) == norm(x.cue)) or (
        (x.cluster, x.subtype) == (q.cluster, q.subtype) and norm(answer_text(x)) == norm(answer_text(q)))

def transfer_pool(questions, q, by):
    """Q' candidates: another text (text_key; another id of Q's text is Q) of Q's sub-type, cluster or fact."""
    ok = {"subtype": lambda x: (x.cluster, x.subtype) == (q.cluster, q.subtype),
          "cluster": lambda x: x.cluster == q.cluster, "fact": lambda x: same_fact(q, x)}[by]
    return [x for x in questions if ok(x) and common.text_key(x) != common.text_key(q)]

def pick_Q_prime(args, pool, Q, step):
    """K questions Q' from transfer_pool on the "pick-Q'" stream, one per distinct text before repeating."""
    groups = {}
    for x in transfer_pool(pool, Q, args.transfer_by):
        groups.setdefault(common.text_key(x), []).append(x)
    texts = list(groups)
    random.Random(common.stream_seed(args.seed, "pick-Q'", step)).shuffle(texts)
    deep = max((len(g) for g in groups.values()), default=0)
    return [groups[t][i] for i in range(deep) for t in texts if i < len(groups[t])][:args.transfer_questions]

def transfer(args, policy, Q, Q_prime, lessons, step, rec):
    """A_intro of each lesson on the K questions Q' and its validation on Q, paired, on the
    "transfer" stream; Q's known-good lesson (the oracle) goes through the same machinery, never
    trained on. Returns ([A per lesson], [validation per lesson])."""
    oracle = Q.lesson if args.oracle and Q.lesson else None
    scored = lessons + ([oracle] if oracle else [])
    if not scored or not Q_prime:
        return [], []
    res = score_lessons(policy.rollout, policy.tok, [(q, scored) for q in Q_prime + [Q]], args.M, args.temperature,
                        args.seed, "transfer", (step,), args.answer_tokens, progress="transfer rollouts")
    both = [paired_advantage([w[k] for _, w in res[:-1]], [b for b, _ in res[:-1]]) for k in range(len(scored))]
    both_val = [paired_advantage([res[-1][1][k]], [res[-1][0]]) for k in range(len(scored))]
    keep = lambda a: {k: v for k, v in a.items() if k not in ("diffs", "var_paired", "var_unpaired")}
    if oracle:
        rec["A_oracle"], rec["val_oracle"] = {**keep(both[-1]), "diffs": both[-1]["diffs"].tolist()}, keep(both_val[-1])
    # how much pairing cuts the variance of the estimate, over every lesson scored (oracle too)
    rec.update({v: float(np.nansum([a[v] for a in both])) for v in ("var_paired", "var_unpaired")})
    A, val = both[:len(lessons)], both_val[:len(lessons)]
    if A:
        rec["A_intro"], rec["validation"] = pooled_advantage(A), pooled_advantage(val)
    return A, val

def update(args, policy, rollouts, advantages) -> dict:
    """The policy gradient on the introspection tokens of the rollouts whose lesson passed the gate."""
    comp = [r.completion_ids for r in rollouts]
    lp = common.token_logprobs(policy.model, [r.prompt_ids for r in rollouts], comp,
                               temperature=args.temperature, pad_id=policy.tok.pad_token_id)
    mask = torch.zeros_like(lp["mask"])                                             # (B, T)
    for b, c in enumerate(comp):
        mask[b, :len(c)] = torch.tensor(introspection_mask(policy.tok, c))
    adv = torch.tensor([max(a, 0.0) for a in advantages], device=policy.device)    # clamp(A_intro, min=0)
    loss = pg_loss(lp["logprobs"], mask, adv)
    # how far the rollout policy (a bf16 copy) is from the trained one, on the trained tokens
    rec = {"loss": float(loss.detach()), "logprob_mismatch": common.logprob_mismatch([r.logprobs for r in rollouts], lp["logprobs"], mask)}
    if not torch.isfinite(loss):
        policy.opt.zero_grad(set_to_none=True)
        rec["skipped"] = f"non-finite loss {float(loss)}"
    else:
        loss.backward()
        # measured, not lr x grad: at SGD lr 1e-6 most weights do not move; AdamW's first step moves
        # almost every weight by ~lr whatever the gradient's size (||dtheta|| ~ lr * sqrt(#weights))
        rec.update(common.optimizer_step(policy, args.clip, measure=True))
    if rec.get("skipped"):
        tqdm.write(f"step: {rec['skipped']}, update skipped")
    return rec

def record_library(library, out, Q, Q_prime, step, cands, A, val, turns, updated):
    for (i, r), a, v in zip(cands, A, val):
        library["entries"].append({
            "id": f"s{step:04d}-r{i:02d}", "text": r, "cluster": Q.cluster, "subtype": Q.subtype,
            "source_question": Q.id, "step": step, "turn": turns[i],
            "A_intro": {**{x: a[x] for x in ("mean", "lo", "hi", "n", "lo_pairs")}, "transfer_questions": [q.id for q in Q_prime]},
            "validation": {x: v[x] for x in ("mean", "lo", "hi", "n")},
            "used_for_update": i in updated, "meta_gaming": bool(META_GAMING.search(r))})
    common.save_bank(out / "library.json", library)


# ----------------------------------------------------------------------------
# evaluation

def evaluate(args, policy, split, out, when) -> dict:
    """The policy before its first step (when="before") and after its last ("after"), on held-out
    questions (split[args.eval_on]: never a Q or Q' of training, nor a text of one), with the same
    row seeds both times ("eval" stream keyed by question id), so the changes are paired. After
    training also the paired changes and the transfer matrix. Writes eval.json."""
    path = out / "eval.json"
    ev = json.loads(path.read_text()) if path.exists() else {}
    if args.eval_samples and ev.get(when, {}).get("step") != policy.step:
        ev[when] = snapshot(args, policy, split[args.eval_on], split[args.eval_on + "_pool"])
    if when == "after" and "before" in ev and "after" in ev:
        ev["changes"] = changes(ev["before"], ev["after"], args.seed)
    if when == "after" and args.matrix_M:
        ev["matrix"] = transfer_matrix(args, policy, split, common.load_bank(out / "library.json", "introspection-library"))
    common.atomic_write_json(path, ev)
    return ev

def snapshot(args, policy, qs, pool) -> dict:
    """Per held-out question (row) and sample (column): did the rollout open the tag, close it, state
    the fact asked (its answer words appear in the lesson); A of its lesson on a same-fact Q'; and
    per question the log-prob gap between the type's lesson and a wrong one."""
    tok = policy.tok
    prompts = [common.question_prompt(tok, q, instruction=INTROSPECT_HINT) for q in qs]
    s = common.score(policy.rollout, tok, qs, prompts, args.eval_samples, args.seed, "eval", (0,),
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature, stop=ROLLOUT_STOP,
                     progress="evaluation")
    lessons = [[extract_introspection(tok, x.token_ids) for x in row] for row in s.samples]
    return {"step": policy.step, "questions": [q.id for q in qs], "lessons": lessons, "accuracy": s.rewards.tolist(),
            "opened": [[float(OPEN in tok.decode(x.token_ids, skip_special_tokens=True)) for x in row] for row in s.samples],
            "closed": [[float(r is not None) for r in row] for row in lessons],
            "fact": [[float(r is not None and mentions(r, answer_text(q))) for r in row] for q, row in zip(qs, lessons)],
            "A": lesson_values(args, policy, qs, pool, lessons), "gap": lesson_gap(policy, qs)}

def lesson_values(args, policy, qs, pool, lessons) -> list:
    """A = R_bar(Q' + r) - R_bar(Q') of each sample's lesson r on the first held-out Q' of another
    text that asks the same fact, M paired rows per arm ("eval" stream, key 1); 0 for a sample that
    wrote no lesson (nothing is injected); None for a question with no such Q'."""
    Q_prime = [next((x for x in pool if same_fact(q, x) and common.text_key(x) != common.text_key(q)), None) for q in qs]
    jobs = [i for i in range(len(qs)) if Q_prime[i] is not None and any(lessons[i])]
    res = score_lessons(policy.rollout, policy.tok, [(Q_prime[i], [r for r in lessons[i] if r]) for i in jobs], args.M,
                        args.temperature, args.seed, "eval", (1,), args.answer_tokens, progress="evaluation transfer")
    A = [None if Qp is None else [0.0] * args.eval_samples for Qp in Q_prime]
    for i, (base, withs) in zip(jobs, res):
        it = iter(withs)
        A[i] = [float(np.mean(next(it) - base)) if r else 0.0 for r in lessons[i]]
    return A

def wrong_lesson(q, qs) -> str | None:
    """q's lesson with its right answer swapped for a wrong option it also names ("red means stop,
    green means go"): the same words, the wrong fact. Else an unrelated type's lesson; else None."""
    for w in [c.split() for c in (q.choices or []) if c != answer_text(q)]:
        r = answer_text(q).split()
        while r and w and r[-1] == w[-1]:           # "go on Bel" vs "turn left on Bel": swap go / turn left
            r, w = r[:-1], w[:-1]
        r, w = " ".join(r), " ".join(w)
        if r and w and mentions(q.lesson, w) and mentions(q.lesson, r):
            swap = {r.lower(): w, w.lower(): r}
            return re.sub(rf"\b({re.escape(r)}|{re.escape(w)})\b", lambda m: swap[m.group(1).lower()], q.lesson, flags=re.I)
    return next((x.lesson for x in qs if x.lesson and x.lesson not in q.lesson and q.lesson not in x.lesson), None)

@torch.no_grad()
def lesson_gap(policy, qs) -> list:
    """log p(type's lesson) - log p(wrong lesson), nats, teacher-forced under the trained weights after
    the question, its right answer and the opening tag (answer_logprob); None where q has no lesson."""
    have = [i for i, q in enumerate(qs) if q.lesson and wrong_lesson(q, qs)]
    gap = [None] * len(qs)
    if have:
        tok = policy.tok
        pre = [common.question_prompt(tok, qs[i], instruction=INTROSPECT_HINT) + " "
               + (answer_text(qs[i]) + "." if qs[i].cue else qs[i].answer) + " " + OPEN for i in have]
        right = common.answer_logprob(policy.model, tok, pre, [qs[i].lesson + CLOSE for i in have])
        wrong = common.answer_logprob(policy.model, tok, pre, [wrong_lesson(qs[i], qs) + CLOSE for i in have])
        for i, r, w in zip(have, right, wrong):
            gap[i] = float(r - w)
    return gap


# (name, numerator key, denominator key or None): a share of samples, or a ratio of two
MEASURES = [("introspection rate", "opened", None), ("closed the tag (share of opened)", "closed", "opened"),
            ("stated the fact asked (share of closed)", "fact", "closed"), ("A_intro on a same-fact Q'", "A", None),
            ("log-prob gap, type's lesson - wrong lesson (nats)", "gap", None), ("accuracy on the question", "accuracy", None)]

def changes(b, a, seed) -> dict:
    """Each measure before, after, and after - before, with paired_bootstrap intervals: questions,
    then samples, resampled with the same indices at both times. Rows missing at either time
    (A, gap: None) are left out of that measure."""
    out = {}
    for name, num, den in MEASURES:
        keys = [num] + ([den] if den else [])
        rows = [i for i in range(len(b[num])) if all(t[k][i] is not None for t in (a, b) for k in keys)]
        if not rows:
            continue
        arms = {f"{k}{t}": np.array([[x] if np.isscalar(x) else x for x in (d[k][i] for i in rows)], float)
                for t, d in (("0", b), ("1", a)) for k in keys}
        level = lambda m, t: m[num + t] / m[den + t] if den else m[num + t]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = {"before": common.paired_bootstrap(arms, lambda m: level(m, "0"), seed),
                         "after": common.paired_bootstrap(arms, lambda m: level(m, "1"), seed),
                         "change": common.paired_bootstrap(arms, lambda m: level(m, "1") - level(m, "0"), seed)}
    return out

def transfer_matrix(args, policy, split, library) -> dict:
    """The best lesson of each type (by A_intro's lower bound) scored on one held-out question of
    every type. Reusing the scores that chose the rows would carry the winner's curse: every cell is
    a fresh measurement ("matrix" stream), on a question never a Q or Q' of training."""
    best = {}
    for e in sorted(library["entries"], key=lambda e: -np.nan_to_num(e["A_intro"]["lo"], nan=-9)):
        best.setdefault(f"{e['cluster']}/{e['subtype']}", e["text"])
    targets = {}
    for q in split[args.eval_on]:
        targets.setdefault(f"{q.cluster}/{q.subtype}", q)
    rows, cols = sorted(best), sorted(targets)
    if not rows or not cols:
        return {}
    res = score_lessons(policy.rollout, policy.tok, [(targets[c], [best[r] for r in rows]) for c in cols], args.matrix_M,
                        args.temperature, args.seed, "matrix", (), args.answer_tokens, progress="transfer matrix")
    return {"rows": rows, "cols": cols, "lessons": [best[r] for r in rows], "questions": [targets[c].id for c in cols],
            "cells": [[paired_binary_ci(res[j][1][i], res[j][0]) for j in range(len(cols))] for i in range(len(rows))]}


# ----------------------------------------------------------------------------
# report

def by_step(entries, key):
    """Per-step groups of one value per introspection: lessons of one step share Q', its baseline
    rows and their random numbers, so the step (not the lesson) is the independent unit."""
    groups = {}
    for e in entries:
        groups.setdefault(e["step"], []).append(e[key]["mean"])
    return list(groups.values())

def write_report(out) -> None:
    """report.md from the run folder alone (config.json, metrics.jsonl, library.json, eval.json)."""
    fmt, cfg, metrics = common.fmt_ci, json.loads((out / "config.json").read_text()), common.read_metrics(out)
    entries = common.load_bank(out / "library.json", "introspection-library")["entries"]
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
    wc = lambda w: f"{w['norm']:.1e} ({w['frac_changed']:.0%} moved)" if w else "-"
    lines = [f"# GRPO on the introspection advantage: {out.name}", "", f"`{cfg['argv']}`", "",
             f"Optimizer {cfg['optimizer']}, lr {cfg['lr']:g}, clip {cfg['clip']:g} (--preset {cfg.get('preset', '-')}); "
             f"Q' by {cfg['transfer_by']}, K={cfg['transfer_questions']}, gate {cfg.get('gate', 'mean')}. Intervals are 95%: Newcombe's "
             "paired-binary one for one lesson on one Q'; bootstraps clustered by baseline row, step or question.", "",
             "## Per step", ""]
    lines += common.md_table(
        ["step", "Q", "acc on Q", "introspected", "A_intro (pooled over r)", "validation", "oracle A", "updated",
         "grad norm", "weight change", "canary"],
        [[m["step"], m["question"], fmt(m["accuracy_Q"], False), f"{m['introspected']:.2f}", fmt(m.get("A_intro")),
          fmt(m.get("validation")), fmt(m.get("A_oracle")), m["updated"],
          "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3g}", wc(m.get("weight_change")),
          fmt(m.get("canary"), False) + (" ALARM" if m.get("canary_alarm") else "")] for m in metrics])
    vp, vu = sum(m.get("var_paired", 0) for m in metrics), sum(m.get("var_unpaired", 0) for m in metrics)
    oracle = [m["A_oracle"]["diffs"] for m in metrics if m.get("A_oracle")]
    ch = [m["weight_change"] for m in metrics if m.get("weight_change")]
    lines += ["", "## Summary", "",
              f"- introspections scored: {len(entries)}; used for an update: {sum(e['used_for_update'] for e in entries)}",
              f"- regularisation advantage (A_intro on Q' != Q), clustered by step: {fmt(common.cluster_bootstrap_ci(by_step(entries, 'A_intro')))}",
              f"- validation advantage (same question Q): {fmt(common.cluster_bootstrap_ci(by_step(entries, 'validation')))}",
              f"- oracle (the data's lesson) A on Q', clustered by step: {fmt(common.cluster_bootstrap_ci(oracle)) if oracle else 'not run'}",
              f"- variance of the A estimates, paired / unpaired sampling: {vp / vu:.2f}" if vu > 0 else "- paired / unpaired variance: -",
              f"- meta-gaming flagged: {sum(e['meta_gaming'] for e in entries)} of {len(entries)}",
              f"- realised weight change per update: norm {min(c['norm'] for c in ch):.1e} to {max(c['norm'] for c in ch):.1e}, "
              f"share moved {min(c['frac_changed'] for c in ch):.1%} to {max(c['frac_changed'] for c in ch):.1%} ({len(ch)} updates)"
              if ch else "- no update was applied, so the weights are the starting ones"]
    if cfg["correction_turns"]:
        turns = sorted({e["turn"] for e in entries})
        lines += [""] + common.md_table(["correction turn", "introspections", "meta-gaming flagged"], [
            [t, sum(e["turn"] == t for e in entries), sum(e["meta_gaming"] for e in entries if e["turn"] == t)] for t in turns])
    if "changes" in ev:
        n_q = len(ev["before"]["questions"])
        lines += ["", f"## Before and after training ({cfg['eval_on']} questions: {n_q} held-out texts x {cfg['eval_samples']} "
                      f"samples, the same seeds at step 0 and step {ev['after']['step']}; paired bootstrap over questions then samples)", ""]
        lines += common.md_table(["measure", "step 0", "end", "change (end - step 0)"],
                                 [[k, fmt(v["before"], False), fmt(v["after"], False), fmt(v["change"])] for k, v in ev["changes"].items()])
    lines += ["", "## Best introspections per sub-type (by lower bound of A_intro)", ""]
    best = {}
    for e in sorted(entries, key=lambda e: -np.nan_to_num(e["A_intro"]["lo"], nan=-9)):
        best.setdefault((e["cluster"], e["subtype"]), []).append(e)
    lines += [f"- **{c}/{s}** A_intro {fmt(e['A_intro'])}: {e['text'][:200]!r}"
              for (c, s), es in sorted(best.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")) for e in es[:2]]
    mx = ev.get("matrix")
    if mx:
        lines += ["", f"## Transfer matrix (rows: best lesson of type X; columns: a held-out question of type Y; "
                      f"A = R(Y + r) - R(Y), {cfg['matrix_M']} paired rollouts per cell, Newcombe 95% interval)", ""]
        lines += common.md_table(["from \\ on"] + mx["cols"], [[r] + [f"{c['mean']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]" for c in row]
                                                             for r, row in zip(mx["rows"], mx["cells"])])
    common.write_report(out, lines)


# ----------------------------------------------------------------------------
# flags

def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]), data="data/procedural.jsonl")
    count, count0 = common.at_least(1), common.at_least(0)
    p.add_argument("--steps", type=count, default=20, help="training steps (one question Q each)")
    p.add_argument("--N", type=count, default=16, help="rollouts on Q (the paper's N)")
    p.add_argument("--M", type=count, default=4, help="transfer rollouts per arm on each Q'")
    p.add_argument("--transfer-questions", type=count, default=2, help="K questions Q' per introspection")
    p.add_argument("--transfer-by", choices=["subtype", "cluster", "fact"], default="subtype",
                   help="Q' of Q's sub-type, cluster, or asking Q's fact (same cue stem, or same type and answer words)")
    p.add_argument("--gate", choices=["mean", "lower"], default="mean",
                   help="train a lesson whose A_intro mean (the paper) or 95%% lower bound is > 0")
    p.add_argument("--max-intros", type=count, default=4, help="at most this many introspections scored per step")
    # log-probs are divided by the temperature in training: 0 would make every update NaN
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--max-new-tokens", type=count, default=64, help="rollout length on Q")
    p.add_argument("--answer-tokens", type=count, default=16, help="rollout length on Q' (answer only)")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="optimizer, lr and clip: " + "; ".join(f"{k} = {o} {lr:g} clip {c:g}" for k, (o, lr, c) in PRESETS.items()))
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=None, help="override the preset's (adamw: torch defaults)")
    p.add_argument("--lr", type=common.positive, default=None, help="override the preset's")
    p.add_argument("--clip", type=common.positive, default=None, help="override the preset's")
    p.add_argument("--canary-every", type=count, default=4)
    p.add_argument("--canary-samples", type=count, default=4)
    p.add_argument("--eval-on", choices=["eval", "dev"], default="eval", help="held-out facts the before/after evaluation uses (dev: for selection)")
    p.add_argument("--eval-samples", type=count0, default=4, help="rollouts per held-out question before and after (0: skip)")
    p.add_argument("--save-every", type=count, default=1, help="checkpoint every this many steps")
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="also score Q's known-good lesson through the same machinery (no update)")
    p.add_argument("--correction-turns", type=count0, default=0, help="multi-turn ablation: 'wrong, try again' turns")
    p.add_argument("--matrix-M", type=count0, default=4, help="rollouts per arm in the final transfer matrix (0: skip)")
    p.add_argument("--include-controls", action="store_true", help="also train and evaluate on negative-control clusters")
    return p

def fact_units(questions) -> dict:
    """Questions in units closed under a shared cue stem, (type, answer words) and text: a held-out
    unit shares no fact and no text with the others. {type of its first question: [unit, ...]}."""
    parent, first = list(range(len(questions))), {}
    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i, q in enumerate(questions):
        for k in (("cue", common.normalise_text(q.cue or "")) if q.cue else None, ("text", common.text_key(q)),
                  ("answer", q.cluster, q.subtype, common.normalise_text(answer_text(q)))):
            if k is not None:
                parent[root(i)] = root(first.setdefault(k, i))
    units, by_type = {}, {}
    for i, q in enumerate(questions):
        units.setdefault(root(i), []).append(q)
    for u in units.values():
        by_type.setdefault((u[0].cluster, u[0].subtype), []).append(u)
    return by_type

def make_split(args):
    """Per type, one fact unit held out for evaluation and one for dev (the canary is its first
    question of each type) when it has 3 or more, else its texts are the units; the rest is the
    training pool. Data first: a bad file fails before the model loads."""
    questions, rng = common.load_questions(args.data), np.random.default_rng(args.seed)
    held, pool = {"eval_pool": [], "dev_pool": []}, []
    for t, units in fact_units(questions).items():
        if len(units) < 3:
            units = list({common.text_key(q): [x for x in sum(units, []) if common.text_key(x) == common.text_key(q)]
                          for q in sum(units, [])}.values())
        order = rng.permutation(len(units)) if len(units) >= 3 else range(len(units))
        for k, i in enumerate(order):
            (held["eval_pool"] if k == 0 and len(units) >= 3 else held["dev_pool"] if k == 1 and len(units) >= 3 else pool).extend(units[i])
    scored = lambda q: args.include_controls or not q.meta.get("negative_control")
    for name in ("eval", "dev"):   # one question per text, controls only with --include-controls
        held[name] = [q for q in {common.text_key(q): q for q in reversed(held[name + "_pool"])}.values() if scored(q)][::-1]
    canary = list({(q.cluster, q.subtype): q for q in reversed(held["dev_pool"])}.values())[::-1]
    train = [q for q in pool if scored(q) and transfer_pool(pool, q, args.transfer_by)]
    if not train:
        raise common.UserError(f"{args.data}: no question has a Q' of the same {args.transfer_by} in the training pool "
                               f"(one fact of each type is held out for evaluation and one for dev)")
    order = [train[i] for i in np.random.default_rng(args.seed).permutation(len(train))]
    return {**held, "canary": canary, "pool": pool, "train": train, "order": order}

def main():
    args = build_parser().parse_args()
    preset = PRESETS[args.preset]
    args.optimizer, args.lr, args.clip = args.optimizer or preset[0], args.lr or preset[1], args.clip or preset[2]
    split = make_split(args)
    out = common.setup_run(args, "grpo_introspect")
    common.atomic_write_json(out / "split.json", {k: [q.id for q in split[k]] for k in ("train", "canary", "dev", "eval", "pool")})
    print(f"run folder: {out}\ntraining on {len(split['train'])} questions, canary {len(split['canary'])}, "
          f"{args.eval_on} {len(split[args.eval_on])}, data {args.data}")
    policy = train(args, out, split)
    evaluate(args, policy, split, out, "after")
    write_report(out)
    print(f"library: {out / 'library.json'}\nmetrics: {out / 'metrics.jsonl'}\nreport:  {out / 'report.md'}")

if __name__ == "__main__":
    common.run_main(main)
