"""The retrain flow's final state names what happened; its type keeps the CLI's exit codes apart."""

from __future__ import annotations

import pytest

from flows.retrain import _final_state
from tasks.pipeline.notify import outcome_line

CHECK = {"name": "min_exact_match", "value": 0.1234567, "threshold": 0.5, "passed": False}
RESULT = {"status": "rejected", "version": "3", "champion_version": "2", "changed": True,
          "gate": {"passed": False, "checks": [CHECK, {**CHECK, "name": "max_perplexity", "passed": True}]}}


@pytest.mark.parametrize(("result", "type_", "name", "says"), [
    ({**RESULT, "status": "promoted", "champion_version": "3"}, "COMPLETED", "Completed", "version 3 passed the gate and is champion"),
    (RESULT, "COMPLETED", "Rejected", "min_exact_match 0.1235 (threshold 0.5); champion stays 2"),
    ({**RESULT, "changed": False}, "COMPLETED", "Unchanged", "same model and settings as version 3"),
    ({"status": "failed", "error": "data/x.jsonl: invalid data (line 2: invalid_json)\nmore"}, "FAILED", "Failed",
     "data/x.jsonl: invalid data (line 2: invalid_json)"),
])
def test_state_of_eachoutcome_line(result, type_, name, says):
    state = _final_state(result["status"], result.get("changed", True), outcome_line(result), result)
    assert (state.type.value, state.name) == (type_, name)
    assert says in state.message and "\n" not in state.message
    assert "max_perplexity" not in state.message  # only the checks that failed


def test_gate_passed_but_not_promoted_is_not_called_a_failed_check():
    kept = {**RESULT, "gate": {"passed": True, "checks": [{**CHECK, "passed": True}]}}
    assert "registry.auto_promote is false" in outcome_line(kept)
