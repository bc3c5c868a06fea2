"""Every stage checks its flags before it loads or writes anything: one line, exit 2, no traceback.

Each row runs a script's main() in-process (fast: no new interpreter per row) under
common.run_main, with common.load_model and common.setup_run replaced by traps, so a check that
comes too late fails the test instead of loading Gemma. Add a row whenever a stage gains a flag.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "data" / "procedural.jsonl")

# script -> arguments every row of it gets (an existing data file, so only the bad flag is wrong)
BASE = {
    "data/make_procedural.py": [],
    "data/calibrate.py": ["--data", DATA],
    "bench/bench_memory.py": ["--data", DATA],
    "sft_recall.py": ["--data", DATA, "--lessons", "data"],
}

# (script, bad arguments, what the one line must name)
CASES = [
    ("data/make_procedural.py", ["--per-subtype", "1"], "--per-subtype 1"),
    ("data/make_procedural.py", ["--seed", "-1"], "--seed -1"),
    ("data/calibrate.py", ["--samples", "0"], "--samples 0"),
    ("data/calibrate.py", ["--temperature", "0"], "--temperature 0"),
    ("data/calibrate.py", ["--bootstrap", "0"], "--bootstrap 0"),
    ("data/calibrate.py", ["--device", "cuda"], "--device cuda"),
    ("data/calibrate.py", ["--device", "tpu"], "--device tpu"),
    ("data/calibrate.py", ["--dtype", "float8"], "--dtype"),
    ("data/calibrate.py", ["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ("bench/bench_memory.py", ["--steps", "0"], "--steps 0"),
    ("bench/bench_memory.py", ["--N", "0"], "--N 0"),
    ("bench/bench_memory.py", ["--device", "cuda:7"], "--device cuda:7"),
    ("sft_recall.py", ["--holdout", "0"], "--holdout 0"),
    ("sft_recall.py", ["--holdout", "1"], "--holdout 1"),
    ("sft_recall.py", ["--dev", "1"], "--dev 1"),
    ("sft_recall.py", ["--base-ok", "0"], "--base-ok 0"),
    ("sft_recall.py", ["--samples", "0"], "--samples 0"),
    ("sft_recall.py", ["--eval-samples", "0"], "--eval-samples 0"),
    ("sft_recall.py", ["--temperature", "0"], "--temperature 0"),
    ("sft_recall.py", ["--answer-tokens", "0"], "--answer-tokens 0"),
    ("sft_recall.py", ["--recall-tokens", "0"], "--recall-tokens 0"),
    ("sft_recall.py", ["--max-len", "4"], "--max-len 4"),
    ("sft_recall.py", ["--epochs", "0"], "--epochs 0"),
    ("sft_recall.py", ["--batch-size", "0"], "--batch-size 0"),
    ("sft_recall.py", ["--lr", "0"], "--lr 0"),
    ("sft_recall.py", ["--warmup", "-1"], "--warmup -1"),
    ("sft_recall.py", ["--clip", "0"], "--clip 0"),
    ("sft_recall.py", ["--weight-decay", "-1"], "--weight-decay -1"),
    ("sft_recall.py", ["--fresh", "-1"], "--fresh -1"),
    ("sft_recall.py", ["--fresh-seed", "-1"], "--fresh-seed -1"),
    ("sft_recall.py", ["--canary-questions", "-1"], "--canary-questions -1"),
    ("sft_recall.py", ["--compose-questions", "-1"], "--compose-questions -1"),
    ("sft_recall.py", ["--seed", "-1"], "--seed -1"),
    ("sft_recall.py", ["--lessons", "library"], "nothing to select from"),
    ("sft_recall.py", ["--library", DATA], "not a readable JSON bank"),
    ("sft_recall.py", ["--canary", DATA], "--canary"),
]


def load_script(rel: str):
    path = ROOT / rel
    spec = importlib.util.spec_from_file_location("stage_" + path.stem.replace("-", "_"), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def trap(*a, **k):
    raise AssertionError("the stage loaded a model or created a run folder before checking its flags")


@pytest.mark.parametrize("script, argv, names", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_flag_is_one_line_exit_2_nothing_written(script, argv, names, tmp_path, monkeypatch, capsys):
    mod = load_script(script)
    monkeypatch.chdir(tmp_path)                       # a default runs/ folder would appear here
    monkeypatch.setattr(common, "load_model", trap)
    monkeypatch.setattr(common, "setup_run", trap)
    out = tmp_path / "run"
    extra = ["--out", str(out)] if "--out" in (ROOT / script).read_text() else []
    monkeypatch.setattr(sys, "argv", [script, *BASE[script], *extra, *argv])
    with pytest.raises(SystemExit) as e:
        common.run_main(mod.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert names in err[0], err
    assert list(tmp_path.iterdir()) == [], "something was written"


def test_cuda_on_a_cpu_torch_says_what_is_available():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(common.UserError, match=r"--device cuda: .*available: cpu"):
        common.check_device("cuda")


def test_no_traceback_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data" / "make_procedural.py"), "--per-subtype", "0",
                        "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --per-subtype 0: must be at least 2"
    assert "Traceback" not in r.stderr and not (tmp_path / "x.jsonl").exists()
