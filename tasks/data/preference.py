"""Preference data from the interaction log: KTO rows from ratings, DPO pairs from corrections and rating gaps.

Most production feedback is a rating without a correction. `preference_examples` turns the
latest feedback of every rated completion into the two shapes TRL's preference trainers
read (conversational: message lists, a `tools` column where the request had tools):

- a KTO row `{"prompt": [...], "completion": [{"role": "assistant", ...}], "label": bool}`
  for each uncorrected answer rated at least `preference.desirable_min_rating` (desirable)
  or at most `preference.undesirable_max_rating` (undesirable); ratings in between are
  left out;
- a DPO pair `{"prompt": [...], "chosen": [...], "rejected": [...]}` for each correction
  (chosen: the correction, rejected: the served answer), and for two uncorrected answers
  to the same prompt whose ratings differ by at least `preference.pair_min_rating_gap`
  (the best against the worst of that prompt).

`export_preference` writes them as one JSONL file (`preference.path`), which a run with a
`feedback: true` source exports beside the feedback export and versions with DVC.

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
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import DataParams, PreferenceParams
from tasks.data.checks import check_messages
from tasks.data.sources import prompt_key
from tasks.data.tokens import count_chat_tokens
from tasks.errors import DataFileError
from tasks.files import file_md5, write_atomic

MAX_LISTED = 100  # lines listed per category in stats.json
TRAIN_SPLIT, HELDOUT_SPLIT = "preference_train", "preference_heldout"


@dataclass(frozen=True)
class Rated:
    """A served completion with its latest rating (and the user's correction, if any)."""

    messages: list[dict[str, Any]]  # the request's messages (the prompt)
    answer: str
    rating: int
    correction: str | None = None
    tools: list[dict[str, Any]] | None = None


def read_rated(db: Path) -> list[Rated]:
    """The latest feedback of each rated completion in the service's log, oldest first (read-only).

    Raises:
        DataFileError: `db` is not the service's SQLite log.
    """
    query = """
        SELECT i.messages, i.answer, f.rating, f.correction FROM feedback f
        JOIN interactions i ON i.id = f.completion_id
        WHERE f.id = (SELECT MAX(id) FROM feedback g WHERE g.completion_id = f.completion_id)
        ORDER BY f.id
    """
    try:
        conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute(query).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DataFileError(f"{db}: not a feedback log of the service ({exc}); point FTLLM_FEEDBACK_DB at it") from None
    return [Rated(json.loads(m), a, int(r), c) for m, a, r, c in rows]


def _prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation the model answered, or None when it is not one (e.g. a plain /generate prompt)."""
    kept = [m for m in messages if m.get("role") in ("system", "user", "assistant", "tool")]
    return kept if kept and kept[-1]["role"] in ("user", "tool") else None


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _with_tools(row: dict[str, Any], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {**row, "tools": tools} if tools else row


def preference_examples(rated: list[Rated], prefs: PreferenceParams) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """KTO rows and DPO pairs from rated completions (see the module's docstring), with their counts."""
    rows: list[dict[str, Any]] = []
    counts = {"desirable": 0, "undesirable": 0, "middle": 0, "pairs_from_corrections": 0, "pairs_from_ratings": 0,
              "not_a_chat": 0}
    by_prompt: dict[bytes, list[tuple[list[dict], Rated]]] = defaultdict(list)
    for item in rated:
        prompt = _prompt(item.messages)
        if prompt is None or not item.answer.strip():
            counts["not_a_chat"] += 1
            continue
        if item.correction is not None:
            if item.correction.strip() != item.answer.strip():
                rows.append(_with_tools({"prompt": prompt, "chosen": _answer(item.correction),
                                         "rejected": _answer(item.answer)}, item.tools))
                counts["pairs_from_corrections"] += 1
            continue
        if item.rating >= prefs.desirable_min_rating or item.rating <= prefs.undesirable_max_rating:
            label = item.rating >= prefs.desirable_min_rating
            rows.append(_with_tools({"prompt": prompt, "completion": _answer(item.answer), "label": label}, item.tools))
            counts["desirable" if label else "undesirable"] += 1
        else:
            counts["middle"] += 1
        by_prompt[prompt_key([*prompt, *_answer(item.answer)])].append((prompt, item))
    for answers in by_prompt.values():
        best = max(answers, key=lambda a: a[1].rating)
        worst = min(answers, key=lambda a: a[1].rating)
        if best[1].rating - worst[1].rating >= prefs.pair_min_rating_gap and best[1].answer.strip() != worst[1].answer.strip():
            rows.append(_with_tools({"prompt": best[0], "chosen": _answer(best[1].answer),
                                     "rejected": _answer(worst[1].answer)}, best[1].tools))
            counts["pairs_from_ratings"] += 1
    return rows, counts


def export_preference(db: Path, out: Path, prefs: PreferenceParams) -> dict[str, Any]:
    """Write the log's preference examples to `out` (atomically); what was written, counted.

    A missing log writes an empty file: no ratings yet, no preference tuning.
    """
    rows, counts = preference_examples(read_rated(db), prefs) if Path(db).is_file() else ([], {})
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"path": str(out), "examples": len(rows), **counts}


# ------------------------------------------------------------------------------ prepare


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


def _problem(row: Any) -> str | None:
    kind = _kind(row)
    if kind is None:
        return "not_a_preference_row"
    answers = [row["completion"]] if kind == "kto" else [row["chosen"], row["rejected"]]
    if any(len(a) != 1 or not isinstance(a[0], dict) or a[0].get("role") != "assistant" for a in answers):
        return "completion_not_one_answer"
    for conv in conversations(row):
        problems = check_messages(conv)
        if problems:
            return next(iter(problems))
    return None


def _digest(row: dict[str, Any]) -> bytes:
    """Identity of a row for deduplication: its prompt, its answers with whitespace and case folded, its label."""
    def fold(answer: list[dict]) -> str:
        return " ".join(str(answer[0].get("content") or "").split()).lower()

    parts = [fold(row["completion"]), str(row["label"])] if "completion" in row else [fold(row["chosen"]), fold(row["rejected"])]
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
    """
    path = Path(prefs.path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    read, invalid, over_limit, duplicates = 0, [], [], 0
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
        problem = _problem(row)
        if problem:
            invalid.append({"line": line, "category": problem})
            continue
        digest = _digest(row)
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        kept.append((line, row))
    convs = [c for _, row in kept for c in conversations(row)]
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
