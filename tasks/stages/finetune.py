"""DVC stage `finetune`: train the base model on the prepared train split.

`train.num_processes > 1` re-launches this module under torchrun. When MLFLOW_RUN_ID is
set (the retrain flow sets it) the stage logs into that run. Run alone (after `prepare`):

    python -m tasks.stages.finetune --params artifacts/params.yaml --data artifacts/prepared --out artifacts/model
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from tasks.config import load_params
from tasks.runner import run_stage


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune the base model (DVC stage).")
    ap.add_argument("--params", default="artifacts/params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/model"))
    args = ap.parse_args(argv)
    from tasks.train.distributed import relaunch_with_torchrun, under_torchrun
    from tasks.train.finetune import finetune

    params = load_params(args.params)
    if params.train.num_processes > 1 and not under_torchrun():
        print(f"launching {params.train.num_processes} processes with torchrun", flush=True)
        return relaunch_with_torchrun(params.train.num_processes, __spec__.name, argv)
    summary = finetune(params, args.data, args.out, log=lambda m: print(m, flush=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    run_stage(main)
