"""The `finetune` flow: the training step of a `retrain` run, on a training worker's machine.

A team with one GPU machine and CPU machines for the rest sets
`workers.train_deployment: finetune/<pool>` in params.yaml: `retrain` then reproduces
`prepare` in its own workspace, pushes the prepared data to the DVC remote, and starts this
flow through that deployment. Here, in the worker's checkout of the same commit, the
finetune stage runs (`tasks.stages.train_stage`), the model is pushed to the remote, and
the stage's dvc.lock entry goes back through the run's MLflow artifacts
(`dvc/finetune.lock.yaml`), from which `retrain` pulls the model and evaluates it.
`train_on_worker` is the run's side: it starts this flow and waits for it.

Register it from the checkout on the training machine, then start its worker there:

    ftllm deploy --train-pool ftllm-gpu
    prefect worker start --pool ftllm-gpu
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.states import Failed

from tasks.config import WorkersParams
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


TRAIN_POLL_SECONDS = 5


def train_on_worker(workers: WorkersParams, overrides: dict, dvc_lock: str, run_id: str) -> dict:
    """Run the `finetune` flow through `workers.train_deployment` and wait; the stage's dvc.lock entry it stored in MLflow.

    A training that no worker starts within `workers.train_start_timeout_seconds` (the GPU
    machine is down, its worker not running) is cancelled and fails the run, instead of
    holding the workspace until the flow's timeout.
    """
    import mlflow
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled

    deployment = workers.train_deployment
    get_run_logger().info(f"training on the worker of deployment {deployment}")
    try:
        child = run_deployment(deployment, parameters={"overrides": overrides, "dvc_lock": dvc_lock, "mlflow_run_id": run_id},
                               timeout=0)
    except ObjectNotFound:
        raise StageError(
            f"no Prefect deployment {deployment!r} (workers.train_deployment): register it with "
            "`ftllm deploy --train-pool POOL` on the training machine, against the same Prefect server"
        ) from None
    deadline = time.monotonic() + workers.train_start_timeout_seconds
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(child.id).state
            if state is not None and state.is_final():
                break
            if (state is None or state.type in (StateType.SCHEDULED, StateType.PENDING)) and time.monotonic() > deadline:
                client.set_flow_run_state(child.id, Cancelled(message="no worker started it in time"), force=True)
                raise StageError(
                    f"no worker started the training of deployment {deployment!r} (flow run {child.id}) within "
                    f"{workers.train_start_timeout_seconds:.0f}s (workers.train_start_timeout_seconds); is "
                    "`prefect worker start --pool ...` running on the training machine?"
                )
            time.sleep(TRAIN_POLL_SECONDS)
    if not state.is_completed():
        raise StageError(f"training on {deployment} (flow run {child.id}) ended {state.type.value}: {state.message or ''}")
    return yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{LOCK_ARTIFACT}"))
