"""Phase 2 of the Introspection GRPO paper ("SFT for Introspection Selection via Recall",
"Spontaneous recall"): teach the model to write <recall> r* </recall> right after "Answer:" on the
question types where a lesson helps, and to answer plainly elsewhere.

  1. Selection: per type, r* is the candidate (Phase 1 library.json, or --lessons data) with the
     highest LOWER 95% bound of A = R_bar(Q' + r) - R_bar(Q'); recall-beneficial iff it is > 0.
  2. Data: per type, train / dev / held-out split by normalised (question, cue) text
     (common.text_key), written to split.json. Recall rows: " <recall> r* </recall>", the cue, an
     accepted answer; plain rows: the cue and an accepted answer of the base model.
  3. Loss (one token-level mean): NLL of the recall block, its closing tag and EOS, plus one
     decision per row on the recall-opening token only: -log p(open) on recall rows,
     -log(1 - p(open)) on plain rows. The answer is never trained (--train-answer: the ablation).
  4. Paired arms on held-out questions: a base; b base + r* as a "Lesson:"; b_slot base + r* in the
     recall slot; c trained, free; c* trained + r* in the slot; d trained, the recall opening masked
     at the decision slot; e (--placebo) the type -> lesson map rotated.
Deliberate simplifications: (1) the decision is one threshold on p(open) tuned on dev, taken once per
question; (2) the tied embedding is frozen (--train-embeddings to train it); (3) held-out keeps one
question per text (option orders are not separate evidence); (4) lr 1e-4 x 2 epochs is the pick of
bench/sweep_sft_lr.py's pre-registered rule (results/sft-lr-sweep-v2: it forgets at the point, see there).

    python sft_recall.py --model gemma --lessons data                 # the default (results/sft-default-lr1e-4)
    python sft_recall.py --library runs/A/library.json --model runs/A/checkpoint
    python sft_recall.py --out runs/NAME --resume ...                 # continue after a kill
"""
import contextlib
import json
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

OPEN, CLOSE = "<recall>", "</recall>"
ANSWER_STOP, RECALL_STOP = ["\n"], [CLOSE, "\n"]
SELECTION_KIND = "recall-selection"
ARMS = ("a", "b", "b_slot", "c", "c_star", "d")

# ----------------------------------------------------------------------------
# the maths (pure: tested on hand-made numbers)


def select_lessons(candidates: dict, rule: str = "lower") -> dict:
    """candidates: type -> [{"lesson", "A": {"mean","lo","hi","n"}, "source"}]. Returns type -> the
    chosen one with "beneficial": r* maximises A["lo"] (rule "lower") or the mean; beneficial iff > 0."""
    def score(c):
        v = c["A"]["lo" if rule == "lower" else "mean"]
        return v if v is not None and math.isfinite(v) else -math.inf
    best = {t: max(cs, key=score) if cs else None for t, cs in candidates.items()}
    return {t: {**c, "beneficial": score(c) > 0} if c else None for t, c in best.items()}


def decision_nll(lp_open: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(B,): -log p(open) where up (a recall row), -log(1 - p(open)) elsewhere (p kept below 1)."""
    return -torch.where(up, lp_open, torch.log(-torch.expm1(lp_open.clamp(max=-1e-6))))


def sft_loss(logprobs, mask, lp_open=None, up=None) -> torch.Tensor:
    """Mean NLL over the trained tokens (mask (B, T)) and, given lp_open (B,) = log p(open | head),
    one decision per row as one more token: a global count, so long rows do not dominate."""
    nll, n = -(logprobs * mask).sum(), mask.sum()
    if lp_open is not None:
        nll, n = nll + decision_nll(lp_open, up).sum(), n + len(lp_open)
    if n == 0:
        raise ValueError("a batch with no trained token")
    return nll / n


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warmup over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def tune_threshold(p: np.ndarray, label: np.ndarray) -> float:
    """The threshold on p(open) with the best balanced accuracy on dev (ties: closest to 0.5)."""
    if len(p) == 0 or label.all() or not label.any():
        return 0.5
    cands = sorted(set([0.5] + [(x + y) / 2 for x, y in zip(sorted(p)[:-1], sorted(p)[1:])]))
    bacc = lambda t: ((p >= t)[label].mean() + (p < t)[~label].mean()) / 2
    return max(cands, key=lambda t: (bacc(t), -abs(t - 0.5)))


def token_f1(a: str, b: str) -> float:
    """Token-level F1 of two texts after common.normalise_text (SQuAD-style bag of words)."""
    x, y = common.normalise_text(a).split(), common.normalise_text(b).split()
    if not x or not y:
        return float(x == y)
    k = sum(min(x.count(w), y.count(w)) for w in set(x))
    return 0.0 if k == 0 else 2 * k / (len(x) + len(y))


def carries(recalled: str, lesson: str, share: float = 0.5) -> bool:
    """At least `share` of the lesson's distinct words appear in the recalled text (composition)."""
    words, got = set(common.normalise_text(lesson).split()), set(common.normalise_text(recalled).split())
    return bool(words) and len(words & got) / len(words) >= share


def contrast(arms: dict, x: str, y: str, seed: int) -> dict:
    """x - y, paired by question and sample (common.paired_bootstrap; no interval under 5 clusters)."""
    return common.paired_bootstrap({x: arms[x], y: arms[y]}, lambda m: m[x] - m[y], seed=seed)


def gap_closed(arms: dict, c: str, seed: int) -> dict:
    """G = (c - a) / (b - a), paired; only where b - a's interval lies above 0, else a note."""
    ba = contrast(arms, "b", "a", seed)
    if not ba["lo"] > 0:
        return {**ba, "mean": float("nan"), "note": f"no ratio: b - a = {common.fmt_ci(ba)} is not above 0"}
    return common.paired_bootstrap({k: arms[k] for k in ("a", "b", c)},
                                   lambda m: (m[c] - m["a"]) / (m["b"] - m["a"]), seed=seed)


# ----------------------------------------------------------------------------
# train


def train(args, out: Path, examples: list, tag: str = "sft") -> common.Policy:
    """Recall SFT. AdamW over the trainable weights, linear warmup then decay, grad-norm clip, one
    checkpoint (weights, optimizer, RNG) per epoch under out/checkpoint; --resume restarts at the
    last finished epoch and redoes the metrics rows of a half-done one."""
    policy = common.load_policy(args, out, metrics_key="epoch")
    model, tok, opt = policy.model, policy.tok, policy.opt
    model.get_input_embeddings().weight.requires_grad_(args.train_embeddings)   # tied: the LM head too
    B, trained = args.batch_size, "re" + ("a" if args.train_answer else "")
    total = args.epochs * math.ceil(len(examples) / B)
    step = policy.extra.get("opt_step", 0)
    bar = tqdm(total=total, initial=step, desc=f"SFT ({tag})", unit="step")
    for epoch in range(policy.step, args.epochs):
        order = np.random.default_rng(common.stream_seed(args.seed, "sft-order", epoch)).permutation(len(examples))
        for b0 in range(0, len(examples), B):
            t0 = time.time()
            batch = [examples[i] for i in order[b0:b0 + B]]
            lr = lr_at(step, total, args.warmup, args.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            # 1. log-probs of the completion tokens, and log p(open | head) for each row's decision
            lp, lp_open = batch_logprobs(model, tok, batch)                        # (B, T), (B,)
            up = torch.tensor([e["kind"] == "recall" for e in batch], device=lp.device)
            mask = role_mask(batch, trained, lp.shape[1]).to(lp.device)            # (B, T)
            # 2. one token-level mean: recall block + closing tag + EOS, and one decision per row
            loss = sft_loss(lp, mask, lp_open, up)
            rec = {"phase": tag, "epoch": epoch, "step": step, "lr": lr, "loss": loss.item()}
            # 3. backward, clip, step; a non-finite loss or gradient skips the update (logged)
            if torch.isfinite(loss):
                loss.backward()
                rec.update(common.optimizer_step(policy, args.clip))
            else:
                rec["skipped"] = "non-finite loss"
                opt.zero_grad(set_to_none=True)
            dt = time.time() - t0
            n_tok = sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in batch)
            rec.update(role_losses(lp, lp_open, up, batch), trained_tokens=int(mask.sum()), tokens=n_tok,
                       tokens_per_s=n_tok / dt, step_time=dt, peak_memory_mb=common.peak_memory_mb(lp.device))
            common.append_jsonl(out / "metrics.jsonl", rec)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        # metrics first, checkpoint last: a kill in between only repeats the epoch
        common.save_checkpoint(out, model, tok, opt, step=epoch + 1, extra={"opt_step": step, "phase": tag})
    bar.close()
    model.eval()
    return policy


# ----------------------------------------------------------------------------
# the pieces: prompts, split, selection, rows, the loss's inputs, arms


def type_key(q) -> str:
    """A question's (or a bank entry's) type: "cluster/subtype", or "cluster" without a sub-type."""
    c, sub = (q["cluster"], q.get("subtype")) if isinstance(q, dict) else (q.cluster, q.subtype)
    return f"{c}/{sub}" if sub else c


def prompt_parts(tok, q, lesson=None):
    """(head, cue): head ends at "Answer:" (the decision slot), cue is what the plain prompt adds
    after it (" In Brill, tesk means", or ""). head + cue == common.question_prompt(q)."""
    full = common.question_prompt(tok, q, lesson=lesson)
    head = common.question_prompt(tok, common.Question(**{**q.__dict__, "cue": None}), lesson=lesson)
    assert full.startswith(head)
    return head, full[len(head):]


def recall_open(head: str) -> str:
    """What follows the head when the model recalls: " <recall>" (no space after a chat template)."""
    return (" " if head.endswith(":") else "") + OPEN


def recall_block(head: str, lesson: str) -> str:
    return f"{recall_open(head)} {lesson.strip()} {CLOSE}"


def open_id(tok, head: str) -> int:
    """The recall-opening token: the first token of " <recall>" after the head's tokens."""
    return common.encode(tok, head + recall_open(head))[len(common.encode(tok, head))]


def slot_prompt(tok, q, lesson: str) -> str:
    """The prompt with a lesson in the recall slot: head, <recall> lesson </recall>, the cue."""
    head, cue = prompt_parts(tok, q)
    return head + recall_block(head, lesson) + cue


def split_questions(questions, holdout: float, dev: float, seed: int) -> dict:
    """name -> ids, text-disjoint (common.text_key). Per type, the distinct texts sorted, then
    permuted by a seed of their own; held-out keeps ONE id per text, dev and train every id of
    their texts. Composed questions (meta.components) are never trained on (one id per text)."""
    out = {"train": [], "dev": [], "heldout": [], "composed": []}
    by_type = {}
    for q in sorted(questions, key=lambda q: q.id):
        by_type.setdefault(type_key(q), {}).setdefault(common.text_key(q), []).append(q.id)
    for t, texts in sorted(by_type.items()):
        keys = sorted(texts)
        if any(q.meta.get("components") for q in questions if type_key(q) == t):
            out["composed"] += [texts[k][0] for k in keys]
            continue
        keys = [keys[i] for i in np.random.default_rng(common.stream_seed(seed, "split", zlib.crc32(t.encode())))
                .permutation(len(keys))]
        n_hold = max(1, round(holdout * len(keys))) if len(keys) >= 2 else 0
        n_dev = round(dev * (len(keys) - n_hold))
        out["heldout"] += [texts[k][0] for k in keys[:n_hold]]
        out["dev"] += [i for k in keys[n_hold:n_hold + n_dev] for i in texts[k]]
        out["train"] += [i for k in keys[n_hold + n_dev:] for i in texts[k]]
    seen = {common.text_key(q) for q in questions if q.id in set(out["train"] + out["dev"])}
    out["composed"] = [i for i in out["composed"] if common.text_key(next(q for q in questions if q.id == i)) not in seen]
    return out


def spread(qs, n, skip=()):
    """At most n questions with distinct texts (none in skip), round-robin over clusters."""
    by, seen = {}, set(skip)
    for q in qs:
        if common.text_key(q) not in seen:
            seen.add(common.text_key(q))
            by.setdefault(q.cluster, []).append(q)
    out, k = [], 0
    while len(out) < n and k < max((len(v) for v in by.values()), default=0):
        out += [by[c][k] for c in sorted(by) if k < len(by[c])][:n - len(out)]
        k += 1
    return out


def fresh_questions(args, questions, out):
    """Fresh instances of the procedural families (data/make_procedural.py at --fresh-seed) for the
    types in --data, composed ones left out, and none whose text is a data question's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mp", Path(__file__).resolve().parent / "data" / "make_procedural.py")
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    types, texts = {type_key(q) for q in questions}, {common.text_key(q) for q in questions}
    rows = [{**r, "id": "fresh-" + r["id"]} for r in mp.generate(max(args.fresh, 2), args.fresh_seed)
            if f"{r['cluster']}/{r['subtype']}" in types and "components" not in r.get("meta", {})
            and int(r["id"][-3:]) < args.fresh]
    common.atomic_write_text(out / "fresh.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return spread([q for q in common.load_questions(out / "fresh.jsonl")], len(rows), skip=texts) if rows else []


def library_candidates(paths, data_types) -> dict:
    """type -> candidates from Phase 1 library.json files (meta-gaming lessons left out)."""
    cands = {}
    for path in paths:
        if not Path(path).exists():
            raise common.UserError(f"--library {path}: no such file")
        for e in common.load_bank(path, "introspection-library")["entries"]:
            if not e.get("meta_gaming"):
                cands.setdefault(type_key(e), []).append({"lesson": e["text"], "source": "library", "id": e.get("id"),
                                                            "A": {k: e["A_intro"][k] for k in ("mean", "lo", "hi", "n")}})
    absent = sorted(set(cands) - set(data_types))
    if absent:
        raise common.UserError(f"--library: types {', '.join(absent)} are absent from --data")
    return cands


def score_lessons(roll, tok, args, qs, cands, to_score):
    """Paired with/without rollouts on the train + dev questions ("select" stream); A's interval
    is clustered by text. Returns (rolls: (id, lesson) -> (rewards, texts), chosen)."""
    def run(lessons_of):
        pairs = [(q, l_) for q in qs for l_ in lessons_of(q)]
        if not pairs:
            return {}
        s = common.score(roll, tok, [q for q, _ in pairs], [common.question_prompt(tok, q, lesson=l_) for q, l_ in pairs],
                         args.samples, args.seed, "select", **sampling(args), progress="selection rollouts")
        return {(q.id, l_): (s.rewards[k], [x.text for x in s.samples[k]]) for k, (q, l_) in enumerate(pairs)}
    rolls = run(lambda q: [None] + to_score[type_key(q)])
    for t, lessons in to_score.items():
        for lesson in lessons:
            by_text = {}
            for q in (q for q in qs if type_key(q) == t):
                by_text.setdefault(common.text_key(q), []).extend(rolls[(q.id, lesson)][0] - rolls[(q.id, None)][0])
            ci = common.cluster_bootstrap_ci(list(by_text.values()), seed=common.stream_seed(args.seed, "select-boot", zlib.crc32(t.encode())))
            cands[t].append({"lesson": lesson, "source": "data", "A": {k: ci[k] for k in ("mean", "lo", "hi", "n")}})
    chosen = select_lessons(cands, args.select)
    rolls.update(run(lambda q: [chosen[type_key(q)]["lesson"]] if chosen[type_key(q)] and
                     (q.id, chosen[type_key(q)]["lesson"]) not in rolls else []))   # a library r*, not yet sampled
    return rolls, chosen


def build_data(roll, tok, args, questions, split, cands, source):
    """Select r* per type, label each train/dev question (recall / plain / left_out) and build the
    SFT rows of the train split. Returns (selection bank, labels, rows)."""
    qs = [q for q in questions if q.id in set(split["train"] + split["dev"])]
    to_score = {t: sorted({q.lesson for q in questions if type_key(q) == t and q.lesson}) if args.lessons == "data" else []
                for t in cands}
    rolls, chosen = score_lessons(roll, tok, args, qs, cands, to_score)
    entries = [{"cluster": t.partition("/")[0], "subtype": t.partition("/")[2] or None,
                "lesson": c["lesson"] if c else None, "A": c["A"] if c else {"mean": None, "lo": None, "hi": None, "n": 0},
                "source": c["source"] if c else source, "beneficial": bool(c and c["beneficial"]),
                "candidates": len(cands[t])} for t, c in sorted(chosen.items())]
    labels, rows, train = {}, [], set(split["train"])
    for q in qs:
        c, (base_R, base_txt) = chosen[type_key(q)], rolls[(q.id, None)]
        lab = {"split": "train" if q.id in train else "dev", "type": type_key(q), "base_acc": float(base_R.mean())}
        if c and c["beneficial"] and base_R.mean() < args.base_ok:
            with_R, with_txt = rolls[(q.id, c["lesson"])]
            ok = [x for r, x in zip(with_R, with_txt) if r == 1] + [x for r, x in zip(base_R, base_txt) if r == 1]
            lab.update(label="recall", answer_source="sample" if ok else "reference")
            answer = ok[0] if ok else gold_text(q)
        else:
            ok = [x for r, x in zip(base_R, base_txt) if r == 1]
            lab.update(label="plain" if ok else "left_out", answer_source="sample" if ok else None)
            answer = ok[0] if ok else None
        labels[q.id] = lab
        if q.id in train and lab["label"] != "left_out":
            rows.append(make_example(tok, q, c["lesson"] if lab["label"] == "recall" else None, answer.rstrip(), args,
                                     lab["answer_source"]))
    return {"schema": common.BANK_SCHEMA, "version": common.BANK_VERSION, "kind": SELECTION_KIND,
            "lessons_source": source, "select": args.select, "entries": entries}, labels, rows


def gold_text(q) -> str:
    """The reference answer as a completion (where no sample was accepted, and for answer_logprob)."""
    if q.answer_type == "mcq":
        return f" {q.choices[common.LETTERS.index(q.answer)]}." if q.cue else f" {q.answer}"
    return f" {q.answer}"


def build_example(tok, head: str, completion: str, recall_chars: int, eos_id: int,
                  train_answer: bool, max_len: int) -> dict:
    """Tokenise head + completion; roles from character spans, never token ids (pad may equal EOS):
    "d" the decision (a recall row's first token), "r" tokens overlapping completion[:recall_chars]
    (one straddling the closing tag's edge closes it: trained), "e" the appended EOS, "a" answer
    (--train-answer), "-" untrained. ValueError if the head's tokens are not a prefix of head +
    completion's, or no trained token survives max_len."""
    p_ids = common.encode(tok, head)
    full = head + completion
    enc = tok(full, add_special_tokens=not (tok.bos_token and full.startswith(tok.bos_token)), return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    if ids[:len(p_ids)] != p_ids:
        raise ValueError("the prompt's tokens are not a prefix of prompt + completion")
    spans = [s - len(head) for s, _ in offs[len(p_ids):]]
    roles = ["d" if j == 0 and recall_chars else "r" if s < recall_chars else "a" if train_answer else "-"
             for j, s in enumerate(spans)] + ["e"]
    keep = max(max_len - len(p_ids), 0)
    c_ids, roles = (list(ids[len(p_ids):]) + [eos_id])[:keep], roles[:keep]
    if not any(r != "-" for r in roles):
        raise ValueError(f"no trained token left after truncation to --max-len {max_len} (prompt {len(p_ids)} tokens)")
    return {"prompt_ids": p_ids, "completion_ids": c_ids, "roles": "".join(roles)}


def make_example(tok, q, lesson, answer, args, answer_source=None) -> dict:
    head, cue = prompt_parts(tok, q)
    block = recall_block(head, lesson) if lesson else ""
    try:
        ex = build_example(tok, head, block + cue + answer, len(block), tok.eos_token_id, args.train_answer, args.max_len)
    except ValueError as e:
        raise common.UserError(f"SFT example for question {q.id}: {e}") from None
    ex["open_id"] = open_id(tok, head)
    if lesson and ex["completion_ids"][0] != ex["open_id"]:
        raise common.UserError(f"SFT example for question {q.id}: the recall does not start with the opening token")
    trained = [t for t, r in zip(ex["completion_ids"], ex["roles"]) if r != "-"]
    return {"question_id": q.id, "cluster": q.cluster, "subtype": q.subtype, "type": type_key(q),
            "kind": "recall" if lesson else "plain", "lesson": lesson, "prompt": head, "completion": block + cue + answer,
            "cue": cue, "answer": answer, "answer_source": answer_source, "trained_text": tok.decode(trained), **ex}


def role_mask(examples, roles: str, T: int) -> torch.Tensor:
    """(B, T) bool: True where a completion token's role is in `roles`."""
    m = torch.zeros((len(examples), T), dtype=torch.bool)
    for b, ex in enumerate(examples):
        m[b, :len(ex["roles"])] = torch.tensor([r in roles for r in ex["roles"]], dtype=torch.bool)
    return m


def batch_logprobs(model, tok, batch):
    """(B, T) log-probs of the rows' completion tokens and (B,) log p(open | head). A recall row's
    first token is the opening itself; a plain row adds a one-token row [open] on its prompt
    (token_logprobs runs a shared prompt once, so it costs one token)."""
    plain = [i for i, e in enumerate(batch) if e["kind"] != "recall"]
    lp = common.token_logprobs(model, [e["prompt_ids"] for e in batch] + [batch[i]["prompt_ids"] for i in plain],
                               [e["completion_ids"] for e in batch] + [[batch[i]["open_id"]] for i in plain],
                               pad_id=tok.pad_token_id)["logprobs"]
    idx = torch.arange(len(batch))
    idx[plain] = len(batch) + torch.arange(len(plain))
    return lp[:len(batch)], lp[idx.to(lp.device), 0]


def role_losses(lp, lp_open, up, batch) -> dict:
    """What to log: decision NLL (per row), recall-block NLL and EOS NLL (per token)."""
    with torch.no_grad():
        out = {"loss_decision": float(decision_nll(lp_open, up).mean())}
        for name, r in (("loss_recall", "r"), ("loss_eos", "e")):
            m = role_mask(batch, r, lp.shape[1]).to(lp.device)
            out[name] = float(-(lp * m).sum() / m.sum()) if m.any() else None
    return out


def sampling(args, max_new=None, stop=ANSWER_STOP) -> dict:      # sample()'s keywords
    return {"max_new_tokens": max_new or args.answer_tokens, "temperature": args.temperature, "stop": stop}


@contextlib.contextmanager
def recall_banned(model, ids):
    """Arm d: while active, the logits of the recall-opening token(s) are -inf at the first generated
    position (the prefill's; a decode step feeds one token), so the model cannot open a recall there."""
    def hook(mod, args, kwargs, out):
        if kwargs["input_ids"].shape[1] > 1:
            out.logits[:, -1, list(ids)] = -float("inf")
    h = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def p_recall(model, tok, qs, batch=16) -> np.ndarray:
    """p(open | plain prompt up to "Answer:") for each question."""
    heads = [prompt_parts(tok, q)[0] for q in qs]
    out = []
    for s in range(0, len(qs), batch):
        lp = common.token_logprobs(model, [common.encode(tok, h) for h in heads[s:s + batch]],
                                   [[open_id(tok, h)] for h in heads[s:s + batch]], pad_id=tok.pad_token_id)
        out += lp["logprobs"][:, 0].exp().tolist()
    return np.array(out)


def lesson_of(q, rstar):
    """r* where recall has something to offer (a beneficial type; a composed question: its
    beneficial components' r* joined), else None (then b = b_slot = a and c* = d)."""
    types = q.meta.get("components") or [type_key(q)]
    return " ".join(rstar[t]["lesson"] for t in types if t in rstar and rstar[t]["beneficial"]) or None


def sample_arm(roll, tok, args, qs, prompts, name, base=None):
    """One arm: rewards (Q, n) and texts on the "eval" stream (row j of a question pairs across
    arms). A prompt None copies base's row (no lesson to give: that arm equals the base arm there)."""
    idx = [i for i, p in enumerate(prompts) if p is not None]
    R = np.array(base, float) if base is not None else np.zeros((len(qs), args.eval_samples))
    texts = [None] * len(qs)
    if idx:
        s = common.score(roll, tok, [qs[i] for i in idx], [prompts[i] for i in idx], args.eval_samples, args.seed,
                         "eval", **sampling(args), progress=name)
        for k, i in enumerate(idx):
            R[i], texts[i] = s.rewards[k], [x.text for x in s.samples[k]]
    return R, texts


def arm_prompts(tok, qs, lessons):
    """plain, b ("Lesson:" before the question) and slot (r* in the recall slot) prompts; None
    where a question has no lesson."""
    return ([common.question_prompt(tok, q) for q in qs],
            [common.question_prompt(tok, q, lesson=x) if x else None for q, x in zip(qs, lessons)],
            [slot_prompt(tok, q, x) if x else None for q, x in zip(qs, lessons)])


def gold_logprob(model, tok, qs, prompts, fallback):
    """Teacher-forced log-prob of the gold answer after each prompt (a prompt None: fallback's)."""
    return common.answer_logprob(model, tok, [p or f for p, f in zip(prompts, fallback)], [gold_text(q) for q in qs])


def base_arms(args, base, sets, rstar) -> dict:
    """a (plain), b (r* as a "Lesson:"), b_slot (r* in the recall slot) on the base model, paired
    rows; on held-out also the gold answer's teacher-forced log-prob in each arm."""
    model, roll, tok, res = base["model"], base["roll"], base["tok"], {}
    for name, qs in sets.items():
        plain, pb, ps = arm_prompts(tok, qs, [lesson_of(q, rstar) if name != "canary" else None for q in qs])
        a, _ = sample_arm(roll, tok, args, qs, plain, f"arm a: {name}")
        b, _ = sample_arm(roll, tok, args, qs, pb, f"arm b: {name}", base=a)
        bs, _ = sample_arm(roll, tok, args, qs, ps, f"arm b_slot: {name}", base=a)
        res[name] = {q.id: {"a": a[i].tolist(), "b": b[i].tolist(), "b_slot": bs[i].tolist()} for i, q in enumerate(qs)}
        if name == "heldout" and qs:
            lp = {k: gold_logprob(model, tok, qs, pr, plain) for k, pr in (("lp_a", plain), ("lp_b", pb), ("lp_b_slot", ps))}
            for i, q in enumerate(qs):
                res[name][q.id].update({k: float(v[i]) for k, v in lp.items()})
    return res


def free_arm(policy, args, qs, p, tau, d):
    """Arm c: where p(open) >= tau, a recall body is sampled after a forced opening ("eval-recall"
    stream), then row j's answer after the closed block with row j's "eval" seed; elsewhere c's row
    is d's (same prompt, weights and seed), so the whole of c - d goes through the recall."""
    tok, rec = policy.tok, [i for i in range(len(qs)) if p[i] >= tau]
    heads = {i: prompt_parts(tok, qs[i]) for i in rec}
    s = common.score(policy.rollout, tok, [qs[i] for i in rec], [heads[i][0] + recall_open(heads[i][0]) for i in rec],
                     args.eval_samples, args.seed, "eval-recall", **sampling(args, args.recall_tokens, RECALL_STOP)) if rec else None
    bodies = {i: [x.text.strip() for x in s.samples[k]] for k, i in enumerate(rec)}
    closed = {i: [CLOSE in tok.decode(x.token_ids) for x in s.samples[k]] for k, i in enumerate(rec)}   # ">." may merge
    jobs = [(i, j, heads[i][0] + recall_block(heads[i][0], b_) + heads[i][1]) for i in rec for j, b_ in enumerate(bodies[i])]
    seeds = [common.stream_seed(args.seed, "eval", zlib.crc32(qs[i].id.encode()), j) for i, j, _ in jobs]  # = score's row j
    c = np.array(d, float)
    for (i, j, _), x in zip(jobs, common.sample(policy.rollout, tok, [p_ for *_, p_ in jobs], n=1, row_seeds=seeds,
                                                **sampling(args)) if jobs else []):
        c[i, j] = common.verify(qs[i], x.text)[0]
    return c, bodies, closed


def trained_arms(args, policy, sets, rstar, tau) -> dict:
    """c (free), c* (r* forced in the slot) and d (recall opening masked) on the trained weights."""
    model, tok, roll, res = policy.model, policy.tok, policy.rollout, {}
    for name, qs in sets.items():
        p = p_recall(model, tok, qs)
        plain, _, ps = arm_prompts(tok, qs, [lesson_of(q, rstar) if name != "canary" else None for q in qs])
        with recall_banned(roll, {open_id(tok, prompt_parts(tok, q)[0]) for q in qs}):
            d, d_txt = sample_arm(roll, tok, args, qs, plain, f"arm d: {name}")
        cs, _ = sample_arm(roll, tok, args, qs, ps, f"arm c*: {name}", base=d)
        c, bodies, closed = free_arm(policy, args, qs, p, tau, d)
        none = [None] * args.eval_samples
        res[name] = {q.id: {"p_recall": float(p[i]), "decision": bool(p[i] >= tau), "c": c[i].tolist(),
                            "d": d[i].tolist(), "c_star": cs[i].tolist(), "recalled": bodies.get(i, none),
                            "closed": closed.get(i, none), "d_texts": d_txt[i], "d_leak": [OPEN in t for t in d_txt[i]]}
                     for i, q in enumerate(qs)}
        if name == "heldout" and qs:
            # d's log-prob renormalised where the ban masks the slot the answer's first token sits in
            lp_d = gold_logprob(model, tok, qs, plain, plain) - np.where([not q.cue for q in qs], np.log1p(-p), 0.0)
            lp_cs = gold_logprob(model, tok, qs, ps, plain)
            for i, q in enumerate(qs):
                res[name][q.id].update(lp_d=float(lp_d[i]), lp_c_star=float(lp_cs[i] if ps[i] else lp_d[i]))
    return res


def run_placebo(args, out, tok, examples, rstar, by_id, sets, labels) -> dict:
    """Arm e: retrain from the base model on the same rows with each beneficial type's r* replaced by
    the next beneficial type's (a rotation: no type keeps its own), then arm c on held-out."""
    ben = sorted(t for t, e in rstar.items() if e["beneficial"])
    if len(ben) < 2:
        return {"note": f"placebo needs two recall-beneficial types, found {len(ben)}"}
    mapping = {t: rstar[ben[(i + 1) % len(ben)]]["lesson"] for i, t in enumerate(ben)}
    rows = [make_example(tok, by_id[e["question_id"]], mapping[e["type"]], e["answer"], args, e["answer_source"])
            if e["kind"] == "recall" else e for e in examples]
    common.atomic_write_text(out / "placebo" / "sft_data.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rows))
    policy = train(args, out / "placebo", rows, tag="placebo")
    tau = tune_threshold(p_recall(policy.model, tok, sets["dev"]), np.array([labels[q.id]["label"] == "recall" for q in sets["dev"]]))
    return {"tau": tau, "mapping": mapping, "heldout": trained_arms(args, policy, {"heldout": sets["heldout"]}, {}, tau)["heldout"]}


def check_inputs(args):
    """Every input checked before anything is loaded or written: (questions, candidates, source, canary)."""
    questions = common.load_questions(args.data)
    cands = {t: [] for t in sorted({type_key(q) for q in questions})}
    if args.library:
        lib = library_candidates(args.library, cands)
        if not any(lib.values()) and args.lessons != "data":
            raise common.UserError(f"--library {' '.join(args.library)}: empty library (no usable introspection); add --lessons data")
        for t, cs in lib.items():
            cands[t] += cs
    elif args.lessons != "data":
        raise common.UserError("nothing to select from: give --library PATH or --lessons data")
    if args.lessons == "data" and not any(q.lesson for q in questions):
        raise common.UserError(f"{args.data}: no question carries a 'lesson' field, needed by --lessons data")
    if args.canary and Path(args.canary).resolve() == Path(args.data).resolve():
        raise common.UserError("--canary: must be another question set than --data (other clusters)")
    canary = common.load_questions(args.canary) if args.canary and args.canary_questions else []
    return questions, cands, "library+data" if args.library and args.lessons == "data" else "library" if args.library else "data", canary


def cached(args, out, times, name, files, make):
    """A phase: make() unless --resume finds all its files; its wall time into times (timing.json)."""
    if not (args.resume and files and all((out / f).exists() for f in files)):
        t0 = time.time()
        make()
        times[name] = time.time() - t0


def base_model(args, base: dict) -> dict:
    """The base model, its tokenizer and rollout copy (bf16 where bf16 is fast), loaded once."""
    if not base:
        base["model"], base["tok"] = common.load_model(args.model, args.device, args.dtype, args.activation_checkpointing)
        base["roll"] = common.rollout_copy(base["model"], args.rollout_dtype)
    return base


def data_phase(args, out, base, questions, canary, cands, source):
    """split.json (text-disjoint), selection.json, labels.json, sft_data.jsonl: written once."""
    split = split_questions(questions, args.holdout, args.dev, args.seed)
    split["composed"] = split["composed"][:args.compose_questions]
    split["fresh"] = [q.id for q in fresh_questions(args, questions, out)] if args.fresh else []
    split["canary"] = [q.id for q in spread(canary, args.canary_questions, skip={common.text_key(q) for q in questions})]
    split["canary_select"] = [q.id for q in spread([q for q in canary if q.id not in split["canary"]], args.canary_questions,
                                                   skip={common.text_key(q) for q in canary if q.id in split["canary"]})]
    selection, labels, rows = build_data(base["roll"], base["tok"], args, questions, split, cands, source)
    if not rows:
        raise common.UserError("no SFT example could be built (every question was left out)")
    common.atomic_write_text(out / "sft_data.jsonl", "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in rows))
    common.save_bank(out / "selection.json", selection)
    common.atomic_write_json(out / "labels.json", labels)
    common.atomic_write_json(out / "split.json", split)          # last: its presence marks the phase done


def load_run(out, questions, canary):
    """(sets: split name -> questions, labels, rstar: type -> selection entry, SFT rows) from the run folder."""
    split = json.loads((out / "split.json").read_text())
    pool = {q.id: q for q in questions + canary + (common.load_questions(out / "fresh.jsonl") if split["fresh"] else [])}
    labels = json.loads((out / "labels.json").read_text())
    sets = {n: [pool[i] for i in split[n] if n != "dev" or labels[i]["label"] != "left_out"]
            for n in ("heldout", "fresh", "composed", "canary", "dev")}
    return sets, labels, {type_key(e): e for e in common.load_bank(out / "selection.json", SELECTION_KIND)["entries"]}, \
        common.read_jsonl(out / "sft_data.jsonl")


def eval_trained(args, out, policy, sets, labels, rstar):
    """The threshold on p(open) from dev only; arms c, c*, d (eval_trained.json); recalls.jsonl
    (read by dream.py --recall-from): arm c's recalls per held-out question."""
    p_dev = p_recall(policy.model, policy.tok, sets["dev"])
    tau = tune_threshold(p_dev, np.array([labels[q.id]["label"] == "recall" for q in sets["dev"]], bool))
    tr = trained_arms(args, policy, {n: v for n, v in sets.items() if n != "dev"}, rstar, tau)
    common.atomic_write_json(out / "eval_trained.json", {"tau": tau, "p_dev": p_dev.tolist(), "sets": tr})
    common.write_jsonl(out / "recalls.jsonl", [{"question_id": q.id, "cluster": q.cluster, "subtype": q.subtype,
                                                "recalled": tr["heldout"][q.id]["recalled"][0], "reward": int(tr["heldout"][q.id]["c"][0]),
                                                "samples": [{"recalled": x, "reward": int(y)} for x, y in
                                                            zip(tr["heldout"][q.id]["recalled"], tr["heldout"][q.id]["c"])]}
                                               for q in sets["heldout"]])


# ----------------------------------------------------------------------------
# evaluation: every statistic, into eval.json

CONTRASTS = (("c", "a"), ("c", "d"), ("c_star", "d"), ("c", "c_star"), ("b", "a"), ("b_slot", "a"), ("d", "a"))


def arm_stats(A: dict, seed: int) -> dict:
    """Each arm's mean and the CONTRASTS, paired by question and sample (unit: the rows of A)."""
    return {"n_questions": len(next(iter(A.values()))),
            "acc": {k: common.paired_bootstrap({k: v}, lambda m, k=k: m[k], seed=seed) for k, v in A.items()},
            **{f"{x} - {y}": contrast(A, x, y, seed) for x, y in CONTRASTS if x in A and y in A}}


def set_stats(qs, base, tr, rstar, seed) -> dict:
    """Accuracy per arm over questions x samples: all questions, the recall-beneficial types only
    (with G, G with d), per type (unit: question; under 5 no interval), and over types (unit: type)."""
    arms = {k: np.array([(base if k in ("a", "b", "b_slot") else tr)[q.id][k] for q in qs], float) for k in ARMS}
    ben = np.array([bool(lesson_of(q, rstar)) for q in qs])
    types = sorted({type_key(q) for q in qs})
    ix = {t: np.array([type_key(q) == t for q in qs]) for t in types}
    res = {"all": arm_stats(arms, seed), "by_type": {t: {**arm_stats({k: v[m] for k, v in arms.items()}, seed),
                                                         "beneficial": bool(ben[m].any()),
                                                         "recall_rate": float(np.mean([tr[q.id]["decision"] for q, x in zip(qs, m) if x]))}
                                                     for t, m in ix.items()}}
    if ben.any():
        A = {k: v[ben] for k, v in arms.items()}
        res["beneficial"] = {**arm_stats(A, seed), "G": gap_closed(A, "c", seed), "G_d": gap_closed(A, "d", seed)}
        per_type = {k: np.array([v[ix[t] & ben].mean() for t in types if (ix[t] & ben).any()]) for k, v in arms.items()}
        res["beneficial_by_type"] = arm_stats(per_type, seed)          # unit: type (type means)
    return res


def heldout_extras(qs, base, tr, rstar, seed) -> dict:
    """Decision quality (unit: question), fidelity of the recalled text (cluster bootstrap over
    questions) and the gold answer's log-prob per arm (continuous, paired)."""
    lab, dec = np.array([bool(lesson_of(q, rstar)) for q in qs]), np.array([tr[q.id]["decision"] for q in qs])
    p = np.array([tr[q.id]["p_recall"] for q in qs])
    rate = lambda x, m: common.mean_ci(x[m].astype(float), binary=True) if m.any() else None
    lp = {k[3:]: np.array([{**base[q.id], **tr[q.id]}[k] for q in qs]) for k in ("lp_a", "lp_b", "lp_b_slot", "lp_c_star", "lp_d")}
    lessons, fid = {t: e["lesson"] for t, e in rstar.items() if e["lesson"]}, {"f1": [], "own_type": [], "closed": []}
    for q in qs:
        got = [(b_, c_) for b_, c_ in zip(tr[q.id]["recalled"], tr[q.id]["closed"]) if b_ is not None]
        if got and type_key(q) in lessons:
            fid["f1"].append([token_f1(b_, lessons[type_key(q)]) for b_, _ in got])
            fid["own_type"].append([float(max(lessons, key=lambda t: token_f1(b_, lessons[t])) == type_key(q)) for b_, _ in got])
            fid["closed"].append([float(c_) for _, c_ in got])
    pairs = (("c_star", "d"), ("b_slot", "a"), ("b", "a"), ("d", "a"), ("c_star", "b_slot"))
    return {"decision": {"rate_beneficial": rate(dec, lab), "rate_unnecessary": rate(dec, ~lab), "precision": rate(lab, dec),
                         "p_beneficial": float(p[lab].mean()) if lab.any() else None,
                         "p_unnecessary": float(p[~lab].mean()) if (~lab).any() else None},
            "fidelity": {k: common.cluster_bootstrap_ci(g, seed=seed) if g else None for k, g in fid.items()},
            "logprob": {part: {**{k: common.paired_bootstrap({k: v[m]}, lambda z, k=k: z[k], seed=seed) for k, v in lp.items()},
                               **{f"{x} - {y}": contrast({k: v[m] for k, v in lp.items()}, x, y, seed) for x, y in pairs}}
                        for part, m in (("beneficial", lab), ("all", np.ones(len(qs), bool))) if m.any()}}


def evaluate(args, out, sets, rstar) -> dict:
    """Every statistic of the run, from eval_base.json, eval_trained.json (and eval_placebo.json): eval.json."""
    seed = common.stream_seed(args.seed, "report-boot")
    base, tr = (json.loads((out / f).read_text()) for f in ("eval_base.json", "eval_trained.json"))
    T, h = tr["sets"], sets["heldout"]
    res = {"tau": tr["tau"], "sets": {n: set_stats(qs, base[n], T[n], rstar, seed) for n, qs in sets.items() if qs}}
    if h:
        res.update(heldout_extras(h, base["heldout"], T["heldout"], rstar, seed))
    if sets["canary"]:
        res["canary"] = {"spurious_recall": common.mean_ci([float(T["canary"][q.id]["decision"]) for q in sets["canary"]], binary=True),
                         "d_leak": float(np.mean([T["canary"][q.id]["d_leak"] for q in sets["canary"]]))}
    if sets["composed"]:
        ks = [sum(carries(b_, rstar[t]["lesson"]) for t in q.meta["components"]) for q in sets["composed"]
              if all(rstar.get(t, {}).get("lesson") for t in q.meta["components"]) for b_ in T["composed"][q.id]["recalled"] if b_]
        res["composition"] = {"both": ks.count(2), "one": ks.count(1), "n": len(ks)}
    pl = json.loads((out / "eval_placebo.json").read_text()) if (out / "eval_placebo.json").exists() else None
    if pl and "note" not in pl:
        A = {"a": [base["heldout"][q.id]["a"] for q in h], "c": [T["heldout"][q.id]["c"] for q in h], "e": [pl["heldout"][q.id]["c"] for q in h]}
        pl = {"tau": pl["tau"], "e": common.paired_bootstrap({"e": A["e"]}, lambda m: m["e"], seed=seed), "e - a": contrast(A, "e", "a", seed),
              "c - e": contrast(A, "c", "e", seed), "recall_rate": float(np.mean([pl["heldout"][q.id]["decision"] for q in h]))}
    common.atomic_write_json(out / "eval.json", {**res, **({"placebo": pl} if pl else {})})
    return res


# ----------------------------------------------------------------------------
# report: reads the run folder only, so any run re-renders


def write_report(out):
    """out/report.md from the run folder alone: config.json, selection.json, eval.json, metrics.jsonl, timing.json."""
    out = Path(out)
    cfg, ev = (json.loads((out / f).read_text()) for f in ("config.json", "eval.json"))
    sel = common.load_bank(out / "selection.json", SELECTION_KIND)["entries"]
    f, fu, nm = common.fmt_ci, (lambda ci: common.fmt_ci(ci, False)), (lambda k: k.replace("_star", "*"))
    g = lambda x: x["note"] if x.get("note", "").startswith("no ratio") else f(x)
    L = [f"# Recall SFT: {out.name}", "", f"`{cfg['argv']}`", "", f"Lessons from **{sel and sel[0]['source']}**; r*: highest "
         f"{'lower bound' if cfg['select'] == 'lower' else 'mean'} of A's 95% interval, recall-beneficial iff > 0. Every interval: "
         f"95%, paired bootstrap over questions (then samples) unless another unit is named.", "", "## Selection", ""]
    L += common.md_table(["type", "r*", "A", "beneficial"], [[type_key(e), (e["lesson"] or "-")[:80], f(e["A"]) if e["A"]["n"] else "-",
                                                            "yes" if e["beneficial"] else "no"] for e in sel])
    ms = [m for m in common.read_metrics(out) if m.get("phase") == "sft"]
    if ms:
        L += ["", "## Training", "", f"{len(ms)} AdamW steps, {cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']:g}; "
              + ", ".join(f"{k} {ms[0][k] or 0:.3f} -> {ms[-1][k] or 0:.3f}" for k in ("loss", "loss_decision", "loss_recall", "loss_eos"))
              + f"; median step {np.median([m['step_time'] for m in ms]):.1f} s (`metrics.jsonl`)."]
    for name, st in ev["sets"].items():
        L += ["", f"## {name}: arms a, b, b_slot, c, c*, d (threshold on p(open) {ev['tau']:.3f})", "",
              "Per type, means only where a type has under 5 questions (no interval under 5 clusters; `eval.json` has them all).", ""]
        L += common.md_table(["type", "beneficial", "recalled", "questions", *map(nm, ARMS), "c - d", "c* - d"],
                             [[t, "yes" if x["beneficial"] else "no", f"{x['recall_rate']:.2f}", x["n_questions"], *(
                                 f"{x['acc'][k]['mean']:.2f}" for k in ARMS), *(f(x[k]) if x["n_questions"] >= common.MIN_CLUSTERS
                                                                              else f"{x[k]['mean']:+.2f}" for k in ("c - d", "c_star - d"))]
                              for t, x in st["by_type"].items()])
        for part in ("all", "beneficial"):
            x = st.get(part)
            L += ["", f"**{part}** ({x['n_questions']} questions): " + ", ".join(f"{nm(k)} {fu(v)}" for k, v in x["acc"].items()) +
                  ". Paired: " + "; ".join(f"{nm(k)} {f(v)}" for k, v in x.items() if " - " in k) + "."] if x else []
        if "beneficial" in st:
            t = st["beneficial_by_type"]
            L += ["", f"On recall-beneficial types: **G = (c - a) / (b - a) = {g(st['beneficial']['G'])}**; with d in place of c: "
                  f"{g(st['beneficial']['G_d'])}. Over types (unit: type, {t['n_questions']} types): c - d {f(t['c - d'])}, c* - d {f(t['c_star - d'])}."]
    if "logprob" in ev:
        L += ["", "## Gold answer log-prob (teacher-forced, nats, held-out)", ""] + [
            f"- {part}: " + "; ".join(f"{nm(k)} {f(v)}" for k, v in x.items()) for part, x in ev["logprob"].items()]
    if "decision" in ev:
        d = ev["decision"]
        L += ["", "## Decision quality (held-out, unit: question) and fidelity (cluster bootstrap over questions)", "",
              f"- recall rate on beneficial types {fu(d['rate_beneficial'])} (mean p {d['p_beneficial'] or 0:.2f}); on unnecessary "
              f"types {fu(d['rate_unnecessary'])} (mean p {d['p_unnecessary'] or 0:.2f}); precision {fu(d['precision'])}"]
        L += [f"- recalled text, {k}: {fu(v)}" for k, v in ev["fidelity"].items()]
    if "canary" in ev:
        c = ev["canary"]
        L += ["", "## Forgetting and spurious recall (canary)", "", f"- forgetting, d - a (recall opening masked): "
              f"{f(ev['sets']['canary']['all']['d - a'])}", f"- spurious recall rate (c decides to recall, unit: question): "
              f"{fu(c['spurious_recall'])}; d texts holding `{OPEN}`: {c['d_leak']:.2f}"]
    if "composition" in ev:
        c = ev["composition"]
        L += ["", f"Composition: {c['both']} of {c['n']} recalls carry both component lessons, {c['one']} one."]
    if "placebo" in ev:
        p = ev["placebo"]
        L += ["", "## Placebo (arm e: type -> lesson map rotated)", "", p.get("note") or
              f"e {fu(p['e'])}; e - a {f(p['e - a'])}; c - e {f(p['c - e'])}; recall rate {p['recall_rate']:.2f}"]
    if (out / "timing.json").exists():
        L += ["", "Wall time by phase (`timing.json`): " + ", ".join(f"{k} {v:.0f} s" for k, v in json.loads((out / "timing.json").read_text()).items())]
    return common.write_report(out, L)


# ----------------------------------------------------------------------------
# flags


def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]), data="data/procedural.jsonl")
    p.add_argument("--library", nargs="+", default=None, help="Phase 1 library.json file(s)")
    p.add_argument("--lessons", choices=["library", "data"], default="library", help="'data': score the data's own lesson fields too")
    p.add_argument("--select", choices=["lower", "mean"], default="lower", help="r* by the lower bound of A's 95%% interval, or its mean")
    p.add_argument("--holdout", type=common.ranged(float, lambda v: 0 < v < 1, "must be strictly between 0 and 1"), default=0.25, help="share of each type's texts held out")
    p.add_argument("--dev", type=common.ranged(float, lambda v: 0 <= v < 1, "must be at least 0 and below 1"), default=0.2, help="share of the rest kept for the threshold")
    p.add_argument("--base-ok", type=common.probability, default=0.75, help="base accuracy at which a question needs no recall")
    p.add_argument("--samples", type=common.at_least(1), default=4, help="selection rollouts per question and arm")
    p.add_argument("--eval-samples", type=common.at_least(1), default=3, help="evaluation samples per question and arm")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--answer-tokens", type=common.at_least(1), default=16)
    p.add_argument("--recall-tokens", type=common.at_least(1), default=48, help="longest recall body sampled")
    p.add_argument("--max-len", type=common.at_least(8), default=384, help="prompt + completion tokens per SFT row")
    p.add_argument("--epochs", type=common.at_least(1), default=2)
    p.add_argument("--batch-size", type=common.at_least(1), default=8)
    p.add_argument("--lr", type=common.positive, default=1e-4, help="AdamW learning rate (results/sft-lr-sweep-v2/SELECTION.md)")
    p.add_argument("--warmup", type=common.at_least(0), default=2, help="warmup steps")
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--weight-decay", type=common.non_negative, default=0.0)
    p.add_argument("--train-answer", action="store_true", help="ablation: train the answer tokens too")
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embedding")
    p.add_argument("--placebo", action="store_true", help="arm e: the same SFT with the type -> lesson map rotated")
    p.add_argument("--fresh", type=common.at_least(0), default=0, help="fresh make_procedural instances per sub-type")
    p.add_argument("--fresh-seed", type=common.at_least(0), default=1, help="make_procedural seed of the fresh instances")
    p.add_argument("--canary", default="data/obstetrics.jsonl", help="forgetting canary question file ('': none)")
    p.add_argument("--canary-questions", type=common.at_least(0), default=10, help="canary questions reported (a disjoint set selects lr)")
    p.add_argument("--compose-questions", type=common.at_least(0), default=0, help="composed questions evaluated")
    return p


def main():
    args = build_parser().parse_args()
    questions, cands, source, canary = check_inputs(args)
    out, times, base = common.setup_run(args, "sft_recall"), {}, {}
    # 1-2. the split, r* per type and the SFT rows, on the base model
    cached(args, out, times, "selection", ["split.json"],
           lambda: data_phase(args, out, base_model(args, base), questions, canary, cands, source))
    sets, labels, rstar, examples = load_run(out, questions, canary)
    evals = {n: v for n, v in sets.items() if n != "dev"}
    # 4a. arms a, b, b_slot on the base model, before any update
    cached(args, out, times, "base_arms", ["eval_base.json"],
           lambda: common.atomic_write_json(out / "eval_base.json", base_arms(args, base_model(args, base), evals, rstar)))
    base.clear()
    # 3. the SFT (train() resumes at its last finished epoch by itself)
    print(f"SFT on {len(examples)} rows ({sum(e['kind'] == 'recall' for e in examples)} recall), {args.epochs} epochs, lr {args.lr:g}")
    t0 = time.time()
    policy = train(args, out, examples)
    times["sft"] = time.time() - t0
    # 4b. arms c, c*, d on the trained weights; 4c. the placebo arm e
    cached(args, out, times, "trained_arms", ["eval_trained.json", "recalls.jsonl"],
           lambda: eval_trained(args, out, policy, sets, labels, rstar))
    if args.placebo:
        cached(args, out, times, "placebo", ["eval_placebo.json"], lambda: common.atomic_write_json(
            out / "eval_placebo.json", run_placebo(args, out, policy.tok, examples, rstar, {q.id: q for q in questions},
                                                   sets, labels)))
    # 5. every statistic (eval.json), then the report, which reads the run folder only
    cached(args, out, times, "report", [], lambda: evaluate(args, out, evals, rstar))
    common.atomic_write_json(out / "timing.json", {**{f"{k}_s": round(v, 1) for k, v in times.items()},
                                                   "total_s": round(sum(times.values()), 1)})
    print(f"report: {write_report(out)}")


if __name__ == "__main__":
    common.run_main(main)
