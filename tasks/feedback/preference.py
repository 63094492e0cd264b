"""The log's ratings as preference data: KTO rows from ratings, DPO pairs from corrections and rating gaps.

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

An answer a `tool_choice` forced, and with a model named an answer another registered model
served (its service logging to the same file), make no row: each is counted (`forced`,
`other_model`), as the supervised export counts them.

`export_preference` writes them as one JSONL file (`preference.path`); a run with a
`feedback: true` source exports it beside the feedback export and versions it with DVC
(`snapshot_preference`). The prepare stage checks and splits it (`tasks.data.preference`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import PreferenceParams
from tasks.data.preference import row_problem
from tasks.data.sources import prompt_key
from tasks.feedback.export import cap_per_key, latest_admitted, one_system_message
from tasks.feedback.reader import FeedbackReader
from tasks.feedback.redact import RedactAction, redact_examples
from tasks.feedback.schema import STOPPED, prompt_digest
from tasks.feedback.store import default_db_path
from tasks.files import file_md5, write_atomic


@dataclass(frozen=True)
class Rated:
    """A served completion with its latest rating (and the user's correction, if any)."""

    messages: list[dict[str, Any]]  # the request's messages (the prompt)
    answer: str
    rating: int
    correction: str | None = None
    tools: list[dict[str, Any]] | None = None
    key: str = ""  # the untrusted key that sent the rating, admitted unreviewed; "" for a trusted key's or an approved one
    broken_call: bool = False  # the answer is a call the service returned as text (finish `invalid_tool_call`)
    stopped: bool = False  # the client stopped the streamed answer before its end (finish `client_stopped`)
    forced: bool = False  # a tool_choice forced the answer (`Interaction.forced`): not the model's own choice
    other_model: bool = False  # another registered model served it (its service shares the log): not this one's


def snapshot_preference(root: Path, prefs: PreferenceParams, log=print, auto_approve: str = "trusted",
                        redaction: RedactAction = "mask", max_key_share: float = 1.0,
                        model_name: str | None = None) -> dict[str, Any]:
    """Export the service's log (`FTLLM_FEEDBACK_DB`, else `<root>/feedback.db`) to `preference.path` and version it.

    Written on every run that read feedback, once the log holds a preference example (after
    that, empty while nothing is rated: the `preference` stage then has nothing to do). The
    same trust rules as the feedback export apply (tasks.feedback.export): only admitted
    ratings (`feedback.auto_approve`, or approved by a person), no erased prompt, and
    secrets and personal data redacted (`feedback.redaction`), and with `model_name` only the
    answers that registered model served.
    """
    from tasks.pipeline.dvc import track_data

    out = Path(prefs.path) if Path(prefs.path).is_absolute() else root / prefs.path
    db = default_db_path(root)
    if not out.exists() and not (db.is_file() and preference_examples(read_rated(db, auto_approve, model_name), prefs)[0]):
        # Nothing rated yet and nothing exported before: the data folder (and data.dvc) stays as it was.
        log(f"no preference examples in {db}: nothing exported")
        return {"path": str(out), "examples": 0, "md5": None, "tracked_by": None, "tags": {}}
    summary = export_preference(db, out, prefs, auto_approve, redaction, max_key_share, model_name)
    tracked = track_data(root, out, log=log)
    log(f"exported {summary['examples']} preference examples to {out}: {summary}")
    return {**summary, "md5": file_md5(out), "tracked_by": tracked, "tags": preference_tags(summary)}


def preference_counts(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What the ratings became in a run's preference export: rows of each kind, and what was
    left out (middle ratings, rows over a key's share, redaction), for the run's result."""
    return {k: v for k, v in snapshot.items() if k not in ("path", "md5", "tracked_by", "tags")}


def preference_tags(summary: dict[str, Any]) -> dict[str, str]:
    """The preference export's counts as MLflow run tags (`preference.*`)."""
    counts = preference_counts(summary)
    redacted = counts.pop("redacted", {}) or {}
    return {**{f"preference.{k}": str(v) for k, v in counts.items()},
            **{f"preference.redacted.{k}": str(v) for k, v in redacted.items()}}


def read_rated(db: Path, auto_approve: str = "trusted", model_name: str | None = None) -> list[Rated]:
    """The latest admitted feedback of each rated completion in the service's log, oldest first (read-only).

    Feedback that is held for approval, rejected, or whose prompt was erased is left out; with
    `model_name`, feedback on answers another registered model served is marked `other_model`
    (counted, never made into a row).

    Raises:
        DataFileError: `db` is not the service's SQLite log.
    """
    with FeedbackReader(db) as reader:
        rated, _, _ = reader.rated_completions()
        erased = reader.erased_digests()
    # The latest admitted feedback, not the latest feedback then admitted or not: a later
    # rating held for approval (an untrusted key's) must not hide a trusted one.
    latest, _ = latest_admitted(rated, auto_approve)
    # A row a person approved is capped no more than a trusted key's: the cap stands where no
    # one reviewed (`feedback.auto_approve: all`). Counted among the preference rows, the stage's
    # whole data, it left a service with no trusted key (an open one among them) no rating at all.
    return [Rated(i.messages, i.answer, row.rating, row.correction, i.tools,
                  "" if row.trusted or row.review == "approved" else row.key_name,
                  i.finish_reason == "invalid_tool_call", i.finish_reason == STOPPED, i.forced,
                  model_name is not None and i.model_name != model_name)
            for i, row in latest if prompt_digest(i.messages) not in erased]


def _prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation the model answered, or None when it is not one (e.g. a plain /generate prompt)."""
    kept = one_system_message([m for m in messages if m.get("role") in ("system", "user", "assistant", "tool")])
    return kept if kept and kept[-1]["role"] in ("user", "tool") else None


def _answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _with_tools(row: dict[str, Any], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {**row, "tools": tools} if tools else row


def preference_examples(rated: list[Rated], prefs: PreferenceParams, max_key_share: float = 1.0,
                        redaction: RedactAction | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """KTO rows and DPO pairs from rated completions (see the module's docstring), with their counts.

    An untrusted key whose ratings were admitted unreviewed (`feedback.auto_approve: all`) makes
    at most `max_key_share` of the rows (`feedback.max_key_share`): its latest ones are kept.
    Trusted keys' rows and rows a person approved are not capped (`read_rated`).
    With `redaction` the rows are redacted first (`redact_preferences`; the findings under
    `redacted`), so that rows a "drop" policy leaves out do not count toward the shares.
    """
    rows: list[dict[str, Any]] = []
    senders: list[set[str]] = []  # the untrusted keys behind each row
    when: list[int] = []  # each row's place in `rated` (oldest first); a pair's is its later rating's
    # Each rated completion counts once, under desirable, undesirable, middle, pairs_from_corrections,
    # unchanged_corrections, not_a_chat, broken_calls, stopped, forced or other_model; pairs_from_ratings are rows
    # made of two of them.
    counts = {"desirable": 0, "undesirable": 0, "middle": 0, "pairs_from_corrections": 0, "pairs_from_ratings": 0,
              "unchanged_corrections": 0, "not_a_chat": 0, "broken_calls": 0, "stopped": 0, "forced": 0, "other_model": 0}
    by_prompt: dict[bytes, list[tuple[list[dict], Rated, int]]] = defaultdict(list)
    for place, item in enumerate(rated):
        if item.other_model:
            counts["other_model"] += 1
            continue
        if item.forced:
            # Not the model's own choice: which answer is better under a forced tool_choice says
            # nothing of what it should choose for the prompt (a data file has no tool_choice).
            counts["forced"] += 1
            continue
        prompt = _prompt(item.messages)
        if prompt is None or not item.answer.strip():
            counts["not_a_chat"] += 1
            continue
        if item.stopped:
            # Part of an answer: neither its rating nor its correction says which whole answer was
            # better (a correction of it is still trained by the supervised export).
            counts["stopped"] += 1
            continue
        if item.correction is not None:
            if item.correction.strip() != item.answer.strip():
                rows.append(_with_tools({"prompt": prompt, "chosen": _answer(item.correction),
                                         "rejected": _answer(item.answer)}, item.tools))
                senders.append({item.key} - {""})
                when.append(place)
                counts["pairs_from_corrections"] += 1
            else:
                counts["unchanged_corrections"] += 1  # a "correction" that is the answer: no pair to learn from
            continue
        if item.broken_call and item.rating >= prefs.desirable_min_rating:
            counts["broken_calls"] += 1  # a broken call rated well is no answer to learn (rated down, it is one to unlearn)
            continue
        if item.rating >= prefs.desirable_min_rating or item.rating <= prefs.undesirable_max_rating:
            label = item.rating >= prefs.desirable_min_rating
            rows.append(_with_tools({"prompt": prompt, "completion": _answer(item.answer), "label": label}, item.tools))
            senders.append({item.key} - {""})
            when.append(place)
            counts["desirable" if label else "undesirable"] += 1
        else:
            counts["middle"] += 1
        # The same prompt under other tools is another prompt: its answers are not compared.
        tools = json.dumps(item.tools, sort_keys=True).encode() if item.tools else b""
        by_prompt[prompt_key([*prompt, *_answer(item.answer)]) + tools].append((prompt, item, place))
    for answers in by_prompt.values():
        usable = [a for a in answers if not a[1].broken_call]  # a broken call is never the chosen answer
        if not usable:
            continue
        best = max(usable, key=lambda a: a[1].rating)
        worst = min(answers, key=lambda a: a[1].rating)
        if best[1].rating - worst[1].rating >= prefs.pair_min_rating_gap and best[1].answer.strip() != worst[1].answer.strip():
            rows.append(_with_tools({"prompt": best[0], "chosen": _answer(best[1].answer),
                                     "rejected": _answer(worst[1].answer)}, best[1].tools))
            senders.append({best[1].key, worst[1].key} - {""})
            when.append(max(best[2], worst[2]))
            counts["pairs_from_ratings"] += 1
    # In time order, so that the cap keeps each key's latest rows, pairs from ratings among them.
    order = sorted(range(len(rows)), key=when.__getitem__)
    rows, senders = [rows[i] for i in order], [senders[i] for i in order]
    if redaction is not None:
        redacted, counts["redacted"] = redact_preferences(rows, redaction)
        rows, senders = [r for r in redacted if r is not None], [k for r, k in zip(redacted, senders) if r is not None]
    # A served conversation the preference file may not hold (two user turns in a row: the API
    # takes it) is left out and counted: prepare would refuse the file for it in every run.
    usable = [row_problem(r) is None for r in rows]
    counts["invalid"] = usable.count(False)
    rows, senders = [r for r, ok in zip(rows, usable) if ok], [k for k, ok in zip(senders, usable) if ok]
    rows, counts["capped"] = cap_per_key(rows, senders, max_key_share)
    return rows, counts


def export_preference(db: Path, out: Path, prefs: PreferenceParams, auto_approve: str = "trusted",
                      redaction: RedactAction = "mask", max_key_share: float = 1.0,
                      model_name: str | None = None) -> dict[str, Any]:
    """Write the log's admitted preference examples, redacted, to `out` (atomically); what was written, counted.

    A missing log writes an empty file: no ratings yet, no preference tuning.
    """
    rated = read_rated(db, auto_approve, model_name) if Path(db).is_file() else []
    rows, counts = preference_examples(rated, prefs, max_key_share, redaction)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"path": str(out), "examples": len(rows), **counts}


_MESSAGE_FIELDS = ("prompt", "completion", "chosen", "rejected")


def redact_preferences(rows: list[dict[str, Any]],
                       action: RedactAction = "mask") -> tuple[list[dict[str, Any] | None], dict[str, int]]:
    """Redact every message list of the preference rows (tasks.feedback.redact), as the feedback export does.

    Returns:
        Each row redacted, or None where a "drop" policy leaves it out (a row with any
        finding), and the findings per category, with `examples_changed` and `examples_dropped`.
    """
    # Each row's lists as one example whose messages remember their field, so one call redacts the row.
    flat = [{"messages": [{**m, "field": f} for f in _MESSAGE_FIELDS for m in row.get(f) or []],
             **({"tools": row["tools"]} if "tools" in row else {})} for row in rows]
    kept_rows: list[dict[str, Any] | None] = []
    for row, example in zip(rows, flat):
        redacted, _ = redact_examples([example], action)
        if not redacted:
            kept_rows.append(None)
            continue
        messages = redacted[0]["messages"]
        kept_rows.append({**row, **{f: [{k: v for k, v in m.items() if k != "field"} for m in messages if m["field"] == f]
                                    for f in _MESSAGE_FIELDS if f in row},
                          **({"tools": redacted[0]["tools"]} if "tools" in row else {})})
    return kept_rows, redact_examples(flat, action)[1]
