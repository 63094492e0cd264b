"""The monitor flow on a real feedback log: its figures, its event, its cursor, and the retrain it triggers.

The first test runs the flow under the session's `prefect_test_harness` and reads the
emitted event back from the API. The slow one starts `prefect server start`, registers the
deployments with `ftllm deploy` and checks that the automation on `retrain/scheduled`
creates a flow run once the monitor recommends retraining.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.config import render_params
from tasks.feedback import FeedbackStore, Interaction
from tests.support.project import REPO
from tests.support.servers import BIN, read_events


def write_feedback(db: Path, completions: int, ratings: list[int], corrected: int, model: str = "ftllm-monitored") -> None:
    """`completions` answers `model` served (the `monitored` project's, by default), rated in turn
    by three trusted keys; the first `corrected` ratings carry a correction."""
    store = FeedbackStore(db)
    try:
        for i in range(completions):
            store.log_interaction(Interaction(
                id=f"c{i}", endpoint="/v1/chat/completions", model_name=model, model_version="1",
                messages=[{"role": "system", "content": "Rewrite the ISO date in words."},
                          {"role": "user", "content": f"Convert this ISO date: 20{i % 90 + 10:02d}-03-18"}],
                answer="March 18, 2016", finish_reason="stop", prompt_tokens=9, completion_tokens=4, latency_ms=12.0,
            ))
        for i, rating in enumerate(ratings):
            store.add_feedback(f"c{i % completions}", rating, "March 18, 2016" if i < corrected else None,
                               key_name=f"client-{i % 3}", trusted=True)  # three trusted sources, no review
    finally:
        store.close()


@pytest.fixture
def monitored(tmp_path, monkeypatch) -> Path:
    """A project folder with settings (low thresholds), a train split and a feedback log."""
    monkeypatch.setenv("FTLLM_ROOT", str(tmp_path))  # the tiny base model is cached under this root
    params = yaml.safe_load(render_params())  # the defaults, whatever the user's params.yaml holds
    params["monitor"].update(min_new_corrections=5, min_ratings=4, min_mean_rating=3.5, window=50)
    params["registry"]["model_name"] = "ftllm-monitored"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    if (REPO / "artifacts/base").is_dir():  # a tiny base already built here: no need to build it again
        (tmp_path / "artifacts").mkdir()
        (tmp_path / "artifacts/base").symlink_to(REPO / "artifacts/base")
    train = tmp_path / "artifacts/prepared/train.jsonl"
    train.parent.mkdir(parents=True, exist_ok=True)
    train.write_text("".join((REPO / "data/dates.jsonl").read_text().splitlines(keepends=True)[:100]))
    return tmp_path


def test_monitor_measures_the_log_emits_its_event_and_leaves_the_cursor_to_the_run(prefect_harness, monitored):
    from prefect.variables import Variable

    from flows.monitor import monitor
    from tasks.monitor.cursor import Cursor, advance_cursor, cursor_variable

    db = monitored / "feedback.db"
    # 12 ratings, mean (6*2 + 6*4) / 12 = 3.0 < 3.5; 2 corrections (< 5).
    write_feedback(db, completions=12, ratings=[2, 4] * 6, corrected=2)
    first = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(db))
    assert first["feedback"]["new_ratings"] == 12 and first["feedback"]["new_corrections"] == 2
    assert first["feedback"]["mean_rating"] == pytest.approx(3.0)
    assert first["retrain_recommended"] and "mean rating 3.00" in first["reasons"][0]
    drift = first["drift"]
    assert drift["prompts"] == 12 and drift["train_mean_tokens"] > 0
    # The same kind of prompts as the train split: (almost) every token was seen in training, no drift.
    assert drift["unknown_token_rate"] < 0.05 and abs(drift["length_drift"]) < 0.5 and first["drift_alerts"] == []
    # Recommending moves nothing: no run has read this feedback yet, so it still counts as new.
    assert Variable.get(cursor_variable("ftllm-monitored"), default=None) is None
    again = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(db))
    assert again["feedback"]["new_ratings"] == 12 and again["retrain_recommended"]

    # A run read feedback up to id 12 into its data (flows/retrain.py): nothing new, nothing recommended.
    assert advance_cursor("ftllm-monitored", Cursor(12)) == Cursor(12)
    assert advance_cursor("ftllm-monitored", Cursor(3, 2)) == Cursor(12, 2)  # each part moves forward only
    second = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(db))
    assert second["feedback"]["new_ratings"] == 0 and not second["retrain_recommended"]

    events = read_events("ftllm.monitor.checked", "ftllm.model.ftllm-monitored", expected=3)
    labels = sorted(e.resource["ftllm.retrain-recommended"] for e in events)
    assert labels == ["false", "true", "true"], events
    recommended = next(e for e in events if e.resource["ftllm.retrain-recommended"] == "true")
    assert recommended.payload["feedback"]["new_ratings"] == 12
    assert str(recommended.id) in (first["event_id"], again["event_id"])


def test_a_replaced_log_is_counted_whole_and_the_next_run_starts_the_cursor_on_it(prefect_harness, monitored):
    """A new feedback.db gives ids from 1 again, under the cursor the old log left: the monitor
    counted none of its feedback, and a run that read it could not move the cursor back."""
    from flows.monitor import monitor
    from tasks.monitor.cursor import Cursor, advance_cursor, read_cursor

    model = "ftllm-monitored"
    old, new = monitored / "old.db", monitored / "feedback.db"
    write_feedback(old, completions=40, ratings=[4] * 40, corrected=0)
    assert advance_cursor(model, Cursor(40, 0), old).feedback_id == 40  # a run read the old log
    write_feedback(new, completions=6, ratings=[1] * 6, corrected=6)  # ids 1..6 in the new log
    checked = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(new))
    assert checked["feedback"]["new_log"] and checked["feedback"]["new_corrections"] == 6
    assert advance_cursor(model, Cursor(6, 0), new) == Cursor(6, 0) == read_cursor(model)  # a run read the new log: both anew
    after = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(new))
    assert not after["feedback"]["new_log"] and after["feedback"]["new_corrections"] == 0
    assert advance_cursor(model, Cursor(3, 0), new) == Cursor(6, 0)  # on the same log, never back


def test_a_replacing_log_that_gave_more_ids_than_the_cursor_is_still_another_log(prefect_harness, monitored):
    """The cursor keeps the identity of the log it was read in: a replacing log whose ids already
    pass the cursor was taken for the same log, and its feedback under the cursor never counted."""
    from flows.monitor import monitor
    from tasks.feedback import FeedbackReader
    from tasks.monitor.cursor import Cursor, advance_cursor, read_cursor

    model = "ftllm-monitored"
    old, new = monitored / "old.db", monitored / "feedback.db"
    write_feedback(old, completions=4, ratings=[4] * 4, corrected=0)
    with FeedbackReader(old) as reader:
        old_id = reader.log_id()
    assert advance_cursor(model, Cursor(4, 0, old_id), old) == Cursor(4, 0, old_id) == read_cursor(model)
    write_feedback(new, completions=10, ratings=[1] * 10, corrected=6)  # ids 1..10: past the cursor's 4
    with FeedbackReader(new) as reader:
        new_id = reader.log_id()
    checked = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(new))
    assert checked["feedback"]["new_log"] and checked["feedback"]["new_corrections"] == 6
    assert checked["retrain_recommended"]
    # a run read the new log up to 10: the cursor is of the new log, not the old one's part kept
    assert advance_cursor(model, Cursor(10, 0, new_id), new) == Cursor(10, 0, new_id) == read_cursor(model)
    after = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(new))
    assert not after["feedback"]["new_log"] and after["feedback"]["new_ratings"] == 0


def test_a_file_that_is_not_the_log_fails_the_monitor_with_one_line(prefect_harness, monitored):
    from flows.monitor import monitor

    bogus = monitored / "feedback.db"
    bogus.write_text("not sqlite")
    state = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(bogus), return_state=True)
    assert state.is_failed() and "feedback.db: not a feedback log" in state.message
    done = subprocess.run([sys.executable, "-m", "flows.monitor"], cwd=monitored, capture_output=True, text=True,
                          env={**os.environ, "FTLLM_FEEDBACK_DB": str(bogus), "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 1 and "error: " in done.stderr and "not a feedback log" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


def test_monitor_recommends_no_retrain_that_would_not_read_the_feedback(prefect_harness, monitored):
    from flows.monitor import monitor

    params = yaml.safe_load((monitored / "params.yaml").read_text())
    params["data"]["feedback"] = False  # and no {feedback: true} source: a retrain would never read it
    params["registry"]["model_name"] = "ftllm-unread"
    (monitored / "params.yaml").write_text(yaml.safe_dump(params))
    db = monitored / "feedback.db"
    write_feedback(db, completions=10, ratings=[4] * 10, corrected=10, model="ftllm-unread")  # min_new_corrections 5
    checked = monitor(params_file=str(monitored / "params.yaml"), feedback_db=str(db))
    assert not checked["retrain_recommended"]
    assert checked["reasons"][0].startswith("10 new corrections")
    assert "would not read this feedback" in checked["reasons"][-1] and "data.feedback: true" in checked["reasons"][-1]



@pytest.mark.slow
def test_the_automation_starts_retrain_after_enough_corrections(server, project, tmp_path):  # noqa: F811
    deploy = subprocess.run([str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml")],
                            env=server, cwd=project, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    assert len(json.loads(deploy.stdout.strip().splitlines()[-1])["deployments"]) == 4

    db = tmp_path / "feedback.db"
    write_feedback(db, completions=60, ratings=[4] * 60, corrected=60, model="ftllm-chat")  # min_new_corrections: 50
    env = {**server, "FTLLM_FEEDBACK_DB": str(db)}
    run = subprocess.run([sys.executable, "-m", "flows.monitor"], env=env, cwd=project,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["retrain_recommended"] and result["feedback"]["new_corrections"] == 60

    script = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.utilities.asyncutils import run_coro_as_sync

async def runs():
    async with get_client() as c:
        found = await c.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["scheduled"])))
        return [{"id": str(r.id), "flow": str(r.flow_id), "state": r.state.type.value, "by": r.created_by and r.created_by.type}
                for r in found if r.deployment_id]
print(json.dumps(run_coro_as_sync(runs())))
"""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", script], env=server, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        runs = [r for r in json.loads(out.stdout.strip().splitlines()[-1]) if r["by"] == "AUTOMATION"]
        if runs:
            break
        time.sleep(3)
    assert runs, "no flow run created by the automation within 90 s"
