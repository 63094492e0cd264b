"""The data report as one offline HTML page, next to the JSON validation report.

Great Expectations' Data Docs draw their index with JavaScript from CDNs, so offline (and
in MLflow's artifact preview) they show nothing. This page is built from the validation
report itself (`tasks.data.validate.ValidationReport.to_dict()`): verdict, error and
warning categories with their counts and first line numbers, the first bad rows, token
statistics and the length policy, with everything inlined (`tasks.pipeline.html`). The
Data Docs stay linked, as a secondary view.

Write one from a JSON report by hand:

    python -m tasks.pipeline.report artifacts/reports/validation.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.files import write_atomic
from tasks.pipeline.html import Raw, badge, cards, page, table, text

FIRST_LINES = 10  # line numbers shown per category; the JSON report keeps up to 100


def _categories(counts: dict[str, int], lines: dict[str, list[int]], empty: str) -> str:
    rows = []
    for category, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        first = lines.get(category, [])
        shown = ", ".join(str(n) for n in first[:FIRST_LINES]) + (" …" if len(first) > FIRST_LINES else "")
        rows.append([Raw(f'<code data-category="{text(category)}">{text(category)}</code>'), count, shown])
    return table(["category", "examples", "first lines"], rows, empty=empty)


def _token_section(stats: dict[str, Any] | None) -> str:
    if not stats:
        return '<p class="empty">no tokenizer was given: token counts were skipped</p>'
    rows = []
    for key in ("total_tokens", "assistant_tokens", "messages_per_example"):
        s = stats.get(key)
        if s:
            rows.append([key, *(s[k] for k in ("min", "p5", "median", "mean", "p95", "max"))])
    summary = table(["per example", "min", "p5", "median", "mean", "p95", "max"], rows, empty="no examples to count")
    limits = [
        ("tokenizer", stats.get("tokenizer")),
        ("token limit (data.max_tokens)", stats.get("max_tokens")),
        ("over the limit", stats.get("over_limit")),
        ("tokens per epoch", stats.get("tokens_per_epoch")),
        ("trained tokens per epoch", stats.get("trained_tokens_per_epoch")),
        ("steps per epoch", stats.get("steps_per_epoch")),
        ("epochs in train.max_steps", stats.get("epochs")),
    ]
    return summary + table(["", "value"], [[k, v] for k, v in limits if v is not None])


def render_data_report(report: dict[str, Any]) -> str:
    """The HTML page of a validation report (the dict of `ValidationReport.to_dict()`)."""
    valid = report["valid"]
    n_errors, n_warnings = sum(report["errors"].values()), sum(report["warnings"].values())
    verdict = badge("valid", "ok") if valid else badge("INVALID", "bad")
    if valid and n_warnings:
        verdict += " " + badge(f"{n_warnings} warnings", "warn")
    first_rows = [[r["line"], Raw(f"<code>{text(r['category'])}</code>"), r["message"]] for r in report.get("error_rows", [])[:50]]
    warn_rows = [[r["line"], Raw(f"<code>{text(r['category'])}</code>"), r["message"]] for r in report.get("warning_rows", [])[:50]]
    docs = report.get("data_docs")
    body = [
        f"<h1>Data report {verdict}</h1>",
        f'<p class="sub"><code>{text(report["path"])}</code> · format {text(report["format"])} · md5 <code>{text(report["md5"])}</code></p>',
        cards([("examples", report["examples"]), ("invalid examples", report["invalid_examples"]),
               ("errors", n_errors), ("warnings", n_warnings),
               (f"dropped ({report['length_policy']})", report["dropped"]), ("truncated", report["truncated"])]),
        '<h2 id="errors">Errors</h2>',
        _categories(report["errors"], report.get("error_lines", {}), "no errors"),
        '<h2 id="warnings">Warnings</h2>',
        _categories(report["warnings"], _lines(report.get("warning_rows", [])), "no warnings"),
        '<h2 id="tokens">Tokens</h2>',
        _token_section(report.get("token_stats")),
        f'<p>Length policy <code>{text(report["length_policy"])}</code>: {text(report["dropped"])} dropped, '
        f'{text(report["truncated"])} truncated; dropped fraction {report["dropped_fraction"]:.2%} '
        f'(at most {report["max_drop_fraction"]:.2%}, data.max_drop_fraction).</p>',
        '<h2 id="error-rows">First invalid rows</h2>',
        table(["line", "category", "message"], first_rows, empty="none"),
        '<h2 id="warning-rows">First warnings</h2>',
        table(["line", "category", "message"], warn_rows, empty="none"),
        '<h2 id="gx">Great Expectations</h2>',
        f"<p>Data Docs (needs network to render): <code>{text(docs)}</code></p>" if docs else '<p class="empty">not run</p>',
    ]
    return page(f"Data report: {Path(report['path']).name}", "\n".join(body))


def _lines(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    lines: dict[str, list[int]] = {}
    for r in rows:
        lines.setdefault(r["category"], []).append(r["line"])
    return lines


def write_data_report(report: dict[str, Any], path: Path) -> Path:
    """Write the page to `path` (atomically) and return it."""
    write_atomic(Path(path), render_data_report(report))
    return Path(path)


def write_reports(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The validation report as `validation.json` and `validation.html` in `folder`."""
    folder = Path(folder)
    json_path = write_atomic(folder / "validation.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return json_path, write_data_report(report, folder / "validation.html")


def main(args: list[str]) -> int:
    """`python -m tasks.pipeline.report REPORT.json`: write REPORT.html beside it."""
    from tasks.errors import DataFileError, UsageError

    if len(args) != 1:
        raise UsageError("usage: python -m tasks.pipeline.report REPORT.json (written by `ftllm validate --report`)")
    source = Path(args[0])
    try:
        report = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise DataFileError(f"{source}: not a readable JSON validation report ({exc}); write one with "
                            "`ftllm validate DATA --report FILE`") from None
    print(write_data_report(report, source.with_suffix(".html")))
    return 0


if __name__ == "__main__":
    from tasks.runner import run_stage

    run_stage(main)
