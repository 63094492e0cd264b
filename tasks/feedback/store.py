"""The interaction log on disk: the service's writer and the monitor's read-only reader.

The service appends one row per completion (request messages, answer, model version,
latency, token counts; never a header, so never an API key) and one row per feedback
(`POST /feedback`). Ratings are integers from 1 (useless) to 5 (perfect). Readers open
the file read-only, so the monitor and an export never block or alter the service's
writes (WAL mode lets them read while it writes).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Self

from tasks.environment import environment
from tasks.errors import DataFileError
from tasks.feedback.schema import MAX_RATING, MIN_RATING, FeedbackRow, Interaction, check_readable, migrate

log = logging.getLogger("ftllm.serving")


def default_db_path(root: Path) -> Path:
    """`FTLLM_FEEDBACK_DB` if set, else `<root>/feedback.db`."""
    return environment().feedback_db or Path(root) / "feedback.db"


class FeedbackStore:
    """Append-only SQLite log of interactions and feedback, safe to share between threads.

    One connection behind a lock: writes are a few hundred microseconds in WAL mode, far
    below a generation, so a single writer is not the bottleneck of the service.

    The service logs through `log_later`, which hands the row to a writer thread and
    returns at once: the thread writes whatever has queued up in one transaction, so at
    a few hundred completions a second the log costs one commit per batch instead of a
    commit and a thread-pool hop per request. Every read (`has_interaction`,
    `add_feedback`, `count`) first waits for the rows queued before it, so a completion
    can be rated as soon as its answer is out.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        migrate(self._conn, self.path)
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._written = threading.Condition()
        self._queued = self._done = 0  # rows handed to log_later, and rows written (or failed)
        self._writer: threading.Thread | None = None

    def close(self) -> None:
        """Write what is queued, then close the database."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._lock:
            self._conn.close()

    @staticmethod
    def _row(item: Interaction) -> tuple:
        return (
            item.id, time.time(), item.endpoint, item.model_name, item.model_version,
            json.dumps(item.messages, ensure_ascii=False), item.answer, item.finish_reason,
            item.prompt_tokens, item.completion_tokens, item.latency_ms,
        )

    def _insert(self, rows: list[tuple]) -> None:
        with self._lock:
            self._conn.executemany("INSERT OR REPLACE INTO interactions VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            self._conn.commit()

    def log_interaction(self, item: Interaction) -> None:
        """Append one completion to the log, now."""
        self._insert([self._row(item)])

    def log_later(self, item: Interaction) -> None:
        """Append one completion to the log from the writer thread (started on first use)."""
        with self._written:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="ftllm-feedback-writer", daemon=True)
                self._writer.start()
            self._queued += 1
        self._queue.put(self._row(item))

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
            try:
                if rows:
                    self._insert(rows)
            except sqlite3.Error:  # a full disk must not stop the service; the rows are lost
                log.exception("could not log %d interactions", len(rows))
            with self._written:
                self._done += len(rows)
                self._written.notify_all()
            if closing:
                return

    def flush(self) -> None:
        """Wait until every row handed to `log_later` so far is written."""
        with self._written:
            target = self._queued
            self._written.wait_for(lambda: self._done >= target)

    def has_interaction(self, completion_id: str) -> bool:
        self.flush()
        with self._lock:
            cur = self._conn.execute("SELECT 1 FROM interactions WHERE id = ?", (completion_id,))
            return cur.fetchone() is not None

    def add_feedback(self, completion_id: str, rating: int, correction: str | None = None) -> int:
        """Record a rating (and optionally a corrected answer) of a logged completion; return its id.

        Raises:
            KeyError: no completion with that id was logged.
            ValueError: the rating is outside 1..5 or the correction is blank.
        """
        if not MIN_RATING <= rating <= MAX_RATING:
            raise ValueError(f"rating must be an integer from {MIN_RATING} to {MAX_RATING}, got {rating}")
        if correction is not None and not correction.strip():
            raise ValueError("correction must not be blank; leave it out to rate the answer as it is")
        self.flush()
        with self._lock:
            if self._conn.execute("SELECT 1 FROM interactions WHERE id = ?", (completion_id,)).fetchone() is None:
                raise KeyError(completion_id)
            cur = self._conn.execute(
                "INSERT INTO feedback (created, completion_id, rating, correction) VALUES (?,?,?,?)",
                (time.time(), completion_id, rating, correction),
            )
            self._conn.commit()
            return int(cur.lastrowid)

    def count(self, table: str) -> int:
        assert table in ("interactions", "feedback")
        self.flush()
        with self._lock:
            return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


class FeedbackReader:
    """A read-only view of the log: the service keeps writing while it reads (WAL).

    Use it as a context manager; every method reads one consistent snapshot of its own.

    Raises:
        DataFileError: (on entering) the file is not the service's log, or a newer schema's.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> Self:
        try:
            conn = sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True, timeout=30)
            conn.execute("SELECT 1 FROM feedback LIMIT 1")
            check_readable(conn, self.path)
        except sqlite3.DatabaseError as exc:
            raise DataFileError(f"{self.path}: not a feedback log of the service ({exc}); "
                                "point FTLLM_FEEDBACK_DB at the service's feedback.db") from None
        except ValueError as exc:
            raise DataFileError(str(exc)) from None
        self._conn = conn
        return self

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "use FeedbackReader as a context manager"
        return self._conn

    def feedback_since(self, since_id: int) -> list[FeedbackRow]:
        """Every feedback row with an id above `since_id`, oldest first."""
        rows = self.conn.execute(
            "SELECT id, created, completion_id, rating, correction FROM feedback WHERE id > ? ORDER BY id", (since_id,)
        ).fetchall()
        return [FeedbackRow(*row) for row in rows]

    def last_feedback_id(self) -> int:
        """The highest feedback id in the log (0 when there is none)."""
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0])

    def interaction_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM interactions").fetchone()[0])

    def recent_messages(self, window: int) -> list[list[dict[str, Any]]]:
        """The request messages of the latest `window` completions, newest first."""
        rows = self.conn.execute("SELECT messages FROM interactions ORDER BY created DESC LIMIT ?", (window,)).fetchall()
        return [json.loads(messages) for (messages,) in rows]

    def latest_ratings(self) -> tuple[list[tuple[list[dict[str, Any]], str, FeedbackRow]], int]:
        """The latest feedback of each rated completion, with its request and answer, and the highest feedback id.

        Both come from one read transaction, so the id covers exactly the rows returned.

        Returns:
            ([(request messages, answer, latest feedback row)] in feedback order, highest feedback id).
        """
        query = """
            SELECT i.messages, i.answer, f.id, f.created, f.completion_id, f.rating, f.correction FROM feedback f
            JOIN interactions i ON i.id = f.completion_id
            WHERE f.id = (SELECT MAX(id) FROM feedback g WHERE g.completion_id = f.completion_id)
            ORDER BY f.id
        """
        with self.conn:  # one transaction: the rows and the highest id are the same snapshot
            self.conn.execute("BEGIN")
            rows = self.conn.execute(query).fetchall()
            last = self.last_feedback_id()
        return [(json.loads(row[0]), row[1], FeedbackRow(*row[2:])) for row in rows], last
