"""Preference examples in the prepare stage: checked, deduplicated and split like every other source.

The examples come from the interaction log (`tasks.feedback.preference` exports them to
`preference.path`) or from any file of the same shapes: KTO rows `{"prompt", "completion",
"label"}` and DPO pairs `{"prompt", "chosen", "rejected"}`, message lists as TRL reads them.

`prepare_preference` is the prepare stage's part: the same checks as every other source
(structure of every conversation, the token limit, exact deduplication), then a held-out
split by the same stable hash of the normalised prompt as the supervised splits. A prompt
whose hash falls below `preference.heldout_fraction`, or that any held-out supervised split
(val, test, feedback) holds, goes to `preference_heldout`; supervised training leaves those
prompts out too (`heldout_prompts`), so a held-out preference prompt is never trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import DataParams, PreferenceParams
from tasks.data.checks import check_messages
from tasks.data.sources import check_invalid_rows, prompt_key
from tasks.data.tokens import count_chat_tokens
from tasks.errors import DataFileError
from tasks.files import file_md5

MAX_LISTED = 100  # lines listed per category in stats.json
TRAIN_SPLIT, HELDOUT_SPLIT = "preference_train", "preference_heldout"


def _kind(row: Any) -> str | None:
    """"kto" or "pair" by the row's keys; None for a row of neither shape."""
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), list):
        return None
    if isinstance(row.get("completion"), list) and isinstance(row.get("label"), bool) and "chosen" not in row:
        return "kto"
    if isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list) and "completion" not in row:
        return "pair"
    return None


def conversations(row: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The whole conversations of a row: prompt + completion (KTO), or prompt + chosen and prompt + rejected."""
    if "completion" in row:
        return [row["prompt"] + row["completion"]]
    return [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]


def row_problem(row: Any) -> tuple[str, str] | None:
    """(category, what is wrong) for a row that is no preference example, else None."""
    kind = _kind(row)
    if kind is None:
        return "not_a_preference_row", ('neither a KTO row {"prompt": [...], "completion": [...], "label": true or '
                                        'false} nor a DPO pair {"prompt": [...], "chosen": [...], "rejected": [...]}')
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return "bad_tools", "tools is not a list of tool objects"
    answers = [row["completion"]] if kind == "kto" else [row["chosen"], row["rejected"]]
    if any(len(a) != 1 or not isinstance(a[0], dict) or a[0].get("role") != "assistant" for a in answers):
        return "completion_not_one_answer", "an answer (completion, chosen or rejected) is not one assistant message"
    for conv in conversations(row):
        problems = check_messages(conv)
        if problems:
            return next(iter(problems.items()))
    return None


def _digest(row: dict[str, Any]) -> bytes:
    """Identity of a row for deduplication: its prompt, its answers with whitespace and case folded, its label."""
    def fold(answer: list[dict]) -> str:
        return " ".join(str(answer[0].get("content") or "").split()).lower()

    parts = [fold(row["completion"]), str(row["label"])] if "completion" in row else [fold(row["chosen"]), fold(row["rejected"])]
    if row.get("tools"):  # the same prompt under other tools is another prompt
        parts.append(json.dumps(row["tools"], sort_keys=True))
    return hashlib.sha256(prompt_key(conversations(row)[0]) + "\x1e".join(parts).encode()).digest()


def heldout_share(key: bytes) -> float:
    """The uniform number in [0, 1) of a prompt hash, as the supervised split reads it (`assign_split`)."""
    return int.from_bytes(key[:8], "big") / 2**64


@dataclass
class PreferenceSplits:
    """The preference rows per split and what preparing them found."""

    splits: dict[str, list[dict[str, Any]]]
    heldout_keys: set[bytes]  # prompts no training may see
    stats: dict[str, Any]


def prepare_preference(prefs: PreferenceParams, data: DataParams, tokenizer, held_out: set[bytes]) -> PreferenceSplits | None:
    """Check, deduplicate and split the preference file; None when there is none (or it is empty).

    Args:
        held_out: prompt keys of the supervised val, test and feedback splits; their
            preference rows are held out too.

    Raises:
        DataFileError: the file is not JSON lines.
        PrepareError: an invalid row under `preference.invalid_rows: fail` (the first one is named).
        InvalidRowsError: more invalid rows than `preference.max_invalid_share` under `invalid_rows: drop`.
    """
    path = Path(prefs.path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    read, invalid, over_limit, duplicates = 0, [], [], 0
    refused: list[tuple[int, str, str]] = []
    seen: set[bytes] = set()
    kept: list[tuple[int, dict]] = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        read += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            raise DataFileError(f"{path}: line {line}: not JSON; {prefs.path} holds one preference example per line") from None
        problem = row_problem(row)
        if problem:
            invalid.append({"line": line, "category": problem[0]})
            refused.append((line, *problem))
            continue
        digest = _digest(row)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        kept.append((line, row))
    check_invalid_rows("preference", prefs, path, read, refused)
    convs = [{"messages": c, "tools": row.get("tools")} for _, row in kept for c in conversations(row)]
    totals = iter(count_chat_tokens(tokenizer, convs, data.system_message))
    fitting = []
    for line, row in kept:
        counts = [next(totals) for _ in conversations(row)]
        if any(c.total > data.max_tokens or not c.trained for c in counts):
            over_limit.append(line)
        else:
            fitting.append(row)
    splits: dict[str, list[dict]] = {TRAIN_SPLIT: [], HELDOUT_SPLIT: []}
    heldout_keys: set[bytes] = set()
    for row in fitting:
        key = prompt_key(conversations(row)[0])
        heldout = heldout_share(key) < prefs.heldout_fraction or key in held_out
        splits[HELDOUT_SPLIT if heldout else TRAIN_SPLIT].append(row)
        if heldout:
            heldout_keys.add(key)
    stats = {
        "path": str(path), "md5": file_md5(path), "rows": read, "invalid": len(invalid),
        "invalid_lines": invalid[:MAX_LISTED], "deduplicated": duplicates, "over_token_limit": len(over_limit),
        "over_token_limit_lines": over_limit[:MAX_LISTED],
        "counts": {name: _count_kinds(rows) for name, rows in splits.items()},
        "heldout_fraction": prefs.heldout_fraction,
    }
    return PreferenceSplits(splits, heldout_keys, stats)


def _count_kinds(rows: list[dict]) -> dict[str, int]:
    kto = [r for r in rows if "completion" in r]
    return {"examples": len(rows), "desirable": sum(r["label"] for r in kto),
            "undesirable": sum(not r["label"] for r in kto), "pairs": len(rows) - len(kto)}
