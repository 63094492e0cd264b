"""Memory of scoring the functions of `tool_choice: required` (serving.decoding.continuation_logps).

For each prompt length, a one-layer Qwen 2 model with Qwen's vocabulary of 151,936 tokens
(random weights: the vocabulary is what makes logits large) scores eight three-token names
after the prompt, each length in a fresh process; the figure is the growth of the process's
peak resident memory during the call, and the shape of the largest logits tensor it built.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_choice_scoring.py 250 1000 8000
"""

from __future__ import annotations

import json
import subprocess
import sys

ONE = """
import resource, sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from serving.decoding import LoadedModel, continuation_logps
n = int(sys.argv[1])
cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768)
model = Qwen2ForCausalLM(cfg).eval()
shapes = []
forward = model.forward
model.forward = lambda *a, **k: (lambda out: (shapes.append(tuple(out.logits.shape)), out)[1])(forward(*a, **k))
class Tok:
    pad_token_id = 0
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
continuation_logps(LoadedModel(model, Tok(), 32768), list(range(1, n + 1)), [[5, 6, 7]] * 8)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
print(__import__("json").dumps({"prompt_tokens": n, "peak_rss_growth_gib": round(grew, 3),
                                "largest_logits": max(shapes, key=lambda s: s[0] * s[1] * s[2])}))
"""


def main(lengths: list[int]) -> None:
    for n in lengths:
        out = subprocess.run([sys.executable, "-c", ONE, str(n)], capture_output=True, text=True, check=True)
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1])))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [250, 1000, 8000])
