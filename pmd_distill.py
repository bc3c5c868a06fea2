"""Procedural Memory Distillation ("Online Reflection for Self-Improving Language Models"), with its
two baselines, GRPO and SDPO, in the same loop on the same rollout budget (--method grpo|sdpo|pmd).

Every method, every step (one on-policy optimizer step per batch):
  1. B training questions, G rollouts each from the current policy (common.sample, no grad).
  2. Reward and one line of feedback per rollout (common.verify).
  3. A loss, then AdamW with grad-norm clip 1.0 (the same optimizer and learning rate for all three).

grpo  A_i = r_i - mean_group(r) (no std normalisation); loss -sum_i A_i sum_t log pi(y_it), divided by
      the number of tokens of the groups used (token-level normalisation); groups whose rewards
      all agree have A = 0 and are skipped; no KL, no reference model, no ratio clipping (ratio 1).
sdpo  as its authors implement it (lasgroup/SDPO, compute_self_distillation_loss): the teacher is
      an EMA of the student (rate 0.05 per step, no grad) that sees the prompt plus the first
      OTHER successful rollout of the group, or, for a failed rollout with no such success, its
      verifier feedback; then the student's own completion ids, never re-tokenised. Per token, the
      alpha-mixture divergence between student and teacher over the student's top-k ids plus one
      tail bucket, both at the rollout temperature; normalised over the active tokens. A rollout
      with no teacher context gets no loss (mask 0).
pmd   sdpo's loss and teacher, with the teacher context drawn from a three-level procedural memory
      (memory.json): experience (verified rollouts per question), insight (strategies and
      lessons, admitted only through a validation gate), behavior (cross-problem patterns per
      cluster). Experience is updated after every batch; reflection, the gate, behavior and
      pruning run at each epoch end from the current policy's rollouts (co-evolution). The paper
      gives no formulas: this is one faithful reading, the choices are named where they are made.

Simplifications, all deliberate:
  1. Same-group successes and feedback first, so pmd contains sdpo: with an empty memory the two
     are the same algorithm, step for step.
  2. Insight similarity is word overlap (Jaccard), not an embedding model.
  3. The validation gate measures the teacher's log-likelihood of verified solutions of sibling
     training questions with and without the insight in context (no sampling): cheap, and it
     never looks at a held-out question.
  4. The model stays in eval mode while training (Gemma 3 has no dropout, so nothing changes).
  5. Evaluation is memory-free (the paper's point) except under --freeze policy, which is the
     in-context memory agent and is evaluated with memory in context.

    python pmd_distill.py --model gemma --method pmd          # default CPU run, ~10 min
    python pmd_distill.py --model gemma --method sdpo         # and grpo
    python pmd_distill.py --model gemma --compare             # base + grpo + sdpo + pmd, one report
    python pmd_distill.py --out runs/NAME --resume            # continue after a kill or Ctrl-C
    python pmd_distill.py --model gemma --compare --ablations --out runs/NAME --resume   # add the ablations
"""
import argparse
import copy
import json
import math
import re
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

METHODS = ("grpo", "sdpo", "pmd")
LEVELS = ("experience", "insight", "behavior")
MEMORY_KIND = "pmd-memory"

# ----------------------------------------------------------------------------
# prompts

# SDPO's own wording (lasgroup/SDPO), in plain text for a base model.
SOLUTION = "\nCorrect solution:\n\n{y}\n\n"
FEEDBACK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{f}\n\n"
REPROMPT = "\n\nCorrectly solve the original question.\n"
MEMORY = "\nNotes from earlier attempts:\n\n{m}\n\n"          # pmd's memory block (our wording)
ANSWER_STOP = ["\n"]    # every answer in our data fits on one line

REFLECT = (
    "Write one short lesson that would help with similar questions.\n\n"
    "Problem: In the game of Tarn, which piece moves first?\nCorrect attempt: the rook\n"
    "Wrong attempt: the king\nVerifier: expected the rook, got the king\n"
    "Lesson: In Tarn the rook always moves first, before any other piece.\n\n"
    "Problem: {problem}\nCorrect attempt: {good}\nWrong attempt: {bad}\nVerifier: {fb}\nLesson:")
SUMMARISE = (
    "Write one sentence that states the pattern shared by these lessons.\n\n"
    "Lessons:\n- In Tarn the rook moves first.\n- In Tarn the pawn moves last.\n"
    "Pattern: In Tarn, pieces move in a fixed order: rook first, pawn last.\n\n"
    "Lessons:\n{lessons}\nPattern:")


def as_turn(tok, text: str) -> str:
    """A REFLECT / SUMMARISE prompt: plain text for a base model, one user turn under a chat template."""
    return common.format_prompt(tok, text, chat=True) if getattr(tok, "chat_template", None) else text


def answer_text(q, completion: str) -> str:
    """What the rollout said, with the cue it continued: 'At a Velt red light, red means go'."""
    return ((q.cue.strip() + " ") if q.cue else "") + completion.strip()


def teacher_prompt(tok, q, solution=None, feedback=None, memory=None) -> str:
    """SDPO's teacher prompt: "{prompt}{solution}{feedback}\\n\\nCorrectly solve the original
    question.\\n", here with pmd's memory block before the solution, then the same answer start as
    the student's prompt, so the student's completion ids follow it unchanged."""
    chat = bool(getattr(tok, "chat_template", None))
    body = ("" if chat else common.FORMAT_EXAMPLES) + f"Question: {common.render_question(q)}\n"
    if memory:
        body += MEMORY.format(m=memory)
    if solution:
        body += SOLUTION.format(y=solution)
    if feedback:
        body += FEEDBACK.format(f=feedback)
    prompt = common.format_prompt(tok, body + REPROMPT, chat=chat)
    if q.cue:
        prompt += (" " if not chat else "") + q.cue.strip()
    return prompt


def teacher_input(tok, t_prompt: str, completion_ids: list[int]) -> tuple[list[int], list[int]]:
    """Teacher input = teacher prompt ids followed by the student's SAME completion ids."""
    return common.encode(tok, t_prompt), list(completion_ids)


# ----------------------------------------------------------------------------
# the maths (pure functions, tested on hand-made tensors)


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_group(r), no std normalisation. rewards (B, G) -> (B, G)."""
    return rewards - rewards.mean(-1, keepdim=True)


# GRPO's loss: -sum_i A_i sum_t log pi(y_it) / number of tokens (token-level normalisation).
grpo_loss = common.pg_loss
# SDPO's loss: the token-mean alpha-divergence over the student's top-k ids plus one tail bucket
# (alpha 0 = KL(teacher || student), 1 = KL(student || teacher), 0.5 = generalised JSD).
sdpo_loss = common.distill_loss


@torch.no_grad()
def ema_update(teacher, student, rate: float) -> None:
    """teacher <- (1 - rate) teacher + rate student. torch.lerp is exact at both ends: rate 0
    leaves the teacher as it is and rate 1 copies the student."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.lerp_(s, rate)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks + ([n] if ks[-1] != n else [])


# ----------------------------------------------------------------------------
# the split: deterministic, by question id, stratified by type


def stable_key(seed: int, qid: str) -> int:
    return zlib.crc32(f"{seed}:{qid}".encode())


def split_questions(questions, dev_per_type: int, test_per_type: int, seed: int):
    """{"train", "dev", "test"}: within each (cluster, sub-type) the questions are ordered by a hash
    of their id (not by file order, not by the run's RNG), the first test_per_type go to test,
    the next dev_per_type to dev, the rest to train. A type too small to give every split at
    least one question goes to train only; a data set with no type big enough is an error."""
    by_type = {}
    for q in questions:
        by_type.setdefault((q.cluster, q.subtype), []).append(q)
    split = {"train": [], "dev": [], "test": []}
    for key in sorted(by_type, key=str):
        qs = sorted(by_type[key], key=lambda q: (stable_key(seed, q.id), q.id))
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
    out = []
    for i in range(per_type):
        out += [qs[i] for _, qs in sorted(by_type.items(), key=lambda kv: str(kv[0])) if i < len(qs)]
    return out


# ----------------------------------------------------------------------------
# procedural memory: experience / insight / behavior, one plain JSON bank


def words(s: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", s.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / max(1, len(wa | wb))


def gold_strings(q) -> list[str]:
    """Strings that give away q's answer: the option text of an mcq, the answer of text/number."""
    if q.answer_type == "mcq":
        return [q.choices[common.LETTERS.index(q.answer)]]
    return [str(q.answer)]


def scrub(q, text: str) -> str:
    """Remove q's gold answer from text stored for a question the policy has not solved."""
    for g in gold_strings(q):
        text = re.sub(rf"(?<!\w){re.escape(g)}(?!\w)", "[...]", text, flags=re.I)
    return text


def redact_feedback(feedback: str) -> str:
    """'expected C, got B' -> 'wrong: got B': the verifier line without the gold answer."""
    m = re.match(r"expected .*?, ((?:got|no) .*)$", feedback)
    return "wrong: " + (m.group(1) if m else "not accepted")


def new_memory() -> dict:
    return {"schema": common.BANK_SCHEMA, "version": common.BANK_VERSION, "kind": MEMORY_KIND,
            "epoch": 0, "next_id": 0, "entries": [], "log": []}


def solved(mem, qid: str) -> bool:
    return any(e["level"] == "experience" and e["question"] == qid and e["reward"] == 1
               for e in mem["entries"])


def next_id(mem, level: str) -> str:
    mem["next_id"] += 1
    return f"{level[0]}{mem['next_id']:05d}"


def add_experience(mem, q, completion: str, reward: float, feedback: str, epoch: int, step: int,
                   max_success: int = 2, max_failure: int = 1) -> None:
    """Record one verified rollout. The same text twice is counted, not stored twice. At most
    max_success successes and max_failure failures per question (the newest kept). A failure of a
    question never solved is stored without its gold answer (scrubbed text, redacted feedback)."""
    if reward != 1 and not solved(mem, q.id):
        completion, feedback = scrub(q, completion), redact_feedback(feedback)
    for e in mem["entries"]:
        if e["level"] == "experience" and e["question"] == q.id and e["text"] == completion:
            e["count"] += 1
            e["epoch"], e["step"] = epoch, step
            return
    mem["entries"].append({"id": next_id(mem, "experience"), "level": "experience", "question": q.id,
                           "cluster": q.cluster, "subtype": q.subtype, "text": completion,
                           "reward": reward, "feedback": feedback, "epoch": epoch, "step": step,
                           "count": 1, "sources": [q.id]})
    for ok, cap in ((True, max_success), (False, max_failure)):
        mine = [e for e in mem["entries"] if e["level"] == "experience" and e["question"] == q.id
                and (e["reward"] == 1) == ok]
        for e in sorted(mine, key=lambda e: e["step"])[:max(0, len(mine) - cap)]:
            mem["entries"].remove(e)


def score(e) -> int:
    return e.get("helpful", 0) - e.get("harmful", 0)


def add_insight(mem, cand: dict, max_per_question: int, max_per_subtype: int,
                merge_at: float = 0.6) -> str:
    """Admit an insight: merged into a near-duplicate of the same scope (word Jaccard >= merge_at:
    its helpful counter rises and the lineage is joined), else appended; then the caps per
    question and per sub-type drop the lowest-counter entries (ACE/ExpeL-style). Returns the id."""
    for e in mem["entries"]:
        if (e["level"] == "insight" and (e["cluster"], e["subtype"]) == (cand["cluster"], cand["subtype"])
                and jaccard(e["text"], cand["text"]) >= merge_at):
            e["helpful"] += 1
            e["merged"] = e.get("merged", 0) + 1
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


def prune(mem, margin: int = 2) -> int:
    """Drop insights and behaviors whose harmful counter exceeds helpful by margin or more."""
    keep = [e for e in mem["entries"] if e["level"] == "experience" or -score(e) < margin]
    dropped = len(mem["entries"]) - len(keep)
    mem["entries"] = keep
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


def retrieve(mem, q, levels, tok, cap_tokens: int, exclude_insight: str | None = None):
    """(own earlier success or None, memory block text, ids of the entries used) for question q.
    Order: q's own successes, its latest failure, the best insights of its scope (question, then
    sub-type; ranked by word overlap with q and counters), the cluster's behavior. The block is
    capped at cap_tokens tokens; the question and the completion are never cut."""
    own_ok, lines, used = None, [], []
    ents = mem["entries"]
    if "experience" in levels:
        ok = [e for e in ents if e["level"] == "experience" and e["question"] == q.id and e["reward"] == 1]
        if ok:
            best = max(ok, key=lambda e: (e["count"], e["step"]))
            own_ok = answer_text(q, best["text"])
            used.append(best["id"])
        bad = [e for e in ents if e["level"] == "experience" and e["question"] == q.id and e["reward"] != 1]
        if bad:
            last = max(bad, key=lambda e: e["step"])
            lines.append((f"An earlier attempt, {answer_text(q, last['text'])!r}, was judged: {last['feedback']}",
                          last["id"]))
    if "insight" in levels:
        ins = [e for e in ents if e["level"] == "insight" and e["id"] != exclude_insight and e["cluster"] == q.cluster
               and e["subtype"] == q.subtype and (e["scope"] == "subtype" or e["question"] == q.id)]
        ins.sort(key=lambda e: (e["question"] == q.id, jaccard(e["text"], q.question) + 0.1 * score(e)), reverse=True)
        lines += [(e["text"], e["id"]) for e in ins]
    if "behavior" in levels:
        lines += [(e["text"], e["id"]) for e in ents if e["level"] == "behavior" and e["cluster"] == q.cluster]
    block = ""
    for text, eid in lines:
        cand = block + f"- {text}\n"
        if len(tok(cand, add_special_tokens=False).input_ids) > cap_tokens:
            break
        block = cand
        used.append(eid)
    return own_ok, block.strip(), used


# ----------------------------------------------------------------------------
# teacher contexts


def contexts(tok, qs, rewards, feedback, texts, method, mem=None, levels=(), cap_tokens=0, use_feedback=True):
    """For each of B*G rollouts: (teacher prompt or None, where the context came from, entry ids).
    The solution shown is the first OTHER success of the group (never the rollout itself); pmd
    falls back on memory. A failed rollout also gets its own verifier feedback."""
    G = len(rewards) // len(qs)
    out = []
    for i in range(len(rewards)):
        q, b = qs[i // G], i // G
        others = [j for j in range(b * G, b * G + G) if j != i and rewards[j] == 1]
        sol = answer_text(q, texts[others[0]]) if others else None
        fb = feedback[i] if use_feedback and rewards[i] != 1 else None
        block, used, source = None, [], "group" if sol else ("feedback" if fb else None)
        if method == "pmd":
            own, block, used = retrieve(mem, q, levels, tok, cap_tokens)
            if sol is None and own is not None:
                sol, source = own, "memory"
            elif source is None and block:
                source = "memory"
        if sol is None and fb is None and not block:
            out.append((None, None, []))
            continue
        out.append((teacher_prompt(tok, q, sol, fb, block or None), source, used))
    return out


# ----------------------------------------------------------------------------
# reflection and the validation gate (epoch end)


def template_insight(q, good: str | None, bad: str | None) -> tuple[str, str, str]:
    """(text, kind, scope) built only from the evidence: a passing answer, else a rejected one."""
    if good is not None:
        text = answer_text(q, good).rstrip(".") + "." if q.cue else f"For {q.question.strip()!r}, {good.strip()!r} is accepted."
        return text, "strategy", "subtype"
    # the question was not solved: the wrong attempt is shown without any trace of the gold answer
    return f"For {q.question.strip()!r}, {scrub(q, answer_text(q, bad))!r} is not accepted.", "lesson", "question"


def reflect(model, tok, mode, evidence, temperature, seed, max_tokens=40):
    """One candidate insight per question in evidence [(q, good text or None, bad text or None,
    feedback of bad)]. Returns ([(q, text, kind, scope)], reflection tokens sampled)."""
    out, n_tok = [], 0
    if mode == "template":
        return [(q, *template_insight(q, g, b)) for q, g, b, _ in evidence], 0
    prompts = []
    for q, g, b, fb in evidence:
        solved_here = g is not None
        text = REFLECT.format(problem=common.render_question(q).replace("\n", " "),
                              good=answer_text(q, g) if solved_here else "(none yet)",
                              bad=answer_text(q, b) if b is not None else "(none)",
                              fb=(fb or "(none)") if solved_here else redact_feedback(fb or ""))
        prompts.append(as_turn(tok, text))
    res = common.sample(model, tok, prompts, n=1, max_new_tokens=max_tokens, temperature=temperature,
                        stop=ANSWER_STOP, seed=seed, progress="reflection")
    for (q, g, b, _), s in zip(evidence, res):
        n_tok += len(s.token_ids)
        text = s.text.strip()
        if g is None:
            text = scrub(q, text)   # never store the gold answer of an unsolved question
        if text:
            out.append((q, text, "strategy" if g is not None else "lesson", "subtype" if g is not None else "question"))
    return out, n_tok


@torch.no_grad()
def gate_gains(teacher, tok, insights, siblings, temperature):
    """For each insight text, the teacher's mean per-token log-likelihood gain on verified
    solutions of sibling training questions with the insight in context vs without.
    siblings: per insight, a list of (q', solution completion text). Returns (gains, tokens)."""
    prompts, comps, owner, arm = [], [], [], []
    for k, (text, sibs) in enumerate(zip(insights, siblings)):
        for q2, sol in sibs:
            ids = tok(sol, add_special_tokens=False).input_ids
            if not ids:
                continue
            for a, mem_block in ((1, f"- {text}"), (0, None)):
                prompts.append(common.encode(tok, teacher_prompt(tok, q2, memory=mem_block)))
                comps.append(ids)
                owner.append(k)
                arm.append(a)
    gains = [None] * len(insights)
    if not prompts:
        return gains, 0
    lp_all = []
    for s in range(0, len(prompts), 8):
        lp = common.token_logprobs(teacher, prompts[s:s + 8], comps[s:s + 8], temperature=temperature,
                                   pad_id=tok.pad_token_id)
        lp_all += [(lp["logprobs"][r] * lp["mask"][r]).sum().item() / lp["mask"][r].sum().item()
                   for r in range(lp["mask"].shape[0])]
    per = {}
    for k, a, v in zip(owner, arm, lp_all):
        per.setdefault(k, {0: [], 1: []})[a].append(v)
    for k, d in per.items():
        gains[k] = float(np.mean(d[1]) - np.mean(d[0]))
    return gains, sum(len(p) + len(c) for p, c in zip(prompts, comps))


# ----------------------------------------------------------------------------
# evaluation: held-out questions, the same questions and row seeds for every method


answer_key = common.answer_key   # the answer a completion gives, for votes and distinct counts


def eval_prompts(tok, qs, mem=None, levels=(), cap_tokens=0):
    if mem is None:
        return [common.question_prompt(tok, q) for q in qs]
    return [teacher_prompt(tok, q, memory=retrieve(mem, q, levels, tok, cap_tokens)[1] or None) for q in qs]


def evaluate(model, tok, qs, n, temperature, max_new, seed, prompts=None, progress="eval") -> list[dict]:
    """Per question: n sampled rewards and answers (row seeds fixed by seed and question index, so
    every method and checkpoint is scored on the same random numbers) and the greedy reward."""
    prompts = prompts or [common.question_prompt(tok, q) for q in qs]
    base = common.stream_seed(seed, "eval")
    seeds = [common.row_seed(base, i, j) for i in range(len(qs)) for j in range(n)]
    samples = common.sample(model, tok, prompts, n=n, max_new_tokens=max_new, temperature=temperature,
                            stop=ANSWER_STOP, row_seeds=seeds, progress=progress)
    greedy = common.sample(model, tok, prompts, n=1, max_new_tokens=max_new, temperature=0,
                           stop=ANSWER_STOP, progress=progress + " (greedy)")
    out = []
    for i, q in enumerate(qs):
        rows = samples[i * n:(i + 1) * n]
        r = [common.verify(q, s.text)[0] for s in rows]
        keys = [answer_key(q, s.text) for s in rows]
        votes = Counter(k for k in keys if k is not None)
        maj = 0.0
        if votes:
            top = votes.most_common(1)[0][0]
            maj = r[keys.index(top)]
        out.append({"id": q.id, "rewards": r, "answers": [str(k) for k in keys], "greedy": common.verify(q, greedy[i].text)[0],
                    "majority": maj, "distinct": len(votes), "greedy_text": greedy[i].text[:80]})
    return out


def summarise(per_q: list[dict], seed: int, k_max: int | None = None) -> dict:
    """Every figure with its n and a 95% interval. Samples of one question are not independent:
    mean accuracy uses the clustered bootstrap; per-question figures are independent across
    questions (mean_ci)."""
    n = len(per_q[0]["rewards"])
    groups = [np.array(p["rewards"]) for p in per_q]
    c = [int(g.sum()) for g in groups]
    s = {"n_questions": len(per_q), "n_samples": n,
         "accuracy": common.cluster_bootstrap_ci(groups, seed=common.stream_seed(seed, "bootstrap")),
         "greedy": common.mean_ci([p["greedy"] for p in per_q], binary=True),
         "majority": common.mean_ci([p["majority"] for p in per_q], binary=True),
         "coverage": common.mean_ci([float(ci > 0) for ci in c], binary=True),
         "distinct": common.mean_ci([p["distinct"] for p in per_q], binary=False, bounds=(0, n)),
         "headroom": common.mean_ci([pass_at_k(n, ci, n) - ci / n for ci in c], binary=False, bounds=(0, 1)),
         # pass@n is 0/1 per question (= coverage): Wilson; pass@k for k < n is a fraction: t, cut to [0, 1]
         "pass_at_k": {str(k): common.mean_ci([pass_at_k(n, ci, k) for ci in c], binary=k == n, bounds=None if k == n else (0, 1))
                       for k in pass_ks(min(k_max or n, n))}}
    return s


def paired_vs(per_a, per_b) -> dict:
    """a - b on the same questions and row seeds: mean accuracy per question (t interval over
    questions) and greedy (Newcombe's paired interval)."""
    assert [p["id"] for p in per_a] == [p["id"] for p in per_b]
    return {"accuracy": common.mean_ci([np.mean(a["rewards"]) - np.mean(b["rewards"]) for a, b in zip(per_a, per_b)],
                                       binary=False),
            "greedy": common.paired_binary_ci([a["greedy"] for a in per_a], [b["greedy"] for b in per_b])}


# ----------------------------------------------------------------------------
# one training run


def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data="data/procedural.jsonl")
    p.add_argument("--method", choices=METHODS, default="pmd")
    p.add_argument("--compare", action="store_true", help="base + grpo + sdpo + pmd in one folder, one report")
    p.add_argument("--ablations", action="store_true", help="with --compare: also --freeze memory|policy and each level alone")
    p.add_argument("--epochs", type=common.at_least(1), default=2)
    p.add_argument("--B", type=common.at_least(1), default=2, help="questions per step")
    p.add_argument("--G", type=common.at_least(1), default=8, help="rollouts per question")
    p.add_argument("--train-per-type", type=common.at_least(1), default=1, help="training questions per (cluster, sub-type)")
    p.add_argument("--dev-per-type", type=common.at_least(1), default=1, help="dev questions per type (checkpoint selection)")
    p.add_argument("--test-per-type", type=common.at_least(1), default=1, help="held-out test questions per type")
    p.add_argument("--include-controls", action="store_true", help="also use the negative-control clusters")
    p.add_argument("--temperature", type=common.positive, default=0.7, help="rollouts, and both distributions of the loss")
    p.add_argument("--max-new-tokens", type=common.at_least(1), default=16)
    p.add_argument("--lr", type=common.positive, default=1e-6, help="AdamW, the same for every method")
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--micro-batch", type=common.at_least(1), default=4, help="rows per forward/backward (memory only)")
    p.add_argument("--top-k", type=common.at_least(1), default=100, help="student top-k ids in the distillation loss")
    p.add_argument("--alpha", type=common.unit_interval, default=0.5, help="0 KL(teacher||student), 1 KL(student||teacher), 0.5 JSD")
    p.add_argument("--tail", action=argparse.BooleanOptionalAction, default=True, help="the 1 - top-k mass bucket")
    p.add_argument("--ema", type=common.unit_interval, default=0.05, help="teacher EMA rate per step (0 frozen, 1 = student)")
    p.add_argument("--feedback", action=argparse.BooleanOptionalAction, default=True,
                   help="show a failed rollout's verifier line to the teacher when the group has no success")
    p.add_argument("--reflector", choices=["self", "template", "none"], default="template")
    p.add_argument("--levels", default="experience,insight,behavior", help="which memory levels exist")
    p.add_argument("--freeze", choices=["memory", "policy"], default=None, help="pmd ablations")
    p.add_argument("--memory-tokens", type=common.at_least(1), default=64, help="cap on the retrieved memory block")
    p.add_argument("--max-success", type=common.at_least(1), default=2, help="experience: successes kept per question")
    p.add_argument("--max-failure", type=common.at_least(0), default=1, help="experience: failures kept per question")
    p.add_argument("--insights-per-question", type=common.at_least(1), default=2)
    p.add_argument("--insights-per-subtype", type=common.at_least(1), default=4)
    p.add_argument("--gate-siblings", type=common.at_least(1), default=2, help="sibling questions an insight is validated on")
    p.add_argument("--eval-samples", type=common.at_least(1), default=8, help="samples per held-out question (the n of pass@k)")
    p.add_argument("--pass-k", type=common.at_least(1), default=None, help="largest k of pass@k (default: --eval-samples)")
    p.add_argument("--dev-samples", type=common.at_least(1), default=2)
    p.add_argument("--save-every", type=common.at_least(1), default=4, help="checkpoint every this many steps (and at epoch ends)")
    return p


def check_args(args):
    """Checks across flags (each flag's own range is its argparse type)."""
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise common.flag_error("levels", args.levels, f"unknown level {bad[0]!r}; choose from {', '.join(LEVELS)}"
                                if bad else "name at least one level")
    if args.freeze and (args.method != "pmd" or args.compare):
        raise common.flag_error("freeze", args.freeze, f"only with --method pmd (got --method {args.method}"
                                + (" --compare)" if args.compare else ")"))
    if args.pass_k is not None and args.pass_k > args.eval_samples:
        raise common.flag_error("pass_k", args.pass_k, f"k larger than n: at most --eval-samples {args.eval_samples}")


def run_method(args, out: Path, split, log=print, start_evals=None) -> dict:
    """Train one method in out/ (resuming if out/checkpoint exists and args.resume), evaluate on the
    held-out test questions, write report.md; returns the summary (also out/eval.json).
    start_evals: (base test evaluation, dev curve's first point) of the same starting model,
    shared by --compare so the base model is evaluated once (same seeds: the same numbers)."""
    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    train, dev, test = split["train"], split["dev"], split["test"]
    train_ids = {q.id for q in train}
    mem_path, metrics_path, eval_path = out / "memory.json", out / "metrics.jsonl", out / "eval.json"
    if eval_path.exists() and args.resume:
        log(f"{out}: finished earlier; keeping its samples, recomputing its summaries and report")
        result = add_summaries(json.loads(eval_path.read_text()), args)
        common.atomic_write_json(eval_path, result)
        write_report(out, args, result)
        return result
    ckpt = common.find_checkpoint(out) if args.resume else None     # survives a kill mid-save
    resuming = ckpt is not None
    model, tok = common.load_model(str(ckpt) if resuming else args.model, args.device, args.dtype, args.activation_checkpointing)
    device = next(model.parameters()).device
    sampler = common.rollout_copy(model, args.rollout_dtype)   # bf16 copy where bf16 is fast, else model itself
    log(f"weights in {next(model.parameters()).dtype}, rollouts in {next(sampler.parameters()).dtype}")
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    policy = common.Policy(model, sampler, tok, params, opt)
    teacher = None
    if args.method != "grpo":
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
    mem = new_memory()
    steps_per_epoch = math.ceil(len(train) / args.B)
    total = steps_per_epoch * args.epochs
    state = {"start": 0, "epoch_rollouts": [], "best": None, "dev": [], "base": None, "compute": Counter()}
    if resuming:
        saved = common.load_resume_state(out, opt)
        extra = saved["extra"]
        state.update(start=saved["step"], epoch_rollouts=extra["epoch_rollouts"], best=extra["best"],
                     dev=extra["dev"], base=extra["base"], compute=Counter(extra["compute"]))
        mem = extra["memory"]
        if teacher is not None:
            teacher.load_state_dict(extra["teacher"])
        # anything logged after the checkpoint is redone (a torn last line is dropped)
        common.write_jsonl(metrics_path, [m for m in common.read_jsonl(metrics_path) if m["step"] < state["start"]])
        log(f"resuming {out} at step {state['start']} of {total}")
    elif metrics_path.exists():      # a fresh start in a folder a killed run left before its first checkpoint
        metrics_path.unlink()
    common.save_bank(mem_path, mem)
    k_top = min(args.top_k, model.config.vocab_size)
    t_run = time.time()

    def dev_accuracy():
        res = evaluate(sampler, tok, dev, args.dev_samples, args.temperature, args.max_new_tokens,
                       common.stream_seed(args.seed, "dev"), prompts=frozen_policy_prompts(dev), progress="dev")
        return common.cluster_bootstrap_ci([np.array(p["rewards"]) for p in res], seed=args.seed)

    def frozen_policy_prompts(qs):
        # the in-context memory agent (--freeze policy) is evaluated with memory in its context
        if args.method == "pmd" and args.freeze == "policy":
            return eval_prompts(tok, qs, mem, levels, args.memory_tokens)
        return None

    if state["base"] is None and start_evals is not None and not (args.method == "pmd" and args.freeze == "policy"):
        state["base"], dev0 = copy.deepcopy(start_evals)
        state["dev"], state["best"] = [dev0], {"epoch": 0, "dev": dev0["dev"]["mean"]}
    if state["base"] is None:
        log("evaluating the starting model on the held-out test questions...")
        state["base"] = evaluate(sampler, tok, test, args.eval_samples, args.temperature, args.max_new_tokens,
                                 args.seed, prompts=frozen_policy_prompts(test), progress="base eval")
        state["dev"] = [{"epoch": 0, "rollouts": 0, "dev": dev_accuracy()}]
        state["best"] = {"epoch": 0, "dev": state["dev"][0]["dev"]["mean"]}

    bar = tqdm(range(state["start"], total), desc=f"{args.method} steps", initial=state["start"], total=total)
    for step in bar:
        t0 = time.time()
        epoch = step // steps_per_epoch
        order = [train[i] for i in np.random.default_rng(common.stream_seed(args.seed, "order", epoch)).permutation(len(train))]
        qs = order[(step % steps_per_epoch) * args.B:(step % steps_per_epoch + 1) * args.B]
        rec = {"step": step, "epoch": epoch, "questions": [q.id for q in qs]}

        # ---- 1-2. B x G rollouts from the current policy, verified
        prompts = [common.question_prompt(tok, q) for q in qs]
        base_seed = common.stream_seed(args.seed, "rollout", step)
        seeds = [common.row_seed(base_seed, b, j) for b in range(len(qs)) for j in range(args.G)]
        t_s = time.time()
        roll = common.sample(sampler, tok, prompts, n=args.G, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, stop=ANSWER_STOP, row_seeds=seeds, progress="rollouts")
        rec["time_rollouts"] = time.time() - t_s
        ver = [common.verify(qs[i // args.G], s.text) for i, s in enumerate(roll)]
        rewards = [r for r, _ in ver]
        feedback = [f for _, f in ver]
        texts = [s.text for s in roll]
        comp = [s.token_ids for s in roll]
        s_ids = [common.encode(tok, prompts[i // args.G]) for i in range(len(roll))]
        lens = [len(c) for c in comp]
        state["compute"]["tokens_sampled"] += sum(lens)
        sampled_lp = [lp for s in roll for lp in s.logprobs]
        rec.update(reward=common.cluster_bootstrap_ci([rewards[b * args.G:(b + 1) * args.G] for b in range(len(qs))],
                                                      seed=args.seed),
                   length=float(np.mean(lens)), entropy=float(-np.mean(sampled_lp)) if sampled_lp else None)

        # ---- 3. the loss
        t_l = time.time()
        rows, loss_val, n_active = [], None, 0
        if args.method == "grpo":
            R = torch.tensor(rewards, dtype=torch.float32).view(len(qs), args.G)
            A = grpo_advantages(R).view(-1)
            keep_groups = [b for b in range(len(qs)) if R[b].std() > 0]   # zero-variance groups: A = 0, skipped
            rows = [i for b in keep_groups for i in range(b * args.G, (b + 1) * args.G)]
            n_active = sum(lens[i] for i in rows)
            rec.update(groups_used=len(keep_groups), groups_skipped=len(qs) - len(keep_groups))
        else:
            ctx = contexts(tok, qs, rewards, feedback, texts, args.method, mem, levels, args.memory_tokens, args.feedback)
            rows = [i for i, (tp, _, _) in enumerate(ctx) if tp is not None]
            n_active = sum(lens[i] for i in rows)
            src = Counter(c[1] for c in ctx)
            rec.update(context_share=len(rows) / len(ctx), no_context=len(ctx) - len(rows),
                       context_from={k: v for k, v in src.items() if k}, memory_entries_used=sum(len(c[2]) for c in ctx))
        rec["active_tokens"] = n_active
        grad_norm = None
        if rows and args.freeze != "policy":
            total_loss, mism = 0.0, []
            for s in range(0, len(rows), args.micro_batch):
                mb = rows[s:s + args.micro_batch]
                if args.method == "grpo":
                    lp = common.token_logprobs(model, [s_ids[i] for i in mb], [comp[i] for i in mb],
                                               temperature=args.temperature, pad_id=tok.pad_token_id)
                    loss = grpo_loss(lp["logprobs"], lp["mask"], A[mb].to(device)) * (lp["mask"].sum() / n_active)
                else:
                    st = common.token_logprobs(model, [s_ids[i] for i in mb], [comp[i] for i in mb],
                                               temperature=args.temperature, pad_id=tok.pad_token_id,
                                               student_top_k=k_top)
                    t_in = [teacher_input(tok, ctx[i][0], comp[i]) for i in mb]
                    with torch.no_grad():
                        te = common.token_logprobs(teacher, [p for p, _ in t_in], [c for _, c in t_in],
                                                   temperature=args.temperature, pad_id=tok.pad_token_id,
                                                   extra_ids=st["student_topk_ids"])
                    state["compute"]["teacher_tokens"] += sum(len(p) + len(c) for p, c in t_in)
                    loss = sdpo_loss(st["student_topk_logprobs"], te["extra_logprobs"], st["mask"], args.alpha,
                                     args.tail, n_active=n_active)
                loss.backward()
                total_loss += float(loss.detach())
                lp_mb = lp if args.method == "grpo" else st
                mism.append(common.logprob_mismatch([roll[i].logprobs for i in mb], lp_mb["logprobs"], lp_mb["mask"]))
            loss_val = total_loss
            # how far the rollout policy (a bf16 copy where bf16 is fast) is from the trained one
            n_m = sum(m["n"] for m in mism)
            rec["logprob_mismatch"] = {"mean": sum(m["mean"] * m["n"] for m in mism if m["n"]) / n_m if n_m else None,
                                       "max": max((m["max"] for m in mism if m["n"]), default=None), "n": n_m}
            if math.isfinite(loss_val):
                stepped = common.optimizer_step(policy, args.clip)
                grad_norm = stepped["grad_norm"]
                rec.update({k: v for k, v in stepped.items() if k != "grad_norm" and v is not None})
            else:
                rec["skipped"] = f"non-finite loss {loss_val}"
                opt.zero_grad(set_to_none=True)
        if teacher is not None and args.freeze != "policy":
            ema_update(teacher, model, args.ema)    # every step, as SDPO's teacher update
        rec.update(loss=loss_val, grad_norm=grad_norm, time_update=time.time() - t_l)
        if args.method != "grpo":   # the divergence is the loss: log it as the step's KL figure
            rec["divergence"] = loss_val

        # ---- pmd: experience after every batch (co-evolution), unless frozen after epoch 0
        t_m = time.time()
        memory_live = args.method == "pmd" and not (args.freeze == "memory" and epoch > 0)
        if memory_live and "experience" in levels:
            for i, s in enumerate(roll):
                add_experience(mem, qs[i // args.G], texts[i], rewards[i], feedback[i], epoch, step,
                               args.max_success, args.max_failure)
        state["epoch_rollouts"] += [{"q": qs[i // args.G].id, "text": texts[i], "reward": rewards[i],
                                     "feedback": feedback[i]} for i in range(len(roll))]

        # ---- epoch end: reflection, the gate, behavior, pruning; dev accuracy for checkpoint selection
        if (step + 1) % steps_per_epoch == 0:
            # --levels behavior alone still reflects insights (a behavior's lineage) but never retrieves them
            if memory_live and ("insight" in levels or "behavior" in levels) and args.reflector != "none":
                rec["epoch_end"] = epoch_end(sampler, teacher, tok, mem, state, train, levels, args, epoch)
            mem["epoch"] = epoch + 1
            rec["memory_size"] = level_sizes(mem)
            state["epoch_rollouts"] = []
            d = dev_accuracy()
            state["dev"].append({"epoch": epoch + 1, "rollouts": (step + 1) * args.B * args.G, "dev": d})
            rec["dev"] = d
            if d["mean"] > state["best"]["dev"]:
                state["best"] = {"epoch": epoch + 1, "dev": d["mean"]}
                model.save_pretrained(out / "best")
        rec["time_memory"] = time.time() - t_m

        # ---- record: memory and metrics first, checkpoint last (a kill in between repeats a step)
        check_no_heldout(mem, train_ids)
        common.save_bank(mem_path, mem)
        if args.method == "pmd" and (step + 1) % steps_per_epoch == 0:
            common.save_bank(out / f"memory.epoch{epoch + 1}.json", mem)
        rec.update(step_time=time.time() - t0, peak_memory_mb=common.peak_memory_mb(device))
        common.append_jsonl(metrics_path, rec)
        if (step + 1) % args.save_every == 0 or (step + 1) % steps_per_epoch == 0 or step + 1 == total:
            extra = {"epoch_rollouts": state["epoch_rollouts"], "best": state["best"], "dev": state["dev"],
                     "base": state["base"], "compute": dict(state["compute"]), "memory": mem,
                     "teacher": teacher.state_dict() if teacher is not None else None}
            common.save_checkpoint(out, model, tok, opt, step=step + 1, extra=extra)
        bar.set_postfix(r=f"{np.mean(rewards):.2f}", tok=n_active,
                        gn="-" if grad_norm is None else f"{grad_norm:.2g}")

    # ---- evaluation: final weights, and the best-on-dev weights if they differ
    log("evaluating on the held-out test questions...")
    final = evaluate(sampler, tok, test, args.eval_samples, args.temperature, args.max_new_tokens, args.seed,
                     prompts=frozen_policy_prompts(test), progress="final eval")
    best = None
    if state["best"]["epoch"] not in (0, args.epochs) and (out / "best").exists():
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(out / "best", dtype=next(model.parameters()).dtype).state_dict())
        common.sync_rollout(sampler, model)
        best = evaluate(sampler, tok, test, args.eval_samples, args.temperature, args.max_new_tokens, args.seed,
                        prompts=frozen_policy_prompts(test), progress="best eval")
    elif state["best"]["epoch"] == 0:
        best = state["base"]
    result = {"method": args.method, "freeze": args.freeze, "levels": list(levels), "reflector": args.reflector,
              "base": {"per_question": state["base"]}, "final": {"per_question": final},
              "best_on_dev": {"epoch": state["best"]["epoch"], "dev": state["best"]["dev"]},
              "dev_curve": state["dev"], "compute": {**dict(state["compute"]), "wall_s": time.time() - t_run},
              "memory_size": level_sizes(mem)}
    if best is not None:
        result["best_on_dev"]["per_question"] = best
    else:
        result["best_on_dev"]["same_as"] = "final"
    result = add_summaries(result, args)
    # metrics written by a resumed run count the wall time of its own part only
    common.atomic_write_json(eval_path, result)
    write_report(out, args, result)
    log(f"memory: {mem_path}\nmetrics: {metrics_path}\nreport:  {out / 'report.md'}")
    return result


def add_summaries(result: dict, args) -> dict:
    """The summaries (and the paired comparisons with the base) of an eval.json result, computed
    from its per-question samples only, so a --resume of a finished run re-derives them with the
    current statistics."""
    base = result["base"]["per_question"]
    result["base"]["summary"] = summarise(base, args.seed, args.pass_k)
    for part in (result["final"], result["best_on_dev"]):
        if "per_question" in part:
            part.update(summary=summarise(part["per_question"], args.seed, args.pass_k),
                        vs_base=paired_vs(part["per_question"], base))
    return result


def epoch_end(sampler, teacher, tok, mem, state, train, levels, args, epoch) -> dict:
    """Co-evolution at the end of an epoch, from the current policy's rollouts of this epoch:
    reflect one candidate insight per question, admit it only if it raises the teacher's
    likelihood of verified solutions on sibling questions (not its source), update the counters
    of the insights already in memory the same way, build behaviors, prune."""
    by_id = {q.id: q for q in train}
    seen, evidence, solutions = [], [], {}
    for r in state["epoch_rollouts"]:
        if r["q"] not in seen:
            seen.append(r["q"])
        if r["reward"] == 1:
            solutions.setdefault(r["q"], r["text"])
    for qid in seen:
        rs = [r for r in state["epoch_rollouts"] if r["q"] == qid]
        good = next((r["text"] for r in rs if r["reward"] == 1), None)
        bad = next((r for r in rs if r["reward"] != 1), None)
        evidence.append((by_id[qid], good, bad["text"] if bad else None, bad["feedback"] if bad else None))
    cands, n_tok = reflect(sampler, tok, args.reflector, evidence, args.temperature,
                           common.stream_seed(args.seed, "reflect", epoch))
    state["compute"]["reflection_tokens"] += n_tok

    def siblings(q):
        # verified solutions of OTHER training questions, this epoch: same sub-type first, then the
        # rest of the cluster (with one training question per sub-type there is no same-sub-type one)
        same = [x for x in sorted(solutions) if x != q.id and by_id[x].cluster == q.cluster]
        same.sort(key=lambda x: by_id[x].subtype != q.subtype)
        return [(by_id[x], solutions[x]) for x in same][:args.gate_siblings]

    sib = [siblings(q) for q, *_ in cands]
    gains, g_tok = gate_gains(teacher, tok, [c[1] for c in cands], sib, args.temperature)
    admitted, untestable = [], 0
    for (q, text, kind, scope), g in zip(cands, gains):
        if g is None:
            untestable += 1
        elif g > 0:
            admitted.append(add_insight(mem, {"cluster": q.cluster, "subtype": q.subtype, "question": q.id,
                                              "scope": scope, "kind": kind, "text": text, "epoch": epoch,
                                              "sources": [q.id], "gate_gain": g},
                                        args.insights_per_question, args.insights_per_subtype))
    # counters of the insights from earlier epochs: re-scored on this epoch's siblings
    old = [e for e in mem["entries"] if e["level"] == "insight" and e["epoch"] < epoch]
    old_gain, o_tok = gate_gains(teacher, tok, [e["text"] for e in old],
                                 [siblings(by_id[e["question"]]) for e in old], args.temperature)
    for e, g in zip(old, old_gain):
        if g is not None:
            e["helpful" if g > 0 else "harmful"] += 1
    state["compute"]["gate_tokens"] += g_tok + o_tok
    n_beh = build_behaviors(sampler, tok, mem, args, epoch) if "behavior" in levels else 0
    dropped = prune(mem)
    tested = len(cands) - untestable
    info = {"candidates": len(cands), "untestable": untestable, "admitted": len(admitted),
            "admit_rate": common.mean_ci([float(g > 0) for g in gains if g is not None], binary=True) if tested else None,
            "gate_gain": common.mean_ci([g for g in gains if g is not None], binary=False) if tested else None,
            "memory_gain_old": common.mean_ci([g for g in old_gain if g is not None], binary=False)
            if any(g is not None for g in old_gain) else None,
            "behaviors": n_beh, "pruned": dropped}
    mem["log"].append({"epoch": epoch, **{k: v for k, v in info.items()}})
    return info


def build_behaviors(model, tok, mem, args, epoch) -> int:
    """One behavior per cluster whose admitted insights span at least 3 questions: the pattern
    across them (written by the policy with --reflector self, else their best statements joined).
    Lineage: the insights and questions it came from; counters start from theirs."""
    made = 0
    clusters = sorted({e["cluster"] for e in mem["entries"] if e["level"] == "insight"})
    for c in clusters:
        ins = sorted([e for e in mem["entries"] if e["level"] == "insight" and e["cluster"] == c],
                     key=lambda e: -score(e))
        qids = sorted({s for e in ins for s in e["sources"]})
        if len(qids) < 3:
            continue
        top = ins[:4]
        if args.reflector == "self":
            prompt = as_turn(tok, SUMMARISE.format(lessons="\n".join(f"- {e['text']}" for e in top)))
            s = common.sample(model, tok, [prompt], n=1,
                              max_new_tokens=40, temperature=args.temperature, stop=ANSWER_STOP,
                              seed=common.stream_seed(args.seed, "behavior", epoch, made))[0]
            text = s.text.strip() or " ".join(e["text"] for e in top)
        else:
            text = " ".join(e["text"] for e in top)
        mem["entries"] = [e for e in mem["entries"] if not (e["level"] == "behavior" and e["cluster"] == c)]
        mem["entries"].append({"id": next_id(mem, "behavior"), "level": "behavior", "cluster": c, "subtype": None,
                               "text": text, "epoch": epoch, "from": [e["id"] for e in top], "sources": qids,
                               "helpful": sum(e["helpful"] for e in top), "harmful": sum(e["harmful"] for e in top)})
        made += 1
    return made


# ----------------------------------------------------------------------------
# report


def fmt(ci, signed=False):
    return common.fmt_ci(ci, signed=signed)


def summary_rows(name, s, vs=None):
    return (f"| {name} | {fmt(s['accuracy'])} | {fmt(s['greedy'])} | {fmt(s['majority'])} | "
            f"{fmt(s['pass_at_k'][max(s['pass_at_k'], key=int)])} | {fmt(s['coverage'])} | {fmt(s['distinct'])} | "
            f"{fmt(s['headroom'])} | {fmt(vs['accuracy'], True) if vs else '-'} | {fmt(vs['greedy'], True) if vs else '-'} |")


TABLE_HEAD = ["| run | mean accuracy | greedy | majority | pass@n | coverage | distinct answers | headroom (pass@n - mean) | vs base: accuracy | vs base: greedy |",
              "|---|---|---|---|---|---|---|---|---|---|"]


def write_report(out: Path, args, r: dict):
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    fs, bs = r["final"]["summary"], r["base"]["summary"]
    name = args.method + (f" --freeze {args.freeze}" if args.freeze else "") + \
        (f" --levels {args.levels}" if args.method == "pmd" and args.levels != ",".join(LEVELS) else "")
    lines = [f"# {name}: {out.name}", "",
             f"Held-out test: {fs['n_questions']} questions x {fs['n_samples']} samples (T={args.temperature}), the same "
             f"questions and row seeds for every method. Mean accuracy: clustered bootstrap over questions; the rest: "
             f"per-question values, Wilson or t intervals over questions. 95% intervals.", "",
             *TABLE_HEAD, summary_rows("base", bs), summary_rows(f"{name} (final)", fs, r["final"]["vs_base"])]
    b = r["best_on_dev"]
    if "summary" in b:
        lines.append(summary_rows(f"{name} (best on dev, epoch {b['epoch']})", b["summary"], b["vs_base"]))
    else:
        lines.append(f"\nBest on dev: epoch {b['epoch']} (the final weights).")
    lines += ["", "pass@k (unbiased estimator, mean over questions): " +
              ", ".join(f"k={k}: {fmt(v)}" for k, v in fs["pass_at_k"].items()), ""]
    lines += ["## Dev accuracy against cumulative training rollouts", "", "| epoch | rollouts | dev accuracy |", "|---|---|---|"]
    lines += [f"| {d['epoch']} | {d['rollouts']} | {fmt(d['dev'])} |" for d in r["dev_curve"]]
    lines += ["", "## Per step", "",
              "| step | epoch | reward | active tokens | teacher-context share | grad norm | loss | entropy | length | time s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        gn = "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3g}"
        lo = "-" if m["loss"] is None else f"{m['loss']:.4g}"
        cs = f"{m['context_share']:.2f}" if "context_share" in m else "-"
        lines.append(f"| {m['step']} | {m['epoch']} | {fmt(m['reward'])} | {m['active_tokens']} | {cs} | {gn} | {lo} | "
                     f"{m['entropy']:.2f} | {m['length']:.1f} | {m['step_time']:.1f} |")
    ends = [m for m in metrics if "memory_size" in m]
    if args.method == "pmd":
        lines += ["", "## Per epoch (memory)", "",
                  "| epoch | experience | insight | behavior | candidates | untestable | admitted | admit rate | gate gain (nats/token) | old insights' gain | pruned |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in ends:
            e, ms = m.get("epoch_end") or {}, m["memory_size"]
            lines.append(f"| {m['epoch']} | {ms['experience']} | {ms['insight']} | {ms['behavior']} | {e.get('candidates', '-')} | "
                         f"{e.get('untestable', '-')} | {e.get('admitted', '-')} | {fmt(e.get('admit_rate'))} | "
                         f"{fmt(e.get('gate_gain'), True)} | {fmt(e.get('memory_gain_old'), True)} | {e.get('pruned', '-')} |")
    if args.method != "grpo":
        share = [m["context_share"] for m in metrics]
        lines += ["", f"Teacher context given to {np.mean(share):.0%} of rollouts (mean over steps); "
                  f"rollouts with no context (mask 0): {sum(m['no_context'] for m in metrics)}; "
                  f"contexts by source: {dict(sum((Counter(m['context_from']) for m in metrics), Counter()))}."]
    c = r["compute"]
    lines += ["", "## Compute", "", f"tokens sampled {c.get('tokens_sampled', 0)}, teacher-forward tokens "
              f"{c.get('teacher_tokens', 0)}, reflection tokens {c.get('reflection_tokens', 0)}, gate tokens "
              f"{c.get('gate_tokens', 0)}, wall time {c['wall_s'] / 60:.1f} min (this process)."]
    common.write_report(out, lines)


PAPER = ("| paper (Qwen3-8B) SciKnowEval | 47.9 | 69.4 | 74.4 | 77.2 |\n"
         "| paper (Qwen3-8B) LiveCodeBench v6 | 27.1 | 41.2 | 47.9 | 51.7 |")


def write_compare_report(out: Path, results: dict):
    base = next(iter(results.values()))["base"]
    lines = ["# base / GRPO / SDPO / PMD", "",
             f"Held-out test: {base['summary']['n_questions']} questions x {base['summary']['n_samples']} samples; "
             "the same questions and row seeds in every row (paired). 95% intervals.", "",
             "## Main table (final weights)", "", *TABLE_HEAD, summary_rows("base", base["summary"])]
    for name, r in results.items():
        lines.append(summary_rows(name, r["final"]["summary"], r["final"]["vs_base"]))
    lines += ["", "Best on dev (weights chosen on the dev split; evaluated once on test):", "", *TABLE_HEAD]
    for name, r in results.items():
        b = r["best_on_dev"]
        s = b.get("summary", r["final"]["summary"])
        lines.append(summary_rows(f"{name} (epoch {b['epoch']})", s, b.get("vs_base", r["final"]["vs_base"])))
    lines += ["", "Mean accuracy beside the paper's (shape only: a 270M base model on our synthetic families, "
              "not their model or data):", "", "| | base | GRPO | SDPO | PMD |", "|---|---|---|---|---|"]
    acc = [base["summary"]["accuracy"]["mean"]] + [results[m]["final"]["summary"]["accuracy"]["mean"]
                                                    if m in results else float("nan") for m in METHODS]
    lines += ["| ours, mean accuracy x 100 | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " |", PAPER]
    if "pmd" in results:
        ref = results["pmd"]["final"]["per_question"]
        abl = {k: v for k, v in results.items() if k.startswith("pmd ")}
        if abl:
            lines += ["", "## Ablations (change against full PMD, same questions and seeds)", "",
                      "| run | mean accuracy | vs PMD: accuracy | vs PMD: greedy |", "|---|---|---|---|"]
            for k, v in abl.items():
                d = paired_vs(v["final"]["per_question"], ref)
                lines.append(f"| {k} | {fmt(v['final']['summary']['accuracy'])} | {fmt(d['accuracy'], True)} | {fmt(d['greedy'], True)} |")
    lines += ["", "## Dev accuracy against cumulative training rollouts", "", "| run | " +
              " | ".join(f"after {d['rollouts']} rollouts" for d in next(iter(results.values()))["dev_curve"]) + " |",
              "|---|" + "---|" * len(next(iter(results.values()))["dev_curve"])]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{d['dev']['mean']:.2f}" for d in r["dev_curve"]) + " |")
    plot = plot_curves(out, results)
    if plot:
        lines += ["", f"![dev accuracy]({plot})"]
    lines += ["", "## Compute", "", "| run | tokens sampled | teacher-forward tokens | reflection tokens | gate tokens | wall min |",
              "|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = r["compute"]
        lines.append(f"| {name} | {c.get('tokens_sampled', 0)} | {c.get('teacher_tokens', 0)} | "
                     f"{c.get('reflection_tokens', 0)} | {c.get('gate_tokens', 0)} | {c['wall_s'] / 60:.1f} |")
    lines += ["", "Per-run details (per step, per epoch, memory): each run's own `report.md`."]
    common.write_report(out, lines)


def plot_curves(out: Path, results: dict):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        ax.plot([d["rollouts"] for d in r["dev_curve"]], [d["dev"]["mean"] for d in r["dev_curve"]], marker="o", label=name)
    ax.set_xlabel("cumulative training rollouts")
    ax.set_ylabel("dev accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dev_curve.png", dpi=100)
    return "dev_curve.png"


# ----------------------------------------------------------------------------
# main


def main():
    args = build_parser().parse_args()
    check_args(args)
    questions = common.load_questions(args.data)
    if not args.include_controls:
        questions = [q for q in questions if not q.meta.get("negative_control")]
    split = split_questions(questions, args.dev_per_type, args.test_per_type, args.seed)
    if not split["test"] or not split["dev"]:
        raise common.UserError(f"{args.data}: no train/held-out split possible: a (cluster, sub-type) needs at least "
                               f"{args.test_per_type + args.dev_per_type + 1} questions "
                               f"(--test-per-type {args.test_per_type} + --dev-per-type {args.dev_per_type} + 1 to train)")
    split["train"] = stratified_take(split["train"], args.train_per_type)
    if args.out:   # a foreign memory file stops the run before anything is written
        for p in [Path(args.out) / "memory.json", *Path(args.out).glob("*/memory.json")]:
            if p.exists():
                common.load_bank(p, MEMORY_KIND)
    # --ablations may be added to a finished --compare: its grpo/sdpo/pmd runs are kept
    out = common.setup_run(args, "pmd_distill", may_differ=common.RESUME_MAY_DIFFER + ("ablations",))
    common.atomic_write_json(out / "split.json", {k: [q.id for q in v] for k, v in split.items()})
    print(f"run folder: {out}\ntrain {len(split['train'])}, dev {len(split['dev'])}, test {len(split['test'])} "
          f"questions from {args.data}")
    if not args.compare:
        run_method(args, out, split)
        return
    runs = [(m, {"method": m}) for m in METHODS]
    if args.ablations:
        runs += [("pmd --freeze memory", {"method": "pmd", "freeze": "memory"}),
                 ("pmd --freeze policy", {"method": "pmd", "freeze": "policy"})]
        runs += [(f"pmd --levels {lv}", {"method": "pmd", "levels": lv}) for lv in LEVELS]
    results = {}
    for name, over in runs:
        sub = argparse.Namespace(**{**vars(args), **over, "compare": False})
        d = out / name.replace(" --", "-").replace(" ", "-")
        d.mkdir(exist_ok=True)
        if not (d / "config.json").exists():
            common.atomic_write_json(d / "config.json", {"stage": "pmd_distill", **vars(sub)})
        common.seed_everything(args.seed)
        print(f"\n==== {name} ====")
        first = next(iter(results.values()), None)
        shared = (first["base"]["per_question"], first["dev_curve"][0]) if first else None
        results[name] = run_method(sub, d, split, start_evals=shared)
    write_compare_report(out, results)
    print(f"combined report: {out / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
