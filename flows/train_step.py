"""The `finetune` flow: the training step of a `retrain` run, on a training worker's machine.

A team with one GPU machine and CPU machines for the rest sets
`workers.train_deployment: finetune/<pool>` in params.yaml: `retrain` then reproduces
`prepare` in its own workspace, pushes the prepared data to the DVC remote, and starts this
flow through that deployment. Here, in the worker's checkout of the same commit, the
finetune stage runs (`tasks.stages.train_stage`), the model is pushed to the remote, and
the stage's dvc.lock entry goes back through the run's MLflow artifacts
(`dvc/finetune.lock.yaml`), from which `retrain` pulls the model and evaluates it.

Register it from the checkout on the training machine, then start its worker there:

    ftllm deploy --train-pool ftllm-gpu
    prefect worker start --pool ftllm-gpu
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.states import Failed

from tasks.environment import apply_defaults
from tasks.errors import StageError
from tasks.pipeline.dvc import train_stage, workspace_lock

LOCK_ARTIFACT = "dvc/finetune.lock.yaml"


@flow(name="finetune", log_prints=True, timeout_seconds=6 * 3600)
def finetune(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    dvc_lock: str = "",
    mlflow_run_id: str | None = None,
):
    """Run the finetune stage of another workspace's `retrain` run in this checkout.

    Args:
        params_file: params.yaml of this checkout (same commit as the calling workspace).
        overrides: the calling run's overrides, so the resolved settings are the same.
        dvc_lock: the calling workspace's dvc.lock; its `prepare` entry names the data to pull.
        mlflow_run_id: the calling run: the training logs there, and the stage's lock entry
            is stored there as `dvc/finetune.lock.yaml`.
    """
    logger = get_run_logger()
    root = Path(params_file).resolve().parent
    apply_defaults(root)
    if not dvc_lock:
        return Failed(message="no dvc_lock given: this flow runs the training of a retrain run, which passes it")
    try:
        with workspace_lock(root, log=logger.info):
            entry = train_stage(root, overrides or {}, dvc_lock, mlflow_run_id, log=logger.info)
    except StageError as exc:
        logger.error(str(exc))
        return Failed(message=str(exc))
    if mlflow_run_id:
        from mlflow import MlflowClient

        MlflowClient().log_text(mlflow_run_id, yaml.safe_dump(entry, sort_keys=False), LOCK_ARTIFACT)
    return {"finetune": entry}
