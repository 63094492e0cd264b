"""`ftllm validate PATH`: validate a data file alone and print (or write) the report.

Exit codes: 0 valid (warnings allowed), 1 invalid, 2 unreadable file or usage error. With
`--json` the last line on stdout is the report as one JSON object; otherwise a rich table.
The settings (token limit, length policy, tokenizer) come from `--params` (params.yaml); a
missing default `params.yaml` falls back to the built-in defaults, with a note on stderr.

    ftllm validate data/dates.jsonl --report artifacts/validation.json --fix artifacts/fixed.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tasks.config import Params, load_params
from tasks.data.formats import FORMATS
from tasks.errors import ConfigError, DataFileError, FormatError
from tasks.files import write_atomic

GX_DIR = Path("artifacts/gx")
# Files larger than this get a progress bar (on stderr, only on a terminal).
PROGRESS_BYTES = 8 << 20


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def load_settings(params: Path) -> Params:
    """The run's settings; built-in defaults when the default params.yaml is absent."""
    if params == Path("params.yaml") and not params.exists():
        print("note: no params.yaml here; using the built-in defaults (pass --params FILE)", file=sys.stderr)
        return Params()
    return load_params(params)


def validate_command(
    path: Path,
    format: str = "auto",
    report: Path | None = None,
    json_out: bool = False,
    fix: Path | None = None,
    params: Path = Path("params.yaml"),
) -> int:
    """Validate `path`; print the report; optionally write it and a fixed copy of the data.

    Args:
        path: the data file (JSONL or JSON array).
        format: auto, openai, alpaca or sharegpt.
        report: write the JSON report here (atomically).
        json_out: print the report as one JSON line instead of tables.
        fix: write the examples without the bad ones (canonical messages JSONL) here.
        params: the settings file.

    Returns:
        0 valid, 1 invalid, 2 unreadable file, bad settings or usage error.
    """
    if format != "auto" and format not in FORMATS:
        return _error(f"--format {format!r}: use one of auto, {', '.join(FORMATS)}")
    try:
        settings = load_settings(Path(params))
        result = _run(Path(path), format, settings, show_progress=not json_out)
    except (ConfigError, DataFileError, FormatError) as exc:
        return _error(str(exc))
    except OSError as exc:  # the tokenizer of model.base cannot be loaded (e.g. no such model here)
        return _error(f"cannot load the tokenizer of model.base: {exc}")
    doc = result.to_dict()
    if report is not None:
        write_atomic(Path(report), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
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
    return 0 if result.valid else 1


def _run(path: Path, fmt: str, settings: Params, show_progress: bool):
    from tasks.data.validate import TrainingBudget, validate_dataset
    from tasks.model.loading import load_tokenizer, resolve_base

    if not path.is_file():  # fail before the tokenizer is loaded
        validate_dataset(path, fmt=fmt)  # raises DataFileError with the specific reason
    tokenizer = load_tokenizer(resolve_base(settings.model))
    return validate_dataset(
        path,
        settings.data,
        fmt=fmt,
        tokenizer=tokenizer,
        budget=TrainingBudget.of(settings.train),
        data_docs_dir=GX_DIR,
        show_progress=show_progress and sys.stderr.isatty() and path.stat().st_size > PROGRESS_BYTES,
    )
