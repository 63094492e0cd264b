"""DVC stage `preference`: preference tuning (KTO or DPO) of the supervised model on the users' ratings.

Does nothing, and writes `preference.json` saying so, when the prepared data holds fewer than
`preference.min_examples` preference examples (a run without ratings); leaves the tuned model
out when it lost more exact match on the val split than `gate.max_regression`
(`held_the_task`); the retrain flow puts its summary in the MLflow run
(`tasks.registry.tracking.log_preference_stage`). Run alone (after `finetune`):

    python -m tasks.stages.preference --params artifacts/params.yaml --data artifacts/prepared --model artifacts/model --out artifacts/preference
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tasks.config import load_params
from tasks.runner import run_stage


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Preference tuning of the supervised model (DVC stage).")
    ap.add_argument("--params", default="artifacts/params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--model", type=Path, default=Path("artifacts/model"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/preference"))
    args = ap.parse_args(argv)
    from tasks.train.preference import preference_tune

    summary = preference_tune(load_params(args.params), args.data, args.model, args.out, log=lambda m: print(m, flush=True))
    print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    run_stage(main)
