"""The rows of the interaction log and its SQLite tables, versioned.

The version lives in SQLite's `PRAGMA user_version`. Version 1 is the layout the service
has always written; a file from before the version was recorded reads 0 and holds the
same tables, so opening it only records the version. A change of columns adds a step to
`MIGRATIONS` and bumps `SCHEMA_VERSION`: an existing `feedback.db` is migrated in place
the first time the service opens it, and readers accept every version up to theirs.

Version 2 records who sent each row (the API key's name and the end-user id the client
gave), whether the key was trusted, each feedback row's review (`pending`, `approved`,
`rejected`: untrusted feedback waits for a person, docs/guides/trust.md), and the
erasure list (`ftllm feedback forget`): digests of erased prompts that no later export
may contain.

Version 3 records the tools a request offered and the tool calls the answer made (JSON,
NULL when none), so that a rated or corrected tool-call answer is exported as the call it
was, with the tools it was made against.

Version 4 numbers a person's review decisions (`decision`; NULL until decided), so that
feedback approved after a run read the log counts as new to the monitor although its id is
below the run's cursor (`tasks/monitor/cursor.py`). Version 5 takes the numbers from a table
of their own (`decisions`), which nothing deletes from, so a number is never given twice,
whatever `forget` or retention erased.

Version 6 records the answer's reasoning trace (`reasoning`, NULL when there is none), so
that a rated answer of a reasoning model is exported with the trace it was trained to write.

Version 7 gives each log an identity (`identity.log_id`, random, given once when the file is
made or migrated), kept in the monitor's cursor: a log that replaced another is told apart
from it by this id, not only by its feedback ids (`tasks/monitor/cursor.py`). A copy of the
file (a backup put back) is the same log.

Version 8 records the request's `tool_choice` when it was not `auto` (`none`, `required` or
a named function; NULL for `auto` or none given): an answer it forced is not the model's own
choice, and the exports leave it out rather than teach it as one (`Interaction.forced`).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_RATING, MAX_RATING = 1, 5
SCHEMA_VERSION = 8
ANONYMOUS_KEY = "anonymous"  # the caller of a service without keys, and of rows from before version 2
REVIEWS = ("pending", "approved", "rejected")
# The finish reason logged for a streamed answer the client left before its end ("stop
# generating"): rateable, since the client has its id, but not a whole answer to learn.
STOPPED = "client_stopped"

_TABLES_V1 = """
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
    latency_ms REAL NOT NULL
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

# MIGRATIONS[v] brings a database at version v to v + 1. Version 0 (no version recorded)
# already has version 1's tables, or none at all in a new file.
# Rows from before version 2 were trained on as they came: they stay trusted.
_V1_TO_V2 = """
ALTER TABLE interactions ADD COLUMN key_name TEXT NOT NULL DEFAULT 'anonymous';
ALTER TABLE interactions ADD COLUMN end_user TEXT;
ALTER TABLE feedback ADD COLUMN key_name TEXT NOT NULL DEFAULT 'anonymous';
ALTER TABLE feedback ADD COLUMN end_user TEXT;
ALTER TABLE feedback ADD COLUMN trusted INTEGER NOT NULL DEFAULT 1;
ALTER TABLE feedback ADD COLUMN review TEXT NOT NULL DEFAULT 'pending';
ALTER TABLE feedback ADD COLUMN reviewed_by TEXT;
CREATE INDEX IF NOT EXISTS feedback_key ON feedback(key_name, completion_id);
CREATE INDEX IF NOT EXISTS interactions_created ON interactions(created);
CREATE TABLE IF NOT EXISTS erasures (
    digest TEXT PRIMARY KEY,         -- sha256 of the erased request's messages (prompt_digest)
    created REAL NOT NULL,
    reason TEXT NOT NULL             -- the forget command that erased it
);
"""
_V2_TO_V3 = """
ALTER TABLE interactions ADD COLUMN tools TEXT;       -- JSON list of the tools offered, or NULL
ALTER TABLE interactions ADD COLUMN tool_calls TEXT;  -- JSON list of the answer's tool calls, or NULL
"""
_V3_TO_V4 = """
ALTER TABLE feedback ADD COLUMN decision INTEGER;  -- the number of the review decision (NULL: undecided)
"""
# The numbers come from a table nothing deletes from, started above any a version-4 log gave
# (numbered from the decided rows then), so that none is given twice.
_V4_TO_V5 = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    review TEXT NOT NULL,
    decided_by TEXT NOT NULL
);
INSERT INTO sqlite_sequence (name, seq) SELECT 'decisions', COALESCE(MAX(decision), 0) FROM feedback
    WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'decisions');
"""
_V5_TO_V6 = """
ALTER TABLE interactions ADD COLUMN reasoning TEXT;  -- the answer's reasoning trace, or NULL
"""
_V6_TO_V7 = """
CREATE TABLE IF NOT EXISTS identity (
    log_id TEXT NOT NULL             -- this log's identity: 32 random hexadecimal digits
);
INSERT INTO identity (log_id) SELECT lower(hex(randomblob(16))) WHERE NOT EXISTS (SELECT 1 FROM identity);
"""
_V7_TO_V8 = """
ALTER TABLE interactions ADD COLUMN tool_choice TEXT;  -- JSON of a tool_choice that forced the answer, or NULL
"""
MIGRATIONS: dict[int, str] = {0: _TABLES_V1, 1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4, 4: _V4_TO_V5, 5: _V5_TO_V6,
                              6: _V6_TO_V7, 7: _V7_TO_V8}


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
    key_name: str = ANONYMOUS_KEY  # the API key that asked (serving.keys)
    end_user: str | None = None  # the client's own id of its user (OpenAI's `user` field)
    tools: list[dict[str, Any]] | None = None  # the tools the request offered the model
    tool_calls: list[dict[str, Any]] | None = None  # the answer's calls (OpenAI form); `answer` is its text
    reasoning: str | None = None  # the answer's reasoning trace (`reasoning_content`), apart from `answer`
    tool_choice: str | dict[str, Any] | None = None  # a tool_choice that forced the answer (None: auto, or none given)

    @property
    def forced(self) -> bool:
        """Whether a `tool_choice` chose the answer for the model (`forced_answer`)."""
        return forced_answer(self.tool_choice, self.messages)


def forced_answer(tool_choice: str | dict[str, Any] | None, messages: list[dict[str, Any]]) -> bool:
    """Whether a request's `tool_choice` chose the answer for the model: `required` or a named
    function, or `none` before any tool result. `none` after the results of the calls (an agent
    loop's last round, which asks for the answer from them) is the answer the model owes there.
    The exports leave such answers out, and the monitor does not count their feedback."""
    if tool_choice is None:
        return False
    ends_with_results = bool(messages) and messages[-1].get("role") in ("tool", "function")
    return not (tool_choice == "none" and ends_with_results)


@dataclass(frozen=True)
class FeedbackRow:
    """One rating of a logged completion, with the corrected answer when the user gave one."""

    id: int
    created: float
    completion_id: str
    rating: int
    correction: str | None
    key_name: str = ANONYMOUS_KEY
    end_user: str | None = None
    trusted: bool = False
    review: str = "pending"  # pending | approved | rejected (a person's decision; pending may be auto-approved)
    decision: int | None = None  # the number of the review decision (None: undecided, or decided before version 4)

    def admitted(self, auto_approve: str) -> bool:
        """Whether this feedback may reach training: approved by a person, or pending and
        auto-approved by the `feedback.auto_approve` setting (trusted | all | none)."""
        if self.review != "pending":
            return self.review == "approved"
        return auto_approve == "all" or (auto_approve == "trusted" and self.trusted)


FEEDBACK_COLUMNS = "id, created, completion_id, rating, correction, key_name, end_user, trusted, review, decision"


def prompt_digest(messages: list[dict[str, Any]]) -> str:
    """The sha256 of a request's messages (roles and texts), the erasure list's key."""
    import hashlib
    import json

    canonical = [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_readable(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a log written by a newer schema than this code knows.

    Raises:
        ValueError: the file's schema version is above `SCHEMA_VERSION`.
    """
    found = schema_version(conn)
    if found > SCHEMA_VERSION:
        raise ValueError(f"{path}: feedback log of schema version {found}, newer than this code's "
                         f"{SCHEMA_VERSION}; update the project before reading it")


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new log, or bring an older one up to `SCHEMA_VERSION`, in place.

    In one transaction, the version read again under its lock: two processes that open an
    old log at once (the service, `ftllm feedback approve`) migrate it once, and a migration
    cut short leaves the log as it was.
    """
    check_readable(conn, path)
    if schema_version(conn) >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for version in range(schema_version(conn), SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


def _statements(script: str) -> list[str]:
    """The SQL statements of a migration script (`executescript` would commit before running it)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements
