"""Phase 2 of the Introspection GRPO paper ("SFT for Introspection Selection via Recall",
"Spontaneous recall"): teach the model to write <recall> r* </recall> with the lesson that helps
on a question's type before it answers, and to write nothing when no lesson helps.

  1. Selection. For each type (cluster, or cluster/sub-type where there is one), r* is the lesson
     with the highest LOWER bound of its 95% interval of A = R_bar(Q' + r) - R_bar(Q'), not the
     highest mean (with a few transfer rollouts the top mean is mostly noise). A type is
     recall-beneficial only if that lower bound is above 0 (--select mean: mean above 0).
     Candidates come from Phase 1 library.json files (--library, their A_intro) or from the
     data's own `lesson` fields (--lessons data), scored here with paired with/without rollouts
     on the training questions (same row seeds in both arms).
  2. SFT data. Questions are split by id, stratified by type, into train / dev / held-out.
     Recall-beneficial questions: prompt = the plain question prompt, completion =
     " <recall> r* </recall>" then the answer. Recall-unnecessary questions (no positive lesson,
     or base accuracy >= --base-ok over the selection samples): completion = the answer alone,
     one of the model's own samples the verifier accepted (none accepted: left out, counted).
     With a cue, the recall comes right after "Answer:" and the cue follows it.
  3. Loss. Completion tokens only, token-level mean over the batch, on common.token_logprobs.
     Trained: the decision (first completion token), the recall block with its closing tag, and
     EOS. The answer is NOT trained unless --train-answer, so any accuracy gain can only come
     through the recall.
  4. Evaluation on held-out questions (and fresh procedural instances, and the composed
     questions, which are never trained on), paired arms with the same row seeds:
     a base model; b base model with r* injected on beneficial types; c trained model, free
     (recall iff p(<recall> | question) >= a threshold tuned on dev); d trained model with recall
     banned; e (--placebo) the same SFT with the type -> lesson mapping shuffled.
     Gap closed G = (c - a) / (b - a); decision quality; fidelity of the recalled text to r*;
     composition; forgetting on a canary set from other clusters.

Deliberate simplifications:
  1. The decision is taken once per question from p(first token of " <recall>"), thresholded;
     when the model recalls, the body is sampled after a forced "<recall>", then the answer is
     sampled after the closed block. When it does not, the answer is the plain prompt's sample,
     which is exactly arm d's row (same prompt, model and seed), so c - d is zero there and the
     whole of c - d goes through recall.
  2. The tied embedding (63% of Gemma 3 270M's weights) is frozen by default
     (--train-embeddings to train it): the recall is made of tokens the model already has, and
     AdamW state for 168M more weights costs 1.3 GB and a slower step on a CPU.
  3. On a question without a cue the first completion token of a recall-unnecessary example is
     the first token of the model's own accepted answer; it is trained as the decision token.
  4. Arm b injects r* as a "Lesson:" before the question (how it was scored), not in the recall
     slot.
  5. The default learning rate (AdamW 1e-4, one epoch) was sized to the CPU budget, not chosen by
     a sweep; on the embedded Gemma it learned the recall text but broke the letter-answer format
     on other clusters (README). Lower it, or add epochs, where there is more compute.

    python sft_recall.py --model gemma --lessons data                 # the default run (README: results)
    python sft_recall.py --model gemma --lessons data --placebo       # + arm e
    python sft_recall.py --library runs/A/library.json --model runs/A/checkpoint
    python sft_recall.py --out runs/NAME --resume ...                 # continue after a kill
"""
import dataclasses
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

OPEN, CLOSE = "<recall>", "</recall>"
ANSWER_STOP = ["\n"]
RECALL_STOP = [CLOSE, "\n"]
SELECTION_KIND = "recall-selection"

# ----------------------------------------------------------------------------
# types, prompts, the split


def type_key(q) -> str:
    """A question's type: "cluster/subtype", or "cluster" when it has no sub-type."""
    return f"{q.cluster}/{q.subtype}" if q.subtype else q.cluster


def qcode(q) -> int:
    """A stable integer per question id, for stream_seed keys."""
    return zlib.crc32(q.id.encode())


def prompt_parts(tok, q, lesson=None):
    """(head, cue): head ends at "Answer:" (the decision point), cue is what the plain prompt
    adds after it (" In Brill, tesk means", or ""). head + cue == common.question_prompt(q)."""
    full = common.question_prompt(tok, q, lesson=lesson)
    head = common.question_prompt(tok, dataclasses.replace(q, cue=None), lesson=lesson)
    assert full.startswith(head)
    return head, full[len(head):]


def recall_open(head: str) -> str:
    """What follows the head when the model recalls: " <recall>" (no space after a chat template)."""
    return (" " if head.endswith(":") else "") + OPEN


def recall_block(head: str, lesson: str) -> str:
    return f"{recall_open(head)} {lesson.strip()} {CLOSE}"


def split_questions(questions, holdout: float, dev: float, seed: int) -> dict:
    """id -> "train" | "dev" | "heldout" | "composed". Per type, ids sorted then permuted by a
    seed of their own, so the split depends on nothing but (seed, type, ids). Composed questions
    (meta.components) are never trained on: they test composition."""
    by_type = {}
    for q in questions:
        by_type.setdefault(type_key(q), []).append(q)
    split = {}
    for t, qs in sorted(by_type.items()):
        ids = sorted(q.id for q in qs)
        if any(q.meta.get("components") for q in qs):
            split.update({i: "composed" for i in ids})
            continue
        order = np.random.default_rng(common.stream_seed(seed, "split", zlib.crc32(t.encode()))).permutation(len(ids))
        ids = [ids[i] for i in order]
        n_hold = max(1, round(holdout * len(ids))) if len(ids) >= 2 else 0
        n_dev = round(dev * (len(ids) - n_hold))
        for k, i in enumerate(ids):
            split[i] = "heldout" if k < n_hold else "dev" if k < n_hold + n_dev else "train"
    return split


# ----------------------------------------------------------------------------
# selection (pure: tested on hand-made numbers)


def select_lessons(candidates: dict, rule: str = "lower") -> dict:
    """candidates: type -> [{"lesson", "A": {"mean","lo","hi","n"}, "source"}]. Returns type ->
    the chosen one with "beneficial": r* maximises the lower bound A["lo"] (rule "lower") or the
    mean (rule "mean"); beneficial iff that quantity is above 0."""
    def score(c):
        v = c["A"]["lo" if rule == "lower" else "mean"]
        return v if v is not None and math.isfinite(v) else -math.inf
    out = {}
    for t, cands in candidates.items():
        best = max(cands, key=score) if cands else None
        out[t] = {**best, "beneficial": score(best) > 0} if best else None
    return out


def library_candidates(paths, data_types) -> dict:
    """type -> candidates from Phase 1 library.json files (meta-gaming lessons left out)."""
    cands = {}
    for path in paths:
        if not Path(path).exists():
            raise common.UserError(f"--library {path}: no such file")
        bank = common.load_bank(path, "introspection-library")
        for e in bank["entries"]:
            if e.get("meta_gaming"):
                continue
            t = f"{e['cluster']}/{e['subtype']}" if e.get("subtype") else e["cluster"]
            a = e["A_intro"]
            cands.setdefault(t, []).append({"lesson": e["text"], "source": "library", "id": e.get("id"),
                                            "A": {k: a[k] for k in ("mean", "lo", "hi", "n")}})
    absent = sorted(set(cands) - set(data_types))
    if absent:
        raise common.UserError(f"--library: types {', '.join(absent)} are absent from --data")
    return cands


def token_f1(a: str, b: str) -> float:
    """Token-level F1 of two texts after common.normalise_text (SQuAD-style bag of words)."""
    x, y = common.normalise_text(a).split(), common.normalise_text(b).split()
    if not x or not y:
        return float(x == y)
    common_n = sum(min(x.count(w), y.count(w)) for w in set(x))
    if common_n == 0:
        return 0.0
    p, r = common_n / len(x), common_n / len(y)
    return 2 * p * r / (p + r)


def carries(recalled: str, lesson: str, share: float = 0.5) -> bool:
    """Does a recalled text carry a lesson's content: at least `share` of the lesson's distinct
    words appear in it (composition check)."""
    words = set(common.normalise_text(lesson).split())
    got = set(common.normalise_text(recalled).split())
    return bool(words) and len(words & got) / len(words) >= share


# ----------------------------------------------------------------------------
# SFT examples and the loss

ROLES = {"d": "decision (first completion token)", "r": "recall block and closing tag", "e": "EOS",
         "a": "answer (cue included)", "-": "not trained"}


def build_example(tok, head: str, completion: str, recall_chars: int, eos_id: int,
                  train_answer: bool, max_len: int) -> dict:
    """Tokenise head + completion and give every completion token a role (ROLES) from character
    spans, never from token ids (pad == EOS here). The first completion token is the decision;
    tokens overlapping completion[:recall_chars] are the recall block; EOS is appended. Raises
    ValueError if the head's tokens are not a prefix of head + completion's tokens, or if no
    trained token is left after truncation to max_len."""
    p_ids = common.encode(tok, head)
    full = head + completion
    enc = tok(full, add_special_tokens=not (tok.bos_token and full.startswith(tok.bos_token)),
              return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    if ids[:len(p_ids)] != p_ids:
        raise ValueError("the prompt's tokens are not a prefix of prompt + completion")
    c_ids = list(ids[len(p_ids):]) + [eos_id]
    spans = [(s - len(head), e - len(head)) for s, e in offs[len(p_ids):]] + [(len(completion), len(completion))]
    roles = []
    for j, (s, e) in enumerate(spans):
        if j == len(c_ids) - 1:
            roles.append("e")
        elif j == 0:
            roles.append("d")
        elif s < recall_chars:
            roles.append("r")
        else:
            roles.append("a" if train_answer else "-")
    keep = max_len - len(p_ids)
    c_ids, roles = c_ids[:max(keep, 0)], roles[:max(keep, 0)]
    if not any(r != "-" for r in roles):
        raise ValueError(f"no trained token left after truncation to --max-len {max_len} "
                         f"(prompt {len(p_ids)} tokens)")
    return {"prompt_ids": p_ids, "completion_ids": c_ids, "roles": "".join(roles)}


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean negative log-likelihood over the trained tokens of the whole batch (a
    global count, so long rows do not dominate per row). logprobs, mask (B, T)."""
    n = mask.sum()
    if n == 0:
        raise ValueError("a batch with no trained token")
    return -(logprobs * mask).sum() / n


def role_mask(examples, roles: str, T: int) -> torch.Tensor:
    """(B, T) bool: True where a completion token's role is in `roles`."""
    m = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, ex in enumerate(examples):
        for j, r in enumerate(ex["roles"]):
            m[b, j] = r in roles
    return m


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------
# sampling helpers


def sample_arm(model, tok, jobs, n, args, stream, progress=None, max_new=None, stop=ANSWER_STOP):
    """jobs: [(question, prompt, row keys)]; row j of a question uses stream_seed(seed, stream,
    qcode, *keys, j), so every arm that passes the same stream and keys shares random numbers
    row by row. Returns (rewards (len(jobs), n), samples)."""
    if not jobs:
        return np.zeros((0, n)), []
    seeds = [common.stream_seed(args.seed, stream, qcode(q), *keys, j) for q, _, keys in jobs for j in range(n)]
    out = common.sample(model, tok, [p for _, p, _ in jobs], n=n, max_new_tokens=max_new or args.answer_tokens,
                        temperature=args.temperature, stop=stop, row_seeds=seeds, progress=progress)
    R = np.array([common.verify(jobs[i // n][0], s.text)[0] for i, s in enumerate(out)]).reshape(len(jobs), n)
    return R, out


@torch.no_grad()
def p_recall(model, tok, qs, batch=16) -> np.ndarray:
    """p(first token of " <recall>" | plain prompt up to "Answer:") for each question."""
    heads, firsts = [], []
    for q in qs:
        head, _ = prompt_parts(tok, q)
        h = common.encode(tok, head)
        heads.append(h)
        firsts.append(common.encode(tok, head + recall_open(head))[len(h)])
    out = []
    for s in range(0, len(qs), batch):
        lp = common.token_logprobs(model, heads[s:s + batch], [[f] for f in firsts[s:s + batch]],
                                   pad_id=tok.pad_token_id)["logprobs"][:, 0]
        out += lp.exp().tolist()
    return np.array(out)


def tune_threshold(p: np.ndarray, label: np.ndarray) -> float:
    """The threshold on p(<recall>) with the best balanced accuracy on dev (ties: closest to 0.5)."""
    if len(p) == 0 or label.all() or not label.any():
        return 0.5
    cands = sorted(set([0.5] + [(x + y) / 2 for x, y in zip(sorted(p)[:-1], sorted(p)[1:])]))
    def bacc(t):
        d = p >= t
        return (d[label].mean() + (~d[~label]).mean()) / 2
    return max(cands, key=lambda t: (bacc(t), -abs(t - 0.5)))


def run_free(model, tok, qs, n, args, tau, progress="free (arm c)", roll=None):
    """Arm c on questions qs: decide, recall where decided, answer. Returns per question a dict
    with p_recall, decision, rewards (n,), recalled bodies (n, or None), and arm d's rewards.
    p(<recall>) comes from the trained weights; the samples from roll (the rollout copy, default
    the model itself)."""
    p = p_recall(model, tok, qs)
    sampler = model if roll is None else roll
    d_R, d_out = sample_arm(sampler, tok, [(q, common.question_prompt(tok, q), ()) for q in qs], n, args,
                            "eval", progress=progress + ": plain")
    rec_idx = [i for i, q in enumerate(qs) if p[i] >= tau]
    jobs = []
    for i in rec_idx:
        head, _ = prompt_parts(tok, qs[i])
        jobs.append((qs[i], head + recall_open(head), ()))
    _, bodies = sample_arm(sampler, tok, jobs, n, args, "eval-recall", progress=progress + ": recall",
                           max_new=args.recall_tokens, stop=RECALL_STOP)
    ans_jobs, where = [], []
    for k, i in enumerate(rec_idx):
        head, cue = prompt_parts(tok, qs[i])
        for j in range(n):
            body = bodies[k * n + j].text.strip()
            ans_jobs.append((qs[i], head + recall_block(head, body) + cue, (j,)))
            where.append((i, j, body, tok.decode(bodies[k * n + j].token_ids).endswith(CLOSE)))
    # row j of the answer after a recall pairs with row j of the other arms: same stream, and the
    # row index enters as a key because each row has its own prompt here (n=1 per prompt).
    c_R = d_R.copy()
    if ans_jobs:
        seeds = [common.stream_seed(args.seed, "eval", qcode(q), j) for (q, _, (j,)) in ans_jobs]
        out = common.sample(sampler, tok, [pr for _, pr, _ in ans_jobs], n=1, max_new_tokens=args.answer_tokens,
                            temperature=args.temperature, stop=ANSWER_STOP, row_seeds=seeds,
                            progress=progress + ": answer")
        for (i, j, _, _), s in zip(where, out):
            c_R[i, j] = common.verify(qs[i], s.text)[0]
    res = [{"p_recall": float(p[i]), "decision": bool(p[i] >= tau), "c": c_R[i].tolist(), "d": d_R[i].tolist(),
            "recalled": [None] * n, "closed": [None] * n} for i in range(len(qs))]
    for i, j, body, closed in where:
        res[i]["recalled"][j], res[i]["closed"][j] = body, closed
    return res


# ----------------------------------------------------------------------------
# building the SFT data


def gold_text(q) -> str:
    """The reference answer as a completion (used only where no sample was accepted)."""
    if q.answer_type == "mcq":
        return f" {q.choices[common.LETTERS.index(q.answer)]}." if q.cue else f" {q.answer}"
    return f" {q.answer}"


def build_data(model, tok, args, questions, select_qs, split, cands, source):
    """Score the candidate lessons, select r* per type, label each train/dev question and build
    the SFT examples of the train split. Returns (selection bank, labels, examples)."""
    types = sorted(cands)
    to_score = {t: [] for t in types}
    if args.lessons == "data":
        for q in questions:
            if q.lesson and q.lesson not in to_score[type_key(q)]:
                to_score[type_key(q)].append(q.lesson)

    def sample_lessons(lessons_of):
        jobs, owner = [], []
        for q in select_qs:
            for lesson in lessons_of(q):
                jobs.append((q, common.question_prompt(tok, q, lesson=lesson), ()))
                owner.append((q.id, lesson))
        # every arm of one question shares the "select" stream: row j is paired across arms
        R, out = sample_arm(model, tok, jobs, args.samples, args, "select", progress="selection rollouts")
        res = {}
        for k, key in enumerate(owner):
            res[key] = (R[k], [s.text for s in out[k * args.samples:(k + 1) * args.samples]])
        return res

    rolls = sample_lessons(lambda q: [None] + to_score[type_key(q)])
    for t in types:
        qs = [q for q in select_qs if type_key(q) == t]
        for lesson in to_score[t] if qs else []:        # composed types have no train question
            diffs = [rolls[(q.id, lesson)][0] - rolls[(q.id, None)][0] for q in qs]
            ci = common.cluster_bootstrap_ci(diffs, seed=common.stream_seed(args.seed, "select-boot", zlib.crc32(t.encode())))
            cands[t].append({"lesson": lesson, "source": "data", "A": {k: ci[k] for k in ("mean", "lo", "hi", "n")}})
    chosen = select_lessons(cands, args.select)
    # a library r* was not sampled yet: its rows give the answers of the recall examples
    rolls.update(sample_lessons(lambda q: [chosen[type_key(q)]["lesson"]] if chosen[type_key(q)] and
                                (q.id, chosen[type_key(q)]["lesson"]) not in rolls else []))

    entries = []
    for t in types:
        c = chosen[t]
        cl, _, sub = t.partition("/")
        entries.append({"cluster": cl, "subtype": sub or None, "lesson": c["lesson"] if c else None,
                        "A": c["A"] if c else {"mean": None, "lo": None, "hi": None, "n": 0},
                        "source": c["source"] if c else source, "beneficial": bool(c and c["beneficial"]),
                        "candidates": len(cands[t])})
    selection = {"schema": common.BANK_SCHEMA, "version": common.BANK_VERSION, "kind": SELECTION_KIND,
                 "lessons_source": source, "select": args.select, "entries": entries}

    labels, examples = {}, []
    for q in select_qs:
        t = type_key(q)
        base_R, base_txt = rolls[(q.id, None)]
        c = chosen[t]
        lab = {"split": split[q.id], "type": t, "base_acc": float(base_R.mean())}
        if c and c["beneficial"] and base_R.mean() < args.base_ok:
            lab["label"] = "recall"
            with_R, with_txt = rolls[(q.id, c["lesson"])]
            acc = [x for r, x in zip(with_R, with_txt) if r == 1] + [x for r, x in zip(base_R, base_txt) if r == 1]
            answer, lab["answer_source"] = (acc[0], "sample") if acc else (gold_text(q), "reference")
        else:
            acc = [x for r, x in zip(base_R, base_txt) if r == 1]
            lab["label"] = "plain" if acc else "left_out"
            answer, lab["answer_source"] = (acc[0], "sample") if acc else (None, None)
        labels[q.id] = lab
        if split[q.id] != "train" or lab["label"] == "left_out":
            continue
        examples.append(make_example(tok, q, c["lesson"] if lab["label"] == "recall" else None,
                                     answer.rstrip(), args, lab["answer_source"]))
    return selection, labels, examples


def make_example(tok, q, lesson, answer, args, answer_source=None) -> dict:
    head, cue = prompt_parts(tok, q)
    block = recall_block(head, lesson) if lesson else ""
    completion = block + cue + answer
    try:
        ex = build_example(tok, head, completion, len(block), tok.eos_token_id, args.train_answer, args.max_len)
    except ValueError as e:
        raise common.UserError(f"SFT example for question {q.id}: {e}") from None
    trained = [t for t, r in zip(ex["completion_ids"], ex["roles"]) if r != "-"]
    return {"question_id": q.id, "cluster": q.cluster, "subtype": q.subtype, "type": type_key(q),
            "kind": "recall" if lesson else "plain", "lesson": lesson, "prompt": head, "completion": completion,
            "cue": cue, "answer": answer, "answer_source": answer_source,
            "trained_text": tok.decode(trained), **ex}


def fresh_questions(args, types, out):
    """Fresh instances of the procedural families (data/make_procedural.py at another seed), for
    the types present in --data; composed ones left out (they are evaluated separately)."""
    import importlib.util
    path = Path(__file__).resolve().parent / "data" / "make_procedural.py"
    spec = importlib.util.spec_from_file_location("make_procedural", path)
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    rows = [r for r in mp.generate(max(args.fresh, 2), args.fresh_seed)
            if f"{r['cluster']}/{r['subtype']}" in types and "components" not in r.get("meta", {})]
    rows = [r for r in rows if int(r["id"][-3:]) < args.fresh]
    if not rows:
        return []
    for r in rows:
        r["id"] = "fresh-" + r["id"]
    common.atomic_write_text(out / "fresh.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return common.load_questions(out / "fresh.jsonl") if len(rows) >= 2 else []


def spread(qs, n):
    """At most n questions, taken round-robin over clusters (every cluster is represented)."""
    by = {}
    for q in qs:
        by.setdefault(q.cluster, []).append(q)
    out, k = [], 0
    while len(out) < min(n, len(qs)):
        for c in sorted(by):
            if k < len(by[c]) and len(out) < n:
                out.append(by[c][k])
        k += 1
    return out


def b_lesson(q, rstar):
    """The lesson arm b injects: r* of a beneficial type; for a composed question, the r* of its
    beneficial components joined; None where recall has nothing to offer (then b = a)."""
    if q.meta.get("components"):
        parts = [rstar[t]["lesson"] for t in q.meta["components"] if t in rstar and rstar[t]["beneficial"]]
        return " ".join(parts) or None
    e = rstar.get(type_key(q))
    return e["lesson"] if e and e["beneficial"] else None


def eval_base(model, tok, args, sets, rstar) -> dict:
    """Arms a (plain prompt) and b (r* injected) on the base model; same row seeds."""
    res = {}
    for name, qs in sets.items():
        jobs = [(q, common.question_prompt(tok, q), ()) for q in qs]
        with_b = [q for q in qs if name != "canary" and b_lesson(q, rstar)]
        jobs += [(q, common.question_prompt(tok, q, lesson=b_lesson(q, rstar)), ()) for q in with_b]
        R, _ = sample_arm(model, tok, jobs, args.eval_samples, args, "eval", progress=f"base arms a, b: {name}")
        res[name] = {q.id: {"a": R[i].tolist(), "b": R[i].tolist()} for i, q in enumerate(qs)}
        for k, q in enumerate(with_b):
            res[name][q.id]["b"] = R[len(qs) + k].tolist()
    return res


def set_trainable(model, args):
    for prm in model.parameters():
        prm.requires_grad_(True)
    if not args.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)   # tied: the LM head too
    n = sum(p_.numel() for p_ in model.parameters() if p_.requires_grad)
    print(f"trainable weights: {n / 1e6:.1f}M of {sum(p_.numel() for p_ in model.parameters()) / 1e6:.1f}M")


def run_placebo(args, out, examples, rstar, dev, labels, heldout, by_id, base_model):
    """Arm e: retrain from the base model on the same examples with each beneficial type's r*
    replaced by another beneficial type's (a rotation, so no type keeps its own), then evaluate
    free on the held-out questions with its own dev threshold."""
    ben = sorted(t for t, e in rstar.items() if e["beneficial"])
    if len(ben) < 2:
        return {"note": f"placebo needs two recall-beneficial types, found {len(ben)}"}
    mapping = {t: rstar[ben[(i + 1) % len(ben)]]["lesson"] for i, t in enumerate(ben)}
    pdir = out / "placebo"
    pdir.mkdir(exist_ok=True)
    if args.resume and (pdir / "checkpoint").exists():
        model, tok = common.load_model(str(pdir / "checkpoint"), args.device, args.dtype, args.activation_checkpointing)
    else:
        model, tok = base_model()
    pex = [make_example(tok, by_id[e["question_id"]], mapping[e["type"]], e["answer"], args, e["answer_source"])
           if e["kind"] == "recall" else e for e in examples]
    common.atomic_write_text(pdir / "sft_data.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in pex))
    set_trainable(model, args)
    train_sft(model, tok, pex, args, pdir, out / "metrics.jsonl", "placebo")
    model.eval()
    tau = tune_threshold(p_recall(model, tok, dev), np.array([labels[q.id]["label"] == "recall" for q in dev], bool))
    res = run_free(model, tok, heldout, args.eval_samples, args, tau, progress="placebo (arm e)",
                   roll=common.rollout_copy(model, args.rollout_dtype))
    return {"tau": tau, "mapping": mapping, "heldout": {q.id: r for q, r in zip(heldout, res)}}


# ----------------------------------------------------------------------------
# statistics for the report


def acc_ci(rows, seed) -> dict:
    """Accuracy over questions x samples; samples share a question, so a cluster bootstrap."""
    return common.cluster_bootstrap_ci([np.asarray(r, float) for r in rows], seed=seed)


def gap_closed(a, b, c, seed, n_boot=2000) -> dict:
    """G = (c - a) / (b - a) with a percentile interval from resampling questions (the three
    arms of one question stay together). a, b, c: lists of per-question reward arrays."""
    A, B, C = (np.array([np.mean(x) for x in arm]) for arm in (a, b, c))
    rng = np.random.default_rng(seed)
    den = B.mean() - A.mean()
    g = (C.mean() - A.mean()) / den if den != 0 else float("nan")
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(A), len(A))
        d = B[i].mean() - A[i].mean()
        if d != 0:
            boot.append((C[i].mean() - A[i].mean()) / d)
    lo, hi = (float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))) if boot else (float("nan"),) * 2
    return {"mean": float(g), "lo": lo, "hi": hi, "n": len(A)}


# ----------------------------------------------------------------------------
# training


def train_sft(model, tok, examples, args, out: Path, metrics_path: Path, phase: str):
    """AdamW over the trainable weights, linear warmup then linear decay, grad-norm clip, one
    checkpoint (HF folder + optimizer + RNG) per epoch under out/checkpoint. Resumes at the
    last finished epoch; metrics of a half-done epoch are dropped and redone."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = common.make_optimizer(params, "adamw", args.lr, args.weight_decay)
    policy = common.Policy(model, model, tok, params, opt)      # SFT samples nothing: no rollout copy
    B = args.batch_size
    steps_per_epoch = math.ceil(len(examples) / B)
    total = args.epochs * steps_per_epoch
    trained = "dre" + ("a" if args.train_answer else "")
    start, step = 0, 0
    state = common.load_resume_state(out, opt) if args.resume else None
    if state:
        start, step = state["step"], state["extra"]["opt_step"]
    if metrics_path.exists():
        common.write_jsonl(metrics_path, [m for m in common.read_jsonl(metrics_path)
                                          if not (m.get("phase") == phase and m["epoch"] >= start)])
    if start >= args.epochs:
        return
    bar = tqdm(total=total, initial=step, desc=f"SFT ({phase})", unit="step")
    for epoch in range(start, args.epochs):
        order = np.random.default_rng(common.stream_seed(args.seed, "sft-order", epoch)).permutation(len(examples))
        for b0 in range(0, len(examples), B):
            t0 = time.time()
            batch = [examples[i] for i in order[b0:b0 + B]]
            lr = lr_at(step, total, args.warmup, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            lp = common.token_logprobs(model, [e["prompt_ids"] for e in batch], [e["completion_ids"] for e in batch],
                                       pad_id=tok.pad_token_id)
            logprobs = lp["logprobs"]                                             # (B, Tc)
            mask = role_mask(batch, trained, logprobs.shape[1]).to(device)        # (B, Tc)
            loss = sft_loss(logprobs, mask)
            rec = {"phase": phase, "epoch": epoch, "step": step, "lr": lr, "loss": loss.item()}
            if torch.isfinite(loss):
                loss.backward()
                rec["grad_norm"] = common.optimizer_step(policy, args.clip)["grad_norm"]
            else:
                rec["skipped"] = "non-finite loss"
                tqdm.write(f"step {step}: non-finite loss, update skipped")
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for name, roles in (("loss_decision", "d"), ("loss_recall", "r"), ("loss_eos", "e")):
                    m = role_mask(batch, roles, logprobs.shape[1]).to(device)
                    rec[name] = float(-(logprobs * m).sum() / m.sum()) if m.any() else None
            dt = time.time() - t0
            n_tok = sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in batch)
            rec.update(trained_tokens=int(mask.sum()), tokens=n_tok, tokens_per_s=n_tok / dt, step_time=dt,
                       peak_memory_mb=common.peak_memory_mb(device))
            common.append_jsonl(metrics_path, rec)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", recall=f"{rec['loss_recall'] or 0:.3f}")
        # metrics first, checkpoint last: a kill in between only repeats the epoch
        common.save_checkpoint(out, model, tok, opt, step=epoch + 1, extra={"opt_step": step, "phase": phase})
    bar.close()


# ----------------------------------------------------------------------------
# report


def write_report(out, args, source, selection, labels, examples, split, by_id, sets, base, trained, tau,
                 placebo, metrics_path, times):
    seed = common.stream_seed(args.seed, "report-boot")
    rstar = {(e["cluster"] + "/" + e["subtype"]) if e["subtype"] else e["cluster"]: e for e in selection["entries"]}
    ben = lambda q: bool(rstar.get(type_key(q), {}).get("beneficial"))

    def fmt(ci, signed=True):   # common.fmt_ci, shorter where every value was equal
        if ci and ci.get("n") and ci.get("note", "").startswith("no interval: no variation"):
            return f"{ci['mean']:{'+' if signed else ''}.2f} (all equal; n={ci['n']}, {ci['n_clusters']} clusters)"
        return common.fmt_ci(ci, signed)
    L = [f"# Recall SFT: {out.name}", "",
         "`" + " ".join(["python sft_recall.py"] + sys.argv[1:]) + "`", "",
         f"Lessons from: **{source}** (selection rule: {'highest lower bound' if args.select == 'lower' else 'highest mean'}"
         f" of A's 95% interval; recall-beneficial iff it is above 0). Data: `{args.data}`. Answer tokens trained: "
         f"{'yes (--train-answer)' if args.train_answer else 'no (only decision, recall block, EOS)'}.", "",
         "## Selection", "", "| type | r* | A (95% interval, n) | source | candidates | beneficial |", "|---|---|---|---|---|---|"]
    for t, e in sorted(rstar.items()):
        a = e["A"]
        L.append(f"| {t} | {(e['lesson'] or '-')[:90]} | {fmt(a) if a['n'] else '-'} | {e['source']} | "
                 f"{e.get('candidates', '-')} | {'yes' if e['beneficial'] else 'no'} |")

    L += ["", "## SFT data", "", "| type | train: recall | train: plain | train: left out | dev | held-out |", "|---|---|---|---|---|---|"]
    for t in sorted(rstar):
        labs = [v for k, v in labels.items() if v["type"] == t]
        cnt = lambda lab, sp: sum(1 for v in labs if v["label"] == lab and v["split"] == sp)
        L.append(f"| {t} | {cnt('recall', 'train')} | {cnt('plain', 'train')} | {cnt('left_out', 'train')} | "
                 f"{sum(1 for v in labs if v['split'] == 'dev')} | {sum(1 for k, v in split.items() if v == 'heldout' and type_key(by_id[k]) == t)} |")
    left = sum(1 for v in labels.values() if v["label"] == "left_out")
    ref = sum(1 for e in examples if e["answer_source"] == "reference")
    L += ["", f"{len(examples)} examples ({sum(e['kind'] == 'recall' for e in examples)} with a recall); "
              f"{left} train/dev questions left out (no accepted sample); {ref} recall examples carry the reference "
              f"answer (no accepted sample). Composed questions are never trained on. Exact rows: `sft_data.jsonl`."]

    ms = common.read_jsonl(metrics_path)
    sft = [m for m in ms if m.get("phase") == "sft"]
    if sft:
        first, last = sft[0], sft[-1]
        phases = ", ".join(f"{k.replace('_', ' ')} {v / 60:.1f} min" for k, v in times.items())
        L += ["", "## Training", "",
              f"{len(sft)} AdamW steps over {args.epochs} epochs (batch {args.batch_size}, lr {args.lr:g}, warmup "
              f"{args.warmup}, clip {args.clip}); {times.get('sft', 0):.0f} s this session, median {np.median([m['tokens_per_s'] for m in sft]):.0f} "
              f"tokens/s, peak memory {max(m['peak_memory_mb'] for m in sft):.0f} MB. Wall time this session by "
              f"phase (all phases: `timing.json`): {phases}.", "",
              "| step | loss | decision NLL | recall NLL | EOS NLL | grad norm |", "|---|---|---|---|---|---|"]
        for m in (first, last):
            f3 = lambda x: "-" if x is None else f"{x:.3f}"
            L.append(f"| {m['step']} | {m['loss']:.3f} | {f3(m['loss_decision'])} | {f3(m['loss_recall'])} | "
                     f"{f3(m['loss_eos'])} | {f3(m.get('grad_norm'))} |")

    def arms(name):
        qs = sets[name]
        tr = trained.get(name, [])
        return qs, [base[name][q.id]["a"] for q in qs], [base[name][q.id]["b"] for q in qs], \
            [r["c"] for r in tr], [r["d"] for r in tr], tr

    def diff(x, y):
        return common.cluster_bootstrap_ci([np.subtract(u, v) for u, v in zip(x, y)], seed=seed)

    def arm_rows(title, name, per_type=True):
        qs, a, b, c, d, tr = arms(name)
        if not qs:
            return []
        rows = ["", title, "", f"Threshold on p(<recall>) tuned on dev: {tau:.3f}. Accuracy over questions x "
                f"{args.eval_samples} samples (cluster bootstrap over questions).", "",
                "| type | beneficial | recalled | a base | b base + r* | c trained, free | d trained, no recall | c - a | c - d |",
                "|---|---|---|---|---|---|---|---|---|"]
        groups = {}
        for i, q in enumerate(qs):
            groups.setdefault(type_key(q), []).append(i)
        keys = (sorted(groups) if per_type else []) + ["all"]
        for t in keys:
            ix = groups.get(t, range(len(qs)))
            sel = lambda arm: [arm[i] for i in ix]
            rec = np.mean([tr[i]["decision"] for i in ix])
            rows.append(f"| {t} | {'yes' if t != 'all' and ben(qs[ix[0]]) else '-' if t == 'all' else 'no'} | {rec:.2f} | "
                        f"{fmt(acc_ci(sel(a), seed), False)} | {fmt(acc_ci(sel(b), seed), False)} | "
                        f"{fmt(acc_ci(sel(c), seed), False)} | {fmt(acc_ci(sel(d), seed), False)} | "
                        f"{fmt(diff(sel(c), sel(a)))} | {fmt(diff(sel(c), sel(d)))} |")
        return rows

    L += arm_rows("## Held-out questions (arms a-d, paired)", "heldout")
    qs, a, b, c, d, tr = arms("heldout")
    if qs:
        ba, ca = diff(b, a), diff(c, a)
        L += ["", "**Gap closed** G = (c - a) / (b - a): " +
              (f"b - a = {fmt(ba)} spans 0, so no ratio: c - a = {fmt(ca)}, b - a = {fmt(ba)}."
               if not ba["lo"] > 0 else f"{fmt(gap_closed(a, b, c, seed))} (c - a = {fmt(ca)}, b - a = {fmt(ba)})."),
              f"Gain through recall c - d = {fmt(diff(c, d))}."]
        # decision quality against the per-type label
        lab = np.array([ben(q) for q in qs])
        dec = np.array([r["decision"] for r in tr])
        pr = np.array([r["p_recall"] for r in tr])
        tp = int((lab & dec).sum())
        wil = lambda k, n: common.mean_ci([1] * k + [0] * (n - k), binary=True)
        un = [i for i in range(len(qs)) if not lab[i]]
        L += ["", "## Decision quality (held-out, per-question decision vs the per-type label)", "",
              f"- recall rate on beneficial types: {fmt(wil(int(dec[lab].sum()), int(lab.sum())), False)}; "
              f"mean p(<recall>) {pr[lab].mean():.2f}" if lab.any() else "- recall rate on beneficial types: no such question",
              f"- recall rate on unnecessary types: {fmt(wil(int(dec[~lab].sum()), int((~lab).sum())), False)}; "
              f"mean p(<recall>) {pr[~lab].mean():.2f}" if (~lab).any() else "- recall rate on unnecessary types: no such question",
              f"- precision {fmt(wil(tp, int(dec.sum())), False)}, recall {fmt(wil(tp, int(lab.sum())), False)}",
              f"- harm on unnecessary types (c - a): {fmt(diff([c[i] for i in un], [a[i] for i in un])) if un else '-'}"]
        # fidelity and novelty of the recalled text
        lessons = {t: e["lesson"] for t, e in rstar.items() if e["lesson"]}
        f1s, verb, right, closed = [], [], [], []          # one group per question (its samples)
        for q, r in zip(qs, tr):
            own = lessons.get(type_key(q))
            got = [(b_, cl) for b_, cl in zip(r["recalled"], r["closed"]) if b_ is not None]
            if not got or not own:
                continue
            f1s.append([token_f1(b_, own) for b_, _ in got])
            verb.append([float(common.normalise_text(b_) == common.normalise_text(own)) for b_, _ in got])
            right.append([float(max(lessons, key=lambda t: token_f1(b_, lessons[t])) == type_key(q)) for b_, _ in got])
            closed.append([float(bool(cl)) for _, cl in got])
        L += ["", "## Fidelity and novelty of the recalled text (held-out, every recalled sample; "
                  "cluster bootstrap over questions)", ""]
        if f1s:
            boot = lambda g: fmt(common.cluster_bootstrap_ci(g, seed=seed), False)
            L += [f"- token F1 against r* of the question's type: {boot(f1s)}",
                  f"- verbatim r*: {boot(verb)}; the rest is new text",
                  f"- closest lesson (by F1) is the type's own r*: {boot(right)}",
                  f"- closed its tag: {boot(closed)}"]
        else:
            L.append("- no recall on a type that has an r*")
    L += arm_rows("## Fresh instances (data/make_procedural.py, --fresh-seed "
                  f"{args.fresh_seed}, {args.fresh} per sub-type)", "fresh")
    qs, a, b, c, d, tr = arms("composed")
    if qs:
        L += arm_rows("## Composition (composed questions, never trained on)", "composed", per_type=False)
        comp_lessons = {t: e["lesson"] for t, e in rstar.items() if e["lesson"]}
        both, one, n = 0, 0, 0
        for q, r in zip(qs, tr):
            parts = [comp_lessons.get(t) for t in q.meta.get("components", [])]
            for body in r["recalled"]:
                if body is None or not all(parts):
                    continue
                k = sum(carries(body, x) for x in parts)
                both, one, n = both + (k == 2), one + (k == 1), n + 1
        L += ["", f"Recalls carrying content of both component lessons (>= half of each lesson's words): "
              f"{both} of {n}; of one only: {one}."]
    qs, a, b, c, d, tr = arms("canary")
    if qs:
        L += ["", f"## Forgetting canary ({args.canary}, {len(qs)} questions from other clusters)", "",
              f"- before (base, a): {fmt(acc_ci(a, seed), False)}",
              f"- after, recall banned (d): {fmt(acc_ci(d, seed), False)}; change d - a {fmt(diff(d, a))}",
              f"- after, free (c): {fmt(acc_ci(c, seed), False)}; spurious recall rate "
              f"{np.mean([r['decision'] for r in tr]):.2f}"]
    if placebo is not None:
        L += ["", "## Placebo (arm e: same SFT, type -> lesson mapping shuffled)", ""]
        if "note" in placebo:
            L.append(f"- not run: {placebo['note']}")
        else:
            qs, a, b, c, d, tr = arms("heldout")
            e = [placebo["heldout"][q.id]["c"] for q in qs]
            L += [f"- e (placebo, free): {fmt(acc_ci(e, seed), False)}; e - a {fmt(diff(e, a))}; c - e {fmt(diff(c, e))}",
                  f"- placebo threshold {placebo['tau']:.3f}; recall rate "
                  f"{np.mean([placebo['heldout'][q.id]['decision'] for q in qs]):.2f}"]
    common.write_report(out, L)


# ----------------------------------------------------------------------------
# main


def main():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data="data/procedural.jsonl")
    p.add_argument("--library", nargs="+", default=None, help="Phase 1 library.json file(s)")
    p.add_argument("--lessons", choices=["library", "data"], default="library",
                   help="'data': also score the data's own lesson fields (a known-good library)")
    p.add_argument("--select", choices=["lower", "mean"], default="lower",
                   help="r* by the lower bound of A's 95%% interval (default) or by its mean")
    p.add_argument("--holdout", type=common.open_unit, default=0.25, help="share of each type held out for evaluation")
    p.add_argument("--dev", type=common.ranged(float, lambda v: 0 <= v < 1, "must be at least 0 and below 1"), default=0.2, help="share of the rest kept out of SFT to tune the threshold")
    p.add_argument("--base-ok", type=common.probability, default=0.75, help="base accuracy at which a question needs no recall")
    p.add_argument("--samples", type=common.at_least(1), default=4, help="selection rollouts per question and arm")
    p.add_argument("--eval-samples", type=common.at_least(1), default=3, help="evaluation samples per question and arm")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--answer-tokens", type=common.at_least(1), default=16)
    p.add_argument("--recall-tokens", type=common.at_least(1), default=48, help="longest recall body sampled")
    p.add_argument("--max-len", type=common.at_least(8), default=384, help="prompt + completion tokens per SFT row")
    p.add_argument("--epochs", type=common.at_least(1), default=1)
    p.add_argument("--batch-size", type=common.at_least(1), default=8)
    p.add_argument("--lr", type=common.positive, default=1e-5, help="AdamW learning rate (bench/sweep_sft_lr.py: 3e-5 and 1e-4 forget)")
    p.add_argument("--warmup", type=common.at_least(0), default=2, help="warmup steps")
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--weight-decay", type=common.non_negative, default=0.0)
    p.add_argument("--train-answer", action="store_true", help="ablation: train the answer tokens too")
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embedding")
    p.add_argument("--placebo", action="store_true", help="arm e: the same SFT with the type -> lesson map shuffled")
    p.add_argument("--fresh", type=common.at_least(0), default=1, help="fresh make_procedural instances per sub-type (0: none)")
    p.add_argument("--fresh-seed", type=common.at_least(0), default=1, help="make_procedural seed of the fresh instances")
    p.add_argument("--canary", default="data/obstetrics.jsonl", help="forgetting canary question file ('' : none)")
    p.add_argument("--canary-questions", type=common.at_least(0), default=10, help="canary questions evaluated (spread over the file)")
    p.add_argument("--compose-questions", type=common.at_least(0), default=8, help="composed questions evaluated")
    args = p.parse_args()

    # ---- every input checked before anything is loaded or written (flag ranges: their argparse types)
    questions = common.load_questions(args.data)
    types = sorted({type_key(q) for q in questions})
    cands = {t: [] for t in types}
    if args.library:
        lib = library_candidates(args.library, types)
        if not any(lib.values()) and args.lessons != "data":
            raise common.UserError(f"--library {' '.join(args.library)}: empty library (no usable introspection); "
                                   f"add --lessons data to use the data's lessons")
        for t, cs in lib.items():
            cands[t] += cs
    elif args.lessons != "data":
        raise common.UserError("nothing to select from: give --library PATH or --lessons data")
    if args.lessons == "data" and not any(q.lesson for q in questions):
        raise common.UserError(f"{args.data}: no question carries a 'lesson' field, needed by --lessons data")
    canary = []
    if args.canary and args.canary_questions:
        if Path(args.canary).resolve() == Path(args.data).resolve():
            raise common.UserError("--canary: must be another question set than --data (other clusters)")
        canary = common.load_questions(args.canary)
    out = common.setup_run(args, "sft_recall")
    metrics_path = out / "metrics.jsonl"
    source = "data" if args.lessons == "data" and not args.library else \
        "library" if args.lessons != "data" else "library+data"
    print(f"run folder: {out}\nlessons from: {source}; data {args.data}")

    ckpt = out / "checkpoint"
    times, t_phase = {}, time.time()      # wall seconds per phase, this session (timing.json, report)

    def lap(name):
        nonlocal t_phase
        times[name] = time.time() - t_phase
        t_phase = time.time()
    split = split_questions(questions, args.holdout, args.dev, args.seed)
    by_id = {q.id: q for q in questions}
    select_qs = [q for q in questions if split[q.id] in ("train", "dev")]
    model = tok = None

    def base_model():
        nonlocal model, tok
        if model is None:
            model, tok = common.load_model(args.model, args.device, args.dtype, args.activation_checkpointing)
        return model, tok

    # ---- 1-2. selection and the SFT data (written once; reused by --resume)
    sel_path, lab_path, data_path = out / "selection.json", out / "labels.json", out / "sft_data.jsonl"
    if not (args.resume and sel_path.exists() and lab_path.exists() and data_path.exists()):
        base_model()
        roll = common.rollout_copy(model, args.rollout_dtype)   # bf16 copy where bf16 is fast, else model itself
        selection, labels, examples = build_data(roll, tok, args, questions, select_qs, split, cands, source)
        del roll
        common.save_bank(sel_path, selection)
        common.atomic_write_json(lab_path, labels)
        common.atomic_write_text(data_path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
        lap("selection")
    selection = common.load_bank(sel_path, SELECTION_KIND)
    labels = json.loads(lab_path.read_text())
    examples = [json.loads(ln) for ln in data_path.read_text().splitlines()]
    rstar = {f"{e['cluster']}/{e['subtype']}" if e["subtype"] else e["cluster"]: e for e in selection["entries"]}
    if not examples:
        raise common.UserError("no SFT example could be built (every question was left out); see labels.json")

    # ---- evaluation sets
    heldout = [q for q in questions if split[q.id] == "heldout"]
    composed = [q for q in questions if split[q.id] == "composed"][:args.compose_questions]
    fresh = fresh_questions(args, types, out) if args.fresh else []
    dev = [q for q in questions if split[q.id] == "dev" and labels[q.id]["label"] != "left_out"]
    canary = spread(canary, args.canary_questions)
    sets = {"heldout": heldout, "fresh": fresh, "composed": composed, "canary": canary}

    # ---- 4a. arms a and b on the base model, before any update
    base_path = out / "eval_base.json"
    if not (args.resume and base_path.exists()):
        base_model()
        roll = common.rollout_copy(model, args.rollout_dtype)
        common.atomic_write_json(base_path, eval_base(roll, tok, args, sets, rstar))
        del roll
        lap("base_arms")
    base = json.loads(base_path.read_text())

    # ---- 3. SFT
    if args.resume and ckpt.exists():
        model, tok = common.load_model(str(ckpt), args.device, args.dtype, args.activation_checkpointing)
    else:
        base_model()
    set_trainable(model, args)
    print(f"SFT on {len(examples)} examples ({sum(e['kind'] == 'recall' for e in examples)} with a recall), "
          f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g}")
    train_sft(model, tok, examples, args, out, metrics_path, "sft")
    lap("sft")

    # ---- 4b. arms c and d on the trained model; the threshold from dev only
    model.eval()
    p_dev = p_recall(model, tok, dev)
    tau = tune_threshold(p_dev, np.array([labels[q.id]["label"] == "recall" for q in dev], bool))
    roll = common.rollout_copy(model, args.rollout_dtype)         # made after training: nothing to sync
    trained = {name: run_free(model, tok, qs, args.eval_samples, args, tau, progress=f"{name}", roll=roll)
               for name, qs in sets.items() if qs}
    del roll
    common.atomic_write_json(out / "eval_trained.json", {"tau": tau, "p_dev": p_dev.tolist(), "sets": {
        name: {q.id: r for q, r in zip(sets[name], res)} for name, res in trained.items()}})
    with open(out / "recalls.jsonl", "w", encoding="utf-8") as f:
        for q, r in zip(heldout, trained.get("heldout", [])):
            f.write(json.dumps({"question_id": q.id, "cluster": q.cluster, "subtype": q.subtype,
                                "recalled": r["recalled"][0], "reward": int(r["c"][0]),
                                "samples": [{"recalled": x, "reward": int(y)} for x, y in zip(r["recalled"], r["c"])]},
                               ensure_ascii=False) + "\n")
    lap("trained_arms")

    # ---- 4c. placebo (arm e): the same SFT with the type -> lesson mapping shuffled
    placebo = None
    if args.placebo:
        del model
        model = None
        placebo = run_placebo(args, out, examples, rstar, dev, labels, heldout, by_id, base_model)
        common.atomic_write_json(out / "eval_placebo.json", placebo)
        lap("placebo")

    write_report(out, args, source, selection, labels, examples, split, by_id, sets, base, trained, tau,
                 placebo, metrics_path, times)
    lap("report")
    common.atomic_write_json(out / "timing.json", {**{f"{k}_s": round(v, 1) for k, v in times.items()},
                                                   "total_s": round(sum(times.values()), 1)})
    print(f"selection: {sel_path}\nSFT data:  {data_path}\nrecalls:   {out / 'recalls.jsonl'}\n"
          f"report:    {out / 'report.md'}")


if __name__ == "__main__":
    common.run_main(main)
