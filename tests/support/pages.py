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
    {"name": "min_exact_match", "value": 0.12, "threshold": 0.5, "passed": False},
    {"name": "max_perplexity", "value": 3.1, "threshold": 5.0, "passed": True},
]


@pytest.fixture()
def view() -> RunView:
    return RunView(
        model_name="ftllm-chat", version="7", status="rejected", champion_version="5",
        metrics={"candidate": {"exact_match": 0.12, "perplexity": 3.1}, "champion": {"exact_match": 0.8, "perplexity": 1.4},
                 "base_zero_shot": {"exact_match": 0.0, "perplexity": 900.0}, "base_few_shot": {"exact_match": 0.02, "perplexity": 300.0}},
        verdict={"passed": False, "checks": CHECKS},
        history=[{"step": s, "loss": 6.0 / s} for s in range(1, 21)],
        validation={"examples": 2000, "errors": {}, "warnings": {"short_answer": 4}, "dropped": 0},
        prepared={"counts": {"train": 1616, "val": 185, "test": 199}, "train_test_overlap": 0,
                  "token_stats": {"train": {"min": 45.0, "median": 51.0, "p95": 57.0, "max": 57.0}}},
        lineage={"data_md5": "90fd20c3", "git_commit": "abc123", "params_digest": "p1", "dvc_lock_md5": "d1"},
        links={"MLflow run": "http://127.0.0.1:5000/#/experiments/1/runs/r1", "Prefect flow run": None},
    )

