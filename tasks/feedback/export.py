"""The log as training data: accepted answers and corrections, as canonical JSONL.

`export_feedback` turns the latest feedback of each rated completion into
`{"messages": [...]}` rows (corrections marked `"correction": true`), which the next
retraining takes in through validation like any other data file, or by itself with a
`feedback: true` source in `data.sources` (the default). It also returns the highest
feedback id it read: a run that trains on the export records it, and the monitor's
cursor moves past that id only then (see flows/monitor.py).

What reaches the export (docs/guides/trust.md):

- only feedback on the answers of the run's registered model (`ExportPolicy.model_name`:
  another model's service may log to the same file);
- only admitted feedback: approved by a person, or pending from a trusted key (as
  `feedback.auto_approve` says); the rest stays pending in the log for a later run;
- no answer a `tool_choice` forced (`Interaction.forced`), corrected or not;
- of each completion, the latest admitted feedback;
- nothing whose prompt `ftllm feedback forget` erased;
- at most `feedback.max_key_share` of the run's training examples from one untrusted key;
- redacted (`tasks.feedback.redact`): secrets and personal data masked, or the example
  dropped (`feedback.redaction`);
- each example with its provenance (`"provenance": {"key", "user", "feedback_id"}`), which
  training ignores.

    ftllm feedback export --min-rating 4 data/feedback.jsonl
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tasks.data.checks import STRUCTURAL, check_messages, check_tools, example_digests, normalise_example
from tasks.feedback.reader import FeedbackReader
from tasks.feedback.redact import RedactAction, redact_examples
from tasks.feedback.schema import MAX_RATING, MIN_RATING, STOPPED, FeedbackRow, Interaction, prompt_digest
from tasks.files import write_atomic

AutoApprove = Literal["trusted", "all", "none"]


@dataclass(frozen=True)
class ExportPolicy:
    """What the export admits (the `feedback:` settings, and the size of the run's other data)."""

    auto_approve: AutoApprove = "trusted"
    redaction: RedactAction = "mask"
    max_key_share: float = 1.0  # of the run's training examples, per untrusted key; 1: no cap
    other_examples: int = 0  # examples of the run's other sources, the base of the share
    weight: float = 1.0  # train copies of each feedback example (its source's weight): the share is of train rows
    model_name: str | None = None  # only answers this registered model served (None: every model's in the log)


DEFAULT_POLICY = ExportPolicy()


@dataclass(frozen=True)
class FeedbackExport:
    """What one export wrote, and the feedback it covers."""

    db: Path
    path: Path
    examples: int
    last_feedback_id: int  # every feedback id up to this one was read (0: the log was empty or absent)
    held: int = 0  # feedback rows pending a person's approval: not exported, kept for a later run
    last_decision: int = 0  # the latest review decision read: feedback approved after it is new to the monitor
    capped: int = 0  # examples left out by feedback.max_key_share
    erased: int = 0  # examples left out because their prompt was erased
    by_key: dict[str, int] = field(default_factory=dict)  # exported examples per key name
    users: int = 0  # distinct end users among the exported examples
    redacted: dict[str, int] = field(default_factory=dict)  # findings per category, examples changed/dropped
    repeats: int = 0  # examples left out as the same as a later one (many users, the same rated answer)
    invalid_calls: int = 0  # left out: tools or calls validation would refuse (a masked argument), or a broken call
    not_a_chat: int = 0  # corrections and good ratings that make no example (no prompt to answer, a blank answer)
    rejected: int = 0  # feedback rows a person rejected: kept in the log, never exported
    log_id: str = ""  # the identity of the log read (schema version 7; "": none, or an older log)
    superseded: int = 0  # admitted rows another row of the same completion outranks (a later rating, a correction)
    rated_low: int = 0  # uncorrected answers rated below min_rating: no example (the preference export's rows)
    stopped: int = 0  # uncorrected answers the client stopped mid-stream: part of an answer, none to learn
    forced: int = 0  # answers a tool_choice forced (Interaction.forced): not the model's own choice
    other_model: int = 0  # feedback on answers another registered model served (its service shares the log)


# The counts of FeedbackExport that say why feedback rows are not in an example (beside
# `redacted["examples_dropped"]`): with `examples`, every feedback row of the log is in one.
# Each with what `ftllm feedback export` says of it (`{min_rating}`: the export's).
LEFT_OUT = {
    "held": "held for approval", "rejected": "rejected",
    "superseded": "superseded by later feedback on the same answer",
    "rated_low": "rated below {min_rating} (no example; the preference export reads ratings)",
    "stopped": "stopped by the client mid-answer", "erased": "erased prompts",
    "forced": "answered under a tool_choice that forced the answer (required, a named function, or none before any tool result)",
    "invalid_calls": "invalid tools or calls", "not_a_chat": "that made no example (no prompt, a blank answer, or a conversation a data file may not hold)",
    "repeats": "repeats merged", "capped": "over feedback.max_key_share",
    "other_model": "on another model's answers (its service logs to the same file)",
}


def one_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with the system messages they open with (the API takes several: a framework's
    and the caller's, `developer` beside `system`) joined into one, as a data file holds them."""
    lead = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    if lead < 2:
        return messages
    joined = "\n\n".join(str(m.get("content") or "") for m in messages[:lead])
    return [{"role": "system", "content": joined}, *messages[lead:]]


def training_examples(rated: list[tuple[list[dict[str, Any]], str, FeedbackRow]], min_rating: int,
                      tools: list[dict[str, Any]] | None = None,
                      tool_calls: list[dict[str, Any]] | None = None,
                      reasoning: str | None = None) -> list[dict[str, Any]]:
    """Canonical examples from the latest feedback of each completion.

    A correction always yields an example (the corrected answer replaces the model's,
    whatever the rating), marked `"correction": true`; an uncorrected answer yields one
    when rated `min_rating` or more. Only that last answer is trained: the assistant turns
    of the request's history carry `weight: 0`. An uncorrected answer that was a tool call is kept as
    the call (`tool_calls`), and the tools the request offered go with the example. An
    uncorrected answer keeps its reasoning trace (`reasoning_content`), as the model wrote it; a
    correction replaces the answer, not with a trace that led to the wrong one.
    """
    examples = []
    for request, answer, row in rated:
        if row.correction is None and row.rating < min_rating:
            continue
        messages = one_system_message([m for m in request if m.get("role") in ("system", "user", "assistant", "tool")])
        if not messages or messages[-1]["role"] not in ("user", "tool"):
            continue  # not a prompt the model answers (e.g. a plain /generate prompt)
        # The earlier assistant turns are whatever the client sent as the history, not answers
        # anyone rated: context, not trained (weight 0), so a client cannot teach through them.
        messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in messages]
        if row.correction is not None:
            final: dict[str, Any] = {"role": "assistant", "content": row.correction}
        elif tool_calls:
            final = {"role": "assistant", "content": answer or None, "tool_calls": tool_calls}
        else:
            final = {"role": "assistant", "content": answer}
        if not final.get("tool_calls") and not final["content"].strip():
            continue
        if row.correction is None and reasoning:
            final["reasoning_content"] = reasoning
        example: dict[str, Any] = {"messages": [*messages, final]}
        if tools:
            example["tools"] = tools
        if row.correction is not None:
            example["correction"] = True  # outranks other answers to the same prompt (tasks.data.sources)
        examples.append(example)
    return examples


def latest_admitted(rated: list[tuple[Interaction, FeedbackRow]], auto_approve: AutoApprove) -> tuple[list, int]:
    """The latest admitted feedback of each completion (in feedback order), and the count of
    completions whose only unreviewed feedback is still held.

    A correction outranks a later rating without one: another user's thumbs on the same answer
    must not erase the work of the one who rewrote it (their correction would be lost, uncounted).
    Then a trusted key's feedback outranks a later approved one of an untrusted key: approval
    admits a key's feedback, it does not put it above the operator's own.
    """
    def rank(row: FeedbackRow) -> tuple[bool, bool]:
        return row.correction is not None, row.trusted

    latest: dict[str, tuple[Interaction, FeedbackRow]] = {}
    held = set()
    for interaction, row in rated:
        kept = latest.get(row.completion_id)
        if row.admitted(auto_approve):
            if kept is None or rank(row) >= rank(kept[1]):
                latest[row.completion_id] = (interaction, row)
        elif row.review == "pending":
            held.add(row.id)
    return sorted(latest.values(), key=lambda pair: pair[1].id), len(held)


def pseudonym(end_user: str | None) -> str | None:
    """The end user as the export writes them: a digest of the id the front end sent (often an
    e-mail address), so that the file, its DVC versions and the MLflow artifact tell users apart
    without writing the id (a guessable id is still found by hashing guesses: unsalted, the same
    user has the same digest in every export). `ftllm feedback forget --user` takes the id itself, on the log."""
    return None if end_user is None else "user-" + hashlib.sha256(end_user.encode()).hexdigest()[:16]


def key_limits(per_key: Counter[str], others: float, share: float) -> dict[str, int]:
    """The most rows each capped key may keep so that it makes at most `share` of the rows kept:
    kept <= share x (`others`, the rows no cap applies to, + every key's kept rows).

    Each key's limit counts the other keys' rows as they are kept, so the limits are worked out
    again until none changes (they only shrink, so it settles).
    """
    ratio = share / (1.0 - share)
    kept = dict(per_key)
    while True:
        total = others + sum(kept.values())
        limits = {key: min(count, int(ratio * (total - kept[key]) + 1e-9)) for key, count in per_key.items()}
        if limits == kept:
            return limits
        kept = limits


def cap_per_key(items: list, senders: list[set[str]], share: float, others: float = 0.0) -> tuple[list, int]:
    """The items with at most `share` of those kept from each capped key (the keys behind an item
    are its `senders`; none: not capped), the latest kept, beside `others` rows outside `items`;
    and how many were left out."""
    if share >= 1.0:
        return items, 0
    limits = key_limits(Counter(k for keys in senders for k in keys), others + sum(not keys for keys in senders), share)
    per_key: Counter[str] = Counter()
    kept = []
    for item, keys in reversed(list(zip(items, senders))):
        if all(per_key[k] < limits[k] for k in keys):
            per_key.update(keys)
            kept.append(item)
    return kept[::-1], len(items) - len(kept)


def admitted_examples(rated: list[tuple[Interaction, FeedbackRow]], erased: set[str], min_rating: int,
                      policy: ExportPolicy) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Training examples from the log's feedback under `policy`, and what was left out and why.

    Every feedback row is counted once: in an example written, or under the reason it was left
    out (other_model, held, rejected, superseded, rated_low, stopped, forced, erased, invalid_calls,
    not_a_chat, repeats, capped, or dropped by redaction), so nothing leaves the loop without a count.

    Two registered models served from one project (the dates task and the tools task) log to
    one file: with `policy.model_name` only the answers that model served are read, and the
    other model's feedback never trains it.

    An answer a `tool_choice` forced (`Interaction.forced`: a call, a named one, or no call
    before any tool result) is left out, corrected or not: a data file has no tool_choice, so
    its example would teach the forced answer as the model's own choice for that prompt.
    """
    ours = [(i, row) for i, row in rated if policy.model_name is None or i.model_name == policy.model_name]
    other_model, rated = len(rated) - len(ours), ours
    latest, held = latest_admitted(rated, policy.auto_approve)
    superseded = sum(row.admitted(policy.auto_approve) for _, row in rated) - len(latest)
    examples, trusted, erased_count, not_a_chat, broken_calls, rated_low, stopped, forced = [], {}, 0, 0, 0, 0, 0, 0
    for interaction, row in latest:
        if prompt_digest(interaction.messages) in erased:
            erased_count += 1
            continue
        if interaction.forced:
            forced += 1
            continue
        if row.correction is None and row.rating < min_rating:  # no example: preference data (rated down)
            rated_low += 1
            continue
        if row.correction is None and interaction.finish_reason == "invalid_tool_call":
            broken_calls += 1  # a call the service returned as text: no answer to learn
            continue
        if row.correction is None and interaction.finish_reason == STOPPED:
            stopped += 1  # the client stopped it: a part of an answer, rated high or not, is none to learn
            continue
        made = training_examples([(interaction.messages, interaction.answer, row)], min_rating,
                                 interaction.tools, interaction.tool_calls, interaction.reasoning)
        # A correction or a good rating that makes no example (the request ended with the
        # assistant's own turn, or the text is empty), or one whose conversation a data file may
        # not hold though the API takes it (two user turns in a row, a system message after the
        # first), which validation would refuse in every run, is counted, not lost without a word.
        made = [e for e in made if not STRUCTURAL & check_messages(e["messages"]).keys()]
        not_a_chat += not made
        for example in made:
            example["provenance"] = {"key": row.key_name, "user": pseudonym(row.end_user), "feedback_id": row.id}
            examples.append(example)
        trusted[row.id] = row.trusted
    examples, redacted = redact_examples(examples, policy.redaction)
    # Validation would refuse an example whose tools or calls break its rules (a masked argument
    # that fails its schema, `[EMAIL]` under an e-mail `pattern`; a tool the client declared with
    # no description), and so the source, in every run: such an example is left out, counted.
    usable = [e for e in examples if not check_tools(e)]
    broken = len(examples) - len(usable) + broken_calls
    examples, repeats = _latest_of_each(usable, trusted)
    # The cap comes last, on the examples that are written: every one left out after it would
    # shrink the base its shares were counted on, and a capped key's share would grow past it.
    # Each feedback example is trained `weight` times, beside the other sources' train rows.
    senders = [set() if trusted[e["provenance"]["feedback_id"]] else {e["provenance"]["key"]} for e in examples]
    examples, capped = cap_per_key(examples, senders, policy.max_key_share, policy.other_examples / policy.weight)
    return examples, {"held": held, "capped": capped, "erased": erased_count, "redacted": redacted,
                      "repeats": repeats, "invalid_calls": broken, "not_a_chat": not_a_chat,
                      "rejected": sum(row.review == "rejected" for _, row in rated), "superseded": superseded,
                      "rated_low": rated_low, "stopped": stopped, "forced": forced, "other_model": other_model}


def _latest_of_each(examples: list[dict[str, Any]], trusted: dict[int, bool]) -> tuple[list[dict[str, Any]], int]:
    """The examples without repeats (as redacted, up to case and whitespace, as validation
    compares them), the latest of each kept, and how many were repeats.

    Users who ask the same question and rate the same greedy answer high send the same
    example many times; validation would refuse the source for its duplicates and fail every
    run, so the log's feedback would never be trained on. A trusted key's copy (`trusted`:
    by feedback id) is kept before any untrusted one: the untrusted copy counts toward its
    key's cap, and an untrusted key repeating a trusted example must not push it out. The copy
    kept takes the place of the latest repeat: of several corrections of one prompt the last
    in the file wins (tasks/data/sources.py).
    """
    place_of: dict[bytes, int] = {}  # the latest repeat's place
    copy_of: dict[bytes, int] = {}  # the copy kept: the latest trusted one, else the latest
    for place, example in enumerate(examples):
        loose = example_digests(normalise_example(example)["messages"], example.get("tools"))[1]
        place_of[loose] = place
        kept = copy_of.get(loose)
        if kept is None or trusted[example["provenance"]["feedback_id"]] or not trusted[
                examples[kept]["provenance"]["feedback_id"]]:
            copy_of[loose] = place
    order = sorted(place_of, key=place_of.__getitem__)
    return [examples[copy_of[loose]] for loose in order], len(examples) - len(order)


def export_feedback(db_path: Path, out: Path, min_rating: int, missing_ok: bool = False,
                    write_empty: bool = True, policy: ExportPolicy = DEFAULT_POLICY) -> FeedbackExport:
    """Write accepted answers and corrections as canonical JSONL to `out` (atomically).

    Args:
        missing_ok: an absent database exports nothing instead of raising: a retraining
            before the service has logged anything.
        write_empty: write `out` even when there is nothing to export (an empty file);
            false leaves `out` as it was.

    Raises:
        FileNotFoundError: there is no feedback database at `db_path` (and not `missing_ok`).
        ValueError: `min_rating` is outside 1..5.
        DataFileError: `db_path` is not the service's log.
    """
    if not MIN_RATING <= min_rating <= MAX_RATING:
        raise ValueError(f"--min-rating must be from {MIN_RATING} to {MAX_RATING}, got {min_rating}")
    db_path = Path(db_path)
    if not db_path.is_file():
        if not missing_ok:
            raise FileNotFoundError(f"{db_path}: no feedback database; serve the model and collect feedback first")
        rated, last, decided, erased, log_id = [], 0, 0, set(), ""
    else:
        with FeedbackReader(db_path) as reader:
            rated, last, decided = reader.rated_completions()
            erased, log_id = reader.erased_digests(), reader.log_id()
    examples, left_out = admitted_examples(rated, erased, min_rating, policy)
    if examples or write_empty:
        write_atomic(Path(out), "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
    by_key = Counter(e["provenance"]["key"] for e in examples)
    users = {(e["provenance"]["key"], e["provenance"]["user"]) for e in examples if e["provenance"]["user"]}
    return FeedbackExport(db=db_path, path=Path(out), examples=len(examples), last_feedback_id=last,
                          last_decision=decided, by_key=dict(sorted(by_key.items())), users=len(users),
                          redacted=left_out["redacted"], log_id=log_id, **{k: left_out[k] for k in LEFT_OUT})
