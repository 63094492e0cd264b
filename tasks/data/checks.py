"""Per-example checks shared by validation and prepare: structure, roles, keys, warnings, duplicates.

Each problem belongs to a named category. Validation and prepare read examples through
`iter_checked`, normalise them with `normalise_example` and deduplicate them with one
`Deduplicator`, so both see the same examples and the same duplicates.

Error categories (any non-zero count makes the file invalid):
    invalid_utf8, invalid_json, not_an_object, no_examples, missing_messages,
    message_missing_field, unrecognised_keys, unknown_role, bad_content, no_assistant,
    last_not_assistant, consecutive_same_role, system_not_first, duplicate,
    near_duplicate, over_token_limit, no_trained_tokens.
Warning categories (reported, the file stays valid):
    no_system_message, no_user_message, short_answer, over_token_limit, answer_not_located.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.formats import (
    MESSAGE_KEYS,
    TOP_KEYS,
    RecordError,
    check_format_name,
    detect_format,
    read_records,
    to_canonical,
)
from tasks.errors import FormatError

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
    "duplicate",
    "near_duplicate",
    "over_token_limit",
    "no_trained_tokens",
    "train_test_overlap",
)


WARNING_CATEGORIES = ("no_system_message", "no_user_message", "short_answer", "over_token_limit", "answer_not_located")


# Problems of an example's structure: such an example is not token-counted nor deduplicated.
STRUCTURAL = frozenset(ERROR_CATEGORIES[: ERROR_CATEGORIES.index("system_not_first") + 1])


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
    for j in range(1, len(roles)):
        if roles[j] == roles[j - 1] and roles[j] != "tool":  # parallel tool results may follow each other
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
    if "content" in m and not (tool_call and m["content"] is None):
        content = m["content"]
        if not isinstance(content, str):
            problems.setdefault("bad_content", f"message {i} content is {type(content).__name__}, not a string")
        elif not content.strip():
            problems.setdefault("bad_content", f"message {i} content is empty")


def check_keys(obj: dict, fmt: str) -> str | None:
    """A message naming the keys of `obj` (or of its messages) that `fmt` does not know, or None."""
    unknown = sorted(map(str, obj.keys() - TOP_KEYS[fmt]))
    inner_key = {"openai": "messages", "sharegpt": "conversations", "alpaca": "instances"}[fmt]
    inner = obj.get(inner_key)
    inner_unknown: set[str] = set()
    if isinstance(inner, list):
        for m in inner:
            if isinstance(m, dict):
                inner_unknown |= m.keys() - MESSAGE_KEYS[fmt]
    parts = []
    if unknown:
        parts.append(f"unrecognised keys {', '.join(unknown)}")
    if inner_unknown:
        parts.append(f"unrecognised keys in {inner_key}: {', '.join(sorted(map(str, inner_unknown)))}")
    if not parts:
        return None
    return f"{'; '.join(parts)} for format {fmt}; remove or rename them"


def check_warnings(messages: list[dict], min_answer_chars: int) -> dict[str, str]:
    """Warning categories of a structurally valid example."""
    roles = {m["role"] for m in messages}
    found: dict[str, str] = {}
    if "system" not in roles:
        found["no_system_message"] = "no system message"
    if "user" not in roles:
        found["no_user_message"] = "no user message"
    for i, m in enumerate(messages, start=1):
        if m["role"] == "assistant" and isinstance(m.get("content"), str) and len(m["content"].strip()) < min_answer_chars:
            found["short_answer"] = f"message {i}: answer of {len(m['content'].strip())} characters (< {min_answer_chars})"
            break
    return found


def normalise_example(example: dict) -> dict:
    """The example with whitespace stripped around every message's content (what prepare writes)."""
    messages = [{**m, "content": m["content"].strip()} if isinstance(m.get("content"), str) else m for m in example["messages"]]
    return {**example, "messages": messages}


class Deduplicator:
    """The one duplicate check: exact repeats, then repeats up to case and whitespace; the first stays."""

    def __init__(self) -> None:
        self._exact: dict[bytes, int] = {}
        self._loose: dict[bytes, int] = {}

    def check(self, messages: list[dict], line: int) -> tuple[str, str] | None:
        """(category, message) when `messages` repeats an earlier example, else None; remembers it."""
        d_exact, d_loose = example_digests(messages)
        found = None
        if d_exact in self._exact:
            found = ("duplicate", f"the same example as line {self._exact[d_exact]}")
        elif d_loose in self._loose:
            found = ("near_duplicate", f"the same as line {self._loose[d_loose]} up to case and whitespace")
        self._exact.setdefault(d_exact, line)
        self._loose.setdefault(d_loose, line)
        return found


def example_digests(messages: list[dict]) -> tuple[bytes, bytes]:
    """(exact, normalised) digests of an example; normalised ignores case and whitespace runs."""
    exact = "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}" for m in messages)
    loose = "\x1e".join(f"{m.get('role')}\x1f{' '.join(str(m.get('content') or '').split()).lower()}" for m in messages)
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
            if key_problem:
                problems["unrecognised_keys"] = key_problem
            yield CheckedExample(ordinal, line, example, problems, obj)
            ordinal += 1
