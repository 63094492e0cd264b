"""The feedback a retraining run trains on: exported once per run and versioned by DVC.

The run trains on this snapshot, not on the live database: its md5 goes into the resolved
settings and the MLflow run, and `dvc add` of its folder keeps it in the DVC cache, so
`dvc repro` of the version rebuilds the same splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.feedback.export import FeedbackExport, export_feedback
from tasks.feedback.store import default_db_path


@dataclass(frozen=True)
class FeedbackSnapshot:
    """One run's export of the feedback log, and the .dvc file that versions it (None: not under DVC)."""

    export: FeedbackExport
    tracked_by: str | None

    def to_dict(self) -> dict:
        return {"db": str(self.export.db), "path": str(self.export.path), "examples": self.export.examples,
                "last_feedback_id": self.export.last_feedback_id, "tracked_by": self.tracked_by}


def snapshot_feedback(root: Path, min_rating: int, out: Path, log: Callable[[str], None] = print,
                      warn: Callable[[str], None] = print, write_empty: bool = True) -> FeedbackSnapshot:
    """Export the service's feedback (`FTLLM_FEEDBACK_DB`, else `<root>/feedback.db`) to `out` and version it.

    No database yet (nothing served) is no error: the export is empty and adds nothing.

    Args:
        write_empty: false: with nothing to export, write and version nothing (the data
            folder and its .dvc file stay as they were).
    """
    from tasks.pipeline.dvc import track_data

    db = default_db_path(root)
    if not db.is_file():
        warn(f"{db}: no feedback log yet (FTLLM_FEEDBACK_DB, or feedback.db beside params.yaml): no feedback")
    export = export_feedback(db, out, min_rating, missing_ok=True, write_empty=write_empty)
    tracked = track_data(root, out, log=log) if export.examples or write_empty else None
    log(f"exported {export.examples} feedback examples (feedback ids up to {export.last_feedback_id}) from {db} "
        f"to {out}" + (f" (versioned in {tracked})" if tracked else ""))
    return FeedbackSnapshot(export, tracked)
