"""The chat route around a family model's tokenizer, answering with a generation given as text.

The route, its plan and its reading of calls are the service's own (`serving.service`); only
the engine is replaced, by one that sends the given generation's token ids through the
decoding loops' `serving.decoding.Tokens`, so the route reads the text exactly as the
engine would have decoded it, special tokens included. A random-weight model writes no
call, and a trained one writes the calls it learned: scripting the ids is how a test
makes a model write an unforced Mistral call, or calls after a forced one.

`local_chat` serves the same route from the own decoding loop (`serving.engine.Engine`) in
this process instead, on a model given in memory: what a test of sampling settings needs
(a seed, top_p) without an engine process, a registry or a trained model.

Import `serving.service` only from tests/integration/serving (see its conftest): use
`scripted_chat` and `local_chat` inside a test function there.

    with scripted_chat(family_models("mistral")) as chat:
        chat.writes('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
        answer = chat.post(messages=..., tools=...)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ScriptedEngine:
    """Stands in for `serving.engine_process.EngineProcess`: each row generates `ids`, then eos.

    `completions` keeps what the route sent, so a test can read the sampling settings a
    request became. `scores` are what scoring answers (`tool_choice: required` ranks the
    functions by them), one per continuation; None: 0 for each, so the first function wins.
    """

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    completions: list = field(default_factory=list)
    scores: list[float] | None = None
    ends: bool = True  # False: the text's deltas come, then nothing (a model still generating)

    async def score(self, key: str, context: list[int], continuations: list[list[int]]) -> list[float]:
        return self.scores if self.scores is not None else [0.0] * len(continuations)

    async def submit(self, completion) -> None:
        from serving.decoding import LoadedModel, Row, Tokens

        self.completions.append(completion)
        row = Row(completion.id, completion.prompt_ids, completion.max_new, completion.temperature,
                  completion.top_p, completion.stops, completion.stream, LoadedModel(None, self.tokenizer, 2048))
        tokens = Tokens(self.tokenizer)
        for token in [*self.ids, self.tokenizer.eos_token_id]:
            if row.done:
                break
            tokens.add([row], [token])
        for _row, event in tokens.events:
            if self.ends or event[0] == "delta":
                completion.queue.put_nowait(event)

    def cancel(self, completion) -> None:
        """Nothing is generating: the events are all queued at once."""


class LocalEngine:
    """Stands in for `serving.engine_process.EngineProcess` with the own decoding loop in this
    process, generating on `loaded`."""

    def __init__(self, loaded) -> None:
        from serving.engine import Engine

        self.loaded = loaded
        self.completions: dict[int, Any] = {}
        self.rows: dict[int, Any] = {}
        self._ids = itertools.count()
        self.loop = Engine(self._emit, max_batch=4, join_ratio=0.5, join_after_steps=4)

    async def submit(self, completion) -> None:
        from serving.decoding import Row

        completion.id = next(self._ids)
        self.completions[completion.id] = completion
        self.rows[completion.id] = Row(completion.id, completion.prompt_ids, completion.max_new,
                                       completion.temperature, completion.top_p, completion.stops, completion.stream,
                                       self.loaded, seed=completion.seed)
        self.loop.submit(self.rows[completion.id])

    def cancel(self, completion) -> None:
        self.loop.cancel(self.rows[completion.id])

    async def score(self, key: str, context: list[int], continuations: list[list[int]]) -> list[float]:
        from serving.decoding import continuation_logps

        return continuation_logps(self.loaded, context, continuations)

    def _emit(self, events) -> None:
        for row, event in events:
            completion = self.completions[row.id]
            completion.loop.call_soon_threadsafe(completion.queue.put_nowait, event)

    def close(self) -> None:
        self.loop.close()
        self.loop.join(10)


@dataclass
class ScriptedModels:
    """Stands in for `serving.model_manager.ModelManager`: one model, always served."""

    served: Any
    engine: Any  # ScriptedEngine or LocalEngine

    def current(self):
        return self.served


class LogNothing:
    """Stands in for the interaction log: every row is "written" at once."""

    def log_later(self, item) -> Future:
        written: Future = Future()
        written.set_result(True)
        return written


@dataclass
class ScriptedChat:
    """The chat route over a test client, and what its model writes next (`writes`)."""

    client: Any
    engine: ScriptedEngine
    service: Any  # the route's service: a test may change its `limits`

    def writes(self, text: str) -> None:
        """The text every following completion generates (encoded without bos, as a model writes it)."""
        self.engine.ids = self.engine.tokenizer.encode(text, add_special_tokens=False)

    def post(self, **body) -> dict:
        """A non-streamed completion's JSON (asserting a 200)."""
        resp = self.client.post("/v1/chat/completions", json={"temperature": 0, "max_tokens": 256, **body})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def stream(self, **body) -> list[dict]:
        """A streamed completion's chunks, in order (without `[DONE]`)."""
        resp = self.client.post("/v1/chat/completions",
                                json={"temperature": 0, "max_tokens": 256, **body, "stream": True})
        assert resp.status_code == 200, resp.text
        data = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-1]
        return [json.loads(d) for d in data[:-1]]


@contextmanager
def scripted_chat(model_dir: Path, store: Any = None) -> Iterator[ScriptedChat]:
    """The service's chat route serving `model_dir`'s tokenizer and chat template, with a scripted
    engine, logging to `store` (a `tasks.feedback.FeedbackStore`; None: nothing is logged)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    engine = ScriptedEngine(tokenizer)
    with _chat_route(tokenizer, engine, store) as (client, service):
        yield ScriptedChat(client, engine, service)


@contextmanager
def local_chat(loaded) -> Iterator[Any]:
    """A test client of the service's chat route generating on `loaded` (a
    `serving.decoding.LoadedModel`) with the own decoding loop in this process."""
    engine = LocalEngine(loaded)
    try:
        with _chat_route(loaded.tokenizer, engine) as (client, _service):
            yield client
    finally:
        engine.close()


@contextmanager
def _chat_route(tokenizer, engine, store: Any = None) -> Iterator[tuple[Any, Any]]:
    """A test client of the service's routes, and the service it answers with, which serves
    `tokenizer`'s model through `engine`."""
    from starlette.testclient import TestClient

    import serving.service
    from serving.keys import RateLimiter
    from serving.model_manager import ServedModel
    from tasks.config import FeedbackParams, ServingParams

    service = object.__new__(serving.service.ChatService.inner)  # no registry, no engine process
    service.limits = ServingParams()
    service.model_name = "scripted"
    service.models = ScriptedModels(ServedModel("scripted", "1", "tests", "m1", tokenizer, 2048), engine)
    service.store = store if store is not None else LogNothing()
    service.feedback_limit = RateLimiter(FeedbackParams().per_key_per_minute, 60.0)
    serving.service.app.dependency_overrides[serving.service._service] = lambda: service
    try:
        with TestClient(serving.service.app) as client:
            yield client, service
    finally:
        serving.service.app.dependency_overrides.pop(serving.service._service, None)
