"""Model loading, prompt formats, checkpoints that from_pretrained reloads, resumable state."""
import importlib
import json
import os

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_gemma
from transformers import AutoModelForCausalLM, AutoTokenizer

import common

Q = common.Question("q", "c", "Which is largest?", "B", "mcq", choices=["1", "3", "2"])


def test_plain_completion_format_for_base_models(tiny_tok):
    p = common.question_prompt(tiny_tok, Q, lesson="Compare digits.")
    assert p.startswith(common.FORMAT_EXAMPLES + "Lesson: ")
    p = common.question_prompt(tiny_tok, Q, lesson="Compare digits.", examples=False)
    assert p == "Lesson: Compare digits.\n\nQuestion: Which is largest?\nA) 1\nB) 3\nC) 2\nAnswer:"
    assert common.encode(tiny_tok, p)[0] == tiny_tok.bos_token_id


def test_chat_template_used_when_the_tokenizer_has_one():
    tok = make_char_tokenizer(chat_template="{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                            "{% endfor %}{% if add_generation_prompt %}<model>{% endif %}")
    p = common.question_prompt(tok, Q)
    assert p.startswith("<bos><user>Question: Which is largest?") and p.endswith("<model>")  # no examples
    assert common.encode(tok, p).count(tok.bos_token_id) == 1     # BOS not added twice
    assert common.question_prompt(tok, Q, chat=False).endswith("Answer:")


def test_checkpoint_reloads_with_from_pretrained(tmp_path, tiny_tok):
    model = make_tiny_gemma(len(tiny_tok), seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.save_checkpoint(tmp_path, model, tiny_tok, opt, step=3, extra={"library_size": 5})
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    ids = torch.tensor([common.encode(tiny_tok, "Question: hi")])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "checkpoint")("ab").input_ids == tiny_tok("ab").input_ids
    common.save_checkpoint(tmp_path, model, tiny_tok, opt, step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]   # replaced, nothing left over


def test_resume_restores_step_optimizer_and_rng(tmp_path, tiny_tok):
    model = make_tiny_gemma(len(tiny_tok), seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[2, 5, 6]])).logits.sum().backward()
    opt.step()
    torch.manual_seed(11)
    common.save_checkpoint(tmp_path, model, tiny_tok, opt, step=7, extra={"seen": ["q1"]})
    expected = torch.rand(3)
    torch.manual_seed(0)                                   # the "crash": state lost
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = common.load_resume_state(tmp_path, opt2)
    assert state["step"] == 7 and state["extra"] == {"seen": ["q1"]}
    torch.testing.assert_close(torch.rand(3), expected)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s1[k]["exp_avg"], s2[k]["exp_avg"])
    assert common.load_resume_state(tmp_path / "elsewhere") is None


def test_unknown_model_folder_is_a_user_error(tmp_path):
    with pytest.raises(common.UserError, match="--model"):
        common.load_model(str(tmp_path / "no-such-model"))


def test_bad_dtype_is_a_user_error():
    with pytest.raises(common.UserError, match="--dtype"):
        common.pick_dtype(torch.device("cpu"), "float8")


@pytest.mark.gemma
def test_gemma_loads_from_cached_folder_without_the_gguf(gemma, monkeypatch):
    """After the one-time conversion, load_model("gemma") reads the safetensors folder only."""
    real_import = importlib.import_module

    def no_gguf(name, *a, **k):
        if name == common.EMBEDDED["gemma"][0]:
            raise AssertionError("the GGUF package was used again")
        return real_import(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_gguf)
    model, tok = common.load_model("gemma")
    assert (common.embedded_dir("gemma") / "model.safetensors").exists()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(268e6, rel=0.01)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 1, 0)
    torch.testing.assert_close(model.get_output_embeddings().weight[:100], gemma[0].get_output_embeddings().weight[:100])


def _save(tmp_path, tiny_tok, step):
    model = make_tiny_gemma(len(tiny_tok), seed=step)
    common.save_checkpoint(tmp_path, model, tiny_tok, step=step)
    return model


def test_kill_between_the_two_renames_leaves_a_checkpoint_resume_finds(tmp_path, tiny_tok, monkeypatch):
    """save_checkpoint moves checkpoint/ aside, then renames the new one in. A kill in between
    (simulated: the second rename never happens) must leave a complete checkpoint, and the newest."""
    _save(tmp_path, tiny_tok, 1)
    real = common.os.replace

    def replace_then_die(src, dst):
        if str(src).endswith("checkpoint.tmp"):
            raise KeyboardInterrupt("killed between the renames")
        return real(src, dst)

    monkeypatch.setattr(common.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, tiny_tok, 2)
    monkeypatch.setattr(common.os, "replace", real)
    assert not (tmp_path / "checkpoint").exists()                 # the state a kill leaves
    ck = common.find_checkpoint(tmp_path)
    assert ck == tmp_path / "checkpoint"
    assert common.load_resume_state(tmp_path)["step"] == 2         # the finished new one, not the old
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()


def test_an_unfinished_new_checkpoint_falls_back_to_the_old(tmp_path, tiny_tok):
    _save(tmp_path, tiny_tok, 1)
    os_ = common.os
    os_.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()                          # killed while writing: no resume.pt
    assert common.load_resume_state(tmp_path)["step"] == 1
    assert common.find_checkpoint(tmp_path) == tmp_path / "checkpoint"


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "acc')
    assert common.read_jsonl(p) == [{"step": 0}, {"step": 1}]
    assert "torn last line" in capsys.readouterr().err
    p.write_text('{"step": 0}\n{"step": 1, "acc\n{"step": 2}\n')
    with pytest.raises(common.UserError, match=r"metrics.jsonl:2: not valid JSON"):
        common.read_jsonl(p)


def test_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    import argparse
    args = argparse.Namespace(out=str(tmp_path / "r"), resume=False, seed=0, steps=3, N=4, data="a.jsonl",
                              device=None)
    common.setup_run(args, "x")
    with pytest.raises(common.UserError, match="already holds a run; pass --resume"):
        common.setup_run(args, "x")
    args.resume, args.steps = True, 10                             # run length may change
    common.setup_run(args, "x")
    args.N, args.data = 8, "b.jsonl"
    with pytest.raises(common.UserError, match=r"--N 4 -> 8, --data 'a.jsonl' -> 'b.jsonl'"):
        common.setup_run(args, "x")


def test_config_records_the_machine_of_each_start(tmp_path, monkeypatch):
    """config.json keeps one machine record per start (CPU, versions, commit); a resume on another
    machine adds its own record and is not refused for it."""
    import argparse
    args = argparse.Namespace(out=str(tmp_path / "r"), resume=False, seed=0, steps=3, device=None)
    common.setup_run(args, "x")
    first = json.loads((tmp_path / "r" / "config.json").read_text())["machines"]
    assert len(first) == 1 and first[0]["torch"] == torch.__version__ and first[0]["cpus"] == os.cpu_count()
    assert {"cpu", "fast_bf16", "transformers", "commit"} <= set(first[0])
    monkeypatch.setattr(common, "machine", lambda: {"cpu": "another CPU"})
    args.resume = True
    common.setup_run(args, "x")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["machines"] == first + [{"cpu": "another CPU"}]


def test_weight_delta_is_measured_not_inferred():
    p = torch.nn.Parameter(torch.tensor([0.02, 1.0, 3.0]))
    before = [p.detach().clone()]
    with torch.no_grad():
        p += torch.tensor([1e-12, 0.5, 0.0])                       # 1e-12 is below fp32 resolution at 0.02
    d = common.weight_delta([p], before)
    assert d["frac_changed"] == pytest.approx(1 / 3)
    assert d["norm"] == pytest.approx(0.5) and d["max"] == pytest.approx(0.5)
