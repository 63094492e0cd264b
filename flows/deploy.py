"""Register the Prefect deployments: `retrain` on its cron schedule, `promote`, `rollback` and `monitor`.

Deployments live on a Prefect server (not the ephemeral API that `ftllm run` uses), and a
worker of the `process` work pool runs them from this folder:

    prefect server start                       # terminal 1 (UI at http://127.0.0.1:4200)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    ftllm deploy                               # terminal 2
    prefect worker start --pool ftllm-process  # terminal 3

The schedule comes from params.yaml (`schedule.cron`, `schedule.timezone`, `schedule.active`).
`monitor/scheduled` runs flows/monitor.py on `monitor.cron` (on when `monitor.active`), and
`retrain/scheduled` carries the deployment trigger that starts it when a monitor event
recommends retraining (`monitor.retrain`).
The `retrain` deployment's parameters are the pydantic settings sections, so the UI's run
form is typed, with defaults, descriptions and bounds.

On a training (GPU) machine, `ftllm deploy --train-pool POOL` registers only the `finetune`
flow (`flows/train_step.py`) as `finetune/POOL`, run from that machine's checkout; runs
whose `workers.train_deployment` names it train there.
"""

from __future__ import annotations

import sys
from contextlib import redirect_stdout
from pathlib import Path

from tasks.config import Params

WORK_POOL = "ftllm-process"


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the `process` work pool if the server does not have it yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def create() -> None:
        async with get_client() as client:
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass

    run_coro_as_sync(create())


def deploy_all(root: Path, params: Params, work_pool: str = WORK_POOL) -> list[str]:
    """Create or update the four deployments; returns their ids."""
    from prefect import flow
    from prefect.schedules import Schedule

    from flows.monitor import retrain_trigger

    ensure_work_pool(work_pool)
    ids = []
    schedule = Schedule(cron=params.schedule.cron, timezone=params.schedule.timezone, active=params.schedule.active)
    monitoring = Schedule(cron=params.monitor.cron, timezone=params.schedule.timezone, active=params.monitor.active)
    params_file = {"params_file": str(root / "params.yaml")}
    specs = [
        ("flows/retrain.py:retrain", "scheduled", params_file, [schedule],
         [retrain_trigger(params.registry.model_name, params.monitor)]),
        ("flows/registry.py:promote_flow", "manual", {"model_name": params.registry.model_name}, [], []),
        ("flows/registry.py:rollback_flow", "manual", {"model_name": params.registry.model_name}, [], []),
        ("flows/monitor.py:monitor", "scheduled", params_file, [monitoring], []),
    ]
    for entrypoint, name, parameters, schedules, triggers in specs:
        remote = flow.from_source(source=str(root), entrypoint=entrypoint)
        with redirect_stdout(sys.stderr):  # Prefect's advice on process pools; stdout is for `--json`
            deployment_id = remote.deploy(
                name=name, work_pool_name=work_pool, parameters=parameters, schedules=schedules, triggers=triggers,
                job_variables={"working_dir": str(root)}, print_next_steps=False,
            )
        ids.append(str(deployment_id))
    return ids


def deploy_training(root: Path, work_pool: str) -> tuple[str, str]:
    """Register `finetune/<work_pool>`, run from the checkout at `root`; returns its id and name."""
    from prefect import flow

    ensure_work_pool(work_pool)
    remote = flow.from_source(source=str(root), entrypoint="flows/train_step.py:finetune")
    with redirect_stdout(sys.stderr):
        deployment_id = remote.deploy(
            name=work_pool, work_pool_name=work_pool, parameters={"params_file": str(root / "params.yaml")},
            job_variables={"working_dir": str(root)}, print_next_steps=False,
        )
    return str(deployment_id), f"finetune/{work_pool}"
