"""grpo_introspect.py: the advantage, the loss, the introspection mask, and a resumable run."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_gemma

import common
import grpo_introspect as g

ROOT = Path(__file__).resolve().parent.parent


def test_A_intro_is_difference_of_means():
    with_r = np.array([1, 1, 0, 1, 1, 0, 1, 1])
    base = np.array([0, 1, 0, 0, 1, 0, 0, 1])
    a = g.paired_advantage(with_r, base)
    assert a["mean"] == pytest.approx(with_r.mean() - base.mean()) and a["n"] == 8
    assert a["lo"] < a["mean"] < a["hi"]


def test_pairing_cuts_variance_when_rows_are_correlated():
    rng = np.random.default_rng(0)
    u = rng.random(400)                  # shared random numbers, as in paired sampling
    base, with_r = (u < 0.4).astype(float), (u < 0.6).astype(float)
    a = g.paired_advantage(with_r, base)
    assert a["mean"] == pytest.approx(0.2, abs=0.06)
    assert a["var_paired"] < 0.5 * a["var_unpaired"]


def test_gradient_only_on_introspection_tokens(tiny):
    """Through the real pieces: the mask from the text, token_logprobs, pg_loss, backward."""
    model, tok = tiny
    comp = tok(" B because <introspection>rook first</introspection>", add_special_tokens=False).input_ids
    mask = g.introspection_mask(tok, comp)
    assert tok.decode([t for t, m in zip(comp, mask) if m]) == "<introspection>rook first</introspection>"
    prompt = common.encode(tok, "Question: which moves first?\nAnswer:")
    lp = common.token_logprobs(model, [prompt], [comp], pad_id=tok.pad_token_id)
    logprobs = lp["logprobs"].detach().requires_grad_(True)
    loss = g.pg_loss(logprobs, torch.tensor([mask]), torch.tensor([0.5]))
    loss.backward()
    grad = logprobs.grad[0]
    m = torch.tensor(mask)
    assert torch.all(grad[~m] == 0)
    assert torch.allclose(grad[m], torch.full((int(m.sum()),), -0.5 / m.sum().item()))


def test_no_mask_without_an_introspection(tiny_tok):
    ids = tiny_tok(" B because", add_special_tokens=False).input_ids
    assert not any(g.introspection_mask(tiny_tok, ids))


def test_extract_needs_a_closed_tag(tiny_tok):
    ids = tiny_tok(" C <introspection>rook first</introspection>", add_special_tokens=False).input_ids
    closed = common.Sample(0, " C <introspection>rook first", ids, [0.0] * len(ids), "stop")
    assert g.extract_introspection(tiny_tok, closed) == "rook first"
    cut = common.Sample(0, " C <introspection>rook fi", ids[:-20], [0.0] * (len(ids) - 20), "length")
    assert g.extract_introspection(tiny_tok, cut) is None


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
    model = make_tiny_gemma(len(tiny_tok), seed=3)
    model.save_pretrained(d / "model")
    tiny_tok.save_pretrained(d / "model")
    rows = [{"id": f"{c}{i}", "cluster": c, "subtype": "s", "question": f"{c} question {i}?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq", "lesson": f"{c} means y."}
            for c in ("k", "f") for i in range(4)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def run(files, out, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "grpo_introspect.py"), "--model", str(files / "model"),
           "--data", str(files / "q.jsonl"), "--out", str(out), "--N", "4", "--M", "2",
           "--max-new-tokens", "12", "--answer-tokens", "4", "--oracle", "--matrix-M", "2", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_run_writes_library_metrics_report_and_checkpoint(tiny_run_files, tmp_path):
    out = tmp_path / "run"
    r = run(tiny_run_files, out, "--steps", "3")
    assert "report:" in r.stdout
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert all("A_oracle" in m and m["A_oracle"]["n"] == 2 for m in metrics)   # oracle scored on one Q', M=2
    assert "canary" in metrics[0]
    assert common.load_bank(out / "library.json", "introspection-library")["entries"] is not None
    assert (out / "report.md").read_text().startswith("# GRPO")
    assert (out / "checkpoint" / "model.safetensors").exists()


def test_killed_run_resumes_without_loss_or_duplicates(tiny_run_files, tmp_path):
    out = tmp_path / "run"
    proc = run(tiny_run_files, out, "--steps", "12", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:      # kill once two steps are logged
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; the test proves nothing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len((out / "metrics.jsonl").read_text().splitlines())
    assert killed_at < 12
    run(tiny_run_files, out, "--steps", "12", "--resume")
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(12))
    lib = common.load_bank(out / "library.json", "introspection-library")
    ids = [e["id"] for e in lib["entries"]]
    assert len(ids) == len(set(ids))
