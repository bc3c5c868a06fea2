"""pmd_distill.py: the divergence against a full-vocabulary reference, the EMA teacher, teacher
contexts and inputs, pass@k, the memory's caps / merges / counters / redaction, freeze modes,
held-out questions never reaching memory, one step of each method moving the weights, resume."""
import itertools
import json
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_gemma, save_tiny_model
from safetensors.torch import load_file

import common
import pmd_distill as pmd

# ----------------------------------------------------------------------------
# the divergence


def full_reference(s_log, t_log, alpha):
    """The alpha-mixture written out over the full vocabulary with probabilities."""
    ps, pt = s_log.exp(), t_log.exp()
    if alpha == 0:
        return (pt * (t_log - s_log)).sum(-1)                    # KL(teacher || student)
    if alpha == 1:
        return (ps * (s_log - t_log)).sum(-1)                    # KL(student || teacher)
    m = (1 - alpha) * ps + alpha * pt
    return alpha * (pt * (t_log - m.log())).sum(-1) + (1 - alpha) * (ps * (s_log - m.log())).sum(-1)


def seqs(tok):
    prompts = [common.encode(tok, "Question: 2+2?\nAnswer:"), common.encode(tok, "Hi there")]
    teacher = [common.encode(tok, "Correct solution: 4\nQuestion: 2+2?\nAnswer:"), common.encode(tok, "Feedback. Hi there")]
    comps = [tok(" 4 is it", add_special_tokens=False).input_ids, tok(", you", add_special_tokens=False).input_ids + [1]]
    return prompts, teacher, comps


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_divergence_equals_full_vocabulary_when_k_covers_it(tiny, alpha, tail):
    model, tok = tiny
    teacher = make_tiny_gemma(len(tok), seed=5)
    V, T = model.config.vocab_size, 0.7
    prompts, t_prompts, comps = seqs(tok)
    st = common.student_topk(model, prompts, comps, V, temperature=T, chunk=3, pad_id=tok.pad_token_id)
    with torch.no_grad():
        te = common.logprobs_at(teacher, t_prompts, comps, st["student_topk_ids"], temperature=T,
                                pad_id=tok.pad_token_id)
    ours = pmd.sdpo_loss(st["student_topk_logprobs"], te["extra_logprobs"], st["mask"], alpha, tail)
    ref_terms = []
    for p, tp, c in zip(prompts, t_prompts, comps):
        s_log = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)] / T, -1)
        with torch.no_grad():
            t_log = torch.log_softmax(teacher(input_ids=torch.tensor([tp + c])).logits[0, len(tp) - 1:len(tp) - 1 + len(c)] / T, -1)
        ref_terms.append(full_reference(s_log, t_log, alpha))
    ref = torch.cat(ref_terms).sum() / sum(len(c) for c in comps)
    assert float(ref.detach()) > 1e-3                       # the two models differ: a real divergence
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    g_ours = torch.autograd.grad(ours, model.model.embed_tokens.weight)[0]
    g_ref = torch.autograd.grad(ref, model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-3)


def test_student_top_k_path_leaves_the_other_outputs_unchanged(tiny):
    model, tok = tiny
    prompts, _, comps = seqs(tok)
    with torch.no_grad():
        a = common.token_logprobs(model, prompts, comps, pad_id=tok.pad_token_id)
        b = common.student_topk(model, prompts, comps, 5, pad_id=tok.pad_token_id)
    assert torch.equal(a["logprobs"], b["logprobs"]) and torch.equal(a["mask"], b["mask"])
    # the student's top-5 are its 5 most likely ids, in order
    assert (b["student_topk_logprobs"][:, :, :-1] >= b["student_topk_logprobs"][:, :, 1:])[b["mask"]].all()


def test_tail_bucket_completes_the_distribution():
    logp = torch.log_softmax(torch.randn(3, 50), -1).topk(5, -1).values
    full = common.add_tail(logp)
    assert full.shape == (3, 6)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(3))
    s, t = logp, torch.log_softmax(torch.randn(3, 50), -1)[:, :5]
    assert not torch.allclose(common.topk_divergence(s, t, 0.5, tail=True), common.topk_divergence(s, t, 0.5, tail=False))


def test_divergence_is_zero_when_teacher_equals_student():
    s = torch.log_softmax(torch.randn(4, 20), -1)[:, :7]
    for alpha in (0.0, 0.5, 1.0):
        assert common.topk_divergence(s, s.clone(), alpha).abs().max() < 1e-6


# ----------------------------------------------------------------------------
# the teacher


def test_ema_rate_0_keeps_teacher_frozen_and_rate_1_copies_student(tiny_tok):
    student, teacher = make_tiny_gemma(len(tiny_tok), seed=1), make_tiny_gemma(len(tiny_tok), seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pmd.ema_update(teacher, student, 0.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    pmd.ema_update(teacher, student, 0.05)
    k0 = "model.layers.0.mlp.up_proj.weight"
    want = before[k0] + 0.05 * (student.state_dict()[k0] - before[k0])
    torch.testing.assert_close(teacher.state_dict()[k0], want)
    pmd.ema_update(teacher, student, 1.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())


def mcq(qid, subtype="s", cluster="c", answer="B"):
    return common.Question(id=qid, cluster=cluster, subtype=subtype, question=f"What is {qid}?",
                           choices=["wrong one", "gold word", "other"], answer=answer, answer_type="mcq")


def rollouts_of(q, texts, rewards, fb):
    return [common.Rollout(q, [2], [3], t, float(r), f, []) for t, r, f in zip(texts, rewards, fb)]


def ctx_args(**kw):
    base = dict(G=4, method="sdpo", feedback="none", levels="experience,insight,behavior", memory_tokens=64,
                teacher_format="sdpo")
    return SimpleNamespace(**{**base, **kw})


def test_teacher_sees_first_other_success_never_itself(tiny_tok):
    q = mcq("q1")
    texts, fb = [" B first", " A", " B second", " C"], ["correct: B", "expected B, got A", "correct: B", "expected B, got C"]
    ctx = pmd.teacher_contexts(ctx_args(), tiny_tok, [q], rollouts_of(q, texts, [1, 0, 1, 0], fb), None, {})
    assert "B second" in ctx[0].prompt and "B first" not in ctx[0].prompt     # never itself
    assert all("B first" in c.prompt for c in (ctx[1], ctx[2], ctx[3]))     # the first other success
    assert ctx[1].solution == "group" and not ctx[1].feedback                # --feedback none: no verifier line
    # only one success: that success has no context (no loss); no success at all: nobody has one
    ctx = pmd.teacher_contexts(ctx_args(), tiny_tok, [q], rollouts_of(q, texts, [1, 0, 0, 0], fb), None, {})
    assert ctx[0].prompt is None and all(c.prompt is not None for c in ctx[1:])
    assert all(c.prompt is None for c in pmd.teacher_contexts(ctx_args(), tiny_tok, [q], rollouts_of(q, texts, [0] * 4, fb), None, {}))


def test_pmd_falls_back_on_memory_when_the_group_has_no_success(tiny_tok):
    q = mcq("q1")
    mem = pmd.new_memory()
    pmd.add_experience(mem, q, " gold word", 1.0, "correct: B", epoch=0, step=0)
    rolls = rollouts_of(q, [" A"] * 4, [0] * 4, ["expected B, got A"] * 4)
    rec = {}
    ctx = pmd.teacher_contexts(ctx_args(method="pmd", levels="experience"), tiny_tok, [q], rolls, mem, rec)
    assert all(c.solution == "memory" and "Correct solution:\n\ngold word" in c.prompt for c in ctx)
    assert rec["memory_contexts"] == 4 and rec["group_contexts"] == 0 and rec["no_context"] == 0
    # sdpo on the same rollouts has nothing to show
    assert all(c.prompt is None for c in pmd.teacher_contexts(ctx_args(), tiny_tok, [q], rolls, None, {}))


def test_memory_block_is_capped_in_tokens(tiny_tok):
    q = mcq("q1")
    mem = pmd.new_memory()
    for i in range(6):
        pmd.add_insight(mem, {"cluster": "c", "subtype": "s", "question": f"q{i + 2}", "scope": "subtype",
                              "kind": "strategy", "text": f"insight number {i} " + "word " * 5 + chr(97 + i) * 3,
                              "epoch": 0, "sources": [f"q{i + 2}"]}, 2, 10)
    _, block, used = pmd.retrieve(mem, q, pmd.LEVELS, tiny_tok, cap_tokens=70)
    assert 0 < len(tiny_tok(block, add_special_tokens=False).input_ids) <= 70 and 0 < len(used) < 6


# ----------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize("n, c", [(4, 0), (4, 1), (5, 2), (6, 6), (8, 3)])
def test_pass_at_k_matches_brute_force_enumeration(n, c):
    rows = [1] * c + [0] * (n - c)
    for k in pmd.pass_ks(n):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(rows[i] for i in s) for s in subsets) / len(subsets)
        assert pmd.pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pmd.pass_at_k(n, c, n + 1)


def test_summary_intervals_stay_inside_what_the_figures_can_take():
    """At n=7 questions a t interval over 0/1 pass@n values reached -0.21; pass@n is 0/1 per
    question (Wilson, equal to coverage) and every other figure is cut to its range."""
    per_q = [{"id": str(i), "rewards": r, "no_answer": [False] * 4} for i, r in
             enumerate([[1, 0, 0, 0]] + [[0] * 4] * 6)]
    s = pmd.summarise(per_q, seed=0)
    assert s["pass_at_k"]["4"] == s["coverage"]
    assert (s["coverage"]["lo"], s["coverage"]["hi"]) == pytest.approx(common.wilson(1, 7))   # lo 0.03, not -0.21
    for k in ("1", "2"):
        raw = common.mean_ci([pmd.pass_at_k(4, int(sum(p["rewards"])), int(k)) for p in per_q], binary=False)
        assert raw["lo"] < 0 and s["pass_at_k"][k]["lo"] == 0.0 and s["pass_at_k"][k]["hi"] == raw["hi"]
    assert common.wilson(0, 7)[0] == 0.0 and common.wilson(7, 7)[1] == 1.0


def test_pass_ks_are_powers_of_two_then_n():
    assert pmd.pass_ks(8) == [1, 2, 4, 8] and pmd.pass_ks(6) == [1, 2, 4, 6]


# ----------------------------------------------------------------------------
# memory


def test_experience_caps_and_counts():
    q = mcq("q1")
    mem = pmd.new_memory()
    for step, text in enumerate([" B one", " B two", " B three", " B three"]):
        pmd.add_experience(mem, q, text, 1.0, "correct: B", 0, step, max_success=2, max_failure=1)
    for step, text in enumerate([" A", " C"], 10):
        pmd.add_experience(mem, q, text, 0.0, "expected B, got A", 0, step, max_success=2, max_failure=1)
    ok = [e for e in mem["entries"] if e["reward"] == 1]
    bad = [e for e in mem["entries"] if e["reward"] == 0]
    assert sorted(e["text"] for e in ok) == [" B three", " B two"]         # newest two kept
    assert [e["count"] for e in ok if e["text"] == " B three"] == [2]      # a repeat is counted
    assert [e["text"] for e in bad] == [" C"]                               # the latest failure


def test_gold_answer_of_an_unsolved_question_is_never_stored():
    q = mcq("q1")
    mem = pmd.new_memory()
    pmd.add_experience(mem, q, " wrong one, not Gold Word", 0.0, "expected B, got A", 0, 0)
    e = mem["entries"][0]
    assert "gold word" not in e["text"].lower() and "expected" not in e["feedback"] and "B" not in e["feedback"]
    text, kind, scope = pmd.template_insight(q, None, " wrong one, not gold word")
    assert "gold word" not in text.lower() and kind == "lesson" and scope == "question"
    # once solved, the success itself is stored (that is the evidence)
    pmd.add_experience(mem, q, " gold word", 1.0, "correct: B", 0, 1)
    assert any(e["text"] == " gold word" for e in mem["entries"])


def insight(text, qid="q1", subtype="s", scope="subtype"):
    return {"cluster": "c", "subtype": subtype, "question": qid, "scope": scope, "kind": "strategy",
            "text": text, "epoch": 0, "sources": [qid]}


def test_near_duplicate_insights_merge_with_joined_lineage():
    mem = pmd.new_memory()
    a = pmd.add_insight(mem, insight("In Brill, tesk means fire.", "q1"), 2, 4)
    b = pmd.add_insight(mem, insight("In Brill tesk means fire", "q2"), 2, 4)
    c = pmd.add_insight(mem, insight("Zog weeks have five days.", "q3"), 2, 4)
    assert a == b != c
    e = next(x for x in mem["entries"] if x["id"] == a)
    assert e["helpful"] == 2 and e["sources"] == ["q1", "q2"] and e["merged"] == 1


def test_insight_caps_drop_the_lowest_counters_and_prune_drops_harmful():
    mem = pmd.new_memory()
    ids = [pmd.add_insight(mem, insight(f"lesson {w} alpha", f"q{i}"), 2, 3) for i, w in enumerate("uvw")]
    mem["entries"][0]["harmful"] = 5                       # the worst one
    pmd.add_insight(mem, insight("a quite different lesson entirely", "q9"), 2, 3)
    kept = [e["id"] for e in mem["entries"]]
    assert len(kept) == 3 and ids[0] not in kept
    mem["entries"][0]["harmful"] = 3                       # helpful 1, harmful 3: margin 2
    assert pmd.prune(mem, margin=2) == 1 and len(mem["entries"]) == 2
    assert pmd.level_sizes(mem) == {"experience": 0, "insight": 2, "behavior": 0}


def test_held_out_sources_are_refused():
    mem = pmd.new_memory()
    pmd.add_experience(mem, mcq("test-1"), " B", 1.0, "correct: B", 0, 0)
    with pytest.raises(RuntimeError, match="held-out"):
        pmd.check_no_heldout(mem, {"train-1"})


# ----------------------------------------------------------------------------
# the split


def test_split_is_by_id_stratified_and_disjoint():
    qs = [mcq(f"{s}{i}", subtype=s) for s in "xyz" for i in range(6)]
    a = pmd.split_questions(qs, 1, 2, seed=0)
    b = pmd.split_questions(list(reversed(qs)), 1, 2, seed=0)
    assert {k: sorted(q.id for q in v) for k, v in a.items()} == {k: sorted(q.id for q in v) for k, v in b.items()}
    ids = [[q.id for q in a[k]] for k in ("train", "dev", "test")]
    assert len(set(sum(ids, []))) == 18
    for s in "xyz":
        assert [sum(q.subtype == s for q in a[k]) for k in ("train", "dev", "test")] == [3, 1, 2]


# ----------------------------------------------------------------------------
# runs on the tiny model (in-process; short prompts; a deterministic stand-in verifier)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("pmd")
    save_tiny_model(d / "model", tiny_tok)
    rows = [{"id": f"{c}{s}{i}", "cluster": c, "subtype": s, "question": f"{c}{s}{i}?", "choices": ["x", "y"],
             "answer": "B", "answer_type": "mcq"} for c in "kf" for s in "st" for i in range(4)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def fake_verify(q, text):
    """Half the completions pass, decided by their text: groups have mixed rewards."""
    if zlib.crc32((q.id + text).encode()) % 2:
        return 1.0, f"correct: {text[:5]}"
    return 0.0, f"expected {q.answer}, got {text[:5]!r}"


def run(files, out, monkeypatch, *extra, verify=fake_verify):
    monkeypatch.setattr(common, "FORMAT_EXAMPLES", "")     # short prompts keep the tiny runs fast
    monkeypatch.setattr(common, "verify", verify)
    argv = ["pmd_distill.py", "--model", str(files / "model"), "--data", str(files / "q.jsonl"), "--out", str(out),
            "--G", "4", "--B", "2", "--max-new-tokens", "3", "--eval-samples", "1", "--dev-samples", "1", "--permutations", "2",
            "--test-per-type", "1", "--train-per-type", "1", "--epochs", "1", "--top-k", "8", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    pmd.main()


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_pmd_memory_holds_training_questions_only(files, tmp_path, monkeypatch):
    out = tmp_path / "pmd"
    run(files, out, monkeypatch, "--method", "pmd", "--epochs", "2", "--train-per-type", "2", "--B", "4")
    split = json.loads((out / "split.json").read_text())
    mem = common.load_bank(out / "memory.json", pmd.MEMORY_KIND)
    assert pmd.level_sizes(mem)["experience"] > 0
    assert any(e["level"] == "insight" for e in mem["entries"]) or mem["log"][0]["candidates"] > 0
    text = (out / "memory.json").read_text()
    for qid in split["test"] + split["dev"]:
        assert f'"{qid}"' not in text
    for e in mem["entries"]:
        assert set(e["sources"]) <= set(split["train"])
    assert (out / "memory.epoch1.json").exists() and (out / "memory.epoch2.json").exists()


def test_freeze_policy_keeps_weights_and_freeze_memory_stops_after_epoch_0(files, tmp_path, monkeypatch):
    out = tmp_path / "fp"
    run(files, out, monkeypatch, "--method", "pmd", "--freeze", "policy", "--epochs", "2")
    before, after = weights(files / "model"), weights(out / "checkpoint")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pmd.level_sizes(common.load_bank(out / "memory.json", pmd.MEMORY_KIND))["experience"] > 0
    out = tmp_path / "fm"
    run(files, out, monkeypatch, "--method", "pmd", "--freeze", "memory", "--epochs", "2")
    e1 = common.load_bank(out / "memory.epoch1.json", pmd.MEMORY_KIND)["entries"]
    e2 = common.load_bank(out / "memory.json", pmd.MEMORY_KIND)["entries"]
    assert e1 and e1 == e2
    out = tmp_path / "lv"
    run(files, out, monkeypatch, "--method", "pmd", "--levels", "experience", "--epochs", "2")
    assert pmd.level_sizes(common.load_bank(out / "memory.json", pmd.MEMORY_KIND))["insight"] == 0


def test_crash_mid_epoch_leaves_memory_readable_and_resume_continues(files, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    calls = {"n": 0}
    real = pmd.ema_update

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*a, **k)

    monkeypatch.setattr(pmd, "ema_update", crash_on_third)
    # 4 training questions, B=1: 4 steps per epoch; checkpoints every step; the crash is in step 2
    with pytest.raises(KeyboardInterrupt):
        run(files, out, monkeypatch, "--method", "pmd", "--B", "1", "--save-every", "1")
    mem = common.load_bank(out / "memory.json", pmd.MEMORY_KIND)     # readable after the crash
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(pmd, "ema_update", real)
    run(files, out, monkeypatch, "--method", "pmd", "--B", "1", "--save-every", "1", "--resume")
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]
    assert len(common.load_bank(out / "memory.json", pmd.MEMORY_KIND)["entries"]) >= len(mem["entries"])


# ----------------------------------------------------------------------------
# bad input: one line, exit 2, existing files untouched


def no_model(*a, **k):
    raise AssertionError("loaded a model before refusing bad input")


def main_exit(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["pmd_distill.py", *argv])
    with pytest.raises(SystemExit) as e:
        common.run_main(pmd.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_foreign_memory_file_is_refused_and_left_untouched(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", no_model)
    out = tmp_path / "run"
    out.mkdir()
    foreign = json.dumps({"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library", "entries": []})
    (out / "memory.json").write_text(foreign)
    err = main_exit(monkeypatch, capsys, ["--data", str(files / "q.jsonl"), "--out", str(out), "--resume"])
    assert "introspection-library" in err and (out / "memory.json").read_text() == foreign
    assert sorted(p.name for p in out.iterdir()) == ["memory.json"]
    (out / "memory.json").write_text(foreign.replace('"version": 1', '"version": 7').replace("introspection-library", pmd.MEMORY_KIND))
    assert "version 7" in main_exit(monkeypatch, capsys, ["--data", str(files / "q.jsonl"), "--out", str(out)])


def test_data_with_no_split_possible(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "load_model", no_model)
    # sample.jsonl: types of 3, 2 and 2 questions; 2 test + 1 dev + 1 train needs 4
    err = main_exit(monkeypatch, capsys, ["--data", str(Path(common.__file__).parent / "data" / "sample.jsonl"),
                                          "--out", str(tmp_path / "r"), "--test-per-type", "2"])
    assert "no train/held-out split possible" in err and not (tmp_path / "r").exists()


def test_compare_one_step_of_each_method_changes_the_weights_and_shares_one_base(files, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    run(files, out, monkeypatch, "--compare", "--lr", "1e-3", "--train-per-type", "2", "--B", "4")
    report = (out / "report.md").read_text()
    for name in ("| base |", "| grpo |", "| sdpo |", "| pmd |", "| pmd - sdpo |", "| sdpo - grpo |"):
        assert name in report
    before = weights(files / "model")
    evs = []
    for method in pmd.METHODS:
        m = [json.loads(ln) for ln in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert len(m) == 2 and m[0]["active_tokens"] > 0 and m[0]["grad_norm"] > 0, method
        after = weights(out / method / "checkpoint")
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{method}: no weight moved"
        assert (out / method / "report.md").read_text().startswith(f"# {method}")
        evs.append(json.loads((out / method / "eval.json").read_text()))
    assert evs[0]["base"] == evs[1]["base"] == evs[2]["base"]          # one base, paired rows
    assert all(e["summary"]["final"]["n_questions"] == 4 and "pass_at_k" in e["summary"]["final"] for e in evs)
    # --resume of the finished comparison keeps every sample and re-derives the summaries from them
    for method in pmd.METHODS:
        ev = json.loads((out / method / "eval.json").read_text())
        ev["summary"]["final"] = {"stale": True}
        (out / method / "eval.json").write_text(json.dumps(ev))
    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a finished run loaded a model"))
    run(files, out, monkeypatch, "--compare", "--lr", "1e-3", "--train-per-type", "2", "--B", "4", "--resume")
    assert [json.loads((out / m / "eval.json").read_text()) for m in pmd.METHODS] == evs
    assert (out / "report.md").read_text() == report


def test_bf16_rollout_copy_is_synced_after_every_update(files, tmp_path, monkeypatch, bf16_rollouts):
    """--rollout-dtype bfloat16: rollouts, reflections and evaluations all come from the bf16 copy,
    equal at that moment to the trained weights (the lr is large enough to move bf16 weights)."""
    out = tmp_path / "bf"
    run(files, out, monkeypatch, "--method", "pmd", "--lr", "1e-2", "--rollout-dtype", "bfloat16")
    assert bf16_rollouts and all(c["bf16"] and c["synced"] for c in bf16_rollouts)
    assert len({c["weights"] for c in bf16_rollouts}) > 1, "the weights never moved between samples"
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    upd = [m for m in steps if m.get("grad_norm") is not None]
    assert upd and all(m["rollout_sync_s"] > 0 and m["logprob_mismatch"]["n"] > 0 for m in upd)
    assert all(m["logprob_mismatch"]["max"] < 1.0 for m in upd)
