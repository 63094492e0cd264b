"""Token counts of conversations under the run's tokenizer and chat template.

Each conversation is rendered with the chat template (`tokenize=False`) and the rendered
texts are batch-encoded by the fast tokenizer. Assistant tokens are the tokens of the
assistant contents inside the rendered text (located by character offsets).
"""

from __future__ import annotations

import math
import re
from typing import Any

_TOKEN_CHUNK = 2048


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
    from tasks.model.chat import count_tokens

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
