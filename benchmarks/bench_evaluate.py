"""Time the evaluation of N test examples (default 500) for the fine-tuned model and the base.

Uses the model folder of the last run (`artifacts/model`, from `make run`) and fresh date
examples that no split has seen; prints seconds, examples/s and the metrics per model,
for the same `eval` settings as params.yaml (batch size, max new tokens).

    .venv/bin/python benchmarks/bench_evaluate.py [--examples 500] [--model artifacts/model]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--model", type=Path, default=Path("artifacts/model"))
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    from scripts.make_data import make_examples
    from tasks.config import load_params
    from tasks.evaluate.score import evaluate_model
    from tasks.model.loading import (
        load_causal_lm,
        load_tokenizer,
        load_trained,
        resolve_base,
    )

    if not (args.model / "ftllm_model.json").is_file():
        print(f"error: {args.model}: no trained model folder; run `make run` first", file=sys.stderr)
        return 2
    params = load_params(args.params, {"eval.max_examples": args.examples})
    examples = make_examples(args.examples, seed=987654)
    base_path = resolve_base(params.model)
    models = {
        "candidate": load_trained(args.model)[:2],
        "base_zero_shot": (load_causal_lm(base_path).eval(), load_tokenizer(base_path)),
    }
    print(f"{'model':16s} {'examples':>8s} {'seconds':>8s} {'ex/s':>7s} {'exact_match':>11s} {'p95 ms':>8s}")
    for name, (model, tokenizer) in models.items():
        t0 = time.perf_counter()
        metrics = evaluate_model(model, tokenizer, examples, params.eval)["metrics"]
        seconds = time.perf_counter() - t0
        print(
            f"{name:16s} {len(examples):8d} {seconds:8.1f} {len(examples) / seconds:7.1f} "
            f"{metrics['exact_match']:11.3f} {metrics['latency_p95_ms']:8.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
