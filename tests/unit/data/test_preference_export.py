"""Preference data from the interaction log: thresholds, pairing, validation, dedup, the held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.config import DataParams, ModelParams, Params, PreferenceParams, load_params, write_resolved
from tasks.data.preference import HELDOUT_SPLIT, TRAIN_SPLIT, heldout_share
from tasks.data.prepare import prepare_dataset
from tasks.data.sources import prompt_key
from tasks.feedback import FeedbackStore, Interaction
from tasks.feedback.preference import export_preference, read_rated
from tasks.files import file_md5
from tasks.model.loading import load_tokenizer, resolve_base


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(resolve_base(ModelParams()))


class Log:
    """A real feedback store, written through its API as the service writes it."""

    def __init__(self, path: Path):
        self.store = FeedbackStore(path)
        self.n = 0

    def serve(self, question: str, answer: str, rating: int | None = None, correction: str | None = None,
              key: str = "app", trusted: bool = True, finish: str = "stop") -> str:
        self.n += 1
        cid = f"c{self.n}"
        self.store.log_interaction(Interaction(cid, "chat", "m", "1", [{"role": "user", "content": question}],
                                               answer, finish, 3, 2, 1.0))
        if rating is not None:
            self.store.add_feedback(cid, rating, correction, key_name=key, trusted=trusted)
        return cid

    def close(self) -> Path:
        self.store.close()
        return self.store.path


def export(tmp_path: Path, log: Log, **prefs) -> tuple[list[dict], dict]:
    out = tmp_path / "preference.jsonl"
    summary = export_preference(log.close(), out, PreferenceParams(**prefs))
    return [json.loads(line) for line in out.read_text().splitlines()], summary


def test_ratings_become_kto_rows_by_the_thresholds_and_middle_ratings_are_left_out(tmp_path):
    log = Log(tmp_path / "f.db")
    for rating in (5, 4, 3, 2, 1):
        log.serve(f"Question rated {rating}?", f"Answer {rating}.", rating)
    log.serve("Never rated?", "Answer.")
    rows, summary = export(tmp_path, log)
    labels = {r["completion"][0]["content"]: r["label"] for r in rows}
    assert labels == {"Answer 5.": True, "Answer 4.": True, "Answer 2.": False, "Answer 1.": False}
    assert rows[0]["prompt"] == [{"role": "user", "content": "Question rated 5?"}]
    assert summary["middle"] == 1 and summary["desirable"] == 2 and summary["undesirable"] == 2

    log = Log(tmp_path / "g.db")
    for rating in (5, 4, 3, 2, 1):
        log.serve(f"Question rated {rating}?", f"Answer {rating}.", rating)
    rows, _ = export(tmp_path, log, desirable_min_rating=5, undesirable_max_rating=1)
    assert {r["completion"][0]["content"]: r["label"] for r in rows} == {"Answer 5.": True, "Answer 1.": False}


def test_the_latest_rating_of_a_completion_counts(tmp_path):
    log = Log(tmp_path / "f.db")
    cid = log.serve("Question?", "Answer.", 5)
    log.store.add_feedback(cid, 1, key_name="app", trusted=True)
    rows, _ = export(tmp_path, log)
    assert [r["label"] for r in rows] == [False]


def test_a_broken_call_rated_well_is_no_answer_to_learn_but_rated_down_it_is_one_to_unlearn(tmp_path):
    """A call the service returned as text (logged `invalid_tool_call`) is never a desirable row."""
    log = Log(tmp_path / "f.db")
    log.serve("Weather in Oslo?", '<tool_call>\n{"name": "get_weather", "argu', 5, finish="invalid_tool_call")
    log.serve("Weather in Rome?", '<tool_call>\n{"name": "get_weat', 1, finish="invalid_tool_call")
    rows, summary = export(tmp_path, log)
    assert [(r["prompt"][0]["content"], r["label"]) for r in rows] == [("Weather in Rome?", False)]
    assert summary["broken_calls"] == 1
    # Rated in the middle, it is no row of its own, and never the chosen side of a pair.
    log = Log(tmp_path / "g.db")
    log.serve("Weather in Oslo?", '<tool_call>\n{"name": "get_weather", "argu', 3, finish="invalid_tool_call")
    log.serve("Weather in Oslo?", "Sunny.", 1)
    rows, summary = export(tmp_path, log)
    assert summary["pairs_from_ratings"] == 0 and [r.get("label") for r in rows] == [False]


def test_an_answer_the_client_stopped_makes_no_preference_row(tmp_path):
    """Part of an answer (logged `client_stopped`): neither its rating nor its correction says
    which whole answer was better, and it pairs with no other answer of the prompt."""
    log = Log(tmp_path / "f.db")
    log.serve("Rewrite 2024-01-05?", "January", 5, finish="client_stopped")
    log.serve("Rewrite 2024-01-05?", "05/01/2024", 1)
    log.serve("Rewrite 2024-02-06?", "06/0", 1, correction="February 6, 2024", finish="client_stopped")
    rows, summary = export(tmp_path, log)
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("05/01/2024", False)]
    assert (summary["stopped"], summary["pairs_from_ratings"], summary["pairs_from_corrections"]) == (2, 0, 0)


def test_a_served_conversation_the_preference_file_may_not_hold_is_left_out_and_counted(tmp_path):
    """The API takes two user turns in a row, the preference file does not: written, the row
    would make prepare refuse the file, and every run with it."""
    log = Log(tmp_path / "f.db")
    cid = log.serve("Rewrite 2024-01-05?", "05/01/2024", 1, correction="January 5, 2024")
    log.store._conn.execute("UPDATE interactions SET messages = ? WHERE id = ?", (json.dumps(
        [{"role": "user", "content": "Hello."}, {"role": "user", "content": "Rewrite 2024-01-05?"}]), cid))
    log.store._conn.commit()
    log.serve("Rewrite 2024-02-06?", "06/02/2024", 1, correction="February 6, 2024")
    rows, summary = export(tmp_path, log)
    assert [r["prompt"][-1]["content"] for r in rows] == ["Rewrite 2024-02-06?"]
    assert (summary["invalid"], summary["pairs_from_corrections"]) == (1, 2)


def test_a_correction_pairs_with_the_answer_it_replaces(tmp_path):
    log = Log(tmp_path / "f.db")
    log.serve("Rewrite 2024-01-05?", "05/01/2024", 1, correction="January 5, 2024")
    log.serve("Rewrite 2024-02-06?", "06/02/2024", 4, correction="06/02/2024")  # the same answer: nothing to prefer
    rows, summary = export(tmp_path, log)
    assert rows == [{"prompt": [{"role": "user", "content": "Rewrite 2024-01-05?"}],
                     "chosen": [{"role": "assistant", "content": "January 5, 2024"}],
                     "rejected": [{"role": "assistant", "content": "05/01/2024"}]}]
    assert (summary["pairs_from_corrections"], summary["unchanged_corrections"]) == (1, 1)


def test_every_rated_completion_is_counted_once(tmp_path):
    """Each latest admitted rating is in a row or counted under why it is not: none goes uncounted."""
    log = Log(tmp_path / "f.db")
    log.serve("Q1?", "A1", 5)
    log.serve("Q2?", "A2", 1)
    log.serve("Q3?", "A3", 3)  # middle
    log.serve("Q4?", "A4", 1, correction="Right 4")
    log.serve("Q5?", "A5", 2, correction="A5")  # unchanged
    log.serve("Q6?", "", 5)  # no answer: not a chat
    log.serve("Q7?", "<tool_call>\n{\"name\": \"x\"", 5, finish="invalid_tool_call")  # a broken call rated well
    log.serve("Q1?", "A1 again", 1)  # with Q1's, a pair from ratings: made of two counted completions
    path = log.close()
    _, summary = export(tmp_path, Log(path))
    once = ("desirable", "undesirable", "middle", "pairs_from_corrections", "unchanged_corrections", "not_a_chat",
            "broken_calls")
    assert {k: summary[k] for k in once} == {"desirable": 1, "undesirable": 2, "middle": 1, "pairs_from_corrections": 1,
                                             "unchanged_corrections": 1, "not_a_chat": 1, "broken_calls": 1}
    assert sum(summary[k] for k in once) == len(read_rated(path)) == 8 and summary["pairs_from_ratings"] == 1


def test_two_answers_to_one_prompt_pair_when_their_ratings_differ_enough(tmp_path):
    log = Log(tmp_path / "f.db")
    log.serve("Same question?", "Good answer.", 5)
    log.serve("  same QUESTION? ", "Bad answer.", 1)  # the prompt up to case and whitespace
    log.serve("Close call?", "First.", 4)
    log.serve("Close call?", "Second.", 3)  # a gap of 1: no pair
    rows, summary = export(tmp_path, log)
    pairs = [r for r in rows if "chosen" in r]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("Good answer.", "Bad answer.")]
    assert summary["pairs_from_ratings"] == 1
    assert len([r for r in rows if "label" in r]) == 3  # each rated answer is still a KTO row

    log = Log(tmp_path / "g.db")
    log.serve("Close call?", "First.", 4)
    log.serve("Close call?", "Second.", 3)
    rows, _ = export(tmp_path, log, pair_min_rating_gap=1)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in rows if "chosen" in p] == [("First.", "Second.")]


def test_only_admitted_ratings_become_preferences_and_their_text_is_redacted(tmp_path):
    """Preference tuning learns only from what the feedback export would admit (tasks.feedback.export)."""
    log = Log(tmp_path / "f.db")
    log.serve("Trusted question?", "Trusted answer.", 5)
    log.serve("Untrusted question?", "Untrusted answer.", 1, key="stranger", trusted=False)
    log.serve("Rejected question?", "Rejected answer.", 1, key="other", trusted=False)
    log.serve("Mail me at ann.lee@example.com?", "Call 415-555-0132.", 1)
    log.store.review("rejected", "cli", keys=["other"])
    rows, summary = export(tmp_path, log)
    texts = [r["prompt"][0]["content"] for r in rows]
    assert texts == ["Trusted question?", "Mail me at [EMAIL]?"], texts
    assert not any("ann.lee@example.com" in json.dumps(r) or "415-555-0132" in json.dumps(r) for r in rows)
    assert summary["redacted"]["email"] == 1 and summary["redacted"]["phone"] == 1
    # With auto_approve "all" the pending untrusted rating is admitted too; the rejected one never is.
    assert [r.messages[0]["content"] for r in read_rated(log.store.path, "all")] == [
        "Trusted question?", "Untrusted question?", "Mail me at ann.lee@example.com?"]


def test_a_later_held_rating_does_not_hide_a_trusted_one_and_the_tools_stay_with_the_prompt(tmp_path):
    """An untrusted key's rating, held for approval, of a completion a trusted key rated, leaves
    the trusted rating in force (it cancelled it); a request's tools go with its prompt."""
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time.",
                                               "parameters": {"type": "object"}}}]
    log = Log(tmp_path / "f.db")
    cid = log.serve("Question?", "Answer.", 1)
    log.store.add_feedback(cid, 5, key_name="stranger", trusted=False)  # held: not admitted
    log.store.log_interaction(Interaction("t1", "chat", "m", "1", [{"role": "user", "content": "Time?"}],
                                          "It is noon.", "stop", 3, 2, 1.0, tools=tools))
    log.store.add_feedback("t1", 5, key_name="app", trusted=True)
    rows, _ = export(tmp_path, log)
    assert [(r["prompt"][0]["content"], r["label"]) for r in rows] == [("Question?", False), ("Time?", True)]
    assert "tools" not in rows[0] and rows[1]["tools"] == tools


def test_answers_to_one_prompt_under_other_tools_make_no_pair(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time.",
                                               "parameters": {"type": "object"}}}]
    log = Log(tmp_path / "f.db")
    log.serve("Same question?", "Good answer.", 5)
    log.store.log_interaction(Interaction("t1", "chat", "m", "1", [{"role": "user", "content": "Same question?"}],
                                          "Bad answer.", "stop", 3, 2, 1.0, tools=tools))
    log.store.add_feedback("t1", 1, key_name="app", trusted=True)
    rows, summary = export(tmp_path, log)
    assert summary["pairs_from_ratings"] == 0 and len(rows) == 2


def test_one_unreviewed_untrusted_key_makes_at_most_its_share_of_the_preference_rows(tmp_path):
    """feedback.max_key_share holds for preference data admitted unreviewed (auto_approve: all): its latest rows kept."""
    log = Log(tmp_path / "f.db")
    for i in range(8):
        log.serve(f"Trusted {i}?", f"Answer {i}.", 5)
    for i in range(6):
        log.serve(f"Stranger {i}?", f"Reply {i}.", 1, key="stranger", trusted=False)
    out = tmp_path / "preference.jsonl"
    summary = export_preference(log.close(), out, PreferenceParams(), auto_approve="all", max_key_share=0.2)
    texts = [json.loads(line)["prompt"][0]["content"] for line in out.read_text().splitlines()]
    assert texts == [f"Trusted {i}?" for i in range(8)] + ["Stranger 4?", "Stranger 5?"]  # 2 of the 10 kept
    assert summary["capped"] == 4
    assert export_preference(log.store.path, out, PreferenceParams(), auto_approve="all", max_key_share=0.1)["capped"] == 6  # 1 of 9: over 0.1
    assert export_preference(log.store.path, out, PreferenceParams(), auto_approve="all")["capped"] == 0  # no cap: 1.0


def test_ratings_a_person_approved_are_not_capped_an_open_services_among_them(tmp_path):
    """Every caller of a service without keys is the one untrusted key `anonymous`: capped among the
    preference rows, the stage's whole data, none of its approved ratings was kept."""
    log = Log(tmp_path / "f.db")
    for i in range(12):
        log.serve(f"Question {i}?", f"Answer {i}.", 5 if i % 2 else 1, key="anonymous", trusted=False)
    db, out = log.close(), tmp_path / "preference.jsonl"
    assert export_preference(db, out, PreferenceParams(), max_key_share=0.1)["examples"] == 0  # held for review
    assert export_preference(db, out, PreferenceParams(), auto_approve="all", max_key_share=0.1)["capped"] == 12
    store = FeedbackStore(db)
    store.review("approved", "cli")
    store.close()
    summary = export_preference(db, out, PreferenceParams(), max_key_share=0.1)
    assert (summary["examples"], summary["capped"]) == (12, 0)



def test_the_cap_keeps_a_keys_latest_rows_by_time_pairs_from_ratings_among_them(tmp_path):
    log = Log(tmp_path / "f.db")
    for i in range(8):
        log.serve(f"Trusted {i}?", f"Answer {i}.", 5)
    log.serve("Early?", "Good.", 5, key="stranger", trusted=False)
    log.serve("Early?", "Bad.", 1, key="stranger", trusted=False)  # a pair from ratings, the stranger's oldest rows
    for i in range(3):
        log.serve(f"Late {i}?", f"Reply {i}.", 1, key="stranger", trusted=False)
    out = tmp_path / "preference.jsonl"
    summary = export_preference(log.close(), out, PreferenceParams(), auto_approve="all", max_key_share=0.12)  # 1 of 9 rows
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    strangers = [r for r in rows if not r["prompt"][0]["content"].startswith("Trusted")]
    assert [(r["prompt"][0]["content"], "chosen" in r) for r in strangers] == [("Late 2?", False)]
    assert summary["capped"] == 5


def test_rows_redaction_drops_do_not_count_toward_a_keys_share(tmp_path):
    """With `redaction: drop` the cap is applied to the rows that are written: a key's latest
    row dropped for personal data leaves its place to the key's next one, as in the supervised export."""
    log = Log(tmp_path / "f.db")
    for i in range(8):
        log.serve(f"Trusted {i}?", f"Answer {i}.", 5)
    for i in range(3):
        log.serve(f"Stranger {i}?", f"Reply {i}.", 1, key="stranger", trusted=False)
    log.serve("Mail me at ann@example.org?", "Reply.", 1, key="stranger", trusted=False)  # the stranger's latest
    out = tmp_path / "preference.jsonl"
    summary = export_preference(log.close(), out, PreferenceParams(), auto_approve="all", redaction="drop", max_key_share=0.2)
    texts = [json.loads(line)["prompt"][0]["content"] for line in out.read_text().splitlines()]
    assert texts == [f"Trusted {i}?" for i in range(8)] + ["Stranger 1?", "Stranger 2?"]  # 2 of the 10 written
    assert summary["redacted"]["examples_dropped"] == 1 and summary["capped"] == 1

def test_two_capped_keys_each_stay_within_the_share_of_what_is_kept():
    """Each key's limit counts the other keys' rows as they are kept, not as they came."""
    from collections import Counter

    from tasks.feedback.export import key_limits

    limits = key_limits(Counter({"a": 10, "b": 10}), 0, 0.3)
    assert limits == {"a": 0, "b": 0}  # two keys and nothing else: either one is half of what is kept
    limits = key_limits(Counter({"a": 10, "b": 10}), 20, 0.3)
    assert all(n <= 0.3 * (20 + sum(limits.values())) for n in limits.values()) and limits["a"] > 0


def test_a_missing_log_exports_nothing(tmp_path):
    out = tmp_path / "preference.jsonl"
    assert export_preference(tmp_path / "none.db", out, PreferenceParams())["examples"] == 0
    assert out.read_text() == ""


def test_read_rated_names_a_file_that_is_no_log(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite")
    from tasks.errors import DataFileError

    with pytest.raises(DataFileError, match="bad.db: not a feedback log"):
        read_rated(bad)


# ------------------------------------------------------------------------------ prepare


def sft_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}


def kto_row(i: int, label: bool, answer: str | None = None) -> dict:
    return {"prompt": [{"role": "user", "content": f"Question {i}?"}],
            "completion": [{"role": "assistant", "content": answer or f"Rated {i}."}], "label": label}


def run_prepare(tmp_path: Path, tok, preference_rows: list | None, **prefs) -> tuple[dict, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(sft_row(i)) + "\n" for i in range(60)))
    pref = tmp_path / "preference.jsonl"
    if preference_rows is not None:
        pref.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in preference_rows))
    params = Params(data=DataParams(path=str(data), max_tokens=256),
                    preference=PreferenceParams(path=str(pref), **prefs))
    out = tmp_path / "prepared"
    return prepare_dataset(None, out, params, tok), out


def read(out: Path, split: str) -> list[dict]:
    path = out / f"{split}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_without_preference_data_prepare_is_as_before(tmp_path, tok):
    stats, out = run_prepare(tmp_path, tok, None)
    assert "preference" not in stats and not (out / f"{TRAIN_SPLIT}.jsonl").exists()
    stats_empty, out_empty = run_prepare(tmp_path / "e", tok, [])  # an export with nothing rated
    assert "preference" not in stats_empty
    assert read(out, "train") == read(out_empty, "train")


def test_preference_rows_are_checked_deduplicated_and_split_by_prompt_hash(tmp_path, tok):
    rows = [kto_row(i, i % 2 == 0) for i in range(60)]
    rows += [kto_row(3, False), kto_row(3, False, "  RATED 3. ")]  # an exact and a near repeat of row 3
    rows += ["{\"prompt\": [], \"label\": true}", {"prompt": [{"role": "user", "content": "Q?"}], "completion": [], "label": True},
             kto_row(61, True, "word " * 400)]  # two invalid rows, one over data.max_tokens
    stats, out = run_prepare(tmp_path, tok, rows, heldout_fraction=0.3, invalid_rows="drop", max_invalid_share=0.05)
    pref = stats["preference"]
    assert pref["rows"] == 65 and pref["invalid"] == 2 and pref["deduplicated"] == 2 and pref["over_token_limit"] == 1
    assert [x["category"] for x in pref["invalid_lines"]] == ["not_a_preference_row", "completion_not_one_answer"]
    train, heldout = read(out, TRAIN_SPLIT), read(out, HELDOUT_SPLIT)
    assert len(train) + len(heldout) == 60 and heldout and train
    held_sft = {prompt_key(e["messages"]) for s in ("val", "test") for e in read(out, s)}
    for row in heldout:
        key = prompt_key(row["prompt"] + row["completion"])
        assert heldout_share(key) < 0.3 or key in held_sft
    for row in train:  # no preference prompt of a supervised held-out split is trained on
        assert prompt_key(row["prompt"] + row["completion"]) not in held_sft
    assert stats["counts"][HELDOUT_SPLIT] == len(heldout)
    assert pref["counts"][TRAIN_SPLIT]["desirable"] + pref["counts"][TRAIN_SPLIT]["undesirable"] == len(train)


def test_an_invalid_preference_row_fails_the_run_by_default_naming_its_line(tmp_path, tok):
    """As every other source: a label written as a string is no KTO row, and not dropped in silence."""
    from tasks.errors import InvalidRowsError, PrepareError

    rows = [kto_row(i, i % 2 == 0) for i in range(20)]
    rows[6] = {**rows[6], "label": "true"}
    with pytest.raises(PrepareError, match=r"preference.jsonl: line 7: not_a_preference_row: .*preference.invalid_rows: drop"):
        run_prepare(tmp_path / "a", tok, rows)
    with pytest.raises(InvalidRowsError, match=r"1 of 20 rows \(5.00%\).*preference.max_invalid_share 0.01"):
        run_prepare(tmp_path / "b", tok, rows, invalid_rows="drop")
    stats, _ = run_prepare(tmp_path / "c", tok, rows, invalid_rows="drop", max_invalid_share=0.1)
    assert stats["preference"]["invalid"] == 1

def test_a_held_out_preference_prompt_is_never_trained_on(tmp_path, tok):
    stats, out = run_prepare(tmp_path, tok, [kto_row(i, True) for i in range(60)], heldout_fraction=0.5)
    held = {prompt_key(r["prompt"] + r["completion"]) for r in read(out, HELDOUT_SPLIT)}
    assert held
    train_keys = {prompt_key(e["messages"]) for e in read(out, "train")}
    assert not held & train_keys
    assert stats["preference"]["supervised_train_left_out"] > 0
    assert stats["counts"]["train"] == len(read(out, "train"))


def test_resolved_settings_carry_the_preference_file_md5(tmp_path):
    pref = tmp_path / "preference.jsonl"
    pref.write_text(json.dumps(kto_row(1, True)) + "\n")
    params = load_params(Path("params.yaml"), {"preference.path": str(pref)})
    resolved = write_resolved(params, tmp_path / "resolved.yaml")
    assert yaml.safe_load(resolved.read_text())["preference"]["md5"] == file_md5(pref)
    assert load_params(resolved).preference.md5 == file_md5(pref)


def test_thresholds_that_overlap_are_refused_naming_both_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="undesirable_max_rating 4 must be below preference.desirable_min_rating 4"):
        PreferenceParams(desirable_min_rating=4, undesirable_max_rating=4)


def test_a_preference_rows_tools_reach_the_tokens_preference_tuning_scores(tmp_path, tok):
    """A rating of an answer to a request with tools is trained under those tools, as the model
    saw them when it answered: they are counted, kept through prepare and rendered for training."""
    from tasks.train.preference import kto_items, pair_items

    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    rows = [{**kto_row(i, i % 2 == 0), "tools": tools} for i in range(40)] + [kto_row(i, True) for i in range(40, 60)]
    rows.append({**kto_row(99, True), "tools": "get_time"})
    stats, out = run_prepare(tmp_path, tok, rows, heldout_fraction=0.0, invalid_rows="drop", max_invalid_share=0.05)
    assert [x["category"] for x in stats["preference"]["invalid_lines"]] == ["bad_tools"]
    train = read(out, TRAIN_SPLIT)
    with_tools = [r for r in train if r.get("tools") == tools]
    asked_with_tools = [r for r in train if int(r["prompt"][0]["content"].split()[1].rstrip("?")) < 40]
    assert with_tools and with_tools == asked_with_tools  # (some prompts are the supervised val and test splits')
    items = kto_items(tok, [with_tools[0], next(r for r in train if "tools" not in r)])
    texts = [tok.decode(item.seq.ids) for item in items]
    assert "get_time" in texts[0] and "get_time" not in texts[1]
    pair = {"prompt": with_tools[0]["prompt"], "chosen": [{"role": "assistant", "content": "Noon."}],
            "rejected": [{"role": "assistant", "content": "No idea."}], "tools": tools}
    [encoded] = pair_items(tok, [pair])
    assert "get_time" in tok.decode(encoded.chosen.ids) and "get_time" in tok.decode(encoded.rejected.ids)


def test_the_tools_of_a_preference_row_have_their_descriptions_redacted():
    from tasks.feedback.preference import redact_preferences

    tools = [{"type": "function", "function": {"name": "escalate", "description": "Mail joe@corp.example.",
                                               "parameters": {"type": "object"}}}]
    row = {"prompt": [{"role": "user", "content": "Escalate it."}], "chosen": [{"role": "assistant", "content": "Yes."}],
           "rejected": [{"role": "assistant", "content": "No."}], "tools": tools}
    [redacted], report = redact_preferences([row])
    assert redacted["tools"][0]["function"]["description"] == "Mail [EMAIL]." and report["email"] == 1
    assert redacted["chosen"] == row["chosen"] and redacted["prompt"] == row["prompt"]
