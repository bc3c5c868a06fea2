"""sft_recall.py: selection, split, the SFT masks and loss, an overfit, a full tiny run, resume,
bad inputs, and the grpo_introspect -> sft_recall chain."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_gemma, save_tiny_model

import common
import sft_recall as s

ROOT = Path(__file__).resolve().parent.parent
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1"}          # tiny model: one thread (see one_thread)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny-model matmuls are far faster on one thread when other processes share the cores
    (two threads spin-wait on each other); restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ci(mean, lo, hi, n=8):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


# ----------------------------------------------------------------------------
# selection and split (pure)


def test_selection_picks_highest_lower_bound_not_highest_mean():
    cands = {"k/s": [{"lesson": "noisy", "A": ci(0.70, -0.10, 1.0, 4), "source": "library"},
                     {"lesson": "solid", "A": ci(0.40, 0.15, 0.65, 32), "source": "library"}],
             "f/s": [{"lesson": "nothing", "A": ci(0.30, -0.05, 0.65), "source": "data"}],
             "g": []}
    sel = s.select_lessons(cands, "lower")
    assert sel["k/s"]["lesson"] == "solid" and sel["k/s"]["beneficial"]
    assert sel["f/s"]["lesson"] == "nothing" and not sel["f/s"]["beneficial"]   # lower bound below 0
    assert sel["g"] is None
    relaxed = s.select_lessons(cands, "mean")
    assert relaxed["k/s"]["lesson"] == "noisy" and relaxed["f/s"]["beneficial"]


def test_split_is_stratified_deterministic_and_keeps_composed_out(tmp_path):
    qs = [common.Question(id=f"{c}-{i:02d}", cluster=c, subtype="s", question="?", answer="1", answer_type="number")
          for c in ("a", "b") for i in range(8)]
    qs += [common.Question(id=f"m-{i}", cluster="m", subtype="a+b", question="?", answer="1", answer_type="number",
                           meta={"components": ["a/s", "b/s"]}) for i in range(3)]
    sp = s.split_questions(qs, 0.25, 0.2, seed=0)
    assert sp == s.split_questions(list(reversed(qs)), 0.25, 0.2, seed=0)       # order does not matter
    for c in ("a", "b"):
        got = [sp[q.id] for q in qs if q.cluster == c]
        assert got.count("heldout") == 2 and got.count("dev") == 1 and got.count("train") == 5
    assert all(sp[f"m-{i}"] == "composed" for i in range(3))
    assert sp != s.split_questions(qs, 0.25, 0.2, seed=1)


# ----------------------------------------------------------------------------
# examples, masks, loss

HEAD = "Question: k?\nAnswer:"


def test_loss_mask_covers_decision_recall_block_and_eos(tiny_tok):
    block = s.recall_block(HEAD, "k means y.")
    comp = block + " so" + " y."
    ex = s.build_example(tiny_tok, HEAD, comp, len(block), tiny_tok.eos_token_id, train_answer=False, max_len=999)
    ids, roles = ex["completion_ids"], ex["roles"]
    assert ex["prompt_ids"] == common.encode(tiny_tok, HEAD)
    assert tiny_tok.decode(ids[:-1]) == comp and ids[-1] == tiny_tok.eos_token_id == tiny_tok.pad_token_id
    assert roles[0] == "d" and roles[-1] == "e"
    trained = tiny_tok.decode([t for t, r in zip(ids, roles) if r in "dr"])
    assert trained == " <recall> k means y. </recall>"
    assert set(roles[len(block):-1]) == {"-"}                        # cue and answer not trained
    with_answer = s.build_example(tiny_tok, HEAD, comp, len(block), tiny_tok.eos_token_id, True, 999)
    assert set(with_answer["roles"][len(block):-1]) == {"a"}
    plain = s.build_example(tiny_tok, HEAD, " y.", 0, tiny_tok.eos_token_id, False, 999)
    assert plain["roles"] == "d--e"                                   # no recall: decision + EOS only


def test_gradient_only_on_trained_tokens(tiny):
    """The role mask through token_logprobs and sft_loss: d(loss)/d(logprob) is -1/n on exactly
    the decision, recall and EOS tokens of the batch, 0 elsewhere (the EOS equals the pad id)."""
    model, tok = tiny
    block = s.recall_block(HEAD, "k means y.")
    exs = [s.build_example(tok, HEAD, block + " y.", len(block), tok.eos_token_id, False, 999),
           s.build_example(tok, HEAD, " so y.", 0, tok.eos_token_id, False, 999)]
    lp = common.token_logprobs(model, [e["prompt_ids"] for e in exs], [e["completion_ids"] for e in exs],
                               pad_id=tok.pad_token_id)
    logprobs = lp["logprobs"].detach().requires_grad_(True)
    mask = s.role_mask(exs, "dre", logprobs.shape[1])
    s.sft_loss(logprobs, mask).backward()
    n = int(mask.sum())
    assert n == sum(len(e["roles"]) - e["roles"].count("-") for e in exs)
    assert torch.all(logprobs.grad[~mask] == 0)
    assert torch.allclose(logprobs.grad[mask], torch.full((n,), -1.0 / n))
    with pytest.raises(ValueError):
        s.sft_loss(logprobs, torch.zeros_like(mask))


def test_row_with_no_trained_token_after_truncation_is_an_error(tiny_tok):
    n_head = len(common.encode(tiny_tok, HEAD))
    with pytest.raises(ValueError, match="no trained token"):
        s.build_example(tiny_tok, HEAD, " <recall> x </recall>", 20, tiny_tok.eos_token_id, False, max_len=n_head)
    ok = s.build_example(tiny_tok, HEAD, " <recall> x </recall>", 20, tiny_tok.eos_token_id, False, n_head + 3)
    assert ok["roles"] == "drr"


def test_prompt_that_is_not_a_prefix_is_refused():
    class MergingTok:   # merges ": " into one token, as BPE merges can
        bos_token = None

        def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
            toks, offs, i = [], [], 0
            while i < len(text):
                w = 2 if text[i:i + 2] == ": " else 1
                toks.append(hash(text[i:i + w]) % 1000)
                offs.append((i, i + w))
                i += w
            return SimpleNamespace(input_ids=toks, **{"offset_mapping": offs}) if not return_offsets_mapping \
                else {"input_ids": toks, "offset_mapping": offs}
    with pytest.raises(ValueError, match="not a prefix"):
        s.build_example(MergingTok(), "Answer:", " yes", 0, 1, False, 99)


def test_threshold_tuned_for_balanced_accuracy():
    p = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    lab = np.array([True, True, True, False, False])
    t = s.tune_threshold(p, lab)
    assert 0.2 < t <= 0.3
    assert s.tune_threshold(p, np.ones(5, bool)) == 0.5


def test_token_f1_and_composition_check():
    assert s.token_f1("Red means go.", "red means go") == 1.0
    assert s.token_f1("red means stop", "red means go") == pytest.approx(2 / 3)
    assert s.carries("red means go, and after Ado comes Bel", "red means go") and \
        not s.carries("after Ado comes Bel", "red means go, green means stop")


def test_lr_warmup_then_linear_decay():
    lrs = [s.lr_at(i, 10, 2, 1.0) for i in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] == pytest.approx(0.125)


# ----------------------------------------------------------------------------
# a few SFT steps make the tiny model write the recall


def test_sft_overfits_a_recall_string(tiny_tok, tmp_path):
    tok = tiny_tok
    model = make_tiny_gemma(len(tok), seed=5)
    block = s.recall_block(HEAD, "k means y.")
    ex = s.build_example(tok, HEAD, block + " y.", len(block), tok.eos_token_id, False, 999)
    ex.update(kind="recall")
    args = SimpleNamespace(lr=1e-2, weight_decay=0.0, batch_size=2, epochs=25, warmup=2, train_answer=False,
                           clip=1.0, resume=False, seed=0)
    before = common.sample(model, tok, [HEAD], n=1, max_new_tokens=len(block) + 2, temperature=0)[0].text
    s.train_sft(model, tok, [ex, ex], args, tmp_path, tmp_path / "metrics.jsonl", "sft")
    after = common.sample(model, tok, [HEAD], n=1, max_new_tokens=len(block) + 2, temperature=0)[0].text
    assert not before.startswith(block)
    assert after.startswith(block), after                  # the recall and its closing tag
    m = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 25 and m[-1]["loss_recall"] < 0.1 * m[0]["loss_recall"]
    assert (tmp_path / "checkpoint" / "model.safetensors").exists()


# ----------------------------------------------------------------------------
# a full run of the stage on the tiny model (in-process), resume, outputs


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("sft")
    save_tiny_model(d / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c}{i}?", "choices": ["x", "y", "z"],
             "answer": "B", "answer_type": "mcq", "lesson": f"{c} means y.", "cue": "so"}
            for c in ("k", "f") for i in range(8)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "nolesson.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "lesson"}) + "\n"
                                              for r in rows))
    lib = {"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library", "entries": [
        {"id": "a", "text": "k means y.", "cluster": "k", "subtype": "s", "A_intro": ci(0.5, 0.2, 0.8)},
        {"id": "b", "text": "k is z.", "cluster": "k", "subtype": "s", "A_intro": ci(0.7, -0.1, 1.0, 4)},
        {"id": "c", "text": "f is x.", "cluster": "f", "subtype": "s", "A_intro": ci(0.2, -0.2, 0.6, 4)}]}
    common.save_bank(d / "library.json", lib)
    return d


def run_stage(files, out, *extra, monkeypatch=None):
    argv = ["sft_recall.py", "--model", str(files / "model"), "--data", str(files / "q.jsonl"),
            "--out", str(out), "--canary", "", "--fresh", "0", "--samples", "2", "--eval-samples", "1",
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
    assert not by["f"]["beneficial"] and set(by["k"]["A"]) >= {"mean", "lo", "hi", "n"}
    recalls = [json.loads(ln) for ln in (tiny_run / "recalls.jsonl").read_text().splitlines()]
    labels = json.loads((tiny_run / "labels.json").read_text())
    assert recalls and all(set(r) >= {"question_id", "cluster", "subtype", "recalled", "reward"} for r in recalls)
    assert all(r["reward"] in (0, 1) for r in recalls)
    assert not {r["question_id"] for r in recalls} & set(labels)        # labels cover train/dev only
    report = (tiny_run / "report.md").read_text()
    assert "Lessons from: **library**" in report and "## Selection" in report and "G = (c - a)" in report
    assert (tiny_run / "checkpoint" / "model.safetensors").exists()
    timing = json.loads((tiny_run / "timing.json").read_text())
    phases = ["selection_s", "base_arms_s", "sft_s", "trained_arms_s", "report_s"]
    assert list(timing) == phases + ["total_s"] and all(timing[k] >= 0 for k in phases)
    assert timing["total_s"] == pytest.approx(sum(timing[k] for k in phases), abs=0.3)
    assert "Wall time this session by phase (all phases: `timing.json`): selection" in report


def test_heldout_ids_never_in_sft_data_and_plain_rows_hold_no_recall(tiny_run):
    rows = [json.loads(ln) for ln in (tiny_run / "sft_data.jsonl").read_text().splitlines()]
    recalls = {json.loads(ln)["question_id"] for ln in (tiny_run / "recalls.jsonl").read_text().splitlines()}
    assert rows and not {r["question_id"] for r in rows} & recalls
    labels = json.loads((tiny_run / "labels.json").read_text())
    assert all(labels[r["question_id"]]["split"] == "train" for r in rows)
    for r in rows:
        if r["kind"] == "recall":
            assert r["trained_text"] == s.recall_block(r["prompt"], r["lesson"]) + "<eos>"
        else:
            assert s.OPEN not in r["completion"] and "r" not in r["roles"]


def test_killed_run_resumes_from_its_last_epoch(tiny_files, tmp_path, monkeypatch):
    out = tmp_path / "r"

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(s, "run_free", killed)                    # "killed" after training, before eval
    with pytest.raises(SystemExit) as e:
        run_stage(tiny_files, out, "--library", str(tiny_files / "library.json"), "--epochs", "1",
                  monkeypatch=monkeypatch)
    assert e.value.code == 130
    data_before = (out / "sft_data.jsonl").read_text()
    monkeypatch.undo()
    run_stage(tiny_files, out, "--library", str(tiny_files / "library.json"), "--epochs", "2", "--resume")
    m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in m]
    assert steps == list(range(len(steps))) and {x["epoch"] for x in m} == {0, 1}
    assert (out / "sft_data.jsonl").read_text() == data_before     # selection and data not redone
    assert common.load_resume_state(out)["step"] == 2
    assert (out / "report.md").exists()


def test_placebo_rotates_the_lessons_on_the_same_rows(tiny_files, tmp_path):
    lib = common.load_bank(tiny_files / "library.json", "introspection-library")
    lib["entries"][2]["A_intro"] = ci(0.4, 0.1, 0.6)                  # f/s beneficial too
    common.save_bank(tmp_path / "lib2.json", lib)
    out = tmp_path / "r"
    run_stage(tiny_files, out, "--library", str(tmp_path / "lib2.json"), "--epochs", "1", "--placebo")
    real = [json.loads(ln) for ln in (out / "sft_data.jsonl").read_text().splitlines()]
    fake = [json.loads(ln) for ln in (out / "placebo" / "sft_data.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in real] == [r["question_id"] for r in fake]        # same data size
    swapped = [(r, f) for r, f in zip(real, fake) if r["kind"] == "recall"]
    assert swapped and all(f["lesson"] != r["lesson"] and f["kind"] == "recall" for r, f in swapped)
    p = json.loads((out / "eval_placebo.json").read_text())
    assert set(p["heldout"]) == {json.loads(ln)["question_id"] for ln in (out / "recalls.jsonl").read_text().splitlines()}
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
    common.save_bank(d / "empty.json", {"schema": common.BANK_SCHEMA, "version": 1,
                                        "kind": "introspection-library", "entries": []})
    common.save_bank(d / "foreign.json", {"schema": common.BANK_SCHEMA, "version": 1, "kind": "introspection-library",
                                          "entries": [{"text": "x", "cluster": "zz", "subtype": None,
                                                       "A_intro": ci(0.1, 0.0, 0.2)}]})
    monkeypatch.setattr(common, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    out = tmp_path / "run"
    argv = ["sft_recall.py", "--model", str(d / "model"), "--data", str(d / "q.jsonl"), "--out", str(out),
            "--canary", ""]
    a = make(d)
    if "--data" in a:
        i = argv.index("--data")
        del argv[i:i + 2]
    monkeypatch.setattr(sys, "argv", argv + a)
    with pytest.raises(SystemExit) as e:
        common.run_main(s.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and why in err[0], err
    assert not out.exists()


# ----------------------------------------------------------------------------
# the chain: grpo_introspect, then sft_recall on its library and checkpoint


def test_grpo_then_sft_chain(tiny_files, tmp_path):
    a = tmp_path / "A"
    r = subprocess.run([sys.executable, str(ROOT / "grpo_introspect.py"), "--model", str(tiny_files / "model"),
                        "--data", str(tiny_files / "q.jsonl"), "--out", str(a), "--steps", "2", "--N", "4",
                        "--M", "2", "--max-new-tokens", "8", "--answer-tokens", "3", "--matrix-M", "0"],
                       capture_output=True, text=True, timeout=600, env=ENV1)
    assert r.returncode == 0, r.stderr[-2000:]
    lib = common.load_bank(a / "library.json", "introspection-library")
    b = tmp_path / "B"
    cmd = [sys.executable, str(ROOT / "sft_recall.py"), "--library", str(a / "library.json"),
           "--model", str(a / "checkpoint"), "--data", str(tiny_files / "q.jsonl"), "--out", str(b),
           "--canary", "", "--fresh", "0", "--samples", "2", "--eval-samples", "1", "--answer-tokens", "3",
           "--recall-tokens", "8", "--epochs", "1", "--batch-size", "8"]
    if not any(not e.get("meta_gaming") for e in lib["entries"]):
        # a random tiny model rarely writes a correct, closed introspection, so its library is
        # usually empty: refused alone, merged with a second library it is read like any other
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV1)
        assert r.returncode == 2 and "empty library" in r.stderr
        cmd[cmd.index("--library") + 1:cmd.index("--library") + 2] = [str(a / "library.json"),
                                                                       str(tiny_files / "library.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV1)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["model"] == str(a / "checkpoint") and (b / "report.md").exists()
    assert common.load_bank(b / "selection.json", s.SELECTION_KIND)["entries"]


def test_bf16_rollout_copy_samples_base_and_trained_weights(tiny_files, tmp_path, monkeypatch, bf16_rollouts):
    """--rollout-dtype bfloat16: selection and arms a, b sample from a bf16 copy of the base
    weights; arms c, d from a copy made after training, so they see the trained weights."""
    run_stage(tiny_files, tmp_path / "r", "--library", str(tiny_files / "library.json"), "--epochs", "1",
              "--rollout-dtype", "bfloat16", monkeypatch=monkeypatch)
    assert bf16_rollouts and all(c["bf16"] and c["synced"] for c in bf16_rollouts)
    assert len({c["weights"] for c in bf16_rollouts}) == 2, "base, then trained weights"


def test_lr_sweep_reuses_the_runs_rows_and_never_touches_held_out(tiny_run, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import sweep_sft_lr
    split = json.loads((tiny_run / "labels.json").read_text())          # train / dev ids only
    held = [q for q in common.load_questions(json.loads((tiny_run / "config.json").read_text())["data"])
            if q.id not in split]
    assert held
    seen = []
    real = common.token_logprobs
    monkeypatch.setattr(common, "token_logprobs", lambda m, p, c, **k: seen.extend(p) or real(m, p, c, **k))
    monkeypatch.setattr(sys, "argv", ["sweep_sft_lr.py", "--run", str(tiny_run), "--lrs", "1e-4", "3e-3",
                                      "--out", str(tmp_path)])
    common.run_main(sweep_sft_lr.main)
    res = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["lr"] for r in res["results"]] == [0.0, 1e-4, 3e-3]
    best = min(res["results"][1:], key=lambda r: r["dev"]["loss"])
    assert res["chosen"] == best["lr"] and all(r["dev"]["tokens"] > 0 for r in res["results"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(json.loads((tiny_run / "config.json").read_text())["model"])
    texts = [tok.decode(p) for p in seen]
    assert texts and not any(q.question in t for q in held for t in texts)
    assert "Chosen: **" in (tmp_path / "sweep.md").read_text()
