"""The feedback steps of `retrain`: approval of held feedback by a person in the Prefect UI, then the export.

Before the feedback is exported, `review_held_feedback` looks for feedback that waits for
approval (untrusted keys; see tasks/feedback/review.py). When there is some and
`feedback.approval` says so (`auto`: a Prefect server is set with PREFECT_API_URL, so
someone can open its UI; `always`; `never`), the flow run pauses with `ApprovalForm`: the
UI shows the batch (markdown) above a form to approve all, per key, or reject per key.
Submitting it (the UI's Resume button, or `resume_flow_run(run_id, run_input={...})`)
resumes the run, which trains on what was approved. After
`feedback.approval_timeout_seconds` without an answer the run goes on without the held
feedback, which stays held for the next run. `ftllm feedback approve` decides without a UI;
once it has decided every row of the batch, the paused run resumes by itself. The run waits
before it takes the workspace (flows/retrain.py), so a paused run holds up no other run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.input import RunInput
from pydantic import Field

from tasks.config import FeedbackParams, Params, SourceParams
from tasks.data.formats import read_records
from tasks.environment import environment
from tasks.errors import DataFileError
from tasks.feedback import snapshot_feedback
from tasks.feedback.export import ExportPolicy
from tasks.feedback.review import Decision, HeldBatch, apply_decision, describe_batch, held_batch, still_held

APPROVAL_KEY = "feedback-approval"
DECIDED_ELSEWHERE = "ftllm feedback approve"  # the reviewer a run resumed by the watcher records


class ApprovalForm(RunInput):
    """What the reviewer decides about the held feedback shown above the form."""

    approve_all: bool = Field(False, description="Approve every held row shown above, but the keys rejected below.")
    approve_keys: list[str] = Field(default_factory=list, description="Approve the held rows of these keys only.")
    reject_keys: list[str] = Field(default_factory=list, description="Reject these keys' held rows (never trained).")
    reviewer: str = Field("", description="Your name, recorded with the decision.")


def should_pause(mode: str) -> bool:
    """Whether a run may wait for a person: `auto` pauses only where a Prefect server (and its UI) is set."""
    return mode == "always" or (mode == "auto" and environment().prefect_api_url is not None)


def review_held_feedback(db: Path, settings: FeedbackParams, model_name: str | None = None) -> dict:
    """Pause for approval of the held feedback in `db` on `model_name`'s answers (the run's model:
    another model's feedback sharing the log is not its to decide) when there is some; apply the answer.

    Called from the flow (a pause belongs to the flow run). Returns what happened: `held`
    rows found, whether the run `paused`, whether it `timed_out`, and the counts decided.
    """
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    logger = get_run_logger()
    batch = held_batch(db, settings.auto_approve, model_name)
    outcome = {"held": len(batch.rows), "keys": dict(batch.per_key), "paused": False, "timed_out": False}
    if not batch.rows:
        return outcome
    if not should_pause(settings.approval):
        logger.warning(f"{len(batch.rows)} feedback rows wait for approval (keys {batch.keys}); this run trains "
                       "without them. Approve with `ftllm feedback approve` for the next run.")
        return outcome
    form = ApprovalForm.with_initial_data(description=describe_batch(batch))
    logger.info(f"pausing for approval of {len(batch.rows)} held feedback rows (feedback.approval_timeout_seconds="
                f"{settings.approval_timeout_seconds}): resume this run in the Prefect UI")
    outcome["paused"] = True
    run_id = FlowRunContext.get().flow_run.id
    poll = min(5, settings.approval_timeout_seconds)
    done = threading.Event()
    watcher = threading.Thread(target=_resume_once_decided, args=(db, batch, run_id, done, poll, logger),
                               daemon=True)
    watcher.start()
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=settings.approval_timeout_seconds,
                                poll_interval=poll, key=APPROVAL_KEY)
    except FlowPauseTimeout:
        _run_again(run_id)
        held = still_held(db, batch)
        logger.warning(f"no answer on the approval form within {settings.approval_timeout_seconds} s: training "
                       f"with what was decided; {held} of the {len(batch.rows)} held rows stay held for the next run")
        return {**outcome, "timed_out": True, "held": held}
    finally:
        done.set()
    if answer.reviewer == DECIDED_ELSEWHERE:
        logger.info("no held row of the batch was left pending while the form waited (decided with `ftllm feedback "
                    "approve`, or erased)")
    decided = apply_decision(db, batch, Decision(answer.approve_all, tuple(answer.approve_keys),
                                                 tuple(answer.reject_keys), answer.reviewer or "prefect-ui"))
    logger.info(f"approval: {decided}")
    return {**outcome, **decided}


def _resume_once_decided(db: Path, batch: HeldBatch, run_id: UUID, done: threading.Event, every: float,
                         logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Resume the paused run once no row of `batch` is pending: `ftllm feedback approve` decided
    them all while the form waited. Looks every `every` seconds until `done` is set."""
    from prefect.exceptions import NotPausedError
    from prefect.flow_runs import resume_flow_run

    warned = False
    while not done.wait(every):
        try:
            if still_held(db, batch):
                continue
            resume_flow_run(run_id, run_input={"reviewer": DECIDED_ELSEWHERE})
            return
        except NotPausedError:  # not paused yet (the pause is being set), or answered meanwhile
            continue
        except Exception as exc:  # the API or the log out of reach for a moment: look again; the form still works
            if not warned:
                logger.warning(f"could not check the held feedback while the run waits ({exc}); trying again")
                warned = True


def _run_again(flow_run_id) -> None:
    """Put a run whose pause timed out back to Running, so its next tasks may start."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(), force=True)


@task(name="export-feedback")
def export_feedback_snapshot(root: Path, source: SourceParams, out: Path, params: Params,
                             other_examples: int, write_empty: bool = True) -> dict:
    """The service's admitted feedback on this model's answers, redacted, exported to the file a
    `feedback: true` source reads, versioned by DVC; its provenance goes to the MLflow run as
    `feedback.*` tags."""
    logger, settings = get_run_logger(), params.feedback
    policy = ExportPolicy(settings.auto_approve, settings.redaction, settings.max_key_share, other_examples,
                          source.weight or 1.0, params.registry.model_name)
    snapshot = snapshot_feedback(root, source.min_rating, out, log=logger.info, warn=logger.warning, policy=policy,
                                 retention_days=settings.retention_days, write_empty=write_empty)
    return {**snapshot.to_dict(), "tags": snapshot.mlflow_tags()}


def train_rows(sources: list[SourceParams], paths: list[Path]) -> int:
    """About the train rows the sources that are not feedback make (the base of feedback.max_key_share):
    each one's records (a JSONL file's lines, a JSON array's elements; 0 when unreadable) under its
    cap, times its weight."""
    rows = 0.0
    for source, path in zip(sources, paths):
        if source.feedback:
            continue
        try:
            count = sum(1 for _ in read_records(path))
        except (DataFileError, OSError):
            count = 0
        rows += min(count, source.cap or count) * (source.weight or 1.0)
    return round(rows)
