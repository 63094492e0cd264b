"""The retrain flow end to end on the tiny model: promotion, caching, rejection, bad data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.project import FAST
from tests.support.servers import BIN

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
    # Settings of the schedule, the workers and the monitor change nothing the version is: it
    # registered a new version of the same model.
    _, again = run_flow(project, **{"schedule.timezone": "Europe/Oslo", "workers.train_start_timeout_seconds": 60,
                                    "monitor.window": 50})
    assert (again.changed, again.version) == (False, first.version), again


def test_sabotaged_run_is_rejected_and_champion_stays(first_run, project):
    from mlflow import MlflowClient

    _, first = first_run
    kept = project / "artifacts/cache/baselines"
    entries = {p.name: p.stat().st_mtime_ns for p in kept.glob("*.json")}
    # Few steps: with a learning rate of 0 the adapter stays at its initialisation anyway.
    state, result = run_flow(project, **{"train.learning_rate": 0.0, "train.max_steps": 20})
    assert result.status == "rejected"
    # Only training changed: the base model's scores are the first run's, reused, not written again.
    assert len(entries) == 2 and {p.name: p.stat().st_mtime_ns for p in kept.glob("*.json")} == entries
    assert result.metrics.base_few_shot == first.metrics.base_few_shot
    failed = set(result.failed_checks)
    assert "min_exact_match" in failed
    assert "no_regression_exact_match" in failed
    assert str(MlflowClient().get_model_version_by_alias("ftllm-chat", "champion").version) == first.version
    tags = MlflowClient().get_model_version("ftllm-chat", result.version).tags
    assert tags["gate_passed"] == "false" and tags["parent_champion"] == first.version
    # The dashboard sets the champion's answers beside the untrained candidate's, differences first.
    dashboard = (project / "artifacts/reports/dashboard.html").read_text()
    differ, shown = map(int, re.search(r"(\d+) of (\d+) predictions differ from the champion's", dashboard).groups())
    assert 0 < differ <= shown and dashboard.index(">differs<") < dashboard.index("Training loss")


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


def test_a_run_trains_on_the_settings_file_it_was_given(project, prefect_harness, tmp_path, monkeypatch):
    """`--params FILE` reaches every DVC stage: a setting and a data source set only in FILE are what the
    model was trained on, what the resolved settings say, what MLflow records and what the version's lineage says."""
    import yaml

    # An empty feedback log of its own: feedback other tests of the session posted would be a third source.
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from tasks.config import load_params
    from tasks.files import file_md5

    extra = project / "data-extra.jsonl"  # a second source, named only in FILE
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]
    extra.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Spell out the date 2199-{m + 1:02d}-{d:02d}"},
        {"role": "assistant", "content": f"{months[m]} {d}, 2199"}]}) + "\n" for m in range(12) for d in (3, 17, 26)))
    settings = yaml.safe_load((project / "params.yaml").read_text())
    settings["train"]["max_steps"], settings["train"]["seed"] = 7, 3  # params.yaml says 300 and 42
    settings["data"]["sources"] = [{"path": "data/dates.jsonl"}, {"path": extra.name}]
    settings["gate"]["max_p95_latency_ms"] = FAST["gate.max_p95_latency_ms"]
    other = project / "other-params.yaml"
    other.write_text(yaml.safe_dump(settings, sort_keys=False))

    state = retrain(params_file=str(other), overrides={"eval.max_examples": 12}, return_state=True)
    result = state.result(raise_on_failure=False)
    assert result.status in ("promoted", "rejected") and result.changed, result
    model = project / "artifacts/model"
    assert json.loads((model / "train_summary.json").read_text())["steps"] == 7
    resolved = yaml.safe_load((project / "artifacts/params.yaml").read_text())
    assert (resolved["train"]["max_steps"], resolved["train"]["seed"]) == (7, 3)
    assert [s["path"] for s in resolved["data"]["sources"]] == ["data/dates.jsonl", extra.name]
    assert resolved["data"]["sources"][1]["md5"] == file_md5(extra)
    stats = json.loads((project / "artifacts/prepared/stats.json").read_text())
    assert [s["path"] for s in stats["sources"]][1].endswith(extra.name) and stats["sources"][1]["kept"] > 0
    # One md5 of the data, whichever folder the project is in: the run's (and its version's) hashed absolute paths
    assert result.data.md5 == stats["md5"]
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert (run.data.params["train.max_steps"], run.data.params["train.seed"]) == ("7", "3")
    assert file_md5(extra) in run.data.tags["data_sources"]
    version = MlflowClient().get_model_version("ftllm-chat", result.version)
    assert version.tags["params_digest"] == load_params(other, {"eval.max_examples": 12}).digest()
    assert version.tags["data_sources"] == run.data.tags["data_sources"]


def test_feedback_posted_to_the_service_is_trained_on_by_the_retrain_the_monitor_starts(
        first_run, project, server, tmp_path):  # noqa: F811
    """The loop with the shipped settings on a real Prefect server: corrections posted over HTTP to
    `ftllm serve`, the monitor's event, the deployment trigger's retrain on a worker, the corrections
    in its splits, and the monitor's cursor moved by that run, not by the recommendation."""
    import subprocess
    import sys

    import httpx
    import yaml
    from mlflow import MlflowClient

    from tasks.data.prepare import assign_split
    from tasks.data.sources import prompt_key
    from tasks.feedback import FeedbackReader
    from tasks.files import file_md5
    from tests.support.project import free_port, wait_until_up

    db = tmp_path / "feedback.db"  # the service writes it, the monitor and the run read it
    env = {**server, "FTLLM_FEEDBACK_DB": str(db)}
    rows = [json.loads(line) for line in (project / "data/dates.jsonl").read_text().splitlines()]

    def split(row: dict, corrected: bool) -> str:  # the default fractions: val 0.1, test 0.1, feedback 0.5
        return assign_split(prompt_key(row["messages"]), 0.1, 0.1, 0.5, corrected)

    held = next(r for r in rows if split(r, False) == "train" and split(r, True) == "feedback")
    trained = next(r for r in rows if split(r, True) == "train")
    others = [r for r in rows if r is not held and r is not trained][:44]
    # Served conversations the settings cannot train: two user turns in a row (which a data file may
    # not hold: the export leaves it out, counted), and prompts over data.max_tokens (3 of the
    # export's 49, past data.max_drop_fraction of it). Left out and counted, they must not fail the
    # run and keep every later run from the feedback.
    question = others[0]["messages"][-2]["content"]
    untrainable = [{"messages": [{"role": "user", "content": "Hello."}, {"role": "user", "content": question},
                                 {"role": "assistant", "content": "A date."}]},
                   *[{"messages": [{"role": "user", "content": f"{n} " + "Please rewrite this date for me. " * 20
                                    + question}, {"role": "assistant", "content": "A date."}]} for n in range(3)]]
    # 50 corrections: monitor.min_new_corrections
    fixes = [(held, "Held-out correction."), (trained, "Trained correction."),
             *[(r, r["messages"][-1]["content"]) for r in others + untrainable]]
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    # The first run's bento, by tag: the session's BentoML store also holds other modules' bentos.
    # Without a settings file or model tag from the caller's environment: this service serves
    # this project's champion.
    serve_env = {k: v for k, v in env.items() if k not in ("FTLLM_PARAMS", "FTLLM_BENTO_MODEL", "PREFECT_API_URL")}
    # The operator's own front end: a trusted key (no approval needed) that names its end users, so
    # the monitor counts several sources (monitor.min_distinct_sources).
    serve_env["FTLLM_API_KEYS"] = "app:infer+feedback+trusted=e2e-front-end-secret"
    service = subprocess.Popen([sys.executable, "-m", "ftllm.cli", "serve", "--port", str(port),
                                "--bento", first_run[1].bento], cwd=project,
                               env=serve_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/readyz", service, 180, tmp_path / "serve.log")
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer e2e-front-end-secret"}) as http:
            for n, (row, fix) in enumerate(fixes):
                user = f"customer-{n % 5}"
                answer = http.post("/v1/chat/completions", json={"messages": row["messages"][:-1], "max_tokens": 4,
                                                                 "temperature": 0, "user": user}).json()
                stored = http.post("/feedback", json={"id": answer["id"], "rating": 1, "correction": fix, "user": user})
                assert stored.status_code == 200, stored.text
    finally:
        import psutil

        children = psutil.Process(service.pid).children(recursive=True)
        service.terminate()  # as a supervisor stops it: `ftllm serve` passes SIGTERM on to the server
        service.wait(30)
        log.close()
        psutil.wait_procs(children, timeout=30)
    assert service.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert children and not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    # The shipped settings (data.feedback: true, monitor thresholds), with a small training budget.
    settings = project / "params.yaml"
    shipped = settings.read_text()
    budget = yaml.safe_load(shipped)
    budget["train"]["max_steps"], budget["eval"]["max_examples"] = 10, 20
    settings.write_text(yaml.safe_dump(budget, sort_keys=False))
    try:
        def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
            done = subprocess.run(args, env=env, cwd=project, capture_output=True, text=True, timeout=timeout, check=False)
            assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
            return done

        run(str(BIN / "ftllm"), "deploy", "--json", "--params", str(settings))
        checked = json.loads(run(sys.executable, "-m", "flows.monitor").stdout.strip().splitlines()[-1])
        assert checked["retrain_recommended"] and checked["feedback"]["new_corrections"] == 50, checked
        cursor = [sys.executable, "-c", ("import json; from prefect.variables import Variable; "
                                         "print(json.dumps(Variable.get('ftllm-monitor-ftllm-chat', default=None)))")]
        assert json.loads(run(*cursor).stdout.strip().splitlines()[-1]) is None  # recommending moved nothing
        flow_run = _wait_for_automation_run(env)
        worker = run(str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-process", "--run-once", timeout=900)
        state = run(sys.executable, "-c", _FLOW_RUN_STATE, flow_run).stdout.strip().splitlines()[-1]
        assert state.startswith("COMPLETED"), (state, worker.stdout[-3000:], worker.stderr[-3000:])
        # That run read the feedback up to id 50: the cursor is there, the same feedback starts nothing again.
        with FeedbackReader(db) as reader:  # read in this log: its identity kept beside
            log_id = reader.log_id()
        assert json.loads(run(*cursor).stdout.strip().splitlines()[-1]) == {"feedback_id": 50, "decision": 0, "log": log_id}
        again = json.loads(run(sys.executable, "-m", "flows.monitor").stdout.strip().splitlines()[-1])
        assert again["feedback"]["new_corrections"] == 0 and not again["retrain_recommended"]
    finally:
        settings.write_text(shipped)

    prepared = project / "artifacts/prepared"
    split_rows = {s: [json.loads(x) for x in (prepared / f"{s}.jsonl").read_text().splitlines()]
                  for s in ("train", "val", "test", "feedback")}
    held_fix = {"messages": [*held["messages"][:-1], {"role": "assistant", "content": "Held-out correction."}]}
    assert held_fix in split_rows["feedback"] and held_fix not in split_rows["train"]
    assert {"messages": [*trained["messages"][:-1], {"role": "assistant", "content": "Trained correction."}]} in split_rows["train"]
    everywhere = [r["messages"] for rs in split_rows.values() for r in rs]
    assert held["messages"] not in everywhere and trained["messages"] not in everywhere  # replaced by the corrections

    snapshot = project / "data/feedback.jsonl"  # the export the run trained on, versioned with data/
    md5 = file_md5(snapshot)
    assert len(snapshot.read_text().splitlines()) == 49
    resolved = yaml.safe_load((project / "artifacts/params.yaml").read_text())
    assert resolved["data"]["sources"] == [{**resolved["data"]["sources"][0], "path": "data/dates.jsonl"},
                                           {**resolved["data"]["sources"][1], "feedback": True, "md5": md5}]
    assert (project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("retrain").experiment_id],
                                       filter_string=f"tags.`prefect.flow_run_id` = '{flow_run}'")
    assert md5 in run.data.tags["data_sources"] and run.data.tags["feedback_id"] == "50"
    assert run.data.tags["feedback.not_a_chat"] == "1"  # the two user turns, left out by the export
    feedback_source = next(s for s in json.loads(run.data.tags["data_sources"]) if s["md5"] == md5)
    assert feedback_source["invalid_dropped"] == 0  # the long prompts are left out by data.length_policy
    assert not [r for rs in split_rows.values() for r in rs if r["messages"][-2]["content"].endswith(question)
                and r["messages"][-1]["content"] == "A date."]
    assert json.loads(run.data.tags["feedback.keys"]) == {"app": 49} and run.data.tags["feedback.end_users"] == "5"
    assert "'feedback': True" in run.data.params["data.sources"]  # the run's settings record the source it read
    assert f"'md5': '{md5}'" in run.data.params["data.sources"]  # as the stages read them: with each file's md5
    assert "data/feedback.jsonl" in [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "data")]
    version = MlflowClient().get_model_version("ftllm-chat", run.data.tags["model_version"])
    assert version.tags["data_sources"] == run.data.tags["data_sources"] and version.tags["feedback_id"] == "50"
    # Scored on the cases users corrected, against the champion of the first run.
    assert run.data.metrics["candidate_feedback.examples"] == min(len(split_rows["feedback"]), 20) > 0  # eval.max_examples


_FLOW_RUN_STATE = """
import sys
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync
async def state():
    async with get_client() as c:
        run = await c.read_flow_run(sys.argv[1])
        return f"{run.state.type.value} {run.state.name}: {run.state.message}"
print(run_coro_as_sync(state()))
"""

_AUTOMATION_RUNS = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName
from prefect.utilities.asyncutils import run_coro_as_sync
async def runs():
    async with get_client() as c:
        found = await c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])),
                                       deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled"])))
        return [str(r.id) for r in found if r.created_by and r.created_by.type == "AUTOMATION"]
print(json.dumps(run_coro_as_sync(runs())))
"""


def _wait_for_automation_run(env: dict, seconds: float = 90) -> str:
    """The id of the retrain flow run the deployment trigger created."""
    import subprocess
    import sys
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", _AUTOMATION_RUNS], env=env, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        if runs := json.loads(out.stdout.strip().splitlines()[-1]):
            assert len(runs) == 1, runs
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"no retrain flow run created by the automation within {seconds} s")


def test_a_run_with_a_preference_source_registers_a_version_with_the_preference_checks(first_run, project, tmp_path,
                                                                                      monkeypatch):
    """Ratings and corrections in the service's log: the run tunes on them and gates on the held-out preferences.

    It also continues the champion's adapter (`train.init_from: champion`): the warm start's
    settings are recorded in the same MLflow run as the stages' own.
    """
    from mlflow import MlflowClient

    from tasks.feedback.schema import Interaction
    from tasks.feedback.store import FeedbackStore
    from tasks.files import file_md5
    from tasks.registry.versions import list_versions

    db = tmp_path / "feedback.db"
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)  # written through the store's API, as the service writes it
    rows = [json.loads(line) for line in (project / "data/dates.jsonl").read_text().splitlines()[:48]]
    for i, row in enumerate(rows):
        prompt, right = row["messages"][:-1], row["messages"][-1]["content"]
        wrong = i % 2 == 1
        prompt = [prompt[0], {"role": "user", "content": f"Please write {prompt[1]['content'].split()[-1]} in words"}]
        store.log_interaction(Interaction(f"c{i}", "chat", "ftllm-chat", first_run[1].version, prompt,
                                          "January 1, 1900" if wrong else right, "stop", 20, 6, 5.0))
        # A third from the operator's trusted front end, admitted without approval (docs/guides/trust.md);
        # the rest from callers without a key (an open service), approved by a person below.
        trusted = i % 3 == 0
        store.add_feedback(f"c{i}", 1 if wrong else 5, right if wrong and i % 4 == 1 else None,
                           key_name="app" if trusted else "anonymous", end_user=f"customer-{i % 5}", trusted=trusted)
    # The untrusted ratings, once approved, are preference data too: within feedback.max_key_share
    # of the run's train rows (they were capped to a share of the few trusted rows, nearly all left out).
    store.review("approved", "cli", keys=["anonymous"])
    store.close()

    sources = [{"path": "data/dates.jsonl"}, {"feedback": True}]
    _, result = run_flow(project, **{"data.sources": sources, "train.max_steps": 10, "eval.max_examples": 20,
                                     "preference.max_steps": 4, "train.init_from": "champion"})
    assert result.status in ("promoted", "rejected"), result.error
    replay = json.loads((project / "artifacts/prepared/stats.json").read_text())["replay"]
    assert replay["new"] > 0 and 0 < replay["replayed"] < replay["left_out"]
    tuned = json.loads((project / "artifacts/preference/preference.json").read_text())
    assert tuned["ran"] is True and tuned["examples"] >= 8
    # What the ratings became is in the result and the MLflow run: 24 rated well, 12 down, 12 corrected.
    counts = result.feedback["preference"]
    assert (counts["desirable"], counts["undesirable"], counts["pairs_from_corrections"], counts["capped"]) == (24, 12, 12, 0)
    names = {c.name for c in result.gate.checks}
    assert {"no_regression_reward_accuracy", "no_regression_avoids_rated_down"} <= names
    version = MlflowClient().get_model_version("ftllm-chat", result.version)
    assert version.run_id == result.mlflow_run_id
    logged = MlflowClient().get_run(version.run_id).data.metrics
    run = MlflowClient().get_run(version.run_id).data
    parent = MlflowClient().get_model_version("ftllm-chat", version.tags["parent_champion"])
    assert run.params["train.init_path"].startswith(f"artifacts/champion/ftllm-chat-v{parent.version}-{parent.run_id[:12]}/")
    assert (project / run.params["train.init_path"] / "adapter").is_dir() and run.metrics["train_steps"] == 10
    assert run.tags["preference.undesirable"] == "12" and run.tags["preference.capped"] == "0"
    # Whether the tuned model held the supervised model's exact match on val, and so is the candidate.
    assert run.tags["preference.kept"] == str(tuned["kept"]).lower() and "preference_val_exact_match_tuned" in run.metrics
    # The version's lineage names the preference file it was tuned on, as it names every data source.
    listed = json.loads(version.tags["data_sources"])
    assert [s["md5"] for s in listed if s.get("preference")] == [file_md5(project / "data/preference.jsonl")]
    for role in ("candidate_preference", "champion_preference"):
        assert 0.0 <= logged[f"{role}.reward_accuracy"] <= 1.0 and logged[f"{role}.examples"] > 0
        assert f"{role}.rated_down_repeat_rate" in logged
    # ... and on the version, which `ftllm models --json` lists (it showed the test split's alone)
    [listed_version] = [v for v in list_versions("ftllm-chat") if v["version"] == result.version]
    assert listed_version["metrics"]["preference.reward_accuracy"] == pytest.approx(logged["candidate_preference.reward_accuracy"],
                                                                                   abs=1e-5)
    assert "gate_verdict.json" in [a.path for a in MlflowClient().list_artifacts(version.run_id)]
