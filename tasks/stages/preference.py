"""DVC stage `preference`: preference tuning (KTO or DPO) of the supervised model on the users' ratings.

Does nothing, and writes `preference.json` saying so, when the prepared data holds fewer than
`preference.min_examples` preference examples (a run without ratings); leaves the tuned model
out when it lost more exact match on the val split than `gate.max_regression`
(`held_the_task`). Inside a run (MLFLOW_RUN_ID set) the summary goes to the MLflow run: the
`preference.kept` tag, the val exact match of both models and the losses. Run alone (after `finetune`):

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
    _track(summary)
    return 0


def _track(summary) -> None:
    """The summary in the flow's MLflow run, where there is one."""
    from tasks.environment import environment

    run_id = environment().mlflow_run_id
    if not run_id or not summary.ran:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_tag(run_id, "preference.kept", str(summary.kept).lower())
    client.set_tag(run_id, "preference.outcome", summary.reason[:5000])
    figures = {"preference_val_exact_match_supervised": summary.val_exact_match_supervised,
               "preference_val_exact_match_tuned": summary.val_exact_match_tuned,
               "preference_first_loss": summary.first_loss, "preference_final_loss": summary.final_loss}
    for key, value in figures.items():
        if value is not None:
            client.log_metric(run_id, key, value)


if __name__ == "__main__":
    run_stage(main)
