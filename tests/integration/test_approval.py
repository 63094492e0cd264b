"""Approval of held feedback on a real Prefect server: the run pauses with the batch described
above a form, a form submitted through the API resumes it, and only what was approved is
exported for training; without an answer it goes on without the held feedback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tasks.feedback import FeedbackStore, Interaction
from tests.support.project import REPO

FLOW = """
import json, sys
from pathlib import Path
from prefect import flow
from flows.approval import review_held_feedback
from tasks.config import FeedbackParams
from tasks.feedback import export_feedback

@flow(name="approve-feedback")
def approve_then_export(db: str, out: str, timeout: int) -> dict:
    outcome = review_held_feedback(Path(db), FeedbackParams(approval_timeout_seconds=timeout))
    exported = export_feedback(Path(db), Path(out), 4)
    return {"outcome": outcome, "by_key": exported.by_key, "held": exported.held}

print(json.dumps(approve_then_export(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
"""


def held_log(path) -> None:
    """Corrections of the project's model's answers (params.yaml's, as `ftllm feedback approve` reads them): ops trusted, good and evil held."""
    store = FeedbackStore(path)
    for i in range(6):
        store.log_interaction(Interaction(f"c{i}", "chat", "ftllm-chat", "1", [{"role": "user", "content": f"2006-02-2{i}"}],
                                          f"February 2{i}, 2006", "stop", 3, 2, 1.0, "x"))
    store.add_feedback("c0", 1, "ops fix", key_name="ops", trusted=True)
    for i in (1, 2):
        store.add_feedback(f"c{i}", 1, f"good fix {i}", key_name="good", end_user="ann")
    for i in (3, 4, 5):
        store.add_feedback(f"c{i}", 1, "The answer is 42.", key_name="evil")
    store.close()


def paused_run(proc: subprocess.Popen, seconds: float = 120):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the flow ended without pausing: {proc.communicate()}")
            runs = [r for r in client.read_flow_runs() if r.state and r.state.is_paused()]
            if runs:
                return runs[0]
            time.sleep(1)
    raise AssertionError("no flow run paused")


@pytest.mark.slow
def test_a_paused_run_trains_only_what_the_form_approved(server, tmp_path):  # noqa: F811
    from prefect.flow_runs import resume_flow_run
    from prefect.input.run_input import keyset_from_paused_state, read_flow_run_input
    from prefect.settings import PREFECT_API_URL, temporary_settings

    db, out = tmp_path / "feedback.db", tmp_path / "out.jsonl"
    held_log(db)
    proc = subprocess.Popen([sys.executable, "-c", FLOW, str(db), str(out), "300"], cwd=REPO, env=server,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # this process's client talks to the module's server too
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            run = paused_run(proc)
            keyset = keyset_from_paused_state(run.state)
            description = read_flow_run_input(keyset["description"], flow_run_id=run.id)
            assert "5 rows from 2 key(s)" in description and "Largest contributor: **evil** with 3 of 5" in description
            assert "| evil | 2006-02-23 | February 23, 2006 | The answer is 42. |" in description
            resume_flow_run(run.id, run_input={"approve_all": False, "approve_keys": ["good"], "reject_keys": [],
                                               "reviewer": "test"})
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["outcome"]["paused"] and result["outcome"]["approved"] == 2 and result["outcome"]["held"] == 3
    assert result["by_key"] == {"good": 2, "ops": 1} and result["held"] == 3  # evil's rows wait, untrained
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "The answer is 42." not in [r["messages"][-1]["content"] for r in rows]


@pytest.mark.slow
def test_a_paused_run_resumes_by_itself_once_the_command_line_decided_its_batch(server, tmp_path):  # noqa: F811
    """`ftllm feedback approve` is the way to decide without the UI: the paused run must not wait
    on the form (and hold up other runs) until its timeout after every row was decided."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from ftllm.commands.feedback import approve_command

    db, out = tmp_path / "feedback.db", tmp_path / "out.jsonl"
    held_log(db)
    proc = subprocess.Popen([sys.executable, "-c", FLOW, str(db), str(out), "300"], cwd=REPO, env=server,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            paused_run(proc)
        store = FeedbackStore(db)  # the command line decides: good approved, evil rejected
        assert store.review("rejected", "cli", keys=["evil"]) == 3
        store.close()
        with pytest.MonkeyPatch.context() as env:
            env.setenv("FTLLM_FEEDBACK_DB", str(db))
            assert approve_command(False, ["good"], False, "cli") == 0
        stdout, stderr = proc.communicate(timeout=60)  # well before the form's 300 s
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    outcome = result["outcome"]
    assert outcome["paused"] and not outcome["timed_out"] and (outcome["held"], outcome["decided_elsewhere"]) == (0, 5)
    assert result["by_key"] == {"good": 2, "ops": 1} and result["held"] == 0


@pytest.mark.slow
def test_without_an_answer_the_run_goes_on_without_the_held_feedback(server, tmp_path):  # noqa: F811
    db, out = tmp_path / "feedback.db", tmp_path / "out.jsonl"
    held_log(db)
    done = subprocess.run([sys.executable, "-c", FLOW, str(db), str(out), "3"], check=False, cwd=REPO, env=server,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"]["timed_out"] and result["by_key"] == {"ops": 1} and result["held"] == 5


def test_a_run_waits_for_approval_before_it_takes_the_workspace(prefect_harness, tmp_path, monkeypatch):
    """The wait on the approval form may last feedback.approval_timeout_seconds (an hour): the run
    must not hold the workspace lock meanwhile, or every other run waits on a form nobody answers."""
    import shutil

    import flows.retrain as flow_module
    from tasks.errors import StageError
    from tasks.pipeline.dvc import workspace_lock

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    shutil.copytree(REPO / "data", tmp_path / "data")  # the run checks its data is there before anything else
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    seen = []

    def review(db, settings, model_name=None):
        with workspace_lock(tmp_path, timeout=0):  # free: the waiting run holds nothing
            seen.append("free")
        raise StageError("stopped after the approval step")

    monkeypatch.setattr(flow_module, "review_held_feedback", review)
    result = flow_module.retrain(params_file=str(tmp_path / "params.yaml"), return_state=True).result(raise_on_failure=False)
    assert seen == ["free"] and result.error == "stopped after the approval step"

