"""The gate: each check reported with value, threshold and verdict."""

from __future__ import annotations

from tasks.config import GateParams
from tasks.evaluate.gate import apply_gate

GOOD = {"exact_match": 0.9, "perplexity": 1.2, "latency_p95_ms": 100.0, "rouge_l": 0.95}
BASE = {"exact_match": 0.0, "perplexity": 400.0, "latency_p95_ms": 100.0, "rouge_l": 0.0}


def test_good_candidate_passes_without_champion():
    verdict = apply_gate({"candidate": GOOD, "base_zero_shot": BASE, "base_few_shot": BASE}, GateParams())
    assert verdict.passed and {c.name for c in verdict.checks} == {
        "min_exact_match", "max_perplexity", "max_p95_latency_ms", "min_gain_over_prompting",
    }


def test_thresholds_fail_with_named_checks():
    bad = {**GOOD, "exact_match": 0.5, "latency_p95_ms": 9000.0}
    verdict = apply_gate({"candidate": bad, "base_zero_shot": BASE}, GateParams())
    assert not verdict.passed
    assert set(verdict.failed) == {"min_exact_match", "max_p95_latency_ms"}
    check = next(c for c in verdict.checks if c.name == "min_exact_match")
    assert (check.value, check.threshold, check.passed) == (0.5, 0.7, False)


def test_prompting_baseline_must_be_beaten():
    verdict = apply_gate({"candidate": GOOD, "base_few_shot": {**BASE, "exact_match": 0.85}}, GateParams())
    assert verdict.failed == ["min_gain_over_prompting"]


def test_regression_against_champion():
    champion = {**GOOD, "exact_match": 0.95, "perplexity": 1.0}
    verdict = apply_gate({"candidate": GOOD, "champion": champion}, GateParams(max_regression=0.02))
    assert set(verdict.failed) == {"no_regression_exact_match", "no_regression_perplexity"}
    tolerant = apply_gate({"candidate": GOOD, "champion": champion}, GateParams(max_regression=0.3))
    assert tolerant.passed


def test_metrics_over_no_scored_tokens_are_refused():
    empty = {**GOOD, "perplexity": 1.0, "scored_tokens": 0}
    verdict = apply_gate({"candidate": empty, "base_zero_shot": BASE}, GateParams())
    assert not verdict.passed and verdict.failed == ["min_scored_tokens"]
    scored = apply_gate({"candidate": {**GOOD, "scored_tokens": 412}, "base_zero_shot": BASE}, GateParams())
    assert scored.passed and next(c for c in scored.checks if c.name == "min_scored_tokens").value == 412
