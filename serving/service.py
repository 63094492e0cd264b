"""The BentoML service: an OpenAI-compatible chat API for the `champion` model.

Endpoints (all but `/livez` and `/readyz` need `Authorization: Bearer $FTLLM_API_KEY`
when that variable is set):

- `POST /v1/chat/completions`: OpenAI chat schema, with `stream: true` (SSE
  `chat.completion.chunk`s, then `data: [DONE]`); `n` must be 1 (else 400).
- `GET /v1/models`: the served model id and its registry version.
- `POST /generate`: plain prompt completion, `{"prompts": [...]}` → list of texts
  (BentoML adaptive batching).
- `POST /feedback`: `{"id": <completion id>, "rating": 1..5, "correction": str?}`.
- `POST /admin/reload`: look up `champion` in the registry now and swap if it moved.
- `/livez`, `/readyz`, `/metrics` come with BentoML; `/metrics` adds
  `ftllm_generated_tokens_total`, `ftllm_request_latency_seconds` and `ftllm_model_info`,
  each labelled with the model version.
- `/docs.json` (BentoML's OpenAPI description) documents every route's request body,
  answer and error statuses; `tests/serving/test_fuzz.py` fuzzes the service from it.

Every refusal has OpenAI's error body, `{"error": {message, type, param, code}}`, also
those that BentoML (`/generate`'s input validation) and Starlette (unknown paths) write.

Every completion goes through one micro-batcher: requests that arrive while a batch
generates are collected (up to `MAX_BATCH` rows, waiting at most `BATCH_WAIT_S` for each
next row and `BATCH_MAX_WAIT_S` in all) and run as a single left-padded `generate`, streaming each row's tokens to
its own client. On a CPU or a GPU this is what makes 16 concurrent clients several times
faster than one.

The model is loaded once at start-up: the registry's `champion` version (from the BentoML
store when imported there as `<name>:v<version>`, else downloaded from MLflow), or, where
no registry is reachable (e.g. in a container), the model packaged in the bento. A
background thread polls the registry every `serving.reload_seconds`; a new champion is
loaded fully, then swapped in under a lock, so requests in flight finish on the old one.

Serve from the project root (`ftllm serve` does this, binding 127.0.0.1):

    bentoml serve serving.service:ChatService --host 127.0.0.1 --port 3000
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

from ftllm.env import apply_defaults, find_root

# BentoML and MLflow read their homes when first imported: set the defaults before.
ROOT = apply_defaults(find_root(Path(__file__).resolve().parent.parent))

import bentoml  # noqa: E402
import prometheus_client  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator  # noqa: E402

from serving.feedback import FeedbackStore, Interaction, default_db_path  # noqa: E402
from tasks.config import Params, ServingParams, load_params  # noqa: E402

log = logging.getLogger("ftllm.serving")

API_KEY_ENV = "FTLLM_API_KEY"
PARAMS_ENV = "FTLLM_PARAMS"
BENTO_MODEL_ENV = "FTLLM_BENTO_MODEL"
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
MAX_BATCH = 32  # rows per generate; more concurrent requests wait for the next batch
BATCH_WAIT_S = 0.004  # a batch waits this long for one more row...
BATCH_MAX_WAIT_S = 0.030  # ...and this long in all
GENERATE_MAX_TOKENS = 64  # new tokens per /generate prompt (capped by serving.max_tokens)
# Below this temperature sampling picks what greedy decoding picks, and near 1e-308 the scaled
# logits overflow to inf and generation fails: such requests decode greedily (as vLLM does).
MIN_SAMPLING_TEMPERATURE = 1e-5


SERVICE_SECTIONS = ("registry", "serving")


def load_settings() -> Params:
    """The settings the service reads (`registry`, `serving`): from `FTLLM_PARAMS` if set,
    else `<root>/params.yaml`, else the defaults.

    Only those sections are validated. A bento carries the code it was built with, and
    `ftllm serve` runs it against the project's current params.yaml: settings of the
    pipeline that this code does not know (added after the bento was built) must not stop
    it from starting.
    """
    path = Path(os.environ.get(PARAMS_ENV) or ROOT / "params.yaml")
    return load_params(path, sections=SERVICE_SECTIONS) if path.is_file() else Params()


# The model the bento carries is chosen at import, because BentoML collects the models a
# service declares when it builds the bento; `tasks.package.build_bento` sets the env var.
_MODEL_NAME = load_settings().registry.model_name
BENTO_MODEL_TAG = os.environ.get(BENTO_MODEL_ENV) or f"{_MODEL_NAME}:latest"

# Prometheus metrics are process-wide by nature; BentoML serves prometheus_client's registry
# (in multiprocess mode under `bentoml serve`) at /metrics.
GENERATED_TOKENS = prometheus_client.Counter(
    name="ftllm_generated_tokens",
    documentation="Completion tokens generated",
    labelnames=["endpoint", "model_version"],
)
REQUEST_LATENCY = prometheus_client.Histogram(
    name="ftllm_request_latency_seconds",
    documentation="Time from request to last token",
    labelnames=["endpoint", "model_version"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BATCH_SIZE = prometheus_client.Histogram(
    name="ftllm_batch_size",
    documentation="Rows per generate call of the micro-batcher",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
MODEL_INFO = prometheus_client.Gauge(
    name="ftllm_model_info",
    documentation="1 for the model version being served",
    labelnames=["model_name", "model_version"],
    multiprocess_mode="livemax",
)


# ---------------------------------------------------------------------------------------
# Errors in the OpenAI shape
# ---------------------------------------------------------------------------------------


class APIError(Exception):
    """A request the service refuses, rendered as `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers={"WWW-Authenticate": "Bearer"} if self.status == 401 else None)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_from(status: int, body: bytes) -> dict | None:
    """`body` of an error response in the OpenAI shape; None when it already is in it.

    For the answers the service's own routes do not write: BentoML's for `/generate`
    (`{"error": "1 validation error for Input", "detail": [pydantic errors]}`, or
    `[{"error": ...}]` for an exception it maps to a 4xx), and Starlette's plain-text 404
    and 405 for unknown paths and methods.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = body.decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    param, code = None, {404: "not_found", 405: "method_not_allowed"}.get(status)
    if isinstance(data, dict):
        details = data.get("detail")
        message = str(data.get("error") or details or HTTPStatus(status).phrase)
        if isinstance(details, list) and details and isinstance(details[0], dict):
            first = details[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
            message = f"Invalid value for '{param}': {first.get('msg')}." if param else f"{first.get('msg')}."
    else:
        message = str(data) or HTTPStatus(status).phrase
    return error_body(message, _error_type(status), param, code)


class _RewritingSend:
    """An ASGI `send` that holds an answer whose status `wanted` picks until its body is
    complete, then sends `rewrite(status, body)` as JSON instead (or the answer as it was,
    when that is None)."""

    def __init__(self, send, wanted, rewrite) -> None:
        self.send, self.wanted, self.rewrite, self.start, self.chunks = send, wanted, rewrite, None, []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start" and self.wanted(message["status"]):
            self.start = message
            return None
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        status, body = self.start["status"], b"".join(self.chunks)
        rewritten = self.rewrite(status, body)
        if rewritten is None:
            await self.send(self.start)
            return await self.send({"type": "http.response.body", "body": body})
        kept = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        return await _send_json(self.send, status, rewritten, kept)


BENTOML_ERRORS = {"#/components/schemas/InvalidArgument", "#/components/schemas/NotFound",
                  "#/components/schemas/InternalServerError"}


def patch_openapi(document: dict) -> dict:
    """BentoML's /docs.json, saying what the service really answers with.

    Every route but the health probes answers errors in the OpenAI shape (`GuardMiddleware`
    rewrites BentoML's), may answer 401 and 429 (`GuardMiddleware`), and 413 for a POST.
    """
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in document.get("paths", {}).items():
        if path in HEALTH_PATHS:
            continue
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for answer in responses.values():
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") in BENTOML_ERRORS:
                    answer["content"] = error
            for status in (401, 429, 413) if method == "post" else (401, 429):
                responses.setdefault(str(status), {"description": HTTPStatus(status).phrase, "content": error})
    return document


class GuardMiddleware:
    """Authentication, body size and concurrency caps, before any route runs; OpenAI-style
    errors after it.

    Health probes pass untouched. Bodies are read here (they are small: at most
    `serving.max_request_bytes`) so that an oversized one gets a 413 even when it comes
    without a Content-Length. Error answers written by BentoML (`/generate`'s validation)
    or Starlette (unknown paths) are rewritten into the OpenAI shape, and /docs.json says so.
    """

    def __init__(self, app) -> None:
        limits = load_settings().serving  # read when the ASGI app is built, not at import
        self.app = app
        self.max_bytes = limits.max_request_bytes
        self.max_concurrency = limits.max_concurrency
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        api_key = os.environ.get(API_KEY_ENV)  # read per request, so a rotated key needs no restart
        if api_key:
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return await _send_json(send, 401, error_body(
                    "Missing or wrong API key: send 'Authorization: Bearer <FTLLM_API_KEY>'.",
                    "authentication_error", None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        if self.in_flight >= self.max_concurrency:
            return await _send_json(send, 429, error_body(
                f"Too many requests at once (serving.max_concurrency={self.max_concurrency}); retry shortly.",
                "rate_limit_error", None, "rate_limit_exceeded"), [(b"retry-after", b"1")])
        if scope["path"] == "/docs.json":
            send = _RewritingSend(send, lambda status: status == 200, lambda _, body: patch_openapi(json.loads(body)))
        elif scope["method"] != "HEAD":
            send = _RewritingSend(send, lambda status: status >= 400, openai_error_from)
        self.in_flight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffered(headers, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _buffered(self, headers, receive, send):
        too_big = error_body(f"Request body over serving.max_request_bytes ({self.max_bytes} bytes).",
                             "invalid_request_error", None, "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, too_big)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _send_json(send, 413, too_big)
                return None
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect

        return replay


# ---------------------------------------------------------------------------------------
# Request schemas (OpenAI chat completions)
# ---------------------------------------------------------------------------------------


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request the service honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    rating: int = Field(ge=1, le=5)
    correction: str | None = Field(None, min_length=1)

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # The feedback store refuses a blank correction too; refused here, it is a 400.
        if value is not None and not value.strip():
            raise ValueError("must not be blank; leave it out to rate the answer as it is")
        return value


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")


async def _read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    # ValueError covers bad JSON and bad UTF-8, and also an integer of over 4,300 digits;
    # RecursionError is a body nested deeper than the parser recurses, `[[[...` (both fit
    # in serving.max_request_bytes).
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None


# ---------------------------------------------------------------------------------------
# The OpenAPI description (BentoML serves it at /docs.json, with its own /generate)
# ---------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """The answer of `POST /v1/chat/completions` without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    version: str
    source: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackStored(BaseModel):
    id: int
    completion_id: str
    rating: int
    stored: Literal[True]


class ReloadResult(BaseModel):
    reloaded: bool
    version: str
    previous: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every refusal: an OpenAI-style error body."""

    error: ErrorDetail


def _json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` that documents `model` as a route's JSON body.

    The routes parse their bodies themselves, to answer with OpenAI-style errors rather than
    FastAPI's 422, so FastAPI does not see the model. Its schema goes in with its `$defs`
    inlined, since BentoML's /docs.json takes the routes' components only from their responses.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


# One server-sent event of a streamed completion (before OpenAPI 3.2, a stream's `schema`
# describes each event).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": (
        "A chat.completion.chunk as JSON; an OpenAI-style error as JSON if generation fails; "
        "then `[DONE]`.")}},
}


def _responses(ok: type[BaseModel], *errors: int, streams: bool = False) -> dict:
    """FastAPI `responses` for a route: `ok` on 200, and an `ErrorResponse` for each of `errors`.

    401 (a wrong key) and 429 (over serving.max_concurrency) come from `GuardMiddleware`, for
    every route; 413 (over serving.max_request_bytes) for every POST.
    """
    documented: dict[int | str, dict] = {200: {"model": ok}}
    if streams:
        documented[200]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    for status in sorted({*errors, 401, 429}):
        documented[status] = {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
    return documented


# ---------------------------------------------------------------------------------------
# The model, and the micro-batcher that runs it
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model ready to generate, with where it came from."""

    model: Any
    tokenizer: Any
    name: str
    version: str
    source: str
    context_length: int
    loaded_at: float = field(default_factory=time.time)


def load_model_dir(model_dir: Path, name: str, version: str, source: str) -> LoadedModel:
    """Load a model folder written by `tasks.finetune` (safetensors only, no remote code)."""
    from tasks.modeling import load_trained

    model, tokenizer, _info = load_trained(Path(model_dir))
    if hasattr(model, "merge_and_unload"):
        # Serving never trains: folding the LoRA weights into the base saves the adapter's
        # extra matmuls on every token (about half the time of a small model's step).
        model = model.merge_and_unload()
        model.eval()
    tokenizer.padding_side = "left"  # a batch's prompts must end where generation starts
    context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return LoadedModel(model, tokenizer, name, version, source, context)


@dataclass(eq=False)
class Row:
    """One completion being generated inside a batch; its events go to `queue`.

    Events: ("delta", text), then ("end", finish_reason, completion_tokens) or ("error", message).
    """

    prompt: str
    prompt_ids: list[int]
    encoded_by: Any  # the tokenizer that made prompt_ids (a hot swap may bring another)
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False
    finish: str = "length"
    prompt_tokens: int = 0
    version: str = ""

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class _RowStreamer:
    """Receives each generation step's tokens (one per row) and streams text to each row."""

    def __init__(self, rows: list[Row], tokenizer) -> None:
        self.rows, self.tok, self.first = rows, tokenizer, True
        self.eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}

    def put(self, value) -> None:
        if self.first:  # generate hands over the prompt first
            self.first = False
            return
        for row, token in zip(self.rows, value.tolist()):
            if row.done:
                continue
            if token in self.eos:
                row.done, row.finish = True, "stop"
                self._flush(row, self.tok.decode(row.ids, skip_special_tokens=True))
                continue
            row.ids.append(token)
            text = self.tok.decode(row.ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
            if cut >= 0:
                row.done, row.finish, text = True, "stop", text[:cut]
            elif len(row.ids) >= row.max_new:
                row.done, row.finish = True, "length"
            self._flush(row, text)

    def _flush(self, row: Row, text: str) -> None:
        end = len(text)
        if not row.done:
            # Hold back what could be the start of a stop string or half a UTF-8 character.
            end -= max((len(s) - 1 for s in row.stops), default=0)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end > row.emitted:
            row.emit("delta", text[row.emitted:end])
            row.emitted = end

    def end(self) -> None:
        pass


def _rows_done_criteria(rows: list[Row]):
    import torch
    from transformers import StoppingCriteria

    class RowsDone(StoppingCriteria):
        # Per-row stop (length, stop string, client gone), so short answers free the batch.
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([r.done for r in rows], device=input_ids.device)

    return RowsDone()


def cpu_threads() -> int:
    """Intra-op threads for CPU generation: `FTLLM_TORCH_THREADS`, else half the cores.

    The service's event loop, tokenization and HTTP stack need a core of their own: with
    every core given to torch, its spinning worker threads compete with them, and on two
    cores one step of the tiny model went from 7 ms to 180 ms.
    """
    return int(os.environ.get("FTLLM_TORCH_THREADS") or max(1, (os.cpu_count() or 2) // 2))


def generate_rows(loaded: LoadedModel, rows: list[Row]) -> None:
    """Run one left-padded `generate` for rows that share sampling settings (in a worker thread)."""
    import torch
    from transformers import StoppingCriteriaList

    if torch.get_num_threads() != cpu_threads():
        torch.set_num_threads(cpu_threads())

    tok, model = loaded.tokenizer, loaded.model
    for row in rows:
        row.version = loaded.version
    try:
        # Left padding by hand: calling the tokenizer with padding=True changes the state of
        # the (shared, Rust) tokenizer, a race with the event loop encoding the next prompts.
        for row in rows:
            if row.encoded_by is not tok:
                row.prompt_ids = tok.encode(row.prompt, add_special_tokens=False)
            row.prompt_tokens = len(row.prompt_ids)
        width = max(row.prompt_tokens for row in rows)
        input_ids = torch.tensor([[tok.pad_token_id] * (width - r.prompt_tokens) + r.prompt_ids for r in rows])
        attention = torch.tensor([[0] * (width - r.prompt_tokens) + [1] * r.prompt_tokens for r in rows])
        device = next(model.parameters()).device
        sample = rows[0].temperature > 0
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                do_sample=sample,
                temperature=rows[0].temperature if sample else None,
                top_p=rows[0].top_p if sample else None,
                top_k=None,
                max_new_tokens=max(r.max_new for r in rows),
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                streamer=_RowStreamer(rows, tok),
                stopping_criteria=StoppingCriteriaList([_rows_done_criteria(rows)]),
            )
    except Exception as exc:  # a failed batch must answer its clients, not hang them
        log.exception("generation failed")
        for row in rows:
            row.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
        return
    for row in rows:
        row.emit("end", row.finish, len(row.ids))


class MicroBatcher:
    """Collects rows from concurrent requests and generates them together.

    One worker task per event loop takes the first waiting row, collects more (up to
    `max_batch`, `wait_s` for each, `max_wait_s` in all), and runs the batch in a single
    generation thread; rows that arrive meanwhile make up the next batch. Rows are grouped by sampling settings, since
    one `generate` call has one temperature and top_p.
    """

    def __init__(self, current, max_batch: int = MAX_BATCH, wait_s: float = BATCH_WAIT_S,
                 max_wait_s: float = BATCH_MAX_WAIT_S) -> None:
        self.current = current  # callable returning the LoadedModel to use for the next batch
        self.max_batch, self.wait_s, self.max_wait_s = max_batch, wait_s, max_wait_s
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ftllm-generate")
        self.pending: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def submit(self, row: Row) -> None:
        if self.pending is None or self.worker is None or self.worker.done():
            self.pending = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        self.pending.put_nowait(row)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.pending.get()]
            # Keep collecting while rows keep coming (each within `wait_s` of the last), up
            # to `max_wait_s` in all: under load the clients answered by the previous batch
            # come back one by one, and a fuller batch costs little more than a small one.
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                timeout = min(self.wait_s, deadline - loop.time())
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.pending.get(), timeout))
                except TimeoutError:
                    break
            batch = [r for r in batch if not r.done]  # clients that left while waiting
            groups: dict[tuple, list[Row]] = {}
            for row in batch:
                key = (row.temperature, row.top_p) if row.temperature > 0 else (0.0, 1.0)
                groups.setdefault(key, []).append(row)
            for rows in groups.values():
                BATCH_SIZE.observe(len(rows))
                await loop.run_in_executor(self.executor, generate_rows, self.current(), rows)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------
# The registry: which version is champion, and where its files are
# ---------------------------------------------------------------------------------------


def _registry_reachable() -> bool:
    """False where the tracking URI is a SQLite file that does not exist (MLflow would create it)."""
    uri = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return bool(uri)


def champion_version(model_name: str) -> str | None:
    """The registry version behind the `champion` alias, or None where there is none."""
    if not _registry_reachable():
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion").version)
    except MlflowException as exc:
        log.info("no champion for %s in the registry (%s)", model_name, exc)
        return None


def load_version(model_name: str, version: str) -> LoadedModel:
    """Load a registry version: from the BentoML store if imported there, else from MLflow's artifacts."""
    from bentoml.exceptions import NotFound

    tag = f"{model_name}:v{version}"
    try:
        stored = bentoml.models.get(tag)
        return load_model_dir(Path(stored.path), model_name, version, f"bentoml:{tag}")
    except NotFound:
        pass
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="ftllm-serve-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(tmp)))
        model_dir = local / "artifacts" / "model_dir"
        if not (model_dir / "ftllm_model.json").is_file():
            found = sorted(local.rglob("ftllm_model.json"))
            if not found:
                raise FileNotFoundError(f"models:/{model_name}/{version} holds no ftllm_model.json under artifacts/model_dir")
            model_dir = found[0].parent
        # The whole model is in memory once loaded, so the download can go.
        return load_model_dir(model_dir, model_name, version, f"mlflow:models:/{model_name}/{version}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------

app = FastAPI(title="ftllm chat", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(Exception)
async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    return JSONResponse(error_body(f"Internal error: {type(exc).__name__}.", "server_error"), status_code=500)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="ftllm_chat", workers=1, traffic={"timeout": 600})
class ChatService:
    """Serves the champion model behind an OpenAI-compatible API (see the module docstring)."""

    bento_model = bentoml.models.BentoModel(BENTO_MODEL_TAG)

    def __init__(self) -> None:
        params = load_settings()
        self.limits: ServingParams = params.serving
        self.model_name = params.registry.model_name
        self._swap_lock = threading.Lock()  # guards the reference to the current model
        self._reload_lock = threading.Lock()  # one load at a time (poller and /admin/reload)
        self._current = self._initial_model()
        MODEL_INFO.labels(model_name=self.model_name, model_version=self._current.version).set(1)
        self.batcher = MicroBatcher(self.current)
        self.store = FeedbackStore(default_db_path(ROOT))
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_registry, name="ftllm-registry-poll", daemon=True)
        self._poller.start()

    # -- model lifecycle ----------------------------------------------------------------

    def _initial_model(self) -> LoadedModel:
        version = champion_version(self.model_name)
        if version is not None:
            return load_version(self.model_name, version)
        stored = type(self).bento_model.stored
        if stored is None:
            raise RuntimeError(
                f"No model to serve: the registry has no 'champion' for {self.model_name!r} and the BentoML "
                f"store has no {BENTO_MODEL_TAG!r}. Run `ftllm run` (or `ftllm promote VERSION`) first."
            )
        version = stored.info.labels.get("version") or str(stored.tag.version).removeprefix("v")
        return load_model_dir(Path(stored.path), stored.tag.name, version, f"bentoml:{stored.tag}")

    def current(self) -> LoadedModel:
        with self._swap_lock:
            return self._current

    def reload(self) -> dict[str, Any]:
        """Load the registry's champion if it differs from the served version, then swap it in."""
        with self._reload_lock:
            previous = self.current()
            version = champion_version(self.model_name)
            if version is None or version == previous.version:
                return {"reloaded": False, "version": previous.version, "previous": previous.version}
            loaded = load_version(self.model_name, version)  # fully loaded before the swap
            with self._swap_lock:
                self._current = loaded
            MODEL_INFO.labels(model_name=self.model_name, model_version=previous.version).set(0)
            MODEL_INFO.labels(model_name=self.model_name, model_version=version).set(1)
            log.info("now serving %s version %s (was %s)", self.model_name, version, previous.version)
            return {"reloaded": True, "version": version, "previous": previous.version}

    def _poll_registry(self) -> None:
        while not self._stop.wait(self.limits.reload_seconds):
            try:
                self.reload()
            except Exception:  # a broken registry or model must not stop the service
                log.exception("reloading the champion failed; still serving %s", self.current().version)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self._stop.set()
        self.batcher.close()
        self.store.close()

    def __is_ready__(self) -> bool:
        return self._current is not None

    # -- generation ---------------------------------------------------------------------

    def _new_row(self, loaded: LoadedModel, prompt: str, prompt_ids: list[int], max_new: int, temperature: float,
                 top_p: float, stops: list[str]) -> Row:
        return Row(prompt, prompt_ids, loaded.tokenizer, max_new, temperature, top_p, stops,
                   asyncio.get_running_loop(), asyncio.Queue())

    async def _events(self, row: Row):
        """The row's events until its end; marks the row done if the consumer goes away."""
        try:
            await self.batcher.submit(row)
            while True:
                event = await row.queue.get()
                yield event
                if event[0] != "delta":
                    return
        finally:
            row.done = True

    def _record(self, endpoint: str, cid: str, messages: list[dict], answer: str, finish: str, row: Row,
                started: float) -> Interaction:
        latency = time.perf_counter() - started
        GENERATED_TOKENS.labels(endpoint=endpoint, model_version=row.version).inc(len(row.ids))
        REQUEST_LATENCY.labels(endpoint=endpoint, model_version=row.version).observe(latency)
        return Interaction(cid, endpoint, self.model_name, row.version, messages, answer, finish,
                           row.prompt_tokens, len(row.ids), latency * 1000)

    def _check_chat(self, body: Any) -> tuple[ChatRequest, list[dict], Row]:
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        if isinstance(body.get("messages"), list) and len(body["messages"]) > self.limits.max_messages:
            raise APIError(400, f"Too many messages ({len(body['messages'])}); at most serving.max_messages="
                                f"{self.limits.max_messages}.", param="messages", code="too_many_messages")
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported; send n requests instead.", param="n", code="unsupported_value")
        if len(req.stops()) > 4:
            raise APIError(400, "At most 4 stop sequences.", param="stop", code="invalid_value")
        wanted = req.max_completion_tokens or req.max_tokens
        if wanted is not None and wanted > self.limits.max_tokens:
            raise APIError(400, f"max_tokens={wanted} is over serving.max_tokens={self.limits.max_tokens}.",
                           param="max_tokens", code="invalid_value")
        from tasks.modeling import render_prompt

        loaded = self.current()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = render_prompt(loaded.tokenizer, messages)
        prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
        n_prompt = len(prompt_ids)
        room = loaded.context_length - n_prompt
        max_new = wanted or min(self.limits.max_tokens, room)
        if max_new > room:
            raise APIError(400, f"The prompt has {n_prompt} tokens; with max_tokens={max_new} it exceeds the "
                                f"model's context of {loaded.context_length}.", param="messages",
                           code="context_length_exceeded")
        temperature = req.temperature if req.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0
        row = self._new_row(loaded, prompt, prompt_ids, max_new, temperature, req.top_p, req.stops())
        return req, messages, row

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatRequest),
              responses=_responses(ChatCompletion, 400, 413, 503, streams=True))
    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        req, messages, row = self._check_chat(await _read_json(request))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(cid, created, row, messages, started, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, finish = [], "stop"
        async for event in self._events(row):
            if event[0] == "delta":
                parts.append(event[1])
            elif event[0] == "error":
                raise APIError(503, event[1], type="server_error", code="generation_failed")
            else:
                finish = event[1]
        answer = "".join(parts)
        await asyncio.to_thread(self.store.log_interaction,
                                self._record("chat", cid, messages, answer, finish, row, started))
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
            "system_fingerprint": f"v{row.version}",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": row.prompt_tokens, "completion_tokens": len(row.ids),
                      "total_tokens": row.prompt_tokens + len(row.ids)},
        }

    async def _stream(self, cid: str, created: int, row: Row, messages: list[dict], started: float, usage: bool):
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "system_fingerprint": f"v{row.version}",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        parts, opened = [], False
        async for event in self._events(row):
            if not opened:
                opened = True
                yield chunk({"role": "assistant", "content": ""})
            if event[0] == "delta":
                parts.append(event[1])
                yield chunk({"content": event[1]})
            elif event[0] == "error":
                yield _sse(error_body(event[1], "server_error", None, "generation_failed"))
            else:
                yield chunk({}, event[1])
                await asyncio.to_thread(self.store.log_interaction,
                                        self._record("chat", cid, messages, "".join(parts), event[1], row, started))
        if usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [], "usage": {"prompt_tokens": row.prompt_tokens, "completion_tokens": len(row.ids),
                                                 "total_tokens": row.prompt_tokens + len(row.ids)}})
        yield "data: [DONE]\n\n"

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
    async def generate(self, prompts: list[Annotated[str, Field(min_length=1)]]) -> list[str]:
        """Complete plain prompts (no chat template), greedily, up to 64 new tokens each.

        BentoML merges the prompts of concurrent requests into one call, so nothing here may
        fail for one prompt: that would fail the other requests of the batch too. Empty
        prompts are refused per request by the input schema, before batching; a prompt
        longer than the context leaves for the answer keeps its end (the usual truncation of
        completion servers) instead of being refused.
        """
        started = time.perf_counter()
        loaded = self.current()
        max_new = min(GENERATE_MAX_TOKENS, self.limits.max_tokens)
        room = max(1, loaded.context_length - max_new)
        rows = []
        for prompt in prompts:
            prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)[-room:]
            rows.append(self._new_row(loaded, prompt, prompt_ids, max_new, 0.0, 1.0, []))

        async def complete(row: Row) -> str:
            parts = []
            async for event in self._events(row):
                if event[0] == "delta":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise bentoml.exceptions.ServiceUnavailable(event[1])
            text = "".join(parts)
            item = self._record("generate", f"gen-{uuid.uuid4().hex}", [{"role": "prompt", "content": row.prompt}],
                                text, row.finish, row, started)
            await asyncio.to_thread(self.store.log_interaction, item)
            return text

        return list(await asyncio.gather(*(complete(r) for r in rows)))

    @app.get("/v1/models", responses=_responses(ModelList))
    async def list_models(self):
        loaded = self.current()
        return {"object": "list", "data": [{
            "id": loaded.name, "object": "model", "created": int(loaded.loaded_at), "owned_by": "ftllm",
            "version": loaded.version, "source": loaded.source,
        }]}

    @app.post("/feedback", openapi_extra=_json_body(FeedbackRequest),
              responses=_responses(FeedbackStored, 400, 404, 413))
    async def feedback(self, request: Request):
        """Rate a completion from 1 (useless) to 5 (perfect), optionally with the answer it should have given."""
        body = await _read_json(request)
        try:
            fb = FeedbackRequest.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        try:
            fid = await asyncio.to_thread(self.store.add_feedback, fb.id, fb.rating, fb.correction)
        except KeyError:
            raise APIError(404, f"No completion with id {fb.id!r} was logged.", param="id", code="not_found") from None
        return {"id": fid, "completion_id": fb.id, "rating": fb.rating, "stored": True}

    @app.post("/admin/reload", responses=_responses(ReloadResult, 413, 503))
    async def admin_reload(self):
        """Check the registry's champion now; swap the model if it moved."""
        try:
            return await asyncio.to_thread(self.reload)
        except Exception as exc:
            raise APIError(503, f"Reload failed, still serving {self.current().version}: {exc}",
                           type="server_error", code="reload_failed") from None


ChatService.add_asgi_middleware(GuardMiddleware)
