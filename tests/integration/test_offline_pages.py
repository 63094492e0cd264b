"""The offline pages in a real browser: headless Chromium renders them with no network and blocks nothing."""

from __future__ import annotations

import re

from tasks.pipeline.dashboard import write_dashboard
from tasks.pipeline.report import render_data_report, write_data_report
from tests.support.browser import external_urls, render, requires_chromium, visible_text


@requires_chromium
def test_the_data_report_renders_offline_in_chromium(report, tmp_path):
    page = write_data_report(report, tmp_path / "report.html")
    shown = render(page)
    text = visible_text(shown.dom)
    for category, count in report["errors"].items():
        assert f"{category} {count}" in text, (category, text[:2000])
    assert f"{report['examples']} examples" in text
    assert shown.blocked == []  # the page asked for nothing the policy had to block


@requires_chromium
def test_the_no_request_check_catches_a_page_that_loads_from_a_cdn(report, tmp_path):
    """The control of the test above: a stylesheet from a CDN is seen, both statically and by the browser."""
    html = render_data_report(report).replace("</title>", '</title><link rel="stylesheet" href="https://cdn.example.com/x.css">')
    page = tmp_path / "cdn.html"
    page.write_text(html)
    assert external_urls(html) == ["https://cdn.example.com/x.css"]
    assert any("cdn.example.com" in line for line in render(page).blocked)


@requires_chromium
def test_the_data_report_screenshot_is_drawn(report, tmp_path):
    """A screenshot for a person to look at (kept in the test's folder); here only that it was drawn."""
    shot = tmp_path / "report.png"
    render(write_data_report(report, tmp_path / "report.html"), screenshot=shot)
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few kilobytes



@requires_chromium
def test_the_dashboard_renders_offline_in_chromium(view, tmp_path):
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

