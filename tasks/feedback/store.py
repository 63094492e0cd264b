"""The interaction log on disk: the service's writer (the read-only reader is `tasks.feedback.reader`).

The service appends one row per completion (request messages, answer, model version,
latency, token counts, the API key's name and the client's end-user id; never a header,
so never a key itself) and one row per feedback (`POST /feedback`), held for review
unless its key is trusted (`FeedbackRow.admitted`). `review` records a person's
decision, `forget` erases interactions and their feedback (listing their prompts'
digests when it erases a user's or a key's), `expire` applies the retention period.
Ratings are integers from 1 (useless) to 5 (perfect).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.environment import environment
from tasks.errors import DataFileError
from tasks.feedback.schema import (
    ANONYMOUS_KEY,
    MAX_RATING,
    MIN_RATING,
    Interaction,
    migrate,
    prompt_digest,
)

log = logging.getLogger("ftllm.serving")
INTERACTION_COLUMNS = ("id, created, endpoint, model_name, model_version, messages, answer, finish_reason, "
                       "prompt_tokens, completion_tokens, latency_ms, key_name, end_user, tools, tool_calls, reasoning, "
                       "tool_choice")


class DuplicateCorrection(ValueError):
    """The key already corrected this completion (at most one correction per completion per key)."""


_SURROGATE = re.compile("[\ud800-\udfff]")
BUSY_RETRIES = 10  # times the connection's 30 s timeout a batch waits for a log another process holds
PURGE_WAIT_MS = 1000  # how long `forget` waits for readers to let it empty the write-ahead log


def _file_of(path: Path) -> tuple[int, int] | None:
    """Which file `path` names now (device, inode); None where there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _set_aside_write_ahead(path: Path) -> None:
    """Move the write-ahead log and index at `path` aside: a log moved over the open one left
    them there, and the log now at the path would be read through them."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("-wal", "-shm"):
        found = Path(f"{path}{suffix}")
        if found.exists():
            aside = found.with_name(f"{found.name}.replaced-{stamp}")
            found.rename(aside)
            log.warning("%s belonged to the log that %s replaced: moved to %s", found, path, aside)


def _busy(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _use_wal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch the log to WAL mode, waiting up to `wait_s` for another process that holds it.

    SQLite answers "database is locked" at once, without its busy timeout, when another
    connection holds a write lock on a log still in rollback mode: two processes opening a
    brand-new log together (the service, a run's export, `ftllm feedback`) meet that.
    """
    deadline, pause = time.monotonic() + wait_s, 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.5)


def storable(value: Any) -> Any:
    """`value` as SQLite can store it: a lone surrogate (JSON allows `"\\ud800"`, UTF-8 does not)
    becomes U+FFFD, as a decoder replaces bytes it cannot read."""
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def default_db_path(root: Path) -> Path:
    """`FTLLM_FEEDBACK_DB` if set, else `<root>/feedback.db`."""
    return environment().feedback_db or Path(root) / "feedback.db"


class FeedbackStore:
    """Append-only SQLite log of interactions and feedback, safe to share between threads.

    One connection behind a lock: writes are a few hundred microseconds in WAL mode, far
    below a generation, so a single writer is not the bottleneck of the service.

    The service logs through `log_later`, which hands the row to a writer thread and
    returns a future at once: the thread writes whatever has queued up in one transaction
    (a group commit), so at a few hundred completions a second the log costs one commit
    per batch instead of a commit and a thread-pool hop per request. The service sends an
    answer's end only once its future is done, so an answer a client holds is on disk and
    can be rated even if the service is killed right after. Every read (`has_interaction`,
    `add_feedback`, `count`) first waits for the rows queued before it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = self._connect()
        self._file = _file_of(self.path)
        self._queue: queue.SimpleQueue[tuple[tuple, Future] | None] = queue.SimpleQueue()
        self._written = threading.Condition()
        self._queued = self._done = 0  # rows handed to log_later, and rows written (or failed)
        self._writer: threading.Thread | None = None
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        """A connection to the log at `self.path` (made, or migrated, when it needs it).

        Raises:
            DataFileError: the file cannot be opened or written, or is not the service's log.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        except (OSError, sqlite3.OperationalError) as exc:  # a folder that cannot be made, a file that cannot be opened
            raise DataFileError(f"{self.path}: cannot open the feedback log ({exc}); point FTLLM_FEEDBACK_DB at a "
                                "file in a folder this process can write") from None
        try:
            _use_wal(conn)
            # FULL: a commit is on disk before it returns. Feedback is answered `"stored": true` and a
            # user does not send it twice; NORMAL (WAL) could lose the last commits to a power cut.
            # The interactions are written in batches, so this is one sync per batch, not per request.
            conn.execute("PRAGMA synchronous=FULL")
            # Erased rows are overwritten, not left in free pages of the file (`forget`, retention).
            conn.execute("PRAGMA secure_delete=ON")
            migrate(conn, self.path)
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _busy(exc):  # a read-only file or folder, a full disk
                raise DataFileError(f"{self.path}: cannot write the feedback log ({exc}); point FTLLM_FEEDBACK_DB at "
                                    "a file this process can write") from None
            raise DataFileError(f"{self.path}: another process kept the feedback log locked ({exc}) past the "
                                "connection's 30 s wait; try again once it is done") from None
        except sqlite3.DatabaseError as exc:  # another file where the log should be: named, not a traceback
            conn.close()
            raise DataFileError(f"{self.path}: not a feedback log of the service ({exc}); "
                                "point FTLLM_FEEDBACK_DB at the service's feedback.db") from None
        return conn

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The connection's lock, held on the file now at `self.path`.

        A log deleted or replaced while the store holds it open would take every later row into
        a file no one reads again, each answered as stored: the store closes it and opens the log
        now at the path (a new one where it was deleted), and writes there. A log moved into its
        place would be read through the old log's write-ahead log and index, which SQLite leaves
        at the path for a moved log: they are set aside first (`<path>-wal.replaced-<time>`, the
        old log's last rows in it). Putting a backup in place is safest with the service stopped.

        Raises:
            DataFileError: the log at the path cannot be opened (nothing is written; the next
                write tries again).
        """
        with self._lock:
            now = _file_of(self.path)
            if self._conn is None or now is None or now != self._file:
                if self._conn is not None:
                    log.warning("%s was deleted or replaced while open: writing to the log now at that path", self.path)
                    self._conn.close()
                    self._conn = None
                    if now is not None:
                        _set_aside_write_ahead(self.path)
                self._conn, self._file = self._connect(), _file_of(self.path)
            yield

    def close(self) -> None:
        """Write what is queued, then close the database."""
        with self._written:
            self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    @staticmethod
    def _row(item: Interaction) -> tuple:
        return tuple(storable(v) for v in (
            item.id, time.time(), item.endpoint, item.model_name, item.model_version,
            json.dumps(item.messages, ensure_ascii=False), item.answer, item.finish_reason,
            item.prompt_tokens, item.completion_tokens, item.latency_ms, item.key_name, item.end_user,
            json.dumps(item.tools, ensure_ascii=False) if item.tools else None,
            json.dumps(item.tool_calls, ensure_ascii=False) if item.tool_calls else None, item.reasoning,
            json.dumps(item.tool_choice) if item.tool_choice is not None else None))

    def _insert(self, rows: list[tuple]) -> None:
        """Write `rows` in one transaction; a database another process holds (`ftllm feedback
        forget` on a large log) is waited for, up to BUSY_RETRIES times the connection's timeout."""
        for attempt in range(BUSY_RETRIES + 1):
            with self._locked():
                try:
                    self._conn.executemany(f"INSERT OR REPLACE INTO interactions ({INTERACTION_COLUMNS}) "
                                           f"VALUES ({','.join('?' * len(rows[0]))})", rows)
                    self._conn.commit()
                    return
                except BaseException as exc:
                    self._conn.rollback()  # never leave the write lock held by a half-done batch
                    if not (isinstance(exc, sqlite3.OperationalError) and _busy(exc)) or attempt == BUSY_RETRIES:
                        raise
            log.warning("the feedback log is locked by another process; %d interactions wait (try %d of %d)",
                        len(rows), attempt + 1, BUSY_RETRIES)

    def log_interaction(self, item: Interaction) -> None:
        """Append one completion to the log, now."""
        self._insert([self._row(item)])

    def log_later(self, item: Interaction) -> Future:
        """Append one completion to the log from the writer thread (started on first use).

        Returns:
            A future that becomes True once the row is committed (synced to disk), or False
            if the database refused the write (a full disk: logged, and the service goes on).
        """
        written: Future = Future()
        with self._written:
            if self._closed:  # the writer is gone (the service is shutting down): say so, never leave it waiting
                log.warning("interaction %s not logged: the feedback log is closed", item.id)
                written.set_result(False)
                return written
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="ftllm-feedback-writer", daemon=True)
                self._writer.start()
            row = self._row(item)
            self._queued += 1
            self._queue.put((row, written))  # under the lock: never behind close()'s end marker
        return written

    def _write(self) -> None:
        while True:
            rows, closing = [self._queue.get()], False
            while True:  # everything queued meanwhile goes into the same transaction
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in rows:
                rows, closing = [r for r in rows if r is not None], True
            # Running: a waiter that goes away now (a client's disconnect) can no longer cancel its
            # future; one that went away before did (no result to set). Every row is logged.
            waiting = {written for _, written in rows if written.set_running_or_notify_cancel()}
            stored = [False] * len(rows)
            try:
                stored = self._insert_each(rows)
            finally:
                for (_, written), ok in zip(rows, stored):
                    if written in waiting:
                        written.set_result(ok)
                with self._written:
                    self._done += len(rows)
                    self._written.notify_all()
            if closing:
                return

    def _insert_each(self, rows: list[tuple[tuple, Future]]) -> list[bool]:
        """Write a batch; where the database refuses it, each half apart, down to the row it
        refuses, so that one bad row loses only itself (in a few commits, not one per row).
        Which rows were written. Never raises: the writer must go on."""
        try:
            if rows:
                self._insert([row for row, _ in rows])
            return [True] * len(rows)
        except Exception as exc:
            if len(rows) == 1 or isinstance(exc, DataFileError) or (isinstance(exc, sqlite3.OperationalError) and _busy(exc)):
                # a log held past every retry, or one that cannot be opened, is no bad row: splitting the
                # batch would wait again per part
                log.exception("could not log %d interactions", len(rows))
                return [False] * len(rows)
        half = len(rows) // 2
        return self._insert_each(rows[:half]) + self._insert_each(rows[half:])

    def flush(self) -> None:
        """Wait until every row handed to `log_later` so far is written."""
        with self._written:
            target = self._queued
            self._written.wait_for(lambda: self._done >= target)

    def has_interaction(self, completion_id: str) -> bool:
        self.flush()
        with self._locked():
            cur = self._conn.execute("SELECT 1 FROM interactions WHERE id = ?", (storable(completion_id),))
            return cur.fetchone() is not None

    def add_feedback(self, completion_id: str, rating: int, correction: str | None = None, *,
                     key_name: str = ANONYMOUS_KEY, end_user: str | None = None, trusted: bool = False) -> int:
        """Record a rating (and optionally a corrected answer) of a logged completion; return its id.

        Args:
            key_name, end_user: who sent it (the API key's name, the client's id of its user).
            trusted: the key is trusted: its feedback needs no approval (`feedback.auto_approve`).

        Raises:
            KeyError: no completion with that id was logged.
            DuplicateCorrection: this key already corrected this completion.
            ValueError: the rating is outside 1..5 or the correction is blank.
        """
        completion_id = storable(completion_id)
        if not MIN_RATING <= rating <= MAX_RATING:
            raise ValueError(f"rating must be an integer from {MIN_RATING} to {MAX_RATING}, got {rating}")
        if correction is not None and not correction.strip():
            raise ValueError("correction must not be blank; leave it out to rate the answer as it is")
        self.flush()
        # The checks and the insert in one write transaction: a `forget` in another process in
        # between would leave feedback on an erased completion (kept, never exported).
        with self._locked(), self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            if self._conn.execute("SELECT 1 FROM interactions WHERE id = ?", (completion_id,)).fetchone() is None:
                raise KeyError(completion_id)
            if correction is not None and self._conn.execute(
                    "SELECT 1 FROM feedback WHERE key_name = ? AND completion_id = ? AND correction IS NOT NULL",
                    (key_name, completion_id)).fetchone():
                raise DuplicateCorrection(f"the key {key_name!r} already corrected {completion_id}")
            cur = self._conn.execute(
                "INSERT INTO feedback (created, completion_id, rating, correction, key_name, end_user, trusted, review) "
                "VALUES (?,?,?,?,?,?,?, 'pending')",
                (time.time(), completion_id, rating, storable(correction), key_name, storable(end_user), int(trusted)),
            )
            return int(cur.lastrowid)

    def review(self, decision: str, by: str, *, keys: list[str] | None = None, ids: list[int] | None = None,
               up_to_id: int | None = None) -> int:
        """Approve or reject pending feedback; return how many rows it decided.

        Args:
            decision: "approved" or "rejected".
            by: who decided (a person's name, "prefect-ui", "cli"), recorded with each row.
            keys: only the feedback of these key names (None: every key).
            ids: only these feedback ids.
            up_to_id: only feedback with an id at most this (the batch a person saw).
        """
        assert decision in ("approved", "rejected")
        where, args = ["review = 'pending'"], []
        if keys is not None:
            where.append(f"key_name IN ({','.join('?' * len(keys))})")
            args += keys
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args += ids
        if up_to_id is not None:
            where.append("id <= ?")
            args.append(up_to_id)
        self.flush()
        with self._locked(), self._conn:  # one transaction, rolled back on failure: no half-made decision
            # One number per decision, after every earlier one: the monitor counts feedback approved
            # after a run read the log as new (tasks/monitor/signals.py).
            number = self._conn.execute("INSERT INTO decisions (created, review, decided_by) VALUES (?, ?, ?)",
                                        (time.time(), decision, by)).lastrowid
            cur = self._conn.execute(
                f"UPDATE feedback SET review = ?, reviewed_by = ?, decision = ? WHERE {' AND '.join(where)}",
                (decision, by, number, *args))
            return cur.rowcount

    def forget(self, *, end_user: str | None = None, key_name: str | None = None, before: float | None = None,
               reason: str) -> tuple[int, int]:
        """Erase the interactions of an end user, a key, or from before a time, and all feedback on
        them or sent by that user or key. Return (interactions, feedback rows) erased. Given
        both, `end_user` and `key_name` erase that key's end user only: end-user ids are each
        client's own, and two front ends may both have a user "42".

        Erasing a user's or a key's data also lists the erased prompts' digests, so that no
        later export contains them, were they logged again. Erasing by time (retention) does
        not: another user's newer question in the same words is not erased data, and listing
        it would drop every later feedback on a common question.
        """
        end_user, key_name = storable(end_user), storable(key_name)  # as they were stored
        conditions = [(col, val) for col, val in (("end_user = ?", end_user), ("key_name = ?", key_name),
                                                  ("created < ?", before)) if val is not None]
        assert conditions, "forget needs a user, a key or a time"
        assert before is None or (end_user is None and key_name is None), "a time goes alone"
        where = (" AND " if end_user is not None and key_name is not None else " OR ").join(c for c, _ in conditions)
        args = [v for _, v in conditions]
        self.flush()
        with self._locked(), self._conn:
            # Read under the write lock: an interaction logged after the read and before the delete
            # would be erased without its prompt on the erasure list.
            self._conn.execute("BEGIN IMMEDIATE")
            rows = self._conn.execute(f"SELECT id, messages FROM interactions WHERE {where}", args).fetchall()
            ids = [r[0] for r in rows]
            if end_user is not None or key_name is not None:  # replaces an erasure by age of the same prompt
                now = time.time()
                self._conn.executemany("INSERT OR REPLACE INTO erasures (digest, created, reason) VALUES (?,?,?)",
                                       [(prompt_digest(json.loads(m)), now, reason) for _, m in rows])
            gone = self._conn.execute(
                f"DELETE FROM feedback WHERE ({where}) OR completion_id IN (SELECT id FROM interactions WHERE {where})",
                args + args).rowcount
            self._conn.execute(f"DELETE FROM interactions WHERE {where}", args)
        self._purge_wal()
        return len(ids), gone

    def end_users(self) -> set[str]:
        """Every end-user id the log holds (of interactions and of feedback)."""
        self.flush()
        with self._locked():
            rows = self._conn.execute("SELECT end_user FROM interactions WHERE end_user IS NOT NULL UNION "
                                      "SELECT end_user FROM feedback WHERE end_user IS NOT NULL").fetchall()
        return {u for (u,) in rows}

    def _purge_wal(self) -> None:
        """Copy the write-ahead log into the database and empty it: until then it still holds the
        erased rows as they were written (the service keeps it open, so SQLite does not).

        Emptying it waits for every reader to reach the latest snapshot and holds off writers
        meanwhile, the service's among them: so it waits PURGE_WAIT_MS at most, not the
        connection's 30 s.
        """
        with self._locked():
            waits = self._conn.execute("PRAGMA busy_timeout").fetchone()[0]
            self._conn.execute(f"PRAGMA busy_timeout={PURGE_WAIT_MS}")
            try:
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                self._conn.execute(f"PRAGMA busy_timeout={int(waits)}")
        if busy:
            log.warning("%s-wal could not be emptied (a reader held it): the erased rows stay in it until the "
                        "next checkpoint; run `ftllm feedback forget` again to retry", self.path)

    # Interactions past retention: the answer and every feedback on it older than the cut-off. A
    # rating posted today on an answer from long ago keeps that answer (and the rating) until the
    # rating is as old: erased at once, it would never reach the run that was to read it. Never
    # past twice the period (`:limit`), so rating an answer again and again does not keep it.
    _EXPIRED = ("SELECT id FROM interactions i WHERE i.created < :cutoff AND (i.created < :limit OR NOT EXISTS "
                "(SELECT 1 FROM feedback f WHERE f.completion_id = i.id AND f.created >= :cutoff))")

    @staticmethod
    def _retention_bounds(retention_days: float) -> dict[str, float]:
        now = time.time()
        return {"cutoff": now - retention_days * 86400, "limit": now - 2 * retention_days * 86400}

    def expire(self, retention_days: float) -> tuple[int, int]:
        """Erase each interaction whose latest activity (its answer, or the latest feedback on it) is
        older than `retention_days`, or whose answer is older than twice that, with its feedback;
        0 keeps everything. Return (interactions, feedback rows) erased. Like erasure by time, it
        lists no prompt (see `forget`)."""
        if retention_days <= 0:
            return 0, 0
        cutoff = self._retention_bounds(retention_days)
        self.flush()
        with self._locked(), self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            gone = self._conn.execute(f"DELETE FROM feedback WHERE completion_id IN ({self._EXPIRED})", cutoff).rowcount
            erased = self._conn.execute(f"DELETE FROM interactions WHERE id IN ({self._EXPIRED})", cutoff).rowcount
        self._purge_wal()
        return erased, gone

    def held_expiring(self, retention_days: float, auto_approve: str) -> int:
        """Feedback rows `expire(retention_days)` would erase while still held for review (pending and not
        admitted by `auto_approve`): retention does not wait for a review, and says what it erased unseen."""
        if retention_days <= 0 or auto_approve == "all":
            return 0
        self.flush()
        untrusted_only = "AND f.trusted = 0" if auto_approve == "trusted" else ""
        with self._locked():
            return int(self._conn.execute(
                f"SELECT COUNT(*) FROM feedback f WHERE f.review = 'pending' {untrusted_only} "
                f"AND f.completion_id IN ({self._EXPIRED})", self._retention_bounds(retention_days)).fetchone()[0])

    def count_undecided(self, key_name: str, up_to_id: int | None = None) -> int:
        """The feedback rows of `key_name` no person has approved or rejected (held or admitted by
        trust), with an id up to `up_to_id` when given."""
        self.flush()
        with self._locked():
            return int(self._conn.execute(
                "SELECT COUNT(*) FROM feedback WHERE key_name = ? AND review = 'pending' AND id <= ?",
                (key_name, up_to_id if up_to_id is not None else 2 ** 63 - 1)).fetchone()[0])

    def count(self, table: str) -> int:
        assert table in ("interactions", "feedback", "erasures")
        self.flush()
        with self._locked():
            return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
