"""How a flow run's outcome shows in Prefect: Failed on purpose without a traceback, a tag and an event.

Prefect 3.9's deployment entry point (`python -m prefect.engine`, what a worker starts) runs
a flow with `run_flow(..., error_logger=run_logger)` and asks for its *result*: a flow that
returns a Failed state has that state's result raised again (`FailedRun` for a message, the
data itself when it is an exception, a TypeError for any other data;
`prefect.states.get_state_exception`). `run_flow` logs that as "Engine execution exited
with unexpected exception" with a traceback, into the flow run's log, and
`prefect.engine.handle_engine_signals` logs it once more on the worker's output.

A refused promotion or a run stopped by bad data is no unexpected exception: the flow has
logged its reason, and the state's message carries it. `failed_on_purpose` returns the
Failed state and tells those two loggers, for this flow run only, to drop the re-raise's
traceback records. Nothing else changes: the run ends Failed with the message, in-process
callers get the state as before, and an exception the flow did not expect (a bug) is raised
by the flow, not returned, so it keeps its traceback.

A named state ("Rejected", "Unchanged") shows its name on the run's badge, in the colour of
its *type* (Prefect has no per-name colour), and the UI's run filters offer state types
only. `announce_outcome` tags such a run with its name (`rejected`, `unchanged`), which the
UI's runs list filters by, and emits `ftllm.retrain.<status>` for automations.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
from prefect.states import Failed, State

OUTCOME_EVENT = "ftllm.retrain.{status}"
TAGGED_STATES = ("Rejected", "Unchanged")

# `prefect.flow_runs`: the run's own logger (to the API and the console); `prefect.engine`:
# the entry point's, on the worker's output.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.engine")


class _ChosenFailures(logging.Filter):
    """Drops the traceback records about flow runs that ended Failed on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.flow_run_ids: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or not self.flow_run_ids:
            return True
        if str(getattr(record, "flow_run_id", "")) in self.flow_run_ids:
            return False
        message = record.getMessage()  # prefect.engine names the run in its message
        return not any(run_id in message for run_id in self.flow_run_ids)


_FILTER = _ChosenFailures()


def failed_on_purpose(message: str, data: Any = None) -> State:
    """The current flow run's final Failed state, which Prefect's engine does not report as a crash.

    Args:
        message: the one-line reason; the state's message (the UI's badge and run list).
        data: the state's result for an in-process caller; not an exception.
    """
    from prefect.runtime import flow_run

    assert not isinstance(data, BaseException), "an exception as data is raised again by Prefect: pass its words"
    if flow_run.id:
        _FILTER.flow_run_ids.add(str(flow_run.id))
        for name in ENGINE_LOGGERS:
            if _FILTER not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_FILTER)
    return Failed(message=message, data=data)


def announce_outcome(state_name: str, status: str, model_name: str | None, details: dict[str, Any]) -> str | None:
    """Tag the current flow run with its named outcome and emit `ftllm.retrain.<status>`.

    Args:
        state_name: the final state's name; "Rejected" and "Unchanged" become the tags
            `rejected` and `unchanged`.
        status: "promoted", "rejected", "failed" or "unchanged": the event's last word.
        model_name: the registered model the event is about.
        details: the event's payload (version, champion, failed checks, error).

    Returns:
        The tag added, if any.
    """
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    name = model_name or "unknown"
    emit_event(OUTCOME_EVENT.format(status=status), payload=details,
               resource={"prefect.resource.id": f"ftllm.model.{name}", "prefect.resource.name": name})
    if state_name not in TAGGED_STATES:
        return None
    tag = state_name.lower()
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            client.update_flow_run(flow_run.id, tags=sorted({*run.tags, tag}))
    except httpx.HTTPError as exc:  # a lost tag must not fail the run: the state's name still says it
        logging.getLogger(__name__).warning(f"flow run not tagged {tag!r}: {exc}")
        return None
    return tag
