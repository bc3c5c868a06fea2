"""Test-time adaptation ("dreaming") of the Introspection GRPO paper: integrate a lesson r into the
weights, so that the model behaves WITHOUT r in its context as it did with r, on inputs it never
dreamt about.

The paper's four steps (section "Test-Time Adaptation"), as built here:
  1. Take x' + r and generate rollouts: k samples of x' + r from the frozen pre-dream model, the
     teacher. Their answers, read with the verifier's answer extraction, are the desired
     behaviour: the teacher's answer distribution p_T(a | x'). No labels are used.
  2. Reward (similarity to the desired behaviour) of a student rollout on x' WITHOUT r:
     p_T(its answer | x') (--reward teacher, default), or 1[its answer = the teacher's majority]
     (--reward majority, as in TTRL). --reward verifier uses the true answer instead: it is
     labelled, so it is only an upper-bound calibration and the report says so.
  3. Vary the input: x' are other questions of the type, the same with their options permuted
     (answer letter remapped), and, for the procedural families, fresh instances drawn by
     data/make_procedural.py at other seeds. Dream, dev and evaluation questions never overlap;
     evaluation uses real held-out questions of the type.
  4. Update by RL: GRPO on the student with no r in context.

Around it: a gate (no context effect on dev -> nothing to internalise, stop; --force goes on), a
canary on other clusters (each asked with its own type's lesson) with --rollback, final weights chosen on dev only (label-free: agreement
with the teacher's majority), and measurement on held-out questions: the internalisation ratio
IR = (acc_after(x) - acc_before(x)) / (acc_before(x + r) - acc_before(x)), agreement with the
teacher's majority before and after, acc_after(x + r), forgetting on the canary. Two controls run
with the same budget in the same run: a placebo lesson (another type's lesson, cut to the same
length) and off-policy context distillation (Snell et al. 2022, "Learning by Distilling
Context": SFT of the student on the teacher's own x' + r samples, --method distill).

Deliberate simplifications against textbook GRPO:
  1. Advantage = r - mean(r) over the N rollouts of one x' (no division by the std); groups with
     zero variance carry no signal and are skipped.
  2. One gradient step per batch of rollouts (on-policy): the PPO ratio is 1, so no clipping.
  3. Token-level normalisation: the loss is divided by the step's total number of completion
     tokens (every completion token is trained, the stop token included).
  4. No KL by default. --kl adds a KL to the pre-dream weights on replay questions of other
     types; --cd-coef adds a differentiable context-distillation term (per-token KL between the
     student on x' and the teacher on x' + r over the teacher's top-k ids plus a tail bucket).
  5. Not built: --paraphrase (model-written rewrites of x'), and --resume (a run is ~15 min).

    python dream.py --model gemma --data data/procedural.jsonl --cluster velt-code --subtype hands
    python dream.py --library runs/G/library.json --cluster brill-dialect --subtype verbs
    python dream.py --recall-from runs/S --cluster velt-code --subtype hands --model runs/S/checkpoint
"""
import argparse
import copy
import importlib.util
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

ANSWER_STOP = ["\n"]       # one answer line, as grpo_introspect.py scores transfer rollouts
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------
# the lesson and its type


def best_library_entry(library: dict, cluster: str, subtype: str | None):
    """The entry of this type whose A_intro has the highest lower bound (an entry without an
    interval counts as -inf), or None."""
    def lo(e):
        x = (e.get("A_intro") or {}).get("lo")
        return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf
    es = [e for e in library["entries"]
          if e.get("cluster") == cluster and (subtype is None or e.get("subtype") == subtype)]
    return max(es, key=lo) if es else None


def recalled_lesson(run: Path, cluster: str, subtype: str | None):
    """(lesson, source) from a sft_recall.py run folder: the most frequent non-null text the
    model recalled on held-out questions of this type (recalls.jsonl), else the type's entry in
    the common selection (selection.json). (None, why) when neither has one."""
    sel_path, rec_path = run / "selection.json", run / "recalls.jsonl"
    if not sel_path.exists() and not rec_path.exists():
        return None, f"--recall-from {run}: no selection.json or recalls.jsonl (not a sft_recall.py run)"

    def same_type(r):
        return r.get("cluster") == cluster and (subtype is None or r.get("subtype") == subtype)
    texts = []
    if rec_path.exists():
        for ln, raw in enumerate(rec_path.read_text(encoding="utf-8").splitlines(), 1):
            if not raw.strip():
                continue
            try:
                r = json.loads(raw)
            except json.JSONDecodeError as e:
                raise common.DataError(f"{rec_path}:{ln}: invalid JSON ({e.msg})") from None
            if same_type(r) and isinstance(r.get("recalled"), str) and r["recalled"].strip():
                texts.append(r["recalled"].strip())
    if texts:
        counts = Counter(texts)
        text = max(counts, key=lambda t: (counts[t], -texts.index(t)))    # ties: first recalled
        return text, f"recalled {counts[text]} of {len(texts)} times ({rec_path})"
    if sel_path.exists():
        entry = next((e for e in common.load_bank(sel_path, "recall-selection")["entries"] if same_type(e)), None)
        if entry and str(entry.get("lesson", "")).strip():
            return entry["lesson"].strip(), f"selection entry ({sel_path}; nothing recalled for this type)"
    return None, f"--recall-from {run}: no recalled text and no selection entry for {cluster}/{subtype}"


def resolve_lesson(args, questions):
    """(lesson, cluster, subtype, source) from at most one of --lesson, --library, --recall-from;
    with none of them, the type's own known-good `lesson` from --data."""
    given = [f for f in ("lesson", "library", "recall_from") if getattr(args, f) is not None]
    if len(given) > 1:
        raise common.UserError("give at most one of --lesson TEXT, --library PATH, --recall-from RUN "
                               f"(got {', '.join('--' + g.replace('_', '-') for g in given)})")
    if not given:
        if args.cluster is None:
            raise common.UserError("name the type to dream for with --cluster (and --subtype), and give "
                                   "--lesson, --library or --recall-from (default: the type's lesson in --data)")
        of_type = [q for q in questions if q.cluster == args.cluster and (args.subtype is None or q.subtype == args.subtype)]
        own = [q.lesson for q in of_type if q.lesson]
        if not of_type:
            raise common.UserError(f"type {args.cluster}/{args.subtype} is not in {args.data}")
        if not own:
            raise common.UserError(f"no --lesson given and {args.data} has no lesson for "
                                   f"{args.cluster}/{args.subtype}")
        return Counter(own).most_common(1)[0][0], args.cluster, args.subtype, f"the type's lesson in {args.data}"
    if args.entry is not None and args.library is None:
        raise common.UserError("--entry needs --library")
    cluster, subtype = args.cluster, args.subtype
    if args.lesson is not None:
        lesson, source = args.lesson, "--lesson"
    elif args.library is not None:
        if not Path(args.library).exists():
            raise common.UserError(f"--library {args.library}: no such file")
        lib = common.load_bank(args.library, "introspection-library")
        if args.entry is not None:
            e = next((e for e in lib["entries"] if e.get("id") == args.entry), None)
            if e is None:
                raise common.UserError(f"--entry {args.entry}: no such entry in {args.library} "
                                       f"({len(lib['entries'])} entries)")
            cluster, subtype = e.get("cluster"), e.get("subtype")
        else:
            if cluster is None:
                raise common.UserError("--library without --entry needs --cluster (and --subtype) to pick the best entry")
            e = best_library_entry(lib, cluster, subtype)
            if e is None:
                raise common.UserError(f"--library {args.library}: no entry of type {cluster}/{subtype}")
        lesson, source = e.get("text", ""), f"library entry {e.get('id')} ({args.library}), A_intro {common.fmt_ci(e.get('A_intro'))}"
    else:
        if cluster is None:
            raise common.UserError("--recall-from needs --cluster (and --subtype): the type to dream for")
        lesson, source = recalled_lesson(Path(args.recall_from), cluster, subtype)
        if lesson is None:
            raise common.UserError(source)
    if not str(lesson or "").strip():
        raise common.UserError(f"empty lesson (from {source})")
    if cluster is None:
        raise common.UserError("--lesson needs --cluster (and --subtype): the type the lesson is for")
    return str(lesson).strip(), cluster, subtype, source


def check_model_arg(name: str) -> None:
    """A --model folder must be a checkpoint (an HF folder with config.json)."""
    if name in common.EMBEDDED:
        return
    p = Path(name).expanduser()
    if (p.exists() or name.startswith((".", "/", "~"))) and not (p / "config.json").is_file():
        raise common.UserError(f"--model {name}: not a checkpoint folder (no config.json in it)")


# ----------------------------------------------------------------------------
# inputs: split and variations (pure, tested)


def split_type(qs, n_dev: int, n_eval: int, seed: int):
    """(dream, dev, eval): a seeded partition of one type's questions. Evaluation first, then dev,
    the rest are dream inputs; each part is disjoint from the others by construction."""
    order = [qs[i] for i in np.random.default_rng(seed).permutation(len(qs))]
    ev, dev, dream = order[:n_eval], order[n_eval:n_eval + n_dev], order[n_eval + n_dev:]
    return dream, dev, ev


def permute_options(q: common.Question, perm: list[int], suffix: str) -> common.Question:
    """q with its options in a new order: new option i is old option perm[i]; the answer letter
    follows its option. The cue and question text are unchanged (a label-preserving edit)."""
    assert sorted(perm) == list(range(len(q.choices)))
    old = common.LETTERS.index(q.answer)
    return common.Question(**{**q.__dict__, "id": f"{q.id}~{suffix}", "choices": [q.choices[j] for j in perm],
                              "answer": common.LETTERS[perm.index(old)],
                              "meta": {**q.meta, "variation": "permuted", "of": q.id}})


def fresh_instances(cluster: str, subtype: str | None, n: int, seed: int, avoid) -> list[common.Question]:
    """Up to n new questions of the type from data/make_procedural.py at seeds other than the
    data's, none textually equal to a question in `avoid` (so dev and evaluation questions never
    reappear as dream inputs). [] when the type is not a procedural family."""
    path = ROOT / "data" / "make_procedural.py"
    spec = importlib.util.spec_from_file_location("make_procedural", path)
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    if not any(c == cluster and (subtype is None or s == subtype) for c, s, _ in mp.FAMILIES):
        return []

    def key(q):
        return (q.question, tuple(q.choices or ()), q.cue)
    seen, out = {key(q) for q in avoid}, []
    for k in range(1, 50):
        for row in mp.generate(max(16, n), seed=seed * 1000 + k):
            if row["cluster"] != cluster or (subtype is not None and row["subtype"] != subtype):
                continue
            q = common.Question(**{**row, "id": f"{row['id']}~seed{seed * 1000 + k}",
                                   "meta": {**row.get("meta", {}), "variation": "fresh"}})
            if key(q) not in seen:
                seen.add(key(q))
                out.append(q)
            if len(out) >= n:
                return out
    return out


def placebo_lesson(lesson: str, others: list[str]) -> str | None:
    """Another type's lesson of about the same length: the one closest in words, cut to r's word count."""
    others = [o for o in dict.fromkeys(others) if o and o.strip() != lesson.strip()]
    if not others:
        return None
    n = len(lesson.split())
    best = min(others, key=lambda o: (abs(len(o.split()) - n), o))
    return " ".join(best.split()[:n])


# ----------------------------------------------------------------------------
# the target without labels and the reward (pure, tested on hand-made distributions)


answer_of = common.answer_key     # the answer a completion gives (verify()'s extraction rules)


def teacher_distribution(answers: list) -> dict:
    """p_T(a | x'): the share of the teacher's k samples giving answer a. Samples with no
    readable answer count in the denominator but are never a target."""
    k = len(answers)
    c = Counter(a for a in answers if a is not None)
    return {a: n / k for a, n in c.items()} if k else {}


def majority(p_T: dict):
    """(majority answer, its share of the teacher's samples); (None, 0.0) if no sample answered.
    Ties go to the answer that sorts first, so the target never depends on dict order."""
    if not p_T:
        return None, 0.0
    a = min(p_T, key=lambda x: (-p_T[x], str(x)))
    return a, p_T[a]


def rewards(student_answers: list, p_T: dict, kind: str, labels: list | None = None) -> np.ndarray:
    """Reward of each student rollout on x' (no r in its context).
    teacher:  p_T(student's answer), the teacher's empirical probability of it.
    majority: 1 if it equals the teacher's majority answer, else 0 (TTRL).
    verifier: 1 if it equals the true answer (labels) - labelled, an upper bound only.
    A rollout with no readable answer gets 0 under every kind."""
    if kind == "teacher":
        return np.array([p_T.get(a, 0.0) if a is not None else 0.0 for a in student_answers])
    if kind == "majority":
        maj, _ = majority(p_T)
        return np.array([float(a is not None and a == maj) for a in student_answers])
    if kind == "verifier":
        return np.array([float(a is not None and a == y) for a, y in zip(student_answers, labels)])
    raise ValueError(kind)


# ----------------------------------------------------------------------------
# losses (pure, tested on hand-made tensors)


def group_advantages(R: np.ndarray):
    """R (G, N) rewards of N rollouts on each of G inputs -> (A (G, N) = R - mean over the group,
    keep (G,) bool: False for a group with zero variance, which carries no signal)."""
    R = np.asarray(R, float)
    return R - R.mean(axis=1, keepdims=True), R.std(axis=1) > 1e-12


pg_loss = common.pg_loss      # -sum_i A_i sum_t log pi(y_it | x') over every completion token / their number
# --cd-direction in GKD's naming, as common.distill_loss's alpha: forward = KL(teacher || student)
# (mass-covering, what SFT on teacher samples estimates), reverse = KL(student || teacher) (OPCD)
CD_ALPHA = {"forward": 0.0, "reverse": 1.0}


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Off-policy context distillation: -mean log pi(y | x') over the teacher's completion tokens."""
    m = mask.float()
    return -(logprobs * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------
# measurement (pure, tested)


def two_stage_boot(arms: dict, B: int, seed: int) -> dict:
    """arms: name -> (Q, S) array, rows paired across arms (same question, same sample seed).
    Resample questions, then samples within each question, jointly for every arm, so pairing is
    kept. Returns name -> (B,) bootstrap means."""
    Q, S = next(iter(arms.values())).shape
    rng = np.random.default_rng(seed)
    qi = rng.integers(0, Q, (B, Q))                                           # (B, Q)
    si = rng.integers(0, S, (B, Q, S))                                        # (B, Q, S)
    return {k: np.asarray(v, float)[qi[:, :, None], si].mean(axis=(1, 2)) for k, v in arms.items()}


def ci_of(point: float, draws: np.ndarray, n: int, n_clusters: int) -> dict:
    draws = draws[np.isfinite(draws)]
    lo, hi = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if len(draws) else (math.nan, math.nan)
    out = {"mean": float(point), "lo": lo, "hi": hi, "n": n, "n_clusters": n_clusters}
    if hi - lo == 0:
        out["note"] = f"no interval: no variation in {n} values ({n_clusters} clusters)"
    return out


def internalisation(before_x, before_xr, after_x, B: int = 2000, seed: int = 0) -> dict:
    """IR = (acc_after(x) - acc_before(x)) / (acc_before(x + r) - acc_before(x)) with a 95%
    two-stage bootstrap interval. Arrays (Q, S), paired. When the denominator's interval spans 0
    the ratio is meaningless: IR is None and the two parts are what to read."""
    arms = {"bx": before_x, "bxr": before_xr, "ax": after_x}
    Q, S = np.shape(before_x)
    d = two_stage_boot(arms, B, seed)
    m = {k: float(np.mean(v)) for k, v in arms.items()}
    num = ci_of(m["ax"] - m["bx"], d["ax"] - d["bx"], Q * S, Q)
    den = ci_of(m["bxr"] - m["bx"], d["bxr"] - d["bx"], Q * S, Q)
    out = {"numerator": num, "denominator": den, "IR": None}
    if np.isfinite(den["lo"]) and (den["lo"] > 0 or den["hi"] < 0):
        with np.errstate(divide="ignore", invalid="ignore"):
            out["IR"] = ci_of(num["mean"] / den["mean"], (d["ax"] - d["bx"]) / (d["bxr"] - d["bx"]), Q * S, Q)
    return out


def paired_effect(a, b, B: int, seed: int) -> dict:
    """mean(a) - mean(b) for (Q, S) arrays paired row by row, two-stage bootstrap interval."""
    d = two_stage_boot({"a": a, "b": b}, B, seed)
    Q, S = np.shape(a)
    return ci_of(float(np.mean(a) - np.mean(b)), d["a"] - d["b"], Q * S, Q)


def arm_ci(a, B: int, seed: int) -> dict:
    Q, S = np.shape(a)
    return ci_of(float(np.mean(a)), two_stage_boot({"a": a}, B, seed)["a"], Q * S, Q)


def guard_step(guard: dict, step: int, canary: float | None, canary0: dict | None, dev: float,
               rollback: bool, weights) -> str:
    """One guardrail check. guard holds "best" = (dev score, step, weights), the dev-selected
    candidate, and "last_good" = (step, weights), the last whose canary stayed within its starting
    interval (theta0 at step 0). weights() snapshots the current weights, only when they are kept.
    Returns "ok"; "alarm" (canary below its starting interval, no --rollback: the weights still
    compete on dev); or "rollback" (the caller restores guard["last_good"] and stops)."""
    ok = canary is None or canary0 is None or canary >= canary0["lo"]
    if not ok and rollback:
        return "rollback"
    w = None
    if dev > guard["best"][0]:                 # strictly better on dev, else keep the earlier weights
        w = weights()
        guard["best"] = (dev, step, w)
    if ok and rollback:                        # a copy of the weights only where a rollback may need it
        guard["last_good"] = (step, w if w is not None else weights())
    return "ok" if ok else "alarm"


def gate_passes(effect: dict) -> bool:
    """There is something to internalise only if the context effect's interval lies above 0."""
    return bool(np.isfinite(effect["lo"]) and effect["lo"] > 0)


# ----------------------------------------------------------------------------
# sampling helpers


def answer_samples(model, tok, qs, lesson, S, seed, args, progress=None):
    """S samples per question (lesson injected or not; a list gives each question its own); row j of question i draws its random
    numbers from row_seed(seed, i, j), so two calls with the same seed are paired row by row.
    Returns (samples, prompts, answers (Q, S) list, correct (Q, S) array)."""
    lessons = lesson if isinstance(lesson, list) else [lesson] * len(qs)      # one lesson for all, or one each
    prompts = [common.question_prompt(tok, q, lesson=r) for q, r in zip(qs, lessons)]
    seeds = [common.row_seed(seed, i, j) for i in range(len(qs)) for j in range(S)]
    out = common.sample(model, tok, prompts, n=S, max_new_tokens=args.answer_tokens, temperature=args.temperature,
                        stop=ANSWER_STOP, row_seeds=seeds, progress=progress)
    ans = [[answer_of(q, out[i * S + j].text) for j in range(S)] for i, q in enumerate(qs)]
    correct = np.array([[float(common.verify(q, out[i * S + j].text)[0]) for j in range(S)] for i, q in enumerate(qs)])
    return out, prompts, ans, correct


def agreement(answers, targets) -> np.ndarray:
    """(Q, S) 0/1: does each sample's answer equal its question's target (the teacher's majority)?"""
    return np.array([[float(a is not None and a == t) for a in row] for row, t in zip(answers, targets)])


def snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(model, state: dict, rollout=None) -> None:
    """Load state into the trained model, and refresh the rollout copy from it (if there is one)."""
    model.load_state_dict(state)
    if rollout is not None:
        common.sync_rollout(rollout, model)


# ----------------------------------------------------------------------------
# main


def main():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]),
                               data="data/procedural.jsonl")
    p.add_argument("--lesson", default=None, help="the lesson r to dream (default: the type's lesson in --data)")
    p.add_argument("--cluster", default=None, help="the type the lesson is for")
    p.add_argument("--subtype", default=None)
    p.add_argument("--library", default=None, help="a grpo_introspect.py library.json: best entry of the type by A_intro's lower bound")
    p.add_argument("--entry", default=None, help="with --library: this entry id instead of the best")
    p.add_argument("--recall-from", default=None, help="a sft_recall.py run folder: its most frequent recall for the type")
    p.add_argument("--method", choices=["dream", "distill"], default="dream",
                   help="dream: GRPO on the student (the paper); distill: off-policy context distillation (Snell et al.)")
    p.add_argument("--reward", choices=["teacher", "majority", "verifier"], default="teacher",
                   help="teacher: p_T(answer); majority: 1[answer = teacher majority]; verifier: labelled upper bound")
    p.add_argument("--min-agreement", type=common.unit_interval, default=0.0,
                   help="skip dream inputs whose teacher majority holds less than this share of its samples")
    p.add_argument("--dev-questions", type=common.at_least(1), default=4, help="real questions of the type for the gate and checkpoint selection")
    p.add_argument("--eval-questions", type=common.at_least(1), default=8, help="real held-out questions of the type for the measurement")
    p.add_argument("--permutations", type=common.at_least(0), default=1, help="option-permuted copies of each dream question")
    p.add_argument("--fresh", type=common.at_least(0), default=8, help="fresh make_procedural.py instances (procedural families only)")
    p.add_argument("--teacher-samples", type=common.at_least(1), default=4, help="k samples of x' + r from the teacher per dream input")
    p.add_argument("--steps", type=common.at_least(1), default=4)
    p.add_argument("--batch-inputs", type=common.at_least(1), default=2, help="dream inputs x' per step")
    p.add_argument("--N", type=common.at_least(2), default=6, help="student rollouts per x' (GRPO group size)")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--answer-tokens", type=common.at_least(1), default=8, help="longest answer sampled")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=common.positive, default=1e-6)
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--cd-coef", type=common.non_negative, default=0.0, help="weight of the context-distillation KL term (0: off)")
    p.add_argument("--cd-top-k", type=common.at_least(1), default=16, help="teacher top-k ids in that KL (plus a tail bucket)")
    p.add_argument("--cd-direction", choices=["forward", "reverse"], default="reverse",
                   help="forward: KL(teacher||student); reverse: KL(student||teacher)")
    p.add_argument("--kl", type=common.non_negative, default=0.0, help="weight of KL(pre-dream || student) on replay questions (0: off)")
    p.add_argument("--replay-questions", type=common.at_least(0), default=4, help="questions of other types for the KL to pre-dream weights")
    p.add_argument("--canary-questions", type=common.at_least(0), default=6)
    p.add_argument("--canary-samples", type=common.at_least(0), default=3)
    p.add_argument("--canary-every", type=common.at_least(1), default=4, help="canary, dev and KL check every this many steps")
    p.add_argument("--rollback", action="store_true", help="on a canary below its starting interval, restore the last good weights and stop")
    p.add_argument("--gate-samples", type=common.at_least(1), default=8, help="samples per dev question and arm in the gate")
    p.add_argument("--dev-samples", type=common.at_least(1), default=4, help="samples per dev question at each check")
    p.add_argument("--eval-samples", type=common.at_least(1), default=4, help="samples per held-out question and arm")
    p.add_argument("--bootstrap", type=common.at_least(1), default=2000)
    p.add_argument("--force", action="store_true", help="dream even when the gate finds no context effect")
    p.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the placebo lesson and the other method with the same budget")
    args = p.parse_args()

    # ---- every input checked before anything is loaded or written (flag ranges: their argparse types)
    if args.resume:
        raise common.UserError("--resume: dream.py does not resume (a run is short); start again with a new --out")
    check_model_arg(args.model)
    questions = common.load_questions(args.data)
    lesson, cluster, subtype, source = resolve_lesson(args, questions)
    kind = f"{cluster}/{subtype}" if subtype else cluster
    of_type = [q for q in questions if q.cluster == cluster and (subtype is None or q.subtype == subtype)]
    if not of_type:
        types = sorted({f"{q.cluster}/{q.subtype}" if q.subtype else q.cluster for q in questions})
        raise common.UserError(f"type {kind} is not in {args.data} (it has {', '.join(types)})")
    need = args.dev_questions + args.eval_questions + 1
    if len(of_type) < need:
        raise common.UserError(f"{kind} has {len(of_type)} questions in {args.data}: too few to keep dream, dev and "
                               f"evaluation apart (needs {need}: --dev-questions {args.dev_questions} + "
                               f"--eval-questions {args.eval_questions} + at least 1 to dream on)")

    # ---- inputs: the split, the variations, other types for canary / replay, the placebo
    dream_q, dev_q, eval_q = split_type(of_type, args.dev_questions, args.eval_questions,
                                        common.stream_seed(args.seed, "split"))
    rng = random.Random(common.stream_seed(args.seed, "variations"))
    perms = []
    for q in dream_q:
        for v in range(args.permutations if q.choices else 0):
            perm = list(range(len(q.choices)))
            while perm == list(range(len(q.choices))):
                rng.shuffle(perm)
            perms.append(permute_options(q, perm, f"perm{v}"))
    fresh = fresh_instances(cluster, subtype, args.fresh, args.seed + 1, of_type) if args.fresh else []
    X_prime = dream_q + perms + fresh
    own = {cluster}
    others = [q for q in questions if q.cluster not in own
              and not any(c.split("/")[0] in own for c in q.meta.get("components", []))]
    by_type = {}
    for q in others:
        by_type.setdefault((q.cluster, q.subtype), []).append(q)
    pick = random.Random(common.stream_seed(args.seed, "canary-pick"))
    canary_q = [pick.choice(v) for _, v in sorted(by_type.items())][:args.canary_questions]
    replay_q = [q for q in others if q not in canary_q]
    replay_q = pick.sample(replay_q, min(args.replay_questions, len(replay_q)))
    placebo = placebo_lesson(lesson, [q.lesson for q in others if q.lesson])

    out = common.setup_run(args, "dream")
    metrics_path = out / "metrics.jsonl"
    common.atomic_write_json(out / "inputs.json", {
        "lesson": lesson, "cluster": cluster, "subtype": subtype, "source": source, "placebo": placebo,
        "dream": [q.id for q in dream_q], "permuted": [q.id for q in perms], "fresh": [q.id for q in fresh],
        "dev": [q.id for q in dev_q], "eval": [q.id for q in eval_q], "canary": [q.id for q in canary_q],
        "replay": [q.id for q in replay_q]})
    print(f"run folder: {out}\nlesson ({source}): {lesson!r}\ntype {kind}: {len(dream_q)} dream questions "
          f"+ {len(perms)} permuted + {len(fresh)} fresh = {len(X_prime)} x', {len(dev_q)} dev, {len(eval_q)} eval; "
          f"canary {len(canary_q)}, replay {len(replay_q)}")

    model, tok = common.load_model(args.model, args.device, args.dtype, args.activation_checkpointing)
    device = next(model.parameters()).device
    sampler = common.rollout_copy(model, args.rollout_dtype)   # bf16 copy where bf16 is fast, else model itself
    print(f"weights in {next(model.parameters()).dtype}, rollouts in {next(sampler.parameters()).dtype}")
    theta0 = snapshot(model)                       # the pre-dream weights: teacher, reference, start of every arm
    B = args.bootstrap

    # ---- gate: does r change behaviour on dev at all? (paired: same row seeds in both arms)
    gs = common.stream_seed(args.seed, "gate")
    _, _, dev_ans_r, dev_acc_r = answer_samples(sampler, tok, dev_q, lesson, args.gate_samples, gs, args, "gate x+r")
    _, _, dev_ans_x, dev_acc_x = answer_samples(sampler, tok, dev_q, None, args.gate_samples, gs, args, "gate x")
    dev_target = [majority(teacher_distribution(a))[0] for a in dev_ans_r]       # label-free dev target
    effect = paired_effect(dev_acc_r, dev_acc_x, B, common.stream_seed(args.seed, "gate-boot"))
    # where there are no answers, the shift in behaviour: agreement with the x+r majority, with r
    # (each sample left out of its own majority) minus without r
    loo = np.array([[float(a is not None and a == majority(teacher_distribution(row[:j] + row[j + 1:]))[0])
                     for j, a in enumerate(row)] for row in dev_ans_r])
    shift = paired_effect(loo, agreement(dev_ans_x, dev_target), B, common.stream_seed(args.seed, "gate-boot"))
    gate = {"effect": effect, "agreement_shift": shift, "passed": gate_passes(effect), "forced": args.force}
    common.append_jsonl(metrics_path, {"phase": "gate", **gate})
    print(f"gate: acc(x+r) - acc(x) on dev {common.fmt_ci(effect)}; agreement shift {common.fmt_ci(shift)}")
    if not gate["passed"] and not args.force:
        common.atomic_write_text(out / "report.md", f"# Dreaming: {out.name}\n\nGate: no context effect of the lesson on dev "
                                 f"({common.fmt_ci(effect)}): nothing to internalise. `--force` dreams anyway.\n")
        print(f"no context effect on dev ({common.fmt_ci(effect)}): nothing to internalise; stopped (--force dreams anyway)")
        return

    # ---- before: held-out questions with and without r, the canary; row seeds shared with "after"
    es, cs = common.stream_seed(args.seed, "eval"), common.stream_seed(args.seed, "canary")
    _, _, ev_ans_r, ev_acc_r = answer_samples(sampler, tok, eval_q, lesson, args.eval_samples, es, args, "eval x+r before")
    _, _, ev_ans_x, ev_acc_x = answer_samples(sampler, tok, eval_q, None, args.eval_samples, es, args, "eval x before")
    ev_target = [majority(teacher_distribution(a))[0] for a in ev_ans_r]           # the teacher's majority on eval

    def canary():
        if not canary_q or not args.canary_samples:
            return None
        # Each canary question is asked with its OWN type's lesson where it has one: on this base model
        # the other types without a lesson sit near 0 (data/README.md), too low to show forgetting,
        # while using a lesson in context is exactly the skill dreaming could damage.
        return answer_samples(sampler, tok, canary_q, [q.lesson for q in canary_q], args.canary_samples, cs, args,
                              "canary")[3]

    def dev_check():
        ans = answer_samples(sampler, tok, dev_q, None, args.dev_samples, common.stream_seed(args.seed, "dev"), args, "dev")[2]
        return agreement(ans, dev_target)

    # replay: samples of the pre-dream model on other types and its top-k there, for --kl and for
    # logging the KL to the pre-dream weights
    replay = None
    if replay_q:
        rp = [common.question_prompt(tok, q) for q in replay_q]
        rs = common.sample(sampler, tok, rp, n=2, max_new_tokens=args.answer_tokens, temperature=args.temperature,
                           stop=ANSWER_STOP, seed=common.stream_seed(args.seed, "replay"))
        r_ids = [common.encode(tok, rp[s.prompt_idx]) for s in rs]
        r_comp = [s.token_ids for s in rs]
        with torch.no_grad():
            ref = common.token_logprobs(model, r_ids, r_comp, temperature=args.temperature, top_k=args.cd_top_k,
                                        pad_id=tok.pad_token_id)
        replay = (r_ids, r_comp, ref["topk_logprobs"], ref["topk_ids"], ref["mask"])

    def replay_kl():
        """KL(pre-dream || student) per token on the replay samples (forward, over top-k + tail)."""
        r_ids, r_comp, t_lp, t_ids, m = replay
        s = common.token_logprobs(model, r_ids, r_comp, temperature=args.temperature, extra_ids=t_ids,
                                  pad_id=tok.pad_token_id)
        return common.distill_loss(s["extra_logprobs"], t_lp, m, CD_ALPHA["forward"])

    can0 = canary()
    dev0 = dev_check()
    with torch.no_grad():
        kl0 = float(replay_kl()) if replay else None
    can0_ci = arm_ci(can0, B, 0) if can0 is not None else None

    # ---- the teacher's target on every x': k samples of x' + r from the pre-dream model
    teacher_cache = {}

    def teacher_target(r):
        if r not in teacher_cache:
            smp, prompts, ans, acc = answer_samples(sampler, tok, X_prime, r, args.teacher_samples,
                                                    common.stream_seed(args.seed, "teacher", len(teacher_cache)),
                                                    args, "teacher on x'+r")
            teacher_cache[r] = {"samples": smp, "prompts": prompts, "p_T": [teacher_distribution(a) for a in ans],
                                "accuracy": acc}
        return teacher_cache[r]

    # ------------------------------------------------------------------------
    # one arm: dream (GRPO) or distill (SFT on teacher samples) with lesson r, from theta0

    def run_arm(name, method, r):
        restore(model, theta0, sampler)
        T = teacher_target(r)
        maj = [majority(pt) for pt in T["p_T"]]
        # dream needs a readable target; distill learns the teacher's samples whatever they say
        eligible = [i for i, (_, share) in enumerate(maj) if share >= args.min_agreement
                    and (share > 0 or method == "distill")] if args.reward != "verifier" or method == "distill" \
            else list(range(len(X_prime)))
        if not eligible:
            tqdm.write(f"{name}: no dream input has a readable teacher majority of at least {args.min_agreement} "
                       "(--min-agreement): nothing to dream on, weights unchanged")
        sched = random.Random(common.stream_seed(args.seed, "schedule"))
        order = []
        while eligible and len(order) < args.steps * args.batch_inputs:
            order += sched.sample(eligible, len(eligible))
        teacher = None
        if method == "dream" and args.cd_coef > 0:
            teacher = copy.deepcopy(model).eval()          # frozen pre-dream model, for the KL term
            for p_ in teacher.parameters():
                p_.requires_grad_(False)
        params = [p_ for p_ in model.parameters() if p_.requires_grad]
        opt = common.make_optimizer(params, args.optimizer, args.lr)
        policy = common.Policy(model, sampler, tok, params, opt)
        check = {"method": name, "step": 0, "check": True, "canary": can0_ci,
                 "dev_agreement": arm_ci(dev0, B, 0), "kl_replay": kl0, "canary_ok": True}
        common.append_jsonl(metrics_path, check)
        guard = {"best": (float(dev0.mean()), 0, theta0), "last_good": (0, theta0)}
        rolled_back, can_at = None, {0: can0}
        bar = tqdm(range(args.steps if eligible else 0), desc=f"{name} steps")
        for step in bar:
            t0 = time.time()
            xs = order[step * args.batch_inputs:(step + 1) * args.batch_inputs]
            rec = {"method": name, "step": step + 1, "inputs": [X_prime[i].id for i in xs],
                   "teacher_majority_ratio": float(np.mean([maj[i][1] for i in xs]))}
            if method == "dream":
                # ---- N rollouts on each x' WITHOUT r, rewarded by similarity to the teacher
                prompts = [common.question_prompt(tok, X_prime[i]) for i in xs]
                roll = common.sample(sampler, tok, prompts, n=args.N, max_new_tokens=args.answer_tokens,
                                     temperature=args.temperature, stop=ANSWER_STOP,
                                     seed=common.stream_seed(args.seed, "rollout", step), progress="rollouts")
                R, lab, racc = [], [], []
                for g, i in enumerate(xs):
                    q = X_prime[i]
                    ans = [answer_of(q, s.text) for s in roll[g * args.N:(g + 1) * args.N]]
                    labels = [q.answer if q.answer_type == "mcq" else answer_of(q, q.answer) for _ in ans]
                    R.append(rewards(ans, T["p_T"][i], args.reward, labels))
                    lab.append(rewards(ans, {}, "verifier", labels))
                    # TTRL's "reward accuracy": does the label-free majority reward agree with the true one?
                    racc.append(rewards(ans, T["p_T"][i], "majority") == lab[-1])
                R = np.array(R)                                                    # (G, N)
                A, keep = group_advantages(R)
                rec.update(reward_mean=float(R.mean()), reward_std=float(R.std()), skipped_groups=int((~keep).sum()),
                           label_accuracy=common.mean_ci(np.concatenate(lab), binary=True),
                           reward_accuracy=float(np.mean(np.concatenate(racc))))
                # GRPO trains the groups with variance; the distillation term, dense, trains every rollout
                groups = [g for g in range(len(xs)) if keep[g] or teacher is not None]
                rows = [g * args.N + j for g in groups for j in range(args.N)]
                adv = [A[g, j] for g in groups for j in range(args.N)]
                in_pg = torch.tensor([bool(keep[g]) for g in groups for j in range(args.N)], dtype=torch.bool)
                ids = [common.encode(tok, prompts[roll[k].prompt_idx]) for k in rows]
                comp = [roll[k].token_ids for k in rows]
                t_ids = None
                if rows and teacher is not None:
                    t_prompts = [common.encode(tok, common.question_prompt(tok, X_prime[xs[roll[k].prompt_idx]], lesson=r))
                                 for k in rows]
                    with torch.no_grad():
                        t = common.token_logprobs(teacher, t_prompts, comp, temperature=args.temperature,
                                                  top_k=args.cd_top_k, pad_id=tok.pad_token_id)
                    t_lp, t_ids = t["topk_logprobs"], t["topk_ids"]
            else:
                # ---- distill: the teacher's own samples on x' + r, learnt on x' alone (same teacher samples)
                k = args.teacher_samples
                rows = [(i, j) for i in xs for j in range(k)]
                ids = [common.encode(tok, common.question_prompt(tok, X_prime[i])) for i, _ in rows]
                comp = [T["samples"][i * k + j].token_ids for i, j in rows]
                rec.update(teacher_label_accuracy=common.mean_ci(T["accuracy"][xs].ravel(), binary=True))

            loss = None
            if rows:
                lp = common.token_logprobs(model, ids, comp, temperature=args.temperature if method == "dream" else 1.0,
                                           extra_ids=t_ids if method == "dream" else None, pad_id=tok.pad_token_id)
                if method == "dream":
                    pg_mask = lp["mask"] & in_pg.to(device)[:, None]                   # (B, T): kept groups only
                    loss = pg_loss(lp["logprobs"], pg_mask, torch.tensor(adv, dtype=torch.float32, device=device))
                    # how far the rollout policy (a bf16 copy where bf16 is fast) is from the trained one
                    rec["logprob_mismatch"] = common.logprob_mismatch([roll[k].logprobs for k in rows], lp["logprobs"],
                                                                      lp["mask"])
                    rec["pg_loss"] = float(loss.detach())
                    if t_ids is not None:
                        cd = common.distill_loss(lp["extra_logprobs"], t_lp, lp["mask"], CD_ALPHA[args.cd_direction])
                        rec["cd_kl"] = float(cd.detach())
                        loss = loss + args.cd_coef * cd
                else:
                    loss = sft_loss(lp["logprobs"], lp["mask"])
                if args.kl > 0 and replay:
                    kl = replay_kl()
                    rec["kl_loss"] = float(kl.detach())
                    loss = loss + args.kl * kl
                rec["tokens"] = int(lp["mask"].sum())
            rec.update(loss=None if loss is None else float(loss.detach()), grad_norm=None, updated=False)
            if loss is not None and torch.isfinite(loss):
                loss.backward()
                stepped = common.optimizer_step(policy, args.clip)
                rec.update({k: v for k, v in stepped.items() if v is not None}, updated=stepped["skipped"] is None)
            elif loss is not None:
                rec["skipped"] = f"non-finite loss {float(loss)}"
                opt.zero_grad(set_to_none=True)
            rec["step_time"] = time.time() - t0
            rec["peak_memory_mb"] = common.peak_memory_mb(device)
            common.append_jsonl(metrics_path, rec)

            # ---- guardrails: canary, dev (label-free selection), KL to the pre-dream weights
            if (step + 1) % args.canary_every == 0 or step + 1 == args.steps:
                c = canary()
                d = dev_check()
                with torch.no_grad():
                    klr = float(replay_kl()) if replay else None
                c_ci = arm_ci(c, B, 0) if c is not None else None
                can_at[step + 1] = c
                verdict = guard_step(guard, step + 1, None if c is None else float(c.mean()), can0_ci,
                                     float(d.mean()), args.rollback, lambda: snapshot(model))
                check = {"method": name, "step": step + 1, "check": True, "canary": c_ci,
                         "dev_agreement": arm_ci(d, B, 0), "kl_replay": klr, "canary_ok": verdict == "ok"}
                if verdict != "ok":
                    tqdm.write(f"ALARM {name} step {step + 1}: canary {common.fmt_ci(c_ci, False)} below its start "
                               f"{common.fmt_ci(can0_ci, False)}")
                if verdict == "rollback":
                    restore(model, guard["last_good"][1], sampler)
                    rolled_back = {"at": step + 1, "to": guard["last_good"][0]}
                    check["rolled_back_to"] = guard["last_good"][0]
                    common.append_jsonl(metrics_path, check)
                    tqdm.write(f"{name}: rolled back to step {guard['last_good'][0]}, training stopped")
                    break
                common.append_jsonl(metrics_path, check)
            bar.set_postfix(loss="-" if rec["loss"] is None else f"{rec['loss']:.3f}", rew=f"{rec.get('reward_mean', 0):.2f}")
        bar.close()
        # dev-only selection among the checked weights (theta0 included); with --rollback none after an alarm
        best = guard["best"]
        restore(model, best[2], sampler)
        del teacher
        # every arm is measured against the REAL lesson's behaviour (the placebo too: did it move there?)
        _, _, a_ans_x, a_acc_x = answer_samples(sampler, tok, eval_q, None, args.eval_samples, es, args, f"eval x after {name}")
        _, _, _, a_acc_r = answer_samples(sampler, tok, eval_q, lesson, args.eval_samples, es, args, f"eval x+r after {name}")
        can_after = can_at.get(best[1])
        bs = common.stream_seed(args.seed, "eval-boot")
        res = {"method": method, "lesson": r, "selected_step": best[1], "selected_dev_agreement": best[0],
               "rolled_back": rolled_back,
               "teacher_label_accuracy": common.mean_ci(T["accuracy"].ravel(), binary=True),
               "acc_after_x": arm_ci(a_acc_x, B, bs), "acc_after_xr": arm_ci(a_acc_r, B, bs),
               "change_x": paired_effect(a_acc_x, ev_acc_x, B, bs),
               "IR": internalisation(ev_acc_x, ev_acc_r, a_acc_x, B, bs),
               "agreement_after": arm_ci(agreement(a_ans_x, ev_target), B, bs),
               "canary_after": arm_ci(can_after, B, 0) if can_after is not None else None,
               "forgetting": paired_effect(can_after, can0, B, bs) if can_after is not None else None}
        common.append_jsonl(metrics_path, {"phase": "result", "arm": name, **res})
        return res

    # ---- the main arm: its record, then its checkpoint; then the controls with the same budget.
    # report.md is rewritten after every arm, so a run stopped early still reports what it measured.
    before = {"acc_x": arm_ci(ev_acc_x, B, 1), "acc_xr": arm_ci(ev_acc_r, B, 1),
              "agreement_x": arm_ci(agreement(ev_ans_x, ev_target), B, 1), "canary": can0_ci}
    sizes = {"dream": len(dream_q), "permuted": len(perms), "fresh": len(fresh), "dev": len(dev_q),
             "eval": len(eval_q), "canary": len(canary_q)}
    results = {}
    main_name = args.method
    results[main_name] = r0 = run_arm(main_name, args.method, lesson)
    rec_path = out / "dreamt.json"
    bank = common.load_bank(rec_path, "dream-record")
    bank["entries"].append({"lesson": lesson, "cluster": cluster, "subtype": subtype, "source": source,
                            "method": args.method, "reward": args.reward,
                            "reward_is_labelled": args.reward == "verifier", "gate": gate["effect"],
                            "IR": r0["IR"]["IR"], "IR_numerator": r0["IR"]["numerator"],
                            "IR_denominator": r0["IR"]["denominator"], "acc_after_xr": r0["acc_after_xr"],
                            "forgetting": r0["forgetting"], "selected_step": r0["selected_step"],
                            "checkpoint": str(out / "checkpoint")})
    common.save_bank(rec_path, bank)
    write_report(out, args, lesson, source, kind, placebo, gate, before, results, sizes)
    common.save_checkpoint(out, model, tok, step=args.steps, extra={"lesson": lesson, "selected_step": r0["selected_step"]})
    if args.controls:
        if placebo:
            results["placebo"] = run_arm("placebo", args.method, placebo)
            write_report(out, args, lesson, source, kind, placebo, gate, before, results, sizes)
        other = "distill" if args.method == "dream" else "dream"
        results[other] = run_arm(other, other, lesson)
        write_report(out, args, lesson, source, kind, placebo, gate, before, results, sizes)
    print(f"IR ({main_name}): {ir_text(r0['IR'])}\nreport:     {out / 'report.md'}\nrecord:     {rec_path}\n"
          f"checkpoint: {out / 'checkpoint'}")


# ----------------------------------------------------------------------------
# report


def ir_text(ir) -> str:
    if ir["IR"] is not None:
        return common.fmt_ci(ir["IR"])
    return (f"not defined (denominator {common.fmt_ci(ir['denominator'])} spans 0); "
            f"gain without r {common.fmt_ci(ir['numerator'])}")


def write_report(out, args, lesson, source, kind, placebo, gate, before, results, sizes):
    def f(ci, signed=True):
        if ci and ci.get("note") and ci.get("n"):        # shorter than fmt_ci's note, for table cells
            return f"{ci['mean']:{'+' if signed else ''}.2f} (no variation; n={ci['n']})"
        return common.fmt_ci(ci, signed)
    lines = [f"# Dreaming: {out.name}", "",
             f"Lesson r ({source}): {lesson!r}", f"Type: {kind}. Placebo: {placebo!r}", "",
             f"Inputs: {sizes['dream']} dream questions + {sizes['permuted']} option-permuted + {sizes['fresh']} fresh "
             f"instances; {sizes['dev']} dev, {sizes['eval']} held-out evaluation questions ({args.eval_samples} samples "
             f"each), canary {sizes['canary']} questions of other clusters. Reward: {args.reward}"
             + (" (LABELLED: an upper-bound calibration, not test-time dreaming)" if args.reward == "verifier" else "")
             + f". {args.steps} steps x {args.batch_inputs} inputs, N={args.N}, k={args.teacher_samples} teacher samples, "
             f"{args.optimizer} lr {args.lr:g}, cd-coef {args.cd_coef:g}, kl {args.kl:g}.", "",
             f"Gate (dev, acc(x+r) - acc(x)): {f(gate['effect'])}; agreement shift {f(gate['agreement_shift'])}"
             + ("" if gate["passed"] else " -- no effect; dreamt because of --force"), "",
             "Intervals: 95%, two-stage bootstrap (questions, then samples); rows paired across arms.", "",
             "## Before (pre-dream model)", "",
             f"- acc(x): {f(before['acc_x'], False)}", f"- acc(x + r): {f(before['acc_xr'], False)}",
             f"- agreement of x with the teacher's majority on x + r: {f(before['agreement_x'], False)}",
             f"- canary: {f(before['canary'], False)}", "",
             "## After, side by side", "",
             "| arm | lesson | selected step (dev) | acc_after(x) | change in acc(x) | IR | agreement with teacher | acc_after(x + r) | canary | forgetting |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} ({r['method']}) | {r['lesson'][:40]!r} | {r['selected_step']}"
                     f"{' (rolled back)' if r['rolled_back'] else ''} | {f(r['acc_after_x'], False)} | "
                     f"{f(r['change_x'])} | {ir_text(r['IR'])} | {f(r['agreement_after'], False)} | "
                     f"{f(r['acc_after_xr'], False)} | {f(r['canary_after'], False)} | {f(r['forgetting'])} |")
    lines += ["", "## Per step", "",
              "| arm | step | reward mean (std) | skipped groups | teacher majority ratio | label acc | reward acc | loss | grad norm |",
              "|---|---|---|---|---|---|---|---|---|"]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        if "method" in m and "phase" not in m and not m.get("check"):
            rm = f"{m['reward_mean']:.2f} ({m['reward_std']:.2f})" if "reward_mean" in m else "-"
            lines.append(f"| {m['method']} | {m['step']} | {rm} | {m.get('skipped_groups', '-')} | "
                         f"{m['teacher_majority_ratio']:.2f} | {f(m.get('label_accuracy', m.get('teacher_label_accuracy')), False)} | "
                         f"{'-' if 'reward_accuracy' not in m else format(m['reward_accuracy'], '.2f')} | "
                         f"{'-' if m['loss'] is None else format(m['loss'], '.3f')} | "
                         f"{'-' if m['grad_norm'] is None else format(m['grad_norm'], '.2f')} |")
    lines += ["", "Label acc of a distill step is the teacher samples' accuracy; reward acc is how often the "
              "majority reward equals the true reward (TTRL); they diverge when the teacher is wrong.", "",
              "## Checks (canary: other clusters, each with its own lesson; label-free dev agreement, KL to the pre-dream model on replay)", "",
              "| arm | step | canary | dev agreement | KL(pre-dream \\|\\| student) per token | canary ok |", "|---|---|---|---|---|---|"]
    for m in metrics:
        if m.get("check"):
            kl = "-" if m["kl_replay"] is None else f"{m['kl_replay']:.4f}"
            lines.append(f"| {m['method']} | {m['step']} | {f(m['canary'], False)} | {f(m['dev_agreement'], False)} | "
                         f"{kl} | {m['canary_ok']}{' (rolled back)' if 'rolled_back_to' in m else ''} |")
    lines += ["", "IR = (acc_after(x) - acc_before(x)) / (acc_before(x + r) - acc_before(x)), r the real lesson in every "
              "row: the placebo's row says how far dreaming a wrong lesson moves the model towards r's behaviour. Selected step 0 means dev preferred the pre-dream "
              "weights: nothing was internalised that dev could see.", "",
              "Per-step numbers (reward mean and std, skipped groups, teacher majority ratio, label and reward "
              "accuracy, grad norm, KL to the pre-dream model, canary): metrics.jsonl."]
    common.write_report(out, lines)


if __name__ == "__main__":
    common.run_main(main)
