"""DVC stage `evaluate`: the candidate and the prompted base model on the test split (the candidate also on the feedback split).

Run alone (after `finetune`):

    python -m tasks.stages.evaluate --params artifacts/params.yaml --data artifacts/prepared \
        --model artifacts/model --out artifacts/metrics.json --samples artifacts/predictions.json \
        --per-example artifacts/per_example.json

metrics.json holds each model's aggregate metrics; per_example.json each model's scores
per test example, which the gate pairs with the champion's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.evaluate.score import evaluate_all
from tasks.files import write_atomic
from tasks.runner import run_stage


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the candidate against prompting baselines (DVC stage).")
    ap.add_argument("--params", default="artifacts/params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--model", type=Path, default=Path("artifacts/model"))
    ap.add_argument("--preference", type=Path, default=None,
                    help="the preference stage's output: its tuned model, when there is one, is the candidate")
    ap.add_argument("--out", type=Path, default=Path("artifacts/metrics.json"))
    ap.add_argument("--samples", type=Path, default=Path("artifacts/predictions.json"))
    ap.add_argument("--per-example", type=Path, default=Path("artifacts/per_example.json"))
    args = ap.parse_args(argv)
    results = evaluate_all(args.params, args.data, args.model, args.preference)
    write_atomic(args.samples, json.dumps({k: v["samples"] for k, v in results.items()}, indent=2))
    write_atomic(args.per_example, json.dumps({k: v["per_example"] for k, v in results.items()}))
    write_atomic(args.out, json.dumps({k: v["metrics"] for k, v in results.items()}, indent=2))
    for name, r in results.items():
        m = r["metrics"]
        if "exact_match" not in m:
            print(f"{name:15s} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
            continue
        print(f"{name:15s} exact_match={m['exact_match']:.3f} bleu={m['bleu']:.1f} perplexity={m['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    run_stage(main)
