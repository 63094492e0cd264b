"""The offline data report: built from a real validation report, rendered by headless Chromium with no network."""

from __future__ import annotations

import json

import pytest

from tasks.data.validate import validate_dataset
from tasks.pipeline.report import main, render_data_report, write_data_report
from tests.browser import external_urls, render, requires_chromium, visible_text

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
    return validate_dataset(data, "auto").to_dict()


def test_page_lists_every_category_with_its_count_and_lines(report):
    html = render_data_report(report)
    assert report["errors"] and report["warnings"], report  # the fixture exercises both tables
    for category, count in {**report["errors"], **report["warnings"]}.items():
        row = html.split(f'data-category="{category}"')[1].split("</tr>")[0]
        assert f'<td class="num">{count}</td>' in row, (category, row)
    assert "line" in html and str(report["error_lines"]["invalid_json"][0]) in html
    assert "INVALID" in html
    assert "<script>" not in html  # data is text, never markup
    assert external_urls(html) == []
    assert "default-src 'none'" in html


def test_written_beside_the_json_report_by_the_entry_point(report, tmp_path):
    source = tmp_path / "validation.json"
    source.write_text(json.dumps(report))
    assert main([str(source)]) == 0
    assert "Data report" in (tmp_path / "validation.html").read_text()


def test_unreadable_json_report_names_the_file(tmp_path):
    from tasks.errors import DataFileError

    bad = tmp_path / "validation.json"
    bad.write_text("{")
    with pytest.raises(DataFileError, match="validation.json.*ftllm validate"):
        main([str(bad)])


@requires_chromium
def test_renders_offline_in_chromium(report, tmp_path):
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
def test_screenshot(report, tmp_path):
    """A screenshot for a person to look at (kept in the test's folder); here only that it was drawn."""
    shot = tmp_path / "report.png"
    render(write_data_report(report, tmp_path / "report.html"), screenshot=shot)
    assert shot.stat().st_size > 20_000  # a blank page compresses to a few kilobytes


def test_validate_command_writes_the_page_beside_the_json_report(tmp_path):
    import yaml

    from ftllm.commands.validate import validate_command
    from tasks.config import Params

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(Params().model_dump(mode="json")))
    code = validate_command(data, report=tmp_path / "out/validation.json", json_out=True, params=params)
    assert code == 1
    page = (tmp_path / "out/validation.html").read_text()
    assert 'data-category="invalid_json"' in page
