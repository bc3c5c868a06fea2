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
SAMPLE = str(ROOT / "data" / "sample.jsonl")

# script -> arguments every row of it gets (an existing data file, so only the bad flag is wrong)
BASE = {
    "grpo_introspect.py": ["--data", DATA],
    "data/make_procedural.py": [],
    "data/calibrate.py": ["--data", DATA],
    "bench/bench_memory.py": ["--data", DATA],
    "data/import.py": [SAMPLE, "--format", "columns", "--map", "question=question,choices=choices,answer=answer,cluster=cluster"],
    "bench/bench_sampler.py": [],
    "bench/bench_rollouts.py": [],
    "bench/bench_grpo_step.py": [],
    "pmd_distill.py": ["--data", DATA],
    "bench/bench_sft.py": [],
    "bench/bench_train_step.py": [],
    "dream.py": ["--data", DATA, "--cluster", "velt-code", "--subtype", "hands"],
    "sft_recall.py": ["--data", DATA, "--lessons", "data"],
    "bench/sweep_sft_lr.py": ["--run", str(ROOT)],
}

# (script, bad arguments, what the one line must name)
CASES = [
    ("bench/sweep_sft_lr.py", ["--lrs", "1e-4", "0"], "--lrs 0.0: must be a number greater than 0"),
    ("bench/sweep_sft_lr.py", [], "no config.json (not a finished sft_recall.py run)"),
    ("data/calibrate.py", ["--rollout-dtype", "fp8"], "--rollout-dtype fp8"),
    ("bench/bench_sft.py", ["--batch", "0"], "--batch 0"),
    ("bench/bench_sft.py", ["--repeats", "0"], "--repeats 0"),
    ("bench/bench_sft.py", ["--tokens", "64", "--trained", "64"], "--tokens 64: must be at least 65"),
    ("bench/bench_sft.py", ["--device", "cuda"], "--device cuda"),
    ("bench/bench_train_step.py", ["--G", "0"], "--G 0"),
    ("bench/bench_train_step.py", ["--B", "0"], "--B 0"),
    ("bench/bench_train_step.py", ["--temperature", "0"], "--temperature 0"),
    ("bench/bench_train_step.py", ["--min-new-tokens", "-1"], "--min-new-tokens -1"),
    ("bench/bench_train_step.py", ["--device", "cuda"], "--device cuda"),
    ("grpo_introspect.py", ["--N", "0"], "--N 0: must be at least 1"),
    ("grpo_introspect.py", ["--M", "-1"], "--M -1: must be at least 1"),
    ("grpo_introspect.py", ["--steps", "0"], "--steps 0"),
    ("grpo_introspect.py", ["--transfer-questions", "0"], "--transfer-questions 0"),
    ("grpo_introspect.py", ["--max-intros", "0"], "--max-intros 0"),
    ("grpo_introspect.py", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("grpo_introspect.py", ["--answer-tokens", "0"], "--answer-tokens 0"),
    ("grpo_introspect.py", ["--canary-every", "0"], "--canary-every 0"),
    ("grpo_introspect.py", ["--canary-samples", "0"], "--canary-samples 0"),
    ("grpo_introspect.py", ["--save-every", "0"], "--save-every 0"),
    ("grpo_introspect.py", ["--correction-turns", "-1"], "--correction-turns -1"),
    ("grpo_introspect.py", ["--matrix-M", "-2"], "--matrix-M -2"),
    ("grpo_introspect.py", ["--temperature", "0"], "--temperature 0.0: must be a number greater than 0"),
    ("grpo_introspect.py", ["--lr", "0"], "--lr 0.0"),
    ("grpo_introspect.py", ["--clip", "-1"], "--clip -1.0"),
    ("grpo_introspect.py", ["--seed", "-3"], "--seed -3"),
    ("grpo_introspect.py", ["--device", "cuda"], "--device cuda"),
    ("grpo_introspect.py", ["--dtype", "float8"], "--dtype"),
    ("grpo_introspect.py", ["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
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
    ("data/import.py", ["--limit", "0"], "--limit 0: must be at least 2"),
    ("data/import.py", ["--limit", "1"], "--limit 1: must be at least 2"),
    ("data/import.py", ["--seed", "-1"], "--seed -1"),
    ("data/import.py", ["--cluster-field", "topic"], "--cluster-field topic: no such field"),
    ("data/import.py", ["--map", "question=question"], "needs at least question=COLUMN and answer=COLUMN"),
    ("data/import.py", ["--map", "question=question,answer=answer,lessson=x"], "unknown key 'lessson'"),
    ("data/import.py", ["--map", "question=stem,answer=key"], "expected fields stem, key"),
    ("data/import.py", ["--format", "mmlu"], "--map question=question"),            # --map is for columns only
    ("data/import.py", ["--out", SAMPLE], "is the input file"),
    ("data/import.py", ["--strict"], "sample.jsonl:1: field 'choices': missing"),  # a number question, no options
    ("grpo_introspect.py", ["--rollout-dtype", "float8"], "--rollout-dtype float8"),
    ("bench/bench_sampler.py", ["--repeats", "0"], "--repeats 0"),
    ("bench/bench_sampler.py", ["--n", "16", "0"], "--n 0"),
    ("bench/bench_sampler.py", ["--dtypes", "float8"], "--dtypes float8"),
    ("bench/bench_rollouts.py", ["--N", "0"], "--N 0"),
    ("bench/bench_rollouts.py", ["--new-tokens", "0"], "--new-tokens 0"),
    ("bench/bench_grpo_step.py", ["--steps", "0"], "--steps 0"),
    ("bench/bench_grpo_step.py", ["--dtypes", "fp8"], "--dtypes fp8"),
    ("pmd_distill.py", ["--epochs", "0"], "--epochs 0"),
    ("pmd_distill.py", ["--B", "0"], "--B 0"),
    ("pmd_distill.py", ["--G", "0"], "--G 0"),
    ("pmd_distill.py", ["--train-per-type", "0"], "--train-per-type 0"),
    ("pmd_distill.py", ["--dev-per-type", "0"], "--dev-per-type 0"),
    ("pmd_distill.py", ["--test-per-type", "0"], "--test-per-type 0"),
    ("pmd_distill.py", ["--temperature", "0"], "--temperature 0"),
    ("pmd_distill.py", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("pmd_distill.py", ["--lr", "-1"], "--lr -1"),
    ("pmd_distill.py", ["--clip", "0"], "--clip 0"),
    ("pmd_distill.py", ["--micro-batch", "0"], "--micro-batch 0"),
    ("pmd_distill.py", ["--top-k", "0"], "--top-k 0"),
    ("pmd_distill.py", ["--alpha", "1.5"], "--alpha 1.5"),
    ("pmd_distill.py", ["--ema", "-0.1"], "--ema -0.1"),
    ("pmd_distill.py", ["--memory-tokens", "0"], "--memory-tokens 0"),
    ("pmd_distill.py", ["--max-success", "0"], "--max-success 0"),
    ("pmd_distill.py", ["--max-failure", "-1"], "--max-failure -1"),
    ("pmd_distill.py", ["--insights-per-question", "0"], "--insights-per-question 0"),
    ("pmd_distill.py", ["--insights-per-subtype", "0"], "--insights-per-subtype 0"),
    ("pmd_distill.py", ["--gate-siblings", "0"], "--gate-siblings 0"),
    ("pmd_distill.py", ["--eval-samples", "0"], "--eval-samples 0"),
    ("pmd_distill.py", ["--dev-samples", "0"], "--dev-samples 0"),
    ("pmd_distill.py", ["--save-every", "0"], "--save-every 0"),
    ("pmd_distill.py", ["--pass-k", "16", "--eval-samples", "2"], "--pass-k 16: k larger than n"),
    ("pmd_distill.py", ["--levels", "experience,wisdom"], "unknown level 'wisdom'"),
    ("pmd_distill.py", ["--freeze", "memory", "--method", "sdpo"], "--freeze memory: only with --method pmd"),
    ("pmd_distill.py", ["--freeze", "policy", "--method", "grpo"], "--freeze policy: only with --method pmd"),
    ("pmd_distill.py", ["--seed", "-1"], "--seed -1"),
    ("pmd_distill.py", ["--device", "cuda:5"], "--device cuda:5"),
    ("pmd_distill.py", ["--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    ("dream.py", ["--N", "1"], "--N 1"),
    ("dream.py", ["--steps", "0"], "--steps 0"),
    ("dream.py", ["--teacher-samples", "0"], "--teacher-samples 0"),
    ("dream.py", ["--batch-inputs", "0"], "--batch-inputs 0"),
    ("dream.py", ["--dev-questions", "0"], "--dev-questions 0"),
    ("dream.py", ["--eval-questions", "0"], "--eval-questions 0"),
    ("dream.py", ["--permutations", "-1"], "--permutations -1"),
    ("dream.py", ["--fresh", "-1"], "--fresh -1"),
    ("dream.py", ["--gate-samples", "0"], "--gate-samples 0"),
    ("dream.py", ["--dev-samples", "0"], "--dev-samples 0"),
    ("dream.py", ["--eval-samples", "0"], "--eval-samples 0"),
    ("dream.py", ["--canary-every", "0"], "--canary-every 0"),
    ("dream.py", ["--canary-questions", "-1"], "--canary-questions -1"),
    ("dream.py", ["--canary-samples", "-1"], "--canary-samples -1"),
    ("dream.py", ["--replay-questions", "-1"], "--replay-questions -1"),
    ("dream.py", ["--answer-tokens", "0"], "--answer-tokens 0"),
    ("dream.py", ["--bootstrap", "0"], "--bootstrap 0"),
    ("dream.py", ["--cd-top-k", "0"], "--cd-top-k 0"),
    ("dream.py", ["--lr", "0"], "--lr 0"),
    ("dream.py", ["--clip", "-1"], "--clip -1"),
    ("dream.py", ["--temperature", "0"], "--temperature 0"),
    ("dream.py", ["--cd-coef", "-0.5"], "--cd-coef -0.5"),
    ("dream.py", ["--kl", "nan"], "--kl nan"),
    ("dream.py", ["--min-agreement", "1.5"], "--min-agreement 1.5"),
    ("dream.py", ["--seed", "-1"], "--seed -1"),
    ("dream.py", ["--device", "cuda"], "--device cuda"),
    ("dream.py", ["--resume"], "--resume"),
    ("dream.py", ["--lesson", ""], "empty lesson"),
    ("dream.py", ["--cluster", "nowhere"], "type nowhere/hands is not in"),
    ("dream.py", ["--eval-questions", "16"], "too few"),
    ("dream.py", ["--model", "/nonexistent-checkpoint"], "not a checkpoint"),
    ("dream.py", ["--library", "/nonexistent/library.json"], "no such file"),
    ("dream.py", ["--recall-from", "/nonexistent-run"], "not a sft_recall.py run"),
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
