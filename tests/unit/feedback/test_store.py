"""The interaction log's background writes: batched, and never behind a read."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tasks.feedback import FeedbackStore, Interaction


def _item(i: int) -> Interaction:
    return Interaction(f"c{i}", "chat", "m", "1", [{"role": "user", "content": str(i)}], "a", "stop", 3, 1, 2.0)


class HeldWrites:
    """The store's writes held at a gate: the writer takes the first row and waits there, so
    the rows logged meanwhile queue up behind it as one batch. `batches`: the rows of each write tried."""

    def __init__(self, store: FeedbackStore, monkeypatch) -> None:
        self.entered, self.gate, self.batches = threading.Event(), threading.Event(), []
        insert = store._insert

        def held(rows):
            self.batches.append(len(rows))
            self.entered.set()
            self.gate.wait(5)
            insert(rows)

        monkeypatch.setattr(store, "_insert", held)


def _refuse_row(store: FeedbackStore, monkeypatch, completion_id: str) -> None:
    """The database refuses that completion's row (a value SQLite cannot bind)."""
    row = store._row
    monkeypatch.setattr(store, "_row", lambda item: (*row(item)[:-1], object()) if item.id == completion_id else row(item))


def test_rows_logged_later_are_written_together_and_readable_at_once(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "f.db")
    held = HeldWrites(store, monkeypatch)  # hold the first write, so the rows behind it queue up
    for i in range(50):
        store.log_later(_item(i))
    held.gate.set()
    assert store.has_interaction("c49")  # waits for the rows queued before it
    assert store.count("interactions") == 50
    assert len(held.batches) < 50 and sum(held.batches) == 50
    assert store.add_feedback("c7", 5) == 1
    store.close()


def test_closing_writes_what_is_queued(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    for i in range(20):
        store.log_later(_item(i))
    store.close()
    reopened = FeedbackStore(tmp_path / "f.db")
    assert reopened.count("interactions") == 20
    reopened.close()


def test_a_commit_is_on_disk_before_the_store_answers(tmp_path):
    """Feedback is acknowledged as stored: the log syncs every commit (synchronous FULL), not only checkpoints."""
    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def test_a_row_logged_later_is_on_disk_when_its_future_is_done(tmp_path):
    import sqlite3

    store = FeedbackStore(tmp_path / "f.db")
    try:
        assert store.log_later(_item(1)).result(10) is True
        with sqlite3.connect(tmp_path / "f.db") as other:  # no flush: another connection reads it
            assert other.execute("SELECT count(*) FROM interactions").fetchone()[0] == 1
    finally:
        store.close()


def test_a_refused_write_is_said_by_the_future_and_the_writer_goes_on(tmp_path, monkeypatch):
    import sqlite3

    store = FeedbackStore(tmp_path / "f.db")
    insert = store._insert

    def full_disk(rows):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_insert", full_disk)
    assert store.log_later(_item(1)).result(10) is False
    monkeypatch.setattr(store, "_insert", insert)
    assert store.log_later(_item(2)).result(10) is True
    assert store.count("interactions") == 1
    store.close()


def test_a_waiter_that_goes_away_stops_neither_the_writer_nor_its_row(tmp_path, monkeypatch):
    """A request cancelled while it waits (a client's disconnect) cancels its future: the row is
    still logged, and the writer goes on serving every later row."""
    store = FeedbackStore(tmp_path / "f.db")
    held = HeldWrites(store, monkeypatch)
    first = store.log_later(_item(1))
    assert held.entered.wait(5)  # the writer took it and waits at the gate
    gone = store.log_later(_item(2))
    assert gone.cancel()  # still queued: cancelled, as asyncio's wrap_future cancels it
    held.gate.set()
    assert first.result(10) is True
    assert store.log_later(_item(3)).result(10) is True  # the writer is alive
    assert store.has_interaction("c2") and store.count("interactions") == 3
    store.close()


def test_a_row_logged_after_close_is_refused_at_once(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    assert store.log_later(_item(1)).result(10) is True
    store.close()
    assert store.log_later(_item(2)).result(1) is False


def test_a_row_the_database_refuses_loses_only_itself_and_leaves_no_lock(tmp_path, monkeypatch):
    """The batch is written row by row where it fails; a failed write is rolled back, so another
    process (`ftllm feedback forget`) can write at once."""
    import sqlite3

    store = FeedbackStore(tmp_path / "f.db")
    _refuse_row(store, monkeypatch, "c2")
    held = HeldWrites(store, monkeypatch)
    first = store.log_later(_item(1))
    assert held.entered.wait(5)  # the next three queue up behind it: one batch
    written = [store.log_later(_item(i)) for i in (2, 3, 4)]
    held.gate.set()
    assert [f.result(10) for f in (first, *written)] == [True, False, True, True]
    assert store.count("interactions") == 3 and not store.has_interaction("c2")
    other = sqlite3.connect(tmp_path / "f.db", timeout=0.2)
    other.execute("BEGIN IMMEDIATE")  # the store holds no write lock
    other.rollback()
    other.close()
    store.close()


def test_text_utf8_cannot_hold_is_stored_replaced(tmp_path):
    """JSON allows a lone surrogate ("\\ud800") in a string; SQLite's UTF-8 does not."""
    store = FeedbackStore(tmp_path / "f.db")
    item = Interaction("c\ud800", "chat", "m", "1", [{"role": "user", "content": "x\ud800"}], "a\udfff", "stop", 3, 1,
                       2.0, end_user="\ud800")
    assert store.log_later(item).result(10) is True
    assert store.has_interaction("c\ud800") and store.add_feedback("c\ud800", 1, "fix\ud800", end_user="\ud800") == 1
    assert store.forget(end_user="\ud800", reason="request") == (1, 1)  # found as it was stored
    store.close()


def test_feedback_on_a_completion_erased_meanwhile_is_refused_not_orphaned(tmp_path):
    """`forget` in another process between the check that the completion exists and the insert
    would leave feedback on erased data: the check and the insert are one transaction."""
    import sqlite3

    store = FeedbackStore(tmp_path / "f.db")
    assert store.log_later(_item(1)).result(10) is True
    other = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("DELETE FROM interactions WHERE id = 'c1'")
    threading.Timer(0.5, other.commit).start()
    with pytest.raises(KeyError):
        store.add_feedback("c1", 1, "fix")
    assert other.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
    store.close()
    other.close()


def test_forget_lists_the_prompt_of_a_row_logged_while_it_waited(tmp_path):
    """An interaction another process logs while `forget` waits for the write lock is erased with
    its prompt on the erasure list, not erased unlisted (read before the lock, deleted after)."""
    import json
    import sqlite3

    from tasks.feedback.schema import prompt_digest

    store = FeedbackStore(tmp_path / "f.db")
    store.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "a"}], "x", "stop", 1, 1,
                                      1.0, end_user="ann"))
    late = [{"role": "user", "content": "asked meanwhile"}]
    other = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO interactions (id, created, endpoint, model_name, model_version, messages, answer, "
                  "finish_reason, prompt_tokens, completion_tokens, latency_ms, end_user) "
                  "VALUES ('c2', 1, 'chat', 'm', '1', ?, 'x', 'stop', 1, 1, 1.0, 'ann')", (json.dumps(late),))
    threading.Timer(0.5, other.commit).start()
    assert store.forget(end_user="ann", reason="request") == (2, 0)
    listed = {d for (d,) in other.execute("SELECT digest FROM erasures")}
    assert prompt_digest(late) in listed
    store.close()
    other.close()


def test_forgotten_rows_leave_no_copy_in_the_files_while_the_service_keeps_the_log_open(tmp_path):
    """The service holds the log open, so its write-ahead log is not removed: `forget` empties it,
    and erased rows are overwritten in the database file, not left in free pages."""
    service = FeedbackStore(tmp_path / "f.db")
    service.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "I am dave@corp.example.com"}],
                                        "Hello Dave.", "stop", 3, 2, 1.0, end_user="dave-4711"))
    service.add_feedback("c1", 1, "Hello, dave@corp.example.com.", end_user="dave-4711")
    for i in range(20):  # other users' rows share the pages
        service.log_interaction(_item(i + 2))
    cli = FeedbackStore(tmp_path / "f.db")
    assert cli.forget(end_user="dave-4711", reason="request") == (1, 1)
    cli.close()
    files = [f for f in tmp_path.iterdir() if f.name.startswith("f.db")]
    assert any(f.name == "f.db-wal" for f in files)  # still open by the service
    for f in files:
        data = f.read_bytes()
        assert b"dave" not in data and b"Dave" not in data, f.name
    assert service.has_interaction("c3")
    service.close()


def test_a_reader_that_keeps_forget_from_emptying_the_wal_holds_it_a_second_not_thirty(tmp_path, caplog):
    """Emptying the write-ahead log holds off every writer (the service's too) while it waits for
    readers: a reader on an old snapshot costs `forget` a bounded wait and a warning."""
    import sqlite3
    import time

    store = FeedbackStore(tmp_path / "f.db")
    store.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "a"}], "x", "stop", 1, 1,
                                      1.0, end_user="ann"))
    reader = sqlite3.connect(tmp_path / "f.db")
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM interactions").fetchone()  # holds this snapshot
    store.log_interaction(_item(2))  # a later frame the reader does not see
    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="ftllm.serving"):
        assert store.forget(end_user="ann", reason="request") == (1, 0)
    assert time.perf_counter() - started < 15  # the connection's own timeout is 30 s
    assert "could not be emptied" in caplog.text
    reader.rollback()
    reader.close()
    store.close()


def test_a_log_another_process_holds_is_waited_for(tmp_path):
    import sqlite3

    store = FeedbackStore(tmp_path / "f.db")
    store._conn.execute("PRAGMA busy_timeout = 100")  # the shipped 30 s, shortened
    other = sqlite3.connect(tmp_path / "f.db", check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.8, other.rollback).start()  # the other process lets go after several timeouts
    assert store.log_later(_item(1)).result(30) is True
    assert store.has_interaction("c1")
    store.close()
    other.close()


def test_a_new_log_another_process_is_writing_is_opened_once_it_lets_go(tmp_path):
    """Switching a new log to WAL mode meets a writer with "database is locked" at once,
    without SQLite's busy timeout: the service starting beside `ftllm feedback` lost its log so."""
    import sqlite3

    other = sqlite3.connect(tmp_path / "f.db", check_same_thread=False, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a process creating the log, before it switched to WAL
    threading.Timer(0.5, other.rollback).start()
    store = FeedbackStore(tmp_path / "f.db")
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.log_later(_item(1)).result(30) is True
    store.close()
    other.close()


def test_a_new_log_held_past_the_wait_is_an_error_that_says_so(tmp_path, monkeypatch):
    import sqlite3

    from tasks.errors import DataFileError
    from tasks.feedback import store as store_module

    real = store_module._use_wal
    monkeypatch.setattr(store_module, "_use_wal", lambda conn: real(conn, wait_s=0.2))
    other = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(DataFileError, match="kept the feedback log locked"):
        FeedbackStore(tmp_path / "f.db")
    other.rollback()
    other.close()


def test_a_log_held_past_every_retry_loses_the_batch_once_not_per_part(tmp_path, monkeypatch):
    import sqlite3

    import tasks.feedback.store

    monkeypatch.setattr(tasks.feedback.store, "BUSY_RETRIES", 1)
    store = FeedbackStore(tmp_path / "f.db")
    store._conn.execute("PRAGMA busy_timeout = 50")
    held = HeldWrites(store, monkeypatch)
    other = sqlite3.connect(tmp_path / "f.db")
    other.execute("BEGIN IMMEDIATE")  # held for good
    first = store.log_later(_item(0))
    assert held.entered.wait(5)
    batch = [store.log_later(_item(i)) for i in range(1, 9)]
    held.gate.set()
    assert [f.result(30) for f in (first, *batch)] == [False] * 9
    assert held.batches == [1, 8]  # the batch of 8 tried once, not split into parts that each wait again
    other.rollback()
    other.close()
    store.close()


def test_a_bad_row_in_a_large_batch_costs_a_few_commits(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "f.db")
    _refuse_row(store, monkeypatch, "c77")
    held = HeldWrites(store, monkeypatch)
    first = store.log_later(_item(0))
    assert held.entered.wait(5)
    batch = [store.log_later(_item(i)) for i in range(1, 129)]
    held.gate.set()
    assert [f.result(30) for f in batch].count(False) == 1 and first.result(30)
    assert len(held.batches) < 20 and store.count("interactions") == 128
    store.close()


@pytest.mark.parametrize("where", ["under a file", "a folder", "/proc"])
def test_a_log_that_cannot_be_opened_is_an_error_naming_it(tmp_path, where):
    """The service refuses to start with the path named, not an sqlite traceback: nothing is
    answered `"stored": true` that could not be stored (paths no user, root included, can use)."""
    from tasks.errors import DataFileError

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    path = {"under a file": tmp_path / "a-file" / "feedback.db", "a folder": tmp_path / "a-folder",
            "/proc": Path("/proc/ftllm-feedback.db")}[where]
    with pytest.raises(DataFileError, match=f"{path}: cannot open the feedback log"):
        FeedbackStore(path)


def _files(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def test_a_log_deleted_while_open_takes_later_rows_in_a_new_log_at_its_path(tmp_path):
    """A deleted feedback.db kept taking the service's rows, each answered as stored, into a file
    no one could read again; ids were then given a second time."""
    from tasks.feedback import FeedbackReader

    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    try:
        store.log_interaction(_item(0))
        assert store.add_feedback("c0", 5) == 1
        _files(db)
        store.log_later(_item(1)).result(timeout=10)  # the writer thread's batch, as the service logs
        assert store.add_feedback("c1", 2, "Better.") == 1  # the new log's first
        with pytest.raises(KeyError):  # the deleted log's completion is gone with it
            store.add_feedback("c0", 4)
    finally:
        store.close()
    with FeedbackReader(db) as reader:
        assert [(r.completion_id, r.rating, r.correction) for r in reader.feedback_since(0)] == [("c1", 2, "Better.")]
        assert reader.interaction_count() == 1 and len(reader.log_id()) == 32


def test_a_log_moved_over_the_open_one_is_the_one_written_not_read_through_the_old_ones_files(tmp_path):
    """Moved over the open log, a backup was read through the old log's write-ahead log and index,
    left at the path: the old log's rows showed, the backup's did not."""
    from tasks.feedback import FeedbackReader

    db, other = tmp_path / "feedback.db", tmp_path / "restored.db"
    store, restored = FeedbackStore(db), FeedbackStore(other)
    for i in (20, 21, 22):
        restored.log_interaction(_item(i))
    restored.close()
    try:
        for i in (0, 1, 2):
            store.log_interaction(_item(i))
        assert Path(f"{db}-wal").exists()  # the open log's rows are in its write-ahead log yet
        other.rename(db)  # a backup put in its place, as `mv` puts it
        assert store.add_feedback("c21", 3) == 1
        assert store.count("interactions") == 3
        store.log_interaction(_item(10))
    finally:
        store.close()
    with FeedbackReader(db) as reader:
        assert [r.completion_id for r in reader.feedback_since(0)] == ["c21"] and reader.interaction_count() == 4
    assert len(list(tmp_path.glob("feedback.db-wal.replaced-*"))) == 1  # the old log's last rows, set aside


def test_a_log_that_cannot_be_made_again_refuses_the_write(tmp_path):
    """Where the deleted log cannot be made again (its folder gone), the write is refused, never
    answered as stored into the deleted file."""
    from tasks.errors import DataFileError

    folder = tmp_path / "logs"
    store = FeedbackStore(folder / "feedback.db")
    try:
        store.log_interaction(_item(0))
        _files(folder / "feedback.db")
        folder.rmdir()
        folder.write_text("a file where the folder was")
        with pytest.raises(DataFileError, match="cannot open the feedback log"):
            store.add_feedback("c0", 5)
        assert store.log_later(_item(1)).result(timeout=10) is False  # logged as lost, the writer goes on
    finally:
        store.close()
