"""Procedural Memory Distillation ("Online Reflection for Self-Improving Language Models") and its two
baselines, GRPO and SDPO, in one loop on one rollout budget (--method grpo|sdpo|pmd). Per step: B
training questions x G rollouts, verified; a loss; one AdamW step (warm-up, clip 1.0); the EMA
teacher; pmd's memory. grpo: A = r - group mean, zero-variance groups skipped, token-mean pg loss.
sdpo (lasgroup/SDPO's compute_self_distillation_loss): an EMA teacher sees the prompt plus the first
OTHER success of the group (and, per --feedback, the attempt's verifier line), then the student's
own completion ids; the alpha-divergence over the student's top-k ids plus a tail bucket; no context,
no loss. pmd: sdpo's loss, the teacher's context also retrieved by the question's TYPE from a
three-level memory (experience / insight / behavior, memory.json).

Deliberate choices (the paper gives no formulas):
  1. Same-group successes come first, so pmd with an empty memory is sdpo, step for step.
  2. Feedback is SDPO's default for multiple choice: none (--feedback); any gold answer the
     policy did not produce is redacted from every feedback string.
  3. The gate scores an insight by the teacher's log-likelihood of sibling training questions'
     verified solutions (else their gold answers) with vs without it; admitted only if the 95%
     lower bound over >= 3 siblings (never a source question) is above 0.
  4. Insight similarity is word overlap; the model stays in eval mode (Gemma 3 has no dropout).
  5. Evaluation is memory-free (the paper's point) except --freeze policy (the in-context agent);
     every held-out question is scored under the same fixed option rotations for every method.
  6. sdpo and pmd add 0.5 x GRPO's loss (--grpo-blend; 0 is the reference's SDPO): the answer-format
     mitigation that results/pmd-mitigation/RULE.md's rule, fixed before the trial, picked on dev.

    python pmd_distill.py --model gemma --method pmd          # or --method sdpo, --method grpo
    python pmd_distill.py --model gemma --compare             # base once, then grpo, sdpo, pmd
    python pmd_distill.py --out runs/NAME --resume            # continue after a kill or Ctrl-C
"""
import argparse
import copy
import json
import math
import re
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

METHODS = ("grpo", "sdpo", "pmd")
LEVELS = ("experience", "insight", "behavior")
MEMORY_KIND = "pmd-memory"
FEEDBACK_MODES = ("none", "without-solution", "always")
SETTINGS = ("method", "feedback", "teacher_format", "alpha", "tail", "grpo_blend", "lr", "warmup", "ema", "reflector",
            "seed_memory", "levels", "freeze", "permutations", "B", "G", "epochs")     # named in every report

# SDPO's own wording (lasgroup/SDPO), in plain text for a base model; the memory block is ours.
SOLUTION = "\nCorrect solution:\n\n{y}\n\n"
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{f}\n\n"
REPROMPT = "\n\nCorrectly solve the original question.\n"
MEMORY = "\nNotes from earlier attempts:\n\n{m}\n\n"
ANSWER_STOP = ["\n"]    # every answer in our data fits on one line
REFLECT = (
    "Write one short lesson that would help with similar questions.\n\n"
    "Problem: In the game of Tarn, which piece moves first?\nCorrect attempt: the rook\n"
    "Wrong attempt: the king\nVerifier: wrong: got the king\n"
    "Lesson: In Tarn the rook always moves first, before any other piece.\n\n"
    "Problem: {problem}\nCorrect attempt: {good}\nWrong attempt: {bad}\nVerifier: {fb}\nLesson:")
SUMMARISE = (
    "Write one sentence that states the pattern shared by these lessons.\n\n"
    "Lessons:\n- In Tarn the rook moves first.\n- In Tarn the pawn moves last.\n"
    "Pattern: In Tarn, pieces move in a fixed order: rook first, pawn last.\n\nLessons:\n{lessons}\nPattern:")

# ----------------------------------------------------------------------------
# the maths


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_group(r), no std normalisation. rewards (B, G) -> (B, G)."""
    return rewards - rewards.mean(-1, keepdim=True)


# GRPO: -sum_i A_i sum_t log pi(y_it) / number of tokens (token-level normalisation).
grpo_loss = common.pg_loss
# SDPO: token-mean alpha-divergence over the student's top-k ids plus one tail bucket
# (alpha 0 = KL(teacher || student), 1 = KL(student || teacher), 0.5 = generalised JSD).
sdpo_loss = common.distill_loss


@torch.no_grad()
def ema_update(teacher, student, rate: float) -> None:
    """teacher <- (1 - rate) teacher + rate student (lerp: exact at rate 0 and 1)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, rate)


def warmup_factor(step: int, warmup: int) -> float:
    """Linear learning-rate warm-up: (step + 1) / warmup for the first warmup steps, then 1."""
    return 1.0 if warmup <= 0 else min(1.0, (step + 1) / warmup)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks + ([n] if ks[-1] != n else [])


# ----------------------------------------------------------------------------
# train


@dataclass
class State:
    """Everything a run carries between steps (saved with each checkpoint)."""
    memory: dict
    base: dict = field(default_factory=dict)          # the starting model's evaluations
    dev: list = field(default_factory=list)           # dev accuracy after each epoch
    best: dict = field(default_factory=dict)          # {"epoch", "dev"}: the weights chosen on dev
    epoch_rollouts: list = field(default_factory=list)
    compute: Counter = field(default_factory=Counter)  # tokens of each kind, one counter


def train_and_evaluate(args, out: Path, split) -> dict:
    """The loop in the paper's terms, then the held-out evaluation (eval.json, report.md)."""
    if args.resume and (out / "eval.json").exists():       # finished: keep its samples, re-derive the rest
        res = add_summaries(json.loads((out / "eval.json").read_text()), args)
        common.atomic_write_json(out / "eval.json", res)
        write_report(out)
        return res
    policy, teacher, st = setup(args, out, split)
    train, per_epoch = split["train"], math.ceil(len(split["train"]) / args.B)
    total, t_run = per_epoch * args.epochs, time.time()
    bar = tqdm(range(policy.step, total), desc=f"{args.method} steps", initial=policy.step, total=total)
    for step in bar:
        t0, epoch = time.time(), step // per_epoch
        qs = batch(args, train, step, per_epoch)
        rec = {"step": step, "epoch": epoch, "questions": [q.id for q in qs]}
        rolls = rollouts(args, policy, qs, step, st, rec)                      # 1-2. B x G rollouts, verified
        ctx = None
        if args.method != "grpo":                                              # the teacher's contexts
            ctx = teacher_contexts(args, policy.tok, qs, rolls, st.memory, rec)
            diagnose(args, teacher, policy.tok, qs, ctx, st, rec, first_of_epoch=step % per_epoch == 0)
        losses = []                                                            # 3. the loss
        if args.freeze != "policy" and (args.method == "grpo" or args.grpo_blend > 0):
            losses.append(grpo_loss_on(args, policy, rolls, rec))
        if args.freeze != "policy" and ctx is not None:
            losses.append(sdpo_loss_on(args, policy, teacher, rolls, ctx, st, rec))
        did_update = update(args, policy, step, losses, rec)                   # 4. optimizer_step
        if did_update and teacher is not None:
            ema_update(teacher, policy.model, args.ema)                        # 5. EMA, only after a real step
        live = args.method == "pmd" and not (args.freeze == "memory" and epoch > 0)
        if live and "experience" in levels_of(args):
            for r in rolls:                                                    # 6. experience, every batch
                add_experience(st.memory, r.question, r.text, r.reward, r.feedback, epoch, step,
                               args.max_success, args.max_failure)
        st.epoch_rollouts += [{"q": r.question.id, "text": r.text, "reward": r.reward, "feedback": r.feedback}
                              for r in rolls]
        if (step + 1) % per_epoch == 0:
            if live and args.reflector != "none" and {"insight", "behavior"} & set(levels_of(args)):
                rec["epoch_end"] = epoch_end(args, policy, teacher, st, train, epoch)   # 7. reflection, gate,
            st.memory["epoch"], st.epoch_rollouts = epoch + 1, []                       #    behavior, pruning
            rec["memory_size"] = level_sizes(st.memory)
            select_on_dev(args, policy, split["dev"], st, epoch, (step + 1) * args.B * args.G, out, rec)  # 8.
        rec.update(step_time=time.time() - t0, peak_memory_mb=common.peak_memory_mb(policy.device))
        record(args, out, policy, teacher, st, step, per_epoch, rec)                      # 9. checkpoint
        bar.set_postfix(r=f"{rec['reward']['mean']:.2f}", gn=rec.get("grad_norm") or "-")
    st.compute["wall_s"] += time.time() - t_run
    return evaluate(args, policy, split, st, out)


# ----------------------------------------------------------------------------
# the pieces, in the order train_and_evaluate() calls them


def levels_of(args) -> tuple:
    return tuple(x.strip() for x in args.levels.split(",") if x.strip())


def setup(args, out, split):
    """The policy (resumed from its checkpoint if any), the EMA teacher, the state; on a fresh
    start the starting model's evaluations (shared by --compare through base.json)."""
    policy = common.load_policy(args, out)
    print(f"weights in {next(policy.model.parameters()).dtype}, rollouts in {next(policy.rollout.parameters()).dtype}")
    teacher = None
    if args.method != "grpo":
        teacher = copy.deepcopy(policy.model).eval().requires_grad_(False)
    if policy.step:              # resumed: the state of the checkpoint (a kill may have left later memory)
        st = State(**{**policy.extra["state"], "compute": Counter(policy.extra["state"]["compute"])})
        if teacher is not None:
            teacher.load_state_dict(policy.extra["teacher"])
    else:
        st = State(memory=new_memory(), base=base_evals(args, policy, split, out))
        if args.seed_memory == "data":
            seed_memory(st.memory, split["train"])
        d0 = accuracy(st.base["dev"], args.seed)
        st.dev, st.best = [{"epoch": 0, "rollouts": 0, "dev": d0}], {"epoch": 0, "dev": d0["mean"]}
    common.save_bank(out / "memory.json", st.memory)
    return policy, teacher, st


def base_evals(args, policy, split, out) -> dict:
    """The starting model on test, train (the positive control's 'before') and dev, memory-free;
    computed once and kept in base.json (--compare: one file for every method)."""
    path = Path(getattr(args, "base_file", None) or out / "base.json")
    if path.exists():
        return json.loads(path.read_text())
    print("evaluating the starting model (test, train, dev)...")
    m, tok = policy.rollout, policy.tok
    base = {"test": score_set(args, m, tok, split["test"], "eval", args.eval_samples),
            "train": score_set(args, m, tok, split["train"], "train-control", args.eval_samples),
            "dev": score_set(args, m, tok, split["dev"], "dev", args.dev_samples)}
    common.atomic_write_json(path, base)
    return base


def batch(args, train, step, per_epoch):
    """The step's B questions: each epoch visits every training question once, in its own order."""
    epoch, i = step // per_epoch, step % per_epoch
    order = np.random.default_rng(common.stream_seed(args.seed, "order", epoch)).permutation(len(train))
    return [train[j] for j in order[i * args.B:(i + 1) * args.B]]


def rollouts(args, policy, qs, step, st, rec) -> list:
    """G rollouts per question from the current policy (row seeds keyed by question and step)."""
    tok = policy.tok
    prompts = [common.question_prompt(tok, q) for q in qs]
    sc = common.score(policy.rollout, tok, qs, prompts, args.G, args.seed, "rollout", (step,),
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, stop=ANSWER_STOP,
                      progress="rollouts")
    rolls = [common.Rollout(q, common.encode(tok, p), s.token_ids, s.text, float(r), common.verify(q, s.text)[1],
                            s.logprobs) for q, p, row, rs in zip(qs, prompts, sc.samples, sc.rewards)
             for s, r in zip(row, rs)]
    st.compute["tokens_sampled"] += sum(len(r.completion_ids) for r in rolls)
    lps = [lp for r in rolls for lp in r.logprobs]
    rec.update(reward=common.cluster_bootstrap_ci(list(sc.rewards), seed=args.seed),
               no_answer=float(np.mean([a is None for row in sc.answers for a in row])),
               length=float(np.mean([len(r.completion_ids) for r in rolls])),
               entropy=float(-np.mean(lps)) if lps else None)
    return rolls


@dataclass
class Context:
    prompt: str | None              # the teacher's prompt; None: no context, no loss
    solution: str | None = None     # where the solution shown came from: "group" | "memory" | None
    feedback: bool = False
    memory: list = field(default_factory=list)   # ids of the memory entries in the prompt


def teacher_contexts(args, tok, qs, rolls, mem, rec) -> list:
    """Per rollout: the first OTHER success of its group (never itself), else (pmd) the question's
    own remembered success; pmd's memory block (by type); feedback per --feedback, redacted."""
    out, G = [], args.G
    for b, q in enumerate(qs):
        group = rolls[b * G:(b + 1) * G]
        produced = {common.answer_key(q, r.text) for r in group}
        own, block, used = retrieve(mem, q, levels_of(args), tok, args.memory_tokens) if args.method == "pmd" else (None, "", [])
        for i, r in enumerate(group):
            others = [o for j, o in enumerate(group) if j != i and o.reward == 1]
            sol, src = (answer_text(q, others[0].text), "group") if others else (own, "memory" if own else None)
            show = r.reward != 1 and (args.feedback == "always" or (args.feedback == "without-solution" and sol is None))
            fb = redact(q, r.feedback, produced) if show else None
            if sol is None and fb is None and not block:
                out.append(Context(None))
                continue
            prompt = teacher_prompt(tok, q, sol, fb, block or None, args.teacher_format)
            out.append(Context(prompt, src, fb is not None, used if (block or src == "memory") else []))
    rec.update(active_tokens=sum(len(r.completion_ids) for r, c in zip(rolls, out) if c.prompt),
               group_contexts=sum(c.solution == "group" for c in out), feedback_contexts=sum(c.feedback for c in out),
               memory_contexts=sum(bool(c.memory) for c in out), no_context=sum(c.prompt is None for c in out))
    return out


def diagnose(args, teacher, tok, qs, ctx, st, rec, first_of_epoch: bool) -> None:
    """What the teacher is shown does to it: at each epoch's first step, its probability of the stop
    token and of an option at the first answer position with and without its context; for pmd
    every step, its gold-answer log-prob with minus without the memory block."""
    G = args.G
    firsts = [next((c for c in ctx[b * G:(b + 1) * G] if c.prompt), None) for b in range(len(qs))]
    if first_of_epoch:
        pairs = [(q, c.prompt) for q, c in zip(qs, firsts) if c is not None]
        rec["probe"] = {"with_context": first_token_mass(teacher, tok, [q for q, _ in pairs], [p for _, p in pairs]),
                        "without": first_token_mass(teacher, tok, qs, [common.question_prompt(tok, q) for q in qs])}
    if args.method == "pmd":
        blocks = [(q, retrieve(st.memory, q, levels_of(args), tok, args.memory_tokens)[1]) for q in qs]
        blocks = [(q, m) for q, m in blocks if m]
        if blocks:
            gold = [gold_completion(q) for q, _ in blocks]
            w = common.answer_logprob(teacher, tok, [teacher_prompt(tok, q, memory=m) for q, m in blocks], gold)
            wo = common.answer_logprob(teacher, tok, [teacher_prompt(tok, q) for q, _ in blocks], gold)
            rec["memory_gain"] = common.mean_ci(w - wo, binary=False)
            rec["memory_gain_values"] = [float(x) for x in w - wo]      # pooled over steps in the report


def grpo_loss_on(args, policy, rolls, rec):
    """GRPO's loss (A = r - group mean; zero-variance groups skipped), global token-mean, backward per micro-batch."""
    R = torch.tensor([r.reward for r in rolls]).view(-1, args.G)                                        # (B, G)
    A = grpo_advantages(R).view(-1).to(policy.device) * (1.0 if args.method == "grpo" else args.grpo_blend)   # (B*G,)
    rows = [i for i in range(len(rolls)) if R[i // args.G].std() > 0]
    n, total = sum(len(rolls[i].completion_ids) for i in rows), 0.0
    rec.update(groups_used=len(rows) // args.G, active_tokens=rec.get("active_tokens", 0) + n)
    for mb in chunks(rows, args.micro_batch):
        lp = student_logprobs(args, policy, rolls, mb)
        loss = grpo_loss(lp["logprobs"], lp["mask"], A[mb]) * (lp["mask"].sum() / n)
        loss.backward()
        total += float(loss.detach())
        note_mismatch(rec, rolls, mb, lp)
    return total if rows else None


def sdpo_loss_on(args, policy, teacher, rolls, ctx, st, rec):
    """SDPO's divergence to the context-conditioned teacher, backward per micro-batch; no context, no loss.
    The teacher reads its own prompt ids, then the student's SAME completion ids (never re-tokenised)."""
    rows, pad = [i for i, c in enumerate(ctx) if c.prompt is not None], policy.tok.pad_token_id
    n, total = sum(len(rolls[i].completion_ids) for i in rows), 0.0
    for mb in chunks(rows, args.micro_batch):
        s = student_logprobs(args, policy, rolls, mb, top_k=min(args.top_k, policy.model.config.vocab_size))
        t_ids, comp = [common.encode(policy.tok, ctx[i].prompt) for i in mb], [rolls[i].completion_ids for i in mb]
        with torch.no_grad():
            t = common.logprobs_at(teacher, t_ids, comp, s["student_topk_ids"], temperature=args.temperature, pad_id=pad)
        loss = (1 - args.grpo_blend) * sdpo_loss(s["student_topk_logprobs"], t["extra_logprobs"], s["mask"], args.alpha, args.tail, n_active=n)
        loss.backward()
        total += float(loss.detach())
        note_mismatch(rec, rolls, mb, s)
        st.compute["teacher_tokens"] += sum(map(len, t_ids)) + sum(map(len, comp))
    return total if rows else None


def student_logprobs(args, policy, rolls, mb, top_k=0):
    """The trained policy's log-probs of rows mb (with grad); top_k: SDPO's student top-k ids too."""
    ids, comp = [rolls[i].prompt_ids for i in mb], [rolls[i].completion_ids for i in mb]
    kw = dict(temperature=args.temperature, pad_id=policy.tok.pad_token_id)
    return common.student_topk(policy.model, ids, comp, top_k, **kw) if top_k else common.token_logprobs(policy.model, ids, comp, **kw)


def chunks(rows, size):
    return [rows[s:s + size] for s in range(0, len(rows), size)]


def note_mismatch(rec, rolls, mb, lp) -> None:
    """How far the rollout policy (a bf16 copy where bf16 is fast) is from the trained one."""
    m = common.logprob_mismatch([rolls[i].logprobs for i in mb], lp["logprobs"], lp["mask"])
    old = rec.setdefault("logprob_mismatch", {"max": 0.0, "n": 0})
    old["max"], old["n"] = max(old["max"], m["max"] or 0.0), old["n"] + m["n"]


def update(args, policy, step, losses, rec) -> bool:
    """The lr warm-up (linear over --warmup steps; the reference: 10), then common.optimizer_step.
    True only if the weights moved: some loss, finite, and a finite gradient."""
    losses = [x for x in losses if x is not None]
    rec.update(loss=sum(losses) if losses else None, grad_norm=None,
               lr=args.lr * warmup_factor(step, args.warmup))
    if not losses or not math.isfinite(rec["loss"]):
        rec["skipped"] = "no loss (no context / no mixed group)" if not losses else f"non-finite loss {rec['loss']}"
        policy.opt.zero_grad(set_to_none=True)
        return False
    for g in policy.opt.param_groups:
        g["lr"] = rec["lr"]
    rec.update(common.optimizer_step(policy, args.clip))
    return rec["skipped"] is None


def epoch_end(args, policy, teacher, st, train, epoch) -> dict:
    """Co-evolution from this epoch's rollouts: one reflected candidate insight per question, the
    gate, the counters of older insights re-scored the same way, behaviors, pruning."""
    by_id, mem, tok, rolls = {q.id: q for q in train}, st.memory, policy.tok, st.epoch_rollouts
    solutions = {r["q"]: r["text"] for r in reversed(rolls) if r["reward"] == 1}        # the first success of each
    bad = {r["q"]: r for r in reversed(rolls) if r["reward"] != 1}                      # and its first failure
    evidence = [(by_id[qid], solutions.get(qid), bad[qid]["text"] if qid in bad else None, bad.get(qid, {}).get("feedback"))
                for qid in dict.fromkeys(r["q"] for r in rolls)]
    cands, n_tok = reflect(policy.rollout, tok, args.reflector, evidence, args.temperature,
                           common.stream_seed(args.seed, "reflect", epoch))
    st.compute["reflection_tokens"] += n_tok
    cis = gate(args, teacher, tok, [(q, text, [q.id]) for q, text, *_ in cands], train, solutions, st)
    admitted = [add_insight(mem, {"cluster": q.cluster, "subtype": q.subtype, "question": q.id, "scope": scope,
                                  "kind": kind, "text": text, "epoch": epoch, "sources": [q.id], "gate": ci},
                            args.insights_per_question, args.insights_per_subtype)
                for (q, text, kind, scope), ci in zip(cands, cis) if admits(ci, args)]
    old = [e for e in mem["entries"] if e["level"] == "insight" and e["epoch"] < epoch]
    old_ci = gate(args, teacher, tok, [(by_id[e["question"]], e["text"], e["sources"]) for e in old], train, solutions, st)
    for e, ci in zip(old, old_ci):
        if ci is not None and ci["n"] >= args.gate_siblings and np.isfinite(ci["lo"]):
            e["helpful"] += ci["lo"] > 0
            e["harmful"] += ci["hi"] < 0
    n_beh = build_behaviors(policy.rollout, tok, mem, args, epoch) if "behavior" in levels_of(args) else 0
    tested = [ci for ci in cis if ci is not None and ci["n"] >= args.gate_siblings]
    info = {"candidates": len(cands), "untestable": len(cands) - len(tested), "admitted": len(admitted),
            "admit_rate": common.mean_ci([float(admits(ci, args)) for ci in tested], binary=True) if tested else None,
            "gate_gain": common.mean_ci([ci["mean"] for ci in tested], binary=False) if tested else None,
            "behaviors": n_beh, "pruned": prune(mem)}
    if not tested:
        info["note"] = f"no candidate had {args.gate_siblings} sibling questions to be scored on: nothing admitted"
    mem["log"].append({"epoch": epoch, **info})
    return info


def admits(ci, args) -> bool:
    """The gate's rule: the 95% lower bound of the gain over >= --gate-siblings siblings is > 0."""
    return ci is not None and ci["n"] >= args.gate_siblings and bool(np.isfinite(ci["lo"])) and ci["lo"] > 0


def siblings(q, sources, train, solutions, k):
    """Up to k OTHER training questions of q's cluster (same sub-type first) that are none of the
    insight's sources, each with a verified solution of this epoch, else its gold answer."""
    sib = [x for x in train if x.cluster == q.cluster and x.id not in sources and x.id != q.id]
    sib.sort(key=lambda x: (x.subtype != q.subtype, x.id))
    return [(x, solutions.get(x.id, gold_completion(x))) for x in sib[:k]]


@torch.no_grad()
def gate(args, teacher, tok, items, train, solutions, st) -> list:
    """Per (question it came from, insight text, its sources): mean_ci over sibling questions of the
    teacher's per-token log-likelihood gain of the sibling's solution with the insight minus without."""
    out = []
    for q, text, sources in items:
        gains = []
        for q2, sol in siblings(q, set(sources), train, solutions, args.gate_siblings):
            lp = common.answer_logprob(teacher, tok, [teacher_prompt(tok, q2, memory=f"- {text}"),
                                                      teacher_prompt(tok, q2)], [sol, sol])
            n_tok = len(tok(sol, add_special_tokens=False).input_ids)
            gains.append(float(lp[0] - lp[1]) / n_tok)
            st.compute["gate_tokens"] += 2 * n_tok
        out.append(common.mean_ci(gains, binary=False) if gains else None)
    return out


def select_on_dev(args, policy, dev, st, epoch, rollouts_so_far, out, rec) -> None:
    """Dev accuracy after the epoch; the best weights so far are kept in out/best."""
    mem = st.memory if args.freeze == "policy" else None
    d = accuracy(score_set(args, policy.rollout, policy.tok, dev, "dev", args.dev_samples, mem), args.seed)
    st.dev.append({"epoch": epoch + 1, "rollouts": rollouts_so_far, "dev": d})
    rec["dev"] = d
    if d["mean"] > st.best["dev"]:
        st.best = {"epoch": epoch + 1, "dev": d["mean"]}
        policy.model.save_pretrained(out / "best")


def record(args, out, policy, teacher, st, step, per_epoch, rec) -> None:
    """Memory and metrics first, the checkpoint last: a kill in between only repeats this step."""
    check_no_heldout(st.memory, {p["id"] for p in st.base["train"]})
    common.save_bank(out / "memory.json", st.memory)
    if args.method == "pmd" and (step + 1) % per_epoch == 0:
        common.save_bank(out / f"memory.epoch{(step + 1) // per_epoch}.json", st.memory)
    common.append_jsonl(out / "metrics.jsonl", rec)
    if (step + 1) % args.save_every == 0 or (step + 1) % per_epoch == 0:     # the last step ends an epoch
        extra = {"state": {**asdict(st), "compute": dict(st.compute)},
                 "teacher": teacher.state_dict() if teacher is not None else None}
        common.save_checkpoint(out, policy.model, policy.tok, policy.opt, step=step + 1, extra=extra)


# ---- prompts


def answer_text(q, completion: str) -> str:
    """What the rollout said, with the cue it continued: 'At a Velt red light, red means go'."""
    return ((q.cue.strip() + " ") if q.cue else "") + completion.strip()


def gold_completion(q) -> str:
    """The gold answer as a completion: the option text after a cue, else ' <letter>' / ' <answer>'."""
    if q.answer_type == "mcq" and q.cue:
        return " " + q.choices[common.LETTERS.index(q.answer)]
    return " " + str(q.answer)


def teacher_prompt(tok, q, solution=None, feedback=None, memory=None, style="sdpo") -> str:
    """SDPO's "{prompt}{solution}{feedback}\\n\\nCorrectly solve the original question.\\n" with
    pmd's memory block first, ending on the student's answer start so its completion ids follow.
    style "student": the solution shown as a solved example in the student's own format."""
    chat = bool(getattr(tok, "chat_template", None))
    if style == "student":
        lesson = " ".join(x for x in (memory, feedback) if x) or None
        shown = f"Question: {common.render_question(q)}\nAnswer: {solution}\n\n" if solution else ""
        return common.question_prompt(tok, q, lesson=lesson, instruction=shown.strip() or None, chat=chat)
    body = ("" if chat else common.FORMAT_EXAMPLES) + f"Question: {common.render_question(q)}\n"
    body += (MEMORY.format(m=memory) if memory else "") + (SOLUTION.format(y=solution) if solution else "")
    body += FEEDBACK.format(f=feedback) if feedback else ""
    prompt = common.format_prompt(tok, body + REPROMPT, chat=chat)
    return prompt + ((" " if not chat else "") + q.cue.strip() if q.cue else "")


def as_turn(tok, text: str) -> str:
    """A REFLECT / SUMMARISE prompt: plain text for a base model, one user turn under a chat template."""
    return common.format_prompt(tok, text, chat=True) if getattr(tok, "chat_template", None) else text


def scrub(q, text: str) -> str:
    """text without q's gold answer: the option text of an mcq, the answer of text/number."""
    gold = q.choices[common.LETTERS.index(q.answer)] if q.answer_type == "mcq" else str(q.answer)
    return re.sub(rf"(?<!\w){re.escape(gold)}(?!\w)", "[...]", text, flags=re.I)


def redact(q, feedback: str, produced=()) -> str:
    """A verifier line without any gold answer the policy did not produce: 'expected C, got B' ->
    'wrong: got B' (the gold letter and option text scrubbed) unless some rollout gave the gold."""
    gold = common.LETTERS.index(q.answer) if q.answer_type == "mcq" else None
    if (q.answer if gold is not None else common.answer_key(q, " " + str(q.answer))) in produced:
        return feedback
    m = re.match(r"expected .*?, ((?:got|no) .*)$", feedback)
    return scrub(q, "wrong: " + m.group(1)) if m else scrub(q, feedback)


@torch.no_grad()
def first_token_mass(model, tok, qs, prompts) -> dict:
    """Mean over prompts of P(stop token) and P(an option: its letter or its text's first token)
    at the first answer position, temperature 1."""
    stop = sorted(common.eos_ids(model, tok) | set(tok("\n", add_special_tokens=False).input_ids[:1]))
    ps, po = [], []
    for q, p in zip(qs, prompts):
        logits = model(input_ids=torch.tensor([common.encode(tok, p)], device=next(model.parameters()).device)).logits
        pr = logits[0, -1].float().softmax(-1)
        opts = {tok(s, add_special_tokens=False).input_ids[0] for L, c in zip(common.LETTERS, q.choices or [])
                for s in (L, " " + L, " " + c)}
        ps.append(float(pr[stop].sum()))
        po.append(float(pr[sorted(opts)].sum()) if opts else float("nan"))
    return {"p_stop": float(np.mean(ps)) if ps else None, "p_option": float(np.nanmean(po)) if po else None, "n": len(ps)}


# ---- procedural memory: experience / insight / behavior, one plain JSON bank


def jaccard(a: str, b: str) -> float:
    """Word overlap, the insight similarity (no embedding model)."""
    wa, wb = (set(re.findall(r"[a-z0-9]+", x.lower())) for x in (a, b))
    return len(wa & wb) / max(1, len(wa | wb))


def new_memory() -> dict:
    return {"schema": common.BANK_SCHEMA, "version": common.BANK_VERSION, "kind": MEMORY_KIND,
            "epoch": 0, "next_id": 0, "entries": [], "log": []}


def next_id(mem, level: str) -> str:
    mem["next_id"] += 1
    return f"{level[0]}{mem['next_id']:05d}"


def add_experience(mem, q, completion: str, reward: float, feedback: str, epoch: int, step: int,
                   max_success: int = 2, max_failure: int = 1) -> None:
    """Record one verified rollout (a repeat is counted, not stored twice); at most max_success
    successes and max_failure failures per question, the newest kept. A failure is stored without
    the gold answer (scrubbed text, redacted feedback) while the question is unsolved."""
    if reward != 1 and not any(e["level"] == "experience" and e["question"] == q.id and e["reward"] == 1
                               for e in mem["entries"]):
        completion, feedback = scrub(q, completion), redact(q, feedback)
    for e in mem["entries"]:
        if e["level"] == "experience" and e["question"] == q.id and e["text"] == completion:
            e["count"], e["epoch"], e["step"] = e["count"] + 1, epoch, step
            return
    k = common.answer_key(q, completion) if q.answer_type == "mcq" and not q.cue else None
    shown = f"{q.question.strip()} Answer: {k}) {q.choices[common.LETTERS.index(k)]}" if k else answer_text(q, completion)
    mem["entries"].append({"id": next_id(mem, "experience"), "level": "experience", "question": q.id,
                           "cluster": q.cluster, "subtype": q.subtype, "text": completion, "shown": shown,
                           "reward": reward, "feedback": feedback, "epoch": epoch, "step": step,
                           "count": 1, "sources": [q.id]})
    for ok, cap in ((True, max_success), (False, max_failure)):
        mine = [e for e in mem["entries"] if e["level"] == "experience" and e["question"] == q.id and (e["reward"] == 1) == ok]
        for e in sorted(mine, key=lambda e: e["step"])[:max(0, len(mine) - cap)]:
            mem["entries"].remove(e)


def score(e) -> int:
    return e.get("helpful", 0) - e.get("harmful", 0)


def add_insight(mem, cand: dict, max_per_question: int, max_per_subtype: int, merge_at: float = 0.6) -> str:
    """Merge into a near-duplicate of the same scope (word Jaccard >= merge_at: helpful + 1, lineage
    joined) or append; then the caps per question and per sub-type drop the lowest counters."""
    for e in mem["entries"]:
        if (e["level"] == "insight" and (e["cluster"], e["subtype"]) == (cand["cluster"], cand["subtype"])
                and jaccard(e["text"], cand["text"]) >= merge_at):
            e["helpful"], e["merged"] = e["helpful"] + 1, e.get("merged", 0) + 1
            e["sources"] = sorted(set(e["sources"]) | set(cand["sources"]))
            return e["id"]
    e = {"id": next_id(mem, "insight"), "level": "insight", "helpful": 1, "harmful": 0, **cand}
    mem["entries"].append(e)
    for scope, cap, key in (("question", max_per_question, lambda x: x["question"]),
                            (None, max_per_subtype, lambda x: (x["cluster"], x["subtype"]))):
        group = [x for x in mem["entries"] if x["level"] == "insight" and (scope is None or x["scope"] == scope)
                 and key(x) == key(e)]
        for x in sorted(group, key=lambda x: (score(x), x["epoch"]))[:max(0, len(group) - cap)]:
            mem["entries"].remove(x)
    return e["id"]


def seed_memory(mem, train) -> None:
    """--seed-memory data: each training question's data lesson as a sub-type insight (an upper
    bound on what memory can give: the lesson states the rule the held-out questions test)."""
    for q in train:
        if q.lesson:
            add_insight(mem, {"cluster": q.cluster, "subtype": q.subtype, "question": q.id, "scope": "subtype",
                              "kind": "data lesson", "text": q.lesson, "epoch": -1, "sources": [q.id]}, 2, 4, merge_at=0.99)


def prune(mem, margin: int = 2) -> int:
    """Drop insights and behaviors whose harmful counter exceeds helpful by margin or more."""
    keep = [e for e in mem["entries"] if e["level"] == "experience" or -score(e) < margin]
    dropped, mem["entries"] = len(mem["entries"]) - len(keep), keep
    return dropped


def level_sizes(mem) -> dict:
    c = Counter(e["level"] for e in mem["entries"])
    return {lv: c.get(lv, 0) for lv in LEVELS}


def check_no_heldout(mem, train_ids: set) -> None:
    """Memory may hold nothing from a held-out question: every entry's sources are training ids."""
    for e in mem["entries"]:
        bad = set(e.get("sources", [])) - train_ids
        if bad:
            raise RuntimeError(f"memory entry {e['id']} comes from held-out question(s) {sorted(bad)}")


def retrieve(mem, q, levels, tok, cap_tokens: int):
    """(q's own best success or None, memory block, entry ids used), by q's TYPE: q's latest
    failure, other training questions' successes (same sub-type, then cluster), insights of the
    sub-type (and q's own), the cluster's behavior; cut at cap_tokens tokens."""
    ents, own_ok, used = mem["entries"], None, []
    exp = [e for e in ents if e["level"] == "experience"] if "experience" in levels else []
    ok = [e for e in exp if e["question"] == q.id and e["reward"] == 1]
    if ok:
        best = max(ok, key=lambda e: (e["count"], e["step"]))
        own_ok = answer_text(q, best["text"])
        used.append(best["id"])
    bad = sorted([e for e in exp if e["question"] == q.id and e["reward"] != 1], key=lambda e: e["step"])[-1:]
    fails = [(f"An earlier attempt, {answer_text(q, e['text'])!r}, was judged: {e['feedback']}", e["id"]) for e in bad]
    others = sorted([e for e in exp if e["question"] != q.id and e["reward"] == 1 and e["cluster"] == q.cluster],
                    key=lambda e: (e["subtype"] != q.subtype, -e["count"], -e["step"]))
    examples = {}
    for e in others:                       # the best-ranked success of each other question
        examples.setdefault(e["question"], (f"Solved: {e['shown']}", e["id"]))
    examples = list(examples.values())
    ins = [e for e in ents if "insight" in levels and e["level"] == "insight" and e["cluster"] == q.cluster
           and e["subtype"] == q.subtype and (e["scope"] == "subtype" or e["question"] == q.id)]
    ins.sort(key=lambda e: (e["question"] == q.id, jaccard(e["text"], q.question) + 0.1 * score(e)), reverse=True)
    beh = [(e["text"], e["id"]) for e in ents if "behavior" in levels and e["level"] == "behavior" and e["cluster"] == q.cluster]
    lines = fails + [(e["text"], e["id"]) for e in ins] + examples + beh
    block = ""
    for text, eid in lines:
        cand = block + f"- {text}\n"
        if len(tok(cand, add_special_tokens=False).input_ids) > cap_tokens:
            break
        block = cand
        used.append(eid)
    return own_ok, block.strip(), used


def template_insight(q, good: str | None, bad: str | None) -> tuple[str, str, str]:
    """(text, kind, scope) built only from the evidence: a passing answer, else a rejected one."""
    if good is not None:
        text = answer_text(q, good).rstrip(".") + "." if q.cue else f"For {q.question.strip()!r}, {good.strip()!r} is accepted."
        return text, "strategy", "subtype"
    return f"For {q.question.strip()!r}, {scrub(q, answer_text(q, bad))!r} is not accepted.", "lesson", "question"


def reflect(model, tok, mode, evidence, temperature, seed, max_tokens=40):
    """One candidate insight per question of evidence [(q, good, bad, feedback of bad)]: the
    template, or the policy's own lesson (--reflector self). ([(q, text, kind, scope)], tokens)."""
    if mode == "template":
        return [(q, *template_insight(q, g, b)) for q, g, b, _ in evidence if g is not None or b is not None], 0
    prompts = [as_turn(tok, REFLECT.format(problem=common.render_question(q).replace("\n", " "),
                                           good=answer_text(q, g) if g is not None else "(none yet)",
                                           bad=answer_text(q, b) if b is not None else "(none)",
                                           fb=redact(q, fb) if fb else "(none)")) for q, g, b, fb in evidence]
    res = common.sample(model, tok, prompts, n=1, max_new_tokens=max_tokens, temperature=temperature,
                        stop=ANSWER_STOP, seed=seed, progress="reflection")
    out = [(q, s.text.strip() if g is not None else scrub(q, s.text.strip()), "strategy" if g is not None else "lesson",
            "subtype" if g is not None else "question") for (q, g, _, _), s in zip(evidence, res) if s.text.strip()]
    return out, sum(len(s.token_ids) for s in res)


def build_behaviors(model, tok, mem, args, epoch) -> int:
    """One behavior per cluster whose insights span >= 3 questions: the pattern across them (the
    policy's own with --reflector self, else their best statements joined), with lineage."""
    made = 0
    for c in sorted({e["cluster"] for e in mem["entries"] if e["level"] == "insight"}):
        ins = sorted([e for e in mem["entries"] if e["level"] == "insight" and e["cluster"] == c], key=lambda e: -score(e))
        qids = sorted({s for e in ins for s in e["sources"]})
        if len(qids) < 3:
            continue
        top, text = ins[:4], " ".join(e["text"] for e in ins[:4])
        if args.reflector == "self":
            prompt = as_turn(tok, SUMMARISE.format(lessons="\n".join(f"- {e['text']}" for e in top)))
            s = common.sample(model, tok, [prompt], n=1, max_new_tokens=40, temperature=args.temperature,
                              stop=ANSWER_STOP, seed=common.stream_seed(args.seed, "behavior", epoch, made))[0]
            text = s.text.strip() or text
        mem["entries"] = [e for e in mem["entries"] if not (e["level"] == "behavior" and e["cluster"] == c)]
        mem["entries"].append({"id": next_id(mem, "behavior"), "level": "behavior", "cluster": c, "subtype": None,
                               "text": text, "epoch": epoch, "from": [e["id"] for e in top], "sources": qids,
                               "helpful": sum(e["helpful"] for e in top), "harmful": sum(e["harmful"] for e in top)})
        made += 1
    return made


# ----------------------------------------------------------------------------
# evaluation: the same questions, option rotations and row seeds for every method


def rotated(q, k: int):
    """q with its options rotated by k (the gold letter moves with its option); id '<id>~r<k>'."""
    if q.answer_type != "mcq":
        return common.Question(**{**vars(q), "id": f"{q.id}~r{k}", "meta": {**q.meta, "source": q.id}})
    n = len(q.choices)
    choices = [q.choices[(i + k) % n] for i in range(n)]
    gold = common.LETTERS[(common.LETTERS.index(q.answer) - k) % n]
    return common.Question(**{**vars(q), "id": f"{q.id}~r{k}", "choices": choices, "answer": gold,
                              "meta": {**q.meta, "source": q.id}})


def score_set(args, model, tok, qs, stream, samples, mem=None) -> list[dict]:
    """Each question under --permutations fixed rotations x samples rows (row seeds keyed by the
    rotated id: the same for every method and checkpoint). Per question: rewards, no-answer flags."""
    rot = [rotated(q, k) for q in qs for k in range(args.permutations)]
    lesson = {q.id: retrieve(mem, q, levels_of(args), tok, args.memory_tokens)[1] or None if mem is not None else None
              for q in qs}
    prompts = [common.question_prompt(tok, r, lesson=lesson[r.meta["source"]]) for r in rot]
    sc = common.score(model, tok, rot, prompts, samples, args.seed, stream, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, stop=ANSWER_STOP, progress=stream)
    out = {q.id: {"id": q.id, "rewards": [], "no_answer": []} for q in qs}
    for r, rew, ans in zip(rot, sc.rewards, sc.answers):
        out[r.meta["source"]]["rewards"] += rew.tolist()
        out[r.meta["source"]]["no_answer"] += [a is None for a in ans]
    return list(out.values())


def accuracy(per_q, seed) -> dict:
    return common.cluster_bootstrap_ci([p["rewards"] for p in per_q], seed=common.stream_seed(seed, "bootstrap"))


def summarise(per_q: list[dict], seed: int, k_max: int | None = None) -> dict:
    """Mean accuracy and no-answer share (clustered bootstrap over questions), pass@k (t, cut to
    [0, 1]; k = n: Wilson, it is coverage), coverage (Wilson)."""
    n, c = len(per_q[0]["rewards"]), [int(sum(p["rewards"])) for p in per_q]
    return {"n_questions": len(per_q), "n_samples": n, "accuracy": accuracy(per_q, seed),
            "no_answer": common.cluster_bootstrap_ci([np.array(p["no_answer"], float) for p in per_q],
                                                     seed=common.stream_seed(seed, "bootstrap")),
            "coverage": common.mean_ci([float(x > 0) for x in c], binary=True),
            "pass_at_k": {str(k): common.mean_ci([pass_at_k(n, x, k) for x in c], binary=k == n,
                                                 bounds=None if k == n else (0, 1)) for k in pass_ks(min(k_max or n, n))}}


def contrast(a, b, seed) -> dict:
    """mean(a) - mean(b), paired by question and sample row (common.paired_bootstrap)."""
    assert [p["id"] for p in a] == [p["id"] for p in b]
    return common.paired_bootstrap({"a": [p["rewards"] for p in a], "b": [p["rewards"] for p in b]},
                                   lambda m: m["a"] - m["b"], seed=common.stream_seed(seed, "bootstrap"))


def evaluate(args, policy, split, st, out) -> dict:
    """Final weights on test and on their own training questions (the positive control), the
    best-on-dev weights on test; summaries and contrasts with the base; writes eval.json."""
    print("evaluating on the held-out test questions and the training questions...")
    mem = st.memory if args.freeze == "policy" else None     # the in-context agent keeps its memory
    m, tok = policy.rollout, policy.tok
    res = {"method": args.method, "settings": {k: getattr(args, k) for k in SETTINGS}, "base": st.base,
           "final": {"test": score_set(args, m, tok, split["test"], "eval", args.eval_samples, mem),
                     "train": score_set(args, m, tok, split["train"], "train-control", args.eval_samples, mem)},
           "best_on_dev": dict(st.best), "dev_curve": st.dev, "memory_size": level_sizes(st.memory),
           "compute": dict(st.compute)}
    if st.best["epoch"] == 0:
        res["best_on_dev"]["test"] = st.base["test"]
    elif st.best["epoch"] != args.epochs and (out / "best").exists():
        from transformers import AutoModelForCausalLM
        best = AutoModelForCausalLM.from_pretrained(out / "best", dtype=next(policy.model.parameters()).dtype)
        policy.model.load_state_dict(best.state_dict())
        common.sync_rollout(m, policy.model)
        res["best_on_dev"]["test"] = score_set(args, m, tok, split["test"], "eval", args.eval_samples, mem)
    res = add_summaries(res, args)
    common.atomic_write_json(out / "eval.json", res)
    write_report(out)
    return res


def add_summaries(res, args) -> dict:
    """Summaries and paired contrasts from the per-question samples only (a --resume re-derives them)."""
    s = lambda pq: summarise(pq, args.seed, args.pass_k)
    res["summary"] = {"base": s(res["base"]["test"]), "final": s(res["final"]["test"]),
                      "base_train": s(res["base"]["train"]), "final_train": s(res["final"]["train"]),
                      "final_vs_base": contrast(res["final"]["test"], res["base"]["test"], args.seed),
                      "train_control": contrast(res["final"]["train"], res["base"]["train"], args.seed)}
    if "test" in res["best_on_dev"]:
        res["summary"]["best"] = s(res["best_on_dev"]["test"])
        res["summary"]["best_vs_base"] = contrast(res["best_on_dev"]["test"], res["base"]["test"], args.seed)
    return res


# ----------------------------------------------------------------------------
# report: reads the run folder only


def fmt(ci, signed=False):
    return common.fmt_ci(ci, signed=signed)


def mean_n(ci) -> str:
    """A per-step estimate from a handful of questions: its mean and n, no interval."""
    return "-" if not ci or not ci.get("n") else f"{ci['mean']:+.2f} (n={ci['n']})"


def pooled_memory_gain(rows) -> str:
    """The teacher's gold-answer log-prob gain from memory over every step, clustered by step; no
    interval below MIN_CLUSTERS steps."""
    groups = [m["memory_gain_values"] for m in rows if m.get("memory_gain_values")]
    if not groups:
        return "per-step means only (this run logged no values)" if any("memory_gain" in m for m in rows) else "none (pmd only)"
    if len(groups) < common.MIN_CLUSTERS:
        n = sum(map(len, groups))
        return f"{float(np.mean(np.concatenate(groups))):+.2f} (no interval: {len(groups)} steps < {common.MIN_CLUSTERS}; n={n})"
    return fmt(common.cluster_bootstrap_ci(groups), True)


def ctx_counts(m) -> str:
    return "/".join(str(m.get(k, "-")) for k in ("group_contexts", "memory_contexts", "feedback_contexts", "no_context"))


def write_report(out: Path) -> None:
    """One run's report.md from its config.json, eval.json and metrics.jsonl."""
    cfg, res, rows = json.loads((out / "config.json").read_text()), json.loads((out / "eval.json").read_text()), common.read_metrics(out)
    s, f3 = res["summary"], lambda x: "-" if x is None else f"{x:.3g}"
    lines = [f"# {cfg['method']}: {out.name}", "", "Settings: " + ", ".join(f"{k} {v}" for k, v in res["settings"].items()), "",
             f"Held-out test: {s['final']['n_questions']} questions x {s['final']['n_samples']} samples ({cfg['permutations']} "
             "option rotations), paired by question and row. 95% intervals.", ""]
    table = [[w, fmt(s[k]["accuracy"]), fmt(s[k]["no_answer"]), fmt(s[k]["coverage"]), fmt(s.get(f"{k}_vs_base"), True)]
             for w, k in (("base", "base"), ("final", "final"), (f"best on dev (epoch {res['best_on_dev']['epoch']})", "best")) if k in s]
    lines += common.md_table(["weights", "accuracy", "no answer", "coverage", "vs base (paired)"], table)
    lines += ["", "pass@k (final): " + ", ".join(f"k={k}: {fmt(v)}" for k, v in s["final"]["pass_at_k"].items()), "",
              f"Positive control, its own training questions: before {fmt(s['base_train']['accuracy'])}, after "
              f"{fmt(s['final_train']['accuracy'])}, change {fmt(s['train_control'], True)}.", "",
              "Dev accuracy by epoch: " + ", ".join(f"{d['epoch']}: {fmt(d['dev'])}" for d in res["dev_curve"]), "", "## Per step", ""]
    lines += common.md_table(["step", "reward", "no answer", "contexts group/memory/feedback/none", "memory gain (nats)", "lr",
                              "grad norm", "loss", "length", "s"],
                             [[m["step"], fmt(m["reward"]), f"{m['no_answer']:.2f}", ctx_counts(m), mean_n(m.get("memory_gain")),
                               f3(m["lr"]), f3(m["grad_norm"]), f3(m["loss"]), f"{m['length']:.1f}", f"{m['step_time']:.0f}"] for m in rows])
    lines += ["", f"Memory gain (the teacher's gold-answer log-prob with minus without the memory block, nats), pooled over "
              f"steps: {pooled_memory_gain(rows)}.", "", "## The teacher at the first answer position (each epoch's first step)", ""]
    lines += common.md_table(
        ["step", "P(stop) with / without context", "P(option) with / without context"],
        [[m["step"]] + [f"{f3(m['probe']['with_context'][k])} / {f3(m['probe']['without'][k])}" for k in ("p_stop", "p_option")]
         for m in rows if "probe" in m])
    ends = [m["epoch_end"] for m in rows if "epoch_end" in m]
    lines += ["", "## Gate, per epoch", ""] + common.md_table(
        ["epoch", "candidates", "untestable", "admitted", "admit rate", "gate gain (nats/token)", "behaviors", "pruned"],
        [[i, e["candidates"], e["untestable"], e["admitted"], fmt(e["admit_rate"]), fmt(e["gate_gain"], True), e["behaviors"],
          e["pruned"]] for i, e in enumerate(ends)]) + [f"- epoch {i}: {e['note']}" for i, e in enumerate(ends) if e.get("note")]
    lines += ["", f"Compute: {', '.join(f'{k} {v:.0f}' for k, v in res['compute'].items())}; memory {res['memory_size']}."]
    common.write_report(out, lines)


def write_compare_report(out: Path, names: list[str], seed: int) -> None:
    """Each method against base, PMD - SDPO and SDPO - GRPO (paired), pass@k, coverage, the
    training-set control and the context sources, from each run's eval.json and metrics.jsonl."""
    res = {n: json.loads((out / folder(n) / "eval.json").read_text()) for n in names}
    b = next(iter(res.values()))["summary"]
    lines = ["# base / GRPO / SDPO / PMD", "", "Settings (pmd): " + ", ".join(f"{k} {v}" for k, v in res[names[-1]]["settings"].items()), "",
             f"Held-out test: {b['base']['n_questions']} questions x {b['base']['n_samples']} samples (fixed option rotations), "
             "the same rows for every run. 95% paired-bootstrap intervals.", ""]
    rows = [["base", fmt(b["base"]["accuracy"]), fmt(b["base"]["no_answer"]), fmt(b["base"]["coverage"]), "-",
             fmt(b["base_train"]["accuracy"]), "-", "-"]]
    for n, r in res.items():
        s, m = r["summary"], common.read_metrics(out / folder(n))
        src = {k: sum(x.get(k, 0) for x in m) for k in ("group_contexts", "memory_contexts", "feedback_contexts", "no_context")}
        rows.append([n, fmt(s["final"]["accuracy"]), fmt(s["final"]["no_answer"]), fmt(s["final"]["coverage"]), fmt(s["final_vs_base"], True),
                     fmt(s["final_train"]["accuracy"]), fmt(s["train_control"], True), ctx_counts(src) if n != "grpo" else "-"])
    lines += common.md_table(["run", "accuracy", "no answer", "coverage", "vs base", "own training questions (base: before)", "training change",
                              "contexts group/memory/feedback/none"], rows)
    pairs = [(x, y) for x, y in (("pmd", "sdpo"), ("sdpo", "grpo"), ("pmd", "grpo")) if x in res and y in res]
    lines += ["", "## Paired contrasts (final weights, test)", ""] + common.md_table(
        ["contrast", "difference"], [[f"{x} - {y}", fmt(contrast(res[x]["final"]["test"], res[y]["final"]["test"], seed), True)] for x, y in pairs])
    lines += ["", "## pass@k (final weights)", ""] + common.md_table(
        ["run"] + [f"pass@{k}" for k in b["base"]["pass_at_k"]],
        [["base"] + [fmt(v) for v in b["base"]["pass_at_k"].values()]] + [[n] + [fmt(v) for v in r["summary"]["final"]["pass_at_k"].values()]
                                                                          for n, r in res.items()])
    lines += ["", "Best on dev: " + "; ".join(f"{n} epoch {r['best_on_dev']['epoch']}" + (
        f", {fmt(r['summary']['best_vs_base'], True)} vs base" if "best_vs_base" in r["summary"] else "") for n, r in res.items()),
              "", "Per run (per step, teacher probes, gate): each run's own `report.md`."]
    common.write_report(out, lines)


# ----------------------------------------------------------------------------
# flags


def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]), data="data/procedural.jsonl")
    a = p.add_argument
    a("--method", choices=METHODS, default="pmd")
    a("--compare", action="store_true", help="base once, then grpo, sdpo, pmd in one folder, one report")
    a("--ablations", action="store_true", help="with --compare: also --freeze memory|policy and each level alone")
    a("--epochs", type=common.at_least(1), default=2)
    a("--B", type=common.at_least(1), default=2, help="questions per step")
    a("--G", type=common.at_least(1), default=8, help="rollouts per question")
    a("--train-per-type", type=common.at_least(1), default=2, help="training questions per (cluster, sub-type)")
    a("--dev-per-type", type=common.at_least(1), default=1, help="dev questions per type (checkpoint selection)")
    a("--test-per-type", type=common.at_least(1), default=1, help="held-out test questions per type")
    a("--include-controls", action="store_true", help="also use the negative-control clusters")
    a("--temperature", type=common.positive, default=0.7, help="rollouts, and both distributions of the loss")
    a("--max-new-tokens", type=common.at_least(1), default=16)
    a("--lr", type=common.positive, default=1e-6, help="AdamW, the same for every method")
    a("--warmup", type=common.at_least(0), default=10, help="linear lr warm-up steps (the reference: 10)")
    a("--clip", type=common.positive, default=1.0)
    a("--micro-batch", type=common.at_least(1), default=4, help="rows per forward/backward (memory only)")
    a("--top-k", type=common.at_least(1), default=100, help="student top-k ids in the distillation loss")
    a("--alpha", type=common.unit_interval, default=0.5, help="0 KL(teacher||student), 1 KL(student||teacher), 0.5 JSD")
    a("--tail", action=argparse.BooleanOptionalAction, default=True, help="the 1 - top-k mass bucket")
    a("--ema", type=common.unit_interval, default=0.05, help="teacher EMA rate per optimizer step")
    a("--feedback", choices=FEEDBACK_MODES, default=None,
      help="verifier lines for the teacher (default: none for multiple choice, as the reference; else without-solution)")
    a("--teacher-format", choices=["sdpo", "student"], default="sdpo", help="student: the solution as a solved example")
    a("--grpo-blend", type=common.unit_interval, default=0.5,
      help="sdpo/pmd: weight of the GRPO loss in the mix (0: the reference's SDPO; 0.5: the dev trial's pick)")
    a("--reflector", choices=["self", "template", "none"], default="template")
    a("--seed-memory", choices=["none", "data"], default="none", help="data: the data's lessons as insights (upper bound)")
    a("--levels", default="experience,insight,behavior", help="which memory levels exist")
    a("--freeze", choices=["memory", "policy"], default=None, help="pmd ablations")
    a("--memory-tokens", type=common.at_least(1), default=128, help="cap on the retrieved memory block")
    a("--max-success", type=common.at_least(1), default=2, help="experience: successes kept per question")
    a("--max-failure", type=common.at_least(0), default=1, help="experience: failures kept per question")
    a("--insights-per-question", type=common.at_least(1), default=2)
    a("--insights-per-subtype", type=common.at_least(1), default=4)
    a("--gate-siblings", type=common.at_least(3), default=3, help="sibling questions an insight is scored on (>= 3)")
    a("--permutations", type=common.at_least(1), default=4, help="fixed option rotations per evaluated question")
    a("--eval-samples", type=common.at_least(1), default=2, help="samples per rotation of a test / training question")
    a("--pass-k", type=common.at_least(1), default=None, help="largest k of pass@k (default: all samples)")
    a("--dev-samples", type=common.at_least(1), default=1, help="samples per rotation of a dev question")
    a("--save-every", type=common.at_least(1), default=4, help="checkpoint every this many steps (and at epoch ends)")
    return p


def check_args(args, questions):
    """Checks across flags (each flag's own range is its argparse type); resolves --feedback."""
    levels = levels_of(args)
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise common.flag_error("levels", args.levels, f"unknown level {bad[0]!r}; choose from {', '.join(LEVELS)}"
                                if bad else "name at least one level")
    if args.freeze and (args.method != "pmd" or args.compare):
        raise common.flag_error("freeze", args.freeze, f"only with --method pmd (got --method {args.method}"
                                + (" --compare)" if args.compare else ")"))
    if args.pass_k is not None and args.pass_k > args.eval_samples * args.permutations:
        raise common.flag_error("pass_k", args.pass_k, "k larger than n: at most --eval-samples x --permutations")
    if args.feedback is None:
        args.feedback = "none" if all(q.answer_type == "mcq" for q in questions) else "without-solution"


def folder(name: str) -> str:
    return name.replace(" --", "-").replace(" ", "-")


def make_split(args):
    questions = common.load_questions(args.data)
    if not args.include_controls:
        questions = [q for q in questions if not q.meta.get("negative_control")]
    check_args(args, questions)
    split = split_questions(questions, args.dev_per_type, args.test_per_type, args.seed)
    if not split["test"] or not split["dev"]:
        raise common.UserError(f"{args.data}: no train/held-out split possible: a (cluster, sub-type) needs at least "
                               f"{args.test_per_type + args.dev_per_type + 1} questions (--test-per-type "
                               f"{args.test_per_type} + --dev-per-type {args.dev_per_type} + 1 to train)")
    split["train"] = stratified_take(split["train"], args.train_per_type)
    held = {common.text_key(q) for q in split["dev"] + split["test"]}
    split["train"] = [q for q in split["train"] if common.text_key(q) not in held]    # text-disjoint, not just ids
    return split


def split_questions(questions, dev_per_type: int, test_per_type: int, seed: int):
    """Within each (cluster, sub-type), ordered by a hash of the id: test, then dev, the rest train.
    A type too small to give every split a question goes to train only."""
    by_type = {}
    for q in questions:
        by_type.setdefault((q.cluster, q.subtype), []).append(q)
    split = {"train": [], "dev": [], "test": []}
    for key in sorted(by_type, key=str):
        qs = sorted(by_type[key], key=lambda q: (zlib.crc32(f"{seed}:{q.id}".encode()), q.id))
        if len(qs) < test_per_type + dev_per_type + 1:
            split["train"] += qs
            continue
        split["test"] += qs[:test_per_type]
        split["dev"] += qs[test_per_type:test_per_type + dev_per_type]
        split["train"] += qs[test_per_type + dev_per_type:]
    return split


def stratified_take(questions, per_type: int):
    """The first per_type questions of each type, interleaved type by type."""
    by_type = {}
    for q in questions:
        by_type.setdefault((q.cluster, q.subtype), []).append(q)
    types = [qs for _, qs in sorted(by_type.items(), key=lambda kv: str(kv[0]))]
    return [qs[i] for i in range(per_type) for qs in types if i < len(qs)]


def main():
    args = build_parser().parse_args()
    split = make_split(args)
    if args.out:   # a foreign memory file stops the run before anything is written
        for p in [Path(args.out) / "memory.json", *Path(args.out).glob("*/memory.json")]:
            if p.exists():
                common.load_bank(p, MEMORY_KIND)
    out = common.setup_run(args, "pmd_distill", may_differ=common.RESUME_MAY_DIFFER + ("ablations",))
    common.atomic_write_json(out / "split.json", {k: [q.id for q in v] for k, v in split.items()})
    print(f"run folder: {out}\ntrain {len(split['train'])}, dev {len(split['dev'])}, test {len(split['test'])} "
          f"questions from {args.data}; feedback {args.feedback}")
    if not args.compare:
        train_and_evaluate(args, out, split)
        return
    runs = [(m, {"method": m}) for m in METHODS]
    if args.ablations:
        runs += [("pmd --freeze memory", {"method": "pmd", "freeze": "memory"}),
                 ("pmd --freeze policy", {"method": "pmd", "freeze": "policy"})]
        runs += [(f"pmd --levels {lv}", {"method": "pmd", "levels": lv}) for lv in LEVELS]
    for name, over in runs:
        d = out / folder(name)
        sub = argparse.Namespace(**{**vars(args), **over, "compare": False, "out": str(d)})
        d.mkdir(exist_ok=True)
        if not (d / "config.json").exists():
            common.atomic_write_json(d / "config.json", {"stage": "pmd_distill", **vars(sub)})
        sub.base_file = str(out / "base.json")       # the starting model is evaluated once, for every method
        common.seed_everything(args.seed)
        print(f"\n==== {name} ====")
        train_and_evaluate(sub, d, split)
    write_compare_report(out, [n for n, _ in runs], args.seed)
    print(f"combined report: {out / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
