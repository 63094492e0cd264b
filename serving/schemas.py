"""What the chat service reads: request models, and the checks across their fields.

The request models (`ChatRequest`, `FeedbackRequest`) are the subset of OpenAI's chat API
that the service honours; the routes validate bodies with them strictly (the documented
types, nothing coerced), then `check_request` refuses what OpenAI refuses across fields (a
tool result without its call, `stream_options` without `stream`). What the service answers
is described in `serving.openapi`.

Every refusal is `{"error": {message, type, param, code}}` (`serving.openapi.ErrorResponse`),
raised as `serving.errors.APIError` with `param` the path of the field at fault.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serving.errors import APIError
from tasks.model.tool_schemas import strict_json

# ---------------------------------------------------------------------------------------
# Request schemas (OpenAI chat completions)
# ---------------------------------------------------------------------------------------


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str  # a JSON object, as a string (OpenAI's form)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        if not value.strip():  # some clients write a call without arguments so; OpenAI writes "{}"
            return "{}"
        try:
            parsed = strict_json(value)
        except ValueError as exc:  # not JSON, or NaN or Infinity: Python reads them, JSON does not define them
            why = "" if isinstance(exc, json.JSONDecodeError) else f" ({exc})"
            raise ValueError(f"must be a JSON object written as a string{why}") from None
        if not isinstance(parsed, dict):  # a ValueError: pydantic turns it into the field's error
            raise ValueError("must be a JSON object written as a string")  # noqa: TRY004
        return value


class ToolCallIn(BaseModel):
    """A call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message. A field it does not know is refused (`weight` is the training data's, not the
    API's); of the fields OpenAI's client echoes back from an answer, `refusal`, `annotations`,
    `audio` and `parsed` are ignored, and `function_call` (the legacy form of `tool_calls`) only
    when null.
    A trace only on an assistant message, a `tool_call_id` only on a tool result, as `tool_calls`
    only on an assistant message: elsewhere no template writes them.

    `developer` is OpenAI's newer name for `system` (its clients send it for reasoning
    models); it is rendered as `system`, since chat templates know only that one. `name`
    (OpenAI's participant name) reaches the chat template on a system, user or assistant
    message; the service refuses it where the template would not write it (`name_dropped`
    in the data). A tool message's `name` repeats its call's and is not rendered. `thinking` is
    another spelling of `reasoning_content`, as in the training data.
    """

    model_config = ConfigDict(extra="forbid")
    # Checked field by field, in this order (tool_calls before content, which may be null
    # only beside them), so that a refusal's `param` names the field at fault.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCallIn] | None = None
    content: str | list[_TextPart] | None = Field(None, validate_default=True)
    tool_call_id: str | None = Field(None, min_length=1, validate_default=True)
    reasoning_content: str | None = None
    thinking: str | None = None
    name: str | None = None
    # Echoed by OpenAI's client from an answer (`message.model_dump()`; `parsed` from its
    # `parse()` helper), ignored.
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    parsed: Any = None
    function_call: None = None

    @field_validator("function_call", mode="before")
    @classmethod
    def _legacy_call(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("function_call is the legacy form of a call, which the service does not read; send the "
                             "call in tool_calls (with an id, type 'function' and the function)")
        return value

    @field_validator("reasoning_content", "thinking")
    @classmethod
    def _trace_on_assistant_only(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only an assistant message has a reasoning trace")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Said here: pydantic's own error would only say that a part's type should be 'text'.
        for part in value if isinstance(value, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"a content part of type {part.get('type')!r} is not supported: the served model "
                                 "reads text only (a string, or parts of type 'text')")
        return value

    @field_validator("tool_calls")
    @classmethod
    def _on_assistant_only(cls, value: list | None, info: ValidationInfo) -> list | None:
        if value and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        return value

    @field_validator("content")
    @classmethod
    def _present(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _on_tool_results(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if value is not None and info.data.get("role", "tool") != "tool":
            raise ValueError("only a tool message has a tool_call_id (of the call it answers)")
        return value

    @field_validator("thinking")
    @classmethod
    def _one_spelling(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("reasoning_content") not in (None, value):
            raise ValueError("reasoning_content and thinking are two spellings of the trace: send one")
        return value

    @model_validator(mode="after")
    def _thinking_is_reasoning(self) -> ChatMessage:
        if self.thinking is not None:
            self.reasoning_content = self.thinking
        return self

    def text(self) -> str | None:
        """The message's text, its parts joined when it has several; None when it has none."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def canonical(self) -> dict:
        """The message in the project's canonical (OpenAI) form: text content, call arguments as JSON strings."""
        message: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.name and self.name.strip() and self.role != "tool":
            message["name"] = self.name
        return message


def for_template(message: dict) -> dict:
    """A canonical message as chat templates read it: call arguments as objects, not JSON strings."""
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: the arguments are always checked against the schema

    @field_validator("parameters")  # on the field: the error's path is `tools.N.function.parameters`
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        from tasks.model.tool_schemas import schema_validator

        if value is not None:
            _, complaint = schema_validator(value)  # a $ref must resolve inside it: nothing is fetched
            if complaint is not None:
                raise ValueError(f"parameters of {info.data.get('name')!r} is not a valid JSON schema: {complaint}")
        return value


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class _FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _FunctionName


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    # OpenAI pads streamed deltas with an `obfuscation` field unless this is false; the
    # service never pads, so only false (or leaving it out) is true to what it does.
    include_obfuscation: Literal[False] | None = None


# OpenAI's chat fields that the service does not honour, and the values that ask for nothing
# (what OpenAI does without them): those are accepted, any other value is refused with a 400.
UNHONOURED_FIELDS: dict[str, tuple] = {
    "response_format": ({"type": "text"},),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "functions": (),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "metadata": ({},),
    "safety_identifier": (),
    "prompt_cache_key": (),
    "verbosity": (),
    "web_search_options": (),
}


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request the service honours; any other field is refused (`unhonoured_field`)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # null is 1.0, 1.0, 1, false (`_null_is_the_default`), as OpenAI reads it; some clients send it.
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    # 0 keeps only the most likely token: greedy decoding, whatever the temperature.
    top_p: float | None = Field(1.0, ge=0.0, le=1.0)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=200, description="The client's id of its end user, recorded with "
                                                               "the interaction (OpenAI's `user`).")
    # At least one: OpenAI refuses an empty list ("[] is too short - 'tools'").
    tools: list[ToolDef] | None = Field(None, min_length=1, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    seed: int | None = Field(None, description="Seeds the sampling of this completion (best effort, as OpenAI's: "
                                               "a batch's other rows can change the last digits of its logits).")
    store: bool | None = Field(None, description="false: the completion is not written to the interaction log "
                                                 "(and cannot be rated); true or left out: it is.")

    @model_validator(mode="after")
    def _null_is_the_default(self) -> ChatRequest:
        for name in ("temperature", "top_p", "n", "stream"):
            if getattr(self, name) is None:
                setattr(self, name, type(self).model_fields[name].default)
        return self

    def stops(self) -> list[str]:
        """The stop sequences, as a list without empty ones."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


def check_request(req: ChatRequest) -> None:
    """Refuse, with a 400 naming the field, what OpenAI refuses across a request's fields.

    The fields are valid one by one: these are contradictions between them, which the
    model would otherwise meet as a prompt it was never trained on (a tool result without
    its call) or which the service would silently ignore (`stream_options` without
    `stream`).

    Raises:
        APIError: the first contradiction found.
    """
    _check_qualified_fields(req)
    _check_tool_names(req.tools or [])
    _check_tool_results(req.messages)


def _check_qualified_fields(req: ChatRequest) -> None:
    """Fields that qualify another are refused without it, as OpenAI refuses them."""
    if req.stream_options is not None and req.stream is not True:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true; leave it out, or stream.",
                       param="stream_options", code="invalid_value")
    for name in ("tool_choice", "parallel_tool_calls"):
        if getattr(req, name) is not None and req.tools is None:
            raise APIError(400, f"'{name}' is only allowed when 'tools' are specified; leave it out, or declare "
                                "the functions in tools.", param=name, code="invalid_value")


def _check_tool_names(tools: list[ToolDef]) -> None:
    """A function name declared twice is refused: a call names its function, so it would be ambiguous."""
    first: dict[str, int] = {}
    for j, tool in enumerate(tools):
        name = tool.function.name
        if name in first:
            raise APIError(400, f"tools[{j}] declares the function {name!r} again (first at tools[{first[name]}]); "
                                "function names must be unique.", param=f"tools.{j}.function.name",
                           code="invalid_value")
        first[name] = j


def _check_tool_results(messages: list[ChatMessage]) -> None:
    """Every tool call is answered by one tool message right after its assistant message, and
    every tool message answers such a call (OpenAI: "An assistant message with 'tool_calls'
    must be followed by tool messages responding to each 'tool_call_id'").

    Ids are checked per turn: a client may number its calls afresh in every turn.
    """
    caller: int | None = None  # the assistant message whose calls the next tool messages answer
    unanswered: dict[str, None] = {}  # its call ids without a result yet, in order
    for i, message in enumerate([*messages, None]):
        if message is not None and message.role == "tool":
            cid = message.tool_call_id
            if caller is None:
                raise APIError(400, f"messages[{i}] answers the tool call {cid!r}, but no assistant message with "
                                    "tool_calls comes before it: tool messages must follow the assistant message "
                                    "whose calls they answer.", param=f"messages.{i}.tool_call_id",
                               code="invalid_value")
            if cid not in unanswered:
                again = any(c.id == cid for c in messages[caller].tool_calls or [])
                said = (f"answers the tool call {cid!r} of messages[{caller}] a second time" if again else
                        f"answers the tool call {cid!r}, which is not a call of messages[{caller}]")
                raise APIError(400, f"messages[{i}] {said}.", param=f"messages.{i}.tool_call_id",
                               code="invalid_value")
            del unanswered[cid]
            continue
        if unanswered:
            raise APIError(400, f"messages[{caller}] has tool_calls that no tool message answers: "
                                f"{', '.join(map(repr, unanswered))}. An assistant message with tool_calls must be "
                                "followed by a tool message answering each tool_call_id.",
                           param=f"messages.{caller}.tool_calls", code="invalid_value")
        caller = None
        if message is not None and message.tool_calls:
            caller = i
            for j, call in enumerate(message.tool_calls):
                if call.id in unanswered:
                    raise APIError(400, f"messages[{i}] has two tool calls with the id {call.id!r}, so a tool "
                                        "message could not say which one it answers.",
                                   param=f"messages.{i}.tool_calls.{j}.id", code="invalid_value")
                unanswered[call.id] = None


def unhonoured_field(body: dict) -> APIError | None:
    """A 400 naming the first field of a chat request the service would not honour, or None.

    Fields the request model does not know are refused; OpenAI's fields that the service
    does not implement are refused unless null or at a value that asks for nothing
    (`UNHONOURED_FIELDS`), which are removed from `body`.
    """
    for key in list(body):
        if key in ChatRequest.model_fields:
            continue
        value = body[key]
        if key in UNHONOURED_FIELDS and (value is None or any(value == v and type(value) is type(v)
                                                               for v in UNHONOURED_FIELDS[key])):
            del body[key]
            continue
        what = "is not implemented by this service" if key in UNHONOURED_FIELDS else "is not a field of this API"
        return APIError(400, f"'{key}' {what}; leave it out (see docs/guides/serving-tools.md for the fields "
                             "the service honours).", param=key, code="unsupported_parameter")
    return None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=200)
    rating: int = Field(ge=1, le=5)
    correction: str | None = Field(None, min_length=1)
    user: str | None = Field(None, min_length=1, max_length=200,
                             description="The client's id of the end user who gave the feedback.")

    @field_validator("correction")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        # The feedback store refuses a blank correction too; refused here, it is a 400.
        if value is not None and not value.strip():
            raise ValueError("must not be blank; leave it out to rate the answer as it is")
        return value
