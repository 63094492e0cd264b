"""`ftllm feedback export`: turn rated and corrected answers into training data.

    ftllm feedback export --min-rating 4 data/feedback.jsonl

Writes canonical `{"messages": [...]}` JSONL (the format `ftllm validate` and the
retraining take in): every answer rated at least `--min-rating` (1..5) as it was given,
and every corrected answer with the correction in place of the model's. The database is
`FTLLM_FEEDBACK_DB`, else `<root>/feedback.db`. Exit codes: 0 written, 2 no database or
a bad option (one line on stderr, through `tasks.runner`).
"""

from __future__ import annotations

from pathlib import Path

from tasks.environment import apply_defaults
from tasks.errors import UsageError
from tasks.runner import run_entry


def export_command(out: Path, min_rating: int) -> int:
    """Export accepted answers and corrections from the feedback database to `out`; return the exit code."""
    return run_entry(lambda: _export(Path(out), min_rating))


def _export(out: Path, min_rating: int) -> None:
    root = apply_defaults()
    from tasks.feedback import default_db_path, export_feedback

    db = default_db_path(root)
    try:
        exported = export_feedback(db, out, min_rating)
    except (FileNotFoundError, ValueError) as exc:  # no database yet, or --min-rating outside 1..5
        raise UsageError(str(exc)) from None
    print(f"wrote {exported.examples} examples from {db} to {out}")
