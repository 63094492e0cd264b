"""The monitor's cursor: the highest feedback id and the last review decision a retraining run has read, and from which log.

Kept in a Prefect variable (`ftllm-monitor-<model name>`), not in a file: it belongs to the
orchestration, so any worker sees the same value, and an operator can read or reset it in
the UI (`prefect variable set ftllm-monitor-ftllm-chat '{"feedback_id": 0, "decision": 0}' --overwrite`).
The log's identity (`tasks/feedback/schema.py`, version 7) beside them tells a replaced log
from the one the numbers were read in.

The monitor counts as new the feedback above the id, and the feedback below it that a
person approved after the decision (held when the run read the log, so not trained on).
Only a retraining run moves it, to what its export read, once its stages have trained on
that data (whatever the gate then says): feedback is never counted as handled by a run
that did not read it, and feedback a rejected run read does not start the same rejected
retraining again. It never moves back on the same log; on another it starts again.
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
    log: str = ""  # the identity of the log it read ("": a log from before version 7, or a cursor from before it)

    def of_another_log(self, log_id: str, ids_given: int) -> bool:
        """Whether this cursor was read in another log than one of identity `log_id` that has
        given `ids_given` feedback ids: another identity, or (where either has none) a cursor
        past every id the log gave (ids are never given twice, erased ones included)."""
        return bool(self.log and log_id and self.log != log_id) or self.feedback_id > ids_given


def cursor_variable(model_name: str) -> str:
    """The Prefect variable of a model's cursor (names: lowercase, digits, - and _)."""
    return "ftllm-monitor-" + re.sub(r"[^a-z0-9_-]", "-", model_name.lower())


def read_cursor(model_name: str) -> Cursor:
    """What the last run read (zeros before the first; a cursor written before decisions were read has decision 0)."""
    from prefect.variables import Variable

    value = Variable.get(cursor_variable(model_name), default={})
    if not isinstance(value, dict):
        return Cursor()
    return Cursor(int(value.get("feedback_id", 0)), int(value.get("decision", 0)), str(value.get("log", "")))


def advance_cursor(model_name: str, read: Cursor, log: Path | None = None) -> Cursor:
    """Move each part of the cursor forward to what a run read from `log` (never back); return where it stands.

    A cursor read in another log (`Cursor.of_another_log`: replaced, moved, a backup put back)
    starts again from what the run read, or the new log's feedback would stay under it, never
    counted. `read.log` is the identity of the log the run read.
    """
    from prefect.variables import Variable

    from tasks.feedback import FeedbackReader

    stored = current = read_cursor(model_name)
    log_id, ids_given = read.log, current.feedback_id  # no log to read: only the identities tell
    if log is not None and Path(log).is_file():
        with FeedbackReader(Path(log)) as reader:
            log_id, ids_given = read.log or reader.log_id(), reader.feedback_ids_given()
    if current.of_another_log(log_id, ids_given):
        current = Cursor()
    moved = Cursor(max(current.feedback_id, read.feedback_id), max(current.decision, read.decision),
                   read.log or current.log)
    if moved != stored:
        Variable.set(cursor_variable(model_name),
                     {"feedback_id": moved.feedback_id, "decision": moved.decision, "log": moved.log}, overwrite=True)
    return moved
