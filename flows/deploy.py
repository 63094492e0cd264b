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
form is typed, with descriptions and bounds; its defaults are params.yaml's values when
`ftllm deploy` runs (`form_defaults`), so a section switched on in the form starts from the
project's settings, not the code's. Run `ftllm deploy` again after editing params.yaml.

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


FORM_SECTIONS = {"data": "DataParams", "train": "TrainParams", "eval": "EvalParams", "gate": "GateParams"}


def form_defaults(schema: dict, params: Params) -> dict:
    """The `retrain` parameter schema with params.yaml's values as its sections' field defaults.

    The Prefect UI fills a section it switches on from these defaults; the flow merges the
    section it gets onto params.yaml field by field (flows/retrain.py).
    """
    definitions = schema.get("definitions", {})
    for section, model in FORM_SECTIONS.items():
        fields = definitions.get(model, {}).get("properties", {})
        for name, value in getattr(params, section).model_dump(mode="json").items():
            if name in fields:
                fields[name]["default"] = value
    return schema


def _set_form_defaults(deployment_id: str, params: Params) -> None:
    """Store `form_defaults` in the deployment's parameter schema on the server."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        schema = client.read_deployment(UUID(deployment_id)).parameter_openapi_schema
        client.update_deployment(UUID(deployment_id), DeploymentUpdate(parameter_openapi_schema=form_defaults(schema, params)))


def deploy_all(root: Path, params: Params, work_pool: str = WORK_POOL, overrides: dict | None = None) -> list[str]:
    """Create or update the four deployments; returns their ids.

    `overrides` (`ftllm deploy --set`) go into the parameters of the scheduled retrain and
    monitor deployments, so their runs read the settings that were deployed, as the form shows them.
    """
    from prefect import flow
    from prefect.schedules import Schedule

    from flows.monitor import retrain_trigger

    ensure_work_pool(work_pool)
    ids = []
    schedule = Schedule(cron=params.schedule.cron, timezone=params.schedule.timezone, active=params.schedule.active)
    monitoring = Schedule(cron=params.monitor.cron, timezone=params.schedule.timezone, active=params.monitor.active)
    params_file = {"params_file": str(root / "params.yaml"), **({"overrides": overrides} if overrides else {})}
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
        if entrypoint == "flows/retrain.py:retrain":
            _set_form_defaults(str(deployment_id), params)
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
