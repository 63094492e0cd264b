"""The offline pages in a real browser: headless Chromium renders them with no network and blocks nothing."""

from __future__ import annotations

import re

from tasks.pipeline.dashboard import write_dashboard
from tasks.pipeline.report import render_data_report, write_data_report
from tests.support.browser import external_urls, measure_svg_text, render, requires_chromium, visible_text


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
    for heading in ("Candidate, baselines and champion", "Gate", "Sample predictions", "Training loss", "Data", "Lineage"):
        assert heading in text
    assert "train 1,616" in text and "feedback 12" in text
    assert shown.blocked == []
    render(page, screenshot=tmp_path / "dashboard.png", height=2600)
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000


@requires_chromium
def test_the_dashboards_gate_table_shows_the_evidence_and_underpowered_only_where_it_applies(view, tmp_path):
    text = visible_text(render(write_dashboard(view, tmp_path / "dashboard.html")).dom)
    assert "check value threshold estimate interval p-value n verdict" in text
    # A floor: its value against its threshold, with the estimate's interval.
    assert re.search(r"min_exact_match 0\.12 0\.5 0\.12 \[0\.07, 0\.17\] 199 FAIL", text), text[:3000]
    # A clear regression: estimate, interval, p-value, a plain FAIL.
    assert re.search(r"no_regression_exact_match -0\.61 -0\.05 -0\.68 \[-0\.75, -0\.61\] 1\.5e-12 199 FAIL(?! underpowered)", text)
    # The one check the gate marked: passed, but the data cannot decide it.
    assert re.search(r"no_regression_feedback_exact_match 0\.2 -0\.05 0 \[-0\.2, 0\.2\] 1 12 pass underpowered", text)
    assert text.count("underpowered") == 2  # its verdict and its note, nowhere else


@requires_chromium
def test_the_dashboards_chart_legend_fits_with_feedback_series(view, tmp_path):
    """Six roles (the feedback pair included): every label lies inside the chart, none over another."""
    page = write_dashboard(view, tmp_path / "dashboard.html")
    boxes = measure_svg_text(page, tmp_path)
    legend = [b for b in boxes if b.chart == 0 and b.text in view.metrics]
    assert sorted(b.text for b in legend) == sorted(view.metrics)
    assert [b for b in boxes if not b.inside] == []
    assert [(a.text, b.text) for i, a in enumerate(legend) for b in legend[i + 1:] if a.overlaps(b)] == []


@requires_chromium
def test_the_legend_measure_catches_a_label_past_the_chart(view, tmp_path):
    """The control of the test above: a legend laid out as before (120 px a label, one row) runs past 640 px."""
    page = write_dashboard(view, tmp_path / "dashboard.html")
    html = page.read_text()
    for i, role in enumerate(view.metrics):
        html = re.sub(rf'<text x="\d+" y="(\d+)" font-size="12">{role}</text>',
                      rf'<text x="{164 + i * 120}" y="\1" font-size="12">{role}</text>', html, count=1)
    moved = tmp_path / "old-legend.html"
    moved.write_text(html)
    outside = {b.text for b in measure_svg_text(moved, tmp_path) if not b.inside}
    assert {"candidate_feedback", "champion_feedback"} <= outside


@requires_chromium
def test_the_dashboard_shows_sample_predictions_their_differences_first(view, tmp_path):
    text = visible_text(render(write_dashboard(view, tmp_path / "dashboard.html")).dom)
    section = text.split("Sample predictions: candidate and champion")[1].split("Training loss")[0]
    assert "1 of 2 predictions differ from the champion's" in section
    differs, same = section.index("differs 1999-12-31 31 December 1999 31 Dec 31 December 1999"), section.index(
        "same 2001-02-03 3 February 2001 3 February 2001 3 February 2001")
    assert differs < same  # the second example of the split comes first: it differs


@requires_chromium
def test_the_dashboard_counts_each_source_links_its_report_and_names_the_dataset(view, tmp_path):
    shown = render(write_dashboard(view, tmp_path / "dashboard.html"))
    text = visible_text(shown.dom)
    assert "2055 examples (all sources)" in text and "2004 kept after prepare" in text and "7 dropped" in text
    assert re.search(r"data\.sources\[0\] data/dates\.jsonl data 2,000 0 0 40 4 0 1,956 reports/validation\.html", text), text
    # the feedback rows over data.max_tokens, between the duplicates and what was kept
    assert re.search(r"data\.sources\[1\] artifacts/feedback/feedback\.jsonl feedback 55 0 55 0 0 7 48 reports/source-1/validation\.html", text)
    assert "55 corrected answers, which replaced 40 earlier answers" in text
    for link in view.source_reports:
        assert f'<a href="{link}">' in shown.dom
    assert "MLflow dataset dates.jsonl + feedback.jsonl" in text
