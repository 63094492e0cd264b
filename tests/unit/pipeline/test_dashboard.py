"""The run dashboard: built from plain data, every section present, rendered offline by headless Chromium."""

from __future__ import annotations

from tasks.pipeline.dashboard import RunView, load_run_files, render_dashboard
from tests.support.browser import external_urls


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


