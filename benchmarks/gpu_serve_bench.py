"""The serving engine's two decoding loops on one model: the own loop against transformers' paged
continuous batching (`serving.engine: own` and `transformers`), requests/s at 1 and 64 clients.

Self-contained, for one run on a GPU: no hub, no registry, no HTTP. The model is a Llama of
random weights (gpu_bench.py's ~1B shape: hidden 2048, 16 layers, 32 heads, MLP 5632; the
vocabulary of the project's tiny tokenizer, so that every generated id decodes), in bf16 on
CUDA, one copy per loop (the library switches its model to paged attention in place, which
the own loop's forward cannot run). Both loops run in this process behind the interface the service's engine process
drives (`serving.engine.Engine`, `serving.library_engine.LibraryEngine`), with the service's
defaults (`serving.max_batch`, join settings). For each concurrency level, that many
closed-loop clients submit greedy rows back to back (random prompts of 64-256 tokens,
`--max-new` tokens each) until `--requests` have ended; the loops alternate within every
level and the order flips each repeat. Reported per level: each loop's median requests/s
and generated tokens/s, every repeat's ratio own / library and its median, and how many
greedy answers of the two loops agree (bf16 kernels differ, so a few may not).

    PYTHONPATH=. python benchmarks/gpu_serve_bench.py                    # on the GPU machine (~3 min)
    PYTHONPATH=. python benchmarks/gpu_serve_bench.py --tiny --requests 24 --levels 1,4   # smoke test on a CPU

Writes $OUT/gpu_serve_bench.json when OUT is set (and --out FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("own", "transformers")


def load_model(tiny: bool, device: str):
    """A random-weight Llama with the tiny tokenizer, as the engine holds a loaded model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from serving.decoding import LoadedModel, context_length
    from tasks.config import ModelParams
    from tasks.model.loading import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(ModelParams()))
    shape = ({"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4} if tiny
             else {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32})
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    return LoadedModel(model, tokenizer, context_length(model.config))


def make_engine(kind: str, emit):
    from serving.engine import Engine
    from serving.library_engine import LibraryEngine
    from tasks.config import ServingParams

    limits = ServingParams()
    engine_class = {"own": Engine, "transformers": LibraryEngine}[kind]
    return engine_class(emit, max_batch=limits.max_batch, join_ratio=limits.join_ratio,
                        join_after_steps=limits.join_after_steps, prefix_min_tokens=limits.prefix_min_tokens)


def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(64, 256))] for _ in range(n)]


def run_level(engine, loaded, events: queue.SimpleQueue, work: list[list[int]], clients: int, max_new: int) -> dict:
    """`clients` closed-loop clients until every prompt of `work` has ended; requests/s and answers."""
    from serving.decoding import Row

    pending = iter(enumerate(work))
    answers: dict[int, list[int]] = {}
    errors, tokens = 0, 0

    def submit() -> bool:
        item = next(pending, None)
        if item is None:
            return False
        i, ids = item
        engine.submit(Row(i, ids, max_new, 0.0, 1.0, [], False, loaded))
        return True

    started = time.perf_counter()
    running = sum(submit() for _ in range(clients))
    while running:
        row, event = events.get(timeout=600)
        if event[0] not in ("end", "error"):
            continue
        running -= 1
        if event[0] == "error":
            errors += 1
        else:
            answers[row.id] = list(row.ids)
            tokens += len(row.ids)
        running += submit()
    seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(work), "errors": errors, "seconds": round(seconds, 3),
            "rps": round(len(work) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test anywhere)")
    ap.add_argument("--requests", type=int, default=256, help="requests per level and repeat")
    ap.add_argument("--levels", default="1,64", help="concurrent clients per level")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {kind: load_model(args.tiny, device) for kind in KINDS}  # the same seed: the same weights
    loaded = models["own"]
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"{params / 1e9:.2f}B-parameter Llama (random weights), {device}, torch {torch.__version__}", flush=True)

    events: queue.SimpleQueue = queue.SimpleQueue()

    def emit(batch):
        for event in batch:
            events.put(event)

    engines = {kind: make_engine(kind, emit) for kind in KINDS}
    rows: dict[int, list[tuple[dict, dict]]] = {level: [] for level in levels}
    try:
        for kind in KINDS:  # warm-up, not measured: first kernels, the library's cache
            run_level(engines[kind], models[kind], events, prompts(max(levels), len(loaded.tokenizer), 99), max(levels), 8)
        for repeat in range(args.repeats):
            for level in levels:
                work = prompts(args.requests, len(loaded.tokenizer), seed=level)
                got = {}
                for kind in (KINDS if repeat % 2 == 0 else KINDS[::-1]):
                    got[kind] = run_level(engines[kind], models[kind], events, work, level, args.max_new)
                    print(f"repeat {repeat + 1}/{args.repeats}, {level} clients, {kind}: {got[kind]['rps']} req/s, "
                          f"{got[kind]['tokens_per_s']} tokens/s, {got[kind]['errors']} errors", flush=True)
                rows[level].append((got["own"], got["transformers"]))
    finally:
        for engine in engines.values():
            engine.close()

    report = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda" else
              f"cpu, {os.cpu_count()} cores ({platform.machine()})", "torch": torch.__version__,
              "parameters": params, "requests": args.requests, "max_new": args.max_new, "repeats": args.repeats,
              "levels": []}
    print(f"\n{'clients':>7} {'own req/s':>10} {'library req/s':>14} {'own/library':>12}  per repeat  answers equal")
    for level, pairs in rows.items():
        ratios = [a["rps"] / b["rps"] for a, b in pairs]
        same = sum(a["answers"].get(i) == b["answers"].get(i) for a, b in pairs[:1] for i in range(args.requests))
        entry = {"clients": level, "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3),
                 "own": {k: statistics.median(a[k] for a, _ in pairs) for k in ("rps", "tokens_per_s")},
                 "transformers": {k: statistics.median(b[k] for _, b in pairs) for k in ("rps", "tokens_per_s")},
                 "answers_equal": f"{same}/{args.requests}",
                 "errors": sum(a["errors"] + b["errors"] for a, b in pairs)}
        report["levels"].append(entry)
        print(f"{level:>7} {entry['own']['rps']:>10.1f} {entry['transformers']['rps']:>14.1f} "
              f"{entry['median_ratio']:>11.2f}x  {', '.join(f'{r:.2f}' for r in ratios)}  {entry['answers_equal']}")
    for path in [args.out, Path(os.environ["OUT"]) / "gpu_serve_bench.json" if os.environ.get("OUT") else None]:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(level["errors"] for level in report["levels"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
