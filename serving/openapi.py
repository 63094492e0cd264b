"""What the chat service answers, as OpenAPI describes it: response models, and the helpers
that document the routes.

The response models (`ChatCompletion`, `ModelList`, ...) exist to document the routes in
BentoML's `/docs.json`, which `tests/integration/serving/test_fuzz.py` fuzzes the service
from; the routes build their answers as plain dicts. Every refusal is an `ErrorResponse`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # null when the answer is only tool calls
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None  # the model's reasoning trace, apart from the answer


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    logprobs: None
    # tool_calls: the message carries valid calls; invalid_tool_call: the model wrote a call
    # that could not be parsed, names an undeclared function or fails its schema, and its
    # text is the content.
    finish_reason: Literal["stop", "length", "tool_calls", "invalid_tool_call"]


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
    held: bool = Field(description="true: the key is not trusted, so the feedback waits for approval before training.")


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


def json_body(model: type[BaseModel]) -> dict:
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


def responses(ok: type[BaseModel], *errors: int, streams: bool = False) -> dict:
    """FastAPI `responses` for a route: `ok` on 200, and an `ErrorResponse` for each of `errors`.

    401 (a wrong key) and 429 (over serving.max_concurrency) come from
    `serving.guards.GuardMiddleware`, for every route; 413 (over serving.max_request_bytes)
    for every POST.
    """
    documented: dict[int | str, dict] = {200: {"model": ok}}
    if streams:
        documented[200]["content"] = {"text/event-stream": {"schema": SSE_EVENT}}
    for status in sorted({*errors, 401, 429}):
        documented[status] = {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
    return documented
