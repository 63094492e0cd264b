"""Validating a training data file before anything downstream runs.

Every example is converted to canonical chat messages (`tasks.formats`), checked, and
counted in tokens with the run's tokenizer and chat template. Each problem belongs to a
named category with a count and the offending line numbers; the per-example checks also
run as one Great Expectations suite over a dataframe of the examples (one row each), whose
checkpoint builds the HTML Data Docs.

Error categories (any non-zero count makes the file invalid):
    invalid_utf8, invalid_json, not_an_object, no_examples, missing_messages,
    message_missing_field, unrecognised_keys, unknown_role, bad_content, no_assistant,
    last_not_assistant, consecutive_same_role, system_not_first, duplicate,
    near_duplicate, over_token_limit.
Warning categories (reported, the file stays valid):
    no_system_message, no_user_message, short_answer, over_token_limit.

Over-long examples (more than `data.max_tokens` tokens) are handled by prepare's
`data.length_policy`: dropped, or truncated (the last answer cut to fit; an example whose
prompt alone reaches the limit cannot be truncated and is dropped). They are a *warning*
while the share of examples prepare would drop stays within `data.max_drop_fraction`, and
an *error* (the same category, every over-long line listed) once it exceeds it. The
train/test overlap check needs the split, so `tasks.prepare` runs it.

Token counts: each conversation is rendered with the chat template (`tokenize=False`) and
the rendered texts are batch-encoded by the fast tokenizer. Assistant tokens are the
tokens of the assistant contents inside the rendered text (located by character offsets),
so the template's end-of-turn tokens are not counted as trained on; `count_tokens` of
`tasks.modeling` counts those too (a difference of about 2 tokens per answer).

Run alone (prints the report as JSON; `ftllm validate` is the friendly front end):

    python -m tasks.validate data/dates.jsonl --params params.yaml [--data-docs artifacts/gx]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.formats import (
    FORMATS,
    MESSAGE_KEYS,
    TOP_KEYS,
    DataFileError,
    FormatError,
    RecordError,
    check_format_name,
    detect_format,
    read_records,
    to_canonical,
)

__all__ = [
    "DataFileError",
    "ValidationReport",
    "validate_dataset",
    "count_chat_tokens",
    "check_messages",
    "render_report",
    "write_fixed",
]

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
    "train_test_overlap",
)
WARNING_CATEGORIES = ("no_system_message", "no_user_message", "short_answer", "over_token_limit")
# Problems of an example's structure: such an example is not token-counted nor deduplicated.
STRUCTURAL = frozenset(ERROR_CATEGORIES[:13])
ROLES = ("system", "user", "assistant", "tool", "function")
MAX_ROWS = 100
_TOKEN_CHUNK = 2048


@dataclass
class ValidationReport:
    """The outcome of validating one data file; `to_dict()` is the `validate --json` contract."""

    valid: bool
    format: str
    path: str
    md5: str
    examples: int
    invalid_examples: int
    errors: dict[str, int]
    error_rows: list[dict[str, Any]]
    error_lines: dict[str, list[int]]
    warnings: dict[str, int]
    warning_rows: list[dict[str, Any]]
    token_stats: dict[str, Any] | None
    length_policy: str
    dropped: int
    truncated: int
    dropped_fraction: float
    max_drop_fraction: float
    data_docs: str | None = None
    gx: dict[str, Any] | None = None
    # Ordinals (0-based, in reading order) of the examples `--fix` leaves out; not serialised.
    bad_examples: set[int] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data (without the internal `bad_examples`)."""
        return {
            "valid": self.valid,
            "format": self.format,
            "path": self.path,
            "md5": self.md5,
            "examples": self.examples,
            "invalid_examples": self.invalid_examples,
            "errors": self.errors,
            "error_rows": self.error_rows,
            "error_lines": self.error_lines,
            "warnings": self.warnings,
            "warning_rows": self.warning_rows,
            "token_stats": self.token_stats,
            "length_policy": self.length_policy,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "dropped_fraction": self.dropped_fraction,
            "max_drop_fraction": self.max_drop_fraction,
            "data_docs": self.data_docs,
            "gx": self.gx,
        }


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


# ---------------------------------------------------------------------------- checks


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


def example_digests(messages: list[dict]) -> tuple[bytes, bytes]:
    """(exact, normalised) digests of an example; normalised ignores case and whitespace runs."""
    exact = "\x1e".join(f"{m.get('role')}\x1f{m.get('content')}" for m in messages)
    loose = "\x1e".join(f"{m.get('role')}\x1f{' '.join(str(m.get('content') or '').split()).lower()}" for m in messages)
    return (
        hashlib.blake2b(exact.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
        hashlib.blake2b(loose.encode("utf-8", "surrogatepass"), digest_size=16).digest(),
    )


# ---------------------------------------------------------------------------- reading


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


# ---------------------------------------------------------------------------- tokens


def count_chat_tokens(tokenizer, conversations: list[list[dict]]) -> list[tuple[int, int, int]]:
    """Count tokens of many conversations with the tokenizer's chat template, fast.

    The conversations are rendered in one call with every content replaced by a marker;
    putting the contents back in gives the rendered text and where each content lies in
    it, and the batch of texts is encoded once by the Rust tokenizer. Assistant tokens are
    the tokens from the one holding an assistant content's first character to the one
    holding its last.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        conversations: canonical message lists (structurally valid).

    Returns:
        (total tokens, assistant tokens, tokens of the last assistant answer) per
        conversation. A slow (non-Rust) tokenizer falls back to `tasks.modeling.count_tokens`.
    """
    if not conversations:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return _count_slow(tokenizer, conversations)
    marked = [
        [{**m, "content": f"\ue000{j}\ue001"} if isinstance(m.get("content"), str) else m for j, m in enumerate(conv)]
        for conv in conversations
    ]
    texts, spans = [], []
    for conv, rendered in zip(conversations, tokenizer.apply_chat_template(marked, tokenize=False)):
        text, where = _fill_markers(rendered, conv)
        if any(m["role"] == "assistant" and j not in where for j, m in enumerate(conv)):
            # The template changed a content (or dropped it): render for real, locate nothing.
            text, where = tokenizer.apply_chat_template(conv, tokenize=False), None
        texts.append(text)
        spans.append(where)
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [_assistant_counts(tokenizer, conv, enc, where) for conv, enc, where in zip(conversations, encodings, spans)]


_MARKER = re.compile("\ue000(\\d+)\ue001")


def _fill_markers(rendered: str, conv: list[dict]) -> tuple[str, dict[int, tuple[int, int]]]:
    """Put the contents back in place of the markers: (text, message index -> (start, end))."""
    parts = _MARKER.split(rendered)
    pieces, where, pos = [], {}, 0
    for k, part in enumerate(parts):
        if k % 2:
            j = int(part)
            part = conv[j]["content"] if j < len(conv) else ""
            where.setdefault(j, (pos, pos + len(part)))
        pieces.append(part)
        pos += len(part)
    return "".join(pieces), where


def _assistant_counts(tokenizer, conv: list[dict], enc, where: dict | None) -> tuple[int, int, int]:
    assistant = last = 0
    for j, m in enumerate(conv):
        if m["role"] != "assistant" or not m.get("content"):
            continue
        if where is None:
            last = len(tokenizer.backend_tokenizer.encode(m["content"], add_special_tokens=False))
        else:
            a, b = where[j]
            first_token, last_token = enc.char_to_token(a), enc.char_to_token(b - 1)
            last = last_token - first_token + 1 if first_token is not None and last_token is not None else 0
        assistant += last
    return len(enc), assistant, last


def _count_slow(tokenizer, conversations: list[list[dict]]) -> list[tuple[int, int, int]]:
    from tasks.modeling import count_tokens

    out = []
    for conv in conversations:
        total, assistant = count_tokens(tokenizer, conv)
        answers = [m for m in conv if m["role"] == "assistant"]
        last = len(tokenizer.encode(answers[-1].get("content") or "", add_special_tokens=False)) if answers else 0
        out.append((total, assistant, last))
    return out


def summarize(values: list[float]) -> dict[str, float] | None:
    """min, max, mean, median, p5 and p95 (linear interpolation) of `values`."""
    if not values:
        return None
    import numpy as np

    arr = np.asarray(values, dtype=float)
    p5, median, p95 = np.percentile(arr, [5, 50, 95])
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": round(float(arr.mean()), 3),
        "median": float(median),
        "p5": float(p5),
        "p95": float(p95),
    }


def estimate_training(total_tokens: int, trained_tokens: int, batch_size: int, seq_len: int, max_steps: int | None) -> dict[str, Any]:
    """Steps per epoch with packing (total tokens / (batch_size * seq_len)) and epochs for max_steps."""
    steps = max(1, math.ceil(total_tokens / (batch_size * seq_len))) if total_tokens else 0
    return {
        "tokens_per_epoch": total_tokens,
        "trained_tokens_per_epoch": trained_tokens,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps_per_epoch": steps,
        "max_steps": max_steps,
        "epochs": round(max_steps / steps, 3) if (max_steps and steps) else None,
    }


# ---------------------------------------------------------------------------- validation


class _Tally:
    """Counts, first rows and first lines per category, gathered while reading."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, category: str, line: int, message: str) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1
        rows = self.rows.setdefault(category, [])
        if len(rows) < MAX_ROWS:
            rows.append({"line": line, "category": category, "message": message})

    def first_rows(self) -> list[dict[str, Any]]:
        rows = [r for cat in self.rows.values() for r in cat]
        return sorted(rows, key=lambda r: r["line"])[:MAX_ROWS]

    def lines(self) -> dict[str, list[int]]:
        return {cat: [r["line"] for r in rows] for cat, rows in self.rows.items()}


_COLUMNS = (
    "line", "parsed", "n_messages", "fields_ok", "keys_ok", "roles_ok", "content_ok", "has_assistant",
    "last_role", "alternating", "system_first", "is_duplicate", "is_near_duplicate", "total_tokens",
    "assistant_tokens", "kept_by_length_policy",
)  # fmt: skip


def _row(c: CheckedExample) -> dict[str, Any]:
    p = c.problems
    if c.example is None:
        return {"line": c.line, "parsed": False}
    messages = c.example.get("messages")
    n = len(messages) if isinstance(messages, list) else 0
    roles = [m.get("role") for m in messages if isinstance(m, dict)] if n else []
    return {
        "line": c.line,
        "parsed": True,
        "n_messages": n,
        "fields_ok": "message_missing_field" not in p if n else None,
        "keys_ok": "unrecognised_keys" not in p,
        "roles_ok": "unknown_role" not in p if n else None,
        "content_ok": "bad_content" not in p if n else None,
        "has_assistant": "assistant" in roles if n else None,
        "last_role": (str(roles[-1]) if roles else None) if "no_assistant" not in p else None,
        "alternating": "consecutive_same_role" not in p if n else None,
        "system_first": "system_not_first" not in p if n else None,
        "is_duplicate": False if c.structurally_ok else None,
        "is_near_duplicate": False if c.structurally_ok else None,
    }


def validate_dataset(
    path: Path,
    fmt: str = "auto",
    tokenizer=None,
    max_tokens: int | None = None,
    max_drop_fraction: float = 0.05,
    min_answer_chars: int = 2,
    batch_size: int = 8,
    seq_len: int = 256,
    max_steps: int | None = None,
    data_docs_dir: Path | None = None,
    show_progress: bool = False,
    length_policy: str = "drop",
) -> ValidationReport:
    """Validate a data file: categories of errors and warnings, token statistics, GX Data Docs.

    Args:
        path: a JSONL file or JSON array in a supported format.
        fmt: "auto", "openai", "alpaca" or "sharegpt".
        tokenizer: the run's tokenizer; None skips token counts and the token limit.
        max_tokens: token limit per example (`data.max_tokens`); None for no limit.
        max_drop_fraction: largest share of examples the length policy may drop.
        min_answer_chars: answers shorter than this are a warning.
        batch_size, seq_len, max_steps: training settings for the epoch and step estimate.
        data_docs_dir: project root of the Great Expectations context (e.g. `artifacts/gx`);
            the suite runs and Data Docs are built there. None skips Great Expectations.
        show_progress: show a progress bar (on stderr) while reading.
        length_policy: "drop" or "truncate", what prepare does with over-long examples.

    Returns:
        The report; `report.valid` is False when any error category is non-zero.

    Raises:
        DataFileError: the file is missing, a directory or cannot be opened.
        FormatError: `fmt` is not a supported format name.
    """
    from tasks.config import file_md5

    path = Path(path)
    if length_policy not in ("drop", "truncate"):
        raise ValueError(f"length_policy {length_policy!r}: use drop or truncate (data.length_policy)")
    reported_fmt, conv_fmt = resolve_format(path, fmt)
    errors, warns = _Tally(), _Tally()
    rows: list[dict[str, Any]] = []
    bad: set[int] = set()
    seen_exact: dict[bytes, int] = {}
    seen_loose: dict[bytes, int] = {}
    pending: list[CheckedExample] = []
    n_messages: list[int] = []

    def flush() -> None:
        counts = count_chat_tokens(tokenizer, [c.example["messages"] for c in pending])
        for c, (total, assistant, last) in zip(pending, counts):
            rows[c.ordinal].update(total_tokens=total, assistant_tokens=assistant, _last=last)
        pending.clear()

    with _progress(path, show_progress) as on_bytes:
        for c in iter_checked(path, conv_fmt, on_bytes):
            row = _row(c)
            rows.append(row)
            if c.structurally_ok:
                messages = c.example["messages"]
                _check_duplicates(c, messages, seen_exact, seen_loose, row)
                if not (c.problems.keys() & {"duplicate", "near_duplicate"}):
                    n_messages.append(len(messages))
                for cat, msg in check_warnings(messages, min_answer_chars).items():
                    warns.add(cat, c.line, msg)
                if tokenizer is not None and not (c.problems.keys() & {"duplicate", "near_duplicate"}):
                    pending.append(c)
                    if len(pending) >= _TOKEN_CHUNK:
                        flush()
            for cat, msg in c.problems.items():
                errors.add(cat, c.line, msg)
            if c.problems:
                bad.add(c.ordinal)
        if pending:
            flush()
    if not rows:
        errors.add("no_examples", 0, "the file holds no examples")

    length = _apply_length_rules(rows, max_tokens, length_policy)
    dropped_fraction = length["dropped"] / len(rows) if rows else 0.0
    over_is_error = dropped_fraction > max_drop_fraction
    for r in rows:
        if r.get("over_limit"):
            what = "drop" if not r["kept_by_length_policy"] else "truncate"
            msg = f"{r['total_tokens']} tokens > data.max_tokens {max_tokens}; prepare will {what} it"
            if over_is_error:
                errors.add("over_token_limit", r["line"], msg + f" (too many: over data.max_drop_fraction {max_drop_fraction})")
            else:
                warns.add("over_token_limit", r["line"], msg)
    if over_is_error:
        bad |= {i for i, r in enumerate(rows) if r.get("over_limit")}

    token_stats = _token_stats(rows, n_messages, tokenizer, max_tokens, length, batch_size, seq_len, max_steps)
    gx_summary, docs = None, None
    if data_docs_dir is not None and rows:
        gx_summary, docs = run_gx_suite(rows, Path(data_docs_dir), max_tokens, max_drop_fraction, length_policy)
    valid = not errors.counts and (gx_summary is None or gx_summary["success"])
    return ValidationReport(
        valid=valid,
        format=reported_fmt,
        path=str(path),
        md5=file_md5(path),
        examples=len(rows),
        invalid_examples=len(bad),
        errors=errors.counts,
        error_rows=errors.first_rows(),
        error_lines=errors.lines(),
        warnings=warns.counts,
        warning_rows=warns.first_rows(),
        token_stats=token_stats,
        length_policy=length_policy,
        dropped=length["dropped"],
        truncated=length["truncated"],
        dropped_fraction=round(dropped_fraction, 6),
        max_drop_fraction=max_drop_fraction,
        data_docs=docs,
        gx=gx_summary,
        bad_examples=bad,
    )


def _check_duplicates(c: CheckedExample, messages: list[dict], exact: dict, loose: dict, row: dict) -> None:
    d_exact, d_loose = example_digests(messages)
    if d_exact in exact:
        c.problems["duplicate"] = f"the same example as line {exact[d_exact]}"
        row["is_duplicate"] = True
    elif d_loose in loose:
        c.problems["near_duplicate"] = f"the same as line {loose[d_loose]} up to case and whitespace"
        row["is_near_duplicate"] = True
    exact.setdefault(d_exact, c.line)
    loose.setdefault(d_loose, c.line)


def _apply_length_rules(rows: list[dict], max_tokens: int | None, policy: str) -> dict[str, int]:
    """Mark over-long rows and whether the length policy keeps them; count dropped/truncated."""
    dropped = truncated = 0
    for r in rows:
        total = r.get("total_tokens")
        if total is None:
            continue
        over = max_tokens is not None and total > max_tokens
        # Truncation keeps at least one token of the last answer; a longer prompt cannot fit.
        fits = policy == "truncate" and total - r["_last"] + 1 <= max_tokens if over else True
        r["over_limit"] = over
        r["kept_by_length_policy"] = fits
        dropped += over and not fits
        truncated += over and fits
    return {"dropped": dropped, "truncated": truncated}


def _token_stats(rows, n_messages, tokenizer, max_tokens, length, batch_size, seq_len, max_steps) -> dict[str, Any]:
    counted = [r for r in rows if r.get("total_tokens") is not None]
    kept = [r for r in counted if r["kept_by_length_policy"]]
    cap = max_tokens or 0
    total_kept = sum(min(r["total_tokens"], cap) if r["over_limit"] else r["total_tokens"] for r in kept)
    trained_kept = sum(r["assistant_tokens"] for r in kept)  # an upper bound for truncated ones
    over = sum(1 for r in counted if r["over_limit"])
    stats: dict[str, Any] = {
        "examples": len(n_messages),
        "messages_per_example": summarize(n_messages),
        "tokenizer": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "total_tokens": summarize([r["total_tokens"] for r in counted]),
        "assistant_tokens": summarize([r["assistant_tokens"] for r in counted]),
        "max_tokens": max_tokens,
        "over_limit": over,
        "over_limit_fraction": round(over / len(rows), 6) if rows else 0.0,
        "dropped": length["dropped"],
        "truncated": length["truncated"],
        "assistant_tokens_method": "tokens of assistant contents within the rendered chat template",
    }
    stats.update(estimate_training(total_kept, trained_kept, batch_size, seq_len, max_steps))
    return stats


class _progress:
    """Context manager giving an `on_bytes` callback that drives a rich progress bar (or None)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.bar, self.pending = path, enabled, None, 0

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("validating"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task("read", total=self.path.stat().st_size)
        return self._advance

    def _advance(self, n: int) -> None:
        self.pending += n
        if self.pending >= 1 << 20:  # a rich update per line would cost more than the parsing
            self.bar.advance(self.task, self.pending)
            self.pending = 0

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------- Great Expectations


def build_suite(max_tokens: int | None, max_drop_fraction: float, length_policy: str):
    """The expectation suite of the per-example checks (columns of the examples dataframe)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="chat_examples")
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="line"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="n_messages", min_value=1))
    for flag in ("fields_ok", "keys_ok", "roles_ok", "content_ok", "has_assistant", "alternating", "system_first"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=flag, value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]))
    for flag in ("is_duplicate", "is_near_duplicate"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=flag, value_set=[False]))
    if max_tokens is not None:
        mostly = 1.0 - max_drop_fraction
        if length_policy == "drop":
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="total_tokens", max_value=max_tokens, mostly=mostly))
        else:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="kept_by_length_policy", value_set=[True], mostly=mostly))
    return suite


def examples_frame(rows: list[dict[str, Any]]):
    """A pandas dataframe with one row per example and the columns the suite checks."""
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=list(_COLUMNS))
    return frame.astype({"line": "int64"})


def run_gx_suite(
    rows: list[dict[str, Any]], context_dir: Path, max_tokens: int | None, max_drop_fraction: float, length_policy: str
) -> tuple[dict[str, Any], str | None]:
    """Run the suite as one GX checkpoint (file context under `context_dir`) and build Data Docs.

    Returns:
        (summary: success and per-expectation unexpected counts, path of the Data Docs index.html).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="file", project_root_dir=str(context_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("training_data")
    asset = source.add_dataframe_asset("examples")
    batch = asset.add_batch_definition_whole_dataframe("all_examples")
    suite = context.suites.add_or_update(build_suite(max_tokens, max_drop_fraction, length_policy))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="validate_examples", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name="training_data",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": examples_frame(rows)})
    expectations = []
    for run in result.run_results.values():
        for r in run.results:
            expectations.append(
                {
                    "expectation": r.expectation_config.type,
                    "column": r.expectation_config.kwargs.get("column"),
                    "success": bool(r.success),
                    "unexpected_count": r.result.get("unexpected_count"),
                }
            )
    docs = None
    for site in context.get_docs_sites_urls():
        url = site.get("site_url") or ""
        docs = url.removeprefix("file://") or None
    return {"success": bool(result.success), "expectations": expectations}, docs


# ---------------------------------------------------------------------------- output


def write_fixed(path: Path, report: ValidationReport, out: Path) -> tuple[int, int]:
    """Write the examples of `path` without the bad ones, as canonical messages JSONL, atomically.

    Nothing is edited: an example with an error (structural, duplicate after its first
    occurrence, or over-long when that is an error) is left out whole.

    Returns:
        (examples kept, examples dropped).
    """
    conv_fmt = report.format if report.format in FORMATS else "openai"  # as validate_dataset read it
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    kept = dropped = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for c in iter_checked(Path(path), conv_fmt):
                if c.ordinal in report.bad_examples or c.example is None:
                    dropped += 1
                    continue
                f.write(json.dumps(c.example, ensure_ascii=False) + "\n")
                kept += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return kept, dropped


def render_report(report: ValidationReport, console=None) -> None:
    """Print a human summary of the report with rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    verdict = "[bold green]VALID[/]" if report.valid else "[bold red]INVALID[/]"
    console.print(f"{verdict}  {report.path}  format={report.format}  examples={report.examples}  md5={report.md5}")
    if report.errors or report.warnings:
        table = Table(title="Problems")
        for col in ("kind", "category", "count", "first lines"):
            table.add_column(col)
        lines = {**{c: [r["line"] for r in report.warning_rows if r["category"] == c] for c in report.warnings}}
        for cat, n in sorted(report.errors.items()):
            table.add_row("[red]error[/]", cat, str(n), _first(report.error_lines.get(cat, [])))
        for cat, n in sorted(report.warnings.items()):
            table.add_row("[yellow]warning[/]", cat, str(n), _first(lines.get(cat, [])))
        console.print(table)
    for r in report.error_rows[:10]:
        console.print(f"  line {r['line']}: [red]{r['category']}[/] {r['message']}")
    stats = report.token_stats or {}
    if stats.get("total_tokens"):
        table = Table(title=f"Tokens ({stats.get('tokenizer')})")
        table.add_column("per example")
        for key in ("min", "p5", "median", "mean", "p95", "max"):
            table.add_column(key, justify="right")
        for name in ("messages_per_example", "total_tokens", "assistant_tokens"):
            s = stats[name]
            table.add_row(name, *(f"{s[k]:g}" for k in ("min", "p5", "median", "mean", "p95", "max")))
        console.print(table)
        console.print(
            f"tokens per epoch {stats['tokens_per_epoch']} (trained on {stats['trained_tokens_per_epoch']}); "
            f"{stats['steps_per_epoch']} steps per epoch at batch {stats['batch_size']} x seq_len {stats['seq_len']}"
            + (f"; max_steps {stats['max_steps']} = {stats['epochs']} epochs" if stats.get("epochs") else "")
        )
        console.print(
            f"over max_tokens {stats['max_tokens']}: {stats['over_limit']} ({stats['over_limit_fraction']:.2%}); "
            f"length policy {report.length_policy}: {report.dropped} dropped, {report.truncated} truncated "
            f"(limit {report.max_drop_fraction:.0%} dropped)"
        )
    if report.data_docs:
        console.print(f"Data Docs: {report.data_docs}")


def _first(lines: list[int], n: int = 8) -> str:
    text = ", ".join(map(str, lines[:n]))
    return text + (", ..." if len(lines) > n else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Validate a training data file; prints the report as JSON.")
    ap.add_argument("path", type=Path)
    ap.add_argument("--format", default="auto")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--data-docs", type=Path, default=None, help="GX context folder, e.g. artifacts/gx")
    args = ap.parse_args(argv)
    from tasks.config import ConfigError, load_params
    from tasks.modeling import load_tokenizer, resolve_base

    try:
        params = load_params(args.params)
        tokenizer = load_tokenizer(resolve_base(params.model))
        report = validate_dataset(
            args.path, args.format, tokenizer, params.data.max_tokens, params.data.max_drop_fraction,
            params.data.min_answer_chars, params.train.batch_size, params.train.seq_len, params.train.max_steps,
            args.data_docs, sys.stderr.isatty(), params.data.length_policy,
        )  # fmt: skip
    except (ConfigError, DataFileError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), ensure_ascii=False))
    return 0 if report.valid else 1


if __name__ == "__main__":
    raise SystemExit(main())
