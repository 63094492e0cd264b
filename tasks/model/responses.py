"""Reading a generation back into a message: the answer, the reasoning trace and the tool calls.

Serving and evaluation parse what a model wrote with the same function, `parse_generation`,
so a call the service returns to a client is a call evaluation counts, and the reverse.

The parsing itself is transformers' (`tokenizer.parse_response` and its streaming
`ResponseParser`), driven by a *response template*: a description of where each field of
the assistant message lies in the text. The template is, in order:

1. the tokenizer's own `response_template`, where the model ships one (the model's
   authors know its format best); tool arguments are then typed from the tools' schemas,
   as that parser does;
2. otherwise one of three built-in templates, chosen from what the chat template writes
   (`detect_format`):
   - `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks
     (Qwen 2.5, Qwen 3, the ChatML of the `tiny` model, Hermes);
   - `llama3`: the whole answer is one JSON object `{"name": ..., "parameters": {...}}`
     (Llama 3.1 and 3.2; 3.2 models often write `{"type": "function", "name": ...}`, read too);
   - `mistral`: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (Mistral v0.3);
3. or none: a template that renders no tool calls gets its text as the answer.

Where the chat template writes reasoning traces (`<think>` in it: Qwen 3, DeepSeek-R1, the
`tiny` model's ChatML), the built-in templates also split a `<think>...</think>` block off the
start of the answer, also when the prompt already opened it, into `reasoning_content`. Where
it does not, a model was never trained to write one there (such data is refused before
training, `check_reasoning_rendering`), and a `<think>` it writes is part of the answer, with
tools offered or not.

A call is *invalid* when its text cannot be parsed, when it names a function that the
request did not declare, or when its arguments fail that function's JSON schema
(`parameters`, checked with jsonschema). An invalid call is not returned as a call: the
service answers with its text (see docs/guides/serving-tools.md) and evaluation counts it
in `tool_invalid_rate`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

# `<think>` ... `</think>`: the reasoning block Qwen 3 and DeepSeek-R1 write before the answer.
_REASONING = {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"}

# The built-in templates parse the generation alone: their start is the start of what they
# are given (`_prefix` passes on an opened `<think>` only), so no prompt text is read as answer.
_START = r"\A"

# The built-in response templates (transformers' `response_template` format). Content and
# the calls end at the end of the generation: the service and evaluation decode it
# without the end-of-turn token.
FORMATS: dict[str, dict] = {
    "hermes": {
        "defaults": {"role": "assistant"},
        "start_anchor_pattern": _START,
        "fields": {
            "reasoning_content": _REASONING,
            "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                           "content": "json"},
            "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
        },
    },
    "llama3": {
        "defaults": {"role": "assistant"},
        "start_anchor_pattern": _START,
        "fields": {
            "reasoning_content": _REASONING,
            # `{"name": ...}` as the 3.1 template asks; `{"type": "function", "name": ...}` as Llama 3.2 models often write it
            "tool_calls": {"open_pattern": r'^\s*(?:<\|python_tag\|>)?(?=\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name")',
                           "close_pattern": r"<\|eom_id\|>|$",
                           "content": "json"},
            "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"},
        },
    },
    "mistral": {
        "defaults": {"role": "assistant"},
        "start_anchor_pattern": _START,
        "fields": {
            "reasoning_content": _REASONING,
            "tool_calls": {"open": "[TOOL_CALLS]", "close_pattern": r"</s>|$", "content": "json"},
            "content": {"close_pattern": r"</s>\s*", "content": "text"},
        },
    },
}
# What the chat template writes for a call in each format, checked in this order.
_SIGNATURES = (("mistral", "[TOOL_CALLS]"), ("hermes", "<tool_call>"), ("llama3", '"parameters"'))
# The text that opens a call in each format: content before it is the answer, after it a call.
CALL_OPENINGS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3": "{"}


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: `arguments` is the decoded JSON object."""

    id: str
    name: str
    arguments: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The call as OpenAI writes it: arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class ParsedResponse:
    """A generation read back.

    Attributes:
        content: the answer, without the reasoning trace and without the calls' text.
        reasoning_content: the reasoning trace, or None when there is none.
        tool_calls: the valid calls, in order ([] when `invalid` is set).
        invalid: why the calls could not be used ("" when they could, or there are none).
        text: the generation after the reasoning trace, as written: what the service
            returns as the answer when the calls are invalid.
    """

    content: str
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid: str = ""
    text: str = ""

    @property
    def answer(self) -> str:
        """The answer a user reads: the content, or the text as written (trimmed) when the calls are invalid."""
        return self.text.strip() if self.invalid else self.content


_ID_CHARACTERS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An id for a call, in OpenAI's shape: `call_` and 24 random letters and digits (no `-` or `_`,
    which a client that checks the shape refuses)."""
    return "call_" + "".join(secrets.choice(_ID_CHARACTERS) for _ in range(24))


def detect_format(tokenizer) -> str | None:
    """The built-in format the tokenizer's chat template writes calls in, or None."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = template.get("default", "")
    return next((name for name, marker in _SIGNATURES if marker in template), None)


def response_template(tokenizer) -> tuple[dict | None, bool]:
    """(the response template to parse with, whether it is the model's own) for a tokenizer.

    The model's own (`tokenizer.response_template`) comes first; else a built-in one for
    the template's call format; else one that reads only the reasoning trace and the answer.
    A built-in one reads a reasoning trace only where the chat template writes them.
    """
    own = getattr(tokenizer, "response_template", None)
    if own:
        return own, True
    name = detect_format(tokenizer)
    template = FORMATS[name] if name is not None else {
        "defaults": {"role": "assistant"}, "start_anchor_pattern": _START, "fields": {
            "reasoning_content": _REASONING, "content": {"close_pattern": r"$", "content": "text"}}}
    if not writes_reasoning(tokenizer):
        template = {**template, "fields": {k: v for k, v in template["fields"].items() if k != "reasoning_content"}}
    return template, False


def writes_reasoning(tokenizer) -> bool:
    """Whether the tokenizer's chat template writes reasoning traces (in `<think>` blocks)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return "<think>" in str(template)


def parse_generation(tokenizer, text: str, prompt: str, tools: list[dict] | None,
                     first_call_only: bool = False, forced: bool = False) -> ParsedResponse:
    """Read a generation into its answer, reasoning trace and calls, and check the calls.

    Args:
        tokenizer: the model's tokenizer (its chat template, or its own response template).
        text: what the model wrote after `prompt`, decoded without the end-of-turn token.
        prompt: the rendered prompt: a template that opens `<think>` in it is read correctly.
        tools: the tools the request declared; None reads no calls (any call text is answer).
        first_call_only: return the first call only (`parallel_tool_calls: false`, a named
            `tool_choice`); where the calls after it make the answer invalid (a call to another
            function, one cut off by the token limit), the text up to the end of the first call
            is read instead, so that they cannot spoil it. Where one region holds every call
            (Mistral's JSON list), that is the list closed after its first element.
        forced: the service forced a call (`tool_choice` required or named): where the calls
            are invalid but the first is not, the first is returned, as with `first_call_only`,
            so the answer is the call the request asked for, not text.
    """
    parsed = _parse(tokenizer, text, prompt, tools, first_call_only)
    if (first_call_only or forced) and parsed.invalid:
        template, own = response_template(tokenizer)
        cut = _through_first_call(template, prompt if own else _prefix(prompt), text)
        if cut == text:
            cut = _first_of_list(text)
        first = _parse(tokenizer, cut, prompt, tools, True) if cut != text else parsed
        if not first.invalid:  # an invalid first call is returned as the text as written, all of it
            return first
    return parsed


def _parse(tokenizer, text: str, prompt: str, tools: list[dict] | None, first_call_only: bool) -> ParsedResponse:
    from transformers.utils.chat_parsing import ResponseParser

    template, own = response_template(tokenizer)
    prefix = prompt if own else _prefix(prompt)
    try:
        parser = ResponseParser(template, prefix=prefix, tools=tools if own else None)
        events = parser.feed(text)
        message, last = parser.finalize()
    except (ValueError, RecursionError) as exc:  # a call region that is not JSON, or nests past the parser
        reasoning, rest = split_reasoning(text, prompt) if own or writes_reasoning(tokenizer) else (None, text)
        return ParsedResponse(_before_call(rest), reasoning, [], f"unparseable tool call ({_first_line(exc)})", rest)
    reasoning = message.get("reasoning_content") or message.get("thinking") or None
    rest = split_reasoning(text, prompt)[1] if reasoning else text
    raw_calls = message.get("tool_calls") or []
    # The library's message keeps the last stretch of text only; text on both sides of a call
    # is all answer (and is what the stream sends), so the stretches are joined.
    content = ("".join(e["text"] for e in [*events, *last] if e["type"] == "region_chunk" and e["field"] == "content").strip()
               if raw_calls else message.get("content") or "")
    if not raw_calls:
        return ParsedResponse(content if (tools or reasoning) else text.strip(), reasoning, [], "", rest)
    if not tools:  # a call to a function the request did not offer
        return ParsedResponse(content, reasoning, [], "the request declared no tools", rest)
    if first_call_only:  # one call object (Llama 3's format) or a list of them
        raw_calls = (raw_calls if isinstance(raw_calls, list) else [raw_calls])[:1]
    calls, problem = check_calls(raw_calls, tools)
    return ParsedResponse(content, reasoning, calls, problem, rest)


def _through_first_call(template: dict, prefix: str, text: str) -> str:
    """`text` up to the end of its first call region, or all of it where that region does not
    end (one region holds every call, as Mistral's JSON list does, or the call is cut off)."""
    from transformers.utils.chat_parsing import ResponseParser

    parser = ResponseParser(template, prefix=prefix)
    for end in range(1, len(text) + 1):  # one character at a time: the parser says where a region closes
        try:
            events = parser.feed(text[end - 1])
        except (ValueError, RecursionError):
            return text
        if any(e["type"] == "region_close" and e["field"] == "tool_calls" for e in events):
            # A close pattern that ends in `\s*` is known closed one character late, at the start
            # of what follows (the next call's `<`): without it, the region closes at the end.
            return text[:end - 1] if _closes_one_call(template, prefix, text[:end - 1]) else text[:end]
    return text


def _first_of_list(text: str) -> str:
    """Mistral's call list closed after its first call (`[TOOL_CALLS] [{...}]`), or `text` where
    it holds no complete first call."""
    marker = CALL_OPENINGS["mistral"]
    start = text.find(marker)
    if start < 0:
        return text
    rest = text[start + len(marker):]
    bracket = len(rest) - len(rest.lstrip())
    if not rest[bracket:].startswith("["):
        return text
    body = bracket + 1 + len(rest[bracket + 1:]) - len(rest[bracket + 1:].lstrip())
    try:
        _, end = json.JSONDecoder().raw_decode(rest, body)
    except json.JSONDecodeError:
        return text
    return text[:start + len(marker) + end] + "]"


def _closes_one_call(template: dict, prefix: str, text: str) -> bool:
    from transformers.utils.chat_parsing import parse_response

    try:
        message = parse_response(text, template, prefix=prefix)
    except (ValueError, RecursionError):
        return False
    return len(message.get("tool_calls") or []) == 1


def split_reasoning(text: str, prompt: str = "") -> tuple[str | None, str]:
    """(the `<think>` block's text or None, the rest): the block may have been opened by the prompt."""
    opened = prompt.rstrip().endswith("<think>")
    match = re.match(r"\s*<think>(.*?)</think>\s*" if not opened else r"(.*?)</think>\s*", text, re.DOTALL)
    if match is None:
        return None, text
    return match.group(1).strip() or None, text[match.end():]


def check_calls(raw_calls: Any, tools: list[dict]) -> tuple[list[ToolCall], str]:
    """The calls as `ToolCall`s, and "" or why they are invalid (the first problem found).

    Accepts what the templates parse to: `{type, function: {name, arguments}}`,
    `{name, arguments}` or Llama's `{name, parameters}`, one or a list of them.
    """
    from jsonschema.exceptions import best_match
    from referencing.exceptions import Unresolvable

    from tasks.model.tool_schemas import SCHEMA_TOO_DEEP, finite, schema_validator, strict_json

    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"}
               for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    calls: list[ToolCall] = []
    for raw in raw_calls if isinstance(raw_calls, list) else [raw_calls]:
        fn = raw.get("function", raw) if isinstance(raw, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            return [], f"unparseable tool call (no function name in {json.dumps(raw)[:80]})"
        arguments = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the OpenAI string form
            try:
                arguments = strict_json(arguments)
            except ValueError:
                return [], f"unparseable tool call (arguments of {name!r} are not JSON)"
        if not finite(arguments):  # the library's parser reads NaN and Infinity, which JSON does not define
            return [], f"unparseable tool call (arguments of {name!r} hold NaN or Infinity, which are not JSON)"
        if name not in schemas:
            return [], f"unknown function {name!r}"
        if not isinstance(arguments, dict):
            return [], f"arguments of {name!r} are not a JSON object"
        validator, complaint = schema_validator(schemas[name])
        if complaint is not None:
            return [], f"the schema of {name!r} is not a valid JSON schema: {complaint}"
        try:
            error = best_match(validator.iter_errors(arguments))  # what jsonschema.validate raises
        except Unresolvable as exc:  # a $ref the schema does not define (nothing is fetched)
            return [], f"the schema of {name!r} has a reference that cannot be resolved: {exc}"
        except RecursionError:  # arguments nested past what the checker recurses through
            return [], f"arguments of {name!r} cannot be checked against its schema: {SCHEMA_TOO_DEEP}"
        if error is not None:
            return [], f"arguments of {name!r} fail its schema: {error.message}"
        calls.append(ToolCall(new_call_id(), name, arguments))
    return calls, ""


def _prefix(prompt: str) -> str:
    """What a built-in template must see of the prompt: a `<think>` it opened, or nothing."""
    return "<think>\n" if prompt.rstrip().endswith("<think>") else ""


def _before_call(text: str) -> str:
    cut = min((i for i in (text.find(m) for m in ("<tool_call>", "[TOOL_CALLS]")) if i >= 0), default=len(text))
    return text[:cut].strip()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------------------------- streaming


class ResponseStream:
    """Reads a generation as it streams: the reasoning and answer text as it comes, the calls at the end.

    `feed(delta)` returns the ("reasoning_content", text) and ("content", text) pieces that
    are final; call text is held back. `finish()` parses the whole generation
    (`parse_generation`) and returns it with the pieces still owed: what `feed` held
    back as content, so that the streamed pieces join to the same message as the
    unstreamed answer. A call is sent only once it is complete and checked: an invalid one
    turns into text.
    """

    def __init__(self, tokenizer, prompt: str, tools: list[dict] | None, first_call_only: bool = False,
                 forced: bool = False) -> None:
        from transformers.utils.chat_parsing import ResponseParser

        self.tokenizer, self.prompt, self.tools = tokenizer, prompt, tools
        self.first_call_only, self.forced = first_call_only, forced
        template, own = response_template(tokenizer)
        self._parser = ResponseParser(template, prefix=prompt if own else _prefix(prompt))
        self._text: list[str] = []
        self._sent = {"content": "", "reasoning_content": ""}
        # Whitespace at the end of each field so far: a parsed field is trimmed, so it is sent
        # only once more text follows it.
        self._pending = {"content": "", "reasoning_content": ""}
        self._failed = False
        # Once a call opens, no more text is sent until the end: were the call invalid, the
        # answer is the text as written, whose next piece is the call's text, not what follows it.
        self._held = False

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._text.append(delta)
        if self._failed or self._held:
            return []
        try:
            events = self._parser.feed(delta)
        except (ValueError, RecursionError):  # a call that is not JSON (or too deep to read): finish() returns its text
            self._failed = True
            return []
        out = []
        for event in events:
            if event["type"] == "region_open" and event["field"] == "tool_calls":
                self._held = True
                break
            name = event["field"]
            if event["type"] != "region_chunk" or name not in self._sent:
                continue
            piece = self._pending[name] + event["text"]
            if not self._sent[name]:
                piece = piece.lstrip()
            kept = piece.rstrip()  # whitespace at the end is sent once more text follows it
            self._pending[name] = piece[len(kept):]
            if kept:
                self._sent[name] += kept
                out.append((name, kept))
        return out

    def finish(self) -> tuple[ParsedResponse, list[tuple[str, str]]]:
        """The whole generation parsed, and the content and reasoning pieces not yet sent."""
        parsed = parse_generation(self.tokenizer, "".join(self._text), self.prompt, self.tools, self.first_call_only,
                                  self.forced)
        owed = []
        for name, full in (("reasoning_content", parsed.reasoning_content or ""), ("content", parsed.answer)):
            sent = self._sent[name]
            rest = full.removeprefix(sent)
            if rest:
                owed.append((name, rest))
        return parsed, owed


def needs_parsing(tokenizer, tools: list[dict] | None) -> bool:
    """Whether a generation must be parsed: tools were offered, or the template or model can write a reasoning trace."""
    return bool(tools) or bool(getattr(tokenizer, "response_template", None)) or writes_reasoning(tokenizer)
