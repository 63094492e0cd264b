"""The BentoML service: an OpenAI-compatible chat API for the `champion` model.

This module holds the service's request handling and its routes. The served model's
lifecycle (loading a model version, polling the registry, hot swaps and engine restarts)
is `serving.model_manager.ModelManager`'s; the request and response models and the
OpenAI error bodies are in `serving.errors`; authentication, request limits and the
rewriting of BentoML's and Starlette's error bodies in `serving.guards`; API keys and
their roles in `serving.keys`; the engine process in `serving.engine_process` and its
decoding loops behind `serving.decoding.DecodingLoop`; the interaction log in
`tasks.feedback` (see docs/guides/serving-internals.md). What stays here, about 600 lines,
is cohesive: the chat route, its streaming and the reading of tool calls share one plan
per request (`ChatPlan`) and change together. The FastAPI routes are thin module-level functions that get the service instance from an async dependency: BentoML's
own binding of routes written as methods resolves `self` through a sync dependency, which
FastAPI runs in its thread pool, a thread hop on every request.

Endpoints (all but `/livez` and `/readyz` need `Authorization: Bearer <key>` when keys are
set, `FTLLM_API_KEYS` or `FTLLM_API_KEY`, with the route's role):

- `POST /v1/chat/completions`: OpenAI chat schema, with `stream: true` (SSE
  `chat.completion.chunk`s, then `data: [DONE]`); `n` must be 1 (else 400), `model` the served
  one or left out (else 404); docs/guides/serving-tools.md lists every field.
- `GET /v1/models`: the served model id and its registry version; `GET /v1/models/{id}` its card alone.
- `POST /generate`: plain prompt completion, `{"prompts": [...]}` → list of texts
  (BentoML adaptive batching).
- `POST /feedback`: `{"id": <completion id>, "rating": 1..5, "correction": str?, "user": str?}`;
  needs a key with the `feedback` role, at most `feedback.per_key_per_minute` a minute per
  key (429 with Retry-After), one correction per completion per key (409). Untrusted
  keys' feedback is held for approval (docs/guides/trust.md).
- `POST /admin/reload`: look up `champion` in the registry now and swap if it moved.
- `/livez`, `/readyz`, `/metrics` come with BentoML; `/metrics` adds
  `ftllm_generated_tokens_total`, `ftllm_request_latency_seconds` and `ftllm_model_info`,
  each labelled with the model version.
- `/docs.json` (BentoML's OpenAPI description) documents every route's request body,
  answer and error statuses; `tests/integration/serving/test_fuzz.py` fuzzes the service from it.

Every refusal has OpenAI's error body, `{"error": {message, type, param, code}}`, also
those that BentoML (`/generate`'s input validation) and Starlette (unknown paths) write
(`serving.guards` rewrites those).

Every completion is a row of one continuously batched decoding loop, which runs in a
process of its own (`serving.engine_process`): a request joins the rows already generating
within a few steps and leaves when it ends, up to `serving.max_batch` rows at once. On a CPU or a GPU
this is what makes 16 concurrent clients several times faster than one. This process
validates, templates and tokenizes requests and answers them; the engine process holds
the weights. If the engine dies, its requests in flight get a 503, /readyz says not
ready, and the registry poller starts a new one with the served version.

The model is loaded once at start-up: the registry's `champion` version (from the BentoML
store when imported there as `<name>:v<version>`, else downloaded from MLflow), or, where
no registry is reachable (e.g. in a container), the model packaged in the bento. A
background thread polls the registry every `serving.reload_seconds`; a new champion is
loaded fully into the engine, then new requests go to it, while requests in flight
finish on the old one (which the engine frees once they have).

Serve from the project root (`ftllm serve` does this, binding 127.0.0.1):

    bentoml serve serving.service:ChatService --host 127.0.0.1 --port 3000
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import random
import sqlite3
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

from tasks.environment import apply_defaults, environment, find_root

# BentoML and MLflow read their homes when first imported: set the defaults before.
ROOT = apply_defaults(find_root(Path(__file__).resolve().parent.parent))

import bentoml  # noqa: E402
import prometheus_client  # noqa: E402
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from pydantic import Field, ValidationError  # noqa: E402

from serving.decoding import STOP_SEQUENCE  # noqa: E402
from serving.engine_process import Completion, EngineError, EngineProcess  # noqa: E402
from serving.errors import APIError, error_body, validation_error  # noqa: E402
from serving.guards import GuardMiddleware, request_caller  # noqa: E402
from serving.keys import ANONYMOUS, Caller, RateLimiter, feedback_bucket  # noqa: E402
from serving.lifetime import exit_with_parent  # noqa: E402
from serving.model_manager import ModelManager, ServedModel  # noqa: E402
from serving.openapi import (  # noqa: E402
    ChatCompletion,
    FeedbackStored,
    ModelCard,
    ModelList,
    ReloadResult,
    json_body,
    responses,
)
from serving.schemas import (  # noqa: E402
    ChatRequest,
    FeedbackRequest,
    NamedToolChoice,
    check_request,
    for_template,
    unhonoured_field,
)
from tasks.config import Params, ServingParams, load_params, overrides_from_env  # noqa: E402
from tasks.errors import DataFileError  # noqa: E402
from tasks.feedback import FeedbackStore, Interaction, default_db_path  # noqa: E402
from tasks.feedback.schema import STOPPED  # noqa: E402
from tasks.feedback.store import DuplicateCorrection  # noqa: E402
from tasks.model.chat import encode_text  # noqa: E402
from tasks.model.forced_calls import CallChoice  # noqa: E402
from tasks.model.responses import ParsedResponse, ResponseStream, parse_generation  # noqa: E402

log = logging.getLogger("ftllm.serving")

# BentoML takes a service's and an API's limits when the class is defined, before any
# setting is read, so these three are constants rather than settings of `serving:`.
# /generate's adaptive batches: prompts merged into one call (the engine still decodes at
# most serving.max_batch rows at once), and the latency BentoML's batcher keeps under (it
# cancels a request that has waited this long, with a 503).
GENERATE_MAX_BATCH = 32
GENERATE_MAX_LATENCY_MS = 60_000
# The longest a request may take: a completion of serving.max_tokens on a slow model.
REQUEST_TIMEOUT_SECONDS = 600
# OpenAI's own limit: clients written against its API never send more.
MAX_STOP_SEQUENCES = 4
# How long an answer waits for its interaction to be on disk (tasks.feedback.store): a commit
# takes about a millisecond; only another process holding the log's lock takes longer.
LOG_WAIT_S = 2.0
# Below this temperature sampling picks what greedy decoding picks, and near 1e-308 the scaled
# logits overflow to inf and generation fails: such requests decode greedily (as vLLM does).
MIN_SAMPLING_TEMPERATURE = 1e-5


SERVICE_SECTIONS = ("registry", "serving", "feedback")


def load_settings() -> Params:
    """The settings the service reads (`registry`, `serving`, `feedback`): from `FTLLM_PARAMS` if set,
    else `<root>/params.yaml`, else the defaults.

    Only those sections are validated. A bento carries the code it was built with, and
    `ftllm serve` runs it against the project's current params.yaml: settings of the
    pipeline that this code does not know (added after the bento was built) must not stop
    it from starting.
    """
    path = environment().params_file or ROOT / "params.yaml"
    # `ftllm serve --set` hands its overrides over in FTLLM_OVERRIDES, as the retrain flow does to its stages.
    return load_params(path if path.is_file() else None, overrides_from_env(), sections=SERVICE_SECTIONS)


# The model the bento carries is chosen at import, because BentoML collects the models a
# service declares when it builds the bento; `tasks.registry.bento.build_bento` sets the env var.
_MODEL_NAME = load_settings().registry.model_name
BENTO_MODEL_TAG = environment().bento_model or f"{_MODEL_NAME}:latest"

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
    documentation="Rows in each decoding step of the continuous batcher",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
MODEL_INFO = prometheus_client.Gauge(
    name="ftllm_model_info",
    documentation="1 for the model version being served",
    labelnames=["model_name", "model_version"],
    multiprocess_mode="livemax",
)


def _label_served(model_name: str):
    """`ftllm_model_info`: 1 for the version now served, 0 for the one it replaced."""

    def label(version: str, previous: str | None) -> None:
        if previous is not None:
            MODEL_INFO.labels(model_name=model_name, model_version=previous).set(0)
        MODEL_INFO.labels(model_name=model_name, model_version=version).set(1)

    return label


async def _read_json(request: Request) -> Any:
    try:
        body = json.loads(await request.body())
        # JSON's `\ud800` escape reads as a lone surrogate, which is no character: the
        # tokenizer and the error body (which may quote it) cannot encode it. Refused as
        # RFC 8259 allows; an escaped pair (an emoji) reads as one character and passes.
        json.dumps(body, ensure_ascii=False).encode()
    # ValueError covers bad JSON and bad UTF-8 (UnicodeError among them), and also an integer
    # of over 4,300 digits; RecursionError is a body nested deeper than the parser recurses,
    # `[[[...` (both fit in serving.max_request_bytes).
    except UnicodeEncodeError:
        raise APIError(400, "The request body is not valid JSON text: a string in it has a lone UTF-16 surrogate "
                            "escape (\\ud800-\\udfff without its pair), which encodes no character.",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None
    return body


# ---------------------------------------------------------------------------------------
# How a chat request's answer is read back
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPlan:
    """How a chat request's generation is read back (see docs/guides/serving-tools.md).

    Attributes:
        tokenizer: the served model's tokenizer (its templates say how calls are written).
        prompt: the rendered prompt, without `opening`.
        opening: text appended to the prompt to force a call (`tool_choice` required or
            named), part of the answer the model writes; "" otherwise.
        choices: with `tool_choice: required` and several tools, the functions to choose
            from (`ChatService._choose_call`), whose opening then replaces `opening`.
        tools: the tools shown to the model (None with `tool_choice: none` or no tools).
        declared: the tools the request declared, shown or not: what the log keeps, so that
            an answer given under `tool_choice: none` after calls in its history is still an
            example whose calls name declared tools (else the export leaves its correction out).
        parse: whether the generation is parsed (tools offered, or a template that writes
            reasoning traces); else its text is the answer as generated.
        single_call: at most the first call is returned: with `parallel_tool_calls: false`, and
            with a named `tool_choice`, which asks for a call to that function only (the forced
            call is the first; the model may write calls to other functions after it).
        invalid_finish: the finish reason of a call returned as text (`serving.invalid_call_finish_reason`).
        forced: the request's `tool_choice` when it forced the answer (`none`, `required`, a named
            function; as sent), None for `auto`: logged, so the exports do not teach it as the
            model's own choice.
    """

    tokenizer: Any
    prompt: str
    opening: str = ""
    tools: list[dict] | None = None
    parse: bool = False
    declared: list[dict] | None = None
    single_call: bool = False
    invalid_finish: str = "invalid_tool_call"
    choices: tuple[CallChoice, ...] = ()
    forced: str | dict | None = None

    def read(self, text: str) -> ParsedResponse:
        """The generation (after the opening) read back into answer, reasoning and calls."""
        return parse_generation(self.tokenizer, self.opening + text, self.prompt, self.tools, self.single_call,
                                forced=bool(self.opening))

    def finish_reason(self, parsed: ParsedResponse, engine_finish: str, stop_sequence: bool = False) -> str:
        """`tool_calls` for valid calls, `invalid_finish` for a call returned as text, else the engine's.

        A call a stop string of the request cut short (`stop_sequence`) is no call the model
        got wrong: its text ends with "stop", as a `max_tokens` cut ends with "length".
        """
        if parsed.tool_calls:
            return "tool_calls"
        if engine_finish == "length":
            return "length"
        return self.invalid_finish if parsed.invalid and self.tools and not stop_sequence else engine_finish


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


def _answer_message(parsed: ParsedResponse) -> dict[str, Any]:
    """The assistant message of a parsed answer: content (null beside calls and no text), calls, reasoning."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.answer}
    if parsed.tool_calls:
        message["content"] = parsed.content or None
        message["tool_calls"] = [c.openai() for c in parsed.tool_calls]
    if parsed.reasoning_content is not None:
        message["reasoning_content"] = parsed.reasoning_content
    return message


def _common_prefix(seqs: list[list[int]]) -> int:
    """How many leading ids all of `seqs` share."""
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _draw(scores: list[float], temperature: float, top_p: float, seed: int | None) -> int:
    """The index of the highest of `scores` (log-probabilities) at temperature 0, else one drawn
    as a token is: with probability proportional to exp(score / temperature), among the fewest
    likeliest whose probabilities add up to `top_p`, from `seed` when given."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    if temperature <= 0:
        return order[0]
    weights = [math.exp((scores[i] - scores[order[0]]) / temperature) for i in order]
    total, kept, mass = sum(weights), 0, 0.0
    while kept < len(order) and (kept == 0 or mass < top_p):
        mass += weights[kept] / total
        kept += 1
    return random.Random(seed).choices(order[:kept], weights[:kept])[0]


def _logged_finish(finish: str, parsed: ParsedResponse | None) -> str:
    """The finish reason the log keeps: `invalid_tool_call` for a call returned as text, whatever
    the client was told (`serving.invalid_call_finish_reason`), so no export trains it as an answer."""
    return "invalid_tool_call" if parsed is not None and parsed.invalid else finish


def _check_names(messages: list[dict], loaded: ServedModel) -> None:
    """Refuse a message `name` the model's chat template would not write, naming the message.

    The name would not reach the model, and the interaction log would keep a conversation
    that validation refuses as `name_dropped` when the feedback is trained on.
    """
    from tasks.model.chat import unwritten_names

    unwritten = unwritten_names(loaded.tokenizer, messages, loaded.system_message)
    if unwritten:
        i = unwritten[0]
        raise APIError(400, f"messages[{i}] has the name {messages[i]['name']!r}, which {loaded.name} version "
                            f"{loaded.version}'s chat template does not write, so the model would not see it. "
                            "Leave name out, or write the speaker into the content.",
                       param=f"messages.{i}.name", code="unsupported_value")


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="ftllm_chat", workers=1, traffic={"timeout": REQUEST_TIMEOUT_SECONDS})
class ChatService:
    """Serves the champion model behind an OpenAI-compatible API (see the module docstring)."""

    bento_model = bentoml.models.BentoModel(BENTO_MODEL_TAG)

    def __init__(self) -> None:
        params = load_settings()
        self.limits: ServingParams = params.serving
        self.feedback_limit = RateLimiter(params.feedback.per_key_per_minute, 60.0)
        self.model_name = params.registry.model_name
        self.models = ModelManager(
            self.model_name, self.limits, packaged=lambda: type(self).bento_model.stored, packaged_tag=BENTO_MODEL_TAG,
            on_steps=lambda sizes: [BATCH_SIZE.observe(n) for n in sizes], on_serve=_label_served(self.model_name))
        self.store = FeedbackStore(default_db_path(ROOT))
        self.models.start_polling()
        exit_with_parent()  # a `bentoml serve` killed with SIGKILL leaves no worker answering (serving/lifetime.py)
        # Everything loaded so far (BentoML, MLflow, FastAPI, the tokenizer: about 480,000
        # objects) lives as long as the process: out of the collector's sight, a full
        # collection no longer stops every request for half a second on a busy 2-core machine.
        gc.freeze()

    # -- the served model (serving.model_manager) ----------------------------------------

    @property
    def engine(self) -> EngineProcess:
        return self.models.engine

    def current(self) -> ServedModel:
        return self.models.current()

    def reload(self) -> dict[str, Any]:
        return self.models.reload()

    def restart_engine(self) -> None:
        self.models.restart_engine()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.models.close()
        self.store.close()

    def __is_ready__(self) -> bool:
        return self.models.ready()

    # -- generation ---------------------------------------------------------------------

    def _completion(self, served: ServedModel, prompt: str, prompt_ids: list[int], max_new: int,
                    temperature: float, top_p: float, stops: list[str], stream: bool,
                    seed: int | None = None) -> Completion:
        return Completion(prompt, prompt_ids, max_new, temperature, top_p, stops, stream, served.key, served.version,
                          asyncio.get_running_loop(), asyncio.Queue(), seed=seed)

    async def _events(self, row: Completion):
        """The completion's events until its end; cancels it in the engine if the consumer goes away."""
        engine = self.engine
        try:
            try:
                await engine.submit(row)
            except EngineError as exc:
                yield ("error", str(exc))
                return
            while True:
                event = await row.queue.get()
                if event[0] == "end":
                    if event[1] == STOP_SEQUENCE:  # "stop" to the client, as OpenAI says it
                        row.stop_sequence, event = True, ("end", "stop", event[2])
                    row.finish, row.completion_tokens = event[1], event[2]
                if event[0] != "delta":
                    row.ended = True
                yield event
                if row.ended:
                    return
        finally:
            if not row.ended:
                engine.cancel(row)

    def _record(self, endpoint: str, cid: str, messages: list[dict], answer: str | dict, finish: str,
                row: Completion, started: float, caller: Caller | None = None, user: str | None = None,
                plan: ChatPlan | None = None) -> Interaction:
        """The interaction to log; `answer` is the text, or the assistant message of a chat completion
        (with the `plan` it was read back by: the tools declared, a tool_choice that forced it)."""
        latency = time.perf_counter() - started
        GENERATED_TOKENS.labels(endpoint=endpoint, model_version=row.version).inc(row.completion_tokens)
        REQUEST_LATENCY.labels(endpoint=endpoint, model_version=row.version).observe(latency)
        who = {"key_name": caller.name, "end_user": user} if caller is not None else {}
        message = answer if isinstance(answer, dict) else {"content": answer}
        return Interaction(cid, endpoint, self.model_name, row.version, messages, message["content"] or "", finish,
                           row.prompt_tokens, row.answer_tokens, latency * 1000, **who,
                           tools=plan and plan.declared, tool_calls=message.get("tool_calls"),
                           reasoning=message.get("reasoning_content"), tool_choice=plan and plan.forced)

    async def _log(self, item: Interaction) -> None:
        """Write a completion to the interaction log; return once it is on disk (a group commit
        with the completions that end meanwhile), so an answer a client holds can be rated.

        Another process holding the log's write lock (`ftllm feedback forget`) must not hold up
        answers: after LOG_WAIT_S the answer goes out and the row is written when it can be.
        """
        written = asyncio.wrap_future(self.store.log_later(item))
        try:
            await asyncio.wait_for(asyncio.shield(written), LOG_WAIT_S)
        except TimeoutError:
            log.warning("interaction %s is not on disk after %s s (the log is busy); answering before it is", item.id,
                        LOG_WAIT_S)

    async def _log_chat(self, req: ChatRequest, item: Interaction) -> None:
        """Write a chat completion to the interaction log, unless the request said `store: false`."""
        if req.store is not False:
            await self._log(item)

    async def _check_chat(self, body: Any) -> tuple[ChatRequest, list[dict], Completion, ChatPlan]:
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        if isinstance(body.get("messages"), list) and len(body["messages"]) > self.limits.max_messages:
            raise APIError(400, f"Too many messages ({len(body['messages'])}); at most serving.max_messages="
                                f"{self.limits.max_messages}.", param="messages", code="too_many_messages")
        refused = unhonoured_field(body)
        if refused is not None:
            raise refused
        try:
            # Strict: the documented types, not what pydantic could coerce ("4", true, 4.0)
            req = ChatRequest.model_validate(body, strict=True)
        except ValidationError as err:
            raise validation_error(err, ChatRequest) from None
        check_request(req)
        if req.n != 1:
            raise APIError(400, "Only n=1 is supported; send n requests instead.", param="n", code="unsupported_value")
        if len(req.stops()) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"At most {MAX_STOP_SEQUENCES} stop sequences.", param="stop", code="invalid_value")
        wanted = req.max_completion_tokens or req.max_tokens
        wanted_field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if wanted is not None and wanted > self.limits.max_tokens:
            raise APIError(400, f"{wanted_field}={wanted} is over serving.max_tokens={self.limits.max_tokens}.",
                           param=wanted_field, code="invalid_value")
        loaded = self.current()
        self._check_model(req.model, loaded)
        messages = [m.canonical() for m in req.messages]
        _check_names(messages, loaded)
        # top_p 0 keeps only the most likely token, which is what greedy decoding picks.
        greedy = req.temperature < MIN_SAMPLING_TEMPERATURE or req.top_p == 0
        if req.seed is not None and not greedy and self.limits.engine == "transformers":
            raise APIError(400, "seed is not applied by serving.engine=transformers (the library samples every row "
                                "from one random state); leave seed out, or serve with serving.engine: own.",
                           param="seed", code="unsupported_parameter")
        plan = self._plan(req, loaded, [for_template(m) for m in messages])
        if plan.choices and self.limits.engine == "own":  # the library's loop cannot score (serving.engine_process)
            plan = await self._choose_call(plan, loaded, 0.0 if greedy else req.temperature, req.top_p, req.seed)
            if self.current() is not loaded:  # a new version was loaded while the engine scored: plan on it
                return await self._check_chat(body)
        prompt_ids = encode_text(loaded.tokenizer, plan.prompt + plan.opening)
        # A forced call's opening is answer the service writes: max_tokens caps it with the rest
        opened = len(prompt_ids) - len(encode_text(loaded.tokenizer, plan.prompt)) if plan.opening else 0
        if wanted is not None and wanted <= opened:
            raise APIError(400, f"{wanted_field}={wanted} leaves no room for the call tool_choice forces: its opening "
                                f"alone is {opened} tokens of the answer.", param=wanted_field, code="invalid_value")
        if wanted is None and self.limits.max_tokens <= opened:
            raise APIError(400, f"serving.max_tokens={self.limits.max_tokens} leaves no room for the call tool_choice "
                                f"forces: its opening alone is {opened} tokens of the answer.", param="tool_choice",
                           code="invalid_value")
        n_prompt = len(prompt_ids)
        room = loaded.context_length - n_prompt
        max_new = wanted - opened if wanted is not None else min(self.limits.max_tokens - opened, room)
        if max_new > room or room < 1:  # without max_tokens, a prompt that fills the context leaves room < 1
            asked = (f"with {wanted_field}={wanted} it exceeds" if wanted is not None
                     else "it leaves no room for an answer in")
            raise APIError(400, f"The prompt has {n_prompt - opened} tokens; {asked} the model's context of "
                                f"{loaded.context_length}.", param="messages", code="context_length_exceeded")
        row = self._completion(loaded, plan.prompt + plan.opening, prompt_ids, max_new,
                               0.0 if greedy else req.temperature, req.top_p, req.stops(), req.stream, req.seed)
        row.opening_tokens = opened
        return req, messages, row, plan

    def _plan(self, req: ChatRequest, loaded: ServedModel, messages: list[dict]) -> ChatPlan:
        """Render the prompt with the tools `tool_choice` asks for, and how to read the answer back."""
        from jinja2 import TemplateError

        from tasks.model.chat import render_prompt
        from tasks.model.forced_calls import call_choices, forced_call_opening
        from tasks.model.responses import needs_parsing

        choice = req.tool_choice or "auto"  # a tool_choice comes with tools (`check_request`)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools.", param="tool_choice.function.name",
                           code="invalid_value")
        shown = None if choice == "none" else tools
        try:
            prompt = render_prompt(loaded.tokenizer, messages, loaded.system_message, shown)
        except TemplateError as exc:
            raise APIError(400, f"The model's chat template refuses these messages: {exc}.", param="messages",
                           code="invalid_value") from None
        opening, choices = "", None
        if choice == "required" or name is not None:
            # `required` with one tool can only call that one: its name is written too, not left to the model
            forced = name or (tools[0]["function"]["name"] if len(tools) == 1 else None)
            opening = forced_call_opening(loaded.tokenizer, messages, tools, forced, loaded.system_message)
            if forced is None and opening is not None:
                choices = call_choices(loaded.tokenizer, messages, tools, loaded.system_message)
            if opening is None:
                raise APIError(400, f"tool_choice={json.dumps(req.model_dump(mode='json')['tool_choice'])} needs a "
                                    f"model whose chat template writes tool calls; {loaded.name} version "
                                    f"{loaded.version}'s does not. Use tool_choice 'auto'.", param="tool_choice",
                               code="unsupported_value")
        return ChatPlan(loaded.tokenizer, prompt, opening, shown, needs_parsing(loaded.tokenizer, shown),
                        declared=tools, single_call=req.parallel_tool_calls is False or name is not None,
                        invalid_finish=self.limits.invalid_call_finish_reason, choices=tuple(choices or ()),
                        forced=None if choice == "auto" else req.model_dump(mode="json")["tool_choice"])

    async def _choose_call(self, plan: ChatPlan, loaded: ServedModel, temperature: float, top_p: float,
                           seed: int | None) -> ChatPlan:
        """`tool_choice: required` with several tools: the declared function the model is likeliest
        to call (drawn by likelihood at `temperature` and `top_p` when sampling), forced as a named
        choice forces its function, so the answer calls a declared function. Where the engine
        cannot score (a failed forward pass), the model writes the name itself, as before.

        Raises:
            APIError: 400 `context_length_exceeded`, the prompt with a call's opening does not fit.
        """
        ids = [encode_text(loaded.tokenizer, plan.prompt + c.opening) for c in plan.choices]
        if max(map(len, ids)) >= loaded.context_length:
            raise APIError(400, f"The prompt has {len(encode_text(loaded.tokenizer, plan.prompt))} tokens; with the "
                                f"opening of a call to one of the tools it fills the model's context of "
                                f"{loaded.context_length}.", param="messages", code="context_length_exceeded")
        shared = min(_common_prefix(ids), min(map(len, ids)) - 1)  # every function has a token of its own scored
        try:
            scores = await self.engine.score(loaded.key, ids[0][:shared], [i[shared:] for i in ids])
        except EngineError as exc:
            log.warning("tool_choice required: %s; the model writes the function name unconstrained", exc)
            return plan
        if any(math.isnan(x) for x in scores) or not any(math.isfinite(x) for x in scores):
            log.warning("tool_choice required: the engine scored the functions %s; the model writes the function "
                        "name unconstrained", scores)
            return plan
        chosen = plan.choices[_draw(scores, temperature, top_p, seed)]
        return replace(plan, opening=chosen.opening, choices=())

    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        req, messages, row, plan = await self._check_chat(await _read_json(request))
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        who = (request_caller(request.scope), req.user)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(cid, created, req, row, plan, messages, started, usage, who),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, finish = [], "stop"
        async for event in self._events(row):
            if event[0] == "delta":
                parts.append(event[1])
            elif event[0] == "error":
                raise APIError(503, event[1], type="server_error", code="generation_failed")
            else:
                finish = event[1]
        text = "".join(parts)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        parsed = None
        if plan.parse:
            parsed = plan.read(text)
            finish = plan.finish_reason(parsed, finish, row.stop_sequence)
            message = _answer_message(parsed)
        await self._log_chat(req, self._record("chat", cid, messages, message, _logged_finish(finish, parsed), row,
                                               started, *who, plan=plan))
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
            "system_fingerprint": f"v{row.version}",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.answer_tokens,
                      "total_tokens": row.prompt_tokens + row.answer_tokens},
        })

    async def _stream(self, cid: str, created: int, req: ChatRequest, row: Completion, plan: ChatPlan,
                      messages: list[dict], started: float, usage: bool, who: tuple[Caller, str | None]):
        """Server-sent chunks as OpenAI sends them: the role first, then text deltas as they come
        (`reasoning_content` apart), then each call (a delta with its id and name, then one with
        its arguments), then the finish reason. The role's chunk has `content: ""` before text;
        an answer that begins with a call or a reasoning trace has the role in that chunk,
        `content: null`, so that the content a client adds up is null beside calls, as unstreamed
        (text that follows fills it in; an answer with none gets `content: ""`). A call is sent
        once it is complete and checked. With `usage`, every chunk has `usage: null`
        and a last one, with no choices, has the counts."""
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                         "system_fingerprint": f"v{row.version}",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                         **({"usage": None} if usage else {})})

        reader = (ResponseStream(plan.tokenizer, plan.prompt, plan.tools, plan.single_call, forced=bool(plan.opening))
                  if plan.parse else None)
        if reader is not None and plan.opening:
            reader.feed(plan.opening)  # call text: held back until the call is complete
        parts, opened, content_sent = [], False, False
        settled = False  # the answer was logged, or generation failed: nothing for the client to rate

        def opening(delta: dict) -> list[str]:
            """The chunks of a delta, the role's first where none was sent: `content: ""` before
            text, or, as OpenAI sends a call that comes first, in the call's own chunk (or the
            trace's), `content: null`."""
            nonlocal opened, content_sent
            content_sent = content_sent or "content" in delta
            if opened:
                return [chunk(delta)]
            opened = True
            if "tool_calls" in delta or "reasoning_content" in delta:
                return [chunk({"role": "assistant", "content": None, **delta})]
            content_sent = True
            return [chunk({"role": "assistant", "content": ""}), *([chunk(delta)] if delta else [])]

        try:
            async for event in self._events(row):
                if reader is None and not opened:  # nothing is held back: the role goes first, at once
                    for sent in opening({}):
                        yield sent
                if event[0] == "delta":
                    parts.append(event[1])
                    pieces = reader.feed(event[1]) if reader is not None else [("content", event[1])]
                    for field_name, piece in pieces:
                        for sent in opening({field_name: piece}):
                            yield sent
                elif event[0] == "error":
                    settled = True
                    yield _sse(error_body(event[1], "server_error", None, "generation_failed"))
                else:
                    finish, message, parsed, owed = event[1], {"role": "assistant", "content": "".join(parts)}, None, []
                    if reader is not None:
                        parsed, owed = reader.finish()
                        finish, message = plan.finish_reason(parsed, finish, row.stop_sequence), _answer_message(parsed)
                    # Logged before the rest is sent: a client that has the id can rate the answer,
                    # even one that leaves before the calls or the finish reason arrive.
                    settled = True
                    await self._log_chat(req, self._record("chat", cid, messages, message, _logged_finish(finish, parsed),
                                                           row, started, *who, plan=plan))
                    if reader is not None:
                        for field_name, piece in owed:
                            for sent in opening({field_name: piece}):
                                yield sent
                        for index, call in enumerate(parsed.tool_calls):
                            out = call.openai()
                            for sent in opening({"tool_calls": [{"index": index, "id": out["id"], "type": "function", "function": {
                                    "name": out["function"]["name"], "arguments": ""}}]}):
                                yield sent
                            yield chunk({"tool_calls": [{"index": index,
                                                         "function": {"arguments": out["function"]["arguments"]}}]})
                    if not opened:  # an empty answer
                        for sent in opening({}):
                            yield sent
                    elif not content_sent and message.get("content") is not None:  # a trace, then no text and no call
                        yield chunk({"content": message["content"]})
                    yield chunk({}, finish)
        finally:
            if not settled and req.store is not False:
                # The client left mid-answer ("stop generating"): the id it was sent can still be
                # rated, so the text generated so far is logged (queued, not awaited: the request is
                # gone), with the tokens it took.
                text = "".join(parts)
                row.completion_tokens = len(encode_text(plan.tokenizer, text))
                self.store.log_later(self._record("chat", cid, messages, {"role": "assistant", "content": text},
                                                  STOPPED, row, started, *who, plan=plan))
        if usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "system_fingerprint": f"v{row.version}", "choices": [], "usage": {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.answer_tokens,
                                                 "total_tokens": row.prompt_tokens + row.answer_tokens}})
        yield "data: [DONE]\n\n"

    @bentoml.api(batchable=True, max_batch_size=GENERATE_MAX_BATCH, max_latency_ms=GENERATE_MAX_LATENCY_MS)
    async def generate(self, prompts: list[Annotated[str, Field(min_length=1)]]) -> list[str]:
        """Complete plain prompts (no chat template), greedily, up to `serving.generate_max_tokens`
        new tokens each.

        BentoML merges the prompts of concurrent requests into one call, so nothing here may
        fail for one prompt: that would fail the other requests of the batch too. Empty
        prompts are refused per request by the input schema, before batching; a prompt
        longer than the context leaves for the answer keeps its end (the usual truncation of
        completion servers) instead of being refused.
        """
        started = time.perf_counter()
        loaded = self.current()
        max_new = min(self.limits.generate_max_tokens, self.limits.max_tokens)
        room = max(1, loaded.context_length - max_new)
        rows = []
        for prompt in prompts:
            prompt_ids = encode_text(loaded.tokenizer, prompt)[-room:]
            rows.append(self._completion(loaded, prompt, prompt_ids, max_new, 0.0, 1.0, [], stream=False))

        async def complete(row: Completion) -> str:
            parts = []
            async for event in self._events(row):
                if event[0] == "delta":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise bentoml.exceptions.ServiceUnavailable(event[1])
            text = "".join(parts)
            item = self._record("generate", f"gen-{uuid.uuid4().hex}", [{"role": "prompt", "content": row.prompt}],
                                text, row.finish, row, started)
            await self._log(item)
            return text

        return list(await asyncio.gather(*(complete(r) for r in rows)))

    async def list_models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def retrieve_model(self, model: str):
        self._check_model(model, self.current())
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        loaded = self.current()
        return {"id": loaded.name, "object": "model", "created": int(loaded.loaded_at), "owned_by": "ftllm",
                "version": loaded.version, "source": loaded.source}

    def _check_model(self, model: str | None, loaded: ServedModel) -> None:
        """A 404 for a model name other than the served one (None: the client named none)."""
        if model is not None and model not in (loaded.name, self.model_name):
            raise APIError(404, f"The model {model!r} does not exist here; this service serves {loaded.name!r} "
                                "(GET /v1/models), or leave model out.", param="model", code="model_not_found")

    async def feedback(self, request: Request):
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object: {\"id\": ..., \"rating\": 1..5}.",
                           code="invalid_json")
        try:
            fb = FeedbackRequest.model_validate(body, strict=True)
        except ValidationError as err:
            raise validation_error(err, FeedbackRequest) from None
        caller = request_caller(request.scope)
        address = request.client.host if request.client else None
        bucket = feedback_bucket(caller, fb.user, address)
        wait = self.feedback_limit.acquire(bucket)
        if wait is not None:
            who = (f"the client {address!r}" if caller is ANONYMOUS else f"the key {caller.name!r}"
                   + (f" and the user {fb.user!r}" if bucket != caller.name else ""))
            raise APIError(429, f"Over feedback.per_key_per_minute={self.feedback_limit.limit} for {who}; "
                                f"retry in {wait} s.", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        try:
            fid = await asyncio.to_thread(self.store.add_feedback, fb.id, fb.rating, fb.correction,
                                          key_name=caller.name, end_user=fb.user, trusted=caller.trusted)
        except KeyError:
            raise APIError(404, f"No completion with id {fb.id!r} was logged.", param="id", code="not_found") from None
        except DuplicateCorrection:
            raise APIError(409, f"The key {caller.name!r} already corrected {fb.id!r}; one correction per "
                                "completion per key.", param="correction", code="duplicate_correction") from None
        except (sqlite3.DatabaseError, DataFileError) as exc:  # a full disk, a damaged page, a log that cannot be
            # opened again where it was deleted: nothing was stored, and the client must know
            log.error("feedback on %s not stored: %s", fb.id, exc)
            raise APIError(503, f"The feedback log cannot store it now ({exc}); nothing was stored. Retry later.",
                           type="server_error", code="feedback_not_stored") from None
        return {"id": fid, "completion_id": fb.id, "rating": fb.rating, "stored": True,
                "held": not caller.trusted}

    async def admin_reload(self):
        try:
            return await asyncio.to_thread(self.reload)
        except Exception as exc:
            raise APIError(503, f"Reload failed, still serving {self.current().version}: {exc}",
                           type="server_error", code="reload_failed") from None


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------


async def _service() -> Any:
    """The running `ChatService` (an async dependency: FastAPI calls a sync one in its thread pool)."""
    return bentoml.get_current_service()


Service = Annotated[Any, Depends(_service)]


@app.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest),
          responses=responses(ChatCompletion, 400, 404, 413, 503, streams=True))
async def chat_completions(request: Request, service: Service):
    return await service.chat_completions(request)


@app.get("/v1/models", responses=responses(ModelList))
async def list_models(service: Service):
    return await service.list_models()


@app.get("/v1/models/{model}", responses=responses(ModelCard, 404))
async def retrieve_model(model: str, service: Service):
    """The served model's card, as in /v1/models; a 404 for any other name."""
    return await service.retrieve_model(model)


@app.post("/feedback", openapi_extra=json_body(FeedbackRequest), responses=responses(FeedbackStored, 400, 404, 409, 413))
async def feedback(request: Request, service: Service):
    """Rate a completion from 1 (useless) to 5 (perfect), optionally with the answer it should have given."""
    return await service.feedback(request)


@app.post("/admin/reload", responses=responses(ReloadResult, 413, 503))
async def admin_reload(service: Service):
    """Check the registry's champion now; swap the model if it moved."""
    return await service.admin_reload()


ChatService.add_asgi_middleware(GuardMiddleware, load_limits=lambda: load_settings().serving)
