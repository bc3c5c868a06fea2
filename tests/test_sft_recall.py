"""sft_recall.py: selection, the text-disjoint split, the masks and the loss (against a full-logit
reference), the recall ban, the arms, the statistics and the report, a full tiny run, resume, bad
inputs, and the grpo_introspect -> sft_recall chain on a real Phase 1 lesson."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ScriptedLM, make_char_tokenizer, make_tiny_gemma, save_tiny_model

import common
import sft_recall as s

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny-model matmuls are far faster on one thread when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ci(mean, lo, hi, n=8):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def Q(id, cluster="k", question="?", cue=None, choices=("x", "y", "z"), answer="B", subtype="s", **kw):
    return common.Question(id=id, cluster=cluster, subtype=subtype, question=question, answer=answer, answer_type="mcq",
                           choices=list(choices), cue=cue, **kw)


# ----------------------------------------------------------------------------
# selection and the split (pure)


def test_selection_picks_highest_lower_bound_not_highest_mean():
    cands = {"k/s": [{"lesson": "noisy", "A": ci(0.70, -0.10, 1.0, 4), "source": "library"},
                     {"lesson": "solid", "A": ci(0.40, 0.15, 0.65, 32), "source": "library"}],
             "f/s": [{"lesson": "nothing", "A": ci(0.30, -0.05, 0.65), "source": "data"}], "g": []}
    sel = s.select_lessons(cands, "lower")
    assert sel["k/s"]["lesson"] == "solid" and sel["k/s"]["beneficial"]
    assert sel["f/s"]["lesson"] == "nothing" and not sel["f/s"]["beneficial"]
    assert sel["g"] is None
    relaxed = s.select_lessons(cands, "mean")
    assert relaxed["k/s"]["lesson"] == "noisy" and relaxed["f/s"]["beneficial"]


def test_split_is_text_disjoint_one_heldout_id_per_text_and_deterministic():
    """Ids with the same (question, cue) text (option order permuted) land in one split; held-out
    keeps one of them. Before the fix the split was by id: the same text in train and held-out."""
    qs = [Q(f"{c}-{i:02d}-{v}", cluster=c, question=f"{c} question {i}?", choices=("x", "y", "z")[v:] + ("x", "y", "z")[:v])
          for c in ("a", "b") for i in range(8) for v in range(3)]
    qs += [Q(f"m-{i}", cluster="m", subtype="a+b", question=f"m {i}?", meta={"components": ["a/s", "b/s"]}) for i in range(3)]
    sp = s.split_questions(qs, 0.25, 0.2, seed=0)
    assert sp == s.split_questions(list(reversed(qs)), 0.25, 0.2, seed=0)
    key = {q.id: common.text_key(q) for q in qs}
    texts = {n: {key[i] for i in ids} for n, ids in sp.items()}
    for x in texts:
        for y in texts:
            assert x == y or not texts[x] & texts[y], (x, y)
    assert len(sp["heldout"]) == len(texts["heldout"]) == 4                  # 2 texts per type, one id each
    assert len(sp["dev"]) == 2 * 3 and len(sp["train"]) == 2 * 5 * 3          # every id of their texts
    assert sorted(sp["composed"]) == ["m-0", "m-1", "m-2"]
    assert sp != s.split_questions(qs, 0.25, 0.2, seed=1)


def test_fresh_instances_whose_text_is_a_data_question_are_dropped(tmp_path):
    """The review: 18 of 20 fresh instances repeated a data question's text."""
    data = common.load_questions(ROOT / "data" / "procedural.jsonl")
    fresh = s.fresh_questions(SimpleNamespace(fresh=2, fresh_seed=1), data, tmp_path)
    written = common.load_questions(tmp_path / "fresh.jsonl")
    seen = {common.text_key(q) for q in data}
    assert any(common.text_key(q) in seen for q in written)                  # the generator repeats texts
    assert not any(common.text_key(q) in seen for q in fresh)


def test_spread_keeps_distinct_texts_round_robin_and_skips():
    qs = [Q(f"{c}{i}", cluster=c, question=f"{c}{i % 2}?") for c in "xy" for i in range(4)]
    got = s.spread(qs, 3)
    assert [q.id for q in got] == ["x0", "y0", "x1"]
    assert [q.id for q in s.spread(qs, 9, skip={common.text_key(qs[0])})] == ["x1", "y0", "y1"]


# ----------------------------------------------------------------------------
# rows, masks, the loss

HEAD = "Question: k?\nAnswer:"


def test_roles_decision_on_recall_rows_only_recall_block_and_eos(tiny_tok):
    block = s.recall_block(HEAD, "k means y.")
    comp = block + " so" + " y."
    ex = s.build_example(tiny_tok, HEAD, comp, len(block), tiny_tok.eos_token_id, train_answer=False, max_len=999)
    ids, roles = ex["completion_ids"], ex["roles"]
    assert tiny_tok.decode(ids[:-1]) == comp and ids[-1] == tiny_tok.eos_token_id
    assert roles[0] == "d" and roles[-1] == "e"
    assert tiny_tok.decode([t for t, r in zip(ids, roles) if r in "dr"]) == " <recall> k means y. </recall>"
    assert set(roles[len(block):-1]) == {"-"}
    assert set(s.build_example(tiny_tok, HEAD, comp, len(block), 1, True, 999)["roles"][len(block):-1]) == {"a"}
    # a plain row trains no "decision" token of its own (before: the answer's first token, " In"/" B")
    assert s.build_example(tiny_tok, HEAD, " y.", 0, tiny_tok.eos_token_id, False, 999)["roles"] == "---e"


def test_gemma_ids_pad_0_eos_1_the_eos_is_appended_and_trained(tiny_tok):
    """Pad 0, EOS 1 as in Gemma: the EOS is appended by position and trained, and token_logprobs'
    mask (which knows nothing of ids) covers it; the pad id inside a completion is an ordinary token."""
    tok = make_char_tokenizer()
    tok.pad_token = "<pad>"
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    block = s.recall_block(HEAD, "k means y.")
    ex = s.build_example(tok, HEAD, block + " y.", len(block), tok.eos_token_id, False, 999)
    assert ex["completion_ids"][-1] == 1 and ex["roles"][-1] == "e"
    comp = ex["completion_ids"][:-1] + [0, 1]                                # a pad id mid-completion
    lp = common.token_logprobs(make_tiny_gemma(len(tok)), [ex["prompt_ids"]], [comp], pad_id=0)
    assert lp["mask"].all() and torch.isfinite(lp["logprobs"]).all()


class StraddleTok:
    """Greedy longest match over pieces that straddle the tag edges, with offsets, as Gemma's
    tokenizer merges punctuation with tags ("recall> In", ">.")."""
    bos_token, pad_token_id, eos_token_id = None, 0, 1
    PIECES = ["<pad>", "<eos>", "Answer:", " <", "recall", ">", "> In", ">.", " </", " k", " means", " y", ".", " Brill",
              " so", "Q", "?", "\n", " "]

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offs, i = [], [], 0
        while i < len(text):
            j = max((k for k, p in enumerate(self.PIECES) if text.startswith(p, i)), key=lambda k: len(self.PIECES[k]))
            ids.append(j)
            offs.append((i, i + len(self.PIECES[j])))
            i += len(self.PIECES[j])
        return {"input_ids": ids, "offset_mapping": offs} if return_offsets_mapping else SimpleNamespace(input_ids=ids)


def test_tokens_straddling_the_closing_tag_are_trained_the_cue_after_them_not():
    tok = StraddleTok()
    block = " <recall> k means y. </recall>"
    ex = s.build_example(tok, "Answer:", block[:-1] + "> In Brill", len(block), 1, False, 99)
    pieces = [tok.PIECES[i] for i in ex["completion_ids"]]
    assert pieces == [" <", "recall", ">", " k", " means", " y", ".", " </", "recall", "> In", " Brill", "<eos>"]
    assert ex["roles"] == "drrrrrrrrr-e"                                    # "> In" closes the tag: trained
    ex = s.build_example(tok, "Answer:", block[:-1] + ">.", len(block), 1, False, 99)
    assert [tok.PIECES[i] for i in ex["completion_ids"]][-2:] == [">.", "<eos>"] and ex["roles"][-2:] == "re"


def test_prompt_that_is_not_a_prefix_is_refused():
    class MergingTok(StraddleTok):
        PIECES = StraddleTok.PIECES + ["Answer: <"]
    with pytest.raises(ValueError, match="not a prefix"):
        s.build_example(MergingTok(), "Answer:", " <recall> k </recall>", 20, 1, False, 99)


def test_row_with_no_trained_token_after_truncation_is_an_error(tiny_tok):
    n_head = len(common.encode(tiny_tok, HEAD))
    with pytest.raises(ValueError, match="no trained token"):
        s.build_example(tiny_tok, HEAD, " <recall> x </recall>", 20, tiny_tok.eos_token_id, False, max_len=n_head)
    assert s.build_example(tiny_tok, HEAD, " <recall> x </recall>", 20, 1, False, n_head + 3)["roles"] == "drr"


def test_decision_loss_pushes_the_opening_up_on_recall_rows_and_down_on_plain_rows():
    lp = torch.log(torch.tensor([0.2, 0.2]))
    nll = s.decision_nll(lp, torch.tensor([True, False]))
    assert torch.allclose(nll, torch.tensor([-np.log(0.2), -np.log(0.8)], dtype=torch.float))
    x = lp.clone().requires_grad_(True)
    s.decision_nll(x, torch.tensor([True, False])).sum().backward()
    assert x.grad[0] < 0 < x.grad[1]                        # descent raises p(open) on 0, lowers it on 1
    assert torch.isfinite(s.decision_nll(torch.tensor([0.0]), torch.tensor([False]))).all()   # p = 1: clamped


def test_gradient_only_on_trained_tokens_against_a_full_logit_reference(tiny):
    """Through the real pieces (rows, batch_logprobs, role_mask, sft_loss, backward into the weights):
    the gradient equals that of a loss rebuilt from the full logits: NLL of the recall block and EOS,
    -log p(open) on the recall row, -log(1 - p(open)) on the plain row, over (tokens + rows). It
    differs from one that also trains the answer (a one-token shift of the roles would fail here)."""
    model, tok = tiny
    args = SimpleNamespace(train_answer=False, max_len=999)
    q = Q("k1", question="k?", cue="so")
    rows = [s.make_example(tok, q, "k means y.", " y.", args), s.make_example(tok, Q("k2", question="k?"), None, "B", args)]
    rows[0]["kind"], rows[1]["kind"] = "recall", "plain"
    assert rows[1]["completion_ids"][0] != rows[1]["open_id"]               # p(open) is not the answer's first token
    block = len(s.recall_block(rows[0]["prompt"], "k means y."))              # one character, one token
    ref_mask = [[0] + [1] * (block - 1) + [0] * (len(rows[0]["completion_ids"]) - block - 1) + [1],
                [0] * (len(rows[1]["completion_ids"]) - 1) + [1]]          # from the text alone, not the roles

    def grads(loss):
        model.zero_grad()
        loss.backward()
        out = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        return out
    lp, lp_open = s.batch_logprobs(model, tok, rows)
    mask = s.role_mask(rows, "re", lp.shape[1])
    ours = grads(s.sft_loss(lp, mask, lp_open, torch.tensor([True, False])))

    def reference(trained="re"):
        total, n = 0.0, 0
        for e, up in zip(rows, (True, False)):
            P, C = e["prompt_ids"], e["completion_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([P + C])).logits[0].float(), -1)
            tok_lp = logp[len(P) - 1:-1].gather(1, torch.tensor(C)[:, None])[:, 0]
            m = torch.tensor(ref_mask[0 if up else 1] if trained == "re" else [1.0] * len(C), dtype=torch.float)
            p_open = logp[len(P) - 1, e["open_id"]]
            total = total - (tok_lp * m).sum() - (p_open if up else torch.log1p(-p_open.exp()))
            n += int(m.sum()) + 1
        return total / n
    torch.testing.assert_close(ours, grads(reference()), atol=1e-6, rtol=1e-4)
    assert (ours - grads(reference("everything"))).abs().max() > 1e-3 * ours.abs().max()


def test_threshold_tuned_for_balanced_accuracy():
    p, lab = np.array([0.9, 0.8, 0.3, 0.2, 0.1]), np.array([True, True, True, False, False])
    assert 0.2 < s.tune_threshold(p, lab) <= 0.3 and s.tune_threshold(p, np.ones(5, bool)) == 0.5


def test_token_f1_composition_and_lr_schedule():
    assert s.token_f1("Red means go.", "red means go") == 1.0
    assert s.token_f1("red means stop", "red means go") == pytest.approx(2 / 3)
    assert s.carries("red means go, and after Ado comes Bel", "red means go") and \
        not s.carries("after Ado comes Bel", "red means go, green means stop")
    lrs = [s.lr_at(i, 10, 2, 1.0) for i in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.125)


# ----------------------------------------------------------------------------
# the arms: the ban, the slot


def test_recall_ban_masks_the_opening_at_the_decision_slot_only(tiny):
    """A model that always opens a recall: under recall_banned its first token is never the
    opening (before the fix arm d sampled freely), and a later one is allowed (counted as a leak)."""
    model, tok = tiny
    head = s.prompt_parts(tok, Q("k1", question="k?"))[0]
    o = s.open_id(tok, head)
    lm = ScriptedLM(model, [o, o, o], len(common.encode(tok, head)))
    first = lambda: {x.token_ids[0] for x in common.sample(lm, tok, [head], n=4, max_new_tokens=2, temperature=1.0)}
    assert first() == {o}
    with s.recall_banned(lm, {o}):
        got = common.sample(lm, tok, [head], n=4, max_new_tokens=2, temperature=1.0)
    assert all(x.token_ids[0] != o and x.token_ids[1] == o for x in got)
    assert first() == {o}                                                   # the hook is removed afterwards


def test_slot_prompt_puts_r_star_between_answer_and_cue(tiny_tok):
    q = Q("k1", question="k?", cue="In K, k means")
    head, cue = s.prompt_parts(tiny_tok, q)
    assert s.slot_prompt(tiny_tok, q, "k means y.") == head + " <recall> k means y. </recall>" + cue
    assert "Lesson:" not in s.slot_prompt(tiny_tok, q, "k means y.")
    assert "Lesson: k means y." in common.question_prompt(tiny_tok, q, lesson="k means y.")   # arm b, not the slot


# ----------------------------------------------------------------------------
# statistics and the report (hand-made numbers)


def hand_made_set():
    """Two beneficial types where c helps only through recall (d = a) and one type where b = a by
    construction and c = d = 1 (so G over all types would differ from G on the beneficial ones)."""
    rstar = {"k/s": {"lesson": "k means y.", "beneficial": True}, "f/s": {"lesson": "f means y.", "beneficial": True},
             "g/s": {"lesson": "g?", "beneficial": False}}
    qs = [Q(f"{c}{i}", cluster=c, question=f"{c}{i}?") for c in "kfg" for i in range(6)]
    rng = np.random.default_rng(0)
    base, tr = {}, {}
    for q in qs:
        ben = q.cluster != "g"
        a = rng.integers(0, 2, 4) * 0
        b = np.ones(4) if ben else a
        c = rng.integers(0, 2, 4) if ben else np.ones(4)
        base[q.id] = {"a": a.tolist(), "b": b.tolist(), "b_slot": b.tolist()}
        tr[q.id] = {"c": c.tolist(), "c_star": b.tolist(), "d": (a if ben else np.ones(4)).tolist(), "decision": ben}
    return qs, base, tr, rstar


def test_G_on_beneficial_types_only_beside_G_with_d():
    qs, base, tr, rstar = hand_made_set()
    st = s.set_stats(qs, base, tr, rstar, seed=0)
    ben = st["beneficial"]
    c_mean = np.mean([tr[q.id]["c"] for q in qs if q.cluster != "g"])
    assert ben["n_questions"] == 12 and ben["G"]["mean"] == pytest.approx(c_mean)           # b - a = 1 there
    assert ben["G_d"]["mean"] == pytest.approx(0.0) and ben["c - d"]["mean"] == pytest.approx(c_mean)
    assert ben["c_star - d"]["mean"] == pytest.approx(1.0)
    assert st["all"]["c - a"]["mean"] > ben["c - a"]["mean"]                # the g type inflates "all"
    assert st["beneficial_by_type"]["n_questions"] == 2 and "no interval" in st["beneficial_by_type"]["c - d"]["note"]
    assert "no interval" in st["by_type"]["k/s"]["c - d"].get("note", "") or st["by_type"]["k/s"]["n_questions"] >= 5


def test_report_prints_the_G_that_eval_json_holds_and_no_ratio_when_b_minus_a_spans_0(tmp_path):
    qs, base, tr, rstar = hand_made_set()
    ev = {"tau": 0.5, "sets": {"heldout": s.set_stats(qs, base, tr, rstar, seed=0)}}
    sel = {"schema": common.BANK_SCHEMA, "version": 1, "kind": s.SELECTION_KIND, "entries": [
        {"cluster": t[0], "subtype": "s", "lesson": e["lesson"], "A": ci(0.2, 0.1, 0.3), "source": "data",
         "beneficial": e["beneficial"]} for t, e in rstar.items()]}
    common.save_bank(tmp_path / "selection.json", sel)
    (tmp_path / "config.json").write_text(json.dumps({"argv": "python sft_recall.py", "select": "lower", "epochs": 1,
                                                      "batch_size": 8, "lr": 1e-5}))
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    report = s.write_report(tmp_path).read_text()
    assert f"G = (c - a) / (b - a) = {common.fmt_ci(ev['sets']['heldout']['beneficial']['G'])}" in report
    assert "[" in common.fmt_ci(ev["sets"]["heldout"]["beneficial"]["G"])
    for q in qs:                                                             # now b - a spans 0
        base[q.id]["b"] = base[q.id]["a"]
    ev["sets"]["heldout"] = s.set_stats(qs, base, tr, rstar, seed=0)
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    report = s.write_report(tmp_path).read_text()
    assert "no ratio: b - a" in report and "G = (c - a) / (b - a) = +" not in report.split("no ratio")[0][-60:]


# ----------------------------------------------------------------------------
# a full run on the tiny model (in-process), resume, outputs


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("sft")
    save_tiny_model(d / "model", tiny_tok)
    # two ids per text (option order permuted): the split must keep both on one side
    rows = [{"id": f"{c}{i}{v}", "cluster": c, "subtype": "s", "question": f"{c}{i}?",
             "choices": ["x", "y", "z"] if v == "a" else ["z", "x", "y"], "answer": "B" if v == "a" else "C",
             "answer_type": "mcq", "lesson": f"{c} means y.", "cue": "so"} for c in ("k", "f") for i in range(6) for v in "ab"]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "nolesson.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "lesson"}) + "\n" for r in rows))
    can = [{"id": f"o{i}", "cluster": f"o{i % 2}", "question": f"other {i}?", "choices": ["x", "y"], "answer": "A",
            "answer_type": "mcq"} for i in range(8)]
    (d / "canary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in can))
    lib = {"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library", "entries": [
        {"id": "a", "text": "k means y.", "cluster": "k", "subtype": "s", "A_intro": ci(0.5, 0.2, 0.8)},
        {"id": "b", "text": "k is z.", "cluster": "k", "subtype": "s", "A_intro": ci(0.7, -0.1, 1.0, 4)},
        {"id": "c", "text": "f is x.", "cluster": "f", "subtype": "s", "A_intro": ci(0.2, -0.2, 0.6, 4)}]}
    common.save_bank(d / "library.json", lib)
    return d


def run_stage(files, out, *extra, monkeypatch=None):
    argv = ["sft_recall.py", "--model", str(files / "model"), "--data", str(files / "q.jsonl"), "--out", str(out),
            "--canary", str(files / "canary.jsonl"), "--canary-questions", "3", "--samples", "2", "--eval-samples", "2",
            "--answer-tokens", "3", "--recall-tokens", "12", "--lr", "3e-3", "--batch-size", "4", *extra]
    mp = monkeypatch or pytest.MonkeyPatch()
    mp.setattr(sys, "argv", argv)
    common.run_main(s.main)


@pytest.fixture(scope="module")
def tiny_run(tiny_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    run_stage(tiny_files, out, "--library", str(tiny_files / "library.json"), "--epochs", "2")
    return out


def test_run_writes_the_contract_files(tiny_run):
    sel = common.load_bank(tiny_run / "selection.json", s.SELECTION_KIND)
    by = {e["cluster"]: e for e in sel["entries"]}
    assert by["k"]["lesson"] == "k means y." and by["k"]["beneficial"] and by["k"]["source"] == "library"
    assert not by["f"]["beneficial"]
    recalls = common.read_jsonl(tiny_run / "recalls.jsonl")
    assert recalls and all(set(r) >= {"question_id", "cluster", "subtype", "recalled", "reward"} for r in recalls)
    split = json.loads((tiny_run / "split.json").read_text())
    assert set(split) >= {"train", "dev", "heldout", "fresh", "canary", "canary_select"}
    assert {r["question_id"] for r in recalls} == set(split["heldout"])
    assert not set(split["canary"]) & set(split["canary_select"]) and split["canary_select"]
    timing = json.loads((tiny_run / "timing.json").read_text())
    assert list(timing) == ["selection_s", "base_arms_s", "sft_s", "trained_arms_s", "report_s", "total_s"]
    assert (tiny_run / "checkpoint" / "model.safetensors").exists()


def test_no_evaluated_question_text_is_in_the_sft_data(tiny_run, tiny_files):
    rows = common.read_jsonl(tiny_run / "sft_data.jsonl")
    split = json.loads((tiny_run / "split.json").read_text())
    qs = {q.id: q for q in common.load_questions(tiny_files / "q.jsonl") + common.load_questions(tiny_files / "canary.jsonl")}
    trained = {common.text_key(qs[r["question_id"]]) for r in rows}
    evaluated = {common.text_key(qs[i]) for n in ("heldout", "dev", "canary", "canary_select", "composed") for i in split[n]}
    assert rows and not trained & evaluated
    for r in rows:
        if r["kind"] == "recall":
            assert r["trained_text"] == s.recall_block(r["prompt"], r["lesson"]) + "<eos>"
        else:
            assert s.OPEN not in r["completion"] and set(r["roles"]) == {"-", "e"}


def test_every_arm_and_the_answer_logprob_are_stored(tiny_run, tiny_files):
    base = json.loads((tiny_run / "eval_base.json").read_text())
    tr = json.loads((tiny_run / "eval_trained.json").read_text())["sets"]
    for name in ("heldout", "canary"):
        for i, r in base[name].items():
            assert set(r) >= {"a", "b", "b_slot"} and set(tr[name][i]) >= {"c", "c_star", "d", "d_texts", "d_leak"}
            assert len(tr[name][i]["d_texts"]) == 2
    model, tok = common.load_model(str(tiny_files / "model"))
    qs = {q.id: q for q in common.load_questions(tiny_files / "q.jsonl")}
    q = next(qs[i] for i in base["heldout"] if qs[i].cluster == "k")           # k: beneficial, r* "k means y."
    for k, prompt in (("lp_a", common.question_prompt(tok, q)), ("lp_b", common.question_prompt(tok, q, lesson="k means y.")),
                      ("lp_b_slot", s.slot_prompt(tok, q, "k means y."))):
        assert base["heldout"][q.id][k] == pytest.approx(common.answer_logprob(model, tok, [prompt], [s.gold_text(q)])[0], abs=1e-4)
    assert len({base["heldout"][q.id][k] for k in ("lp_a", "lp_b", "lp_b_slot")}) == 3
    for r in tr["heldout"].values():
        assert all(np.isfinite(r[k]) and r[k] < 0 for k in ("lp_c_star", "lp_d"))
    for i, r in base["canary"].items():                  # no lesson for another domain: b = b_slot = a, c* = d
        assert r["b"] == r["a"] == r["b_slot"] and tr["canary"][i]["c_star"] == tr["canary"][i]["d"]
    ev = json.loads((tiny_run / "eval.json").read_text())
    assert {"c - d", "c_star - d", "b_slot - a"} <= set(ev["sets"]["heldout"]["all"])
    assert "spurious_recall" in ev["canary"] and "d - a" in ev["sets"]["canary"]["all"]
    report = (tiny_run / "report.md").read_text()
    assert "spurious recall rate" in report and "forgetting, d - a" in report and "Gold answer log-prob" in report


def test_killed_run_resumes_from_its_last_epoch(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "r"

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(s, "trained_arms", killed)                 # "killed" after training, before eval
    with pytest.raises(SystemExit) as e:
        run_stage(tiny_files, out, "--library", str(tiny_files / "library.json"), "--epochs", "1", monkeypatch=monkeypatch)
    assert e.value.code == 130
    data_before = (out / "sft_data.jsonl").read_text()
    monkeypatch.undo()
    run_stage(tiny_files, out, "--library", str(tiny_files / "library.json"), "--epochs", "2", "--resume")
    m = common.read_metrics(out)
    assert [x["step"] for x in m] == list(range(len(m))) and {x["epoch"] for x in m} == {0, 1}
    assert (out / "sft_data.jsonl").read_text() == data_before
    assert common.load_resume_state(out)["step"] == 2 and (out / "report.md").exists()


def test_placebo_rotates_the_lessons_on_the_same_rows(tiny_files, tmp_path):
    lib = common.load_bank(tiny_files / "library.json", "introspection-library")
    lib["entries"][2]["A_intro"] = ci(0.4, 0.1, 0.6)                  # f/s beneficial too
    common.save_bank(tmp_path / "lib2.json", lib)
    out = tmp_path / "r"
    run_stage(tiny_files, out, "--library", str(tmp_path / "lib2.json"), "--epochs", "1", "--placebo", "--canary", "")
    real, fake = common.read_jsonl(out / "sft_data.jsonl"), common.read_jsonl(out / "placebo" / "sft_data.jsonl")
    assert [r["question_id"] for r in real] == [r["question_id"] for r in fake]
    swapped = [(r, f) for r, f in zip(real, fake) if r["kind"] == "recall"]
    assert swapped and all(f["lesson"] != r["lesson"] and f["kind"] == "recall" for r, f in swapped)
    assert set(json.loads((out / "eval_placebo.json").read_text())["heldout"]) == set(json.loads((out / "split.json").read_text())["heldout"])
    assert "## Placebo" in (out / "report.md").read_text()


@pytest.mark.parametrize("make, why", [
    (lambda d: ["--library", str(d / "q.jsonl")], "not a readable JSON bank"),
    (lambda d: ["--library", str(d / "empty.json")], "empty library"),
    (lambda d: ["--library", str(d / "foreign.json")], "absent from --data"),
    (lambda d: ["--data", str(d / "nolesson.jsonl"), "--lessons", "data"], "no question carries a 'lesson'"),
    (lambda d: [], "nothing to select from"),
    (lambda d: ["--lessons", "data", "--holdout", "1"], "--holdout 1"),
    (lambda d: ["--library", str(d / "missing.json")], "no such file"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_files, tmp_path, monkeypatch, capsys, make, why):
    d = tiny_files
    common.save_bank(d / "empty.json", {"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library", "entries": []})
    common.save_bank(d / "foreign.json", {"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library",
                                          "entries": [{"text": "x", "cluster": "zz", "subtype": None, "A_intro": ci(0.1, 0.0, 0.2)}]})
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "run"
    argv = ["sft_recall.py", "--model", str(d / "model"), "--data", str(d / "q.jsonl"), "--out", str(out), "--canary", ""]
    a = make(d)
    if "--data" in a:
        del argv[3:5]
    monkeypatch.setattr(sys, "argv", argv + a)
    with pytest.raises(SystemExit) as e:
        common.run_main(s.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and why in err[0], err
    assert not out.exists()


def test_bf16_rollout_copy_samples_base_and_trained_weights(tiny_files, tmp_path, monkeypatch, bf16_rollouts):
    """--rollout-dtype bfloat16: selection and arms a, b, b_slot sample from a bf16 copy of the base
    weights; arms c, c*, d from the copy the training loop kept in sync, so they see the trained weights."""
    run_stage(tiny_files, tmp_path / "r", "--library", str(tiny_files / "library.json"), "--epochs", "1",
              "--rollout-dtype", "bfloat16", monkeypatch=monkeypatch)
    assert bf16_rollouts and all(c["bf16"] and c["synced"] for c in bf16_rollouts)
    assert len({c["weights"] for c in bf16_rollouts}) == 2, "base, then trained weights"


# ----------------------------------------------------------------------------
# the chain: grpo_introspect (scripted sampler: its library really holds a lesson), then sft_recall


def test_grpo_then_sft_chain_consumes_a_phase_1_lesson(tiny_files, tmp_path, monkeypatch):
    """No hand-made library: Phase 1's own library.json and checkpoint, and the lesson it scored is
    the r* Phase 2 selects and trains into its recall rows."""
    import grpo_introspect as g
    from test_grpo import scripted_sampler
    a, data = tmp_path / "A", tmp_path / "kq.jsonl"
    data.write_text("".join(json.dumps({"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
                                        "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq"}) + "\n"
                            for c in "kf" for i in range(8)))
    with monkeypatch.context() as m:
        m.setattr(common, "sample", scripted_sampler([]))
        m.setattr(sys, "argv", ["grpo_introspect.py", "--model", str(tiny_files / "model"), "--data", str(data), "--out", str(a),
                                "--steps", "2", "--N", "2", "--M", "2", "--max-intros", "1", "--matrix-M", "0", "--lr", "0.05"])
        common.run_main(g.main)
    lib = [e for e in common.load_bank(a / "library.json", "introspection-library")["entries"] if not e.get("meta_gaming")]
    assert lib, "Phase 1 wrote no usable lesson"
    b = tmp_path / "B"
    r = subprocess.run([sys.executable, str(ROOT / "sft_recall.py"), "--library", str(a / "library.json"), "--model",
                        str(a / "checkpoint"), "--data", str(data), "--out", str(b), "--canary", "", "--samples", "2",
                        "--eval-samples", "1", "--answer-tokens", "3", "--recall-tokens", "8", "--epochs", "1", "--select", "mean"],
                       capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((b / "config.json").read_text())["model"] == str(a / "checkpoint")
    sel = common.load_bank(b / "selection.json", s.SELECTION_KIND)["entries"]
    k = next(e for e in sel if e["cluster"] == lib[0]["cluster"])
    assert k["lesson"] == lib[0]["text"] and k["source"] == "library" and k["beneficial"]
    assert any(r_["lesson"] == lib[0]["text"] for r_ in common.read_jsonl(b / "sft_data.jsonl") if r_["kind"] == "recall")


def test_lr_sweep_follows_its_rule_and_never_touches_held_out_or_the_reported_canary(tiny_run, tiny_files, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import sweep_sft_lr
    split = json.loads((tiny_run / "split.json").read_text())
    qs = {q.id: q for q in common.load_questions(tiny_files / "q.jsonl") + common.load_questions(tiny_files / "canary.jsonl")}
    hidden = [qs[i] for n in ("heldout", "canary") for i in split[n]]
    seen = []
    real_lp, real_score = common.token_logprobs, common.score
    monkeypatch.setattr(common, "token_logprobs", lambda m, p, c, **k: seen.extend(p) or real_lp(m, p, c, **k))
    monkeypatch.setattr(common, "score", lambda m, t, q_, p, *a, **k: seen.extend(common.encode(t, x) for x in p)
                        or real_score(m, t, q_, p, *a, **k))
    monkeypatch.setattr(sys, "argv", ["sweep_sft_lr.py", "--run", str(tiny_run), "--lrs", "1e-4", "3e-3", "--out", str(tmp_path)])
    common.run_main(sweep_sft_lr.main)
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["lr"] for r in res["results"]] == [0.0, 1e-4, 3e-3]
    ok = [r for r in res["results"][1:] if not r["canary_change"]["hi"] < 0]
    assert res["chosen"] == (min(ok, key=lambda r: (r["dev"]["loss"], r["lr"]))["lr"] if ok else None)
    assert all(r["dev"]["tokens"] > 0 for r in res["results"])
    tok = common.load_model(str(tiny_files / "model"))[1]
    texts = [tok.decode(p) for p in seen]
    assert texts and any(qs[i].question in t for i in split["canary_select"] for t in texts)
    assert not any(q.question in t for q in hidden for t in texts)
    assert "Chosen: **" in (tmp_path / "sweep.md").read_text()


@pytest.mark.gemma
def test_roles_on_the_real_gemma_tokenizer():
    """Gemma: pad 0, EOS 1, " <recall>" opens with " <", and "</recall>." ends on a token ">." that
    straddles the tag's edge: trained, as it closes the tag; the cue after the block is not."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(common.embedded_dir("gemma")))
    q = Q("v1", cluster="velt-code", subtype="lights", question="What does red mean?", cue="At a Velt red light, red means")
    ex = s.make_example(tok, q, "Velt road code: red means go.", " go.", SimpleNamespace(train_answer=False, max_len=999))
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and ex["completion_ids"][-1] == 1 and ex["roles"][-1] == "e"
    assert tok.decode([ex["open_id"]]) == " <" and ex["completion_ids"][0] == ex["open_id"] and ex["roles"][0] == "d"
    trained = tok.decode([t for t, r in zip(ex["completion_ids"], ex["roles"]) if r in "dr"])
    assert trained == " <recall> Velt road code: red means go. </recall>"
    assert tok.decode([t for t, r in zip(ex["completion_ids"], ex["roles"]) if r == "-"]) == " At a Velt red light, red means go."
    block = " <recall> x </recall>"
    ex = s.build_example(tok, "Answer:", block[:-1] + ">.", len(block), 1, False, 99)
    assert tok.decode(ex["completion_ids"][-2]) == ">." and ex["roles"][-2:] == "re"


def test_the_committed_default_run_is_text_disjoint():
    """results/sft-default: no evaluated question's text is in its sft_data.jsonl (the review found
    15 of 40 held-out questions word for word in the rows of the run before it)."""
    run = ROOT / "results" / "sft-default"
    split = json.loads((run / "split.json").read_text())
    qs = {q.id: q for f in ("procedural.jsonl", "obstetrics.jsonl") for q in common.load_questions(ROOT / "data" / f)}
    trained = {common.text_key(qs[r["question_id"]]) for r in common.read_jsonl(run / "sft_data.jsonl")}
    assert trained and split["heldout"] and split["canary"] and split["canary_select"]
    for name in ("heldout", "dev", "canary", "canary_select", "composed", "fresh"):
        assert not trained & {common.text_key(qs[i]) for i in split[name]}, name
    assert not {common.text_key(qs[i]) for i in split["canary"]} & {common.text_key(qs[i]) for i in split["canary_select"]}
