"""The feedback log's format across versions, its read-only reader, and its export to training data."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import pytest

from tasks.errors import DataFileError
from tasks.feedback import SCHEMA_VERSION, FeedbackReader, FeedbackStore, Interaction, export_feedback
from tasks.feedback.schema import _TABLES_V1
from tests.support.imports import import_closure
from tests.support.project import REPO


def _chat(i: int, prompt: str = "When?") -> Interaction:
    return Interaction(f"c{i}", "/v1/chat/completions", "m", "1", [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"{prompt} {i}"}], f"answer {i}", "stop", 3, 2, 1.0)


def _old_log(db, version: int, messages: list, answer: str) -> sqlite3.Connection:
    """A log as the service of schema `version` left it, with one completion `c0`; open, to add feedback."""
    from tasks.feedback.schema import MIGRATIONS

    old = sqlite3.connect(db)
    for step in range(version):
        old.executescript(MIGRATIONS[step])
    old.execute(f"PRAGMA user_version = {version}")
    old.execute("INSERT INTO interactions (id, created, endpoint, model_name, model_version, messages, answer, "
                "finish_reason, prompt_tokens, completion_tokens, latency_ms) VALUES ('c0', 1, 'chat', 'm', '1', ?, "
                "?, 'stop', 1, 1, 1.0)", (json.dumps(messages), answer))
    return old


def test_a_log_written_before_the_schema_was_versioned_keeps_working(tmp_path):
    db = tmp_path / "feedback.db"
    old = sqlite3.connect(db)  # what the service wrote before: the same tables, no user_version
    old.executescript(_TABLES_V1)
    old.execute("INSERT INTO interactions VALUES ('c0', 1.0, 'chat', 'm', '1', ?, 'a', 'stop', 1, 1, 1.0)",
                (json.dumps([{"role": "user", "content": "hi"}]),))
    old.execute("INSERT INTO feedback (created, completion_id, rating, correction) VALUES (2.0, 'c0', 2, 'hello')")
    old.commit()
    old.close()
    with FeedbackReader(db) as reader:  # readable as it is
        assert [r.correction for r in reader.feedback_since(0)] == ["hello"]
    store = FeedbackStore(db)  # the service opens it: migrated in place, rows kept
    assert store.count("feedback") == 1 and store.add_feedback("c0", 5) == 2
    store.close()
    version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 8
    with FeedbackReader(db) as reader:  # the migration gave the log an identity, kept when it is opened again
        log_id = reader.log_id()
    FeedbackStore(db).close()
    with FeedbackReader(db) as reader:
        assert len(log_id) == 32 and reader.log_id() == log_id
    assert export_feedback(db, tmp_path / "out.jsonl", 4).log_id == log_id  # the run's cursor keeps it


def test_a_rated_tool_call_is_exported_as_the_call_with_its_tools(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
                                               "parameters": {"type": "object"}}}]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_interaction(Interaction("c0", "chat", "m", "1", [{"role": "user", "content": "Time in Oslo?"}], "",
                                      "tool_calls", 3, 2, 1.0, tools=tools, tool_calls=calls))
    store.add_feedback("c0", 5, key_name="app", trusted=True)
    store.close()
    export = export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    [example] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert export.examples == 1 and example["tools"] == tools
    assert example["messages"][-1] == {"role": "assistant", "content": None, "tool_calls": calls}


def test_a_rated_answer_keeps_its_trace_and_a_broken_call_is_not_trained_as_an_answer(tmp_path):
    """A reasoning model's answer is exported with the trace it wrote; a correction is not given
    the trace that led to the wrong answer; a call the service returned as text (finish reason
    `invalid_tool_call` in the log, whatever the client was told) is no answer to learn."""
    from tasks.data.validate import validate_dataset

    store = FeedbackStore(tmp_path / "feedback.db")
    for cid, answer, finish in (("c0", "It is 12 degrees.", "stop"), ("c1", "It is 9 degrees.", "stop"),
                                ("c2", '<tool_call>\n{"name": "get_weather", "argu', "invalid_tool_call")):
        store.log_interaction(Interaction(cid, "chat", "m", "1", [{"role": "user", "content": f"Weather {cid}?"}],
                                          answer, finish, 3, 2, 1.0, reasoning="The tool said so."))
    store.add_feedback("c0", 5, key_name="app", trusted=True)
    store.add_feedback("c1", 1, "It is 10 degrees.", key_name="app", trusted=True)
    store.add_feedback("c2", 5, key_name="app", trusted=True)
    store.close()
    export = export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    finals = [json.loads(line)["messages"][-1] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert finals == [{"role": "assistant", "content": "It is 12 degrees.", "reasoning_content": "The tool said so."},
                      {"role": "assistant", "content": "It is 10 degrees."}]
    assert export.invalid_calls == 1
    assert validate_dataset(tmp_path / "out.jsonl").valid


def test_an_answer_the_client_stopped_is_trained_only_through_its_correction(tmp_path, monkeypatch, capsys):
    store = FeedbackStore(tmp_path / "feedback.db")
    for cid in ("c0", "c1"):
        store.log_interaction(Interaction(cid, "chat", "ftllm-chat", "1", [{"role": "user", "content": f"Rewrite {cid}?"}],
                                          "January", "client_stopped", 3, 2, 1.0))
    store.add_feedback("c0", 5, key_name="app", trusted=True)
    store.add_feedback("c1", 2, "January 5, 2024", key_name="app", trusted=True)
    store.close()
    export = export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    finals = [json.loads(line)["messages"][-1] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert finals == [{"role": "assistant", "content": "January 5, 2024"}]
    assert (export.examples, export.stopped) == (1, 1)
    # and `ftllm feedback export` says why the other rating made no example
    from ftllm.commands.feedback import export_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    capsys.readouterr()
    assert export_command(tmp_path / "cli.jsonl", 4) == 0
    assert "wrote 1 examples" in (said := capsys.readouterr().out) and "left out: 1 stopped by the client mid-answer;" in said


def test_an_answer_a_tool_choice_forced_is_not_taught_as_the_models_own_choice(tmp_path, monkeypatch, capsys):
    """"Weather and time?" forced to call get_time, rated well, was exported as an example that
    teaches the model to call only get_time there of its own accord."""
    from tasks.config import PreferenceParams
    from tasks.feedback.preference import preference_examples, read_rated

    tools = [{"type": "function", "function": {"name": name, "description": f"The {name[4:]} in a city.",
                                               "parameters": {"type": "object"}}} for name in ("get_time", "get_weather")]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]
    ask = [{"role": "user", "content": "Weather and time in Oslo?"}]
    results = [*ask, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "20:03"}]
    store = FeedbackStore(tmp_path / "feedback.db")
    for cid, messages, answer, choice in (
            ("named", ask, "", {"type": "function", "function": {"name": "get_time"}}), ("required", ask, "", "required"),
            ("none", ask, "I cannot look that up.", "none"),  # no call allowed before any result: forced
            ("last-round", results, "It is 20:03 in Oslo.", "none"),  # the answer from the results: the model's own
            ("auto", [{"role": "user", "content": "Time in Oslo?"}], "", None)):
        store.log_interaction(Interaction(cid, "chat", "ftllm-chat", "1", messages, answer, "tool_calls" if not answer else "stop",
                                          3, 2, 1.0, tools=tools, tool_calls=None if answer else calls, tool_choice=choice))
        store.add_feedback(cid, 5, key_name="app", trusted=True)
    store.add_feedback("none", 1, "Let me look it up.", key_name="app", trusted=True)  # corrected, still forced
    store.close()
    with FeedbackReader(tmp_path / "feedback.db") as reader:
        rated, _, _ = reader.rated_completions()
    assert [i.tool_choice for i, _ in rated][:3] == [{"type": "function", "function": {"name": "get_time"}}, "required", "none"]
    export = export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    users = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(users) == ["Time in Oslo?", "Weather and time in Oslo?"]  # auto, and the last round's answer
    assert (export.examples, export.forced) == (2, 3)
    _, counts = preference_examples(read_rated(tmp_path / "feedback.db"), PreferenceParams())
    assert counts["forced"] == 3 and counts["desirable"] == 1  # the last round's answer, rated well
    from ftllm.commands.feedback import export_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "feedback.db"))
    capsys.readouterr()
    assert export_command(tmp_path / "cli.jsonl", 4) == 0
    assert "3 answered under a tool_choice that forced the answer" in capsys.readouterr().out


def test_feedback_on_another_models_answers_is_not_exported_for_this_one(tmp_path):
    """The dates and tools services of one project log to one file: a dates run trained on the
    tools service's corrections, and its result did not say so."""
    from tasks.config import PreferenceParams
    from tasks.feedback.export import ExportPolicy
    from tasks.feedback.preference import export_preference

    store = FeedbackStore(tmp_path / "feedback.db")
    for i, model in enumerate(["ftllm-chat", "ftllm-tools", "ftllm-tools"]):
        store.log_interaction(Interaction(f"c{i}", "chat", model, "1", [{"role": "user", "content": f"{model} {i}?"}],
                                          f"answer {i}", "stop", 3, 2, 1.0))
        store.add_feedback(f"c{i}", 5, key_name="app", trusted=True)
    store.add_feedback("c2", 1, "a better answer", key_name="app", trusted=True)
    store.close()
    db, out = tmp_path / "feedback.db", tmp_path / "out.jsonl"
    dates = export_feedback(db, out, 4, policy=ExportPolicy(model_name="ftllm-chat"))
    assert (dates.examples, dates.other_model) == (1, 3)  # every feedback row counted: 3 on the tools model's answers
    assert [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()] == ["ftllm-chat 0?"]
    assert export_feedback(db, out, 4, policy=ExportPolicy(model_name="ftllm-tools")).examples == 2
    assert export_feedback(db, out, 4).examples == 3  # no model named: the whole log
    preference = export_preference(db, tmp_path / "pref.jsonl", PreferenceParams(), model_name="ftllm-chat")
    assert (preference["examples"], preference["desirable"], preference["pairs_from_corrections"]) == (1, 1, 0)
    assert preference["other_model"] == 2  # counted, as every rated completion is


def test_a_version_7_log_reads_as_answers_no_tool_choice_forced(tmp_path):
    db = tmp_path / "feedback.db"
    old = _old_log(db, 7, [{"role": "user", "content": "Time?"}], "It is 20:03.")
    old.execute("INSERT INTO feedback (created, completion_id, rating, trusted) VALUES (1, 'c0', 5, 1)")
    old.commit()
    old.close()
    assert export_feedback(db, tmp_path / "out.jsonl", 4).examples == 1  # read as it is
    FeedbackStore(db).close()  # migrated: the column is there, empty
    columns = [c[1] for c in sqlite3.connect(db).execute("PRAGMA table_info(interactions)")]
    assert columns[-1] == "tool_choice"
    with FeedbackReader(db) as reader:
        [(interaction, _)], _, _ = reader.rated_completions()
    assert interaction.tool_choice is None and not interaction.forced


def test_feedback_export_writes_over_no_data_but_its_own_earlier_export(tmp_path, monkeypatch, capsys):
    """`ftllm feedback export feedback.db` replaced the log with the export, every interaction and
    review lost; `ftllm feedback export data/dates.jsonl` replaced the data set with 8 lines."""
    from ftllm.commands.feedback import export_command

    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    store.log_interaction(replace(_chat(0), model_name="ftllm-chat"))  # the project's model (params.yaml)
    store.add_feedback("c0", 5, key_name="app", trusted=True)
    store.close()
    data = tmp_path / "dates.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "2016-03-18"}, {"role": "assistant", "content": "x"}]}\n')
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    before = {p: p.read_bytes() for p in (db, data)}
    for out, said in ((db, "that is the feedback log the export reads"), (tmp_path / "feedback.db-wal", "that is the feedback log"),
                      (data, "exists and is not an export of the feedback log"),
                      (tmp_path / "no-such-folder" / "out.jsonl", "does not exist"), (tmp_path, "is a folder")):
        capsys.readouterr()
        assert export_command(out, 4) == 2, out
        assert said in capsys.readouterr().err, out
    assert {p: p.read_bytes() for p in (db, data)} == before and not (tmp_path / "no-such-folder").exists()
    out = tmp_path / "feedback.jsonl"
    assert export_command(out, 1) == 0 and export_command(out, 1) == 0  # its own export again: replaced
    assert len(out.read_text().splitlines()) == 1


def test_a_log_of_a_newer_schema_is_refused_by_name(tmp_path):
    db = tmp_path / "feedback.db"
    FeedbackStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(DataFileError, match=rf"feedback.db: feedback log of schema version {SCHEMA_VERSION + 1}, newer"):
        FeedbackReader(db).__enter__()
    with pytest.raises(ValueError, match="update the project"):
        FeedbackStore(db)


def test_the_export_keeps_corrections_and_good_answers_and_records_the_last_id_it_read(tmp_path):
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for i in range(4):
        store.log_interaction(_chat(i))
    ops = {"key_name": "ops", "trusted": True}     # a trusted key: no approval needed
    store.add_feedback("c0", 1, **ops)                    # poor, uncorrected: left out
    store.add_feedback("c1", 5, **ops)                    # good: kept as answered
    store.add_feedback("c2", 2, "the right answer", **ops)  # corrected: kept, marked
    store.add_feedback("c0", 2, **ops)                    # a later rating of c0 replaces the first; still poor
    store.close()
    out = tmp_path / "data" / "feedback.jsonl"
    exported = export_feedback(db, out, min_rating=4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported.examples == len(rows) == 2
    assert exported.last_feedback_id == 4  # read up to the latest id, the poor rating included
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "answer 1"} and "correction" not in rows[0]
    assert rows[1]["messages"][-1]["content"] == "the right answer" and rows[1]["correction"] is True
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_no_log_yet_exports_nothing_only_when_asked_to(tmp_path):
    missing = tmp_path / "none.db"
    with pytest.raises(FileNotFoundError, match="none.db: no feedback database"):
        export_feedback(missing, tmp_path / "f.jsonl", 4)
    exported = export_feedback(missing, tmp_path / "f.jsonl", 4, missing_ok=True)
    assert (exported.examples, exported.last_feedback_id) == (0, 0)
    assert (tmp_path / "f.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="--min-rating must be from 1 to 5, got 6"):
        export_feedback(missing, tmp_path / "f.jsonl", 6, missing_ok=True)


def test_the_feedback_module_imports_neither_serving_nor_flows():
    files = {f.relative_to(REPO).parts[0] for f in import_closure(REPO, "tasks.feedback")}
    assert "tasks" in files and not files & {"serving", "flows"}


def test_users_who_rate_the_same_answer_to_the_same_question_make_one_example_that_validates(tmp_path):
    """Many users ask alike and get the same greedy answer: exported once (the latest), so the
    source is not refused for duplicates, which would fail every run and never train the feedback."""
    from tasks.data.validate import validate_dataset

    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for i, prompt in enumerate(["When? 1", "When? 1", "when?  1", "When? 2"]):
        store.log_interaction(Interaction(f"c{i}", "/v1/chat/completions", "m", "1",
                                          [{"role": "user", "content": prompt}], "answer 1", "stop", 3, 2, 1.0))
        store.add_feedback(f"c{i}", 5, key_name="ops", trusted=True, end_user=f"user-{i}")
    store.close()
    exported = export_feedback(db, tmp_path / "feedback.jsonl", min_rating=4)
    rows = [json.loads(line) for line in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert (exported.examples, exported.repeats) == (2, 2)
    assert [r["messages"][0]["content"] for r in rows] == ["when?  1", "When? 2"]  # the latest of the three
    assert validate_dataset(tmp_path / "feedback.jsonl").valid


def test_served_conversations_a_data_file_may_not_hold_are_joined_or_counted_not_refused_in_every_run(tmp_path):
    """The API takes several system messages (a framework's and the caller's), one after a turn, and
    two user turns in a row; the export wrote them as they were, and validation refused each line."""
    from tasks.data.validate import validate_dataset

    system, later = {"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in words."}
    user = {"role": "user", "content": "When is 2016-03-18?"}
    requests = {"two systems": [system, later, user], "a system later": [user, {"role": "assistant", "content": "Soon."},
                                                                         later, user],
                "two users": [user, {"role": "user", "content": "Well?"}]}
    db = tmp_path / "feedback.db"
    store = FeedbackStore(db)
    for i, messages in enumerate(requests.values()):
        store.log_interaction(Interaction(f"c{i}", "/v1/chat/completions", "m", "1", messages, "March 18, 2016",
                                          "stop", 3, 2, 1.0))
        store.add_feedback(f"c{i}", 5, key_name="ops", trusted=True)
    store.close()
    exported = export_feedback(db, tmp_path / "out.jsonl", 4)
    [example] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert example["messages"][0] == {"role": "system", "content": "Be brief.\n\nAnswer in words."}
    assert (exported.examples, exported.not_a_chat) == (1, 2)
    assert validate_dataset(tmp_path / "out.jsonl").valid


def test_the_history_a_client_sends_is_context_and_only_the_rated_answer_is_trained(tmp_path):
    """A client writes the earlier assistant turns of its request itself: exported, they carry
    weight 0, so training masks them and only the answer that was rated or corrected is learnt."""
    from tasks.config import ModelParams
    from tasks.model.chat import encode_chats
    from tasks.model.loading import load_tokenizer, resolve_base

    history = [{"role": "user", "content": "Convert 2016-03-18"}, {"role": "assistant", "content": "POISON POISON"},
               {"role": "user", "content": "Convert 2016-03-19"}]
    store = FeedbackStore(tmp_path / "feedback.db")
    store.log_interaction(Interaction("c0", "/v1/chat/completions", "m", "1", history, "March 19, 2016", "stop",
                                      3, 2, 1.0))
    store.add_feedback("c0", 5, key_name="ops", trusted=True)
    store.close()
    export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    [example] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert example["messages"][1] == {"role": "assistant", "content": "POISON POISON", "weight": 0}
    tok = load_tokenizer(resolve_base(ModelParams()))
    [encoded] = encode_chats(tok, [example])
    trained = tok.decode([t for t, m in zip(encoded.input_ids, encoded.loss_mask) if m])
    assert "March 19, 2016" in trained and "POISON" not in trained


def test_a_call_whose_masked_argument_fails_its_schema_is_left_out_not_failing_every_run(tmp_path):
    """Redaction masks an e-mail argument as [EMAIL], which an e-mail `pattern` refuses: the example is
    left out and counted, where it would have made validation refuse the source in every run."""
    from tasks.data.validate import validate_dataset

    tools = [{"type": "function", "function": {"name": "send_mail", "description": "Send an e-mail.", "parameters": {
        "type": "object", "properties": {"to": {"type": "string", "pattern": "^[^@]+@[^@]+$"}}, "required": ["to"]}}}]
    store = FeedbackStore(tmp_path / "feedback.db")
    for i, to in enumerate(["ann@example.org", "bo@example.org"]):
        calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "send_mail", "arguments": json.dumps({"to": to})}}]
        store.log_interaction(Interaction(f"c{i}", "chat", "m", "1", [{"role": "user", "content": f"Mail {i}"}], "",
                                          "tool_calls", 3, 2, 1.0, tools=tools, tool_calls=calls))
        store.add_feedback(f"c{i}", 5, key_name="ops", trusted=True)
    store.log_interaction(_chat(9))
    store.add_feedback("c9", 5, key_name="ops", trusted=True)
    store.close()
    export = export_feedback(tmp_path / "feedback.db", tmp_path / "out.jsonl", 4)
    assert (export.examples, export.invalid_calls, export.redacted["email"]) == (1, 2, 2)
    assert validate_dataset(tmp_path / "out.jsonl").valid


def test_a_version_4_log_is_migrated_and_its_decision_numbers_go_on_above_its_own(tmp_path):
    """Version 4 numbered decisions from the decided rows; version 5 keeps numbering above them,
    or a monitor cursor already past them would miss the next approvals."""
    db = tmp_path / "feedback.db"
    old = _old_log(db, 4, [], "a")
    for decision in (1, 2, 3, None):
        old.execute("INSERT INTO feedback (created, completion_id, rating, review, decision) VALUES (1, 'c0', 2, ?, ?)",
                    ("approved" if decision else "pending", decision))
    old.commit()
    old.close()
    with FeedbackReader(db) as reader:  # read as it is, before anything migrates it
        assert reader.last_decision() == 3 and len(reader.feedback_since(0)) == 4
    assert export_feedback(db, tmp_path / "out.jsonl", 4).examples == 0  # it reads the log (ratings of 2: none)
    store = FeedbackStore(db)
    assert store.review("approved", "cli") == 1
    store.close()
    with FeedbackReader(db) as reader:
        assert reader.last_decision() == 4 and [r.decision for r in reader.feedback_since(0)] == [1, 2, 3, 4]
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8


def test_two_processes_opening_an_old_log_at_once_migrate_it_once(tmp_path):
    import multiprocessing

    from tasks.feedback.schema import MIGRATIONS

    db = tmp_path / "feedback.db"
    old = sqlite3.connect(db)
    old.execute("PRAGMA journal_mode=WAL")  # as the service has always written it
    for version in range(3):
        old.executescript(MIGRATIONS[version])
    old.execute("PRAGMA user_version = 3")
    old.commit()
    old.close()
    context = multiprocessing.get_context("spawn")
    start, errors = context.Barrier(6), context.Queue()
    opened = [context.Process(target=_open_and_close, args=(str(db), start, errors)) for _ in range(6)]
    for process in opened:
        process.start()
    for process in opened:
        process.join(60)
    assert [process.exitcode for process in opened] == [0] * 6, [errors.get() for _ in range(errors.qsize())]
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _open_and_close(path: str, start, errors) -> None:
    start.wait(30)  # all at once
    try:
        FeedbackStore(path).close()
    except Exception as exc:
        errors.put(repr(exc))
        raise
