"""Deployments on a real Prefect server: deploy, inspect, trigger with overrides, a worker runs it.

Starts `prefect server start` on a free loopback port with its own database, registers the
deployments with `ftllm deploy`, triggers `retrain` with overridden parameters through the
Prefect API, lets a `process` worker run it, and checks the MLflow run's parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.conftest import FAST

pytestmark = pytest.mark.slow
# Its own registered model and a short training: this test is about orchestration.
OVERRIDES = {**FAST, "train.max_steps": 30, "registry.model_name": "ftllm-deploy"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory, project):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("prefect server did not answer within 120 s")
    client_env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "FTLLM_ROOT": str(project)}
    yield client_env
    proc.terminate()
    proc.wait(timeout=30)


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
