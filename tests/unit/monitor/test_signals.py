"""Production signals of the monitor, read from a real feedback log written by the service's store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import MonitorParams
from tasks.errors import DataFileError
from tasks.feedback import FeedbackStore, Interaction
from tasks.monitor.signals import measure_drift, read_feedback, recent_prompts, recommend_retrain


def _log(db: Path, prompts: list[str], ratings: list[int], corrected: int, keys: int | None = None) -> None:
    """One completion per prompt, rated in turn; the first `corrected` ratings carry a correction.
    Rating i comes from the untrusted key `client-{i % keys}` (default: a key each)."""
    store = FeedbackStore(db)
    try:
        for i, prompt in enumerate(prompts):
            store.log_interaction(Interaction(
                id=f"c{i}", endpoint="/v1/chat/completions", model_name="ftllm-chat", model_version="1",
                messages=[{"role": "system", "content": "Rewrite the ISO date in words."},
                          {"role": "user", "content": prompt}],
                answer="March 18, 2016", finish_reason="stop", prompt_tokens=9, completion_tokens=4, latency_ms=12.0,
            ))
        for i, rating in enumerate(ratings):
            store.add_feedback(f"c{i % len(prompts)}", rating, "June 1, 2020" if i < corrected else None,
                               key_name=f"client-{i % (keys or len(ratings))}")
    finally:
        store.close()


class CharTokenizer:
    """One id per character (0 is unknown): drift counted by hand in the tests below."""

    unk_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) if c.isascii() else 0 for c in text]}


def test_new_feedback_counts_and_the_mean_rating_of_the_window(tmp_path):
    db = tmp_path / "feedback.db"
    _log(db, ["Convert this ISO date: 2016-03-18"] * 4, ratings=[5, 1, 2, 4, 3, 3], corrected=2)
    all_of_it = read_feedback(db, since_id=0, window=200)
    # 6 ratings of 4 answers: each answer once, a corrected one with its correction's rating
    assert (all_of_it.new_ratings, all_of_it.new_corrections, all_of_it.last_id, all_of_it.interactions) == (4, 2, 6, 4)
    assert all_of_it.mean_rating == pytest.approx((5 + 1 + 2 + 4) / 4)
    after_two = read_feedback(db, since_id=2, window=3)  # ids 3..6, of which the latest 3 are averaged
    assert (after_two.new_ratings, after_two.new_corrections, after_two.window_ratings) == (4, 0, 3)
    assert after_two.mean_rating == pytest.approx((4 + 3 + 3) / 3)
    nothing = read_feedback(db, since_id=6, window=200)
    assert (nothing.new_ratings, nothing.mean_rating, nothing.last_id) == (0, None, 6)


def test_the_mean_rating_is_of_the_champions_answers_and_the_rest_still_count(tmp_path):
    """Late ratings of an earlier champion's answers, posted after a promotion, counted against the
    new champion and could start a retraining it did not earn."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    try:
        for i, version in enumerate(["1", "1", "1", "2", "2"]):
            store.log_interaction(Interaction(
                id=f"c{i}", endpoint="/v1/chat/completions", model_name="ftllm-chat", model_version=version,
                messages=[{"role": "user", "content": f"Convert 2016-03-1{i}"}], answer="March 18, 2016",
                finish_reason="stop", prompt_tokens=9, completion_tokens=4, latency_ms=12.0))
        for i, rating in enumerate([1, 1, 2, 5, 4]):
            store.add_feedback(f"c{i}", rating, None, key_name=f"client-{i}")
    finally:
        store.close()
    figures = read_feedback(db, since_id=0, window=200, champion="2")
    assert (figures.mean_rating, figures.window_ratings, figures.champion, figures.other_versions) == (4.5, 2, "2", 3)
    assert (figures.new_ratings, figures.new_low_ratings) == (5, 3)  # still data to learn from
    monitor = MonitorParams(min_ratings=2, min_mean_rating=3.0, min_new_low_ratings=10, min_distinct_sources=1)
    assert recommend_retrain(figures, None, monitor)[0] is False
    every = read_feedback(db, since_id=0, window=200)  # no champion known: every answer
    assert (every.mean_rating, every.other_versions) == (pytest.approx(13 / 5), 0)
    recommended, reasons, _ = recommend_retrain(every, None, monitor)
    assert recommended and "mean rating 2.60 over the latest 5 new ratings (below" in reasons[0]
    no_answers = read_feedback(db, since_id=0, window=200, champion="3")  # promoted, nothing served yet
    assert (no_answers.mean_rating, no_answers.window_ratings, no_answers.other_versions) == (None, 0, 5)


def test_feedback_on_another_models_answers_neither_counts_nor_drifts(tmp_path):
    """The dates and tools services of one project log to one file: the tools service's
    corrections asked the dates model for a retraining, and its prompts made the dates drift."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    try:
        for i, model in enumerate(["ftllm-chat", "ftllm-tools", "ftllm-tools", "ftllm-tools"]):
            store.log_interaction(Interaction(
                id=f"c{i}", endpoint="/v1/chat/completions", model_name=model, model_version="1",
                messages=[{"role": "user", "content": f"{model} asks {i}"}], answer="It is 20:03.",
                finish_reason="stop", prompt_tokens=9, completion_tokens=4, latency_ms=12.0))
            store.add_feedback(f"c{i}", 1, "It is 20:04.", key_name=f"client-{i}")
    finally:
        store.close()
    dates = read_feedback(db, since_id=0, window=200, champion="1", model_name="ftllm-chat")
    assert (dates.new_ratings, dates.new_corrections, dates.other_models, dates.sources) == (1, 1, 3, 1)
    assert (dates.mean_rating, dates.window_ratings) == (1.0, 1)
    assert read_feedback(db, since_id=0, window=200, model_name="ftllm-tools").new_corrections == 3
    assert recent_prompts(db, 10, "ftllm-chat") == ["ftllm-chat asks 0"]
    assert len(recent_prompts(db, 10)) == 4
    assert (dates.interactions, read_feedback(db, since_id=0, window=200).interactions) == (1, 4)


def test_feedback_on_an_answer_a_tool_choice_forced_asks_for_no_retraining(tmp_path):
    """Neither export trains an answer a tool_choice forced, but its corrections were counted
    toward monitor.min_new_corrections: a retraining that would learn nothing from them."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    ask = [{"role": "user", "content": "Time in Oslo?"}]
    results = [*ask, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "20:03"}]
    try:
        for i, (messages, choice) in enumerate([(ask, "required"), (ask, {"type": "function", "function": {"name": "x"}}),
                                                (ask, "none"), (results, "none"), (ask, None)]):
            store.log_interaction(Interaction(
                id=f"c{i}", endpoint="/v1/chat/completions", model_name="ftllm-chat", model_version="1",
                messages=messages, answer="It is 20:03.", finish_reason="stop", prompt_tokens=9, completion_tokens=4,
                latency_ms=12.0, tool_choice=choice))
            store.add_feedback(f"c{i}", 1, "It is 20:04.", key_name=f"client-{i}")
    finally:
        store.close()
    figures = read_feedback(db, since_id=0, window=200, model_name="ftllm-chat")
    assert (figures.new_corrections, figures.forced, figures.window_ratings) == (2, 3, 2)  # the last round and auto


def test_a_cursor_past_every_id_the_log_gave_counts_the_whole_log(tmp_path):
    """A new or replaced feedback.db starts its ids at 1 again, under the cursor the old log left:
    its corrections were never counted, so they never started a retraining. Erasing rows does
    not look like a new log: ids are never given twice."""
    db = tmp_path / "feedback.db"
    _log(db, ["Convert this ISO date: 2016-03-18"] * 4, ratings=[1, 1, 2, 4], corrected=3)
    fresh = read_feedback(db, since_id=500, window=200, since_decision=7)
    assert fresh.new_log and (fresh.since_id, fresh.new_ratings, fresh.new_corrections, fresh.last_id) == (0, 4, 3, 4)
    store = FeedbackStore(db)
    store.forget(key_name="client-3", reason="test")  # erases feedback id 4, the last one given
    store.close()
    same = read_feedback(db, since_id=4, window=200)
    assert not same.new_log and same.new_ratings == 0


def test_a_log_that_replaced_another_is_told_by_its_identity_whatever_its_ids(tmp_path):
    """A replacing log that had already given more ids than the cursor was taken for the same
    log: its feedback under the cursor was never counted. Each log has an identity of its own."""
    from tasks.feedback import FeedbackReader

    old, new = tmp_path / "old.db", tmp_path / "feedback.db"
    _log(old, ["Convert this ISO date: 2016-03-18"] * 2, ratings=[4, 4], corrected=0)
    _log(new, ["Convert this ISO date: 2016-03-18"] * 6, ratings=[1, 1, 1, 2, 2, 2], corrected=4)
    with FeedbackReader(old) as reader:
        old_id = reader.log_id()
    with FeedbackReader(new) as reader:
        new_id = reader.log_id()
    assert len(old_id) == len(new_id) == 32 and old_id != new_id
    replaced = read_feedback(new, since_id=2, window=200, since_log=old_id)  # 2 < the 6 ids the new log gave
    assert replaced.new_log and (replaced.new_ratings, replaced.new_corrections) == (6, 4)
    same = read_feedback(new, since_id=2, window=200, since_log=new_id)
    assert not same.new_log and same.new_ratings == 4
    legacy = read_feedback(new, since_id=2, window=200)  # a cursor from before identities: the ids alone tell
    assert not legacy.new_log and legacy.new_ratings == 4


def test_a_file_that_is_not_the_log_is_refused_naming_it(tmp_path):
    bogus = tmp_path / "feedback.db"
    bogus.write_text("not sqlite")
    with pytest.raises(DataFileError, match="feedback.db.*FTLLM_FEEDBACK_DB"):
        read_feedback(bogus, 0, 10)
    with pytest.raises(DataFileError, match="feedback.db: not a feedback log.*FTLLM_FEEDBACK_DB"):
        FeedbackStore(bogus)  # the writer too (forget, approve, the service), not a DatabaseError's traceback


def test_the_cli_names_a_file_that_is_not_the_log_whatever_the_command(tmp_path, monkeypatch, capsys):
    from ftllm.commands.feedback import approve_command, forget_command, pending_command

    bogus = tmp_path / "feedback.db"
    bogus.write_text("not sqlite")
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(bogus))
    for command in (lambda: forget_command(None, None, None, True), lambda: forget_command(None, "web", None, False),
                    pending_command, lambda: approve_command(True, [], False, "cli")):
        assert command() != 0
        err = capsys.readouterr().err
        assert "not a feedback log" in err and "Traceback" not in err, err


def test_drift_of_prompt_length_and_unknown_tokens(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": "abcd"}, {"role": "assistant", "content": "xy"}]}] * 3
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    db = tmp_path / "feedback.db"
    _log(db, ["abcdabcd", "zzzzzzzz"], ratings=[], corrected=0)
    prompts = recent_prompts(db, window=10)
    assert sorted(prompts) == ["abcdabcd", "zzzzzzzz"]  # user turns only, no system prompt
    drift = measure_drift(CharTokenizer(), train, prompts)
    assert (drift.train_mean_tokens, drift.recent_mean_tokens) == (4.0, 8.0)
    assert drift.length_drift == pytest.approx(1.0)
    assert drift.unknown_token_rate == pytest.approx(8 / 16)  # "z" never occurs in the train split
    with pytest.raises(DataFileError, match="prepare"):
        measure_drift(CharTokenizer(), tmp_path / "missing.jsonl", prompts)


def test_recommendation_follows_the_thresholds(tmp_path):
    db = tmp_path / "feedback.db"
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 11)], ratings=[2] * 5 + [5] * 5, corrected=3)
    figures = read_feedback(db, 0, 200)
    quiet = MonitorParams(min_new_corrections=4, min_ratings=20)
    assert recommend_retrain(figures, None, quiet) == (False, [], [])
    yes, reasons, _ = recommend_retrain(figures, None, MonitorParams(min_new_corrections=3))
    assert yes and "3 new corrections" in reasons[0]
    yes, reasons, _ = recommend_retrain(figures, None, MonitorParams(min_ratings=10, min_mean_rating=3.6))
    assert yes and "mean rating 3.50" in reasons[0]
    # The same figures, but settings under which a retrain would not read the feedback: withheld, and why.
    no, reasons, _ = recommend_retrain(figures, None, MonitorParams(min_new_corrections=3), reads_feedback=False)
    assert not no and "3 new corrections" in reasons[0] and "set data.feedback: true" in reasons[-1]
    assert recommend_retrain(figures, None, quiet, reads_feedback=False) == (False, [], [])


def test_the_monitor_fires_on_low_ratings(tmp_path):
    db = tmp_path / "feedback.db"
    # 12 thumbs down (rating 1 or 2) among 40 rated answers: the mean stays high, no corrections.
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 41)], ratings=[1, 2] * 6 + [5] * 28, corrected=0)
    figures = read_feedback(db, 0, 200, low_rating=2)
    assert figures.new_low_ratings == 12 and figures.new_corrections == 0 and figures.mean_rating > 3.5
    quiet = MonitorParams(min_new_low_ratings=13)
    assert recommend_retrain(figures, None, quiet) == (False, [], [])
    yes, reasons, _ = recommend_retrain(figures, None, MonitorParams(min_new_low_ratings=12))
    assert yes and reasons == ["12 new ratings of 2 or less (monitor.min_new_low_ratings 12)"]
    assert read_feedback(db, 0, 200, low_rating=1).new_low_ratings == 6


def test_an_answer_rated_again_and_again_counts_once(tmp_path):
    """Thirty clicks of one user on one answer are one low rating, as the exports count them; a
    correction stands for its answer whatever ratings follow it."""
    db = tmp_path / "feedback.db"
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 4)], ratings=[1, 5, 5], corrected=0)
    store = FeedbackStore(db)
    for _ in range(30):
        store.add_feedback("c0", 1, key_name="web", end_user="clicker", trusted=True)
    store.add_feedback("c1", 2, "June 1, 2020", key_name="web", end_user="ann", trusted=True)
    store.add_feedback("c1", 1, key_name="web", end_user="ann", trusted=True)
    store.close()
    figures = read_feedback(db, 0, 200, low_rating=2)
    assert (figures.new_ratings, figures.new_low_ratings, figures.new_corrections) == (3, 1, 1)
    assert figures.mean_rating == pytest.approx((5 + 2 + 1) / 3)  # c2, then c1's correction, then c0's last click
    assert not recommend_retrain(figures, None, MonitorParams(min_new_low_ratings=2))[0]


def test_the_default_settings_read_feedback_and_add_it_as_a_source():
    from tasks.config import load_params

    shipped = load_params(None).data
    assert shipped.feedback and shipped.reads_feedback()
    assert shipped.sources_with_feedback() == [{"path": shipped.path}, {"feedback": True}]
    off = load_params(None, {"data.feedback": False}).data
    assert not off.reads_feedback()
    listed = load_params(None, {"data.feedback": False, "data.sources": [
        {"path": shipped.path, "weight": 2}, {"feedback": True, "min_rating": 3}]}).data
    assert listed.reads_feedback()
    with_it = load_params(None, {"data.sources": shipped.sources_with_feedback()}).data
    assert [s.feedback for s in with_it.source_list()] == [False, True]




def test_one_client_cannot_force_a_retraining(tmp_path):
    from tasks.feedback import FeedbackStore

    db = tmp_path / "feedback.db"
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 11)], ratings=[1] * 10, corrected=10, keys=1)
    figures = read_feedback(db, 0, 200)
    assert figures.sources == 1 and figures.new_corrections == 10
    yes, reasons, alerts = recommend_retrain(figures, None, MonitorParams(min_new_corrections=5))
    assert not yes and not reasons and "1 distinct source(s), fewer than monitor.min_distinct_sources 2" in alerts[0]
    store = FeedbackStore(db)  # the same client inventing end-user ids is still one source
    for i in range(3):
        store.add_feedback("c0", 1, key_name="client-0", end_user=f"made-up-{i}")
    store.add_feedback("c1", 1, key_name="web", end_user="ann", trusted=True)  # the operator's front end: per user
    store.add_feedback("c1", 1, key_name="web", end_user="bo", trusted=True)
    store.close()
    assert read_feedback(db, 0, 200).sources == 3
    assert recommend_retrain(read_feedback(db, 0, 200), None, MonitorParams(min_new_corrections=5))[0]
    store = FeedbackStore(db)  # a person rejects the client's feedback: it asks for nothing any more
    store.review("rejected", "cli", keys=["client-0"])
    store.close()
    figures = read_feedback(db, 0, 200)
    assert (figures.new_corrections, figures.new_ratings, figures.sources) == (0, 1, 2)  # c1, by two users


def test_held_feedback_approved_after_a_run_read_the_log_is_new(tmp_path):
    """A run reads the log past held feedback (not trained on); once a person approves it, the
    monitor counts it as new, although its id is below the run's cursor. Approving trusted
    feedback the run had trained on anyway (`approve --all`) adds nothing."""
    from tasks.feedback import export_feedback

    db = tmp_path / "feedback.db"
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 5)], ratings=[5, 1, 1, 5], corrected=0, keys=1)
    store = FeedbackStore(db)
    store.add_feedback("c0", 4, key_name="ops", trusted=True)  # id 5: trusted, admitted without review
    store.close()
    read = export_feedback(db, tmp_path / "out.jsonl", 4)  # what a run reads: ids 1..4 held (untrusted), 5 trained
    assert (read.last_feedback_id, read.last_decision, read.held) == (5, 0, 4)
    assert read_feedback(db, read.last_feedback_id, 200, since_decision=read.last_decision).new_ratings == 0
    store = FeedbackStore(db)
    store.review("approved", "cli", keys=["client-0"], ids=[1, 2])
    store.review("rejected", "cli", ids=[3])
    store.review("approved", "cli")  # every pending row: 4 (held) and 5 (trusted, trained already)
    store.close()
    figures = read_feedback(db, read.last_feedback_id, 200, since_decision=read.last_decision)
    assert (figures.new_ratings, figures.new_low_ratings, figures.mean_rating) == (3, 1, pytest.approx(11 / 3))  # ids 1, 2, 4
    again = export_feedback(db, tmp_path / "out.jsonl", 4)  # the next run reads them: nothing new after it
    assert (again.last_feedback_id, again.last_decision) == (5, 3)
    assert read_feedback(db, again.last_feedback_id, 200, since_decision=again.last_decision).new_ratings == 0


def test_a_decision_number_is_never_given_twice_whatever_forget_erases(tmp_path):
    """Numbers counted from the decided rows would start again once `forget` erased them, and
    feedback approved after a run read the log would then look older than the run."""
    from tasks.feedback import export_feedback

    db = tmp_path / "feedback.db"
    _log(db, [f"Convert this ISO date: 2016-03-{d:02d}" for d in range(1, 5)], ratings=[1, 1, 1, 1], corrected=0, keys=1)
    store = FeedbackStore(db)
    store.add_feedback("c0", 2, key_name="client-0", end_user="ann")  # id 5
    store.review("approved", "cli", ids=[5])  # decision 1
    store.close()
    read = export_feedback(db, tmp_path / "out.jsonl", 4)  # ids 1..4 held
    assert (read.last_feedback_id, read.last_decision) == (5, 1)
    store = FeedbackStore(db)
    store.forget(end_user="ann", reason="forget --user ann")  # erases the only decided row
    store.review("approved", "cli", ids=[1, 2])
    store.close()
    assert read_feedback(db, read.last_feedback_id, 200, since_decision=read.last_decision).new_ratings == 2
