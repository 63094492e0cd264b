"""An answer reaches the client only once its interaction is on disk: a client that holds an
answer can rate it, even if the service is killed the moment after (`FeedbackStore.log_later`
is a group commit the route waits for).

The route is the service's own over a scripted engine (`tests.support.scripted_service`),
logging to a real feedback log whose writes are slowed down, so an answer sent before its
write would be seen here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from tasks.feedback import FeedbackStore
from tests.support.scripted_service import scripted_chat

ASK = {"role": "user", "content": "What is the weather in Oslo?"}


class SlowLog(FeedbackStore):
    """The feedback log, each write of the writer thread taking `delay` seconds (half a second)."""

    delay = 0.5

    def __init__(self, path) -> None:
        super().__init__(path)
        self.written = threading.Event()

    def _insert(self, rows: list[tuple]) -> None:
        time.sleep(self.delay)
        super()._insert(rows)
        self.written.set()


def on_disk(path, completion_id: str) -> bool:
    """Whether another connection (another process, after a kill) reads the interaction."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT 1 FROM interactions WHERE id = ?", (completion_id,)).fetchone() is not None


@pytest.fixture
def chat(family_models, tmp_path):
    store = SlowLog(tmp_path / "feedback.db")
    try:
        with scripted_chat(family_models("qwen2.5"), store) as scripted:
            scripted.writes("It is 12 degrees.")
            yield scripted, store
    finally:
        store.close()


def test_a_completion_is_on_disk_when_its_answer_arrives(chat):
    scripted, store = chat
    answer = scripted.post(messages=[ASK])
    assert store.written.is_set()
    assert on_disk(store.path, answer["id"])


def test_a_stream_sends_its_finish_reason_once_the_completion_is_on_disk(chat):
    scripted, store = chat
    with scripted.client.stream("POST", "/v1/chat/completions",
                                json={"messages": [ASK], "max_tokens": 16, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and chunk["choices"][0]["finish_reason"] is not None:
                # checked as the chunk arrives, before the rest of the stream is read
                assert store.written.is_set(), "the finish reason was sent before the completion was logged"
                assert on_disk(store.path, chunk["id"])
                break
        else:
            pytest.fail("no chunk with a finish reason")


def test_a_busy_log_delays_an_answer_only_so_long_and_the_row_is_written_after(chat, monkeypatch):
    """Another process holding the log's lock (`ftllm feedback forget`) must not hold answers up:
    after serving.service.LOG_WAIT_S the answer goes out, and the row is written when it can be."""
    import serving.service

    scripted, store = chat
    monkeypatch.setattr(serving.service, "LOG_WAIT_S", 0.1)
    store.delay = 3.0  # far longer than the wait, so the answer arrives before the write however busy the machine
    answer = scripted.post(messages=[ASK])
    assert not store.written.is_set()  # answered while the write still went on
    assert store.has_interaction(answer["id"])  # waits for the write


async def _leave_after(app, body: dict, chunks: int) -> list[dict]:
    """Post a streamed request to the ASGI `app`, read `chunks` chunks, then leave, as a client's
    "stop generating" closes the connection; the chunks read."""
    import asyncio

    read, left, asked = [], asyncio.Event(), False

    async def receive() -> dict:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body":
            read.extend(json.loads(line[6:]) for line in message.get("body", b"").decode().splitlines()
                        if line.startswith("data: {"))
            if len(read) >= chunks:
                left.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "root_path": ""}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return read


def test_a_stream_the_client_stops_is_logged_as_it_stood_and_can_be_rated(family_models, tmp_path):
    """A thumbs-down after "stop generating" is the common case: the client has the id from the
    first chunk, so the answer it saw is logged when it leaves (it was logged only at the end)."""
    import asyncio

    import serving.service

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        with scripted_chat(family_models("qwen2.5"), store) as scripted:
            text = "It is 12 degrees and rain in Oslo, and it will stay so all week."
            scripted.writes(text)
            scripted.engine.ends = False  # still generating when the client leaves
            read = asyncio.run(_leave_after(serving.service.app, {"messages": [ASK], "max_tokens": 64,
                                                                  "stream": True, "temperature": 0}, 4))
            cid = read[0]["id"]
            assert store.has_interaction(cid)
            [(finish, answer)] = store._conn.execute(
                "SELECT finish_reason, answer FROM interactions WHERE id = ?", (cid,)).fetchall()
            assert finish == "client_stopped" and answer and text.startswith(answer)  # what it generated
            rated = scripted.client.post("/feedback", json={"id": cid, "rating": 1})
            assert rated.status_code == 200, rated.text
            # store: false still means nothing is logged
            read = asyncio.run(_leave_after(serving.service.app, {"messages": [ASK], "max_tokens": 64,
                                                                  "stream": True, "store": False}, 4))
            assert not store.has_interaction(read[0]["id"])
    finally:
        store.close()


def test_a_stream_whose_generation_fails_logs_nothing_to_rate(family_models, tmp_path):
    """An engine that cannot take the row sends an error event, not an answer: nothing was
    shown, so nothing is logged as a stopped answer."""
    from serving.engine_process import EngineError

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        with scripted_chat(family_models("qwen2.5"), store) as scripted:
            async def refuse(completion) -> None:
                raise EngineError("the engine process is not running")

            scripted.engine.submit = refuse
            chunks = scripted.client.post("/v1/chat/completions", json={"messages": [ASK], "max_tokens": 8,
                                                                        "stream": True}).text
            assert "generation_failed" in chunks
            assert store.count("interactions") == 0
    finally:
        store.close()


def test_a_stopped_answers_token_count_is_what_it_generated(family_models, tmp_path):
    import asyncio

    import serving.service

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        with scripted_chat(family_models("qwen2.5"), store) as scripted:
            scripted.writes("It is 12 degrees and rain in Oslo.")
            scripted.engine.ends = False
            read = asyncio.run(_leave_after(serving.service.app, {"messages": [ASK], "stream": True}, 3))
            assert store.has_interaction(read[0]["id"])
            [(answer, tokens)] = store._conn.execute("SELECT answer, completion_tokens FROM interactions").fetchall()
            assert tokens == len(scripted.engine.tokenizer.encode(answer, add_special_tokens=False)) > 0
    finally:
        store.close()
