"""The retrain flow end to end on the tiny model: promotion, caching, rejection, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.project import FAST

pytestmark = pytest.mark.slow


def run_flow(project: Path, **overrides):
    from flows.retrain import retrain

    state = retrain(params_file=str(project / "params.yaml"), overrides={**FAST, **overrides}, return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture(scope="module")
def first_run(project, prefect_harness):
    return run_flow(project)


def test_good_run_is_registered_promoted_and_packaged(first_run, project):
    import bentoml
    from mlflow import MlflowClient

    state, result = first_run
    assert state.is_completed(), result
    assert result.status == "promoted"
    assert result.gate.passed is True
    cand, base = result.metrics.candidate, result.metrics.base_zero_shot
    assert cand["exact_match"] > base["exact_match"] + 0.2
    assert cand["perplexity"] < base["perplexity"] / 10
    version = MlflowClient().get_model_version_by_alias("ftllm-chat", "champion")
    assert str(version.version) == result.version
    assert version.tags["data_md5"] == result.data.md5
    assert version.tags["gate_passed"] == "true"
    docs = [a.path for a in MlflowClient().list_artifacts(result.mlflow_run_id, "data_docs")]
    assert "data_docs/index.html" in docs
    from prefect.artifacts import Artifact

    for key in ("retrain-metrics", "retrain-predictions", "retrain-gate", "retrain-validation"):
        assert Artifact.get(key) is not None, key
    assert "reference" in str(Artifact.get("retrain-predictions").data)
    assert bentoml.bentos.get(result.bento).tag.name
    assert bentoml.models.get(result.bento_model).path


def test_champion_loads_with_pyfunc_in_a_fresh_process(first_run, project):
    import os
    import subprocess
    import sys

    code = (
        "import mlflow.pyfunc, pandas as pd, json\n"
        "m = mlflow.pyfunc.load_model('models:/ftllm-chat@champion')\n"
        "msgs = [{'role': 'system', 'content': 'Rewrite the ISO date in words.'}, {'role': 'user', 'content': '2001-02-03'}]\n"
        "print(json.dumps(m.predict(pd.DataFrame({'messages': [msgs]}))))\n"
    )
    # Another working directory, so nothing of the project's folder is picked up by accident.
    out = subprocess.run([sys.executable, "-c", code], cwd=project.parent, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    from tasks.evaluate.generation import generate_batched
    from tasks.model.chat import render_prompt
    from tasks.model.loading import load_trained

    model, tok, _ = load_trained(project / "artifacts/model")
    msgs = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]
    expected, _, _ = generate_batched(model, tok, [render_prompt(tok, msgs)], 64, 1)
    assert answer == expected and answer[0]


def test_unchanged_run_skips_stages_and_registers_nothing(first_run, project):
    _, first = first_run
    state, result = run_flow(project)
    assert state.is_completed()
    assert result.changed is False
    assert result.version == first.version
    assert set(result.stages.skipped) >= {"prepare", "finetune", "evaluate"}
    assert result.durations["stages"] < first.durations["stages"]


def test_sabotaged_run_is_rejected_and_champion_stays(first_run, project):
    from mlflow import MlflowClient

    _, first = first_run
    # Few steps: with a learning rate of 0 the adapter stays at its initialisation anyway.
    state, result = run_flow(project, **{"train.learning_rate": 0.0, "train.max_steps": 20})
    assert result.status == "rejected"
    failed = set(result.failed_checks)
    assert "min_exact_match" in failed
    assert "no_regression_exact_match" in failed
    assert str(MlflowClient().get_model_version_by_alias("ftllm-chat", "champion").version) == first.version
    tags = MlflowClient().get_model_version("ftllm-chat", result.version).tags
    assert tags["gate_passed"] == "false" and tags["parent_champion"] == first.version


def test_failed_packaging_promotes_nothing(first_run, project, monkeypatch):
    import tasks.registry.bento
    from tasks.errors import PackageError
    from tasks.registry.versions import champion_version, list_versions

    def broken_build(*args, **kwargs):
        raise PackageError("bentoml build failed (simulated)")

    monkeypatch.setattr(tasks.registry.bento, "build_bento", broken_build)
    # A model of its own with a gate that any candidate passes, so the run reaches the build.
    lenient = {"registry.model_name": "ftllm-pkg", "gate.min_exact_match": 0.0, "gate.max_perplexity": 1e9,
               "gate.min_gain_over_prompting": -1.0, "train.max_steps": 10, "train.seed": 7, "eval.max_examples": 12}
    state, result = run_flow(project, **lenient)
    assert state.is_failed() and "simulated" in result.error
    assert champion_version("ftllm-pkg") is None
    (version,) = list_versions("ftllm-pkg")
    assert version["gate_passed"] and "fingerprint" not in version["tags"]
    assert champion_version("ftllm-chat") == first_run[1].version


def test_invalid_data_fails_at_validation_and_registers_nothing(first_run, project, tmp_path):
    from tasks.registry.versions import list_versions

    before = list_versions("ftllm-chat")
    bad = tmp_path / "bad.jsonl"
    good = json.loads((project / "data/dates.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"messages": []}) + "\n")
    state, result = run_flow(project, **{"data.path": str(bad)})
    assert state.is_failed()
    assert result.status == "failed"
    assert "line 2" in result.error and "line 3" in result.error
    assert result.stages is None and result.mlflow_run_id is None
    assert list_versions("ftllm-chat") == before


def test_training_routed_to_a_missing_deployment_fails_clearly(first_run, project, tmp_path):
    """`workers.train_deployment` naming no deployment: the run fails naming it, before any training."""
    import subprocess
    import sys

    from tasks.registry.versions import champion_version, list_versions

    before = list_versions("ftllm-chat")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "remote", "add", "-q", "-d", "--local", "shared", str(tmp_path / "store")], cwd=project, check=True)
    try:
        # Another seed, so that the finetune stage is out of date and has to be sent.
        state, result = run_flow(project, **{"workers.train_deployment": "finetune/no-such-pool", "train.seed": 11})
    finally:
        (project / ".dvc" / "config.local").unlink()
    assert state.is_failed() and result.status == "failed"
    assert "no Prefect deployment 'finetune/no-such-pool'" in result.error and "--train-pool" in result.error
    assert list_versions("ftllm-chat") == before and champion_version("ftllm-chat") == first_run[1].version
    assert any((tmp_path / "store").rglob("*")), "the prepared data was pushed for the worker to pull"


def test_feedback_posted_to_the_service_is_in_the_next_runs_splits(first_run, project, tmp_path, monkeypatch):
    """Corrections posted over HTTP to `ftllm serve` reach the next run's train and feedback splits, no manual step."""
    import os
    import subprocess
    import sys

    import httpx
    import yaml
    from mlflow import MlflowClient

    from tasks.data.prepare import assign_split
    from tasks.data.sources import prompt_key
    from tasks.files import file_md5
    from tests.support.project import free_port, wait_until_up

    db = tmp_path / "feedback.db"
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))  # the service writes it, the run reads it
    rows = [json.loads(line) for line in (project / "data/dates.jsonl").read_text().splitlines()]

    def split(row: dict, corrected: bool) -> str:  # the default fractions: val 0.1, test 0.1, feedback 0.5
        return assign_split(prompt_key(row["messages"]), 0.1, 0.1, 0.5, corrected)

    held = next(r for r in rows if split(r, False) == "train" and split(r, True) == "feedback")
    trained = next(r for r in rows if split(r, True) == "train")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    # The first run's bento, by tag: the session's BentoML store also holds other modules' bentos.
    # Without a settings file or model tag from the caller's environment: this service serves
    # this project's champion.
    env = {k: v for k, v in os.environ.items() if k not in ("FTLLM_PARAMS", "FTLLM_BENTO_MODEL")}
    env["FTLLM_ROOT"] = str(project)
    server = subprocess.Popen([sys.executable, "-m", "ftllm.cli", "serve", "--port", str(port),
                               "--bento", first_run[1].bento], cwd=project,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/readyz", server, 180, tmp_path / "serve.log")
        for row, fix in ((held, "Held-out correction."), (trained, "Trained correction.")):
            answer = httpx.post(f"{url}/v1/chat/completions", json={"messages": row["messages"][:-1], "max_tokens": 8,
                                                                     "temperature": 0}, timeout=60).json()
            stored = httpx.post(f"{url}/feedback", json={"id": answer["id"], "rating": 1, "correction": fix}, timeout=30)
            assert stored.status_code == 200, stored.text
    finally:
        import psutil

        children = psutil.Process(server.pid).children(recursive=True)
        server.terminate()  # as a supervisor stops it: `ftllm serve` passes SIGTERM on to the server
        server.wait(30)
        log.close()
        psutil.wait_procs(children, timeout=30)
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert children and not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    sources = [{"path": "data/dates.jsonl"}, {"feedback": True}]
    state, result = run_flow(project, **{"data.sources": sources, "train.max_steps": 10, "eval.max_examples": 20})
    assert state.is_completed(), result
    prepared = project / "artifacts/prepared"
    split_rows = {s: [json.loads(x) for x in (prepared / f"{s}.jsonl").read_text().splitlines()]
                  for s in ("train", "val", "test", "feedback")}
    assert split_rows["feedback"] == [{"messages": [*held["messages"][:-1], {"role": "assistant", "content": "Held-out correction."}]}]
    assert {"messages": [*trained["messages"][:-1], {"role": "assistant", "content": "Trained correction."}]} in split_rows["train"]
    everywhere = [r["messages"] for rs in split_rows.values() for r in rs]
    assert held["messages"] not in everywhere and trained["messages"] not in everywhere  # replaced by the corrections

    snapshot = project / "data/feedback.jsonl"  # the export the run trained on, versioned with data/
    md5 = file_md5(snapshot)
    resolved = yaml.safe_load((project / "artifacts/params.yaml").read_text())
    assert resolved["data"]["sources"][1]["md5"] == md5 == result.data.sources[1].md5
    assert result.data.sources[1].feedback and result.data.splits["feedback"] == 1
    assert (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert md5 in run.data.tags["data_sources"]
    assert "data/feedback.jsonl" in [a.path for a in MlflowClient().list_artifacts(result.mlflow_run_id, "data")]
    assert MlflowClient().get_model_version("ftllm-chat", result.version).tags["data_sources"] == run.data.tags["data_sources"]
    # Scored on the cases users corrected, against the champion of the first run.
    assert result.metrics.candidate_feedback["examples"] == 1 and result.metrics.champion_feedback["examples"] == 1
    assert "no_regression_feedback_exact_match" in [c.name for c in result.gate.checks]
