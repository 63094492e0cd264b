"""The run dashboard: built from plain data, every section present, rendered offline by headless Chromium."""

from __future__ import annotations

import re

import pytest

from tasks.pipeline.dashboard import RunView, load_run_files, render_dashboard, write_dashboard
from tests.browser import external_urls, render, requires_chromium, visible_text

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


def test_sections_hold_the_run(view):
    html = render_dashboard(view)
    for section in ("metrics", "gate", "loss", "data", "lineage"):
        assert f'id="{section}"' in html
    for role in view.metrics:
        assert f'data-role="{role}"' in html
    assert html.count("<svg") == 2 and "<polyline" in html  # bar chart and loss curve
    assert "gate REJECTED" in html and html.count(">FAIL<") == 1 and html.count(">pass<") == 1
    assert "6 at step 1" in html and "0.3 at step 20" in html
    for value in view.lineage.values():
        assert value in html
    assert '<a href="http://127.0.0.1:5000/#/experiments/1/runs/r1">' in html
    assert external_urls(html) == []  # links to follow, nothing to load


def test_a_failed_run_before_evaluation_says_what_is_missing():
    html = render_dashboard(RunView("m", None, "failed", None, metrics={}, verdict=None))
    assert "the run ended before evaluation" in html and "the gate did not run" in html
    assert "no training history" in html


def test_run_files_are_read_when_present(tmp_path):
    assert load_run_files(tmp_path) == {"history": [], "prepared": None}
    (tmp_path / "artifacts/model").mkdir(parents=True)
    (tmp_path / "artifacts/model/history.json").write_text('[{"step": 1, "loss": 2.0}]')
    assert load_run_files(tmp_path)["history"] == [{"step": 1, "loss": 2.0}]


@requires_chromium
def test_renders_offline_in_chromium(view, tmp_path):
    page = write_dashboard(view, tmp_path / "dashboard.html")
    shown = render(page)
    text = visible_text(shown.dom)
    for heading in ("Candidate, baselines and champion", "Gate", "Training loss", "Data", "Lineage"):
        assert heading in text
    assert re.search(r"min_exact_match 0\.12 0\.5 FAIL", text), text[:3000]
    assert "train 1,616" in text
    assert shown.blocked == []
    render(page, screenshot=tmp_path / "dashboard.png", height=2000)
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000
