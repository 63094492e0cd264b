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


@pytest.fixture(scope="module")
def deployed(server, project) -> subprocess.CompletedProcess:
    """`ftllm deploy` once for the module's tests, from a params.yaml whose gate differs from the code's
    default (every run of the module overrides it)."""
    import re

    path = project / "params.yaml"
    text, found = re.subn(r"\n  min_exact_match: [^\n#]+", "\n  min_exact_match: 0.45 ", path.read_text(), count=1)
    assert found == 1
    path.write_text(text)
    return subprocess.run(
        [str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml")],
        env=server, cwd=project, capture_output=True, text=True, timeout=300,
    )


def _run_worker_once(server: dict, project, timeout: int = 900) -> subprocess.CompletedProcess:
    """One poll of a `process` worker: it runs every scheduled run of the pool, side by side."""
    return subprocess.run([str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-process", "--run-once"],
                          env=server, cwd=project, capture_output=True, text=True, timeout=timeout)


def test_deploy_trigger_and_worker_run(server, project, deployed):
    out = deployed
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["schedule"]["cron"] == "0 3 * * 1"
    assert "monitor/scheduled" in out.stderr.strip().splitlines()[-1]  # the closing line names every deployment

    script = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.utilities.asyncutils import run_coro_as_sync

async def inspect():
    async with get_client() as c:
        d = await c.read_deployment_by_name("retrain/scheduled")
        gate = d.parameter_openapi_schema["definitions"]["GateParams"]["properties"]
        return d.schedules[0].schedule.cron, sorted(d.parameter_openapi_schema["properties"]), gate["min_exact_match"]
cron, props, gate_default = run_coro_as_sync(inspect())
overrides = json.loads(sys.argv[1])
# One field of a section, as the API and the form give it: only that field changes.
train = {"max_steps": overrides.pop("train.max_steps")}
run = run_deployment("retrain/scheduled", parameters={"overrides": overrides, "train": train}, timeout=0)
print(json.dumps({"cron": cron, "props": props, "gate_default": gate_default["default"], "flow_run_id": str(run.id)}))
"""
    out = subprocess.run([sys.executable, "-c", script, json.dumps(OVERRIDES)], env=server, cwd=project, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["cron"] == "0 3 * * 1"
    assert {"train", "data", "eval", "gate", "overrides"} <= set(info["props"])
    assert info["gate_default"] == 0.45  # the run form starts from params.yaml, not from the code's defaults

    worker = _run_worker_once(server, project)
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


def _flow_run_logs(server: dict, flow_run_id: str) -> str:
    """The flow run's log as the UI shows it."""
    import httpx

    logs = httpx.post(f"{server['PREFECT_API_URL']}/logs/filter",
                      json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    return "\n".join(entry["message"] for entry in logs)


def test_refusals_from_the_run_forms_end_failed_in_the_forms_words_without_a_traceback(server, project, deployed,
                                                                                      tmp_path):
    """Promote a rejected version (without force, with force but no reason) and roll back to an unknown
    version, as the UI's forms and `prefect deployment run` start them: a worker runs them, each
    ends Failed with the form's words, and neither the run's log nor the worker's output holds
    a traceback. Versions are given as numbers, as the form and the CLI's `-p version=2` send them."""
    from tests.support.registry import new_version

    name = "ftllm-refusals"
    passed, rejected = int(new_version(tmp_path, name, True)), int(new_version(tmp_path, name, False))
    trigger = """
import json, sys
from prefect.deployments import run_deployment
runs = json.loads(sys.argv[1])
print(json.dumps([str(run_deployment(d, parameters=p, timeout=0).id) for d, p in runs]))
"""
    runs = [("promote/manual", {"model_name": name, "version": rejected, "force": True}),
            ("rollback/manual", {"model_name": name, "to": 99}),
            ("promote/manual", {"model_name": name, "version": passed})]
    out = subprocess.run([sys.executable, "-c", trigger, json.dumps(runs)], env=server, cwd=project,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    forced, unknown, promoted = json.loads(out.stdout.strip().splitlines()[-1])
    cli = subprocess.run([str(BIN / "prefect"), "deployment", "run", "promote/manual", "-p", f"model_name={name}",
                          "-p", f"version={rejected}"], env=server, cwd=project, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
    plain = cli.stdout.split("UUID:")[1].split()[0]

    worker = _run_worker_once(server, project, timeout=300)
    states = _flow_run_states(server, [forced, unknown, promoted, plain])
    assert states[promoted]["type"] == "COMPLETED", states
    expected = {
        plain: f"refused: version {rejected} failed its gate (min_exact_match); to promote it anyway, set force and give a reason",
        forced: "refused: force needs a reason: give one, it is recorded on the version",
        unknown: f"refused: model '{name}' has no version '99' (known versions: {rejected}, {passed})",
    }
    for run_id, message in expected.items():
        assert states[run_id]["type"] == "FAILED" and states[run_id]["message"] == message, states[run_id]
        logs = _flow_run_logs(server, run_id)
        assert message in logs, logs
        for words in ("Traceback", "unexpected exception", "--force", "--reason", "ftllm models"):
            assert words not in logs, (words, logs)
    output = worker.stdout + worker.stderr
    assert "Traceback" not in output and "unexpected exception" not in output, output[-4000:]


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


def test_two_runs_triggered_at_once_both_end_cleanly_and_the_registry_stays_consistent(server, project, deployed):
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
    worker = _run_worker_once(server, project, timeout=1200)
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


def test_deploy_set_reaches_the_scheduled_runs_not_only_the_form(server, project, deployed):
    """`ftllm deploy --set train.max_steps=123` showed 123 in the run form, while the scheduled
    run (and the monitor's checks) read params.yaml's 300: the deployments carried no overrides."""
    sets = ["--set", "train.max_steps=123", "--set", "monitor.window=50"]
    try:
        again = subprocess.run([str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml"), *sets],
                               env=server, cwd=project, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        script = """
import json
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync

async def parameters():
    async with get_client() as c:
        return {name: (await c.read_deployment_by_name(name)).parameters
                for name in ("retrain/scheduled", "monitor/scheduled")}
print(json.dumps(run_coro_as_sync(parameters())))
"""
        out = subprocess.run([sys.executable, "-c", script], env=server, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        parameters = json.loads(out.stdout.strip().splitlines()[-1])
        wanted = {"train.max_steps": 123, "monitor.window": 50}
        assert parameters["retrain/scheduled"]["overrides"] == wanted
        assert parameters["monitor/scheduled"]["overrides"] == wanted
    finally:  # the module's other tests expect the deployments as `deployed` made them
        subprocess.run([str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml")],
                       env=server, cwd=project, capture_output=True, text=True, timeout=300)
