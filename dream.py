"""Test-time adaptation ("dreaming") of the Introspection GRPO paper, section "Test-Time
Adaptation": put a lesson r into the weights, so the model behaves WITHOUT r as it did with r.

  1. The frozen pre-dream model (the teacher) answers each dream input x' with r in context, k
     samples: p_T(a | x'), the desired behaviour. No labels are used.
  2. N student rollouts on x' WITHOUT r, rewarded p_T(answer) (--reward teacher) or 1[answer =
     teacher majority] (--reward majority, TTRL). --reward verifier uses the true answer: the
     labelled positive control, an upper bound, never test-time dreaming.
  3. x' are other questions of the type, option-permuted copies, fresh make_procedural.py instances.
  4. GRPO on the student: advantage r - mean(r) (no std), one on-policy step (ratio 1, no clip),
     token-mean loss with the stop token, no KL unless --kl; zero-variance groups are skipped.
Deviations and additions: dream, dev and evaluation inputs are disjoint by TEXT (common.text_key);
every arm (placebo lesson, off-policy context distillation of Snell et al. 2022, the verifier arm)
has the same inputs, seeds and budget, and is read at the fixed final step (--select dev: each arm
on its OWN teacher's dev majority); a gate stops when r has no effect on dev (--force); a canary
with --rollback; --cd-coef adds the engine's top-k + tail KL to the teacher on x' + r; evaluation
gives paired arm differences, IR on accuracy and on the teacher-forced log-prob (IR_lp).
--resume re-runs an interrupted arm from theta0 (keyed streams: it repeats exactly); finished arms
are kept. Not built: --paraphrase (model-written rewrites of x').

    python dream.py --model gemma --cluster brill-dialect --out runs/dream       # ~13 min, 2 CPUs
    python dream.py --library runs/G/library.json --cluster velt-code --subtype hands
    python dream.py --model gemma --cluster brill-dialect --out runs/dream --resume  # same flags
"""
import argparse
import copy
import importlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import common

ANSWER_STOP = ["\n"]       # one answer line, as grpo_introspect.py scores transfer rollouts
ROOT = Path(__file__).resolve().parent
RESUME_SAME = ("resume", "device", "activation_checkpointing")    # a resumed run computes the same thing
answer_of = common.answer_key     # the answer a completion gives (verify()'s extraction rules)
pg_loss = common.pg_loss          # -sum_i A_i sum_t log pi(y_it | x') / number of completion tokens
# --cd-direction in GKD's naming, as common.distill_loss's alpha: forward = KL(teacher || student)
CD_ALPHA = {"forward": 0.0, "reverse": 1.0}


# ----------------------------------------------------------------------------
# the maths: the label-free target, the reward, the losses (pure, tested on hand-made values)


def teacher_distribution(answers: list) -> dict:
    """p_T(a | x'): the share of the teacher's k samples giving answer a (unreadable ones count in
    the denominator but are never a target)."""
    c = Counter(a for a in answers if a is not None)
    return {a: n / len(answers) for a, n in c.items()} if answers else {}


def majority(p_T: dict):
    """(majority answer, its share); (None, 0.0) if no sample answered. Ties: the answer that sorts first."""
    if not p_T:
        return None, 0.0
    a = min(p_T, key=lambda x: (-p_T[x], str(x)))
    return a, p_T[a]


def rewards(student_answers: list, p_T: dict, kind: str, labels: list | None = None) -> np.ndarray:
    """teacher: p_T(student's answer); majority: 1[= teacher majority] (TTRL); verifier: 1[= true
    answer] (labelled, an upper bound). An unreadable answer gets 0 under every kind."""
    if kind == "teacher":
        return np.array([p_T.get(a, 0.0) if a is not None else 0.0 for a in student_answers])
    if kind == "majority":
        maj, _ = majority(p_T)
        return np.array([float(a is not None and a == maj) for a in student_answers])
    if kind == "verifier":
        return np.array([float(a is not None and a == y) for a, y in zip(student_answers, labels)])
    raise ValueError(kind)


def group_advantages(R: np.ndarray):
    """R (G, N) -> (A (G, N) = R - group mean, keep (G,): False for a zero-variance group)."""
    R = np.asarray(R, float)
    return R - R.mean(axis=1, keepdims=True), R.std(axis=1) > 1e-12


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Off-policy context distillation: -mean log pi(y | x') over the teacher's completion tokens."""
    m = mask.float()
    return -(logprobs * m).sum() / m.sum().clamp_min(1.0)


def agreement(answers, targets) -> np.ndarray:
    """(Q, S) 0/1: does each sample's answer equal its question's target (the teacher's majority)?"""
    return np.array([[float(a is not None and a == t) for a in row] for row, t in zip(answers, targets)])


# ----------------------------------------------------------------------------
# train: one arm, from theta0


def run_arm(run, name: str, method: str, lesson: str, reward: str) -> dict:
    """One arm with the same inputs, seeds and budget as every other: restore theta0 -> teacher
    target -> steps -> canary / rollback -> selection -> evaluate_after()."""
    args, pol = run.args, run.policy
    restore(pol, run.theta0)                                   # every arm starts from the pre-dream weights
    pol.opt = common.make_optimizer(pol.params, args.optimizer, args.lr)
    T = teacher_target(run, lesson)                            # 1. p_T(a | x') from the teacher on x' + lesson
    # the label-free dev target: the arm's OWN teacher's majority (the placebo's for the placebo)
    dev_target = [a for a, _ in teacher_target(run, lesson, "dev")["majority"]]
    frozen = copy.deepcopy(pol.model).requires_grad_(False) if method == "dream" and args.cd_coef > 0 else None
    order = schedule(args, len(run.x_prime))                   # the same x' at each step in every arm
    arm = {"arm": name, "method": method, "lesson": lesson, "reward": reward, "checks": {},
           "rolled_back": None, "dev_target": dev_target}
    c0 = check(run, arm, 0, dev_target)
    guard = {"best": (c0["dev_agreement"], 0, run.theta0), "last_good": (0, run.theta0)}
    last = 0
    for step in tqdm(range(args.steps), desc=f"{name} steps"):
        t0 = time.time()
        xs = order[step * args.batch_inputs:(step + 1) * args.batch_inputs]
        if method == "dream":                                  # 2-4. rollouts without r, reward, GRPO
            rec = dream_step(run, T, xs, step, reward, frozen)
        else:                                                  # Snell et al.: SFT on the teacher's samples
            rec = distill_step(run, T, xs)
        log(run, {"phase": "step", "arm": name, "step": step + 1, **rec, "step_time": time.time() - t0,
                  "peak_memory_mb": common.peak_memory_mb(pol.device)})
        last = step + 1
        if last % args.canary_every and last != args.steps:
            continue
        c = check(run, arm, last, dev_target)
        verdict = guard_step(guard, last, c["canary_mean"], run.canary0,
                             c["dev_agreement"] if args.select == "dev" else None, args.rollback, lambda: snapshot(pol.model))
        if verdict != "ok":
            tqdm.write(f"ALARM {name} step {last}: canary {c['canary_mean']:.2f} below its start's interval")
        if verdict == "rollback":
            restore(pol, guard["last_good"][1])
            arm["rolled_back"] = {"at": last, "to": guard["last_good"][0]}
            last = guard["last_good"][0]
            tqdm.write(f"{name}: rolled back to step {last}, training stopped")
            break
    if args.select == "dev":                                   # the dev-best checked weights (theta0 included)
        restore(pol, guard["best"][2])
        last = guard["best"][1]
    arm["selected_step"] = last
    arm["teacher_label_accuracy"] = float(np.mean(T["accuracy"]))
    del frozen
    return evaluate_after(run, arm)


# ----------------------------------------------------------------------------
# the pieces, in the order main() and run_arm() call them


def check_model_arg(name: str) -> None:
    """A --model folder must be a checkpoint (an HF folder with config.json)."""
    p = Path(name).expanduser()
    if name not in common.EMBEDDED and (p.exists() or name.startswith((".", "/", "~"))) \
            and not (p / "config.json").is_file():
        raise common.UserError(f"--model {name}: not a checkpoint folder (no config.json in it)")


def best_library_entry(library: dict, cluster: str, subtype: str | None):
    """The entry of this type whose A_intro has the highest lower bound (none: -inf), or None."""
    def lo(e):
        x = (e.get("A_intro") or {}).get("lo")
        return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf
    es = [e for e in library["entries"] if e.get("cluster") == cluster and subtype in (None, e.get("subtype"))]
    return max(es, key=lo) if es else None


def recalled_lesson(run: Path, cluster: str, subtype: str | None):
    """(lesson, source) from a sft_recall.py run folder: the most frequent text recalled for this
    type (recalls.jsonl), else its entry in selection.json; (None, why) when neither has one."""
    sel_path, rec_path = run / "selection.json", run / "recalls.jsonl"
    if not sel_path.exists() and not rec_path.exists():
        return None, f"--recall-from {run}: no selection.json or recalls.jsonl (not a sft_recall.py run)"
    same = lambda r: r.get("cluster") == cluster and subtype in (None, r.get("subtype"))   # noqa: E731
    texts = [r["recalled"].strip() for r in common.read_jsonl(rec_path)
             if same(r) and isinstance(r.get("recalled"), str) and r["recalled"].strip()]
    if texts:
        counts = Counter(texts)
        text = max(counts, key=lambda t: (counts[t], -texts.index(t)))    # ties: first recalled
        return text, f"recalled {counts[text]} of {len(texts)} times ({rec_path})"
    entry = next((e for e in common.load_bank(sel_path, "recall-selection")["entries"] if same(e)), None)
    if entry and str(entry.get("lesson", "")).strip():
        return entry["lesson"].strip(), f"selection entry ({sel_path}; nothing recalled for this type)"
    return None, f"--recall-from {run}: no recalled text and no selection entry for {cluster}/{subtype}"


def resolve_lesson(args, questions):
    """(lesson, cluster, subtype, source) from at most one of --lesson, --library, --recall-from;
    with none, the type's own lesson(s) in --data (joined when the type spans sub-types)."""
    given = [f for f in ("lesson", "library", "recall_from") if getattr(args, f) is not None]
    if len(given) > 1:
        raise common.UserError("give at most one of --lesson TEXT, --library PATH, --recall-from RUN "
                               f"(got {', '.join('--' + g.replace('_', '-') for g in given)})")
    if args.entry is not None and args.library is None:
        raise common.UserError("--entry needs --library")
    if args.lesson is not None and not args.lesson.strip():
        raise common.UserError("empty lesson (from --lesson)")
    cluster, subtype, lesson = args.cluster, args.subtype, args.lesson
    if cluster is None and args.entry is None:
        raise common.UserError("the lesson needs --cluster (and --subtype): the type to dream for")
    source = "--lesson"
    if not given:
        of_type = type_questions(args, questions, cluster, subtype)
        lesson = " ".join(dict.fromkeys(q.lesson.strip() for q in of_type if q.lesson))
        source = f"the type's lesson in {args.data}"
    elif args.library is not None:
        if not Path(args.library).exists():
            raise common.UserError(f"--library {args.library}: no such file")
        lib = common.load_bank(args.library, "introspection-library")
        e = (next((e for e in lib["entries"] if e.get("id") == args.entry), None) if args.entry
             else best_library_entry(lib, cluster, subtype))
        if e is None:
            raise common.UserError(f"--entry {args.entry}: no such entry in {args.library} ({len(lib['entries'])} entries)"
                                   if args.entry else f"--library {args.library}: no entry of type {cluster}/{subtype}")
        cluster, subtype = (e.get("cluster"), e.get("subtype")) if args.entry else (cluster, subtype)
        lesson, source = e.get("text", ""), f"library entry {e.get('id')} ({args.library}), A_intro {common.fmt_ci(e.get('A_intro'))}"
    elif args.recall_from is not None:
        lesson, source = recalled_lesson(Path(args.recall_from), cluster, subtype)
        if lesson is None:
            raise common.UserError(source)
    if not str(lesson or "").strip():
        raise common.UserError(f"empty lesson (from {source})")
    return str(lesson).strip(), cluster, subtype, source


def type_questions(args, questions, cluster, subtype) -> list:
    of_type = [q for q in questions if q.cluster == cluster and subtype in (None, q.subtype)]
    if not of_type:
        types = sorted({f"{q.cluster}/{q.subtype}" if q.subtype else q.cluster for q in questions})
        raise common.UserError(f"type {cluster}{'/' + subtype if subtype else ''} is not in {args.data} "
                               f"(it has {', '.join(types)})")
    return of_type


def permute_options(q: common.Question, perm: list[int], suffix: str) -> common.Question:
    """q with option i := old option perm[i]; the answer letter follows its option (same text, cue)."""
    assert sorted(perm) == list(range(len(q.choices)))
    return common.Question(**{**q.__dict__, "id": f"{q.id}~{suffix}", "choices": [q.choices[j] for j in perm],
                              "answer": common.LETTERS[perm.index(common.LETTERS.index(q.answer))],
                              "meta": {**q.meta, "variation": "permuted", "of": q.id}})


def fresh_instances(cluster: str, subtype: str | None, n: int, seed: int, avoid) -> list[common.Question]:
    """Up to n make_procedural.py questions of the type at other seeds whose text (common.text_key)
    is in neither `avoid` nor each other: new prompts, not reshuffled options. [] if not procedural."""
    mp = importlib.import_module("data.make_procedural")
    seen, out = {common.text_key(q) for q in avoid}, []
    for k in range(1, 50):
        for row in mp.generate(max(16, n), seed=seed * 1000 + k):
            q = common.Question(**{**row, "id": f"{row['id']}~seed{seed * 1000 + k}",
                                   "meta": {**row.get("meta", {}), "variation": "fresh"}})
            if q.cluster == cluster and subtype in (None, q.subtype) and common.text_key(q) not in seen:
                seen.add(common.text_key(q))
                out.append(q)
            if len(out) >= n:
                return out
    return out


def placebo_lesson(lesson: str, others: list[str]) -> str | None:
    """Other types' lessons, closest in length first, joined and cut to r's word count."""
    others = sorted((o for o in dict.fromkeys(others) if o and o.strip() != lesson.strip()),
                    key=lambda o: (abs(len(o.split()) - len(lesson.split())), o))
    words = []
    for o in others:
        words += o.split()
        if len(words) >= len(lesson.split()):
            break
    return " ".join(words[:len(lesson.split())]) or None


def split_inputs(args, questions, cluster, subtype, lesson) -> dict:
    """name -> questions: dream, permuted, fresh, dev, eval, canary, replay, and the placebo. One
    question per text (common.text_key): a copy with its options shuffled is the same prompt."""
    kind, of_type = f"{cluster}/{subtype}" if subtype else cluster, type_questions(args, questions, cluster, subtype)
    uniq = list({common.text_key(q): q for q in reversed(of_type)}.values())[::-1]    # first of each text
    need = args.dev_questions + args.eval_questions + 1
    if len(uniq) < need:
        raise common.UserError(f"{kind} has {len(of_type)} questions in {args.data}, {len(uniq)} distinct texts: "
                               f"too few to keep dream, dev and evaluation apart (needs {need}: --dev-questions "
                               f"{args.dev_questions} + --eval-questions {args.eval_questions} + 1 to dream on)")
    order = [uniq[i] for i in np.random.default_rng(common.stream_seed(args.seed, "split")).permutation(len(uniq))]
    s = {"eval": order[:args.eval_questions], "dev": order[args.eval_questions:need - 1], "dream": order[need - 1:]}
    rng = random.Random(common.stream_seed(args.seed, "variations"))
    s["permuted"] = []
    for q in s["dream"]:
        for v in range(args.permutations if q.choices and len(q.choices) > 1 else 0):
            perm = list(range(len(q.choices)))
            while perm == sorted(perm):
                rng.shuffle(perm)
            s["permuted"].append(permute_options(q, perm, f"perm{v}"))
    s["fresh"] = fresh_instances(cluster, subtype, args.fresh, args.seed + 1, uniq) if args.fresh else []
    others = [q for q in questions if q.cluster != cluster
              and not any(c.split("/")[0] == cluster for c in q.meta.get("components", []))]
    pick = random.Random(common.stream_seed(args.seed, "canary-pick"))
    by_type = {}
    for q in others:
        by_type.setdefault((q.cluster, q.subtype or ""), []).append(q)
    s["canary"] = [pick.choice(v) for _, v in sorted(by_type.items())][:args.canary_questions]
    rest = [q for q in others if common.text_key(q) not in {common.text_key(c) for c in s["canary"]}]
    s["replay"] = pick.sample(rest, min(args.replay_questions, len(rest)))
    s["placebo"] = placebo_lesson(lesson, [q.lesson for q in others if q.lesson])
    return s


@dataclass
class Run:
    """What every arm shares: flags, folder, the policy, theta0, the inputs, the measurements so far."""
    args: argparse.Namespace
    out: Path
    policy: common.Policy          # the fp32 model, its rollout copy, tokenizer; optimizer rebuilt per arm
    theta0: dict                   # the pre-dream weights: teacher, reference, start of every arm
    split: dict
    lesson: str                    # the real lesson r
    ev: dict = field(default_factory=dict)          # eval.json: gate, before, arms, contrasts
    teachers: dict = field(default_factory=dict)    # (what, lesson) -> teacher target, computed at theta0
    replay: tuple | None = None
    canary0: dict | None = None
    x_prime: list = field(default_factory=list)     # the dream inputs: dream + permuted + fresh


def load_run(args, out, split, lesson, ev) -> Run:
    model, tok = common.load_model(args.model, args.device, args.dtype, args.activation_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    pol = common.Policy(model, common.rollout_copy(model, args.rollout_dtype), tok, params,
                        common.make_optimizer(params, args.optimizer, args.lr))
    print(f"weights in {next(model.parameters()).dtype}, rollouts in {next(pol.rollout.parameters()).dtype}")
    run = Run(args, out, pol, snapshot(model), split, lesson, ev, x_prime=split["dream"] + split["permuted"] + split["fresh"])
    if split["replay"]:                    # the pre-dream model's samples and top-k on other types
        rp = [common.question_prompt(tok, q) for q in split["replay"]]
        rs = common.sample(pol.rollout, tok, rp, n=2, seed=common.stream_seed(args.seed, "replay"), **sampling(args))
        ids, comp = [common.encode(tok, rp[s.prompt_idx]) for s in rs], [s.token_ids for s in rs]
        with torch.no_grad():
            ref = common.teacher_topk(model, ids, comp, args.cd_top_k, temperature=args.temperature,
                                      pad_id=tok.pad_token_id)
        run.replay = (ids, comp, ref["topk_logprobs"], ref["topk_ids"], ref["mask"])
    return run


def sampling(args) -> dict:
    return {"max_new_tokens": args.answer_tokens, "temperature": args.temperature, "stop": ANSWER_STOP}


def ask(run, qs, lesson, n: int, stream: str) -> common.Scored:
    """n answers to each question with `lesson` (None, one text, or one per question) in context;
    row j of question q draws from (stream, q.id, j): paired across lessons, arms, before / after."""
    lessons = lesson if isinstance(lesson, list) else [lesson] * len(qs)
    prompts = [common.question_prompt(run.policy.tok, q, lesson=r) for q, r in zip(qs, lessons)]
    return common.score(run.policy.rollout, run.policy.tok, qs, prompts, n, run.args.seed, stream, **sampling(run.args))


def boot(run, arms: dict, stat, stream: str) -> dict:
    return common.paired_bootstrap(arms, stat, common.stream_seed(run.args.seed, stream), run.args.bootstrap)


def gate(run) -> dict:
    """Does r change behaviour on dev at all? acc(x + r) - acc(x), paired rows; passes if lo > 0."""
    dev, S = run.split["dev"], run.args.gate_samples
    xr, x = ask(run, dev, run.lesson, S, "gate").rewards, ask(run, dev, None, S, "gate").rewards
    effect = boot(run, {"xr": xr, "x": x}, lambda m: m["xr"] - m["x"], "gate-boot")
    g = {"effect": effect, "passed": bool(np.isfinite(effect["lo"]) and effect["lo"] > 0), "forced": run.args.force}
    log(run, {"phase": "gate", **g})
    print(f"gate: acc(x+r) - acc(x) on dev {common.fmt_ci(effect)}")
    return g


def canary(run):
    """(C, S) accuracy on other types, each asked with its OWN lesson: using a lesson in context is
    the skill dreaming could damage (without one this base model sits near 0 there)."""
    if not run.split["canary"] or not run.args.canary_samples:
        return None
    qs = run.split["canary"]
    return ask(run, qs, [q.lesson for q in qs], run.args.canary_samples, "canary").rewards


def answer_text(q, key) -> str:
    """The completion that gives answer `key` after q's prompt (after the cue: the option's text)."""
    if q.answer_type == "mcq":
        return " " + (q.choices[common.LETTERS.index(key)] if q.cue else key)
    return f" {key:g}" if q.answer_type == "number" else f" {key}"


def target_logprobs(run, qs, targets, lesson) -> list:
    """log p(teacher-majority answer | x [+ lesson]) under the trained weights, teacher-forced; None
    where the teacher gave no readable answer."""
    have = [i for i, t in enumerate(targets) if t is not None]
    out = [None] * len(qs)
    if have:
        prompts = [common.question_prompt(run.policy.tok, qs[i], lesson=lesson) for i in have]
        lp = common.answer_logprob(run.policy.model, run.policy.tok, prompts, [answer_text(qs[i], targets[i]) for i in have])
        for i, v in zip(have, lp):
            out[i] = float(v)
    return out


def teacher_target(run, lesson: str, what: str = "x'") -> dict:
    """k samples of the teacher (theta0) on x' (or dev) with `lesson`; rows paired across lessons."""
    if (what, lesson) not in run.teachers:
        qs = run.x_prime if what == "x'" else run.split["dev"]
        n = run.args.teacher_samples if what == "x'" else run.args.dev_samples
        sc = ask(run, qs, lesson, n, "teacher" if what == "x'" else "dev-teacher")
        p_T = [teacher_distribution(a) for a in sc.answers]
        run.teachers[(what, lesson)] = {"lesson": lesson, "p_T": p_T, "majority": [majority(p) for p in p_T],
                                        "samples": sc.samples, "accuracy": sc.rewards}
    return run.teachers[(what, lesson)]


def schedule(args, n: int) -> list[int]:
    """The x' of every step: shuffled passes over all inputs, one stream for every arm."""
    rng, order = random.Random(common.stream_seed(args.seed, "schedule")), []
    while len(order) < args.steps * args.batch_inputs:
        order += rng.sample(range(n), n)
    return order


def dream_step(run, T, xs, step, reward, frozen) -> dict:
    """N rollouts on each x' WITHOUT r, rewarded by similarity to the teacher; the GRPO update."""
    args, pol, tok, N = run.args, run.policy, run.policy.tok, run.args.N
    X = [run.x_prime[i] for i in xs]
    prompts = [common.question_prompt(tok, q) for q in X]
    seed = common.stream_seed(args.seed, "rollout", step)
    roll = common.sample(pol.rollout, tok, prompts, n=N, seed=seed, progress="rollouts", **sampling(args))
    ans = [[answer_of(q, s.text) for s in roll[g * N:(g + 1) * N]] for g, q in enumerate(X)]
    y = [[q.answer if q.answer_type == "mcq" else answer_of(q, q.answer)] * N for q in X]   # labels: logged only,
    lab = np.array([rewards(a, {}, "verifier", yq) for a, yq in zip(ans, y)])        # unless --reward verifier
    trusted = [reward == "verifier" or T["majority"][i][1] >= args.min_agreement for i in xs]
    R = np.array([rewards(a, T["p_T"][i], reward, yq) * ok for a, yq, i, ok in zip(ans, y, xs, trusted)])
    A, keep = group_advantages(R)                                                 # (G, N), (G,)
    maj = np.array([rewards(a, T["p_T"][i], "majority") for a, i in zip(ans, xs)])
    rec = {"inputs": [q.id for q in X], "rollout_seed": seed, "reward_mean": float(R.mean()),
           "reward_std": float(R.std()), "skipped_groups": int((~keep).sum()), "label_accuracy": float(lab.mean()),
           "reward_accuracy": float((maj == lab).mean()),     # TTRL: does the majority reward equal the true one?
           "teacher_majority_ratio": float(np.mean([T["majority"][i][1] for i in xs]))}
    rows = [g * N + j for g in range(len(X)) if keep[g] or frozen is not None for j in range(N)]
    if not rows:
        return {**rec, "loss": None, "updated": False}
    ids, comp = [common.encode(tok, prompts[k // N]) for k in rows], [roll[k].token_ids for k in rows]
    t = None
    if frozen is not None:                    # the teacher on x' + r at the student's own tokens, top-k
        t_ids = [common.encode(tok, common.question_prompt(tok, X[k // N], lesson=T["lesson"])) for k in rows]
        with torch.no_grad():
            t = common.teacher_topk(frozen, t_ids, comp, args.cd_top_k, temperature=args.temperature,
                                    pad_id=tok.pad_token_id)
    kw = dict(temperature=args.temperature, pad_id=tok.pad_token_id)     # the student: its own ids, and the teacher's
    lp = (common.token_logprobs(pol.model, ids, comp, **kw) if t is None
          else common.logprobs_at(pol.model, ids, comp, t["topk_ids"], **kw))
    in_pg = torch.tensor([bool(keep[k // N]) for k in rows], device=pol.device)
    loss = pg_loss(lp["logprobs"], lp["mask"] & in_pg[:, None],
                   torch.tensor([A[k // N, k % N] for k in rows], dtype=torch.float32, device=pol.device))
    rec.update(pg_loss=float(loss.detach()),
               logprob_mismatch=common.logprob_mismatch([roll[k].logprobs for k in rows], lp["logprobs"], lp["mask"]))
    if t is not None:
        cd = common.distill_loss(lp["extra_logprobs"], t["topk_logprobs"], lp["mask"], CD_ALPHA[args.cd_direction])
        rec["cd_kl"] = float(cd.detach())
        loss = loss + args.cd_coef * cd
    return update(run, loss, rec, lp["mask"])


def distill_step(run, T, xs) -> dict:
    """Off-policy context distillation: the teacher's own samples on x' + r, learnt on x' alone."""
    tok, k = run.policy.tok, run.args.teacher_samples
    rows = [(i, j) for i in xs for j in range(k)]
    ids = [common.encode(tok, common.question_prompt(tok, run.x_prime[i])) for i, _ in rows]
    comp = [T["samples"][i][j].token_ids for i, j in rows]
    lp = common.token_logprobs(run.policy.model, ids, comp, temperature=1.0, pad_id=tok.pad_token_id)
    rec = {"inputs": [run.x_prime[i].id for i in xs], "teacher_label_accuracy": float(T["accuracy"][xs].mean()),
           "teacher_majority_ratio": float(np.mean([T["majority"][i][1] for i in xs]))}
    return update(run, sft_loss(lp["logprobs"], lp["mask"]), rec, lp["mask"])


def update(run, loss, rec, mask) -> dict:
    """(+ --kl on replay) backward, clip, step, measure the realised weight change."""
    if run.args.kl > 0 and run.replay:
        kl = replay_kl(run)
        rec["kl_loss"] = float(kl.detach())
        loss = loss + run.args.kl * kl
    rec.update(tokens=int(mask.sum()), loss=float(loss.detach()), updated=False, grad_norm=None)
    if not torch.isfinite(loss):
        run.policy.opt.zero_grad(set_to_none=True)
        return {**rec, "skipped": f"non-finite loss {float(loss)}"}
    loss.backward()
    stepped = common.optimizer_step(run.policy, run.args.clip)       # no measure: its copy costs 1 GB on Gemma
    return {**rec, **{k: v for k, v in stepped.items() if v is not None}, "updated": stepped["skipped"] is None}


def replay_kl(run):
    """KL(pre-dream || student) per token on the replay samples (forward, top-k + tail)."""
    ids, comp, t_lp, t_ids, m = run.replay
    s = common.logprobs_at(run.policy.model, ids, comp, t_ids, temperature=run.args.temperature,
                              pad_id=run.policy.tok.pad_token_id)
    return common.distill_loss(s["extra_logprobs"], t_lp, m, CD_ALPHA["forward"])


def check(run, arm, step: int, dev_target) -> dict:
    """Canary, dev agreement with the arm's own teacher, ||theta - theta0||, KL to theta0; logged."""
    can = np.array(run.ev["before"]["canary"]) if step == 0 and run.ev["before"]["canary"] else canary(run)
    ans = ask(run, run.split["dev"], None, run.args.dev_samples, "dev").answers
    with torch.no_grad():
        klr = float(replay_kl(run)) if run.replay else None
        # the realised change, measured against the pre-dream weights already held (no per-step copy)
        moved = math.sqrt(sum(float((p.detach().float() - run.theta0[k].float()).square().sum())
                              for k, p in run.policy.model.named_parameters()))
    c = {"phase": "check", "arm": arm["arm"], "step": step, "canary": None if can is None else can.tolist(),
         "canary_mean": None if can is None else float(can.mean()), "dev_agreement": float(agreement(ans, dev_target).mean()),
         "distance_theta0": moved, "kl_replay": klr}
    arm["checks"][step] = c
    log(run, c)
    return c


def guard_step(guard: dict, step: int, canary: float | None, canary0: dict | None, dev: float | None,
               rollback: bool, weights) -> str:
    """One guardrail check. guard: "best" = (dev score, step, weights), "last_good" = (step, weights),
    the last whose canary stayed within its start's interval. weights() snapshots only when kept.
    "ok"; "alarm" (canary low, no --rollback); "rollback" (the caller restores last_good, stops)."""
    lo = (canary0 or {}).get("lo", math.nan)
    ok = canary is None or not math.isfinite(lo) or canary >= lo
    if not ok and rollback:
        return "rollback"
    w = None
    if dev is not None and dev > guard["best"][0]:       # strictly better on dev, else the earlier weights
        w = weights()
        guard["best"] = (dev, step, w)
    if ok and rollback:                                  # a copy only where a rollback may need it
        guard["last_good"] = (step, w if w is not None else weights())
    return "ok" if ok else "alarm"


def snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(policy, state: dict) -> None:
    """Load state into the trained model and refresh the rollout copy from it."""
    policy.model.load_state_dict(state)
    common.sync_rollout(policy.rollout, policy.model)


def log(run, rec: dict) -> None:
    common.append_jsonl(run.out / "metrics.jsonl", rec)


# ----------------------------------------------------------------------------
# evaluation: held-out questions, paired with the pre-dream measurement row by row


def measure_before(run) -> dict:
    """Eval with and without r, the real lesson's teacher majority there, its log-prob, the canary."""
    ev, S = run.split["eval"], run.args.eval_samples
    xr, x = ask(run, ev, run.lesson, S, "eval"), ask(run, ev, None, S, "eval")
    target = [majority(teacher_distribution(a))[0] for a in xr.answers]
    can = canary(run)
    b = {"acc_x": x.rewards.tolist(), "acc_xr": xr.rewards.tolist(), "target": target,
         "agree_x": agreement(x.answers, target).tolist(), "lp_x": target_logprobs(run, ev, target, None),
         "lp_xr": target_logprobs(run, ev, target, run.lesson), "canary": None if can is None else can.tolist()}
    log(run, {"phase": "before", "acc_x": float(x.rewards.mean()), "acc_xr": float(xr.rewards.mean())})
    return b


def evaluate_after(run, arm: dict) -> dict:
    """One arm at its selected weights: acc(x), acc(x + r), agreement with the REAL lesson's teacher
    majority (the placebo too: did it move there?), the target's log-prob, the canary; statistics."""
    ev, S, b = run.split["eval"], run.args.eval_samples, run.ev["before"]
    x, xr = ask(run, ev, None, S, "eval"), ask(run, ev, run.lesson, S, "eval")
    arm["after"] = {"acc_x": x.rewards.tolist(), "acc_xr": xr.rewards.tolist(),
                    "agree_x": agreement(x.answers, b["target"]).tolist(),
                    "lp_x": target_logprobs(run, ev, b["target"], None),
                    "canary": arm["checks"][arm["selected_step"]]["canary"]}
    arm["stats"] = arm_stats(b, arm["after"], lambda arms, stat: boot(run, arms, stat, "eval-boot"))
    log(run, {"phase": "result", "arm": arm["arm"], "selected_step": arm["selected_step"], **arm["stats"]})
    return arm


def arm_stats(b: dict, a: dict, bs) -> dict:
    """Paired statistics of one arm against the pre-dream model; bs(arms, stat) is the bootstrap.
    IR (and IR_lp on the target's log-prob) only where the denominator's interval excludes 0."""
    ratio = lambda m: (m["ax"] - m["bx"]) / (m["bxr"] - m["bx"])            # noqa: E731
    A = lambda k: np.array(a[k], float)                                     # noqa: E731
    B = lambda k: np.array(b[k], float)                                     # noqa: E731
    acc = {"bx": B("acc_x"), "bxr": B("acc_xr"), "ax": A("acc_x")}
    have = [i for i, v in enumerate(b["lp_x"]) if v is not None]
    lp = {k: np.array([src[i] for i in have], float) for k, src in
          (("bx", b["lp_x"]), ("bxr", b["lp_xr"]), ("ax", a["lp_x"]))}
    s = {"acc_after_x": bs({"a": acc["ax"]}, lambda m: m["a"]), "acc_after_xr": bs({"a": A("acc_xr")}, lambda m: m["a"]),
         "change_x": bs(acc, lambda m: m["ax"] - m["bx"]), "lesson_effect": bs(acc, lambda m: m["bxr"] - m["bx"]),
         "agreement_after": bs({"a": A("agree_x")}, lambda m: m["a"]),
         "agreement_change": bs({"a": A("agree_x"), "b": B("agree_x")}, lambda m: m["a"] - m["b"])}
    s["IR"] = bs(acc, ratio) if excludes_zero(s["lesson_effect"]) else None
    if have:
        s["lp_change"] = bs(lp, lambda m: m["ax"] - m["bx"])
        s["lp_lesson_effect"] = bs(lp, lambda m: m["bxr"] - m["bx"])
        s["IR_lp"] = bs(lp, ratio) if excludes_zero(s["lp_lesson_effect"]) else None
    if a["canary"] is not None and b["canary"] is not None:
        s["canary_after"] = bs({"a": A("canary")}, lambda m: m["a"])
        s["forgetting"] = bs({"a": A("canary"), "b": B("canary")}, lambda m: m["a"] - m["b"])
    return s


def excludes_zero(ci) -> bool:
    return bool(ci and np.isfinite(ci["lo"]) and (ci["lo"] > 0 or ci["hi"] < 0))


CONTRASTS = [("dream", "placebo"), ("distill", "placebo"), ("dream", "distill"), ("verifier", "dream")]


def contrasts(run) -> dict:
    """Paired arm differences on the same eval rows: acc(x), agreement, the target's log-prob."""
    arms, out = run.ev["arms"], {}
    for a, b in CONTRASTS:
        if a not in arms or b not in arms or (b == "placebo" and arms[b]["method"] != a):
            continue
        A, B = arms[a]["after"], arms[b]["after"]
        have = [i for i, v in enumerate(A["lp_x"]) if v is not None]
        c = {}
        for k, src, rows in (("acc_x", "acc_x", None), ("agreement", "agree_x", None), ("lp", "lp_x", have)):
            if rows is None or rows:
                pick = lambda S: np.array(S[src] if rows is None else [S[src][i] for i in rows], float)   # noqa: E731
                c[k] = boot(run, {"a": pick(A), "b": pick(B)}, lambda m: m["a"] - m["b"], "contrast-boot")
        out[f"{a} - {b}"] = c
    return out


def record_arm(run, res: dict) -> None:
    """eval.json (atomic) with the arm and the contrasts so far, dreamt.json for the main arm, the report."""
    run.ev["arms"][res["arm"]] = res
    run.ev["contrasts"] = contrasts(run)
    common.atomic_write_json(run.out / "eval.json", run.ev)
    if res["arm"] == run.args.method:
        s = res["stats"]
        common.save_bank(run.out / "dreamt.json", {**common.load_bank(run.out / "dreamt.json", "dream-record"), "entries": [{
            "lesson": run.lesson, "cluster": run.args.cluster, "subtype": run.args.subtype, "source": run.ev["source"],
            "method": res["method"], "reward": res["reward"], "reward_is_labelled": res["reward"] == "verifier",
            "gate": run.ev["gate"]["effect"], "IR": s["IR"], "IR_lp": s.get("IR_lp"), "change_x": s["change_x"],
            "selected_step": res["selected_step"], "checkpoint": str(run.out / "checkpoint")}]})
    write_report(run.out)


# ----------------------------------------------------------------------------
# report: reads the run folder only


def f(ci, signed=True):
    if ci is None:
        return "-"
    if ci.get("note") and ci.get("n"):                  # shorter than fmt_ci's note, for table cells
        return f"{ci['mean']:{'+' if signed else ''}.2f} (no interval; n={ci['n']}, {ci.get('n_clusters')} clusters)"
    return common.fmt_ci(ci, signed)


def write_report(out) -> None:
    out = Path(out)
    cfg, split = json.loads((out / "config.json").read_text()), json.loads((out / "split.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    n = {k: len(v) for k, v in split["ids"].items()}
    sel = ("each arm's checkpoint chosen on dev by agreement with ITS OWN teacher's majority"
           if cfg["select"] == "dev" else f"every arm read at its final step ({cfg['steps']}; no selection)")
    lines = [f"# Dreaming: {out.name}", "", f"Lesson r ({ev['source']}): {ev['lesson']!r}",
             f"Type: {ev['kind']}. Placebo: {ev['placebo']!r}", "",
             f"Inputs, disjoint by text (normalised question + cue): {n['dream']} dream questions + {n['permuted']} "
             f"option-permuted copies + {n['fresh']} fresh instances; {n['dev']} dev, {n['eval']} held-out evaluation "
             f"questions ({cfg['eval_samples']} samples each); canary {n['canary']} questions of other clusters.",
             f"{split['eval_cues_dreamt']} of {n['eval']} evaluation questions ask a fact a dream input also asks (the "
             "same cue in another wording): on those, evaluation is on the same facts in new surface forms, not on new "
             "facts; the others ask facts no dream input asks.", "",
             f"{cfg['steps']} steps x {cfg['batch_inputs']} inputs, N={cfg['N']}, k={cfg['teacher_samples']} teacher "
             f"samples, {cfg['optimizer']} lr {cfg['lr']:g}, cd-coef {cfg['cd_coef']:g}, kl {cfg['kl']:g}; {sel}. "
             "Every arm: the same inputs, schedule and rollout seeds. Intervals: 95% paired bootstrap "
             "(questions, then samples; none under 5 questions).", "",
             f"Gate (dev, acc(x+r) - acc(x)): {f(ev['gate']['effect'])}"
             + ("" if ev["gate"]["passed"] else " -- its interval reaches 0" + ("; dreamt because of --force" if
                                                                               ev["gate"]["forced"] else "")), ""]
    if "before" not in ev:
        return common.write_report(out, lines + ["Gate: nothing to internalise; stopped (`--force` dreams anyway)."])
    st0 = next(iter(ev["arms"].values()))["stats"] if ev["arms"] else {}
    b = ev["before"]
    lines += ["## Before (pre-dream model)", "", f"- acc(x): {np.mean(b['acc_x']):.2f}, acc(x + r): "
              f"{np.mean(b['acc_xr']):.2f}; lesson effect {f(st0.get('lesson_effect'))}",
              f"- log-prob of the teacher's majority answer, x + r minus x: {f(st0.get('lp_lesson_effect'))}",
              f"- agreement of x with that majority: {np.mean(b['agree_x']):.2f}", ""]
    lines += report_arms(ev) + report_steps(common.read_metrics(out))
    common.write_report(out, lines)


def report_arms(ev) -> list:
    rows = [[f"{k} ({a['method']}, {a['reward']}{', LABELLED upper bound' if a['reward'] == 'verifier' else ''})",
             repr(a["lesson"][:32]), f"{a['selected_step']}{' (rolled back)' if a['rolled_back'] else ''}",
             f(s["acc_after_x"], False), f(s["change_x"]), f(s["IR"]) if s["IR"] else "- (lesson effect spans 0)",
             f(s.get("lp_change")), f(s.get("IR_lp")) if s.get("IR_lp") else "- (spans 0)",
             f(s["agreement_change"]), f(s["acc_after_xr"], False), f(s.get("forgetting"))]
            for k, a in ev["arms"].items() for s in [a["stats"]]]
    lines = ["## After, per arm (paired with before)", ""] + common.md_table(
        ["arm", "lesson", "step", "acc_after(x)", "change in acc(x)", "IR", "change in log p(target | x)", "IR_lp",
         "change in agreement", "acc_after(x + r)", "canary change"], rows)
    lines += ["", "IR = change in acc(x) / (acc_before(x + r) - acc_before(x)); IR_lp the same on the log-prob of the "
              "teacher's majority answer (r the REAL lesson in every row).", "", "## Paired differences between arms", ""]
    lines += common.md_table(["contrast", "acc(x)", "agreement with the teacher", "log p(target | x)"],
                             [[k, f(c["acc_x"]), f(c["agreement"]), f(c.get("lp"))] for k, c in ev.get("contrasts", {}).items()])
    v = ev["arms"].get("verifier")
    if v:
        moved = excludes_zero(v["stats"]["change_x"]) and v["stats"]["change_x"]["mean"] > 0
        lines += ["", "Positive control (labelled, an upper bound): " + (
            "the verifier reward moved held-out acc(x)." if moved else "the verifier reward did NOT move held-out "
            "acc(x) at this budget, so the label-free rewards cannot be expected to either.")]
    return lines + [""]


def report_steps(metrics) -> list:
    """Per arm, over its steps: what the update saw (reward, skipped groups, labels) and did."""
    rows = []
    for arm in dict.fromkeys(m["arm"] for m in metrics if m.get("phase") == "step"):
        st = [m for m in metrics if m.get("phase") == "step" and m["arm"] == arm]
        ck = [m for m in metrics if m.get("phase") == "check" and m["arm"] == arm]
        mean = lambda k, p=".2f": "-" if all(m.get(k) is None for m in st) else format(   # noqa: E731
            np.mean([m[k] for m in st if m.get(k) is not None]), p)
        rows.append([arm, len(st), " ".join(f"{m['reward_mean']:.2f}" for m in st if "reward_mean" in m) or "-",
                     sum(m.get("skipped_groups", 0) for m in st), mean("teacher_majority_ratio"),
                     mean("label_accuracy") if "label_accuracy" in st[0] else mean("teacher_label_accuracy"),
                     mean("reward_accuracy"), mean("grad_norm"), " ".join(f"{m['distance_theta0']:.2g}" for m in ck),
                     " ".join("-" if m["canary_mean"] is None else f"{m['canary_mean']:.2f}" for m in ck),
                     " ".join(f"{m['dev_agreement']:.2f}" for m in ck),
                     "-" if ck[-1]["kl_replay"] is None else f"{ck[-1]['kl_replay']:.4f}"])
    return ["## Training, per arm", ""] + common.md_table(
        ["arm", "steps", "reward mean per step", "skipped groups", "teacher majority share", "label acc",
         "reward acc (TTRL)", "grad norm", "||theta - theta0|| per check", "canary per check",
         "dev agreement (own teacher) per check", "KL(pre-dream || student), last"], rows) + [
        "", "Label acc of a distill arm is its teacher samples' accuracy; reward acc: how often the majority reward "
        "equals the true one. Per step and per question: metrics.jsonl, eval.json; the split: split.json."]


# ----------------------------------------------------------------------------
# flags


def build_parser():
    p = common.add_common_args(common.ArgumentParser(description=__doc__.split("\n\n")[0]), data="data/procedural.jsonl")
    c0, c1 = common.at_least(0), common.at_least(1)
    p.add_argument("--lesson", default=None, help="the lesson r to dream (default: the type's lesson(s) in --data)")
    p.add_argument("--cluster", default=None, help="the type the lesson is for")
    p.add_argument("--subtype", default=None)
    p.add_argument("--library", default=None, help="a grpo_introspect.py library.json: the type's best entry by A_intro's lower bound")
    p.add_argument("--entry", default=None, help="with --library: this entry id instead of the best")
    p.add_argument("--recall-from", default=None, help="a sft_recall.py run folder: its most frequent recall for the type")
    p.add_argument("--method", choices=["dream", "distill"], default="dream", help="dream: GRPO (the paper); distill: Snell et al.")
    p.add_argument("--reward", choices=["teacher", "majority", "verifier"], default="teacher",
                   help="teacher: p_T(answer); majority: 1[= teacher majority]; verifier: labelled upper bound")
    p.add_argument("--min-agreement", type=common.unit_interval, default=0.0, help="no update from an x' whose teacher majority holds less")
    p.add_argument("--dev-questions", type=c1, default=5, help="distinct questions of the type for the gate (and --select dev)")
    p.add_argument("--eval-questions", type=c1, default=6, help="distinct held-out questions of the type")
    p.add_argument("--permutations", type=c0, default=2, help="option-permuted copies of each dream question")
    p.add_argument("--fresh", type=c0, default=8, help="at most this many fresh make_procedural.py texts")
    p.add_argument("--teacher-samples", type=c1, default=4, help="k teacher samples of x' + r per dream input")
    p.add_argument("--steps", type=c1, default=6, help="updates per arm (results/dream-calibration: chosen on dev by RULE.md)")
    p.add_argument("--batch-inputs", type=c1, default=2, help="dream inputs x' per step")
    p.add_argument("--N", type=common.at_least(2), default=6, help="student rollouts per x' (GRPO group size)")
    p.add_argument("--temperature", type=common.positive, default=0.7)
    p.add_argument("--answer-tokens", type=c1, default=8, help="longest answer sampled")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=common.positive, default=1e-6)
    p.add_argument("--clip", type=common.positive, default=1.0)
    p.add_argument("--select", choices=["final", "dev"], default="final",
                   help="final: every arm at its last step; dev: each arm on its own teacher's dev majority")
    p.add_argument("--cd-coef", type=common.non_negative, default=0.0, help="weight of the top-k + tail KL to the teacher (0: off)")
    p.add_argument("--cd-top-k", type=c1, default=16, help="teacher top-k ids in that KL (plus a tail bucket)")
    p.add_argument("--cd-direction", choices=["forward", "reverse"], default="reverse",
                   help="forward: KL(teacher||student); reverse: KL(student||teacher)")
    p.add_argument("--kl", type=common.non_negative, default=0.0, help="weight of KL(pre-dream || student) on replay (0: off)")
    p.add_argument("--replay-questions", type=c0, default=4, help="questions of other types for that KL")
    p.add_argument("--canary-questions", type=c0, default=6)
    p.add_argument("--canary-samples", type=c0, default=3)
    p.add_argument("--canary-every", type=c1, default=3, help="canary (and dev) check every this many steps")
    p.add_argument("--rollback", action="store_true", help="canary below its start's interval: restore the last good weights, stop")
    p.add_argument("--gate-samples", type=c1, default=8, help="samples per dev question and arm in the gate")
    p.add_argument("--dev-samples", type=c1, default=4, help="samples per dev question at each check")
    p.add_argument("--eval-samples", type=c1, default=8, help="samples per held-out question and arm")
    p.add_argument("--bootstrap", type=c1, default=2000)
    p.add_argument("--force", action="store_true", help="dream even when the gate finds no context effect")
    p.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                   help="also the placebo lesson and the other method, same budget")
    p.add_argument("--positive-control", action=argparse.BooleanOptionalAction, default=True,
                   help="also GRPO with the labelled verifier reward (an upper bound), same budget")
    return p


def arms(args, lesson: str, placebo) -> list:
    """(name, method, lesson, reward): the main arm, then the controls."""
    other = "distill" if args.method == "dream" else "dream"
    out = [(args.method, args.method, lesson, args.reward)]
    out += [("placebo", args.method, placebo, args.reward)] if args.controls and placebo else []
    out += [(other, other, lesson, args.reward)] if args.controls else []
    return out + ([("verifier", "dream", lesson, "verifier")] if args.positive_control and args.reward != "verifier" else [])


def open_record(args, out, spec, split) -> dict:
    """split.json; eval.json so far (--resume keeps finished parts, metrics.jsonl cut back to them)."""
    ev = json.loads((out / "eval.json").read_text()) if args.resume and (out / "eval.json").exists() else {"arms": {}}
    ev.update(lesson=spec[0], kind=f"{spec[1]}/{spec[2]}" if spec[2] else spec[1], source=spec[3], placebo=split["placebo"])
    common.write_jsonl(out / "metrics.jsonl", [m for m in common.read_metrics(out)
                                               if m.get("arm") in ev["arms"] or m.get("phase") in ("gate", "before") and m["phase"] in ev])
    qs = {k: v for k, v in split.items() if k != "placebo"}
    cues = {common.normalise_text(q.cue or "") for k in ("dream", "permuted", "fresh") for q in qs[k] if q.cue}
    common.atomic_write_json(out / "split.json", {
        "ids": {k: [q.id for q in v] for k, v in qs.items()}, "text": {q.id: common.text_key(q) for v in qs.values() for q in v},
        "eval_cues_dreamt": sum(common.normalise_text(q.cue or "") in cues for q in qs["eval"])})
    return ev


def main():
    args = build_parser().parse_args()
    if args.resume and not (args.out and (Path(args.out) / "config.json").exists()):
        raise common.UserError(f"--resume needs --out pointing at a run folder with config.json (got {args.out})")
    check_model_arg(args.model)
    questions = common.load_questions(args.data)
    spec = resolve_lesson(args, questions)                        # (lesson, cluster, subtype, source)
    split = split_inputs(args, questions, spec[1], spec[2], spec[0])
    out = common.setup_run(args, "dream", may_differ=RESUME_SAME)
    ev = open_record(args, out, spec, split)
    print(f"run folder: {out}\nlesson ({spec[3]}): {spec[0]!r}\n"
          + ", ".join(f"{k} {len(v)}" for k, v in split.items() if k != "placebo"))
    run = load_run(args, out, split, spec[0], ev)
    if "gate" not in ev:
        ev["gate"] = gate(run)
        common.atomic_write_json(out / "eval.json", ev)
    if not ev["gate"]["passed"] and not args.force:
        write_report(out)
        return print(f"no context effect on dev ({common.fmt_ci(ev['gate']['effect'])}): nothing to internalise; "
                     "stopped (--force dreams anyway)")
    if "before" not in ev:
        ev["before"] = measure_before(run)
        common.atomic_write_json(out / "eval.json", ev)
    run.canary0 = boot(run, {"c": np.array(ev["before"]["canary"])}, lambda m: m["c"], "canary-boot") \
        if ev["before"]["canary"] else None
    for name, method, lesson, reward in arms(args, spec[0], split["placebo"]):
        if name in ev["arms"]:
            print(f"{name}: finished before the resume, kept")
            continue
        res = run_arm(run, name, method, lesson, reward)
        if name == args.method:
            common.save_checkpoint(out, run.policy.model, run.policy.tok, step=res["selected_step"],
                                   extra={"lesson": spec[0], "selected_step": res["selected_step"]})
        record_arm(run, res)
    print(f"report: {out / 'report.md'}\nrecord: {out / 'dreamt.json'}\ncheckpoint: {out / 'checkpoint'}")


if __name__ == "__main__":
    common.run_main(main)
