"""Secrets and personal data masked in chat text and examples, or the example dropped.

Runs on everything the interaction log hands to training or evaluation (the feedback
export), so that a model never learns an e-mail address, phone number, card number, bank
account, identity number, IP address or API key a user pasted into a chat. What counts as
such, and how it is found, is `tasks.feedback.sensitive`; here each finding is replaced by
its category's placeholder (`[EMAIL]`, `[PHONE]`, ...) in every text an example holds.

    from tasks.feedback.redact import redact_text
    redact_text("mail me at ann@example.org")   # -> ("mail me at [EMAIL]", Counter({"email": 1}))
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from tasks.feedback.sensitive import CATEGORIES, Category, find_sensitive

RedactAction = Literal["mask", "drop"]


def placeholder(category: Category) -> str:
    return f"[{category.value.upper()}]"


def redact_text(text: str) -> tuple[str, Counter[str]]:
    """`text` with every finding replaced by its placeholder, and the findings per category."""
    found = find_sensitive(text)
    parts, last = [], 0
    for f in found:
        parts += [text[last:f.start], placeholder(f.category)]
        last = f.end
    parts.append(text[last:])
    return "".join(parts), Counter(f.category.value for f in found)


@dataclass(frozen=True)
class Redacted:
    """An example after redaction: None when it was dropped; what was found, per category."""

    example: dict[str, Any] | None
    found: Counter[str]

    @property
    def changed(self) -> bool:
        return bool(self.found)


def redact_arguments(arguments: str) -> str:
    """A call's JSON arguments masked as an example's are: each value read with its key."""
    return _redact_value(arguments, "arguments")[0]


def redact_example(example: dict[str, Any], action: RedactAction = "mask") -> Redacted:
    """Redact every text of each message of a canonical `{"messages": [...]}` example: the
    content, a reasoning trace, and the arguments of tool calls (inside their JSON, so that a
    call stays a valid call), every string a message holds but its role, ids and function names
    (a user's or assistant's `name` says who speaks, and is redacted).

    The tools the request declared keep their names and schemas; their descriptions and the
    values they hold (`default`, `enum`, ...) are redacted (any client of the service declares
    tools, and may write a person's address there).

    Args:
        example: the example; not modified.
        action: "mask" replaces each finding with its placeholder; "drop" drops the
            whole example when anything is found.
    """
    found: Counter[str] = Counter()
    messages = []
    for message in example.get("messages", []):
        redacted, counts = _redact_value(message)
        speaker = message.get("name") if isinstance(message, dict) and message.get("role") not in ("tool", "function") else None
        if isinstance(speaker, str):  # who speaks (any string a client sends), not a function's name
            redacted["name"], named = redact_text(speaker)
            counts += named
        found += counts
        messages.append(redacted)
    tools, counts = _redact_descriptions(example.get("tools"))
    found += counts
    if found and action == "drop":
        return Redacted(None, found)
    return Redacted({**example, "messages": messages, **({"tools": tools} if "tools" in example else {})}, found)


# The values a tool schema holds, beside its structure: texts, and values a client may fill
# with a person's data (`"default": "ann@example.org"`, an `enum` of addresses). A call's
# arguments are redacted alike, so a call that matched its schema still does.
_SCHEMA_TEXTS = frozenset({"description", "title"})
_SCHEMA_VALUES = frozenset({"default", "enum", "examples", "example", "const"})


def _redact_descriptions(value: Any, name: str = "") -> tuple[Any, Counter[str]]:
    """Tool schemas with their texts (`description`, `title`) and values (`default`, `enum`,
    `examples`, `const`) redacted, their structure as it is. A value is read with the name of
    the property it belongs to (`name`), as a call's argument is, so that both are masked alike."""
    if isinstance(value, list):
        pairs = [_redact_descriptions(v, name) for v in value]
        return [v for v, _ in pairs], sum((c for _, c in pairs), Counter())
    if not isinstance(value, dict):
        return value, Counter()
    found: Counter[str] = Counter()
    out = {}
    for key, item in value.items():
        if key in _SCHEMA_TEXTS and isinstance(item, str):
            out[key], counts = redact_text(item)
        elif key in _SCHEMA_VALUES:
            out[key], counts = _redact_value(item, name, kept=frozenset(), named=True)
        elif key == "properties" and isinstance(item, dict):  # each property's schema, named by it
            pairs = {prop: _redact_descriptions(schema, prop) for prop, schema in item.items()}
            out[key], counts = {prop: v for prop, (v, _) in pairs.items()}, sum((c for _, c in pairs.values()), Counter())
        else:
            out[key], counts = _redact_descriptions(item, name)
        found += counts
    return out, found


MAX_KEY_CONTEXT = 40  # characters of a JSON key read as the context of its value

# What identifies rather than says: the role, call ids, function names, types and weights.
_KEPT_KEYS = frozenset({"role", "id", "tool_call_id", "type", "name", "weight"})


def _redact_value(value: Any, key: str = "", kept: frozenset[str] = _KEPT_KEYS,
                  named: bool = False, siblings: tuple[str, ...] = ()) -> tuple[Any, Counter[str]]:
    """`value` with every string (and number) in it redacted (dict keys kept, and the values of
    `kept` keys), and the findings.

    `named`: inside JSON the user wrote (a call's arguments, a tool result or a message that is
    JSON), where a value's keys say what it is (`{"phone": {"number": "4155550134"}}`): it is
    redacted with its key path before it (`key`), and the keys themselves are redacted too.
    `siblings`: what the other entries of the object it is in say (`_context_of`), read as a
    text's context where its own key says nothing of its kind (`_says_nothing`: `{"to":
    "4155550134", "channel": "sms"}`, not `{"order_id": ...}`); not a JSON number's, more often a
    count (`{"count": 1234567, "channel": "sms"}`).
    """
    if isinstance(value, str):
        if not named and (key == "arguments" or value.lstrip()[:1] in ("{", "[")):
            # A call's arguments (any JSON), or text that is a JSON object or list
            parsed = _json_value(value) if key == "arguments" else _json_container(value)
            if parsed is not _NOT_JSON:
                try:
                    redacted, found = _redact_value(parsed, kept=frozenset(), named=True)  # all of it is the user's
                except RecursionError:  # nested past the walk's stack (the parser's is a little deeper)
                    return redact_text(value)
                return (json.dumps(redacted, ensure_ascii=False) if found else value), found
        return _redact_named(key, value, siblings) if named and key else redact_text(value)
    if isinstance(value, dict):
        found: Counter[str] = Counter()
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in kept:
                out[k] = v
                continue
            # A value is named by its own key, and by its parent's too where its own says nothing
            # of what it is ({"phone": {"number": ...}}); never by every ancestor ({"call": {"date": ...}}).
            path = f"{key.rsplit(' ', 1)[-1]} {k}" if named and key and k.lower() in _GENERIC_KEYS else k
            name, counts = redact_text(k) if named else (k, Counter())  # {"ann@example.org": "Ann"}
            while name in out:  # two keys masked alike keep both values
                name += " "
            out[name], more = _redact_value(v, path, kept, named, _context_of(value, k) if named and _says_nothing(k) else ())
            found += counts + more
        return out, found
    if isinstance(value, list):
        found = Counter()
        items = []
        for item in value:
            redacted, counts = _redact_value(item, key, kept, named)
            items.append(redacted)
            found += counts
        return items, found
    if not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
        # A number in JSON can be a card or phone number written without quotes
        # ({"card": 4111111111111111}, or 4111111111111111.0): redacted as its digits would be.
        digits = str(int(value))
        masked, found = _redact_named(key, digits) if named and key else redact_text(digits)  # a count, not a text: own key only
        return (masked if found else value), found
    return value, Counter()


MAX_SIBLINGS = 8  # an object's other entries read as a value's context; a wide object costs no more


# Keys that say where a value goes or that it is a value, not what kind it is: their siblings
# may say it (`{"to": "4155550134", "channel": "sms"}`); `order_id` beside `"notify": "sms"` is an id.
_ADDRESS_KEYS = frozenset({"to", "from", "recipient", "recipients", "receiver", "sender", "target", "destination",
                           "dest", "contact", "address", "handle", "cc", "bcc"})


def _says_nothing(key: str) -> bool:
    """Whether `key` names no kind of value, so that its object's other entries are its context."""
    return key.lower() in _GENERIC_KEYS | _ADDRESS_KEYS


def _context_of(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    """What the other entries of `obj` say of the value at `key`: their keys, and their short
    texts without digits (`"channel": "sms"`, `"type": "mobile"`), a word or two each."""
    words = [k for k in obj if k != key]
    words += [v for k, v in obj.items() if k != key and isinstance(v, str) and len(v) <= 24 and not any(c.isdigit() for c in v)]
    return tuple(w for w in words if w.strip())[:MAX_SIBLINGS]


_NOT_JSON = object()
_GENERIC_KEYS = frozenset({"number", "num", "no", "nr", "value", "id"})


def _json_value(text: str) -> Any:
    """`text` read as JSON, or _NOT_JSON."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _json_container(text: str) -> Any:
    """`text` read as a JSON object or list, or _NOT_JSON."""
    parsed = _json_value(text)
    return parsed if isinstance(parsed, (dict, list)) else _NOT_JSON


def _redact_named(key: str, text: str, siblings: tuple[str, ...] = ()) -> tuple[str, Counter[str]]:
    """An argument's value redacted with its name as context: `phone: 4155550134` is a phone
    number where the digits alone are not, `password: hunter22` a secret. The name is tried as
    it is (`api_key: ...`), then as words (`phone_number`, `phoneNumber`: `phone number: ...`),
    then after each of its siblings' words (`sms to: ...`)."""
    key = key[-MAX_KEY_CONTEXT:]  # a name, not a text: a 30,000-character key made every leaf cost its length
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|[_.\-]+", " ", key).lower()
    words = " ".join(w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words.split())  # `phones`
    last = key.rsplit(" ", 1)[-1]  # the value's own key, as written (`api_key`)
    for name in dict.fromkeys((last, words, *(f"{s[-MAX_KEY_CONTEXT:]} {words}" for s in siblings))):
        prefix = f"{name}: "
        masked, found = redact_text(prefix + text)
        if found and masked.startswith(prefix):
            return masked[len(prefix):], found
    return redact_text(text)


def redact_examples(examples: list[dict[str, Any]], action: RedactAction = "mask") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Redact a batch; return the examples kept and the report: findings per category
    (every category present, 0 when none), `examples_changed` and `examples_dropped`."""
    kept, report = [], Counter({c.value: 0 for c in CATEGORIES})
    changed = dropped = 0
    for example in examples:
        result = redact_example(example, action)
        report += result.found
        changed += result.changed
        if result.example is None:
            dropped += 1
        else:
            kept.append(result.example)
    return kept, {**{c.value: report[c.value] for c in CATEGORIES}, "examples_changed": changed, "examples_dropped": dropped}
