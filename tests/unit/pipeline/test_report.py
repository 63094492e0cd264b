"""The offline data report: built from a real validation report, rendered by headless Chromium with no network."""

from __future__ import annotations

import json

import pytest

from tasks.pipeline.report import main, render_data_report
from tests.support.browser import external_urls
from tests.support.pages import GOOD


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


def test_validate_command_writes_the_page_beside_the_json_report(tmp_path, monkeypatch):
    import yaml

    from ftllm.commands import validate as command
    from ftllm.commands.validate import validate_command
    from tasks.config import Params

    # The GX file context goes to the test's folder, not the checkout's artifacts/gx, which another
    # test process may be writing at the same time.
    monkeypatch.setattr(command, "GX_DIR", tmp_path / "gx")

    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(Params().model_dump(mode="json")))
    code = validate_command(data, report=tmp_path / "out/validation.json", json_out=True, params=params)
    assert code == 1
    page = (tmp_path / "out/validation.html").read_text()
    assert 'data-category="invalid_json"' in page
    assert (tmp_path / "gx").is_dir()
