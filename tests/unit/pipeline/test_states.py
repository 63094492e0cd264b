"""A run's outcome shows in Prefect: a rejected run is tagged and announced, a refusal fails without a crash log."""

from __future__ import annotations

import logging
import uuid

import pytest
from prefect import flow

from flows.retrain import _final_state
from tasks.pipeline.states import announce_outcome, failed_on_purpose
from tests.support.servers import read_events

pytestmark = pytest.mark.usefixtures("prefect_harness")


@flow(name="outcome")
def _outcome(status: str, changed: bool, model_name: str):
    state = _final_state(status, changed, f"{status} run", {"status": status})
    announce_outcome(state.name, status if changed else "unchanged", model_name, {"version": "4"})
    return state


def _tags(state) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).tags


def test_a_rejected_run_is_tagged_and_announced_a_promoted_one_only_announced():
    model = f"outcome-{uuid.uuid4().hex[:8]}"
    rejected = _outcome("rejected", True, model, return_state=True)
    assert rejected.name == "Rejected" and _tags(rejected) == ["rejected"]
    unchanged = _outcome("rejected", False, model, return_state=True)
    assert unchanged.name == "Unchanged" and _tags(unchanged) == ["unchanged"]
    promoted = _outcome("promoted", True, model, return_state=True)
    assert promoted.is_completed() and _tags(promoted) == []

    (event,) = read_events("ftllm.retrain.rejected", f"ftllm.model.{model}", expected=1)
    assert event.payload == {"version": "4"}
    assert str(rejected.state_details.flow_run_id) in {r.id.split(".")[-1] for r in event.related}
    assert len(read_events("ftllm.retrain.promoted", f"ftllm.model.{model}", expected=1)) == 1
    assert len(read_events("ftllm.retrain.unchanged", f"ftllm.model.{model}", expected=1)) == 1


def test_outside_a_flow_run_nothing_is_announced():
    assert announce_outcome("Rejected", "rejected", "m", {}) is None


def test_a_failure_on_purpose_keeps_the_engine_crash_log_of_that_run_only(caplog):
    """What `python -m prefect.engine` logs after a returned Failed state, for this run and another."""

    @flow(name="refusing")
    def refusing():
        return failed_on_purpose("refused: give a reason", data="refused: --reason TEXT")

    state = refusing(return_state=True)
    assert state.is_failed() and state.message == "refused: give a reason"
    assert state.result(raise_on_failure=False) == "refused: --reason TEXT"
    ours, other = str(state.state_details.flow_run_id), str(uuid.uuid4())
    for run_id in (ours, other):
        try:
            state.result()
        except Exception:
            logging.getLogger("prefect.flow_runs").error("Engine execution exited with unexpected exception",
                                                         exc_info=True, extra={"flow_run_id": run_id})
            logging.getLogger("prefect.engine").error(f"Execution of flow run '{run_id}' exited with unexpected exception",
                                                      exc_info=True)
    shown = [r for r in caplog.records if "unexpected exception" in r.getMessage()]
    assert len(shown) == 2 and all(other in r.getMessage() or getattr(r, "flow_run_id", None) == other for r in shown)
    with pytest.raises(AssertionError):
        failed_on_purpose("no", data=ValueError("an exception is raised again by Prefect"))
