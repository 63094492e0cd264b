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


def test_gate_artifact_shows_each_paired_checks_interval_and_p_value():
    from dataclasses import asdict

    from tasks.evaluate.gate import gate_table
    from tasks.config import GateParams
    from tasks.evaluate.gate import apply_gate

    good = {"exact_match": 0.9, "perplexity": 1.2, "latency_p95_ms": 100.0}
    scores = {"ids": list(range(100)), "nll": [0.2] * 100, "tokens": [10] * 100}
    per_example = {"candidate": {"exact_match": [1.0] * 90 + [0.0] * 10, **scores},
                   "champion": {"exact_match": [1.0] * 80 + [0.0] * 20, **scores}}
    verdict = apply_gate({"candidate": good, "champion": {**good, "exact_match": 0.8}}, GateParams(), per_example)
    check = next(c for c in verdict.checks if c.name == "no_regression_exact_match")
    header, _, *rows = gate_table([asdict(c) for c in verdict.checks])
    assert header.split("|")[1:-1] == [" check ", " value ", " threshold ", " estimate ", " interval ", " p-value ", " n ",
                                      " passed "]
    row = next(r for r in rows if r.startswith("| no_regression_exact_match "))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[3:7] == [f"{check.estimate:.4g}", f"[{check.low:.4g}, {check.high:.4g}]", f"{check.p_value:.4g}", "100"]
    threshold_row = next(r for r in rows if r.startswith("| min_exact_match "))
    assert threshold_row.split("|")[2].strip() == "0.9"
