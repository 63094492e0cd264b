"""The log as training data: accepted answers and corrections, as canonical JSONL.

`export_feedback` turns the latest feedback of each rated completion into
`{"messages": [...]}` rows (corrections marked `"correction": true`), which the next
retraining takes in through validation like any other data file, or by itself with a
`feedback: true` source in `data.sources` (the default). It also returns the highest
feedback id it read: a run that trains on the export records it, and the monitor's
cursor moves past that id only then (see flows/monitor.py).

    ftllm feedback export --min-rating 4 data/feedback.jsonl
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.feedback.schema import MAX_RATING, MIN_RATING, FeedbackRow
from tasks.feedback.store import FeedbackReader
from tasks.files import write_atomic


@dataclass(frozen=True)
class FeedbackExport:
    """What one export wrote, and the feedback it covers."""

    db: Path
    path: Path
    examples: int
    last_feedback_id: int  # every feedback id up to this one was read (0: the log was empty or absent)


def training_examples(rated: list[tuple[list[dict[str, Any]], str, FeedbackRow]], min_rating: int) -> list[dict[str, Any]]:
    """Canonical examples from the latest feedback of each completion.

    A correction always yields an example (the corrected answer replaces the model's,
    whatever the rating), marked `"correction": true`; an uncorrected answer yields one
    when rated `min_rating` or more.
    """
    examples = []
    for request, answer, row in rated:
        if row.correction is None and row.rating < min_rating:
            continue
        messages = [m for m in request if m.get("role") in ("system", "user", "assistant")]
        if not messages or messages[-1]["role"] != "user":
            continue  # not a prompt the model answers (e.g. a plain /generate prompt)
        final = row.correction if row.correction is not None else answer
        if not final.strip():
            continue
        example: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": final}]}
        if row.correction is not None:
            example["correction"] = True  # outranks other answers to the same prompt (tasks.data.sources)
        examples.append(example)
    return examples


def export_feedback(db_path: Path, out: Path, min_rating: int, missing_ok: bool = False,
                    write_empty: bool = True) -> FeedbackExport:
    """Write accepted answers and corrections as canonical JSONL to `out` (atomically).

    Args:
        missing_ok: an absent database exports nothing instead of raising: a retraining
            before the service has logged anything.
        write_empty: write `out` even when there is nothing to export (an empty file);
            false leaves `out` as it was.

    Raises:
        FileNotFoundError: there is no feedback database at `db_path` (and not `missing_ok`).
        ValueError: `min_rating` is outside 1..5.
        DataFileError: `db_path` is not the service's log.
    """
    if not MIN_RATING <= min_rating <= MAX_RATING:
        raise ValueError(f"--min-rating must be from {MIN_RATING} to {MAX_RATING}, got {min_rating}")
    db_path = Path(db_path)
    if not db_path.is_file():
        if not missing_ok:
            raise FileNotFoundError(f"{db_path}: no feedback database; serve the model and collect feedback first")
        rated, last = [], 0
    else:
        with FeedbackReader(db_path) as reader:
            rated, last = reader.latest_ratings()
    examples = training_examples(rated, min_rating)
    if examples or write_empty:
        write_atomic(Path(out), "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    return FeedbackExport(db=db_path, path=Path(out), examples=len(examples), last_feedback_id=last)
