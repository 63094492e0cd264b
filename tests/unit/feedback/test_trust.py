"""Who may teach the model: held feedback, review, per-key caps, redaction in the export,
erasure and retention, and the CLI that decides without a UI."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from serving.keys import ALL_ROLES, ANONYMOUS, Caller, RateLimiter, feedback_bucket
from tasks.feedback import FeedbackReader, FeedbackStore, Interaction, export_feedback
from tasks.feedback.export import ExportPolicy, pseudonym
from tasks.feedback.review import Decision, apply_decision, describe_batch, held_batch
from tasks.feedback.store import DuplicateCorrection
from tests.support.project import REPO


def _log(store: FeedbackStore, i: int, key: str = "web", user: str | None = None, prompt: str | None = None) -> str:
    store.log_interaction(Interaction(f"c{i}", "chat", "ftllm-chat", "1", [{"role": "user", "content": prompt or f"date {i}"}],
                                      f"answer {i}", "stop", 3, 2, 1.0, key, user))
    return f"c{i}"


def _export(db, tmp_path, **policy) -> tuple[list[dict], object]:
    out = tmp_path / "out.jsonl"
    exported = export_feedback(db, out, 4, policy=ExportPolicy(**policy))
    return [json.loads(line) for line in out.read_text().splitlines()], exported


@pytest.fixture
def db(tmp_path):
    """Corrections from a trusted key (ops) and from two untrusted ones (web, bot)."""
    path = tmp_path / "feedback.db"
    store = FeedbackStore(path)
    for i in range(6):
        _log(store, i, user=f"u{i % 2}")
    store.add_feedback("c0", 1, "ops fix", key_name="ops", trusted=True)
    for i in (1, 2):
        store.add_feedback(f"c{i}", 1, f"web fix {i}", key_name="web", end_user="ann")
    for i in (3, 4, 5):
        store.add_feedback(f"c{i}", 1, f"bot fix {i}", key_name="bot", end_user=f"made-up-{i}")
    store.close()
    return path


def test_untrusted_feedback_is_held_by_default_and_waits_for_a_later_run(db, tmp_path):
    rows, exported = _export(db, tmp_path)
    assert [r["messages"][-1]["content"] for r in rows] == ["ops fix"]
    assert rows[0]["provenance"] == {"key": "ops", "user": None, "feedback_id": 1}
    assert exported.held == 5 and exported.by_key == {"ops": 1}
    rows, _ = _export(db, tmp_path)  # nothing is lost: the next export holds them again
    assert len(rows) == 1 and held_batch(db, "trusted").per_key == {"web": 2, "bot": 3}
    # a run of another registered model (its service logging to the same file) has none of them to decide
    assert held_batch(db, "trusted", model_name="ftllm-chat").per_key == {"web": 2, "bot": 3}
    assert held_batch(db, "trusted", model_name="ftllm-tools").rows == []
    assert len(_export(db, tmp_path, auto_approve="all")[0]) == 6
    assert _export(db, tmp_path, auto_approve="none")[0] == []


def test_a_decision_per_key_admits_only_that_key(db, tmp_path):
    batch = held_batch(db, "trusted")
    assert apply_decision(db, batch, Decision(approve_keys=("web",), reject_keys=("bot",), reviewer="ann")) == {
        "approved": 2, "rejected": 3, "held": 0}
    rows, exported = _export(db, tmp_path)
    assert sorted(r["messages"][-1]["content"] for r in rows) == ["ops fix", "web fix 1", "web fix 2"]
    assert exported.held == 0 and exported.by_key == {"ops": 1, "web": 2} and exported.users == 1
    assert _export(db, tmp_path, auto_approve="all")[1].by_key == {"ops": 1, "web": 2}  # rejected stays out
    assert exported.rejected == 3  # counted, so what was left out adds up


def test_a_key_named_for_rejection_is_rejected_even_when_all_is_approved(db, tmp_path):
    """The approval form has both fields: ticking "approve all" must not admit a key the reviewer rejected."""
    batch = held_batch(db, "trusted")
    assert apply_decision(db, batch, Decision(approve_all=True, reject_keys=("bot",))) == {
        "approved": 2, "rejected": 3, "held": 0}
    assert _export(db, tmp_path)[1].by_key == {"ops": 1, "web": 2}


def test_a_decision_covers_only_the_batch_that_was_shown(db, tmp_path):
    batch = held_batch(db, "trusted")
    store = FeedbackStore(db)
    store.add_feedback("c5", 1, "late fix", key_name="web")  # posted while the form was open
    store.close()
    assert apply_decision(db, batch, Decision(approve_all=True))["approved"] == 5
    assert [r.correction for _, r in held_batch(db, "trusted").rows] == ["late fix"]


def test_the_form_describes_the_batch(db):
    text = describe_batch(held_batch(db, "trusted"))
    assert "5 rows from 2 key(s)" in text and "| bot | 3 | 3 | 3 |" in text and "| web | 2 | 2 | 1 |" in text
    assert "Largest contributor: **bot** with 3 of 5 rows (60%)" in text
    assert "| web | date 1 | answer 1 | web fix 1 |" in text and "Nothing to redact." in text


def test_the_forms_samples_show_the_call_a_correction_replaces(tmp_path):
    """An answer that was only a call showed as an empty cell: the reviewer could not see what
    the correction replaces."""
    db = tmp_path / "feedback.db"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                               "parameters": {"type": "object"}}}]
    store = FeedbackStore(db)
    store.log_interaction(Interaction("c0", "chat", "m", "1", [{"role": "user", "content": "weather in Bergen?"}],
                                      "", "tool_calls", 3, 2, 1.0, "web", tools=tools, tool_calls=[call]))
    store.add_feedback("c0", 1, "It rains in Bergen.", key_name="web")
    store.close()
    text = describe_batch(held_batch(db, "trusted"))
    assert '| web | weather in Bergen? | get_weather({"city": "Bergen"}) | It rains in Bergen. |' in text
    store = FeedbackStore(db)  # arguments masked by their keys, as the export masks them
    texting = {**call, "function": {"name": "send", "arguments": '{"to": "4155550134", "via": "WhatsApp"}'}}
    store.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "text Ann"}],
                                      "", "tool_calls", 3, 2, 1.0, "web", tools=tools, tool_calls=[texting]))
    store.add_feedback("c1", 1, "Sent.", key_name="web")
    store.close()
    text = describe_batch(held_batch(db, "trusted"))
    assert "4155550134" not in text and 'send({"to": "[PHONE]", "via": "WhatsApp"})' in text


def test_the_forms_samples_show_no_secret_or_personal_data(tmp_path):
    """The form's text is kept by Prefect (the paused run) and printed by `ftllm feedback pending`:
    its samples are masked as the export masks them."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    store.log_interaction(Interaction("c0", "chat", "m", "1", [{"role": "user", "content": "Mail ann.smith@example.com"}],
                                      "Call +44 20 7946 0958", "stop", 3, 2, 1.0, "web"))
    store.add_feedback("c0", 1, "EVIL ANSWER sk-proj-ZZZZyyyyXXXXwwww1111", key_name="web")
    store.close()
    text = describe_batch(held_batch(db, "trusted"))
    for secret in ("ann.smith", "7946", "sk-proj-ZZZZ"):
        assert secret not in text, secret
    assert "[EMAIL]" in text and "EVIL ANSWER [SECRET]" in text

def test_the_form_counts_what_redaction_will_mask_in_calls_too(tmp_path):
    """The form's redaction figures are the export's: a call's arguments are searched as its text is."""
    tools = [{"type": "function", "function": {"name": "send_mail", "description": "Send an e-mail.",
                                               "parameters": {"type": "object"}}}]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "send_mail", "arguments": '{"to": "ann@example.org"}'}}]
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    store.log_interaction(Interaction("c0", "chat", "m", "1", [{"role": "user", "content": "Mail Ann"}], "",
                                      "tool_calls", 3, 2, 1.0, "web", tools=tools, tool_calls=calls))
    store.add_feedback("c0", 5, key_name="web")
    store.close()
    assert "1 of 1 rows hold secrets or personal data, masked (or dropped, by feedback.redaction) before training: email 1" \
        in describe_batch(held_batch(db, "trusted"))
    store = FeedbackStore(db)  # a correction of an answer that held an address: the rejected side is written too
    store.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "Who?"}],
                                      "Write to bo@example.org", "stop", 3, 2, 1.0, "web"))
    store.add_feedback("c1", 1, "Nobody.", key_name="web")
    store.close()
    assert "2 of 2 rows hold secrets or personal data" in describe_batch(held_batch(db, "trusted"))


def test_one_untrusted_key_is_capped_to_its_share_of_the_run(db, tmp_path):
    rows, exported = _export(db, tmp_path, auto_approve="all", max_key_share=0.1, other_examples=14)
    # 14 other examples and 6 of feedback: bot (3) and web (2) keep 1 each, their latest (a second would be
    # 2 of 18, over 0.1); the trusted key is not capped
    assert exported.by_key == {"bot": 1, "ops": 1, "web": 1} and exported.capped == 3
    assert [r["messages"][-1]["content"] for r in rows if r["provenance"]["key"] == "bot"] == ["bot fix 5"]
    # Each feedback example trained 4 times (data.feedback_weight): a key's one example is 4 of at most
    # 14 + 4 x 4 = 30 rows, over 0.1, so none is kept; with 60 other examples, 2 each (8 of at most 80 rows).
    _, exported = _export(db, tmp_path, auto_approve="all", max_key_share=0.1, other_examples=14, weight=4.0)
    assert exported.by_key == {"ops": 1} and exported.capped == 5
    _, exported = _export(db, tmp_path, auto_approve="all", max_key_share=0.1, other_examples=60, weight=4.0)
    assert exported.by_key == {"bot": 2, "ops": 1, "web": 2}


def test_the_cap_counts_the_examples_written_not_the_repeats_left_out(tmp_path):
    """Many users rating the same answer make one example: a cap counted before the repeats were
    left out let a key keep three times its share."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for i in range(18):  # 18 users of the trusted front end ask the same and rate the same answer
        store.log_interaction(Interaction(f"h{i}", "chat", "m", "1", [{"role": "user", "content": "Opening hours?"}],
                                          "Nine to five.", "stop", 3, 2, 1.0, "ops", f"u{i}"))
        store.add_feedback(f"h{i}", 5, key_name="ops", end_user=f"u{i}", trusted=True)
    for i in range(10):
        store.add_feedback(_log(store, i, key="bot"), 1, f"bot fix {i}", key_name="bot")
    store.close()
    _, exported = _export(db, tmp_path, auto_approve="all", max_key_share=0.1, other_examples=9)
    # 9 other examples and 1 of ops: bot may keep 1 (1 of 11); counted with the 17 repeats, it kept 3 (3 of 13)
    assert exported.repeats == 17 and exported.by_key == {"bot": 1, "ops": 1} and exported.capped == 9


def test_an_untrusted_key_repeating_a_trusted_example_does_not_push_it_out(tmp_path):
    """The same example from a trusted and a later untrusted key: the trusted copy is the one
    kept, so the untrusted key's cap cannot drop it."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for cid, key in (("t0", "ops"), ("b0", "bot")):
        store.log_interaction(Interaction(cid, "chat", "m", "1", [{"role": "user", "content": "Opening hours?"}],
                                          "Nine to five.", "stop", 3, 2, 1.0, key))
        store.add_feedback(cid, 5, key_name=key, trusted=key == "ops")
    for i in range(1, 4):
        store.add_feedback(_log(store, i, key="bot"), 5, key_name="bot")
    store.close()
    rows, exported = _export(db, tmp_path, auto_approve="all", max_key_share=0.1, other_examples=9)
    assert ("ops", "Nine to five.") in [(r["provenance"]["key"], r["messages"][-1]["content"]) for r in rows]
    assert exported.repeats == 1 and exported.by_key == {"bot": 1, "ops": 1}


def test_the_trusted_copy_of_a_repeat_takes_the_latest_repeats_place(tmp_path):
    """Of several corrections of one prompt the last in the file wins (the data merge): keeping a
    trusted copy before an untrusted repeat must not move it back behind an older correction."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for cid, key, fix in (("c1", "ops", "Canberra."), ("c2", "ops", "Canberra, since 1913."), ("c3", "bot", "Canberra.")):
        store.log_interaction(Interaction(cid, "chat", "m", "1", [{"role": "user", "content": "Capital of Australia?"}],
                                          "Sydney.", "stop", 3, 2, 1.0, key))
        store.add_feedback(cid, 1, fix, key_name=key, trusted=key == "ops")
    store.close()
    rows, exported = _export(db, tmp_path, auto_approve="all")
    assert [(r["provenance"]["key"], r["messages"][-1]["content"]) for r in rows] == [
        ("ops", "Canberra, since 1913."), ("ops", "Canberra.")]
    assert exported.repeats == 1


def test_a_correction_outlives_a_later_rating_and_feedback_no_example_holds_is_counted(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    _log(store, 0, key="ops")
    store.add_feedback("c0", 1, "On Feb 20, 2006.", key_name="ops", end_user="A", trusted=True)
    store.add_feedback("c0", 2, key_name="ops", end_user="B", trusted=True)  # another user's thumbs down, later
    store.log_interaction(Interaction("c1", "chat", "m", "1", [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Hel"}],
                                      "lo!", "stop", 3, 2, 1.0, "ops"))  # a client continuing the assistant's turn
    store.add_feedback("c1", 1, "Hello!", key_name="ops", trusted=True)
    store.close()
    rows, exported = _export(db, tmp_path)
    assert [r["messages"][-1]["content"] for r in rows] == ["On Feb 20, 2006."]
    assert exported.not_a_chat == 1 and exported.held == 0  # the superseded rating is admitted, not held
    # An untrusted key's correction of the same answer, approved later, does not replace the operator's.
    store = FeedbackStore(db)
    store.add_feedback("c0", 1, "20/02/2006", key_name="web", end_user="C")
    store.close()
    rows, _ = _export(db, tmp_path, auto_approve="all")
    assert [r["messages"][-1]["content"] for r in rows] == ["On Feb 20, 2006."]


def test_every_feedback_row_is_in_an_example_or_counted_under_one_reason(tmp_path):
    """Nothing leaves the loop without a count: the export's examples and its left-out counts add
    up to the log's feedback rows, whatever mix of reasons the log holds."""
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)

    def ask(cid, prompt, key="ops", user=None, answer="An answer.", finish="stop", history=()):
        store.log_interaction(Interaction(cid, "chat", "m", "1", [*history, {"role": "user", "content": prompt}],
                                          answer, finish, 3, 2, 1.0, key, user))
        return cid

    ops = {"key_name": "ops", "trusted": True}
    store.add_feedback(ask("a", "Q a?"), 1, "Fixed a.", **ops)  # an example
    store.add_feedback(ask("b", "Q b?"), 5, **ops)  # an example
    store.add_feedback(ask("c", "Q c?"), 2, **ops)  # rated low
    store.add_feedback(ask("d", "Q d?", key="web"), 1, "Fix d.", key_name="web")  # held
    store.add_feedback(ask("e", "Q e?", key="web"), 1, "Fix e.", key_name="web")
    store.review("rejected", "t", ids=[5])  # rejected
    store.add_feedback(ask("f", "Q f?"), 1, "Fixed f.", **ops)
    store.add_feedback("f", 4, **ops)  # superseded by the correction
    store.log_interaction(Interaction("g", "chat", "m", "1", [{"role": "user", "content": "Hi"},
                                                             {"role": "assistant", "content": "Hel"}],
                                      "lo", "stop", 3, 2, 1.0, "ops"))
    store.add_feedback("g", 1, "Hello!", **ops)  # no example: not a chat
    store.add_feedback(ask("h", "Q h?", answer='<tool_call>\n{"na', finish="invalid_tool_call"), 5, **ops)  # broken call
    store.add_feedback(ask("i", "Q i?", user="gone"), 5, **ops)
    store.forget(end_user="gone", reason="request")  # erases i and its feedback
    store.add_feedback(ask("j", "Q i?", user="other"), 5, **ops)  # the erased prompt asked again: erased
    store.add_feedback(ask("k", "Q k?"), 5, **ops)
    store.add_feedback(ask("l", "Q k?"), 5, **ops)  # the same example again: a repeat
    for n in range(4):  # an approved untrusted key: capped to its share
        store.add_feedback(ask(f"m{n}", f"Q m{n}?", key="bot"), 1, f"Fix m{n}.", key_name="bot")
    store.review("approved", "t", keys=["bot"])
    store.add_feedback(ask("n", "Q n?"), 1, "Mail me at ann@example.org.", **ops)  # dropped by redaction
    store.close()
    rows, exported = _export(db, tmp_path, max_key_share=0.2, redaction="drop")
    with sqlite3.connect(db) as conn:
        total = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    counts = {"held": exported.held, "rejected": exported.rejected, "superseded": exported.superseded,
              "rated_low": exported.rated_low, "erased": exported.erased, "invalid_calls": exported.invalid_calls,
              "not_a_chat": exported.not_a_chat, "repeats": exported.repeats, "capped": exported.capped,
              "dropped": exported.redacted["examples_dropped"]}
    assert all(counts.values()), counts  # every reason occurs
    assert exported.examples + sum(counts.values()) == total == 17, (exported.examples, counts, total)


def test_the_export_redacts_and_counts_per_category(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    _log(store, 0, prompt="I am ann@example.com, card 4111 1111 1111 1111")
    _log(store, 1, prompt="2006-02-20")
    store.add_feedback("c0", 1, "call +44 20 7946 0958", key_name="ops", trusted=True)
    store.add_feedback("c1", 1, "February 20, 2006", key_name="ops", trusted=True)
    store.close()
    rows, exported = _export(db, tmp_path)
    assert rows[0]["messages"] == [{"role": "user", "content": "I am [EMAIL], card [CARD]"},
                                   {"role": "assistant", "content": "call [PHONE]"}]
    assert rows[1]["messages"][-1]["content"] == "February 20, 2006"
    assert exported.redacted == {"secret": 0, "email": 1, "iban": 0, "card": 1, "ip": 0, "national_id": 0, "phone": 1,
                                 "examples_changed": 1, "examples_dropped": 0}
    rows, exported = _export(db, tmp_path, redaction="drop")
    assert len(rows) == 1 and exported.redacted["examples_dropped"] == 1


def test_forget_erases_and_no_later_export_holds_the_prompt(db, tmp_path):
    store = FeedbackStore(db)
    assert store.forget(end_user="u1", reason="forget --user u1") == (3, 3)  # c1, c3, c5 and their feedback
    assert store.forget(key_name="ops", reason="forget --key ops") == (0, 1)  # ops' own feedback on c0
    _log(store, 1)  # the same prompt logged again (a replay, a restored backup)
    store.add_feedback("c1", 1, "again", key_name="ops", trusted=True)
    store.close()
    rows, exported = _export(db, tmp_path, auto_approve="all")
    assert sorted(r["messages"][-1]["content"] for r in rows) == ["bot fix 4", "web fix 2"]
    assert exported.erased == 1
    with FeedbackReader(db) as reader:
        assert len(reader.erased_digests()) == 3



def test_forget_a_user_of_one_key_leaves_the_same_id_of_another_key(db, capsys, monkeypatch):
    """End-user ids are each client's own: "u1" of the shop is not "u1" of the web front end."""
    from ftllm.commands.feedback import forget_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)
    _log(store, 7, key="shop", user="u1", prompt="shop question")
    store.add_feedback("c7", 5, key_name="shop", end_user="u1")
    store.close()
    assert forget_command("u1", "nobody", None, False) == 0
    assert "nothing matched --user u1 --key nobody" in capsys.readouterr().out
    assert forget_command("u1", "shop", None, False) == 0
    assert "erased 1 interactions and 1 feedback rows" in capsys.readouterr().out
    with FeedbackReader(db) as reader:
        kept = {(r[0], r[1]) for r in reader.conn.execute("SELECT key_name, end_user FROM interactions")}
        assert len(reader.erased_digests()) == 1
    assert ("web", "u1") in kept and ("shop", "u1") not in kept
    with sqlite3.connect(db) as conn:
        assert [r for (r,) in conn.execute("SELECT reason FROM erasures")] == [f"forget --user {pseudonym('u1')} --key shop"]

def test_forget_before_a_time_with_an_offset_converts_it(db, capsys, monkeypatch):
    """`--before 2026-12-07T22:00:00+02:00` was read as 22:00 UTC, two hours later than meant,
    and erased the rows of those two hours for good."""
    from datetime import UTC, datetime, timedelta, timezone

    from ftllm.commands.feedback import forget_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)  # every row of the fixture is newer
    in_oslo = an_hour_ago.astimezone(timezone(timedelta(hours=2))).replace(tzinfo=None).isoformat()
    assert forget_command(None, None, f"{in_oslo}+02:00", False) == 0
    assert "nothing matched" in capsys.readouterr().out
    assert forget_command(None, None, (an_hour_ago + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S"), False) == 0
    assert "erased 6 interactions" in capsys.readouterr().out  # no offset: UTC, an hour from now


def test_a_damaged_log_is_one_line_naming_it_for_every_command(tmp_path, capsys, monkeypatch):
    """A log with a damaged page (SQLite opens it, then "database disk image is malformed" while
    reading) made `pending`, `export`, `approve` and `forget` print tracebacks and exit 1."""
    from ftllm.commands.feedback import approve_command, export_command, forget_command, pending_command

    damaged = tmp_path / "feedback.db"
    store = FeedbackStore(damaged)
    for i in range(300):
        _log(store, i, prompt="x" * 200 + str(i))
        store.add_feedback(f"c{i}", 1, "fix " * 20, key_name="web")
    store.close()
    data = bytearray(damaged.read_bytes())
    data[8192:10192] = b"\xab" * 2000  # the third page, a table's
    damaged.write_bytes(bytes(data))
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(damaged))
    for command in (lambda: pending_command(), lambda: export_command(tmp_path / "out.jsonl", 4),
                    lambda: approve_command(True, [], False, "ann"), lambda: forget_command(None, "web", None, False)):
        assert command() == 2
        err = capsys.readouterr().err
        assert f"{damaged}: the feedback log is damaged (database disk image is malformed)" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_retention_erases_old_interactions(db, tmp_path):
    store = FeedbackStore(db)
    store._conn.execute("UPDATE interactions SET created = ? WHERE id IN ('c0', 'c1')", (time.time() - 40 * 86400,))
    store._conn.commit()
    # c0 and c1 are old, but their feedback is new: a run has not read it yet
    assert store.expire(30) == (0, 0) and store.count("interactions") == 6
    store._conn.execute("UPDATE feedback SET created = ? WHERE completion_id IN ('c0', 'c1')", (time.time() - 35 * 86400,))
    store._conn.commit()
    assert store.expire(30) == (2, 2) and store.expire(0) == (0, 0)
    assert store.count("interactions") == 4
    # Erasure by age lists no prompt: the same question asked again today is exported as any other.
    _log(store, 1)
    store.add_feedback("c1", 2, "asked again", key_name="ops", trusted=True)
    store.close()
    rows, exported = _export(db, tmp_path, auto_approve="all")
    assert exported.erased == 0 and "asked again" in [r["messages"][-1]["content"] for r in rows]
    with FeedbackReader(db) as reader:
        assert reader.erased_digests() == set()


def test_a_rating_of_an_old_answer_reaches_the_next_run_before_retention_erases_it(db, tmp_path, monkeypatch):
    """Retention counts from an answer's latest activity: a correction posted today on an answer
    older than the period is exported by the next run, not erased before it."""
    from tasks.feedback import snapshot_feedback

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)
    store.log_interaction(Interaction("late", "chat", "m", "1", [{"role": "user", "content": "2006-02-20"}], "Feb", "stop",
                                      1, 1, 1.0, "ops"))
    store._conn.execute("UPDATE interactions SET created = ? WHERE id = 'late'", (time.time() - 89.9 * 86400,))
    store._conn.commit()
    store.add_feedback("late", 1, "February 20, 2006", key_name="ops", trusted=True)
    store._conn.execute("UPDATE interactions SET created = ? WHERE id = 'late'", (time.time() - 95 * 86400,))  # a run days later
    store._conn.commit()
    store.close()
    out = tmp_path / "data" / "feedback.jsonl"
    snapshot = snapshot_feedback(tmp_path, 4, out, log=lambda _: None, warn=lambda _: None, retention_days=90)
    assert "February 20, 2006" in out.read_text() and snapshot.expired == (0, 0)
    store = FeedbackStore(db)
    store._conn.execute("UPDATE feedback SET created = ? WHERE completion_id = 'late'", (time.time() - 91 * 86400,))
    store._conn.commit()
    assert store.expire(90) == (1, 1)  # once the correction is as old, both go
    # rating an answer again and again keeps it no longer than twice the period
    store.log_interaction(Interaction("kept", "chat", "m", "1", [{"role": "user", "content": "2006-02-21"}], "Feb", "stop",
                                      1, 1, 1.0, "ops"))
    store.add_feedback("kept", 5, key_name="ops", trusted=True)
    store._conn.execute("UPDATE interactions SET created = ? WHERE id = 'kept'", (time.time() - 179 * 86400,))
    store._conn.commit()
    assert store.expire(90) == (0, 0)
    store._conn.execute("UPDATE interactions SET created = ? WHERE id = 'kept'", (time.time() - 181 * 86400,))
    store._conn.commit()
    assert store.expire(90) == (1, 1)
    store.close()


def test_a_log_whose_retention_listed_prompts_exports_them_again_until_a_user_is_forgotten(db, tmp_path):
    """Earlier versions listed the prompts that retention erased: those entries are not read."""
    from tasks.feedback.schema import prompt_digest

    store = FeedbackStore(db)
    digest = prompt_digest([{"role": "user", "content": "date 1"}])
    store._conn.execute("INSERT INTO erasures VALUES (?, 0, 'retention 90 days')", (digest,))
    store._conn.commit()
    store.add_feedback("c1", 5, "asked again", key_name="ops", trusted=True)
    with FeedbackReader(db) as reader:
        assert reader.erased_digests() == set()
    rows, exported = _export(db, tmp_path, auto_approve="all")
    assert exported.erased == 0 and "asked again" in [r["messages"][-1]["content"] for r in rows]
    store.forget(end_user=None, key_name="web", reason="forget --key web")  # c1 was asked through web
    with FeedbackReader(db) as reader:
        assert digest in reader.erased_digests()
    store.close()


def test_one_correction_per_completion_per_key(db):
    store = FeedbackStore(db)
    with pytest.raises(DuplicateCorrection, match="'web' already corrected c1"):
        store.add_feedback("c1", 1, "again", key_name="web")
    assert store.add_feedback("c1", 5, key_name="web")  # a rating alone is fine
    assert store.add_feedback("c1", 1, "other key", key_name="bot")  # another key may correct it
    store.close()


def test_the_rate_limiter_answers_when_to_retry():
    limiter = RateLimiter(3, 60.0)
    assert [limiter.acquire("web", now=t) for t in (0, 1, 2)] == [None, None, None]
    assert limiter.acquire("web", now=10) == 50 and limiter.acquire("bot", now=10) is None
    assert limiter.acquire("web", now=60.5) is None  # the first call left the window


def test_the_rate_limiter_forgets_idle_names_but_not_a_busy_ones_calls():
    """A trusted key's limit is per end user it names: the names idle past the window are dropped."""
    limiter = type("SmallLimiter", (RateLimiter,), {"SWEEP_AT": 4})(2, 60.0)
    limiter.acquire("busy", now=0)
    limiter.acquire("busy", now=100)
    for i in range(3):
        limiter.acquire(f"user-{i}", now=1)
    assert limiter.acquire("late", now=120) is None  # the sweep: every name but the busy one is idle
    assert len(limiter._calls) == 2
    assert limiter.acquire("busy", now=121) is None and limiter.acquire("busy", now=122) == 38


def test_feedback_is_limited_per_client_on_an_open_service_and_per_key_or_user_otherwise():
    """With no key configured every caller is `anonymous`: one client must not use up the
    others' feedback limit, so the bucket is the client's address."""
    limiter = RateLimiter(1, 60.0)
    assert limiter.acquire(feedback_bucket(ANONYMOUS, None, "10.0.0.1"), now=0) is None
    assert limiter.acquire(feedback_bucket(ANONYMOUS, "u-1", "10.0.0.1"), now=1) == 59  # the user id changes nothing
    assert limiter.acquire(feedback_bucket(ANONYMOUS, None, "10.0.0.2"), now=1) is None
    untrusted, trusted = Caller("anonymous", ALL_ROLES), Caller("ops", ALL_ROLES, trusted=True)
    assert feedback_bucket(untrusted, "u-1", "10.0.0.3") == feedback_bucket(untrusted, "u-2", "10.0.0.4")
    assert feedback_bucket(trusted, "u-1", None) != feedback_bucket(trusted, "u-2", None)
    assert feedback_bucket(trusted, None, None) == "ops"


def test_the_cli_approves_and_forgets(db, monkeypatch, capsys):
    from ftllm.commands.feedback import approve_command, forget_command, pending_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    assert pending_command() == 0 and "Largest contributor: **bot**" in capsys.readouterr().out
    assert approve_command(False, ["nobody"], False, "cli") == 2
    assert "no held feedback from that key" in capsys.readouterr().err
    assert approve_command(False, ["web"], False, "cli") == 0
    assert held_batch(db, "trusted").per_key == {"bot": 3}
    assert forget_command(None, None, "not-a-date", False) == 2
    assert forget_command("u0", None, "2026-01-01", False) == 2  # one criterion at a time
    assert forget_command(None, "bot", None, False) == 0 and "erased 0 interactions and 3 feedback rows" in capsys.readouterr().out
    assert forget_command("u0", None, None, False) == 0
    with sqlite3.connect(db) as conn:  # the erasure list outlives the data: it must not name the user
        reasons = [r for (r,) in conn.execute("SELECT reason FROM erasures")]
    assert reasons and "u0" not in str(reasons) and f"forget --user {pseudonym('u0')}" in reasons
    assert forget_command("u0", None, None, False) == 0  # again: nothing left, and it says so
    assert "nothing matched --user u0" in capsys.readouterr().out
    assert forget_command("", None, None, False) == 0 and "nothing matched --user " in capsys.readouterr().out
    # The digest the exports write is the only id a holder of an export has: it erases the user too.
    assert forget_command(pseudonym("u1").upper(), None, None, False) == 0  # as a person may type it
    assert "erased 3 interactions" in capsys.readouterr().out
    left = FeedbackStore(db)
    assert not left.end_users()
    left.close()


@pytest.mark.parametrize(("keys", "reject", "said"), [
    ([], False, "approved 5, rejected 0, held 1"),  # the later row is counted held
    # `--reject --key bot --up-to N` rejected bot's rows posted after N too, which no person
    # had seen and no command can approve again
    (["bot"], True, "approved 0, rejected 3, held 3"),
])
def test_deciding_up_to_the_id_pending_showed_leaves_later_rows_held(db, monkeypatch, capsys, keys, reject, said):
    """A person approves or rejects what `pending` showed them: feedback posted since waits for a look."""
    from ftllm.commands.feedback import approve_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    shown = held_batch(db, "trusted").up_to_id
    store = FeedbackStore(db)
    _log(store, 9)
    store.add_feedback("c9", 1, "posted after the look", key_name="bot")
    store.close()
    assert approve_command(not keys, keys, reject, "ann", up_to=shown) == 0
    assert said in capsys.readouterr().out
    assert [r.correction for _, r in held_batch(db, "trusted").rows if r.key_name == "bot"] == ["posted after the look"]


def test_approving_from_the_command_line_approves_the_project_models_feedback_only(db, monkeypatch, capsys):
    """`ftllm feedback approve --all` in the dates project approved the tools service's held rows
    too (one log for both), which the tools model then trained on: no one had looked at them as its."""
    from ftllm.commands.feedback import approve_command, pending_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)
    store.log_interaction(Interaction("t0", "chat", "ftllm-tools", "1", [{"role": "user", "content": "Time?"}],
                                      "", "tool_calls", 3, 2, 1.0, "web"))
    store.add_feedback("t0", 1, "It is 20:03.", key_name="web")
    store.close()
    capsys.readouterr()
    assert pending_command() == 0 and "Held feedback: 5 rows" in capsys.readouterr().out  # the project's model's
    assert approve_command(True, [], False, "ann") == 0
    assert "approved 5, rejected 0, held 0" in capsys.readouterr().out
    assert [i.id for i, _ in held_batch(db, "trusted").rows] == ["t0"]  # the tools model's, still held
    monkeypatch.setenv("FTLLM_PARAMS", str(REPO / "params.tools.yaml"))  # its settings decide it
    assert approve_command(True, [], False, "ann") == 0 and held_batch(db, "trusted").rows == []


def test_rejecting_a_key_stops_its_trusted_rows_too(db, tmp_path, monkeypatch, capsys):
    """A trusted key's feedback is admitted when posted; a key found compromised later must be
    stoppable without erasing its rows: `--reject --key` rejects every undecided row of it."""
    from ftllm.commands.feedback import approve_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    assert [r["messages"][-1]["content"] for r in _export(db, tmp_path)[0]] == ["ops fix"]
    assert approve_command(False, ["ops", "bot"], True, "cli") == 0
    assert "approved 0, rejected 4, held 2" in capsys.readouterr().out  # web's stay held
    rows, exported = _export(db, tmp_path, auto_approve="all")  # not even "approve everything" takes them back
    assert [r["messages"][-1]["content"] for r in rows] == ["web fix 1", "web fix 2"] and exported.rejected == 4
    assert approve_command(False, ["ops"], True, "cli") == 2  # nothing undecided is left: said, not silent
    assert "no undecided feedback from that key" in capsys.readouterr().err
    store = FeedbackStore(db)
    assert store.count("feedback") == 6  # kept in the log, never trained
    store.close()


def test_a_runs_snapshot_tags_its_mlflow_run_with_the_provenance(db, tmp_path, monkeypatch):
    import mlflow

    from tasks.feedback import snapshot_feedback
    from tasks.registry.tracking import set_run_tags

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)
    store.log_interaction(Interaction("old", "chat", "m", "1", [{"role": "user", "content": "old"}], "a", "stop",
                                      1, 1, 1.0, "web"))
    store._conn.execute("UPDATE interactions SET created = 0 WHERE id = 'old'")
    store._conn.commit()
    store.close()
    snapshot = snapshot_feedback(tmp_path, 4, tmp_path / "data" / "feedback.jsonl", log=lambda _: None,
                                 warn=lambda _: None, policy=ExportPolicy(auto_approve="all"), retention_days=30)
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment(f"trust-{time.time_ns()}")).info.run_id
    set_run_tags(run_id, snapshot.mlflow_tags())
    tags = client.get_run(run_id).data.tags
    assert json.loads(tags["feedback.keys"]) == {"bot": 3, "ops": 1, "web": 2}
    assert tags["feedback.end_users"] == "4" and tags["feedback.redacted.email"] == "0"
    assert tags["feedback.examples"] == "6" and tags["feedback.last_feedback_id"] == "6"
    assert (tags["feedback.erased"], tags["feedback.not_a_chat"], tags["feedback.invalid_calls"]) == ("0", "0", "0")
    assert (tags["feedback.expired_interactions"], tags["feedback.expired_feedback"]) == ("1", "0")  # "old", unrated
    with FeedbackReader(db) as reader:  # the retention period erased the year-1970 interaction
        assert reader.interaction_count() == 6


def test_retention_says_how_many_held_rows_it_erased_unreviewed(db, tmp_path, monkeypatch, capsys):
    """Retention does not wait for a review (personal data is not kept because nobody looked), but
    feedback it erases while held is not erased unseen."""
    from ftllm.commands.feedback import forget_command

    store = FeedbackStore(db)
    for table, column in (("interactions", "id"), ("feedback", "completion_id")):
        store._conn.execute(f"UPDATE {table} SET created = ? WHERE {column} IN ('c0', 'c1', 'c3')", (time.time() - 100 * 86400,))
    store._conn.commit()
    # c0: ops' trusted correction (admitted); c1: web's (held); c3: bot's (held)
    assert store.held_expiring(90, "trusted") == 2 and store.held_expiring(90, "none") == 3
    assert store.held_expiring(90, "all") == 0 and store.held_expiring(0, "trusted") == 0
    store.close()
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    assert forget_command(None, None, None, True) == 0
    out = capsys.readouterr().out
    assert "2 of the erased feedback rows were still held for review" in out and "erased 3 interactions" in out
