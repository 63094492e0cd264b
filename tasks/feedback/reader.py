"""The read-only view of the interaction log that the monitor, the exports and the review read.

It opens the file read-only, so a reader never blocks or alters the service's writes (WAL
mode lets it read while the service writes), and reads a log of an older schema as it is,
with the defaults its rows had (`FeedbackReader._columns`); `tasks.feedback.store` writes it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Self

from tasks.errors import DataFileError
from tasks.feedback.schema import (
    ANONYMOUS_KEY,
    FEEDBACK_COLUMNS,
    FeedbackRow,
    Interaction,
    check_readable,
    forced_answer,
    schema_version,
)
from tasks.feedback.store import INTERACTION_COLUMNS


def damaged_log(path: Path, exc: sqlite3.DatabaseError) -> DataFileError:
    """The error for a log SQLite opens but cannot read through ("database disk image is malformed")."""
    return DataFileError(f"{path}: the feedback log is damaged ({exc}); stop the service and restore a copy of it "
                         "(what it still holds can be read out with the sqlite3 shell's .recover or .dump)")


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
            self.version = schema_version(conn)
        except sqlite3.DatabaseError as exc:
            raise DataFileError(f"{self.path}: not a feedback log of the service ({exc}); "
                                "point FTLLM_FEEDBACK_DB at the service's feedback.db") from None
        except ValueError as exc:
            raise DataFileError(str(exc)) from None
        self._conn = conn
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            raise damaged_log(self.path, exc) from None  # a page SQLite cannot read, found while reading

    def _columns(self, table: str, prefix: str = "") -> str:
        """The columns of `table` this code reads; a log from an older version gives the defaults its rows had."""
        names = [c.strip() for c in (FEEDBACK_COLUMNS if table == "feedback" else INTERACTION_COLUMNS).split(",")]
        added = {"key_name": (2, f"'{ANONYMOUS_KEY}'"), "end_user": (2, "NULL"), "trusted": (2, "1"),
                 "review": (2, "'pending'"), "tools": (3, "NULL"), "tool_calls": (3, "NULL"), "decision": (4, "NULL"),
                 "reasoning": (6, "NULL"), "tool_choice": (8, "NULL")}
        return ", ".join(added[n][1] if n in added and self.version < added[n][0] else f"{prefix}{n}" for n in names)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "use FeedbackReader as a context manager"
        return self._conn

    def feedback_since(self, since_id: int) -> list[FeedbackRow]:
        """Every feedback row with an id above `since_id`, oldest first."""
        rows = self.conn.execute(
            f"SELECT {self._columns('feedback')} FROM feedback WHERE id > ? ORDER BY id", (since_id,)
        ).fetchall()
        return [FeedbackRow(*row) for row in rows]

    def erased_digests(self) -> set[str]:
        """The prompt digests `forget` listed for a user or a key: no export may contain these prompts.

        Erasure by age lists none now; those an earlier version listed (reasons `retention ...`,
        `forget --before ...`) are not read, so they no longer drop every later feedback on a
        common question from a log written before.
        """
        if self.version < 2:
            return set()
        query = "SELECT digest FROM erasures WHERE reason NOT LIKE 'retention %' AND reason NOT LIKE 'forget --before %'"
        return {d for (d,) in self.conn.execute(query)}

    def rated_completions(self) -> tuple[list[tuple[Interaction, FeedbackRow]], int, int]:
        """Every feedback row with its completion, oldest first, the highest feedback id and the
        last review decision, from one snapshot."""
        columns, feedback = self._columns("interactions", "i."), self._columns("feedback", "f.")
        query = f"SELECT {columns}, {feedback} FROM feedback f JOIN interactions i ON i.id = f.completion_id ORDER BY f.id"
        with self.conn:
            self.conn.execute("BEGIN")
            rows = self.conn.execute(query).fetchall()
            last, decided = self.last_feedback_id(), self.last_decision()
        out = []
        for row in rows:
            (cid, _created, endpoint, model, version, messages, answer, finish, pt, ct, lat, key, user, tools,
             calls, reasoning, choice), rest = row[:17], row[17:]
            out.append((Interaction(cid, endpoint, model, version, json.loads(messages), answer, finish, pt, ct, lat,
                                    key, user, json.loads(tools) if tools else None, json.loads(calls) if calls else None,
                                    reasoning, json.loads(choice) if choice else None),
                        FeedbackRow(*rest[:7], bool(rest[7]), *rest[8:])))
        return out, last, decided

    def last_feedback_id(self) -> int:
        """The highest feedback id in the log (0 when there is none)."""
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM feedback").fetchone()[0])

    def feedback_ids_given(self) -> int:
        """The highest feedback id this log ever gave, erased rows' too (ids are never reused); 0 for none."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'feedback'").fetchone()
        return int(row[0]) if row else 0

    def log_id(self) -> str:
        """This log's identity (schema version 7); "" for a log no version-7 code has opened yet."""
        if self.version < 7:
            return ""
        row = self.conn.execute("SELECT log_id FROM identity LIMIT 1").fetchone()
        return str(row[0]) if row else ""

    def last_decision(self) -> int:
        """The number of the latest review decision (0 when there is none)."""
        if self.version < 4:
            return 0
        if self.version < 5:  # numbered from the decided rows, before the decisions table (read-only: not migrated)
            return int(self.conn.execute("SELECT COALESCE(MAX(decision), 0) FROM feedback").fetchone()[0])
        return int(self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM decisions").fetchone()[0])

    def approved_since(self, decision: int, up_to_id: int) -> list[FeedbackRow]:
        """Feedback with an id up to `up_to_id` approved by a decision after `decision`, oldest first."""
        if self.version < 4:
            return []
        rows = self.conn.execute(
            f"SELECT {self._columns('feedback')} FROM feedback WHERE id <= ? AND review = 'approved' AND decision > ? "
            "ORDER BY id", (up_to_id, decision)).fetchall()
        return [FeedbackRow(*row) for row in rows]

    def served_by(self, completion_ids: Iterable[str]) -> dict[str, tuple[str, str, bool]]:
        """The registered model and version that served each of `completion_ids` (those the log
        holds), and whether a `tool_choice` forced the answer (`schema.forced_answer`)."""
        ids = list(dict.fromkeys(completion_ids))
        found: dict[str, tuple[str, str, bool]] = {}
        choice = "tool_choice" if self.version >= 8 else "NULL"
        for start in range(0, len(ids), 500):  # under SQLite's limit on bound parameters
            chunk = ids[start:start + 500]
            query = (f"SELECT id, model_name, model_version, {choice}, CASE WHEN {choice} IS NULL THEN '[]' ELSE "
                     f"messages END FROM interactions WHERE id IN ({','.join('?' * len(chunk))})")
            found.update({cid: (name, version, forced_answer(json.loads(tc) if tc else None, json.loads(messages)))
                          for cid, name, version, tc, messages in self.conn.execute(query, chunk)})
        return found

    def interaction_count(self, model_name: str | None = None) -> int:
        """The completions in the log (`model_name`'s only, if given)."""
        where, args = ("WHERE model_name = ?", (model_name,)) if model_name is not None else ("", ())
        return int(self.conn.execute(f"SELECT COUNT(*) FROM interactions {where}", args).fetchone()[0])

    def recent_messages(self, window: int, model_name: str | None = None) -> list[list[dict[str, Any]]]:
        """The request messages of the latest `window` completions (of `model_name`'s service, if given), newest first."""
        where, args = ("WHERE model_name = ?", (model_name,)) if model_name is not None else ("", ())
        rows = self.conn.execute(f"SELECT messages FROM interactions {where} ORDER BY created DESC LIMIT ?",
                                 (*args, window)).fetchall()
        return [json.loads(messages) for (messages,) in rows]
