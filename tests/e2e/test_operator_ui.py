"""What an operator sees: final states, the links between Prefect and MLflow, offline pages, refusals.

One whole `retrain` run (a short training its gate must reject) is checked from every side
an operator looks at: the flow run's state name and message (through the Prefect API the
UI reads), the MLflow run named after it and linking back, the model version's tags, the
Prefect artifacts linking to MLflow, the offline data report and dashboard logged to the
run (rendered in headless Chromium), the notification. The promote and rollback flows'
refusals are checked without training, and a real Prefect server's UI is opened in
headless Chromium on a rejected run's page.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.browser import CHROMIUM, render, visible_text
from tests.support.project import FAST

MODEL = "ftllm-operator"
# Few steps and a bar no candidate reaches: the gate rejects; the run stays short.
REJECTING = {**FAST, "registry.model_name": MODEL, "train.max_steps": 10, "eval.max_examples": 12,
             "gate.min_exact_match": 0.99, "train.seed": 21}


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def rejected(project, prefect_harness, tmp_path_factory):
    """The state and result of a run the gate rejects, and what the webhook heard."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows.retrain import retrain

    heard: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            heard.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mp = pytest.MonkeyPatch()
    mp.setenv("FTLLM_NOTIFY_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hook")
    try:
        state = retrain(params_file=str(project / "params.yaml"), overrides=REJECTING, return_state=True)
    finally:
        mp.undo()
        server.shutdown()
    return state, state.result(raise_on_failure=False), heard


pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.slow
def test_a_rejected_run_says_so_in_its_final_state(rejected):
    state, result, heard = rejected
    assert result.status == "rejected", result.error
    assert state.is_completed() and state.name == "Rejected"
    assert "min_exact_match" in state.message and "threshold 0.99" in state.message
    # What the UI reads: the server's record of the flow run.
    run = httpx.get(f"{_api()}/flow_runs/{state.state_details.flow_run_id}").json()
    assert run["state"]["name"] == "Rejected" and run["state"]["type"] == "COMPLETED"
    assert "rejected" in run["tags"]  # what the UI's runs list filters by
    assert heard and heard[0]["status"] == "rejected" and "min_exact_match" in heard[0]["failed_checks"]


@pytest.mark.slow
def test_prefect_and_mlflow_runs_lead_to_each_other(rejected):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact

    from tasks.registry.versions import list_versions

    state, result, _ = rejected
    flow_run_id = str(state.state_details.flow_run_id)
    flow_run = httpx.get(f"{_api()}/flow_runs/{flow_run_id}").json()
    mlflow_run = MlflowClient().get_run(result.mlflow_run_id)
    assert mlflow_run.info.run_name == flow_run["name"]
    tags = mlflow_run.data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
    assert tags["mlflow.source.name"] == "flows/retrain.py:retrain"

    version = MlflowClient().get_model_version(MODEL, result.version).tags
    assert version["prefect.flow_run_id"] == flow_run_id and result.mlflow_run_id in version["mlflow_run_url"]
    (row,) = [v for v in list_versions(MODEL) if v["version"] == result.version]
    assert row["flow_run"]["name"] == flow_run["name"]

    # From the flow run's artifacts to the MLflow run and the model version.
    artifacts = httpx.post(f"{_api()}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}).json()
    by_key = {a["key"]: a for a in artifacts}
    assert result.mlflow_run_id in by_key["retrain-gate"]["data"]
    assert f"/#/models/{MODEL}/versions/{result.version}?" in by_key["retrain-gate"]["data"]
    assert "reports/validation.html" in by_key["retrain-validation"]["data"]
    assert by_key["retrain-validation"]["description"]
    # A link artifact is stored as markdown `[text](url)`.
    assert f"/runs/{result.mlflow_run_id}/artifacts/reports/dashboard.html?" in by_key["retrain-dashboard"]["data"]
    assert Artifact.get("retrain-dashboard") is not None


@pytest.mark.slow
def test_offline_pages_are_logged_with_the_run_and_render(rejected, tmp_path):
    import mlflow

    _, result, _ = rejected
    run_id = result.mlflow_run_id
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "reports")}
    assert {"reports/validation.html", "reports/validation.json", "reports/dashboard.html"} <= logged
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports", dst_path=str(tmp_path)))
    dashboard = (folder / "dashboard.html").read_text()
    assert "gate REJECTED" in dashboard and "<polyline" in dashboard  # the loss curve of this run's training
    if CHROMIUM is None:
        pytest.skip("needs headless Chromium: apt-get install -y chromium chromium-driver")
    shown = render(folder / "dashboard.html")
    text = visible_text(shown.dom)
    assert "min_exact_match" in text and "FAIL" in text and shown.blocked == []
    samples = text.split("Sample predictions: candidate and champion")[1].split("Training loss")[0]
    assert "no champion predictions to compare with" in samples  # the model's first version: nothing to compare
    predictions = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.json", dst_path=str(tmp_path))
    first = json.loads(Path(predictions).read_text())["candidate"][0]
    assert f"{first['prompt']} {first['reference']}" in samples  # the candidate's first test example
    assert "reports/validation.html" in text.split("validation report")[1]  # the source's report, linked
    report = render(folder / "validation.html")
    assert f"{json.loads((folder / 'validation.json').read_text())['examples']} examples" in visible_text(report.dom)
    assert report.blocked == []


@pytest.fixture()
def failed_version(tmp_path) -> tuple[str, str]:
    from tests.support.registry import new_version

    name = f"op-{uuid.uuid4().hex[:8]}"
    new_version(tmp_path, name, passed=True)
    return name, new_version(tmp_path, name, passed=False)


def _logs(flow_run_id) -> str:
    """The flow run's log as the UI shows it (logs reach the server in batches: wait for the last line)."""
    import time

    deadline = time.monotonic() + 30
    while True:
        logs = httpx.post(f"{_api()}/logs/filter", json={"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}}).json()
        text = "\n".join(entry["message"] for entry in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_refused_promotion_fails_the_flow_run_in_the_forms_words_without_a_traceback(failed_version):
    from flows.registry import promote_flow

    name, version = failed_version
    state = promote_flow(model_name=name, version=version, return_state=True)
    assert state.is_failed()
    assert state.message == f"refused: version {version} failed its gate (min_exact_match); to promote it anyway, set force and give a reason"
    logs = _logs(state.state_details.flow_run_id)
    assert "set force and give a reason" in logs and "Traceback" not in logs

    state = promote_flow(model_name=name, version=version, force=True, return_state=True)
    assert state.is_failed() and "force needs a reason" in state.message and "--" not in state.message
    assert promote_flow(model_name=name, version=version, force=True, reason="hotfix")["champion"] == version


def test_in_process_caller_gets_the_refusal_in_the_cli_words(failed_version, monkeypatch):
    """`ftllm promote` against a server runs the flow in-process and keeps its own wording."""
    from flows.registry import promote_flow
    from ftllm.cli import _move_alias
    from tasks.errors import RegistryRefusal

    name, version = failed_version
    state = promote_flow(model_name=name, version=int(version), return_state=True)
    assert state.is_failed() and "--" not in state.message
    assert state.result(raise_on_failure=False).endswith("promote it anyway with --force --reason TEXT")
    monkeypatch.setenv("PREFECT_API_URL", _api())
    with pytest.raises(RegistryRefusal, match="--force --reason TEXT"):
        _move_alias("promote", False, model_name=name, version=version, force=False, reason="")
    with pytest.raises(RegistryRefusal, match="no champion to roll back"):
        _move_alias("rollback", False, model_name=f"{name}-none", to=None, reason="")


REJECTING_FLOW = """
import json
from prefect import flow
from flows.retrain import _final_state
from tasks.pipeline.notify import outcome_line

result = json.loads('''{result}''')

@flow(name="retrain")
def retrain():
    return _final_state(result["status"], True, outcome_line(result), result)

print(json.dumps({{"id": str(retrain(return_state=True).state_details.flow_run_id)}}))
"""


@pytest.mark.slow
def test_the_prefect_ui_shows_a_rejected_run_as_rejected(tmp_path):
    """The flow-run page of a real `prefect server start` (its UI, in headless Chromium) names the rejection."""
    import os
    import subprocess
    import sys

    from tests.support.project import free_port, wait_until_up

    if CHROMIUM is None:
        pytest.skip("needs headless Chromium: apt-get install -y chromium chromium-driver")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_until_up(f"{api}/health", server, 180)
        result = {"status": "rejected", "version": "4", "champion_version": "3",
                  "gate": {"passed": False, "checks": [{"name": "min_exact_match", "value": 0.21, "threshold": 0.5, "passed": False}]}}
        code = REJECTING_FLOW.format(result=json.dumps(result))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        run_id = json.loads(out.stdout.strip().splitlines()[-1])["id"]
        # The UI is a single-page app: give its scripts time to fetch the run before the DOM is read.
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000",
                              "--dump-dom", f"http://127.0.0.1:{port}/runs/flow-run/{run_id}"],
                             capture_output=True, text=True, timeout=180).stdout
        text = visible_text(dom)
        name = httpx.get(f"{api}/flow_runs/{run_id}").json()["name"]
        # The page's header: the run's name, then its state badge (the message is the API test's business).
        assert f"Runs {name} Rejected" in text, text[:2000]
    finally:
        server.terminate()
        server.wait(timeout=30)
