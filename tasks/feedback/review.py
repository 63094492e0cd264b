"""Held feedback and a person's decision on it: the batch a reviewer sees, and applying the verdict.

Feedback from keys that are not trusted (or every key, with `feedback.auto_approve: none`)
waits in the log as `pending` until a person approves it: in the Prefect UI, where the
retrain flow pauses with a form (flows/approval.py), or with `ftllm feedback approve`.
`describe_batch` is the markdown the form shows: counts per key, the largest
contributors, samples of corrections beside the answers they replace, and what
redaction would change. Nothing is ever deleted here: what is neither approved nor
rejected stays pending for the next run.

    ftllm feedback pending            # the batch, as the form shows it
    ftllm feedback approve --key web  # approve one key's held feedback
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tasks.feedback.export import training_examples
from tasks.feedback.reader import FeedbackReader
from tasks.feedback.redact import redact_arguments, redact_example, redact_text
from tasks.feedback.schema import MIN_RATING, FeedbackRow, Interaction
from tasks.feedback.store import FeedbackStore


@dataclass(frozen=True)
class HeldBatch:
    """The pending feedback that the auto-approval setting does not admit, up to a feedback id."""

    rows: list[tuple[Interaction, FeedbackRow]]
    up_to_id: int  # the highest id in the batch: a decision covers nothing posted after the form was shown

    @property
    def per_key(self) -> Counter[str]:
        return Counter(row.key_name for _, row in self.rows)

    @property
    def keys(self) -> list[str]:
        return sorted(self.per_key)


def held_batch(db: Path, auto_approve: str, model_name: str | None = None) -> HeldBatch:
    """The feedback in `db` that waits for a person (empty when there is no log); with
    `model_name`, only that on the answers this registered model served (what its run reads)."""
    if not Path(db).is_file():
        return HeldBatch([], 0)
    with FeedbackReader(db) as reader:
        rated, _, _ = reader.rated_completions()
    held = [(i, r) for i, r in rated if r.review == "pending" and not r.admitted(auto_approve)
            and (model_name is None or i.model_name == model_name)]
    return HeldBatch(held, max((r.id for _, r in held), default=0))


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _answer_text(interaction) -> str:
    """The answer as a reviewer reads it: its text, and each call as `name(arguments)` (an
    answer that is only a call has no text, and the correction replaces the call), the
    arguments masked as the exports mask them (by their keys: `{"to": ..., "via": "sms"}`)."""
    calls = [f"{c['function']['name']}({redact_arguments(c['function'].get('arguments', ''))})"
             for c in interaction.tool_calls or [] if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    return " ".join(filter(None, [interaction.answer.strip(), *calls]))


def describe_batch(batch: HeldBatch, samples: int = 5) -> str:
    """The batch as markdown for the approval form (and `ftllm feedback pending`)."""
    per_key = batch.per_key
    corrections = [(i, r) for i, r in batch.rows if r.correction is not None]
    lines = [f"## Held feedback: {len(batch.rows)} rows from {len(per_key)} key(s), ids up to {batch.up_to_id}",
             "", "Approve all, none, or per key. What you leave undecided stays held for the next run.", "",
             "| key | rows | corrections | end users |", "| --- | ---: | ---: | ---: |"]
    for key, count in per_key.most_common():
        rows = [r for _, r in batch.rows if r.key_name == key]
        lines.append(f"| {_cell(key)} | {count} | {sum(r.correction is not None for r in rows)} | "
                     f"{len({r.end_user for r in rows if r.end_user})} |")
    top, top_count = per_key.most_common(1)[0] if per_key else ("-", 0)
    lines += ["", (f"Largest contributor: **{_cell(top)}** with {top_count} of {len(batch.rows)} rows "
                  f"({top_count / max(1, len(batch.rows)):.0%})."), ""]
    if corrections:
        # Masked as the exports mask them: the form's text is kept by Prefect (the paused run's
        # description) and printed by `ftllm feedback pending`, so it must not copy a secret out.
        lines += ["### Samples: corrections beside the answers they replace (secrets and personal data masked)", "",
                  "| key | prompt | model's answer | correction |", "| --- | --- | --- | --- |"]
        for key in per_key:  # the first corrections of every key, so no key hides behind another
            for interaction, row in [(i, r) for i, r in corrections if r.key_name == key][:samples]:
                prompt = next((m.get("content", "") for m in reversed(interaction.messages) if m.get("role") == "user"), "")
                prompt, answer, correction = (redact_text(str(t or ""))[0]
                                              for t in (prompt, _answer_text(interaction), row.correction))
                lines.append(f"| {_cell(key, 30)} | {_cell(prompt, 60)} | {_cell(answer, 60)} | {_cell(correction, 60)} |")
    found: Counter[str] = Counter()
    changed = 0
    for interaction, row in batch.rows:  # what the exports would write for the row, redacted as they would be
        made = training_examples([(interaction.messages, interaction.answer, row)], MIN_RATING,
                                 interaction.tools, interaction.tool_calls, interaction.reasoning)
        if made and row.correction is not None and row.correction.strip() != interaction.answer.strip():
            # the preference export writes the answer a correction replaces too
            made.append({"messages": [{"role": "assistant", "content": interaction.answer}]})
        counts = sum((redact_example(e).found for e in made), Counter())
        found += counts
        changed += bool(counts)
    lines += ["", "### Redaction", "", (f"{changed} of {len(batch.rows)} rows hold secrets or personal data, masked "
              "(or dropped, by feedback.redaction) before training: " + ", ".join(f"{c} {n}" for c, n in sorted(found.items())))
              if changed else "Nothing to redact."]
    return "\n".join(lines)


@dataclass(frozen=True)
class Decision:
    """A reviewer's verdict on a held batch."""

    approve_all: bool = False
    approve_keys: tuple[str, ...] = ()
    reject_keys: tuple[str, ...] = ()
    reviewer: str = "unknown"


def still_held(db: Path, batch: HeldBatch) -> int:
    """How many of the batch's rows are still pending: `ftllm feedback approve` may decide them
    while a run waits on the approval form."""
    if not batch.rows:
        return 0
    ids = [r.id for _, r in batch.rows]
    with FeedbackReader(db) as reader:
        return int(reader.conn.execute(f"SELECT COUNT(*) FROM feedback WHERE review = 'pending' AND id IN "
                                       f"({','.join('?' * len(ids))})", ids).fetchone()[0])


def apply_decision(db: Path, batch: HeldBatch, decision: Decision) -> dict[str, int]:
    """Mark the batch's rows approved or rejected as decided; return the counts: `held`, the rows
    still pending after it, and `decided_elsewhere` (when there are some), those decided
    meanwhile by another reviewer (`ftllm feedback approve`). Rows posted after the batch was shown (ids above
    `batch.up_to_id`) are not touched, nor are undecided keys.

    A key named for rejection is rejected whatever else the decision says: "approve all" then
    approves the other keys' rows (the approval form has both fields; the safer verdict wins).
    """
    if not batch.rows:
        return {"approved": 0, "rejected": 0, "held": 0}
    store = FeedbackStore(db)
    try:
        ids = [r.id for _, r in batch.rows]
        rejected = (store.review("rejected", decision.reviewer, keys=list(decision.reject_keys), ids=ids)
                    if decision.reject_keys else 0)
        approve = None if decision.approve_all else [k for k in decision.approve_keys if k not in decision.reject_keys]
        approved = store.review("approved", decision.reviewer, keys=approve, ids=ids) if approve is None or approve else 0
    finally:
        store.close()
    held = still_held(db, batch)
    elsewhere = len(ids) - approved - rejected - held
    return {"approved": approved, "rejected": rejected, "held": held, **({"decided_elsewhere": elsewhere} if elsewhere else {})}
