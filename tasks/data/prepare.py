"""Preparing the training data: canonical messages, deduplicated, length-limited, split.

The DVC stage `prepare` reads `data.path` in its format (`data.format`, or detected),
converts every example to canonical chat messages (`tasks.data.formats`), strips the whitespace
around every message's content, drops duplicates (exact, then up to case and whitespace;
the first occurrence stays), applies `data.length_policy` to examples over
`data.max_tokens` (drop them, or cut the last answer's tokens so the example fits), and
splits train / val / test by a stable hash of each example's normalised prompt (the
messages before the last answer). An example's split depends only on its own prompt, so
appending data never moves an example between splits, and the same prompt can never be in
both train and test (that is checked anyway: `train_test_overlap` in stats.json).

Normalisation, deduplication, the token count and the length policy are validation's own
(`tasks.data.checks.normalise_example` and `Deduplicator`, `tasks.data.tokens.count_chat_tokens`
and `length_decision`), so prepare drops exactly what validation reported.

It refuses data that `tasks.data.validate` finds structurally invalid (run `ftllm validate
PATH --fix OUT` first) or with an example that has no trained tokens under the chat
template (`no_trained_tokens`), and fails when the length policy would drop more than
`data.max_drop_fraction` of the examples. Nothing is ever dropped silently: stats.json
counts what was deduplicated, dropped and truncated.

Outputs, written into a temporary folder that then replaces `--out` in one rename:
`train.jsonl`, `val.jsonl`, `test.jsonl` and `stats.json`.

The DVC stage's entry point is `tasks.stages.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.config import DataParams, Params
from tasks.data.checks import Deduplicator, iter_checked, normalise_example, resolve_format
from tasks.data.tokens import (
    TokenCount,
    TrainingBudget,
    count_chat_tokens,
    estimate_training,
    length_decision,
    summarize,
)
from tasks.errors import PrepareError
from tasks.files import file_md5

SPLITS = ("train", "val", "test")



def read_examples(path: Path, fmt: str) -> tuple[str, list[tuple[int, dict]]]:
    """Read `path` as canonical examples with their line numbers, normalised (contents stripped).

    Args:
        path: the data file.
        fmt: "auto", "openai", "alpaca" or "sharegpt".

    Returns:
        (format read, [(line, example)]).

    Raises:
        PrepareError: an example is structurally invalid (the first one is named).
    """
    reported, conv_fmt = resolve_format(path, fmt)
    examples: list[tuple[int, dict]] = []
    invalid: list[tuple[int, str, str]] = []
    for c in iter_checked(path, conv_fmt):
        if c.problems:
            invalid.append((c.line, *next(iter(c.problems.items()))))
            continue
        examples.append((c.line, normalise_example(c.example)))
    if invalid:
        line, category, message = invalid[0]
        raise PrepareError(
            f"{path}: line {line}: {category}: {message} ({len(invalid)} invalid examples in all); "
            f"run `ftllm validate {path}` to list them and `--fix OUT` to drop them"
        )
    return reported, examples


def deduplicate(examples: list[tuple[int, dict]]) -> tuple[list[tuple[int, dict]], dict[str, int]]:
    """Drop repeated examples with validation's `Deduplicator`, keeping the first of each."""
    dedup = Deduplicator()
    kept, counts = [], {"exact": 0, "near": 0}
    for line, example in examples:
        repeat = dedup.check(example["messages"], line)
        if repeat is None:
            kept.append((line, example))
        else:
            counts["exact" if repeat[0] == "duplicate" else "near"] += 1
    return kept, counts


def truncate_answer(tokenizer, messages: list[dict], max_tokens: int, system_message: str = "auto") -> list[dict] | None:
    """Cut the last assistant answer's tokens so that the conversation fits `max_tokens`.

    Returns:
        The shortened messages, or None when even one answer token does not fit.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = tokenizer.encode(messages[last]["content"], add_special_tokens=False)
    total = count_chat_tokens(tokenizer, [messages], system_message)[0].total
    for _ in range(8):  # re-encoding a cut text can merge tokens differently: re-count and trim
        excess = total - max_tokens
        if excess <= 0:
            return messages
        ids = ids[: len(ids) - excess]
        text = tokenizer.decode(ids, skip_special_tokens=True).rstrip() if ids else ""
        if not text.strip():
            return None
        messages = [*messages[:last], {**messages[last], "content": text}, *messages[last + 1 :]]
        total = count_chat_tokens(tokenizer, [messages], system_message)[0].total
    return messages if total <= max_tokens else None


def apply_length_policy(
    examples: list[tuple[int, dict]], tokenizer, data: DataParams, source: Path | str = "data"
) -> tuple[list[tuple[int, dict]], list[TokenCount], dict[str, Any]]:
    """Drop or truncate the examples over `data.max_tokens` tokens (validation's `length_decision`).

    Args:
        source: the data file, named in errors.

    Returns:
        (kept examples, their token counts, {"dropped": n, "truncated": n, "dropped_lines": [...]}).

    Raises:
        PrepareError: an example has no trained tokens under the chat template.
    """
    counts = count_chat_tokens(tokenizer, [e["messages"] for _, e in examples], data.system_message)
    empty = [line for (line, _), n in zip(examples, counts) if not n.trained]
    if empty:
        raise PrepareError(
            f"{source}: line {empty[0]}: no_trained_tokens: the chat template marks no assistant token in it "
            f"({len(empty)} such examples in all); run `ftllm validate {source}` to list them"
        )
    kept, tokens, dropped_lines, truncated = [], [], [], 0
    for (line, example), count in zip(examples, counts):
        decision = length_decision(count, data.max_tokens, data.length_policy)
        if decision == "truncate":
            cut = truncate_answer(tokenizer, example["messages"], data.max_tokens, data.system_message)
            if cut is None:
                decision = "drop"
            else:
                example = {**example, "messages": cut}
                count = count_chat_tokens(tokenizer, [cut], data.system_message)[0]
                truncated += 1
        if decision == "drop":
            dropped_lines.append(line)
            continue
        kept.append((line, example))
        tokens.append(count)
    return kept, tokens, {"dropped": len(dropped_lines), "truncated": truncated, "dropped_lines": dropped_lines[:100]}


def prompt_key(messages: list[dict]) -> bytes:
    """sha256 of the normalised prompt: the messages before the last answer, case and whitespace folded."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(str(m.get('content') or '').split()).lower()}" for m in messages[:last])
    return hashlib.sha256(text.encode("utf-8")).digest()


def assign_split(key: bytes, val_fraction: float, test_fraction: float) -> str:
    """The split of an example from its prompt hash: a uniform number in [0, 1) against the fractions."""
    u = int.from_bytes(key[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_examples(
    examples: list[tuple[int, dict]], counts: list[TokenCount], val_fraction: float, test_fraction: float
) -> tuple[dict[str, list[dict]], dict[str, list[TokenCount]], int]:
    """Split by prompt hash; returns (examples per split, token counts per split, train/test prompt overlap)."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    split_counts: dict[str, list[TokenCount]] = {s: [] for s in SPLITS}
    keys: dict[str, set[bytes]] = {s: set() for s in SPLITS}
    for (_, example), count in zip(examples, counts):
        key = prompt_key(example["messages"])
        split = assign_split(key, val_fraction, test_fraction)
        splits[split].append(example)
        split_counts[split].append(count)
        keys[split].add(key)
    return splits, split_counts, len(keys["train"] & keys["test"])


def write_splits(out_dir: Path, splits: dict[str, list[dict]], stats: dict[str, Any]) -> Path:
    """Write the splits and stats.json into a temporary folder, then swap it in for `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, examples in splits.items():
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def prepare_dataset(path: Path, out_dir: Path, params: Params, tokenizer=None) -> dict[str, Any]:
    """Prepare `path` into train/val/test JSONL and stats.json under `out_dir`.

    Args:
        path: the raw data file.
        out_dir: the output folder (replaced as a whole).
        params: the run's settings (`data.*`, `train.batch_size/seq_len/max_steps`, `model` for the tokenizer).
        tokenizer: the run's tokenizer; loaded from `params.model` when None.

    Returns:
        The stats written to stats.json.

    Raises:
        PrepareError: invalid examples, too many dropped by the length policy, or a train/test overlap.
        DataFileError: the file cannot be read.
    """
    data = params.data
    if tokenizer is None:
        from tasks.model.loading import load_base_tokenizer

        tokenizer = load_base_tokenizer(params.model)
    path = Path(path)
    fmt, examples = read_examples(path, data.format)
    read = len(examples)
    examples, deduplicated = deduplicate(examples)
    examples, counts, length = apply_length_policy(examples, tokenizer, data, path)
    share = length["dropped"] / read if read else 0.0
    if share > data.max_drop_fraction:
        raise PrepareError(
            f"{path}: {length['dropped']} of {read} examples ({share:.1%}) are over data.max_tokens "
            f"{data.max_tokens} and would be dropped, more than data.max_drop_fraction {data.max_drop_fraction}; "
            "raise data.max_tokens, set data.length_policy=truncate, or shorten the examples"
        )
    if not examples:
        raise PrepareError(f"{path}: no examples left to train on; check the file with `ftllm validate {path}`")
    splits, split_counts, overlap = split_examples(examples, counts, data.val_fraction, data.test_fraction)
    if overlap:  # impossible by construction (the split is a function of the prompt); kept as a guard
        raise PrepareError(f"{path}: {overlap} prompts are in both train and test; this is a bug in tasks.data.prepare")
    train = split_counts["train"]
    stats = {
        "path": str(path),
        "md5": file_md5(path),
        "format": fmt,
        "examples_read": read,
        "examples": len(examples),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "deduplicated": deduplicated,
        "length_policy": data.length_policy,
        "max_tokens": data.max_tokens,
        "dropped": length["dropped"],
        "dropped_lines": length["dropped_lines"],
        "truncated": length["truncated"],
        "train_test_overlap": overlap,
        "split": {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction, "key": "sha256 of the normalised prompt"},
        "token_stats": {s: summarize([n.total for n in split_counts[s]]) for s in SPLITS},
        "system_message": data.system_message,
        "training_estimate": estimate_training(
            sum(n.total for n in train), sum(n.trained for n in train), TrainingBudget.of(params.train)
        ),
    }
    write_splits(out_dir, splits, stats)
    return stats
