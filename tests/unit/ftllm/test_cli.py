"""The command line's contract: exit codes and the JSON last line."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from typer.testing import CliRunner

from ftllm.cli import app
from tests.support.project import REPO


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
def test_run_with_bad_settings_is_a_usage_error_with_a_result_on_stdout(params, bad):
    """A failed run still ends stdout with a RunResult; the error itself is one line on stderr."""
    import jsonschema

    from tasks.pipeline.result import RunResult

    result = CliRunner().invoke(app, ["run", "--params", str(params), "--set", bad, "--json"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "error:" not in result.stdout
    doc = last_json(result.stdout)
    jsonschema.validate(doc, RunResult.model_json_schema(mode="serialization"))
    assert doc["status"] == "failed" and doc["error"] in result.stderr and doc["version"] is None


def test_run_with_a_missing_settings_file_names_it(tmp_path):
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "absent.yaml"), "--json"])
    assert result.exit_code == 2
    assert "absent.yaml: settings file not found" in result.stderr
    from tasks.pipeline.result import RunResult

    assert RunResult.model_validate_json(result.stdout.strip().splitlines()[-1]).status == "failed"


def test_params_check_names_the_drifting_line(tmp_path):
    from tasks.config import render_params

    drifted = tmp_path / "params.yaml"
    drifted.write_text(render_params().replace("max_steps: 300 ", "max_steps: 301 "))
    result = CliRunner().invoke(app, ["params", "--check", str(drifted)])
    assert result.exit_code == 1 and result.stdout == ""
    assert "params.yaml:" in result.stderr and "max_steps: 300" in result.stderr and "--write" in result.stderr
    fixed = CliRunner().invoke(app, ["params", "--write", str(drifted)])
    assert fixed.exit_code == 0
    assert CliRunner().invoke(app, ["params", "--check", str(drifted)]).exit_code == 0


def test_params_prints_the_committed_file():
    result = CliRunner().invoke(app, ["params"])
    assert result.exit_code == 0 and result.stdout == (REPO / "params.yaml").read_text()


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["deploy"], 2, "PREFECT_API_URL"),
        (["models", "--params", "absent.yaml"], 2, "absent.yaml: settings file not found"),
        (["validate", "absent.jsonl"], 2, "absent.jsonl"),
        (["serve", "--port", "0"], 2, "--port 0"),
        (["bench", "serve", "--requests", "0"], 2, "must be positive"),
    ],
)
def test_expected_failures_are_one_line_on_stderr(args, code, fragment, monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1]
    assert "Traceback" not in result.stderr and "error" not in result.stdout


def test_bench_serve_without_a_service_says_so():
    from tests.support.project import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["bench", "serve", "--url", url, "--requests", "2"])
    assert result.exit_code == 2
    assert "is the service running" in result.stderr and "Traceback" not in result.stderr


def test_serve_picks_the_newest_bento_of_the_projects_model(params, monkeypatch):
    """One BentoML store holds the bentos of every registered model; `ftllm serve` takes its own model's newest."""
    from types import SimpleNamespace

    import bentoml

    from ftllm.commands.serve import latest_bento, project_params

    def bento(version: str, built: int, name: str = "ftllm_chat"):
        return SimpleNamespace(tag=bentoml.Tag(name, version), info=SimpleNamespace(creation_time=built))

    model = project_params(params.parent).registry.model_name
    assert model.startswith("cli-")  # the fixture's settings file, not the repository's
    store = [bento(f"{model}-v1", 1), bento(f"{model}-v2", 2), bento("other-model-v7", 3),
             bento(f"{model}x-v9", 4), bento(f"{model}-v3", 5, name="another_service"), bento(f"{model}-v2-v1", 6)]
    monkeypatch.setattr(bentoml, "list", lambda: store)
    assert latest_bento(model) == f"ftllm_chat:{model}-v2"
    assert latest_bento("unknown") is None
    assert latest_bento(model.upper()) == f"ftllm_chat:{model}-v2"  # BentoML lower-cases tag versions
