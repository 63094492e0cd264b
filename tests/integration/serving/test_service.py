"""The chat service in-process: OpenAI schema, streaming, limits, auth, feedback, hot reload."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

MODEL_NAME = "ftllm-chat-test"  # as in conftest.py

MESSAGES = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES, "temperature": 0, **body})


def assert_openai_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_chat_completion_follows_the_openai_schema(client):
    body = chat(client, max_tokens=8).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL_NAME
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_ends_with_length(client):
    body = chat(client, max_tokens=1, stop=None).json()
    # one token may be the end of turn at once; otherwise the cap is what stopped it
    assert body["usage"]["completion_tokens"] <= 1
    assert body["choices"][0]["finish_reason"] == ("length" if body["usage"]["completion_tokens"] else "stop")


def test_stream_sends_chunks_then_done_and_matches_the_plain_answer(client):
    plain = chat(client, max_tokens=12).json()["choices"][0]["message"]["content"]
    resp = chat(client, max_tokens=12, stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices) == plain
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_models_lists_the_served_version(client):
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == MODEL_NAME and data[0]["object"] == "model" and data[0]["version"] == "1"
    assert data[0]["source"] == f"bentoml:{MODEL_NAME}:v1"  # version 1 came from the BentoML store


def test_the_started_service_keeps_its_objects_out_of_full_collections(client):
    import gc

    # A full collection of everything BentoML, MLflow and the tokenizer hold took about
    # half a second on the 2-core machine, stalling every request in flight.
    assert gc.get_freeze_count() > 100_000


def test_generate_is_a_batchable_plain_completion(client):
    resp = client.post("/generate", json={"prompts": ["2001-02-03", "1999-12-31"]})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert isinstance(out, list) and len(out) == 2 and all(isinstance(t, str) for t in out)


def test_health_is_open_and_everything_else_needs_the_key(client, monkeypatch):
    monkeypatch.setenv("FTLLM_API_KEY", "s3cret")
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200
    assert_openai_error(chat(client, max_tokens=2), 401, "invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_error(client.post("/feedback", json={}), 401)
    assert_openai_error(client.post("/admin/reload"), 401)
    ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    monkeypatch.delenv("FTLLM_API_KEY")
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"messages": MESSAGES, "n": 2}, 400, "unsupported_value"),
        ({"messages": MESSAGES, "max_tokens": 10**9}, 400, "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}] * 65}, 400, "too_many_messages"),
        ({"messages": []}, 400, "invalid_value"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
        ({"messages": MESSAGES, "temperature": 7}, 400, "invalid_value"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
        # the types the schema documents, not what pydantic could coerce (OpenAI refuses these too)
        ({"messages": MESSAGES, "max_tokens": "4"}, 400, "invalid_value"),
        ({"messages": MESSAGES, "max_tokens": True}, 400, "invalid_value"),
        ({"messages": MESSAGES, "temperature": "0"}, 400, "invalid_value"),
        ({"messages": MESSAGES, "stream": "yes"}, 400, "invalid_value"),
        ([1, 2, 3], 400, "invalid_json"),
    ],
)
def test_bad_requests_get_openai_errors(client, body, status, code):
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, code)


@pytest.mark.parametrize(
    ("request_args", "param", "code"),
    [
        ({"json": {"prompts": [""]}}, "prompts.0", "invalid_value"),
        ({"json": {"prompts": "2001-02-03"}}, "prompts", "invalid_value"),
        ({"json": {}}, "prompts", "invalid_value"),
        ({"content": b'{"prompts": [', "headers": {"content-type": "application/json"}}, None, "invalid_json"),
    ],
)
def test_bad_generate_requests_get_openai_errors_too(client, request_args, param, code):
    """BentoML validates /generate itself; its error bodies are rewritten into the OpenAI shape."""
    error = assert_openai_error(client.post("/generate", **request_args), 400, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_unknown_paths_and_methods_get_openai_errors(client):
    unknown = assert_openai_error(client.get("/v1/completions-that-do-not-exist"), 404, "not_found")
    assert "GET /v1/completions-that-do-not-exist" in unknown["message"] and "/v1/chat/completions" in unknown["message"]
    assert "DELETE /v1/models" in assert_openai_error(client.delete("/v1/models"), 405, "method_not_allowed")["message"]
    responses = client.get("/docs.json").json()["paths"]["/generate"]["post"]["responses"]
    assert {status: answer["content"]["application/json"]["schema"] for status, answer in responses.items()
            if status != "200"} == {s: {"$ref": "#/components/schemas/ErrorResponse"}
                                    for s in ("400", "401", "403", "404", "413", "415", "429", "500")}


def test_malformed_json_and_oversized_bodies(client):
    assert_openai_error(client.post("/v1/chat/completions", content=b'{"messages": [',
                                    headers={"content-type": "application/json"}), 400, "invalid_json")
    huge = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_openai_error(client.post("/v1/chat/completions", json=huge), 413, "request_too_large")

    def chunks():  # no Content-Length: the guard counts the bytes as they come
        for _ in range(80):
            yield b"x" * 1024

    assert_openai_error(client.post("/v1/chat/completions", content=chunks()), 413, "request_too_large")


def test_a_body_not_declared_json_is_refused(client):
    """A web page the operator opens may post a form or text/plain to 127.0.0.1 with no CORS
    preflight (an application/json post it may not): such a request must not reach the model."""
    body = b'{"messages": [{"role": "user", "content": "2006-02-20"}]}'
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}, {}):
        refused = assert_openai_error(client.post("/v1/chat/completions", content=body, headers=headers), 415,
                                      "unsupported_media_type")
        assert "must be sent as application/json" in refused["message"]
    assert assert_openai_error(client.post("/feedback", content=b'{"id": "x", "rating": 5}',
                                           headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    ok = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_concurrency_cap_answers_429():
    import httpx

    from serving.guards import GuardMiddleware
    from tasks.config import ServingParams

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = GuardMiddleware(slow_app, load_limits=lambda: ServingParams(max_concurrency=2))

    async def scenario():
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            held = [asyncio.create_task(c.get("/v1/models")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await c.get("/v1/models")
            health = asyncio.create_task(c.get("/livez"))  # probes are never refused
            release.set()
            return refused, [r.status_code for r in await asyncio.gather(*held)], (await health).status_code

    refused, held, health = asyncio.run(scenario())
    assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert held == [200, 200] and health == 200


def test_feedback_is_stored_and_exported_as_training_data(client, serving_dir, capsys):
    from ftllm.commands.feedback import approve_command, export_command

    good = chat(client, max_tokens=8).json()
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "1987-06-05"}],
                                                    "max_tokens": 8, "temperature": 0}).json()
    meh = chat(client, max_tokens=8).json()
    assert client.post("/feedback", json={"id": good["id"], "rating": 5}).status_code == 200
    assert client.post("/feedback", json={"id": bad["id"], "rating": 1, "correction": "June 5, 1987"}).status_code == 200
    assert client.post("/feedback", json={"id": meh["id"], "rating": 2}).status_code == 200
    assert_openai_error(client.post("/feedback", json={"id": "chatcmpl-nope", "rating": 5}), 404, "not_found")
    assert_openai_error(client.post("/feedback", json={"id": good["id"], "rating": 9}), 400, "invalid_value")
    not_an_object = assert_openai_error(client.post("/feedback", json=[good["id"], 5]), 400, "invalid_json")
    assert "must be a JSON object" in not_an_object["message"] and "'None'" not in not_an_object["message"]

    out = serving_dir / "exported.jsonl"
    capsys.readouterr()
    assert export_command(out, 4) == 0
    assert "June 5, 1987" not in out.read_text()  # an open service's callers are untrusted: held for approval
    assert "left out: 3 held for approval" in capsys.readouterr().out  # the three rows, none approved yet
    assert approve_command(True, [], False, "test") == 0
    assert export_command(out, 4) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_prompt = {r["messages"][-2]["content"]: r["messages"] for r in rows}
    assert by_prompt["1987-06-05"][-1] == {"role": "assistant", "content": "June 5, 1987"}
    # The rating-5 answer is exported with its system message, the rating-2 one is not; the
    # 5-step model may answer only whitespace, which is no training example at all.
    answer = good["choices"][0]["message"]["content"]
    accepted = [r for r in rows if r["messages"][-2]["content"] == "2001-02-03"]
    assert [r["messages"] for r in accepted] == ([[*MESSAGES, {"role": "assistant", "content": answer}]]
                                                 if answer.strip() else [])
    assert export_command(serving_dir / "x.jsonl", 9) == 2


def test_feedback_the_log_cannot_store_is_a_503_that_says_nothing_was_stored(client, monkeypatch):
    """A damaged page or a full disk made every rating a 500 "Internal error: DatabaseError."."""
    import sqlite3

    from tasks.feedback import FeedbackStore

    answer = chat(client, max_tokens=4).json()

    def damaged(*_args, **_kwargs):
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(FeedbackStore, "add_feedback", damaged)
    error = assert_openai_error(client.post("/feedback", json={"id": answer["id"], "rating": 1}), 503, "feedback_not_stored")
    assert "database disk image is malformed" in error["message"] and "nothing was stored" in error["message"]


def test_champion_moves_are_picked_up_by_reload_and_by_polling(client, registry):
    registry.set_registered_model_alias(MODEL_NAME, "champion", "2")
    resp = client.post("/admin/reload")
    assert resp.status_code == 200, resp.text
    assert resp.json()["version"] == "2"  # (the poller may have swapped first: then reloaded is false)
    model = client.get("/v1/models").json()["data"][0]
    assert model["version"] == "2" and model["source"] == f"mlflow:models:/{MODEL_NAME}/2"
    assert chat(client, max_tokens=4).json()["system_fingerprint"] == "v2"

    registry.set_registered_model_alias(MODEL_NAME, "champion", "1")  # a rollback, seen by the poller
    deadline = time.time() + 30
    while client.get("/v1/models").json()["data"][0]["version"] != "1":
        assert time.time() < deadline, "the poller did not pick up the rollback within 30 s"
        time.sleep(0.3)
    assert chat(client, max_tokens=4).status_code == 200


def test_concurrent_requests_are_batched_and_answer_as_alone(client):
    from concurrent.futures import ThreadPoolExecutor

    from serving.service import BATCH_SIZE

    def batches() -> tuple[float, float, float]:
        """Decoding steps, their rows, and the steps of at most serving.max_batch (4 here) rows."""
        samples = {(s.name, s.labels.get("le")): s.value for m in BATCH_SIZE.collect() for s in m.samples}
        return (samples["ftllm_batch_size_count", None], samples["ftllm_batch_size_sum", None],
                samples["ftllm_batch_size_bucket", "4.0"])

    alone = chat(client, max_tokens=8).json()["choices"][0]["message"]["content"]
    count0, rows0, small0 = batches()
    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda _: chat(client, max_tokens=8), range(12)))
    assert [b.status_code for b in bodies] == [200] * 12
    assert {b.json()["choices"][0]["message"]["content"] for b in bodies} == {alone}  # left padding is exact
    count1, rows1, small1 = batches()
    assert (rows1 - rows0) / (count1 - count0) > 1  # decoding steps carried several requests at once
    assert small1 - small0 == count1 - count0  # and never more than serving.max_batch


def test_a_dead_engine_is_restarted_and_meanwhile_requests_get_503(client):
    """The generation engine is a process of its own: if it dies, requests are refused with
    a 503 (not hung), /readyz says not ready, and the service starts a new one."""
    import psutil

    def engines() -> list[psutil.Process]:
        return [p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())]

    (engine,) = engines()
    engine.kill()
    engine.wait(10)
    statuses = set()
    deadline = time.time() + 60
    while True:
        resp = chat(client, max_tokens=4)
        statuses.add(resp.status_code)
        if resp.status_code == 200 and client.get("/readyz").status_code == 200:
            break
        assert_openai_error(resp, 503, "generation_failed")
        assert time.time() < deadline, "no new engine within 60 s"
        time.sleep(0.2)
    assert 503 in statuses  # a new engine needs seconds to start and load the model
    (restarted,) = engines()
    assert restarted.pid != engine.pid
    assert client.get("/v1/models").json()["data"][0]["version"] in {"1", "2"}
