"""`ftllm validate PATH`: validate a data file alone and print (or write) the report.

Exit codes: 0 valid (warnings allowed), 1 invalid, 2 unreadable file or usage error (one
line on stderr, through `tasks.runner`). With
`--json` the last line on stdout is the report as one JSON object; otherwise a rich table.
The settings (token limit, length policy, tokenizer) come from `--params` (params.yaml) and
`--set`; a
missing default `params.yaml` falls back to the built-in defaults, with a note on stderr.

    ftllm validate data/dates.jsonl --report artifacts/validation.json --fix artifacts/fixed.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tasks.config import Params, load_params
from tasks.data.formats import FORMATS
from tasks.errors import EXIT_FAILED, EXIT_OK, FormatError, UsageError
from tasks.files import write_atomic
from tasks.runner import run_entry

GX_DIR = Path("artifacts/gx")
# Files larger than this get a progress bar (on stderr, only on a terminal).
PROGRESS_BYTES = 8 << 20


def load_settings(params: Path, overrides: dict[str, Any] | None = None) -> Params:
    """The run's settings with `--set` overrides; the built-in defaults when the default params.yaml is absent."""
    if params == Path("params.yaml") and not params.exists():
        print("note: no params.yaml here; using the built-in defaults (pass --params FILE)", file=sys.stderr)
        return load_params(None, overrides)
    return load_params(params, overrides)


def validate_command(
    path: Path,
    format: str = "auto",
    report: Path | None = None,
    json_out: bool = False,
    fix: Path | None = None,
    params: Path = Path("params.yaml"),
    overrides: dict[str, Any] | None = None,
) -> int:
    """Validate `path`; print the report; optionally write it and a fixed copy of the data.

    Args:
        path: the data file (JSONL or JSON array).
        format: auto, openai, alpaca or sharegpt.
        report: write the JSON report here (atomically), and the offline HTML report beside it.
        json_out: print the report as one JSON line instead of tables.
        fix: write the examples without the bad ones (canonical messages JSONL) here.
        params: the settings file.
        overrides: `--set` overrides, dotted keys to values.

    Returns:
        0 valid, 1 invalid, 2 unreadable file, bad settings or usage error (reported on stderr).
    """
    return run_entry(lambda: _validate(Path(path), format, report, json_out, fix, Path(params), overrides), json_out)


def _validate(path: Path, format: str, report: Path | None, json_out: bool, fix: Path | None, params: Path,
              overrides: dict[str, Any] | None = None) -> int:
    """`validate_command`'s work; raises a `UsageError` for what cannot be validated at all."""
    if format != "auto" and format not in FORMATS:
        raise FormatError(f"--format {format!r}: use one of auto, {', '.join(FORMATS)}")
    if fix is not None and Path(fix).resolve() == Path(path).resolve():
        raise UsageError(f"--fix {fix}: that is the file being validated, which would keep only its valid lines; "
                         "write the fixed examples to another file")
    if report is not None and Path(report).resolve() in (Path(path).resolve(), Path(path).resolve().with_suffix(".html")):
        raise UsageError(f"--report {report}: the report (and its .html beside it) would overwrite the data it is about; "
                         "write it to another file")
    settings = load_settings(params, overrides)
    try:
        result = _run(path, format, settings, show_progress=not json_out)
    except OSError as exc:  # the tokenizer of model.base cannot be loaded (e.g. no such model here)
        raise UsageError(f"cannot load the tokenizer of model.base: {exc}; check model.base in {params}") from None
    doc = result.to_dict()
    if report is not None:
        from tasks.pipeline.report import write_data_report

        write_atomic(Path(report), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        write_data_report(doc, Path(report).with_suffix(".html"))  # readable offline, unlike the Data Docs
    if fix is not None:
        from tasks.data.validate import write_fixed

        kept, dropped = write_fixed(Path(path), result, Path(fix))
        doc["fix"] = {"path": str(fix), "kept": kept, "dropped": dropped}
        if not json_out:
            print(f"wrote {kept} examples to {fix}; dropped {dropped} bad examples")
    if json_out:
        print(json.dumps(doc, ensure_ascii=False))
    else:
        from tasks.data.validate import render_report

        render_report(result)
    return EXIT_OK if result.valid else EXIT_FAILED


def _run(path: Path, fmt: str, settings: Params, show_progress: bool):
    from tasks.data.validate import TrainingBudget, validate_dataset
    from tasks.model.loading import load_base_tokenizer

    if not path.is_file():  # fail before the tokenizer is loaded
        validate_dataset(path, fmt=fmt)  # raises DataFileError with the specific reason
    tokenizer = load_base_tokenizer(settings.model)
    return validate_dataset(
        path,
        settings.data,
        fmt=fmt,
        tokenizer=tokenizer,
        budget=TrainingBudget.of(settings.train),
        data_docs_dir=GX_DIR,
        show_progress=show_progress and sys.stderr.isatty() and path.stat().st_size > PROGRESS_BYTES,
    )
