"""Deployments on a real Prefect server: deploy, inspect, trigger with overrides, a worker runs it.

Starts `prefect server start` on a free loopback port with its own database, registers the
deployments with `ftllm deploy`, triggers `retrain` with overridden parameters through the
Prefect API, lets a `process` worker run it, and checks the MLflow run's parameters.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.project import FAST
from tests.support.servers import BIN

pytestmark = pytest.mark.slow
# Its own registered model and a short training: this test is about orchestration.
OVERRIDES = {**FAST, "train.max_steps": 30, "eval.max_examples": 12, "registry.model_name": "ftllm-deploy"}


def test_deploy_trigger_and_worker_run(server, project):
    out = subprocess.run(
        [str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml")],
        env=server, cwd=project, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["schedule"]["cron"] == "0 3 * * 1"

    script = f"""
import json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.utilities.asyncutils import run_coro_as_sync

async def inspect():
    async with get_client() as c:
        d = await c.read_deployment_by_name("retrain/scheduled")
        return d.schedules[0].schedule.cron, sorted(d.parameter_openapi_schema["properties"])
cron, props = run_coro_as_sync(inspect())
run = run_deployment("retrain/scheduled", parameters={{"overrides": json.loads(sys.argv[1])}}, timeout=0)
print(json.dumps({{"cron": cron, "props": props, "flow_run_id": str(run.id)}}))
"""
    out = subprocess.run([sys.executable, "-c", script, json.dumps(OVERRIDES)], env=server, cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["cron"] == "0 3 * * 1"
    assert {"train", "data", "eval", "gate", "overrides"} <= set(info["props"])

    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-process", "--run-once"],
        env=server, cwd=project, capture_output=True, text=True, timeout=900,
    )
    check = f"""
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync
async def state():
    async with get_client() as c:
        return (await c.read_flow_run("{info['flow_run_id']}")).state.type.value
print(run_coro_as_sync(state()))
"""
    state = subprocess.run([sys.executable, "-c", check], env=server, capture_output=True, text=True, timeout=60)
    assert state.stdout.strip().endswith("COMPLETED"), (state.stdout, worker.stdout[-3000:], worker.stderr[-3000:])

    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("retrain").experiment_id],
        filter_string="params.`registry.model_name` = 'ftllm-deploy'", max_results=1,
    )
    assert runs and runs[0].data.params["train.max_steps"] == "30"
    assert json.loads(runs[0].data.tags["overrides"]) == OVERRIDES
    assert "model_version" in runs[0].data.tags  # the worker's run went all the way to the registry


def _flow_run_states(server: dict, ids: list[str]) -> dict[str, dict]:
    script = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync
async def states():
    async with get_client() as c:
        out = {}
        for i in sys.argv[1:]:
            run = await c.read_flow_run(i)
            out[i] = {"type": run.state.type.value, "message": run.state.message,
                      "start": run.start_time.timestamp(), "end": run.end_time.timestamp()}
        return out
print(json.dumps(run_coro_as_sync(states())))
"""
    out = subprocess.run([sys.executable, "-c", script, *ids], env=server, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_runs_triggered_at_once_both_end_cleanly_and_the_registry_stays_consistent(server, project):
    """Two retraining runs of the same workspace at the same time: one trains, the other waits
    for the workspace lock and then finds nothing changed; one new version, no DVC lock error."""
    from mlflow import MlflowClient

    overrides = {**OVERRIDES, "registry.model_name": "ftllm-concurrent", "train.seed": 7}
    trigger = """
import json, sys
from prefect.deployments import run_deployment
ids = [str(run_deployment("retrain/scheduled", parameters={"overrides": json.loads(sys.argv[1])}, timeout=0).id)
       for _ in range(2)]
print(json.dumps(ids))
"""
    out = subprocess.run([sys.executable, "-c", trigger, json.dumps(overrides)], env=server, cwd=project,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    # One worker poll picks up both runs and runs them side by side, each in its own process.
    worker = subprocess.run(
        [str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-process", "--run-once"],
        env=server, cwd=project, capture_output=True, text=True, timeout=1200,
    )
    states = _flow_run_states(server, ids)
    assert all(s["type"] == "COMPLETED" for s in states.values()), (states, worker.stdout[-3000:], worker.stderr[-3000:])
    first_end = min(s["end"] for s in states.values())
    assert all(s["start"] < first_end for s in states.values()), states  # they did run at the same time
    logs = worker.stdout + worker.stderr
    assert "Unable to acquire lock" not in logs and "is locked" not in logs  # DVC's own lock never tripped

    client = MlflowClient()
    versions = client.search_model_versions("name = 'ftllm-concurrent'")
    assert len(versions) == 1  # the second run registered nothing: same model, same settings
    model = client.get_registered_model("ftllm-concurrent")
    # Aliases point at that version and agree with its verdict (30 steps may or may not pass the gate).
    expected = {"challenger": versions[0].version}
    if versions[0].tags["gate_passed"] == "true":
        expected["champion"] = versions[0].version
    assert model.aliases == expected
    runs = client.search_runs(
        [client.get_experiment_by_name("retrain").experiment_id],
        filter_string="params.`registry.model_name` = 'ftllm-concurrent'",
    )
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert sum("model_version" in r.data.tags for r in runs) == 1


def test_training_that_no_worker_starts_is_cancelled_and_fails_the_run(server, project, tmp_path):
    """`workers.train_deployment` on a pool whose worker is down: the run fails after the
    start timeout naming the pool's worker, the training run is cancelled, nothing is registered."""
    from mlflow import MlflowClient

    deploy = subprocess.run([str(BIN / "ftllm"), "deploy", "--json", "--train-pool", "ftllm-gpu-down",
                             "--params", str(project / "params.yaml")],
                            env=server, cwd=project, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert json.loads(deploy.stdout)["train_deployment"] == "finetune/ftllm-gpu-down"
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "remote", "add", "-q", "-d", "--local", "shared", str(tmp_path / "store")], cwd=project, check=True)
    overrides = {**OVERRIDES, "registry.model_name": "ftllm-gpu-down", "train.seed": 13,
                 "workers.train_deployment": "finetune/ftllm-gpu-down", "workers.train_start_timeout_seconds": 10}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    try:
        run = subprocess.run([str(BIN / "ftllm"), "run", "--json", *sets], env=server, cwd=project,
                             capture_output=True, text=True, timeout=600)
    finally:
        (project / ".dvc" / "config.local").unlink()
    assert run.returncode == 1, (run.stdout[-2000:], run.stderr[-3000:])
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert "no worker started the training of deployment 'finetune/ftllm-gpu-down'" in summary["error"], summary
    assert "Traceback" not in run.stderr
    child = summary["error"].split("(flow run ")[1].split(")")[0]
    assert _flow_run_states(server, [child])[child]["type"] == "CANCELLED"
    assert MlflowClient().search_model_versions("name = 'ftllm-gpu-down'") == []
