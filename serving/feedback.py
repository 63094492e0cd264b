"""The interaction log: every served completion and every rating of one, in SQLite.

The service appends one row per completion (request messages, answer, model version,
latency, token counts, and the tools offered and the calls answered; never a header, so
never an API key) and one row per feedback
(`POST /feedback`). `export_feedback` turns the accepted answers and the corrections into
canonical `{"messages": [...]}` JSONL (corrections marked `"correction": true`), which the
next retraining takes in through validation like any other data file, or by itself with a
`feedback: true` source in `data.sources`:

    ftllm feedback export --min-rating 4 data/feedback.jsonl

Ratings are integers from 1 (useless) to 5 (perfect). The database defaults to
`<root>/feedback.db`; `FTLLM_FEEDBACK_DB` points it elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.environment import environment

log = logging.getLogger("ftllm.serving")

FEEDBACK_DB_ENV = "FTLLM_FEEDBACK_DB"
MIN_RATING, MAX_RATING = 1, 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS interactions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    endpoint TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    messages TEXT NOT NULL,          -- JSON list of the request's messages
    answer TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    tools TEXT,                     -- JSON list of the tools offered, or NULL
    tool_calls TEXT                 -- JSON list of the answer's tool calls, or NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    completion_id TEXT NOT NULL REFERENCES interactions(id),
    rating INTEGER NOT NULL,
    correction TEXT
);
CREATE INDEX IF NOT EXISTS feedback_completion ON feedback(completion_id);
"""
# Columns added after the first release: a log written before them gets them (NULL) on open.
_ADDED_COLUMNS = {"interactions": ("tools TEXT", "tool_calls TEXT")}


def default_db_path(root: Path) -> Path:
    """`FTLLM_FEEDBACK_DB` if set, else `<root>/feedback.db`."""
    return environment().feedback_db or root / "feedback.db"


@dataclass(frozen=True)
class Interaction:
    """One served completion, as logged."""

    id: str
    endpoint: str
    model_name: str
    model_version: str
    messages: list[dict[str, Any]]
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    tools: list[dict[str, Any]] | None = None  # the tools the request offered the model
    tool_calls: list[dict[str, Any]] | None = None  # the answer's calls (OpenAI form); `answer` is its text


class FeedbackStore:
    """Append-only SQLite log of interactions and feedback, safe to share between threads.

    One connection behind a lock: writes are a few hundred microseconds in WAL mode, far
    below a generation, so a single writer is not the bottleneck of the service.

    The service logs through `log_later`, which hands the row to a writer thread and
    returns at once: the thread writes whatever has queued up in one transaction, so at
    a few hundred completions a second the log costs one commit per batch instead of a
    commit and a thread-pool hop per request. Every read (`has_interaction`,
    `add_feedback`, `count`, `training_examples`) first waits for the rows queued before
    it, so a completion can be rated as soon as its answer is out.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column.split()[0] not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        self._conn.commit()
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
            json.dumps(item.tools, ensure_ascii=False) if item.tools else None,
            json.dumps(item.tool_calls, ensure_ascii=False) if item.tool_calls else None,
        )

    def _insert(self, rows: list[tuple]) -> None:
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO interactions (id, created, endpoint, model_name, model_version, messages, "
                "answer, finish_reason, prompt_tokens, completion_tokens, latency_ms, tools, tool_calls) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
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

    def training_examples(self, min_rating: int) -> list[dict[str, Any]]:
        """Canonical examples from the latest feedback of each completion.

        A correction always yields an example (the corrected answer replaces the model's,
        whatever the rating), marked `"correction": true`; an uncorrected answer yields one
        when rated `min_rating` or more.
        """
        query = """
            SELECT i.messages, i.answer, i.tools, i.tool_calls, f.rating, f.correction FROM feedback f
            JOIN interactions i ON i.id = f.completion_id
            WHERE f.id = (SELECT MAX(id) FROM feedback g WHERE g.completion_id = f.completion_id)
            ORDER BY f.id
        """
        self.flush()
        with self._lock:
            rows = self._conn.execute(query).fetchall()
        examples = []
        for messages_json, answer, tools, tool_calls, rating, correction in rows:
            if correction is None and rating < min_rating:
                continue
            messages = [m for m in json.loads(messages_json) if m.get("role") in ("system", "user", "assistant", "tool")]
            if not messages or messages[-1]["role"] not in ("user", "tool"):
                continue  # not a prompt the model answers (e.g. a plain /generate prompt)
            if correction is not None:
                final: dict[str, Any] = {"role": "assistant", "content": correction}
            elif tool_calls:
                final = {"role": "assistant", "content": answer or None, "tool_calls": json.loads(tool_calls)}
            else:
                final = {"role": "assistant", "content": answer}
            if not final.get("tool_calls") and not final["content"].strip():
                continue
            example: dict[str, Any] = {"messages": [*messages, final]}
            if tools:
                example["tools"] = json.loads(tools)
            if correction is not None:
                example["correction"] = True  # outranks other answers to the same prompt (tasks.data.sources)
            examples.append(example)
        return examples


def export_feedback(db_path: Path, out: Path, min_rating: int) -> int:
    """Write accepted answers and corrections as canonical JSONL to `out`; return the count.

    Raises:
        FileNotFoundError: there is no feedback database at `db_path`.
        ValueError: `min_rating` is outside 1..5.
    """
    if not MIN_RATING <= min_rating <= MAX_RATING:
        raise ValueError(f"--min-rating must be from {MIN_RATING} to {MAX_RATING}, got {min_rating}")
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"{db_path}: no feedback database; serve the model and collect feedback first")
    store = FeedbackStore(db_path)
    try:
        examples = store.training_examples(min_rating)
    finally:
        store.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    os.replace(tmp, out)
    return len(examples)
