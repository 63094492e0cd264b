"""Several data sources merged into one set of examples: invalid-row policy, corrections, dedup, weight, cap.

`data.sources` lists the files a run trains on (`data.path` alone is the one-source
shorthand). Each source is read in its own format and checked with validation's checks
(`tasks.data.checks`); its invalid rows (a structural error, or no trained token under the
chat template) follow its `invalid_rows` policy: `fail` refuses the source at the first one,
`drop` leaves them out and reports them while they are at most `max_invalid_share` of its
rows, and refuses the source beyond that (`InvalidRowsError`, naming the source and the key).

Then the sources are merged, first source first:

1. Corrections outrank answers: an example marked `"correction": true` (what `ftllm
   feedback export` and a `feedback: true` source write for an answer a user corrected)
   replaces every other example with the same normalised prompt (`prompt_key`), whichever
   source it came from; of several corrections of one prompt the last wins. Each
   replacement is counted per source.
2. Duplicates are dropped with validation's `Deduplicator` (exact, then up to case and
   whitespace); the first occurrence, in source order, stays.
3. `cap: N` keeps at most N examples of the source, `weight: w` keeps each example
   `w` times in the train split (`floor(w)` copies plus one more for a deterministic share
   `w - floor(w)` of them; `w < 1` leaves the others out altogether). Which examples are kept
   depends only on a hash of each example, never on the order or the other sources, so the
   choice is the same on every run and stable when rows are appended.

Every count lands in the prepare stage's stats.json, per source.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import DataParams, PreferenceParams, SourceParams
from tasks.data.checks import STRUCTURAL, Deduplicator, iter_checked, normalise_example, resolve_format
from tasks.data.tokens import UNTRAINABLE, TokenCount, TrainingBudget, count_chat_tokens, untrainable
from tasks.errors import DataFileError, InvalidRowsError, PrepareError
from tasks.files import file_md5

MAX_LISTED = 100  # lines listed per category in stats.json


@dataclass
class Row:
    """One example of a source, with where it came from and what the merge decided about it."""

    line: int
    example: dict
    source: int
    count: TokenCount | None = None
    corrected: bool = False
    copies: int = 1  # times it goes into the train split (its source's weight)


@dataclass
class SourceRead:
    """A source's usable rows and what reading it found."""

    rows: list[Row]
    stats: dict[str, Any] = field(default_factory=dict)


def source_label(index: int, data: DataParams) -> str:
    """The settings key a source is named by in messages: `data.path`, or `data.sources[i]`."""
    return f"data.sources[{index}]" if data.sources else "data.path"


def prompt_key(messages: list[dict]) -> bytes:
    """sha256 of the normalised prompt: the messages before the last answer, case and whitespace folded."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(str(m.get('content') or '').split()).lower()}" for m in messages[:last])
    return hashlib.sha256(text.encode("utf-8")).digest()


def read_source(
    index: int, source: SourceParams, data: DataParams, tokenizer, budget: TrainingBudget | None = None
) -> SourceRead:
    """Read one source, count its tokens, and apply its invalid-row policy.

    Raises:
        PrepareError: an invalid row under `invalid_rows: fail` (the first one is named).
        InvalidRowsError: more invalid rows than `max_invalid_share` under `invalid_rows: drop`.
        DataFileError: the file cannot be read (or a feedback source's export is missing).
    """
    path = Path(source.file)
    if source.feedback and not path.is_file():
        raise DataFileError(
            f"{path}: the feedback export of {source_label(index, data)} is missing; `ftllm run` writes it from the "
            "feedback database (FTLLM_FEEDBACK_DB, else feedback.db beside params.yaml) before the stages run"
        )
    reported, conv_fmt = resolve_format(path, source.format or data.format)
    rows: list[Row] = []
    invalid: list[tuple[int, str, str]] = []
    empty_file = True
    for c in iter_checked(path, conv_fmt):
        empty_file = False
        if c.problems:
            invalid.append((c.line, *next(iter(c.problems.items()))))
            continue
        corrected = isinstance(c.source, dict) and c.source.get("correction") is True
        rows.append(Row(c.line, normalise_example(c.example), index, corrected=corrected))
    read = len(rows) + len(invalid)
    counts = count_chat_tokens(tokenizer, [r.example for r in rows], data.system_message, budget)
    trainable = []
    for row, count in zip(rows, counts):
        row.count = count
        problem = untrainable(count, row.example)
        if problem:
            invalid.append((row.line, *problem))
        else:
            trainable.append(row)
    rows = trainable
    invalid.sort()
    check_invalid_rows(source_label(index, data), source, path, read, invalid)
    stats = {
        "path": str(path),
        "md5": file_md5(path),
        "format": reported if not empty_file or not source.feedback else "openai",
        "feedback": source.feedback,
        "rows": read,
        "invalid_rows": source.invalid_rows,
        "invalid": len(invalid),
        "invalid_lines": [{"line": line, "category": cat} for line, cat, _ in invalid[:MAX_LISTED]],
        "corrections": sum(r.corrected for r in rows),
    }
    return SourceRead(rows, stats)


def check_invalid_rows(label: str, source: SourceParams | PreferenceParams, path: Path, read: int,
                       invalid: list[tuple[int, str, str]]) -> None:
    """Apply a source's (or the preference file's) `invalid_rows` policy to its invalid rows (sorted by line)."""
    if not invalid:
        return
    line, category, message = invalid[0]
    # `ftllm validate` reads chat data, not the preference file's rows
    listing = (f"run `ftllm validate {path}` to list them and `--fix OUT` to drop them" if label != "preference"
               else "fix or remove them")
    if source.invalid_rows == "fail":
        leave_out = f"set {label}.invalid_rows: drop" if label != "data.path" else "list it in data.sources with invalid_rows: drop"
        raise PrepareError(
            f"{path}: line {line}: {category}: {message} ({len(invalid)} invalid examples in all); {listing}, "
            f"or {leave_out} to leave them out"
        )
    share = len(invalid) / read
    if share > source.max_invalid_share:
        raise InvalidRowsError(
            f"{label} ({path}): {len(invalid)} of {read} rows ({share:.2%}) are invalid, more than "
            f"{label}.max_invalid_share {source.max_invalid_share} (first: line {line}: {category}: {message}); fix "
            f"them{f' (`ftllm validate {path}` lists them)' if label != 'preference' else ''} or raise "
            f"{label}.max_invalid_share"
        )


def _sample_u(example: dict, salt: bytes = b"ftllm-sample") -> float:
    """A uniform number in [0, 1) from the example's content; independent of the split's hash."""
    text = json.dumps(example["messages"], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(salt + b"\x00" + text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select_replay(rows: list[Row], sources: list[SourceParams], fraction: float) -> dict[str, Any]:
    """A warm start's train rows: every row of a feedback source, and a stable `fraction` of the others (the replay).

    The rows left out get no train copies (`copies = 0`); they still go to val, test and
    feedback once, so the gate scores the candidate on the same splits as a run from the
    base. Which rows are replayed depends only on each example, so a later round replays
    the same ones (and more of them as `fraction` grows).
    """
    new = replayed = 0
    for row in rows:
        if sources[row.source].feedback:
            new += 1
        elif _sample_u(row.example, b"ftllm-replay") < fraction:
            replayed += 1
        else:
            row.copies = 0
    return {"fraction": fraction, "new": new, "replayed": replayed,
            "left_out": len(rows) - new - replayed}


def merge_sources(sources: list[SourceParams], reads: list[SourceRead]) -> tuple[list[Row], dict[str, Any]]:
    """Merge the sources' rows: corrections outrank answers, then deduplication, then cap and weight.

    Fills in each source's stats (`replaced_by_corrections`, `deduplicated`, `sampled_out`,
    `kept`, `train_copies`) and returns the merged rows with the corrections' summary.
    """
    latest: dict[bytes, Row] = {}
    for read in reads:
        for row in read.rows:
            if row.corrected:
                latest[prompt_key(row.example["messages"])] = row
    replaced: list[dict[str, int]] = []
    dedup = Deduplicator()
    kept_by_source: list[list[Row]] = [[] for _ in reads]
    for i, read in enumerate(reads):
        stats = read.stats
        stats.update(replaced_by_corrections=0, deduplicated={"exact": 0, "near": 0})
        for row in read.rows:
            winner = latest.get(prompt_key(row.example["messages"]))
            if winner is not None and winner is not row:
                stats["replaced_by_corrections"] += 1
                replaced.append({"source": i, "line": row.line})
                continue
            repeat = dedup.check(row.example["messages"], row.line, row.example.get("tools"))
            if repeat is not None:
                stats["deduplicated"]["exact" if repeat[0] == "duplicate" else "near"] += 1
                continue
            kept_by_source[i].append(row)
    merged: list[Row] = []
    for source, read, rows in zip(sources, reads, kept_by_source):
        sampled = _cap_and_weigh(rows, source)
        read.stats.update(sampled_out=len(rows) - len(sampled), kept=len(sampled), weight=source.weight, cap=source.cap,
                          train_copies=sum(r.copies for r in sampled))
        merged += sampled
    corrections = {"examples": len(latest), "replaced": len(replaced), "replaced_rows": replaced[:MAX_LISTED]}
    return merged, corrections


def _cap_and_weigh(rows: list[Row], source: SourceParams) -> list[Row]:
    """The rows a source keeps under its cap or weight, in their order, with their train copies."""
    if source.cap is not None and len(rows) > source.cap:
        chosen = set(sorted(range(len(rows)), key=lambda i: _sample_u(rows[i].example))[: source.cap])
        return [r for i, r in enumerate(rows) if i in chosen]
    if source.weight is None or source.weight == 1:
        return rows
    whole, part = math.floor(source.weight), source.weight - math.floor(source.weight)
    kept = []
    for row in rows:
        row.copies = whole + (_sample_u(row.example) < part)
        if row.copies:
            kept.append(row)
    return kept


def sources_md5(stats: list[dict[str, Any]]) -> str:
    """One md5 for several sources (of their paths and md5s, in order); a single source's is its own md5."""
    if len(stats) == 1:
        return stats[0]["md5"]
    text = "\n".join(f"{s['path']}\t{s['md5']}" for s in stats)
    return hashlib.md5(text.encode()).hexdigest()


# Errors a source with `invalid_rows: drop` tolerates in its validation report: its unusable
# rows and its rows over data.max_tokens (left out or cut by data.length_policy), up to the
# share, and repeats (dropped by the merge's deduplication).
DROPPABLE = frozenset(STRUCTURAL | {*UNTRAINABLE, "over_token_limit", "duplicate", "near_duplicate"})


def accept_report(label: str, source: SourceParams, report: dict[str, Any]) -> bool:
    """Whether a source's validation report lets the run go on under the source's `invalid_rows` policy.

    Raises:
        InvalidRowsError: under `drop`, more unusable rows than `max_invalid_share`.
    """
    if report["valid"]:
        return True
    if source.invalid_rows != "drop" or not set(report["errors"]) <= DROPPABLE:
        return False
    rows = report["examples"]
    invalid = [r for r in report["error_rows"]
               if r["category"] in STRUCTURAL or r["category"] in UNTRAINABLE or r["category"] == "over_token_limit"]
    first = invalid[0] if invalid else {"line": 0, "category": "", "message": ""}
    # Over-long rows are an error only past data.max_drop_fraction of the source, and then the
    # ones the length policy drops are invalid (under truncate, those it cannot cut).
    count = min(rows, report["unusable_examples"] + (report["dropped"] if "over_token_limit" in report["errors"] else 0))
    check_invalid_rows(label, source, Path(report["path"]), rows,
                       [(first["line"], first["category"], first["message"])] * count)
    return True
