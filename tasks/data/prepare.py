"""Preparing the training data: canonical messages, merged, deduplicated, length-limited, split.

The DVC stage `prepare` reads the run's sources (`data.sources`, or `data.path` alone),
each in its format (its own, `data.format`, or detected), converts every example to
canonical chat messages (`tasks.data.formats`), strips the whitespace around every
message's content, applies each source's invalid-row policy, lets corrections from
feedback replace the answers of the same prompt, drops duplicates (exact, then up to case
and whitespace; the first occurrence stays), applies each source's cap or weight
(`tasks.data.sources`), applies `data.length_policy` to examples over `data.max_tokens`
(drop them, or cut the last answer's tokens so the example fits), and splits train / val /
test by a stable hash of each example's normalised prompt (the messages before the last
answer). An example's split depends only on its own prompt, so appending data never moves
an example between splits, and the same prompt can never be in both train and test (that
is checked anyway: `train_test_overlap` in stats.json). Corrected answers whose hash falls
below `data.feedback_fraction` form a fourth split, `feedback`, held out of training like
test; the gate checks on it that a candidate does not regress on what users corrected.

Normalisation, deduplication, the token count and the length policy are validation's own
(`tasks.data.checks.normalise_example` and `Deduplicator`, `tasks.data.tokens.count_chat_tokens`
and `length_decision`), so prepare drops exactly what validation reported.

Under a source's `invalid_rows: fail` (the default, and always for `data.path`) it refuses
data that `tasks.data.validate` finds structurally invalid (run `ftllm validate PATH --fix
OUT` first) or with an example that has no trained tokens under the chat template
(`no_trained_tokens`); it fails when the length policy would drop more than
`data.max_drop_fraction` of the examples. Nothing is ever dropped silently: stats.json
counts, per source and in all, what was invalid, replaced by a correction, deduplicated,
sampled out, dropped and truncated, with each source's md5.

Outputs, written into a temporary folder that then replaces `--out` in one rename:
With a warm start (`train.init_from: champion`, the run sets `train.init_path`), the
train split holds the feedback sources' examples and a stable replay sample
(`train.replay_fraction`) of the others' (`tasks.data.sources.select_replay`).

`train.jsonl`, `val.jsonl`, `test.jsonl`, `feedback.jsonl` (only when some corrected
prompts were held out) and `stats.json`.

The DVC stage's entry point is `tasks.stages.prepare`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tasks.config import DataParams, Params, SourceParams
from tasks.data.preference import PreferenceSplits, prepare_preference
from tasks.data.sources import merge_sources, prompt_key, read_source, select_replay, source_label, sources_md5
from tasks.data.tokens import (
    TokenCount,
    TrainingBudget,
    count_chat_tokens,
    estimate_training,
    length_decision,
    summarize,
)
from tasks.errors import PrepareError

SPLITS = ("train", "val", "test")
FEEDBACK_SPLIT = "feedback"  # corrected prompts held out of training; written only when there are some



def truncate_answer(
    tokenizer, messages: list[dict], max_tokens: int, system_message: str = "auto", example: dict | None = None
) -> list[dict] | None:
    """Cut the last assistant answer's tokens so that the conversation fits `max_tokens`.

    Args:
        example: the example the messages belong to (its `tools` are rendered too).

    Returns:
        The shortened messages, or None when even one answer token does not fit (or the
        last turn is a tool call).
    """
    example = example or {}
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not isinstance(messages[last].get("content"), str) or messages[last].get("tool_calls"):
        return None  # a tool call is not cut: a part of one would teach a broken call
    ids = tokenizer.encode(messages[last]["content"], add_special_tokens=False)
    total = count_chat_tokens(tokenizer, [{**example, "messages": messages}], system_message)[0].total
    for _ in range(8):  # re-encoding a cut text can merge tokens differently: re-count and trim
        excess = total - max_tokens
        if excess <= 0:
            return messages
        ids = ids[: len(ids) - excess]
        text = tokenizer.decode(ids, skip_special_tokens=True).rstrip() if ids else ""
        if not text.strip():
            return None
        messages = [*messages[:last], {**messages[last], "content": text}, *messages[last + 1 :]]
        total = count_chat_tokens(tokenizer, [{**example, "messages": messages}], system_message)[0].total
    return messages if total <= max_tokens else None


def apply_length_policy(
    examples: list[tuple[int, dict]], tokenizer, data: DataParams, source: Path | str = "data",
    counts: list[TokenCount] | None = None,
) -> tuple[list[tuple[int, dict]], list[TokenCount], dict[str, Any]]:
    """Drop or truncate the examples over `data.max_tokens` tokens (validation's `length_decision`).

    Args:
        source: the data file, named in errors.
        counts: the examples' token counts, when already counted.

    Returns:
        (kept examples, their token counts, {"dropped": n, "truncated": n, "dropped_lines": [...]}).

    Raises:
        PrepareError: an example has no trained tokens under the chat template.
    """
    if counts is None:
        counts = count_chat_tokens(tokenizer, [e for _, e in examples], data.system_message)
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
            cut = truncate_answer(tokenizer, example["messages"], data.max_tokens, data.system_message, example)
            if cut is None:
                decision = "drop"
            else:
                example = {**example, "messages": cut}
                count = count_chat_tokens(tokenizer, [example], data.system_message)[0]
                truncated += 1
        if decision == "drop":
            dropped_lines.append(line)
            continue
        kept.append((line, example))
        tokens.append(count)
    return kept, tokens, {"dropped": len(dropped_lines), "truncated": truncated, "dropped_lines": dropped_lines}


def assign_split(key: bytes, val_fraction: float, test_fraction: float, feedback_fraction: float = 0.0,
                 corrected: bool = False) -> str:
    """The split of an example from its prompt hash: a uniform number in [0, 1) against the fractions.

    A corrected answer whose number falls below `feedback_fraction` goes to the feedback
    split, held out of training like val and test; the other corrections split as usual.
    """
    u = int.from_bytes(key[:8], "big") / 2**64
    if corrected and u < feedback_fraction:
        return FEEDBACK_SPLIT
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_examples(
    examples: list[tuple[int, dict]], counts: list[TokenCount], val_fraction: float, test_fraction: float,
    feedback_fraction: float = 0.0, corrected: list[bool] | None = None, copies: list[int] | None = None,
) -> tuple[dict[str, list[dict]], dict[str, list[TokenCount]], dict[str, int]]:
    """Split by prompt hash; an example goes `copies` times into train (its source's weight), once elsewhere.

    Returns:
        (examples per split, token counts per split, {"test": n, "feedback": n}: prompts of
        the train split also found in the test and the feedback split).
    """
    names = (*SPLITS, FEEDBACK_SPLIT)
    splits: dict[str, list[dict]] = {s: [] for s in names}
    split_counts: dict[str, list[TokenCount]] = {s: [] for s in names}
    keys: dict[str, set[bytes]] = {s: set() for s in names}
    corrected = corrected or [False] * len(examples)
    copies = copies or [1] * len(examples)
    for (_, example), count, fixed, times in zip(examples, counts, corrected, copies):
        key = prompt_key(example["messages"])
        split = assign_split(key, val_fraction, test_fraction, feedback_fraction, fixed)
        times = times if split == "train" else 1
        splits[split] += [example] * times
        split_counts[split] += [count] * times
        keys[split].add(key)
    overlap = {s: len(keys["train"] & keys[s]) for s in ("test", FEEDBACK_SPLIT)}
    return splits, split_counts, overlap


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


def prepare_dataset(path: Path | None, out_dir: Path, params: Params, tokenizer=None) -> dict[str, Any]:
    """Prepare the run's sources into train/val/test (and feedback) JSONL and stats.json under `out_dir`.

    Args:
        path: the one data file when `data.sources` is empty (None: `data.path`); ignored
            when there are sources.
        out_dir: the output folder (replaced as a whole).
        params: the run's settings (`data.*`, `train.batch_size/seq_len/max_steps`, `model` for the tokenizer).
        tokenizer: the run's tokenizer; loaded from `params.model` when None.

    Returns:
        The stats written to stats.json.

    Raises:
        PrepareError: invalid examples, too many dropped by the length policy, or a train/test overlap.
        InvalidRowsError: a source with more invalid rows than its `max_invalid_share`.
        DataFileError: a file cannot be read.
    """
    data = params.data
    if tokenizer is None:
        from tasks.model.loading import load_base_tokenizer

        tokenizer = load_base_tokenizer(params.model)
    sources = data.source_list() if data.sources or path is None else [SourceParams(path=str(path))]
    budget = TrainingBudget.of(params.train)
    reads = [read_source(i, source, data, tokenizer, budget) for i, source in enumerate(sources)]
    merged, corrections = merge_sources(sources, reads)
    where = Path(sources[0].file) if len(sources) == 1 else "data.sources"
    read = sum(r.stats["rows"] - r.stats["invalid"] for r in reads)
    # The length policy sees each merged row by its index, so that kept rows map back to their source.
    indexed = [(i, row.example) for i, row in enumerate(merged)]
    kept, counts, length = apply_length_policy(indexed, tokenizer, data, where, [row.count for row in merged])
    # A source that drops invalid rows (a feedback source, by default) had its over-long rows
    # counted against its own max_invalid_share by validation; the share here is of the others'.
    strict = [i for i in length["dropped_lines"] if sources[merged[i].source].invalid_rows == "fail"]
    for source_read in reads:
        source_read.stats["length_dropped"] = 0
    for i in length["dropped_lines"]:  # out of the source's kept rows, and said of which source
        reads[merged[i].source].stats["length_dropped"] += 1
        reads[merged[i].source].stats["kept"] -= 1
        reads[merged[i].source].stats["train_copies"] -= merged[i].copies
    length["dropped_rows"] = [{"source": merged[i].source, "line": merged[i].line} for i in length["dropped_lines"][:100]]
    length["dropped_lines"] = [merged[i].line for i in length["dropped_lines"][:100]]
    share = len(strict) / read if read else 0.0
    if share > data.max_drop_fraction:
        raise PrepareError(
            f"{where}: {len(strict)} of {read} examples ({share:.1%}) are over data.max_tokens "
            f"{data.max_tokens} and would be dropped, more than data.max_drop_fraction {data.max_drop_fraction}; "
            "raise data.max_tokens, set data.length_policy=truncate, or shorten the examples"
        )
    if not kept:
        raise PrepareError(f"{where}: no examples left to train on; check the data with `ftllm validate PATH`")
    rows = [merged[i] for i, _ in kept]
    # Warm start (train.init_from champion): the champion learnt the other sources already.
    replay = (select_replay(rows, sources, params.train.replay_fraction)
              if params.train.init_path else None)
    splits, split_counts, overlap = split_examples(
        kept, counts, data.val_fraction, data.test_fraction, data.feedback_fraction,
        [r.corrected for r in rows], [r.copies for r in rows],
    )
    if any(overlap.values()):  # impossible by construction (the split is a function of the prompt); kept as a guard
        raise PrepareError(f"{where}: prompts in train and in test or feedback {overlap}; this is a bug in tasks.data.prepare")
    preference = _prepare_preference(params, tokenizer, splits, split_counts)
    train = split_counts["train"]
    first = reads[0].stats
    names = [*SPLITS, *([FEEDBACK_SPLIT] if splits[FEEDBACK_SPLIT] else [])]
    stats = {
        "path": first["path"] if len(reads) == 1 else str(data.path),
        "md5": sources_md5([r.stats for r in reads]),
        "format": first["format"],
        "examples_read": sum(r.stats["rows"] for r in reads),
        "examples": len(kept),
        "counts": {s: len(splits[s]) for s in names},
        "sources": [{"key": source_label(i, data), **r.stats} for i, r in enumerate(reads)],
        "corrections": corrections,
        "deduplicated": {k: sum(r.stats["deduplicated"][k] for r in reads) for k in ("exact", "near")},
        "invalid_dropped": sum(r.stats["invalid"] for r in reads),
        "length_policy": data.length_policy,
        "max_tokens": data.max_tokens,
        "dropped": length["dropped"],
        "dropped_lines": length["dropped_lines"],
        "dropped_rows": length["dropped_rows"],
        "truncated": length["truncated"],
        "replay": replay,
        "train_test_overlap": overlap["test"],
        "train_feedback_overlap": overlap[FEEDBACK_SPLIT],
        "split": {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
                  "feedback_fraction": data.feedback_fraction, "key": "sha256 of the normalised prompt"},
        "token_stats": {s: summarize([n.total for n in split_counts[s]]) for s in names},
        "system_message": data.system_message,
        "training_estimate": estimate_training(
            sum(n.total for n in train), sum(n.trained for n in train), TrainingBudget.of(params.train)
        ),
    }
    if preference is not None:
        stats["preference"] = preference.stats
        stats["counts"].update({name: len(rows) for name, rows in preference.splits.items()})
    extra = preference.splits if preference is not None else {}
    write_splits(out_dir, {**{s: splits[s] for s in names}, **extra}, stats)
    return stats


def _prepare_preference(params: Params, tokenizer, splits: dict[str, list[dict]],
                        split_counts: dict[str, list[TokenCount]]) -> PreferenceSplits | None:
    """The preference splits; supervised training then leaves out every held-out preference prompt.

    The supervised val, test and feedback prompts are held out of preference training as well,
    so no split's prompt is trained on by either objective.
    """
    held = {prompt_key(e["messages"]) for s in ("val", "test", FEEDBACK_SPLIT) for e in splits[s]}
    preference = prepare_preference(params.preference, params.data, tokenizer, held)
    if preference is None:
        return None
    keep = [prompt_key(e["messages"]) not in preference.heldout_keys for e in splits["train"]]
    preference.stats["supervised_train_left_out"] = keep.count(False)
    splits["train"] = [e for e, k in zip(splits["train"], keep) if k]
    split_counts["train"] = [c for c, k in zip(split_counts["train"], keep) if k]
    return preference
