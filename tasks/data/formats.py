"""Reading training data files and converting every supported format to canonical chat messages.

Supported formats (named with `data.format` / `--format`, or detected from the first example):

- `openai`: `{"messages": [{"role", "content", "name"?, "weight"?, "tool_calls"?, "tool_call_id"?,
  "reasoning_content"? (or "thinking")}]}`, optionally with `tools` / `functions` /
  `parallel_tool_calls` beside `messages`, `"correction": true` on an answer a user
  corrected (see `tasks.data.sources`), and `"provenance"` on feedback (the key and end
  user that sent it; not trained on). The legacy `functions` and `function_call` (with
  `function` result messages) become `tools` and `tool_calls` (with `tool` messages), the
  `developer` role (OpenAI's newer name for it) becomes `system`, and a `content` given as a
  list of text parts (`[{"type": "text", "text": ...}]`) becomes their texts joined. A `tool`
  (or `function`) message without a `tool_call_id` answers the oldest pending call of the
  function it names (of any function when it names none). A call's `arguments` written as
  an object, not as the JSON string of one, become that string.
- `alpaca`: `{"instruction", "input"?, "output", "system"?}`, or the seed-task form of Stanford
  Alpaca: `{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}`,
  which yields one canonical example per instance.
- `sharegpt`: `{"conversations": [{"from", "value"}], "system"?, "id"?, "tools"?}` with `from`
  one of human/user, gpt/assistant, system; `function_call` (a value holding `{"name",
  "arguments"}`, or a list of them, as JSON or as the objects) becomes an assistant turn with `tool_calls`, and
  `observation` (or tool/function) a `tool` message answering the pending call, as in
  LLaMA-Factory's format; `tools` (a list, or a JSON string of one, of tool schemas or
  bare functions) becomes OpenAI tool schemas.

Files are JSONL (one example per line; blank lines are skipped) or one JSON array. Every
record comes with the number a user can find it by: the 1-based line of a JSONL file, or
for a JSON array the 1-based index of the element in the array (a JSON array is read whole,
so big data sets should be JSONL, which is streamed).

The canonical form is `{"messages": [{"role", "content"}, ...]}` plus, where the source has
them, `"tools"` (OpenAI tool schemas) and `"label"` (the output of an Alpaca
`is_classification` task). The optional message keys `name`, `weight`, `tool_calls`,
`tool_call_id` and `reasoning_content` (`thinking` renamed to it) are kept: the chat
template renders calls, results and traces (`tasks.model.chat`), and the mask reads weights.

Conversion is deliberately lenient: a broken source (a missing field, an unknown `from`)
becomes a canonical example that still shows the defect, so that `tasks.data.validate` reports it
with its category and line instead of the conversion failing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import DataFileError, FormatError

FORMATS = ("openai", "alpaca", "sharegpt")

# Keys each format allows at the top level of an example and inside one message.
TOP_KEYS: dict[str, frozenset[str]] = {
    # `correction`: true on an answer a user corrected (`ftllm feedback export`); it outranks other answers.
    # `provenance`: who sent a feedback example ({key, user, feedback_id}); recorded, never trained on.
    "openai": frozenset({"messages", "tools", "functions", "parallel_tool_calls", "label", "correction", "provenance"}),
    "alpaca": frozenset(
        {"instruction", "input", "output", "system", "label", "id", "name", "instances", "is_classification"}
    ),
    "sharegpt": frozenset({"conversations", "system", "id", "label", "tools"}),
}
MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "openai": frozenset({
        "role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "reasoning_content",
        "thinking",
    }),
    "alpaca": frozenset({"input", "output"}),  # keys of one entry of `instances`
    "sharegpt": frozenset({"from", "value", "weight"}),
}
# Keys of a message as OpenAI's API returns it (`message.model_dump()`), which a data set
# built from logged responses carries. Empty (null, "" or []) they hold nothing and are
# accepted; with a value they are refused: no chat template renders them.
RESPONSE_ONLY_KEYS = frozenset({"refusal", "annotations", "audio"})
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
_OPENAI_OPTIONAL = ("name", "weight", "tool_calls", "tool_call_id", "reasoning_content")
_NULL_IS_NONE = frozenset({"tool_calls", "reasoning_content"})  # null written for "none" by the APIs
_MISSING = object()



@dataclass(frozen=True)
class RecordError:
    """A record that could not be read as a JSON object; `category` is a validation category."""

    category: str
    message: str


def detect_format(first_obj: dict) -> str:
    """Tell the format of a data file from one example.

    Args:
        first_obj: an example of the file, usually its first object.

    Returns:
        "openai", "alpaca" or "sharegpt".

    Raises:
        FormatError: no key of any supported format is present.
    """
    if "messages" in first_obj:
        return "openai"
    if "conversations" in first_obj:
        return "sharegpt"
    if "instruction" in first_obj or "instances" in first_obj:
        return "alpaca"
    keys = ", ".join(sorted(map(str, first_obj))) or "none"
    raise FormatError(
        f"cannot tell the format from the keys ({keys}); expected messages (openai), "
        "conversations (sharegpt) or instruction/instances (alpaca), or pass --format"
    )


def check_format_name(fmt: str) -> str:
    """Return `fmt` if it names a supported format or "auto"; raise FormatError otherwise."""
    if fmt != "auto" and fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    return fmt


def to_canonical(obj: dict, fmt: str) -> list[dict]:
    """Convert one source example to canonical examples.

    Args:
        obj: the parsed JSON object of one record.
        fmt: "openai", "alpaca" or "sharegpt".

    Returns:
        A list of `{"messages": [...], "label"?: ...}`: one example, or one per instance of an
        Alpaca seed task (an empty `instances` gives one example without messages).
    """
    if fmt == "openai":
        return [_openai_to_canonical(obj)]
    if fmt == "alpaca":
        return _alpaca_to_canonical(obj)
    if fmt == "sharegpt":
        return [_sharegpt_to_canonical(obj)]
    raise FormatError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _with_label(example: dict, obj: dict) -> dict:
    if "label" in obj:
        example["label"] = obj["label"]
    return example


def _openai_to_canonical(obj: dict) -> dict:
    messages = obj.get("messages", _MISSING)
    if not isinstance(messages, list):
        return _with_label({"messages": None if messages is _MISSING else messages}, obj)
    out, calls = [], _CallIds()
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)  # kept as is: validation reports a message that is not an object
            continue
        canon = {k: m[k] for k in ("role", "content") if k in m}
        # `tool_calls: null` is how the API writes an answer without calls, `reasoning_content: null`
        # (or `thinking`) one without a trace (vLLM's and DeepSeek's exports).
        canon.update({k: m[k] for k in _OPENAI_OPTIONAL if k in m and not (k in _NULL_IS_NONE and m[k] is None)})
        if canon.get("role") == "developer":  # OpenAI's newer name of the system message
            canon["role"] = "system"
        if "content" in canon:
            canon["content"] = _joined_text(canon["content"])
        if m.get("thinking") is not None and "reasoning_content" not in canon:
            canon["reasoning_content"] = m["thinking"]
        elif m.get("thinking") is not None and m["thinking"] != canon["reasoning_content"]:
            canon["thinking"] = m["thinking"]  # two traces: kept, so that validation names it (`bad_reasoning`)
        legacy = m.get("function_call")
        if isinstance(legacy, dict) and not m.get("tool_calls") and m.get("role") == "assistant":
            canon["tool_calls"] = [calls.new(legacy)]  # the legacy form of one call (tool_calls null or [])
        else:
            if legacy is not None:  # beside calls, not a call, or not the assistant's: kept, so that validation names it
                canon["function_call"] = legacy
            if m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list):
                canon["tool_calls"] = [_arguments_as_json(c) for c in m["tool_calls"]]
                calls.expect(m["tool_calls"])
        if m.get("role") in ("function", "tool") and "tool_call_id" not in m:
            # the legacy result (`function`), or a result named but not linked: it answers the pending call of its name
            canon.update(role="tool", tool_call_id=calls.answer(m.get("name")))
        elif m.get("role") == "tool":
            calls.answered(m.get("tool_call_id"))
        out.append(canon)
    example = {"messages": out}
    tools = obj.get("tools", obj.get("functions", _MISSING))
    if tools is not _MISSING:
        example["tools"] = _tool_schemas(tools)
    return _with_label(example, obj)


def _arguments_as_json(call: Any) -> Any:
    """A call whose `arguments` are an object (the form chat templates and transformers' docs use) with them
    as the JSON string OpenAI's format has; any other call as given (validation names what is wrong)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), dict):
        return call
    return {**call, "function": {**function, "arguments": json.dumps(function["arguments"], ensure_ascii=False)}}


def _joined_text(content: Any) -> Any:
    """A list of text parts (`[{"type": "text", "text": ...}]`) as one string, their texts joined as
    the service joins them; any other content as given (a part that is not text: validation names it)."""
    if isinstance(content, list) and content and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return content


class _CallIds:
    """Ids for calls written without one (ShareGPT, OpenAI's legacy `function_call`), and the calls their
    results answer when a result names no call id."""

    def __init__(self) -> None:
        self.count = 0
        self.pending: list[tuple[str, Any]] = []  # (id, function name) of the calls without a result yet

    def new(self, function: Any) -> dict:
        """An OpenAI tool call of `function` ({name, arguments}); arguments become a JSON string."""
        self.count += 1
        call_id = f"call{self.count:05d}"  # 9 alphanumeric characters, as Mistral's templates require
        self.pending.append((call_id, function.get("name") if isinstance(function, dict) else None))
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if not isinstance(arguments, str) and arguments is not None:
                function = {**function, "arguments": json.dumps(arguments, ensure_ascii=False)}
        return {"id": call_id, "type": "function", "function": function}

    def expect(self, tool_calls: list) -> None:
        """Remember the calls of an assistant turn written with their ids (the OpenAI form)."""
        for c in tool_calls:
            if isinstance(c, dict) and isinstance(c.get("id"), str):
                function = c.get("function")
                self.pending.append((c["id"], function.get("name") if isinstance(function, dict) else None))

    def answered(self, call_id: Any) -> None:
        """A result linked to its call by id: that call is no longer pending."""
        self.pending = [p for p in self.pending if p[0] != call_id]

    def answer(self, name: Any = None) -> str | None:
        """The id of the oldest pending call, of function `name` when one is given (None when there is
        none: validation names the result)."""
        for k, (call_id, function) in enumerate(self.pending):
            if name is None or function == name:
                del self.pending[k]
                return call_id
        return None


def _tool_schemas(tools: Any) -> Any:
    """OpenAI tool schemas from a list (or a JSON string of one) of schemas or bare functions."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return tools  # kept: validation reports it
    if not isinstance(tools, list):
        return tools
    return [{"type": "function", "function": t} if isinstance(t, dict) and "type" not in t and "name" in t else t
            for t in tools]


def _alpaca_turns(instruction: Any, inp: Any, output: Any, system: Any) -> list[dict]:
    messages: list[dict] = []
    if system is not _MISSING and system not in (None, ""):
        messages.append({"role": "system", "content": system})
    user: dict = {"role": "user"}
    if instruction is not _MISSING:
        if isinstance(inp, str) and inp.strip() and isinstance(instruction, str):
            user["content"] = f"{instruction}\n\n{inp}"
        elif inp in (_MISSING, None, "") or not isinstance(instruction, str):
            user["content"] = instruction
        else:
            user["content"] = inp  # a non-string input: kept so validation reports it
    messages.append(user)
    assistant: dict = {"role": "assistant"}
    if output is not _MISSING:
        assistant["content"] = output
    messages.append(assistant)
    return messages


def _alpaca_to_canonical(obj: dict) -> list[dict]:
    instruction = obj.get("instruction", _MISSING)
    system = obj.get("system", _MISSING)
    if "instances" not in obj:
        turns = _alpaca_turns(instruction, obj.get("input", _MISSING), obj.get("output", _MISSING), system)
        return [_with_label({"messages": turns}, obj)]
    instances = obj["instances"]
    if not isinstance(instances, list) or not instances:
        return [{"messages": None}]
    examples = []
    for inst in instances:
        if not isinstance(inst, dict):
            examples.append({"messages": None})
            continue
        output = inst.get("output", _MISSING)
        example = {"messages": _alpaca_turns(instruction, inst.get("input", _MISSING), output, system)}
        if obj.get("is_classification") is True and output is not _MISSING:
            example["label"] = output
        examples.append(_with_label(example, obj) if "label" in obj else example)
    return examples


def _sharegpt_to_canonical(obj: dict) -> dict:
    turns = obj.get("conversations", _MISSING)
    if not isinstance(turns, list):
        return _with_label({"messages": None if turns is _MISSING else turns}, obj)
    out: list = []
    calls = _CallIds()
    system = obj.get("system", _MISSING)
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            out.append(turn)
            continue
        message = {}
        source = turn.get("from")
        if "from" in turn:
            message["role"] = SHAREGPT_ROLES.get(source.lower(), source) if isinstance(source, str) else source
        if "value" in turn:
            message["content"] = turn["value"]
        if source == "function_call" and isinstance(turn.get("value"), (str, dict, list)):
            message.update(content=None, tool_calls=_sharegpt_calls(turn["value"], calls))
        elif message.get("role") == "tool":
            message["tool_call_id"] = calls.answer()
        if "weight" in turn:
            message["weight"] = turn["weight"]
        out.append(message)
    example = {"messages": out}
    if "tools" in obj:
        example["tools"] = _tool_schemas(obj["tools"])
    return _with_label(example, obj)


def _sharegpt_calls(value: str | dict | list, calls: _CallIds) -> list:
    """The tool calls of a ShareGPT `function_call` turn: one `{name, arguments}` or a list of them, as JSON
    (LLaMA-Factory's form) or as the object itself."""
    from tasks.model.tool_schemas import strict_json

    try:
        parsed = strict_json(value) if isinstance(value, str) else value
    except ValueError:  # not JSON (NaN and Infinity included): validation names the value
        parsed = value
    items = parsed if isinstance(parsed, list) else [parsed]
    return [calls.new(item) for item in items]  # one that is not {name, arguments}: validation names it


def read_records(
    path: Path, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict | list | str | int | float | bool | None | RecordError]]:
    """Yield `(line_no, obj_or_error)` for every record of a JSONL file or a JSON array.

    A JSONL file is streamed line by line (blank lines skipped); `line_no` is the 1-based
    line. A file whose first non-blank character is `[` and that parses as one JSON value
    is a JSON array; `line_no` is then the 1-based index of the element. A record that is
    not valid UTF-8 or not valid JSON is yielded as a `RecordError` with category
    "invalid_utf8" or "invalid_json".

    Args:
        path: the data file.
        on_bytes: called with the number of bytes consumed, for a progress bar.

    Raises:
        DataFileError: the file is missing, a directory or cannot be opened.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"{path}: data file not found; check the path (or data.path in params.yaml)")
    if path.is_dir():
        raise DataFileError(f"{path}: is a directory, not a data file; pass a .jsonl or .json file")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be opened ({exc.strerror}); check its permissions") from None
    with f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if head.startswith(b"["):
            records = _read_json_array(f.read(), on_bytes)
            if records is not None:
                yield from records
                return
            f.seek(0)
        yield from _read_jsonl(f, on_bytes)


def _read_json_array(data: bytes, on_bytes: Callable[[int], None] | None) -> list | None:
    """Records of a JSON array file; None when the file is JSONL whose first line is an array."""
    if on_bytes:
        on_bytes(len(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return [(line, RecordError("invalid_utf8", f"byte {exc.start} is not valid UTF-8; re-encode the file as UTF-8"))]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # `[...]` on line 1, then more lines: this is JSONL
            return None
        return [(exc.lineno, RecordError("invalid_json", f"the JSON array does not parse: {exc.msg} (line {exc.lineno}, column {exc.colno})"))]
    except RecursionError:
        return [(1, RecordError("invalid_json", "the JSON array is nested too deeply to parse"))]
    return [(i + 1, obj) for i, obj in enumerate(value)]


def _read_jsonl(f, on_bytes: Callable[[int], None] | None) -> Iterator[tuple[int, Any]]:
    for line_no, raw in enumerate(f, start=1):
        if on_bytes:
            on_bytes(len(raw))
        try:
            text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, RecordError("invalid_utf8", f"byte {exc.start} of the line is not valid UTF-8; re-encode the file as UTF-8")
            continue
        if not text.strip():
            continue
        text = text.rstrip("\r\n")  # an error at the line's end is at its last column, not the next line's first
        try:
            yield line_no, json.loads(text)
        except json.JSONDecodeError as exc:
            where = "at the end of the line: it stops short" if exc.pos >= len(text) else f"column {exc.colno}"
            yield line_no, RecordError("invalid_json", f"not valid JSON: {exc.msg} ({where})")
        except RecursionError:  # json's decoder recurses once per nesting level
            yield line_no, RecordError("invalid_json", "not valid JSON here: nested too deeply to parse")
