"""Notifications reach a local webhook receiver for rejected and failed runs only."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tasks.pipeline.notify import notify_run

REJECTED = {
    "status": "rejected", "model_name": "m", "version": "3", "champion_version": "2", "mlflow_run_id": "r",
    "gate": {"passed": False, "checks": [{"name": "min_exact_match", "value": 0.1, "threshold": 0.7, "passed": False}]},
}


@pytest.fixture()
def receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def test_rejected_run_is_posted(receiver, monkeypatch):
    url, received = receiver
    monkeypatch.setenv("FTLLM_NOTIFY_WEBHOOK", url)
    assert notify_run(REJECTED) == "webhook"
    assert received[0]["status"] == "rejected"
    assert received[0]["failed_checks"] == ["min_exact_match"]
    assert "ftllm retrain rejected" in received[0]["subject"]


def test_promoted_run_and_no_target_send_nothing(receiver, monkeypatch):
    url, received = receiver
    monkeypatch.setenv("FTLLM_NOTIFY_WEBHOOK", url)
    assert notify_run({**REJECTED, "status": "promoted"}) is None
    monkeypatch.delenv("FTLLM_NOTIFY_WEBHOOK")
    monkeypatch.delenv("FTLLM_NOTIFY_BLOCK", raising=False)
    assert notify_run(REJECTED) is None
    assert received == []


def test_a_run_that_registered_nothing_new_sends_nothing_unless_it_failed(receiver, monkeypatch):
    """After a rollback, each scheduled run with nothing new finds the demoted version again, whose
    status reads "rejected" (it is not champion): one alert per run about nothing new."""
    url, received = receiver
    monkeypatch.setenv("FTLLM_NOTIFY_WEBHOOK", url)
    assert notify_run({**REJECTED, "changed": False, "gate": {"passed": True, "checks": []}}) is None
    assert received == []
    assert notify_run({**REJECTED, "changed": False, "status": "failed", "error": "dvc push failed"}) == "webhook"


def test_links_to_the_runs_pages_are_posted(receiver, monkeypatch):
    url, received = receiver
    monkeypatch.setenv("FTLLM_NOTIFY_WEBHOOK", url)
    links = {"Prefect flow run": "http://127.0.0.1:4200/runs/flow-run/f1", "MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/r"}
    assert notify_run(REJECTED, links) == "webhook"
    assert received[0]["links"] == links
    assert "Prefect flow run: http://127.0.0.1:4200/runs/flow-run/f1" in received[0]["body"]
