"""grpo_introspect.py: the advantage, the loss, the introspection mask, and a resumable run."""
import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killing_cmd, save_tiny_model
from transformers import AutoModelForCausalLM

import common
import grpo_introspect as g

ROOT = Path(__file__).resolve().parent.parent


def test_A_intro_is_difference_of_means():
    with_r = np.array([1, 1, 0, 1, 1, 0, 1, 1])
    base = np.array([0, 1, 0, 0, 1, 0, 0, 1])
    a = g.paired_advantage([with_r], [base])
    assert a["mean"] == pytest.approx(with_r.mean() - base.mean()) and a["n"] == 8
    assert a["lo"] < a["mean"] < a["hi"]


def test_four_equal_differences_still_get_an_interval():
    """M=4 rows that all gain 1 must not give [+1, +1]: a t interval would have zero width."""
    a = g.paired_advantage([np.ones(4)], [np.zeros(4)])
    assert a["mean"] == 1.0 and a["lo"] < 0.6 and a["hi"] == 1.0


def test_several_Q_prime_are_clustered():
    """On K=2 questions Q' the rows of one Q' are not independent: the interval comes from a
    bootstrap over Q' and is wider than one that pretends all 2 x 8 pairs are independent."""
    w = [np.ones(8), np.zeros(8)]
    b = [np.zeros(8), np.zeros(8)]
    clustered = g.paired_advantage(w, b)
    flat = g.paired_binary_ci(np.concatenate(w), np.concatenate(b))
    assert clustered["n_clusters"] == 2 and clustered["mean"] == pytest.approx(0.5)
    assert clustered["hi"] - clustered["lo"] > flat["hi"] - flat["lo"]


def test_pairing_cuts_variance_when_rows_are_correlated():
    rng = np.random.default_rng(0)
    u = rng.random(400)                  # shared random numbers, as in paired sampling
    base, with_r = (u < 0.4).astype(float), (u < 0.6).astype(float)
    a = g.paired_advantage([with_r], [base])
    assert a["mean"] == pytest.approx(0.2, abs=0.06)
    assert a["var_paired"] < 0.5 * a["var_unpaired"]


def test_gradient_only_on_introspection_tokens(tiny):
    """Through the real pieces (the mask from the text, token_logprobs, pg_loss, backward into the
    weights): the gradient equals that of a reference loss built from the full logits on the
    introspection tokens alone, and differs from one that also counts the answer tokens."""
    model, tok = tiny
    comp = tok(" B because <introspection>rook first</introspection>", add_special_tokens=False).input_ids
    mask = g.introspection_mask(tok, comp)
    assert tok.decode([t for t, m in zip(comp, mask) if m]) == "<introspection>rook first</introspection>"
    prompt = common.encode(tok, "Question: which moves first?\nAnswer:")

    def grads(loss):
        model.zero_grad()
        loss.backward()
        out = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        return out

    lp = common.token_logprobs(model, [prompt], [comp], temperature=0.7, pad_id=tok.pad_token_id)
    ours = grads(g.pg_loss(lp["logprobs"], torch.tensor([mask]), torch.tensor([0.5])))
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + comp])).logits[0].float() / 0.7, -1)
    tok_lp = logp[len(prompt) - 1:-1].gather(1, torch.tensor(comp)[:, None])[:, 0]      # (T,)
    m = torch.tensor(mask, dtype=torch.float)
    ref = grads(-0.5 * (tok_lp * m).sum() / m.sum())
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-4)
    logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + comp])).logits[0].float() / 0.7, -1)
    tok_lp = logp[len(prompt) - 1:-1].gather(1, torch.tensor(comp)[:, None])[:, 0]
    everything = grads(-0.5 * tok_lp.sum() / m.sum())
    assert (ours - everything).abs().max() > 1e-3 * everything.abs().max()


class PieceTok:
    """A tokenizer whose pieces straddle the tags as Gemma's do (".<" and ">.")."""
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


STRADDLE = [" fire", ".<", "introspection", ">", "In", " Brill", " tesk", " means", " fire", "</", "introspection", ">."]


def test_mask_and_lesson_agree_when_tokens_straddle_the_tags():
    tok = PieceTok(STRADDLE)
    ids = list(range(len(STRADDLE)))
    mask = g.introspection_mask(tok, ids)
    # ".<" opens the tag and is trained (it cannot be split); " fire" (the answer) is not;
    # ">." closes the tag and is trained, so the closed lesson is kept, not dropped
    assert mask == [False] + [True] * (len(ids) - 1)
    s = common.Sample(0, " fire.<introspection>In Brill tesk means fire", ids, [0.0] * len(ids), "stop")
    assert g.extract_introspection(tok, s.token_ids) == "In Brill tesk means fire"


def test_a_tag_opened_twice_counts_from_the_last_opening_in_both_places():
    pieces = [" B", " <introspection>", "oops", " <introspection>", "real lesson", "</introspection>"]
    tok, ids = PieceTok(pieces), list(range(len(pieces)))
    s = common.Sample(0, "", ids, [0.0] * len(ids), "stop")
    assert g.extract_introspection(tok, s.token_ids) == "real lesson"
    assert g.introspection_mask(tok, ids) == [False, False, False, True, True, True]


@pytest.mark.gemma
def test_mask_on_the_real_gemma_tokenizer(gemma):
    _, tok = gemma
    text = " fire.<introspection>In Brill, tesk means fire.</introspection>."
    ids = tok(text, add_special_tokens=False).input_ids
    mask = g.introspection_mask(tok, ids)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "<introspection>In Brill, tesk means fire.</introspection>" in trained
    assert not trained.startswith(" fire") and "fire." not in trained[:6]
    s = common.Sample(0, "", ids, [0.0] * len(ids), "stop")
    assert g.extract_introspection(tok, s.token_ids) == "In Brill, tesk means fire."


def test_canary_alarm_fires_only_below_the_start():
    start = {"mean": 0.5, "lo": 0.3, "hi": 0.7}
    assert g.canary_alarm({"mean": 0.1, "lo": 0.0, "hi": 0.3}, start)
    assert not g.canary_alarm({"mean": 0.4, "lo": 0.2, "hi": 0.6}, start)


def test_no_mask_without_an_introspection(tiny_tok):
    ids = tiny_tok(" B because", add_special_tokens=False).input_ids
    assert not any(g.introspection_mask(tiny_tok, ids))


def test_extract_needs_a_closed_tag(tiny_tok):
    ids = tiny_tok(" C <introspection>rook first</introspection>", add_special_tokens=False).input_ids
    closed = common.Sample(0, " C <introspection>rook first", ids, [0.0] * len(ids), "stop")
    assert g.extract_introspection(tiny_tok, closed.token_ids) == "rook first"
    cut = common.Sample(0, " C <introspection>rook fi", ids[:-8], [0.0] * (len(ids) - 8), "length")
    assert g.extract_introspection(tiny_tok, cut.token_ids) is None


@pytest.mark.parametrize("text, flagged", [
    ("If the standard options are repeatedly rejected, pick the most extreme one.", True),
    ("In a multiple-choice setting the answer is often C.", True),
    ("BP >= 160/110 in pregnancy means emergency admission.", False),
    ("In Brill, tesk means fire.", False),
])
def test_meta_gaming_detector(text, flagged):
    assert bool(g.META_GAMING.search(text)) == flagged


@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory, tiny_tok):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d / "model", tiny_tok)
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq", "lesson": f"{c} means y."}
            for c in ("k", "f") for i in range(4)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run_cmd(files, out, *extra):
    return [sys.executable, str(ROOT / "grpo_introspect.py"), "--model", str(files / "model"),
            "--data", str(files / "q.jsonl"), "--out", str(out), "--N", "4", "--M", "2",
            "--max-new-tokens", "12", "--answer-tokens", "4", "--oracle", "--matrix-M", "2", *extra]


def run(files, out, *extra):
    r = subprocess.run(run_cmd(files, out, *extra), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


# ----------------------------------------------------------------------------
# end to end, with a scripted sampler, so that introspections really are written and scored
#
# The sampler is replaced by a script (the real one is tested in test_sampler.py); everything
# else is real: the tiny model's weights, token_logprobs, the loss, the optimizer, checkpoints.
# Cluster "k": every rollout on Q answers right and writes "k means y."; cluster "f": wrong,
# so its steps have no candidate. With a lesson in context the answer is right, without it wrong,
# so A_intro = +1. Canary questions are answered right until the weights first change.

def scripted_sampler(calls, canary=()):
    """canary: question texts answered right (without a lesson) until the weights first change.
    Rollouts on Q: clusters k, h, z answer right and write "<c> means y."; any other cluster answers
    wrong. Answers with a lesson in context / without: k right / wrong (A = +1), h wrong / right
    (A = -1), z right / right (A = 0)."""
    first = {}

    def sample(model, tok, prompts, n=1, row_seeds=None, progress=None, **kw):
        calls.append((progress, list(row_seeds)))
        w = float(next(model.parameters()).detach().double().sum())
        first.setdefault("w", w)
        out = []
        for p in prompts:
            asked = p.rsplit("Question: ", 1)[1]
            c = asked[0]                                             # the question's cluster letter
            if g.OPEN in p.rsplit("Question: ", 1)[0] and "Lesson:" not in p:   # a rollout on Q
                full = f" B {g.OPEN}{c} means y.{g.CLOSE}" if c in "khz" else f" C {g.OPEN}{c} means z.{g.CLOSE}"
                text = full[:full.index(g.CLOSE)]
            else:
                lesson = "Lesson:" in p
                right = {"k": lesson, "h": not lesson, "z": True}.get(c, lesson) or (
                    any(asked.startswith(t) for t in canary) and w == first["w"])
                full = " B\n" if right else " C\n"
                text = full[:-1]
            ids = tok(full, add_special_tokens=False).input_ids
            out += [common.Sample(0, text, ids, [0.0] * len(ids), "stop") for _ in range(n)]
        return out
    return sample


def run_inproc(monkeypatch, files, out, *extra, data="q.jsonl"):
    calls, snaps = [], []
    real_save = common.save_checkpoint

    def save(out_, model, tok, opt=None, step=0, extra=None):
        snaps.append((step, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return real_save(out_, model, tok, opt, step=step, extra=extra)

    argv = ["grpo_introspect.py", "--model", str(files / "model"), "--data", str(files / data),
            "--out", str(out), "--N", "4", "--M", "2", "--max-intros", "2", "--canary-every", "1",
            "--lr", "0.05", "--matrix-M", "2", *extra]
    canary = {q.question for q in g.make_split(g.build_parser().parse_args(argv[1:]))["canary"]}
    monkeypatch.setattr(common, "sample", scripted_sampler(calls, canary))
    monkeypatch.setattr(common, "save_checkpoint", save)
    monkeypatch.setattr(sys, "argv", argv)
    g.main()
    metrics = common.read_jsonl(out / "metrics.jsonl")
    return metrics, common.load_bank(out / "library.json", "introspection-library")["entries"], calls, snaps


def test_end_to_end_introspections_are_scored_and_update_exactly_the_right_weights(
        tiny_run_files, tmp_path, monkeypatch):
    files, out = tiny_run_files, tmp_path / "run"
    model0 = AutoModelForCausalLM.from_pretrained(files / "model")
    metrics, entries, calls, snaps = run_inproc(monkeypatch, files, out, "--steps", "4")
    tok = common.load_model(str(files / "model"))[1]
    qs = {q.id: q for q in common.load_questions(files / "q.jsonl")}
    upd_steps = [m["step"] for m in metrics if m["updated"]]
    assert upd_steps and len(upd_steps) < len(metrics), "the test needs steps with and without updates"

    # the library holds the scored lessons, from the k steps only, with A_intro = +1 on a Q' != Q
    assert entries and all(e["text"] == "k means y." and e["A_intro"]["mean"] == 1.0 for e in entries)
    assert all(e["source_question"] not in e["A_intro"]["transfer_questions"] for e in entries)
    assert all(e["used_for_update"] for e in entries)
    assert all(m["A_oracle"]["mean"] == 1.0 for m in metrics)        # the data's lesson, scored alike

    prev = {k: v.clone() for k, v in model0.state_dict().items()}
    for m, (step, w) in zip(metrics, snaps):
        assert step == m["step"] + 1
        if not m["updated"]:
            assert all(torch.equal(w[k], prev[k]) for k in w), f"step {m['step']} changed weights without an update"
        else:
            # the expected SGD step, from a loss rebuilt independently on the full logits
            model0.load_state_dict(prev)
            Q = qs[m["question"]]
            prompt = common.encode(tok, common.question_prompt(tok, Q, instruction=g.INTROSPECT_HINT))
            comp = tok(f" B {g.OPEN}k means y.{g.CLOSE}", add_special_tokens=False).input_ids
            mask = torch.tensor(g.introspection_mask(tok, comp), dtype=torch.float)
            logp = torch.log_softmax(model0(input_ids=torch.tensor([prompt + comp])).logits[0] / 0.7, -1)
            lp = logp[len(prompt) - 1:-1].gather(1, torch.tensor(comp)[:, None])[:, 0]
            n_upd = m["updated"]                                   # identical rollouts, A = 1 each
            loss = -(n_upd * (lp * mask).sum()) / (n_upd * mask.sum())
            model0.zero_grad()
            loss.backward()
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model0.parameters()))
            assert float(norm) == pytest.approx(m["grad_norm"], rel=1e-4)
            scale = min(1.0, 1.0 / (float(norm) + 1e-6))
            for (k, p) in model0.named_parameters():
                torch.testing.assert_close(w[k], prev[k] - 0.05 * scale * p.grad, atol=1e-6, rtol=1e-5)
            assert m["weight_change"]["norm"] == pytest.approx(0.05 * min(float(norm), 1.0), rel=1e-3)
        prev = w

    # the canary was right until the first update, then wrong: the alarm fires after it, not before
    first_upd = upd_steps[0]
    assert [m["canary_alarm"] for m in metrics] == [m["step"] > first_upd for m in metrics]

    # every purpose drew its own random numbers: none shared between sampling on Q, scoring, canary, report
    by_purpose = {}
    for purpose, seeds in calls:
        by_purpose.setdefault(purpose, set()).update(seeds)
    assert {"rollouts on Q", "transfer rollouts", "canary", "transfer matrix", "evaluation"} <= set(by_purpose)
    names = list(by_purpose)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not by_purpose[a] & by_purpose[b], (a, b)


def test_resume_restores_the_checkpoint_weights_not_the_base(tiny_run_files, tmp_path, monkeypatch):
    files = tiny_run_files
    straight = run_inproc(monkeypatch, files, tmp_path / "a", "--steps", "4")
    assert any(m["updated"] for m in straight[0][:2]), "needs an update before the resume point"
    run_inproc(monkeypatch, files, tmp_path / "b", "--steps", "2")
    resumed = run_inproc(monkeypatch, files, tmp_path / "b", "--steps", "4", "--resume")
    assert [m["step"] for m in resumed[0]] == [0, 1, 2, 3]
    a = straight[3][-1][1]
    b = resumed[3][-1][1]
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must continue from its checkpoint"
    # the same steps as the straight run (the script's canary, keyed on the weights a process
    # starts with, and the timings are the only fields that may differ)
    same = lambda m: {k: v for k, v in m.items() if k not in ("canary", "canary_alarm", "step_time", "peak_memory_mb", "rollout_sync_s")}
    assert [same(m) for m in resumed[0]] == [same(m) for m in straight[0]]


def test_report_command_runs_as_printed_and_out_is_not_reused(tiny_run_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_inproc(monkeypatch, tiny_run_files, out, "--steps", "1", "--no-oracle", "--matrix-M", "0")
    cmd = (out / "report.md").read_text().splitlines()[2].strip("`")
    assert shlex.split(cmd)[1:] == sys.argv and "--no-oracle" in cmd and "--matrix-M 0" in cmd
    with pytest.raises(common.UserError, match="already holds a run"):
        run_inproc(monkeypatch, tiny_run_files, out, "--steps", "1")
    with pytest.raises(common.UserError, match=r"--M 2 -> 3"):
        run_inproc(monkeypatch, tiny_run_files, out, "--steps", "2", "--no-oracle", "--matrix-M", "0",
                   "--resume", "--M", "3")


# ----------------------------------------------------------------------------
# real runs (the real sampler on the tiny model), killed with SIGKILL at each dangerous point


def test_run_writes_library_metrics_report_and_checkpoint(tiny_run_files, tmp_path):
    out = tmp_path / "run"
    r = run(tiny_run_files, out, "--steps", "3")
    assert "report:" in r.stdout
    metrics = common.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all("A_oracle" in m and m["A_oracle"]["n"] == 2 for m in metrics)   # oracle scored on one Q', M=2
    assert "canary" in metrics[0]
    assert (out / "report.md").read_text().startswith("# GRPO")
    assert (out / "checkpoint" / "model.safetensors").exists()


@pytest.mark.parametrize("point", ["after_metrics:2", "checkpoint_between_renames:1", "torn_jsonl:3"])
def test_killed_run_resumes_without_loss_or_duplicates(tiny_run_files, tmp_path, point):
    """SIGKILL (no clean-up possible) between metrics and checkpoint, between the checkpoint's two
    renames, and mid-way through a metrics line; --resume then logs every step exactly once."""
    out = tmp_path / "run"
    r = subprocess.run(killing_cmd(run_cmd(tiny_run_files, out, "--steps", "4"), point), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    if point.startswith("checkpoint"):
        assert not (out / "checkpoint").exists() and (out / "checkpoint.old").exists()
    r = run(tiny_run_files, out, "--steps", "4", "--resume")
    assert "resuming" in r.stdout and "at step 0" not in r.stdout, r.stdout
    metrics = common.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(4))
    ids = [e["id"] for e in common.load_bank(out / "library.json", "introspection-library")["entries"]]
    assert len(ids) == len(set(ids))
