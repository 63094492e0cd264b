"""The feedback a retraining run trains on: exported once per run and versioned by DVC.

The run trains on this snapshot, not on the live database: its md5 goes into the resolved
settings and the MLflow run, and `dvc add` of its folder keeps it in the DVC cache, so
`dvc repro` of the version rebuilds the same splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.feedback.export import DEFAULT_POLICY, LEFT_OUT, ExportPolicy, FeedbackExport, export_feedback
from tasks.feedback.store import FeedbackStore, default_db_path


@dataclass(frozen=True)
class FeedbackSnapshot:
    """One run's export of the feedback log, and the .dvc file that versions it (None: not under DVC)."""

    export: FeedbackExport
    tracked_by: str | None
    expired: tuple[int, int] = (0, 0)  # interactions and feedback rows retention erased before the export

    def to_dict(self) -> dict:
        e = self.export
        return {"db": str(e.db), "path": str(e.path), "examples": e.examples, "last_feedback_id": e.last_feedback_id,
                "last_decision": e.last_decision, "log_id": e.log_id, "tracked_by": self.tracked_by, "by_key": e.by_key, "users": e.users,
                "redacted": e.redacted, **{k: getattr(e, k) for k in LEFT_OUT},
                "expired_interactions": self.expired[0], "expired_feedback": self.expired[1]}

    def mlflow_tags(self) -> dict[str, str]:
        """The provenance of the run's feedback, as MLflow run tags (`feedback.*`)."""
        import json

        e = self.export
        return {"feedback.examples": str(e.examples), "feedback.keys": json.dumps(e.by_key, sort_keys=True),
                "feedback.end_users": str(e.users), **{f"feedback.{k}": str(getattr(e, k)) for k in LEFT_OUT},
                "feedback.last_feedback_id": str(e.last_feedback_id), "feedback.last_decision": str(e.last_decision),
                "feedback.expired_interactions": str(self.expired[0]), "feedback.expired_feedback": str(self.expired[1]),
                **{f"feedback.redacted.{k}": str(v) for k, v in e.redacted.items()}}


def snapshot_feedback(root: Path, min_rating: int, out: Path, log: Callable[[str], None] = print,
                      warn: Callable[[str], None] = print, write_empty: bool = True,
                      policy: ExportPolicy = DEFAULT_POLICY, retention_days: float = 0) -> FeedbackSnapshot:
    """Export the service's feedback (`FTLLM_FEEDBACK_DB`, else `<root>/feedback.db`) to `out` and version it.

    First erases what is past `retention_days` (0: nothing; `FeedbackStore.expire`: an answer
    rated or corrected within the period stays). No database yet (nothing
    served) is no error: the export is empty and adds nothing.

    Args:
        write_empty: false: with nothing to export, write and version nothing (the data
            folder and its .dvc file stay as they were).
        policy: what the export admits (review, per-key cap, redaction; tasks.feedback.export).
    """
    from tasks.pipeline.dvc import track_data

    db = default_db_path(root)
    expired = (0, 0)
    if not db.is_file():
        warn(f"{db}: no feedback log yet (FTLLM_FEEDBACK_DB, or feedback.db beside params.yaml): no feedback")
    elif retention_days > 0:
        store = FeedbackStore(db)
        try:
            unreviewed = store.held_expiring(retention_days, policy.auto_approve)
            expired = store.expire(retention_days)
        finally:
            store.close()
        if expired[0]:
            log(f"retention: erased {expired[0]} interactions with no activity (answer or feedback) in "
                f"{retention_days:g} days, {expired[1]} feedback rows")
        if unreviewed:
            warn(f"retention erased {unreviewed} held feedback rows nobody reviewed within feedback.retention_days "
                 f"{retention_days:g}; review held feedback sooner (`ftllm feedback pending`)")
    export = export_feedback(db, out, min_rating, missing_ok=True, write_empty=write_empty, policy=policy)
    if export.held:
        warn(f"{export.held} feedback rows wait for approval and are not in this run (`ftllm feedback pending`)")
    tracked = track_data(root, out, log=log) if export.examples or write_empty else None
    if export.examples or write_empty:
        log(f"exported {export.examples} feedback examples (feedback ids up to {export.last_feedback_id}) from {db} "
            f"to {out}" + (f" (versioned in {tracked})" if tracked else ""))
    else:
        log(f"no feedback examples in {db} (feedback ids up to {export.last_feedback_id}): {out} is left as it was")
    return FeedbackSnapshot(export, tracked, expired)
