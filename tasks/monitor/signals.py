"""What production says about the champion: ratings, corrections and prompt drift.

Reads the service's interaction log through `tasks.feedback.FeedbackReader` (read-only, so
a monitor never blocks or alters the service's writes).

- Feedback since a cursor (the highest feedback id already acted on): how many answers were
  newly rated and corrected, and the mean of the latest `window` new ratings. An answer rated
  several times counts once, with its latest rating (a correction stands for the answer
  whatever rating follows it), as the exports count it: one user clicking thumbs-down thirty
  times on one answer is one low rating, not a retraining.
- Drift of the latest `window` prompts against the train split, counted with the run's
  tokenizer on the user turns: the relative change of the mean prompt length in tokens,
  and the unknown-token rate, the share of prompt tokens whose id never occurs in the
  train split (or is the tokenizer's unknown token). A byte-level tokenizer has no unknown
  token, so the second figure measures new vocabulary: prompts about things the model was
  not trained on.
- `recommend_retrain` turns the figures and `monitor.*` thresholds into a decision with
  its reasons.

Run alone:

    python -c "from tasks.monitor.signals import read_feedback; print(read_feedback('feedback.db', 0, 200))"
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks.config import MonitorParams
from tasks.errors import DataFileError
from tasks.feedback import FeedbackReader
from tasks.files import read_jsonl
from tasks.monitor.cursor import Cursor


@dataclass(frozen=True)
class FeedbackFigures:
    """Feedback that came in after the cursor `since_id`."""

    since_id: int
    last_id: int  # the highest feedback id in the log (the cursor to move to once acted on)
    new_ratings: int  # answers with new feedback, each once
    new_corrections: int  # answers among them that were corrected
    window_ratings: int  # the latest rated answers of the champion the mean is taken over (at most monitor.window)
    mean_rating: float | None
    interactions: int  # completions in the log (of the model monitored), all time
    sources: int = 0  # distinct senders of the new feedback (`feedback_sources`)
    new_low_ratings: int = 0  # answers whose latest rating is at most monitor.low_rating (what preference tuning avoids)
    champion: str | None = None  # the version the mean rating is of (None: no champion known, every answer)
    other_versions: int = 0  # new rated answers another version served: counted above, not in the mean
    other_models: int = 0  # new rated answers another registered model served (one log, two services): not counted
    forced: int = 0  # new rated answers a tool_choice forced (no export trains them): not counted
    new_log: bool = False  # the cursor was read in another log (replaced, moved): this one is counted whole


@dataclass(frozen=True)
class Drift:
    """The latest prompts against the train split, in tokens of the run's tokenizer."""

    prompts: int
    train_mean_tokens: float
    recent_mean_tokens: float | None
    length_drift: float | None  # (recent - train) / train
    unknown_token_rate: float | None


def feedback_sources(rows: Iterable) -> int:
    """Distinct senders among feedback rows: an untrusted key counts once, whatever end-user ids it
    sends (it could invent them); a trusted key, the operator's own front end, once per end user."""
    return len({(row.key_name, row.end_user if row.trusted else None) for row in rows})


def read_feedback(db: Path, since_id: int, window: int, low_rating: int = 2, since_decision: int = 0,
                  auto_approve: str = "trusted", champion: str | None = None, since_log: str = "",
                  model_name: str | None = None) -> FeedbackFigures:
    """Count the ratings and corrections with a feedback id above `since_id`, and those below it
    that a person approved after review decision `since_decision` (held when the last run read
    the log, so not trained on); feedback a person rejected is left out (it never reaches
    training, so it must not ask for a retraining).

    Args:
        auto_approve: `feedback.auto_approve`: feedback it admits without review was trained on
            by the last run, approved since or not.
        champion: the version serving now: the mean rating is of its answers only, so late
            ratings of an earlier champion's answers do not count against it (they still count
            as ratings, corrections and low ratings: data the next run learns from).
        model_name: the registered model monitored: feedback on another model's answers (its
            service logging to the same file) is not counted at all (`other_models`), nor are
            its completions in `interactions`; None: every answer in the log.

    Feedback on an answer a `tool_choice` forced is not counted either (`forced`): no export
    trains it, so it must not ask for a retraining.

    A cursor read in another log (`since_log` another log's identity, or `since_id` past every
    feedback id this log ever gave: `tasks.monitor.cursor.Cursor.of_another_log`), one since
    replaced or moved, makes the whole log new (`new_log`), where its feedback would otherwise
    never be counted.

    Raises:
        DataFileError: `db` is not the service's SQLite log.
    """
    with FeedbackReader(db) as reader:
        new_log = Cursor(since_id, since_decision, since_log).of_another_log(reader.log_id(), reader.feedback_ids_given())
        if new_log:
            since_id, since_decision = 0, 0
        rows = [row for row in reader.feedback_since(since_id) if row.review != "rejected"]
        rows += [row for row in reader.approved_since(since_decision, since_id)
                 if not replace(row, review="pending").admitted(auto_approve)]
        rows.sort(key=lambda row: row.id)
        last = reader.last_feedback_id()
        interactions = reader.interaction_count(model_name)
        served = reader.served_by(row.completion_id for row in rows)
    # Per answer (completion): another model's, and one a tool_choice forced (trained by neither
    # export, so its feedback asks for no retraining), are left out, counted.
    latest = _latest_per_answer(rows)
    name, version, forced = ({cid: s[k] for cid, s in served.items()} for k in range(3))
    mine = [row for row in latest if model_name is None or name.get(row.completion_id) == model_name]
    answers = [row for row in mine if not forced.get(row.completion_id)]
    kept = {row.completion_id for row in answers}
    rows = [row for row in rows if row.completion_id in kept]
    ours = [row for row in answers if champion is None or version.get(row.completion_id) == champion]
    ratings = [row.rating for row in ours][-window:]
    return FeedbackFigures(
        since_id=since_id, last_id=max(last, since_id), new_ratings=len(answers),
        new_corrections=sum(row.correction is not None for row in answers), window_ratings=len(ratings),
        mean_rating=sum(ratings) / len(ratings) if ratings else None, interactions=interactions,
        sources=feedback_sources(rows),
        new_low_ratings=sum(row.correction is None and row.rating <= low_rating for row in answers),
        champion=champion, other_versions=len(answers) - len(ours), other_models=len(latest) - len(mine),
        forced=len(mine) - len(answers), new_log=new_log,
    )


def _latest_per_answer(rows: list) -> list:
    """Each answer's (completion's) latest feedback row, a corrected one before later plain ratings,
    in the order of those rows."""
    latest: dict[str, Any] = {}
    for row in rows:  # in id order
        kept = latest.get(row.completion_id)
        if kept is None or row.correction is not None or kept.correction is None:
            latest[row.completion_id] = row
    return sorted(latest.values(), key=lambda row: row.id)


def recent_prompts(db: Path, window: int, model_name: str | None = None) -> list[str]:
    """The user turns of the latest `window` completions (of `model_name`'s service, if given), one text per completion."""
    with FeedbackReader(db) as reader:
        requests = reader.recent_messages(window, model_name)
    return [text for text in (_user_text(messages) for messages in requests) if text]


def _user_text(messages: Iterable[dict]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")


def measure_drift(tokenizer, train_split: Path, prompts: list[str]) -> Drift:
    """Prompt length and unknown-token rate of `prompts` against the user turns of `train_split`.

    Raises:
        DataFileError: there is no train split to compare with.
    """
    if not Path(train_split).is_file():
        raise DataFileError(f"{train_split}: no train split to measure drift against; run the prepare stage first")
    rows = read_jsonl(Path(train_split))

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    train_lengths = [len(ids(_user_text(r["messages"]))) for r in rows]
    seen = {i for r in rows for m in r["messages"] for i in ids(str(m.get("content", "")))}
    train_mean = sum(train_lengths) / max(1, len(train_lengths))
    if not prompts:
        return Drift(0, train_mean, None, None, None)
    encoded = [ids(p) for p in prompts]
    tokens = [i for e in encoded for i in e]
    unknown = sum(i not in seen or i == tokenizer.unk_token_id for i in tokens)
    recent_mean = len(tokens) / len(encoded)
    return Drift(
        prompts=len(prompts), train_mean_tokens=train_mean, recent_mean_tokens=recent_mean,
        length_drift=(recent_mean - train_mean) / train_mean if train_mean else None,
        unknown_token_rate=unknown / len(tokens) if tokens else 0.0,
    )


NOT_READ = ("not recommended: a retraining would not read this feedback (data.feedback is false and data.sources "
            "has no {feedback: true} source); set data.feedback: true in params.yaml")


def recommend_retrain(figures: FeedbackFigures, drift: Drift | None, monitor: MonitorParams,
                      reads_feedback: bool = True) -> tuple[bool, list[str], list[str]]:
    """Whether production feedback makes a retraining worth it.

    Args:
        reads_feedback: whether a retraining run would read the feedback (`DataParams.reads_feedback`).
            When not, the thresholds are still reported but nothing is recommended: such a run
            would train on the same data and the feedback would stay unanswered.

    Returns:
        (recommended, the reasons (with `NOT_READ` last when it was withheld), drift alerts).
        Drift is reported, not a reason on its own: retraining on the same data does not
        answer prompts the data lacks.
    """
    reasons = []
    if figures.new_corrections >= monitor.min_new_corrections:
        reasons.append(f"{figures.new_corrections} new corrections (monitor.min_new_corrections {monitor.min_new_corrections})")
    if (figures.mean_rating is not None and figures.window_ratings >= monitor.min_ratings
            and figures.mean_rating < monitor.min_mean_rating):
        of = f" of version {figures.champion}'s answers" if figures.champion is not None else ""
        reasons.append(f"mean rating {figures.mean_rating:.2f} over the latest {figures.window_ratings} new ratings{of} "
                       f"(below monitor.min_mean_rating {monitor.min_mean_rating})")
    if figures.new_low_ratings >= monitor.min_new_low_ratings:
        reasons.append(f"{figures.new_low_ratings} new ratings of {monitor.low_rating} or less "
                       f"(monitor.min_new_low_ratings {monitor.min_new_low_ratings})")
    if reasons and figures.sources < monitor.min_distinct_sources:
        reasons = []  # one client alone cannot start a retraining
        too_few = (f"the new feedback comes from {figures.sources} distinct source(s), fewer than "
                   f"monitor.min_distinct_sources {monitor.min_distinct_sources}: no retraining recommended")
    else:
        too_few = None
    alerts = [too_few] if too_few else []
    if drift is not None and drift.length_drift is not None and abs(drift.length_drift) > monitor.max_prompt_length_drift:
        alerts.append(f"prompt length {drift.recent_mean_tokens:.1f} tokens against {drift.train_mean_tokens:.1f} "
                      f"in training ({drift.length_drift:+.0%}, monitor.max_prompt_length_drift {monitor.max_prompt_length_drift})")
    if drift is not None and drift.unknown_token_rate is not None and drift.unknown_token_rate > monitor.max_unknown_token_rate:
        alerts.append(f"{drift.unknown_token_rate:.1%} of prompt tokens never seen in training "
                      f"(monitor.max_unknown_token_rate {monitor.max_unknown_token_rate})")
    if reasons and not reads_feedback:
        return False, [*reasons, NOT_READ], alerts
    return bool(reasons), reasons, alerts
