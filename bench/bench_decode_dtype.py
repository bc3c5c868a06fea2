"""One decode step at n=16 on the embedded Gemma: the fp32 weights against the bf16 rollout copy,
interleaved, 3 timed repeats of 10 steps each after a warm-up (median [min, max] ms per step).

    python bench/bench_decode_dtype.py
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import common  # noqa: E402
from transformers import DynamicCache  # noqa: E402

model, tok = common.load_model("gemma", "cpu", "float32")
roll = common.rollout_copy(model, "bfloat16")
print("native bf16:", common.cpu_has_fast_bf16(), "| threads", torch.get_num_threads())
ids = torch.tensor([common.encode(tok, "Question: In the Velt road code, what does red mean?\nAnswer:")] * 16)
res = {"float32": [], "bfloat16": []}
with torch.no_grad():
    for rep in range(4):
        for name, m in (("float32", model), ("bfloat16", roll)):
            cache = DynamicCache()
            out = m(input_ids=ids, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(10):
                out = m(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
            if rep:
                res[name].append((time.perf_counter() - t0) / 10 * 1000)
for k, v in res.items():
    print(f"{k}: {statistics.median(v):.0f} [{min(v):.0f}, {max(v):.0f}] ms per decode step at n=16")
r = [b / a for a, b in zip(res["float32"], res["bfloat16"])]
print(f"bf16 / fp32 time: {statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]")
