"""Per-example checks shared by validation and prepare: structure, roles, keys, warnings, duplicates.

Each problem belongs to a named category. Validation and prepare read examples through
`iter_checked`, normalise them with `normalise_example` and deduplicate them with one
`Deduplicator`, so both see the same examples and the same duplicates.

Error categories (any non-zero count makes the file invalid):
    invalid_utf8, invalid_json, not_an_object, no_examples, missing_messages,
    message_missing_field, unrecognised_keys, unknown_role, bad_content, no_assistant,
    last_not_assistant, consecutive_same_role, system_not_first, duplicate,
    near_duplicate, over_token_limit, no_trained_tokens, reasoning_dropped, tool_call_dropped,
    answer_not_located, name_dropped.
Tool calling, weights and reasoning (`check_tools`, as strict as mistral-finetune and
mistral-common; structural errors too):
    bad_tool_schema (a tool without a name matching ^[a-zA-Z0-9_-]{1,64}$, a description,
    or `parameters` that are a valid JSON schema), bad_tool_call (a call without an id, a
    repeated id, not of type function, without a function name; several calls in one turn
    under `parallel_tool_calls: false`), undeclared_tool (a call
    naming no tool of `tools`), bad_tool_arguments (`arguments` not a JSON object, nor a
    string holding one), arguments_fail_schema (arguments the tool's `parameters` refuse),
    unexpected_tool_result (a tool message without a pending call's id, or more results
    than calls), missing_tool_result (a call left unanswered before the conversation
    goes on), bad_weight (a weight not 0 or 1, or on a message that is not the
    assistant's), all_weights_zero (every assistant turn has weight 0: nothing to train),
    bad_reasoning (a reasoning trace that is not a non-empty string, or two that differ:
    `reasoning_content` and `thinking` on one message).
Warning categories (reported, the file stays valid):
    no_system_message, no_user_message, short_answer, over_token_limit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.formats import (
    MESSAGE_KEYS,
    RESPONSE_ONLY_KEYS,
    TOP_KEYS,
    RecordError,
    check_format_name,
    detect_format,
    read_records,
    to_canonical,
)
from tasks.errors import FormatError

TOOL_CATEGORIES = (
    "bad_tool_schema",
    "bad_tool_call",
    "undeclared_tool",
    "bad_tool_arguments",
    "arguments_fail_schema",
    "unexpected_tool_result",
    "missing_tool_result",
    "bad_weight",
    "all_weights_zero",
    "bad_reasoning",
)

ERROR_CATEGORIES = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "no_examples",
    "missing_messages",
    "message_missing_field",
    "unrecognised_keys",
    "unknown_role",
    "bad_content",
    "no_assistant",
    "last_not_assistant",
    "consecutive_same_role",
    "system_not_first",
    *TOOL_CATEGORIES,
    "duplicate",
    "near_duplicate",
    "over_token_limit",
    "no_trained_tokens",
    "reasoning_dropped",
    "tool_call_dropped",
    "answer_not_located",
    "name_dropped",
    "train_test_overlap",
)


WARNING_CATEGORIES = ("no_system_message", "no_user_message", "short_answer", "over_token_limit")


# Problems of an example's structure (tool calling's included): such an example is not
# token-counted nor deduplicated.
STRUCTURAL = frozenset(ERROR_CATEGORIES[: ERROR_CATEGORIES.index(TOOL_CATEGORIES[-1]) + 1])

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # mistral-common's and OpenAI's function names


ROLES = ("system", "user", "assistant", "tool", "function")


@dataclass
class CheckedExample:
    """One canonical example (or unreadable record) with its problems, as read from the file."""

    ordinal: int
    line: int
    example: dict | None
    problems: dict[str, str]
    source: Any = None

    @property
    def structurally_ok(self) -> bool:
        return not (STRUCTURAL & self.problems.keys())


def check_messages(messages: Any) -> dict[str, str]:
    """Structural checks of one canonical example's messages.

    Args:
        messages: the value of `messages` (anything; a list of role/content dicts is right).

    Returns:
        category -> message for each error category the example falls in (at most one
        message per category, naming the first offending message).
    """
    if not isinstance(messages, list) or not messages:
        what = "is empty" if isinstance(messages, list) else "is missing" if messages is None else "is not a list"
        return {"missing_messages": f"`messages` {what}; an example needs a list of role/content messages"}
    problems: dict[str, str] = {}
    for i, m in enumerate(messages, start=1):
        _check_message(i, m, problems)
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.setdefault("no_assistant", "no assistant message: there is nothing to train on")
    elif roles[-1] != "assistant":
        problems.setdefault("last_not_assistant", f"the last message is from {roles[-1]!r}, not the assistant")
    dicts = [m for m in messages if isinstance(m, dict)]
    for j in range(1, len(roles)):
        if roles[j] == roles[j - 1] and roles[j] != "tool":  # parallel tool results may follow each other
            if roles[j] == "assistant" and (dicts[j - 1].get("tool_calls") or dicts[j - 1].get("function_call")):
                problems.setdefault("missing_tool_result", (  # what a ShareGPT function_call without observation is
                    f"message {j} calls a tool and message {j + 1} answers with no tool result between them; "
                    "give each call its result (a tool message, or an observation turn in ShareGPT)"))  # fmt: skip
            else:
                problems.setdefault("consecutive_same_role", f"messages {j} and {j + 1} are both from {roles[j]!r}")
            break
    if "system" in roles[1:]:
        problems.setdefault("system_not_first", f"a system message at position {roles.index('system', 1) + 1}; it must come first")
    return problems


def _check_message(i: int, m: Any, problems: dict[str, str]) -> None:
    if not isinstance(m, dict):
        problems.setdefault("message_missing_field", f"message {i} is not an object with role and content")
        return
    tool_call = m.get("role") == "assistant" and bool(m.get("tool_calls") or m.get("function_call"))
    missing = [k for k in ("role", "content") if k not in m and not (k == "content" and tool_call)]
    if missing:
        problems.setdefault("message_missing_field", f"message {i} has no {' and no '.join(missing)}")
    if "role" in m and m["role"] not in ROLES:
        problems.setdefault("unknown_role", f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if "content" in m and not (tool_call and m["content"] in (None, "")):  # a call turn may have no text
        content = m["content"]
        if isinstance(content, list):
            kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content}) or ["none"]
            problems.setdefault("bad_content", (
                f"message {i} content is a list of parts of type {', '.join(kinds)}; only text parts "
                '({"type": "text", "text": ...}) can be trained: write the content as text, or drop the example'
            ))  # fmt: skip
        elif not isinstance(content, str):
            problems.setdefault("bad_content", (
                f"message {i} content is {type(content).__name__}, not a string; write it as text "
                "(a tool's result as the JSON string of it)"
            ))  # fmt: skip
        elif not content.strip() and m.get("role") != "tool":  # a function may return nothing
            problems.setdefault("bad_content", f"message {i} content is empty; write the text, or drop the message")


def check_tools(example: dict, parallel: bool = True) -> dict[str, str]:
    """Tool calling, weight and reasoning checks of a structurally valid canonical example.

    Args:
        example: the canonical example.
        parallel: the example allows several calls in one turn (`parallel_tool_calls`, true unless set false).

    Returns:
        category -> message for each tool category the example falls in (the first
        offending tool or message is named).
    """
    problems: dict[str, str] = {}
    schemas = _check_schemas(example.get("tools"), problems)
    messages = example["messages"]
    pending: list[str] = []  # ids of calls awaiting their result, in order
    seen: set[str] = set()  # ids of the current turn's calls
    names: dict[str, Any] = {}  # each call id's function name
    for i, m in enumerate(messages, start=1):
        role = m.get("role")
        if "function_call" in m:  # left by to_canonical where it could not become the turn's one call
            why = ("that is not a call ({name, arguments})" if not isinstance(m["function_call"], dict)
                   else "beside calls in tool_calls" if role == "assistant" else f"on a {role} message")
            problems.setdefault("bad_tool_call", f"message {i} has a legacy function_call {why}; write every call once, in tool_calls")
        if "weight" in m and (role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
            where = f"on a {role} message" if role != "assistant" else f"of {m['weight']!r}"
            problems.setdefault("bad_weight", f"message {i} has a weight {where}; weight is 0 or 1, on assistant messages")
        # What only an assistant turn (or only a tool result) holds: no template renders it elsewhere.
        if role != "assistant" and m.get("tool_calls"):
            problems.setdefault("bad_tool_call", f"message {i} ({role}) has tool_calls; only an assistant message makes "
                                                 "calls: move them to the assistant turn that makes them")
        if role != "assistant" and any(m.get(k) for k in ("reasoning_content", "thinking")):
            problems.setdefault("bad_reasoning", f"message {i} ({role}) has a reasoning trace; only an assistant message "
                                                 "has one: move it to the answer it leads to, or remove it")
        if role != "tool" and m.get("tool_call_id") is not None:
            problems.setdefault("unexpected_tool_result", f"message {i} ({role}) has a tool_call_id; only a tool result "
                                                          "answers a call: give it role tool, or remove the id")
        if "reasoning_content" in m and not (isinstance(m["reasoning_content"], str) and m["reasoning_content"].strip()):
            problems.setdefault("bad_reasoning", f"message {i}: reasoning_content is not a non-empty string")
        if "thinking" in m:
            problems.setdefault("bad_reasoning", f"message {i}: reasoning_content and thinking differ; they are two "
                                                 "spellings of one trace: keep one")
        if role == "tool":
            call_id, named = m.get("tool_call_id"), m.get("name")
            if call_id in pending:
                pending.remove(call_id)
                called = names.get(call_id)
                if isinstance(named, str) and called is not None and named != called:
                    problems.setdefault("unexpected_tool_result", (
                        f"message {i} (tool) answers the call {call_id!r} to {called!r} but names {named!r}; "
                        "give it the id of the call it answers, or its function's name"))  # fmt: skip
            else:
                waiting = ", ".join(f"{names.get(p)} ({p!r})" for p in pending)
                why = (f"names {named!r}, which none of the pending calls makes ({waiting})" if call_id is None and pending
                       else "has no tool_call_id and follows no call still without a result" if call_id is None
                       else f"answers {call_id!r}, which no pending call has")
                problems.setdefault("unexpected_tool_result", f"message {i} (tool) {why}; a result follows the call it answers")
            continue
        if pending:
            problems.setdefault("missing_tool_result", f"call {pending[0]!r} gets no tool result before message {i}")
            pending = []
        if not parallel and role == "assistant" and len(m.get("tool_calls") or []) > 1:
            problems.setdefault("bad_tool_call", (
                f"message {i} makes {len(m['tool_calls'])} calls although the example sets parallel_tool_calls: false; "
                "split them into one call per turn, or remove parallel_tool_calls"
            ))  # fmt: skip
        # An id is one call's within its turn: agent frameworks and converted data sets number
        # each turn's calls afresh (`call_0` again), and the service takes that, its results
        # paired by the pending calls; only two calls of one turn may not share one.
        seen = set()
        for call in m.get("tool_calls") or [] if role == "assistant" else []:
            call_id = _check_call(i, call, schemas, seen, problems)
            if call_id is not None:
                pending.append(call_id)
                function = call.get("function") if isinstance(call, dict) else None
                names[call_id] = function.get("name") if isinstance(function, dict) else None
    if messages and all(m.get("weight") == 0 for m in messages if m.get("role") == "assistant"):
        problems.setdefault("all_weights_zero", "every assistant message has weight 0: there is nothing to train on")
    return problems


def _check_schemas(tools: Any, problems: dict[str, str]) -> dict[str, Any] | None:
    """The declared tools' parameter-schema validators by name (None when the example declares none)."""
    from tasks.model.tool_schemas import schema_validator

    if tools is None:
        return None
    if not isinstance(tools, list):
        problems["bad_tool_schema"] = f"`tools` is a {type(tools).__name__}, not a list of tool schemas"
        return {}
    schemas: dict[str, Any] = {}
    for k, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict):
            problem = 'is not {"type": "function", "function": {name, description, parameters}}'
        elif not isinstance(function.get("name"), str) or not TOOL_NAME.match(function["name"]):
            problem = f"has the name {function.get('name')!r}; names match ^[a-zA-Z0-9_-]{{1,64}}$"
        elif not isinstance(function.get("description"), str) or not function["description"].strip():
            problem = f"({function['name']}) has no description"
        elif not isinstance(function.get("parameters"), dict):
            problem = f"({function['name']}) has no parameters object (an empty object when it takes none)"
        else:
            validator, complaint = schema_validator(function["parameters"])
            if complaint is None:
                schemas[function["name"]] = validator
                continue
            problem = f"({function['name']}) parameters are not a valid JSON schema: {complaint}"
        problems.setdefault("bad_tool_schema", f"tool {k} {problem}")
    return schemas


def _check_call(i: int, call: Any, schemas: dict[str, Any] | None, seen: set[str], problems: dict[str, str]) -> str | None:
    """Check one call of message `i` against the declared tools' validators; its id when it has one."""
    function = call.get("function") if isinstance(call, dict) else None
    call_id = call.get("id") if isinstance(call, dict) else None
    if not isinstance(call_id, str) or not call_id.strip():
        problems.setdefault("bad_tool_call", f"message {i}: a tool call has no id; give every call a unique id")
        call_id = None
    elif call_id in seen:
        problems.setdefault("bad_tool_call", f"message {i}: two calls of the turn have the id {call_id!r}; give each its own")
    if call_id:
        seen.add(call_id)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or call.get("type", "function") != "function":
        got = json.dumps(function, ensure_ascii=False)[:60] if function is not None else "none"
        problems.setdefault("bad_tool_call", f'message {i}: a tool call is not {{"type": "function", "function": '
                                             f'{{name, arguments}}}} (its function: {got})')
        return call_id
    name = function["name"]
    if schemas is None or (name not in schemas and not problems.get("bad_tool_schema")):
        declared = "the example declares no tools" if schemas is None else f"declared: {', '.join(schemas) or 'none'}"
        problems.setdefault("undeclared_tool", f"message {i} calls {name!r}, which is not in `tools` ({declared})")
    from tasks.model.tool_schemas import SCHEMA_TOO_DEEP, strict_json

    arguments = function.get("arguments")
    try:
        parsed = strict_json(arguments) if isinstance(arguments, str) else None
    except ValueError as exc:  # not JSON, or NaN / Infinity, which JSON does not define
        parsed = None if isinstance(exc, json.JSONDecodeError) else str(exc)
    if isinstance(parsed, str):
        problems.setdefault("bad_tool_arguments", f"message {i}: the arguments of {name!r} are not JSON: {parsed}")
    elif not isinstance(parsed, dict):
        problems.setdefault("bad_tool_arguments", f"message {i}: the arguments of {name!r} are not a JSON object (nor a string holding one)")
    elif schemas and name in schemas:
        from referencing.exceptions import Unresolvable

        try:
            error = next(iter(schemas[name].iter_errors(parsed)), None)
        except Unresolvable as exc:  # under a nested $id (the rest are checked with the schema); nothing is fetched
            problems.setdefault("bad_tool_schema", f"the parameters of {name!r} have a $ref that does not resolve: {exc}")
            return call_id
        except RecursionError:  # arguments nested past what the checker recurses through
            problems.setdefault("bad_tool_arguments", f"message {i}: the arguments of {name!r} cannot be checked "
                                                      f"against its parameters: {SCHEMA_TOO_DEEP}")
            return call_id
        if error is not None:
            problems.setdefault("arguments_fail_schema", f"message {i}: the arguments of {name!r} fail its parameters: {error.message}")
    return call_id


def check_keys(obj: dict, fmt: str) -> str | None:
    """A message naming the keys of `obj` (or of its messages) that `fmt` does not know, or None."""
    unknown = sorted(map(str, obj.keys() - TOP_KEYS[fmt]))
    inner_key = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instances"}[fmt]
    inner = obj.get(inner_key)
    inner_unknown: set[str] = set()
    if isinstance(inner, list):
        for m in inner:
            if isinstance(m, dict):
                extra = m.keys() - MESSAGE_KEYS[fmt]
                if fmt == "openai":
                    extra -= {k for k in RESPONSE_ONLY_KEYS & extra if m[k] in (None, "", [])}
                inner_unknown |= extra
    parts = []
    if unknown:
        parts.append(f"unrecognised keys {', '.join(unknown)}")
    if inner_unknown:
        parts.append(f"unrecognised keys in {inner_key}: {', '.join(sorted(map(str, inner_unknown)))}")
    if not parts:
        return None
    hint = "remove or rename them"
    if fmt == "openai" and inner_unknown & RESPONSE_ONLY_KEYS:
        hint += (f" ({', '.join(sorted(inner_unknown & RESPONSE_ONLY_KEYS))} of a logged API response: no chat"
                 " template renders them; move a refusal's text to content to train it)")
    return f"{'; '.join(parts)} for format {fmt}; {hint}"


def check_warnings(messages: list[dict], min_answer_chars: int) -> dict[str, str]:
    """Warning categories of a structurally valid example."""
    roles = {m["role"] for m in messages}
    found: dict[str, str] = {}
    if "system" not in roles:
        found["no_system_message"] = "no system message"
    if "user" not in roles:
        found["no_user_message"] = "no user message"
    for i, m in enumerate(messages, start=1):
        if (m["role"] == "assistant" and not m.get("tool_calls") and isinstance(m.get("content"), str)
                and len(m["content"].strip()) < min_answer_chars):  # a call turn's content may be empty
            found["short_answer"] = f"message {i}: answer of {len(m['content'].strip())} characters (< {min_answer_chars})"
            break
    return found


def normalise_example(example: dict) -> dict:
    """The example with whitespace stripped around every message's content but a tool's result,
    which is kept as the function returned it (what prepare writes; results compare exactly)."""
    messages = [{**m, "content": m["content"].strip()}
                if isinstance(m.get("content"), str) and m.get("role") not in ("tool", "function") else m
                for m in example["messages"]]
    return {**example, "messages": messages}


class Deduplicator:
    """The one duplicate check: exact repeats, then repeats up to case and whitespace; the first stays."""

    def __init__(self) -> None:
        self._exact: dict[bytes, int] = {}
        self._loose: dict[bytes, int] = {}

    def check(self, messages: list[dict], line: int, tools: Any = None) -> tuple[str, str] | None:
        """(category, message) when `messages` (with `tools`) repeat an earlier example, else None; remembers it."""
        d_exact, d_loose = example_digests(messages, tools)
        found = None
        if d_exact in self._exact:
            found = ("duplicate", f"the same example as line {self._exact[d_exact]}")
        elif d_loose in self._loose:
            found = ("near_duplicate", f"the same as line {self._loose[d_loose]} up to case and whitespace")
        self._exact.setdefault(d_exact, line)
        self._loose.setdefault(d_loose, line)
        return found


# Besides the content, what tells two messages apart: calls, their results, traces and weights.
_DIGEST_KEYS = ("tool_calls", "tool_call_id", "reasoning_content", "weight")


def example_digests(messages: list[dict], tools: Any = None) -> tuple[bytes, bytes]:
    """(exact, normalised) digests of an example; normalised ignores case and whitespace runs in
    what people write, not in a tool's result (a function's output, as exact as its calls:
    `"status": "A"` and `"status": "a"` are other results).

    The tools are part of it: the same conversation under other tool schemas is another prompt.
    """
    def loosely(m: dict) -> str:
        text = str(m.get("content") or "")
        return text if m.get("role") in ("tool", "function") else " ".join(text.split()).lower()  # `function`: the legacy role

    extra = [json.dumps([m.get(k) for k in _DIGEST_KEYS], sort_keys=True, default=str) for m in messages]
    declared = json.dumps(tools, sort_keys=True, default=str) if tools else ""
    exact = "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}\x1f{x}" for m, x in zip(messages, extra)) + declared
    loose = "\x1e".join(f"{m.get('role')}\x1f{loosely(m)}\x1f{x}" for m, x in zip(messages, extra)) + declared
    return (
        hashlib.blake2b(exact.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
        hashlib.blake2b(loose.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
    )


def resolve_format(path: Path, fmt: str = "auto") -> tuple[str, str]:
    """(reported format, format used for conversion) of a file.

    "auto" detects the format from the first JSON object of the file; a file whose first
    object matches no format is reported as "unknown" and checked as openai (the canonical
    form), so that every example shows what is missing.
    """
    check_format_name(fmt)
    if fmt != "auto":
        return fmt, fmt
    for _, obj in read_records(path):
        if isinstance(obj, dict):
            try:
                found = detect_format(obj)
            except FormatError:
                return "unknown", "openai"
            return found, found
    return "unknown", "openai"


def iter_checked(path: Path, fmt: str, on_bytes=None) -> Iterator[CheckedExample]:
    """Read `path` and yield every canonical example with its structural problems.

    Args:
        path: the data file.
        fmt: the conversion format (not "auto"; see `resolve_format`).
        on_bytes: progress callback, see `tasks.formats.read_records`.
    """
    ordinal = 0
    for line, obj in read_records(path, on_bytes):
        if isinstance(obj, RecordError):
            yield CheckedExample(ordinal, line, None, {obj.category: obj.message})
            ordinal += 1
            continue
        if not isinstance(obj, dict):
            problem = f"the record is a JSON {type(obj).__name__}, not an object"
            yield CheckedExample(ordinal, line, None, {"not_an_object": problem})
            ordinal += 1
            continue
        key_problem = check_keys(obj, fmt)
        for example in to_canonical(obj, fmt):
            problems = check_messages(example.get("messages"))
            if not problems:
                problems = check_tools(example, parallel=obj.get("parallel_tool_calls") is not False)
            if key_problem:
                problems["unrecognised_keys"] = key_problem
            yield CheckedExample(ordinal, line, example, problems, obj)
            ordinal += 1
