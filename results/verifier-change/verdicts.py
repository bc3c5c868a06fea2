"""Old (ebe8edd) vs new mcq verifier on the same Gemma completions; see README.md here."""
import sys, random, collections
sys.path.insert(0, "."); sys.path.insert(0, "/tmp/oldv")   # common_old.py: git show ebe8edd:common.py
import torch; torch.set_num_threads(1)
import common, common_old
model, tok = common.load_model("gemma")
roll = common.rollout_copy(model)
qs = common.load_questions("data/procedural.jsonl") + common.load_questions("data/obstetrics.jsonl")
by = collections.defaultdict(list)
for q in qs: by[(q.cluster, q.subtype)].append(q)
pick = [q for k, v in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")) for q in v[:4]]
prompts = []
for q in pick:
    prompts += [common.question_prompt(tok, q), common.question_prompt(tok, q, lesson=q.lesson) if q.lesson else common.question_prompt(tok, q)]
owners = [q for q in pick for _ in range(2)]
out = common.sample(roll, tok, prompts, n=8, max_new_tokens=16, temperature=0.7, stop=["\n"], seed=0)
changed = []
for i, s in enumerate(out):
    q = owners[i // 8]
    oq = common_old.Question(**{k: getattr(q, k) for k in q.__dataclass_fields__})
    a, b = common_old.verify(oq, s.text)[0], common.verify(q, s.text)[0]
    if a != b: changed.append((q.id, repr(s.text), a, b))
print(f"completions: {len(out)} ({len(pick)} questions x 2 arms x 8); verdicts changed: {len(changed)}")
for c in changed[:30]: print(c)
