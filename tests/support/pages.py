"""Sample inputs of the offline pages (data report, run dashboard), shared by their unit and browser tests."""

from __future__ import annotations

import json

import pytest

from tasks.data.validate import validate_dataset
from tasks.pipeline.dashboard import RunView

GOOD = {"messages": [{"role": "user", "content": "2001-02-03"}, {"role": "assistant", "content": "3 February 2001"}]}


@pytest.fixture()
def report(tmp_path) -> dict:
    """A validation report with three error categories, one warning and a message that looks like HTML."""
    lines = [json.dumps(GOOD)] * 1 + [
        json.dumps({"messages": [{"role": "user", "content": f"200{i}-01-01"}, {"role": "assistant", "content": f"1 January 200{i}"}]})
        for i in range(1, 6)
    ]
    lines += ["{not json", json.dumps({"messages": []}), json.dumps(GOOD),
              json.dumps({"messages": [{"role": "user", "content": "<script>x</script>"}, {"role": "assistant", "content": "k"}]})]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return validate_dataset(data, fmt="auto").to_dict()



CHECKS = [
    {"name": "min_exact_match", "value": 0.12, "threshold": 0.5, "passed": False, "estimate": 0.12, "low": 0.07,
     "high": 0.17, "n": 199},
    {"name": "max_perplexity", "value": 3.1, "threshold": 5.0, "passed": True},
    {"name": "no_regression_exact_match", "value": -0.61, "threshold": -0.05, "passed": False, "estimate": -0.68,
     "low": -0.75, "high": -0.61, "p_value": 1.5e-12, "n": 199, "method": "paired bootstrap + McNemar"},
    {"name": "no_regression_feedback_exact_match", "value": 0.2, "threshold": -0.05, "passed": True, "estimate": 0.0,
     "low": -0.2, "high": 0.2, "p_value": 1.0, "n": 12, "method": "paired bootstrap + McNemar", "underpowered": True,
     "note": "underpowered: on 12 examples the 95% interval is ±0.200, wider than the margin 0.05"},
]
# Roles of a run with feedback and preference data: the chart's legend must wrap to fit them.
FEEDBACK_METRICS = {"candidate_feedback": {"exact_match": 0.5, "perplexity": 2.0},
                    "champion_feedback": {"exact_match": 0.5, "perplexity": 1.9}}
# The first test examples, in the split's order; the candidate and the champion differ on the second.
SAMPLES = {
    "candidate": [{"prompt": "2001-02-03", "reference": "3 February 2001", "prediction": "3 February 2001"},
                  {"prompt": "1999-12-31", "reference": "31 December 1999", "prediction": "31 Dec"}],
    "champion": [{"prompt": "2001-02-03", "reference": "3 February 2001", "prediction": "3 February 2001"},
                 {"prompt": "1999-12-31", "reference": "31 December 1999", "prediction": "31 December 1999"}],
}
# Two sources as prepare's stats.json counts them: the data file and the feedback export.
SOURCES = [
    {"key": "data.sources[0]", "path": "data/dates.jsonl", "feedback": False, "rows": 2000, "invalid": 0,
     "corrections": 0, "replaced_by_corrections": 40, "deduplicated": {"exact": 3, "near": 1}, "length_dropped": 0,
     "kept": 1956},
    {"key": "data.sources[1]", "path": "artifacts/feedback/feedback.jsonl", "feedback": True, "rows": 55,
     "invalid": 0, "corrections": 55, "replaced_by_corrections": 0, "deduplicated": {"exact": 0, "near": 0},
     "length_dropped": 7, "kept": 48},
]
REPORT_LINKS = ["http://127.0.0.1:5000/#/experiments/1/runs/r1/artifacts/reports/validation.html",
                "http://127.0.0.1:5000/#/experiments/1/runs/r1/artifacts/reports/source-1/validation.html"]


@pytest.fixture()
def view() -> RunView:
    """A rejected run on two sources (data and feedback corrections), with a champion to compare with."""
    return RunView(
        model_name="ftllm-chat", version="7", status="rejected", champion_version="5",
        metrics={"candidate": {"exact_match": 0.12, "perplexity": 3.1}, "champion": {"exact_match": 0.8, "perplexity": 1.4},
                 "base_zero_shot": {"exact_match": 0.0, "perplexity": 900.0}, "base_few_shot": {"exact_match": 0.02, "perplexity": 300.0},
                 **FEEDBACK_METRICS},
        verdict={"passed": False, "checks": CHECKS, "notes": [f"{c['name']}: {c['note']}" for c in CHECKS if c.get("note")]},
        history=[{"step": s, "loss": 6.0 / s} for s in range(1, 21)],
        validation={"examples": 2055, "errors": {}, "warnings": {"short_answer": 4}, "dropped": 7},
        prepared={"counts": {"train": 1616, "val": 185, "test": 199, "feedback": 12}, "train_test_overlap": 0,
                  "examples": 2004, "sources": SOURCES, "corrections": {"examples": 55, "replaced": 40},
                  "token_stats": {"train": {"min": 45.0, "median": 51.0, "p95": 57.0, "max": 57.0}}},
        lineage={"data_md5": "90fd20c3", "git_commit": "abc123", "params_digest": "p1", "dvc_lock_md5": "d1"},
        links={"MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/r1", "Prefect flow run": None},
        samples=SAMPLES, source_reports=REPORT_LINKS, dataset="dates.jsonl + feedback.jsonl",
    )
