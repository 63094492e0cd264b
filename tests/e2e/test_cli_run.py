"""`ftllm run` as a user runs it: a process, its exit code, its JSON result on stdout."""

from __future__ import annotations

import json
import shutil

import pytest

from tasks.config import render_params
from tests.support.project import REPO


@pytest.mark.slow
def test_run_on_invalid_data_fails_at_validation_with_a_result(tmp_path):
    """The whole path of a failed run: the flow's Failed state carries the RunResult back to `ftllm run`."""
    import os
    import subprocess
    import sys

    import jsonschema

    from tasks.pipeline.result import RunResult

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(render_params())  # the defaults, whatever the user's file holds
    bad = tmp_path / "bad.jsonl"
    good = (REPO / "data" / "dates.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n{not json\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_", "FTLLM_"))}
    run = subprocess.run([sys.executable, "-m", "ftllm.cli", "run", "--set", f"data.path={bad}", "--json"],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 1, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    jsonschema.validate(doc, RunResult.model_json_schema(mode="serialization"))
    assert doc["status"] == "failed" and "line 2" in doc["error"] and doc["mlflow_run_id"] is None
    assert doc["data"]["path"] == str(bad) and doc["validation"]["valid"] is False
    assert f"error: {doc['error']}" in run.stderr and "Traceback" not in run.stderr



@pytest.mark.slow
def test_settings_the_base_model_cannot_run_exit_2_from_inside_the_flow(tmp_path):
    """A setting that is wrong only for this base model (a row past its context) is found once the
    flow has read the model, but it is still a usage error: exit 2, as for any other bad setting."""
    import os
    import subprocess
    import sys

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(render_params())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "BENTOML_", "FTLLM_"))}
    run = subprocess.run([sys.executable, "-m", "ftllm.cli", "run", "--set", "train.seq_len=4096", "--json"],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    assert doc["status"] == "failed" and doc["exit_code"] == 2
    assert "train.seq_len=4096 is longer than the context of the base model" in doc["error"]
    assert "Traceback" not in run.stderr
