"""The monitor's cursor: the highest feedback id a retraining run has read into its data.

Kept in a Prefect variable (`ftllm-monitor-<model name>`), not in a file: it belongs to the
orchestration, so any worker sees the same value, and an operator can read or reset it in
the UI (`prefect variable set ftllm-monitor-ftllm-chat '{"feedback_id": 0}' --overwrite`).

The monitor counts the feedback above it as new. Only a retraining run moves it, to the
highest feedback id its export read, once its stages have trained on that data (whatever
the gate then says): feedback is never counted as handled by a run that did not read it,
and feedback a rejected run read does not start the same rejected retraining again. It
never moves back.
"""

from __future__ import annotations

import re


def cursor_variable(model_name: str) -> str:
    """The Prefect variable of a model's cursor (names: lowercase, digits, - and _)."""
    return "ftllm-monitor-" + re.sub(r"[^a-z0-9_-]", "-", model_name.lower())


def read_cursor(model_name: str) -> int:
    """The highest feedback id a run has read (0 before the first)."""
    from prefect.variables import Variable

    value = Variable.get(cursor_variable(model_name), default={"feedback_id": 0})
    return int(value.get("feedback_id", 0)) if isinstance(value, dict) else 0


def advance_cursor(model_name: str, feedback_id: int) -> int:
    """Move the cursor to `feedback_id` unless it is there or beyond already; return where it stands."""
    from prefect.variables import Variable

    current = read_cursor(model_name)
    if feedback_id > current:
        Variable.set(cursor_variable(model_name), {"feedback_id": feedback_id}, overwrite=True)
        return feedback_id
    return current
