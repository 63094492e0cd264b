"""The command line's contract: exit codes and the JSON last line."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from typer.testing import CliRunner

from ftllm.cli import app
from tests.conftest import REPO


@pytest.fixture()
def params(tmp_path, monkeypatch):
    """A settings file with a registered-model name of its own."""
    monkeypatch.setenv("FTLLM_ROOT", str(tmp_path))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (REPO / "params.yaml").read_text().replace("model_name: ftllm-chat", f"model_name: cli-{uuid.uuid4().hex[:8]}")
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path / "params.yaml"


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_models_of_an_empty_registry(params):
    result = CliRunner().invoke(app, ["models", "--json", "--params", str(params)])
    assert result.exit_code == 0
    assert last_json(result.stdout)["versions"] == []


def test_promote_and_rollback_refuse_with_reason(params):
    promote = CliRunner().invoke(app, ["promote", "99", "--json", "--params", str(params)])
    assert promote.exit_code == 1
    assert "no version '99'" in last_json(promote.stdout)["error"]
    rollback = CliRunner().invoke(app, ["rollback", "--json", "--params", str(params)])
    assert rollback.exit_code == 1
    assert "no champion" in last_json(rollback.stdout)["error"]


@pytest.mark.parametrize("bad", ["train.max_steps=0", "train.nosuchkey=1", "nokeyvalue"])
def test_run_with_bad_settings_is_a_usage_error(params, bad):
    result = CliRunner().invoke(app, ["run", "--params", str(params), "--set", bad])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_bench_serve_without_a_service_says_so():
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["bench", "serve", "--url", url, "--requests", "2"])
    assert result.exit_code == 2
    text = " ".join(result.stdout.split())  # rich wraps long lines
    assert "is the service running" in text and "Traceback" not in text
