"""The monitor's cursor: the highest feedback id and the last review decision a retraining run has read.

Kept in a Prefect variable (`ftllm-monitor-<model name>`), not in a file: it belongs to the
orchestration, so any worker sees the same value, and an operator can read or reset it in
the UI (`prefect variable set ftllm-monitor-ftllm-chat '{"feedback_id": 0, "decision": 0}' --overwrite`).

The monitor counts as new the feedback above the id, and the feedback below it that a
person approved after the decision (held when the run read the log, so not trained on).
Only a retraining run moves it, to what its export read, once its stages have trained on
that data (whatever the gate then says): feedback is never counted as handled by a run
that did not read it, and feedback a rejected run read does not start the same rejected
retraining again. It never moves back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cursor:
    """Where the last retraining run read the feedback log."""

    feedback_id: int = 0  # the highest feedback id it read
    decision: int = 0  # the latest review decision it read (tasks/feedback/schema.py, version 4)


def cursor_variable(model_name: str) -> str:
    """The Prefect variable of a model's cursor (names: lowercase, digits, - and _)."""
    return "ftllm-monitor-" + re.sub(r"[^a-z0-9_-]", "-", model_name.lower())


def read_cursor(model_name: str) -> Cursor:
    """What the last run read (zeros before the first; a cursor written before decisions were read has decision 0)."""
    from prefect.variables import Variable

    value = Variable.get(cursor_variable(model_name), default={})
    if not isinstance(value, dict):
        return Cursor()
    return Cursor(int(value.get("feedback_id", 0)), int(value.get("decision", 0)))


def advance_cursor(model_name: str, read: Cursor, log: Path | None = None) -> Cursor:
    """Move each part of the cursor forward to what a run read from `log` (never back); return where it stands.

    A cursor past every feedback id `log` ever gave was taken from another log (replaced or
    moved; ids are never given twice, erased ones included): it starts again from what the run
    read, or the new log's feedback would stay under it, never counted.
    """
    from prefect.variables import Variable

    from tasks.feedback import FeedbackReader

    stored = current = read_cursor(model_name)
    if log is not None and Path(log).is_file():
        with FeedbackReader(Path(log)) as reader:
            if current.feedback_id > reader.feedback_ids_given():
                current = Cursor()
    moved = Cursor(max(current.feedback_id, read.feedback_id), max(current.decision, read.decision))
    if moved != stored:
        Variable.set(cursor_variable(model_name), {"feedback_id": moved.feedback_id, "decision": moved.decision},
                     overwrite=True)
    return moved
