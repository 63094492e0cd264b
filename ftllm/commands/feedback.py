"""`ftllm feedback ...`: the service's feedback as training data, its review, and its erasure.

    ftllm feedback export --min-rating 4 data/feedback.jsonl
    ftllm feedback pending                          # what waits for approval, per key, with samples
    ftllm feedback approve --all | --key NAME ...   # approve held feedback (--reject: reject it)
    ftllm feedback forget --user ID | --key NAME | --before 2026-01-01 | --expired

`export` writes canonical `{"messages": [...]}` JSONL (the format `ftllm validate` and the
retraining take in) under the same rules as a run (docs/guides/trust.md): approved or
auto-approved feedback only (`feedback.auto_approve`), erased
prompts left out, secrets and personal data redacted, each row with its provenance.
`approve` decides without the Prefect UI, for runs that do not pause. `forget` erases
interactions and their feedback and lists their prompts so that no later export holds
them. The database is `FTLLM_FEEDBACK_DB`, else `<root>/feedback.db`; settings come from
FTLLM_PARAMS, else params.yaml. Exit codes: 0 done, 2 no database or a bad option (one
line on stderr, through `tasks.runner`).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tasks.environment import apply_defaults
from tasks.errors import UsageError
from tasks.runner import run_entry

DIGEST = re.compile(r"user-[0-9a-f]{16}", re.IGNORECASE)  # an end user as the exports name them (tasks.feedback.export.pseudonym)


def _on_the_log(work: Callable[[], int | None]) -> int:
    """Run a command's `work` through `run_entry`; a log SQLite cannot read through (a damaged
    page) is one line naming the file and the way to recover it, not a traceback."""
    def guarded() -> int | None:
        try:
            return work()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, busy, read-only: its own message says it
                raise
            from tasks.feedback import default_db_path
            from tasks.feedback.reader import damaged_log

            raise damaged_log(default_db_path(apply_defaults()), exc) from None
    return run_entry(guarded)


def _settings(root: Path):
    from ftllm.commands.serve import project_params

    return project_params(root).feedback


def _model(root: Path) -> str:
    """The project's registered model (FTLLM_PARAMS, else params.yaml): the answers its runs read."""
    from ftllm.commands.serve import project_params

    return project_params(root).registry.model_name


def _db(root: Path, must_exist: bool = True) -> Path:
    from tasks.feedback import default_db_path

    db = default_db_path(root)
    if must_exist and not db.is_file():
        raise UsageError(f"{db}: no feedback database; serve the model and collect feedback first "
                         "(or point FTLLM_FEEDBACK_DB at the service's feedback.db)")
    return db


def export_command(out: Path, min_rating: int) -> int:
    """Export admitted answers and corrections from the feedback database to `out`; return the exit code."""
    return _on_the_log(lambda: _export(Path(out), min_rating))


def _export(out: Path, min_rating: int) -> None:
    root = apply_defaults()
    from ftllm.commands.serve import project_params
    from tasks.feedback import default_db_path, export_feedback
    from tasks.feedback.export import LEFT_OUT, ExportPolicy

    db = default_db_path(root)
    _check_export_target(out, db)
    params = project_params(root)
    settings = params.feedback
    # No cap here: feedback.max_key_share is a share of a run's training data, which a run applies.
    # The answers of the project's model (params.yaml), as its run reads them: not another's sharing the log.
    policy = ExportPolicy(settings.auto_approve, settings.redaction, model_name=params.registry.model_name)
    try:
        exported = export_feedback(db, out, min_rating, policy=policy)
    except (FileNotFoundError, ValueError) as exc:  # no database yet, or --min-rating outside 1..5
        raise UsageError(str(exc)) from None
    left_out = [f"{getattr(exported, name)} {said.format(min_rating=min_rating)}"
                for name, said in LEFT_OUT.items() if getattr(exported, name)]
    print(f"wrote {exported.examples} examples from {db} to {out}; left out: " + (", ".join(left_out) or "none")
          + f"; redacted: {_counts(exported.redacted) or 'nothing'}")


def _counts(counts: dict[str, int]) -> str:
    """`approved 5, rejected 0, held 1`: counts as a person reads them (not a Python dict)."""
    return ", ".join(f"{name} {n}" for name, n in counts.items())


def _check_export_target(out: Path, db: Path) -> None:
    """Refuse an `out` whose writing would destroy data: the feedback log itself (its -wal,
    -shm or -journal files too), or an existing file that is not an export of the log (a data
    set, a settings file); and a folder that does not exist (a mistyped path), not made.

    Raises:
        UsageError: naming `out` and why.
    """
    import json

    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give the file to write, e.g. {out / 'feedback.jsonl'}")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: the folder {out.parent} does not exist")
    target = out.resolve()
    if target in {Path(f"{db.resolve()}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")}:
        raise UsageError(f"{out}: that is the feedback log the export reads, which it would overwrite; "
                         "write the export to another file")
    if out.is_file() and out.stat().st_size:
        with out.open("rb") as f:
            first = f.readline(1 << 20)
        try:
            ours = "provenance" in json.loads(first)
        except (ValueError, TypeError):  # not JSON (binary, text, a truncated line) or not an object
            ours = False
        if not ours:
            raise UsageError(f"{out}: exists and is not an export of the feedback log (its first line has no "
                             "provenance), so writing it would replace its data; choose another file, or remove it first")


def pending_command() -> int:
    """Print the held feedback on the project model's answers, as its run's approval form shows it."""
    def pending() -> None:
        root = apply_defaults()
        from tasks.feedback.review import describe_batch, held_batch

        print(describe_batch(held_batch(_db(root), _settings(root).auto_approve, _model(root))))
    return _on_the_log(pending)


def approve_command(approve_all: bool, keys: list[str], reject: bool, reviewer: str, up_to: int | None = None) -> int:
    """Approve the held feedback on the project model's answers (its run's batch: another registered
    model's, sharing the log, is approved with that model's settings, FTLLM_PARAMS) of `keys`, or all
    of it; with `up_to`, only rows with an id up to it (the batch `ftllm feedback pending` showed).
    `reject` rejects the keys' undecided rows on every model's answers: a key is bad for all."""
    def approve() -> None:
        root = apply_defaults()
        from tasks.feedback.review import Decision, HeldBatch, apply_decision, held_batch

        if approve_all == bool(keys):
            raise UsageError("give --all or one or more --key NAME (not both)")
        if reject and approve_all:
            raise UsageError("--reject takes --key NAME: reject named keys' feedback, never all of it at once")
        if up_to is not None and up_to < 1:
            raise UsageError(f"--up-to {up_to}: expected a feedback id (1 or more), as `ftllm feedback pending` shows")
        db, auto_approve, model = _db(root), _settings(root).auto_approve, _model(root)
        if reject:
            print(_counts(reject_keys(db, keys, reviewer, auto_approve, up_to, model)))
            return
        batch = held_batch(db, auto_approve, model)
        if up_to is not None:  # what a person saw: rows posted since stay held
            batch = HeldBatch([(i, r) for i, r in batch.rows if r.id <= up_to], min(up_to, batch.up_to_id))
        unknown = sorted(set(keys) - set(batch.keys))
        if unknown:
            raise UsageError(f"--key {', '.join(unknown)}: no held feedback from that key; held keys: {batch.keys}")
        decided = apply_decision(db, batch, Decision(approve_all, tuple(keys), reviewer=reviewer))
        # what stays held in all, rows posted after --up-to among them, not only in the batch decided on
        print(_counts({**decided, "held": len(held_batch(db, auto_approve, model).rows)}))
    return _on_the_log(approve)


def reject_keys(db: Path, keys: list[str], reviewer: str, auto_approve: str, up_to: int | None = None,
                model: str | None = None) -> dict[str, int]:
    """Reject every undecided row of `keys` (with `up_to`, those with an id up to it: what a
    person saw; later rows stay undecided): held, and admitted without review because the key
    was trusted when it posted (a key found compromised, or made untrusted, later). "held" in
    the answer is what stays held (on `model`'s answers, if given)."""
    from tasks.feedback import FeedbackStore
    from tasks.feedback.review import held_batch

    store = FeedbackStore(db)
    try:
        found = {k: store.count_undecided(k, up_to) for k in keys}
        unknown = sorted(k for k, n in found.items() if n == 0)
        if unknown:
            raise UsageError(f"--key {', '.join(unknown)}: no undecided feedback from that key (rejected or approved "
                             "rows keep their decision; `ftllm feedback forget --key NAME` erases a key's rows)")
        rejected = store.review("rejected", reviewer, keys=keys, up_to_id=up_to)
    finally:
        store.close()
    return {"approved": 0, "rejected": rejected, "held": len(held_batch(db, auto_approve, model).rows)}


def forget_command(user: str | None, key: str | None, before: str | None, expired: bool) -> int:
    """Erase interactions by end user, key, date or retention, with their feedback."""
    def forget() -> None:
        root = apply_defaults()
        from tasks.feedback import FeedbackStore
        from tasks.feedback.export import pseudonym
        from tasks.feedback.store import storable

        if sum(x is not None for x in (user, key if user is None else None, before)) + expired != 1:
            raise UsageError("give exactly one of --user ID (with --key NAME: that key's user only), --key NAME, "
                             "--before YYYY-MM-DD, --expired")
        store = FeedbackStore(_db(root))
        try:
            if expired:
                settings = _settings(root)
                days = settings.retention_days
                if days <= 0:
                    raise UsageError("feedback.retention_days is 0 (keep forever): nothing expires")
                unreviewed = store.held_expiring(days, settings.auto_approve)
                erased = store.expire(days)
                if unreviewed:
                    print(f"{unreviewed} of the erased feedback rows were still held for review: retention does not "
                          "wait for a review (`ftllm feedback pending` lists what is held)")
            else:
                when = None
                if before is not None:
                    try:
                        parsed = datetime.fromisoformat(before)  # a given offset is converted, none is UTC
                        when = (parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)).timestamp()
                    except ValueError:
                        raise UsageError(f"--before {before!r}: expected a date like 2026-01-31") from None
                users = [user]
                if user is not None and DIGEST.fullmatch(user):  # also the id as the exports write it
                    users += sorted(u for u in store.end_users() if pseudonym(u) == user.lower() and u != user)
                erased = (0, 0)
                for one in users if user is not None else [None]:
                    # The erasure list outlives the data: it names the user by the exports' digest, not by the id.
                    reason = (f"forget --user {pseudonym(storable(one))}" + (f" --key {key}" if key else "")
                              if one is not None else
                              f"forget --key {key}" if key else f"forget --before {before}")
                    done = store.forget(end_user=one, key_name=key, before=when, reason=reason)
                    erased = (erased[0] + done[0], erased[1] + done[1])
        finally:
            store.close()
        if erased == (0, 0):
            what = (f"--user {user}" + (f" --key {key}" if key is not None else "") if user is not None
                    else f"--key {key}" if key is not None
                    else "that date" if before is not None else "retention")
            print(f"nothing matched {what}: no interaction or feedback was erased, and no prompt was listed")
            return
        listed = ("; their prompts are on the erasure list, so no later export holds them" if user or key else "")
        print(f"erased {erased[0]} interactions and {erased[1]} feedback rows{listed} "
              "(earlier DVC snapshots and model versions: docs/guides/trust.md)")
    return _on_the_log(forget)
