"""Validation: every error and warning category with its count and lines, token stats, GX, the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from tasks.config import DataParams, ModelParams, Params, TrainParams, render_params
from tasks.data.checks import normalise_example
from tasks.data.formats import to_canonical
from tasks.data.prepare import prepare_dataset
from tasks.data.tokens import TrainingBudget
from tasks.data.validate import validate_dataset
from tasks.errors import ConfigError, DataFileError, PrepareError
from tasks.model.chat import count_tokens, encode_chat, encode_chats
from tasks.model.loading import load_tokenizer, resolve_base
from tasks.train.packing import prepare_batches
from tests.support.families import GEMMA2_TEMPLATE, QWEN3_TEMPLATE
from tests.support.project import REPO

SEED_TASKS = REPO.parent / "shared/data/alpaca_seed_tasks.jsonl"


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(resolve_base(ModelParams()))


def chat(user: str = "What is 2+2?", answer: str = "It is 4.", system: str | None = "Be brief.") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def msgs(*pairs: tuple) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def write(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n" for x in lines))
    return path


GOOD = chat()
# category -> (lines of the file, expected offending line numbers)
ERROR_CASES = {
    "invalid_utf8": ([GOOD, b'{"messages": "\xff\xfe"}', GOOD], [2]),
    "invalid_json": ([GOOD, "{not json", GOOD, '{"messages": [}'], [2, 4]),
    "not_an_object": ([GOOD, "[1, 2]", '"text"', GOOD], [2, 3]),
    "missing_messages": ([GOOD, {"messages": []}, {"messages": "hi"}, {"messages": None}], [2, 3, 4]),
    "message_missing_field": ([GOOD, {"messages": [{"role": "user"}, {"role": "assistant", "content": "x y"}]}, {"messages": [{"content": "q"}, {"role": "assistant", "content": "a b"}]}], [2, 3]),
    "unrecognised_keys": ([GOOD, {**chat(user="q1"), "meta": 1}, {"messages": [{"role": "user", "content": "q2", "lang": "en"}, {"role": "assistant", "content": "ok"}]}], [2, 3]),
    "unknown_role": ([GOOD, msgs(("user", "q"), ("bot", "x"), ("assistant", "ok"))], [2]),
    "bad_content": ([GOOD, msgs(("user", "   "), ("assistant", "ok")), {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "ok"}]}], [2, 3]),
    "no_assistant": ([GOOD, msgs(("system", "s"), ("user", "q"))], [2]),
    "last_not_assistant": ([GOOD, msgs(("user", "q"), ("assistant", "ok"), ("user", "more?"))], [2]),
    "consecutive_same_role": ([GOOD, msgs(("user", "q"), ("user", "q again"), ("assistant", "ok"))], [2]),
    "system_not_first": ([GOOD, msgs(("user", "q"), ("system", "s"), ("assistant", "ok"))], [2]),
    "duplicate": ([GOOD, chat(user="other"), GOOD, GOOD], [3, 4]),
    "near_duplicate": ([GOOD, chat(user="  WHAT is   2+2?"), chat(user="x")], [2]),
    "no_examples": ([], [0]),
}


@pytest.mark.parametrize("category", list(ERROR_CASES))
def test_each_error_category_is_counted_with_its_lines(tmp_path: Path, category: str) -> None:
    lines, expected = ERROR_CASES[category]
    report = validate_dataset(write(tmp_path, lines), fmt="openai" if category != "no_examples" else "auto")
    assert not report.valid
    assert report.errors[category] == len(expected)
    assert report.error_lines[category] == expected
    assert {r["line"] for r in report.error_rows if r["category"] == category} == set(expected)


def test_a_clean_file_is_valid_with_no_errors(tmp_path: Path, tok) -> None:
    report = validate_dataset(write(tmp_path, [chat(user=f"q{i}") for i in range(5)]), DataParams(max_tokens=128), tokenizer=tok)
    assert report.valid and report.errors == {} and report.warnings == {}
    assert report.format == "openai" and report.examples == 5


def logged_answer(answer: str, **fields) -> dict:
    """An assistant message as OpenAI's API returns it (`message.model_dump()`), with `fields` set."""
    empty = {"refusal": None, "annotations": [], "audio": None, "function_call": None, "tool_calls": None}
    return {"role": "assistant", "content": answer, **empty, **fields}


def test_a_logged_api_response_with_empty_response_fields_is_valid_and_trained_without_them(tmp_path: Path, tok) -> None:
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, logged_answer(f"It is {i}.")]} for i in range(3)]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=128), tokenizer=tok)
    assert report.valid and report.errors == {}
    assert to_canonical(lines[0], "openai")[0]["messages"][1] == {"role": "assistant", "content": "It is 0."}


def test_a_null_reasoning_trace_is_no_trace_in_either_spelling(tmp_path: Path, tok) -> None:
    """vLLM's and DeepSeek-style exports write `reasoning_content: null` on an answer without a
    trace: refused as bad_reasoning (with `thinking: null` said to differ from reasoning_content)."""
    lines = [{"messages": [{"role": "user", "content": "q0"}, logged_answer("It is 0.", reasoning_content=None)]},
             {"messages": [{"role": "user", "content": "q1"}, logged_answer("It is 1.", thinking=None)]},
             {"messages": [{"role": "user", "content": "q2"},
                           logged_answer("It is 2.", reasoning_content=None, thinking="Two.")]}]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=128), tokenizer=tok)
    assert report.valid and report.errors == {}
    assert [to_canonical(line, "openai")[0]["messages"][1] for line in lines] == [
        {"role": "assistant", "content": "It is 0."}, {"role": "assistant", "content": "It is 1."},
        {"role": "assistant", "content": "It is 2.", "reasoning_content": "Two."}]


@pytest.mark.parametrize("content", [None, "Let me check."])
@pytest.mark.parametrize("no_calls", [None, []])
def test_a_logged_legacy_function_call_becomes_a_tool_call(content: str | None, no_calls: list | None) -> None:
    # Beside `tool_calls: []` the call was lost: trained as a plain answer, or refused for its null content.
    call = {"name": "get_time", "arguments": '{"city": "Oslo"}'}
    answer = logged_answer(content, function_call=call, tool_calls=no_calls)
    example = {"messages": [{"role": "user", "content": "Time in Oslo?"}, answer]}
    canonical = to_canonical(example, "openai")[0]["messages"][1]
    assert [c["function"] for c in canonical["tool_calls"]] == [call] and "function_call" not in canonical


@pytest.mark.parametrize(("function_call", "why", "on_user"), [
    ({"name": "get_time", "arguments": '{"city": "Rome"}'}, "beside calls in tool_calls", False),
    ("auto", "that is not a call", False),
    ({"name": "get_time", "arguments": '{"city": "Rome"}'}, "on a user message", True),
])  # fmt: skip
def test_a_legacy_function_call_that_cannot_be_the_turns_call_is_refused_not_dropped(
    tmp_path: Path, function_call: object, why: str, on_user: bool
) -> None:
    tool = {"type": "function", "function": {"name": "get_time", "description": "Local time in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]
    answer = logged_answer("Let me check.", function_call=None if on_user else function_call, tool_calls=calls)
    question = {"role": "user", "content": "Time in Oslo?", **({"function_call": function_call, "tool_calls": []} if on_user else {})}
    line = {"messages": [question, answer,
                         {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "20:03"}'},
                         {"role": "assistant", "content": "It is 20:03."}], "tools": [tool]}
    report = validate_dataset(write(tmp_path, [GOOD, line]), fmt="openai")
    assert report.error_lines == {"bad_tool_call": [2]}
    message = next(r["message"] for r in report.error_rows)
    where = 1 if on_user else 2
    assert f"message {where} has a legacy function_call {why}" in message and "write every call once, in tool_calls" in message


@pytest.mark.parametrize("field", [{"refusal": "I can't help with that."}, {"annotations": [{"type": "url_citation"}]},
                                   {"audio": {"id": "audio_1"}}])
def test_a_response_field_with_a_value_is_refused_with_the_fix(tmp_path: Path, field: dict) -> None:
    # The value is on the first answer; the second's empty field does not excuse it.
    lines = [GOOD, {"messages": [{"role": "user", "content": "q"}, logged_answer("ok", **field),
                                 {"role": "user", "content": "and?"}, logged_answer("done")]}]
    report = validate_dataset(write(tmp_path, lines), fmt="openai")
    assert report.error_lines == {"unrecognised_keys": [2]}
    message = next(r["message"] for r in report.error_rows)
    assert f"messages: {next(iter(field))} for format openai" in message and "move a refusal's text to content" in message


def test_over_token_limit_is_a_warning_within_max_drop_fraction_and_an_error_beyond(tmp_path: Path, tok) -> None:
    lines = [chat(user=f"q{i}") for i in range(9)] + [chat(answer="word " * 200)]
    path = write(tmp_path, lines)
    within = validate_dataset(path, DataParams(max_tokens=64, max_drop_fraction=0.1), tokenizer=tok)
    assert within.valid and within.warnings["over_token_limit"] == 1 and within.dropped == 1
    assert [r["line"] for r in within.warning_rows if r["category"] == "over_token_limit"] == [10]
    beyond = validate_dataset(path, DataParams(max_tokens=64, max_drop_fraction=0.05), tokenizer=tok)
    assert not beyond.valid and beyond.errors == {"over_token_limit": 1}
    assert beyond.error_lines["over_token_limit"] == [10]
    assert beyond.token_stats["over_limit_fraction"] == pytest.approx(0.1)


def test_truncate_policy_counts_truncations_instead_of_drops(tmp_path: Path, tok) -> None:
    path = write(tmp_path, [chat(user=f"q{i}") for i in range(3)] + [chat(answer="word " * 200), chat(user="long " * 200)])
    report = validate_dataset(path, DataParams(max_tokens=64, max_drop_fraction=0.5, length_policy="truncate"), tokenizer=tok)
    assert (report.truncated, report.dropped) == (1, 1)  # a prompt over the limit cannot be truncated


def test_warnings_are_counted_with_lines_and_keep_the_file_valid(tmp_path: Path, tok) -> None:
    lines = [GOOD, chat(system=None), msgs(("system", "s"), ("assistant", "hello")), chat(answer="4")]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=128, min_answer_chars=2), tokenizer=tok)
    assert report.valid
    assert report.warnings == {"no_system_message": 1, "no_user_message": 1, "short_answer": 1}
    assert {(r["category"], r["line"]) for r in report.warning_rows} == {
        ("no_system_message", 2), ("no_user_message", 3), ("short_answer", 4)
    }  # fmt: skip


def test_token_stats_match_the_chat_template_count_and_estimate_steps(tmp_path: Path, tok) -> None:
    examples = [chat(user=f"Question number {i}?", answer="An answer " * (i + 1)) for i in range(20)]
    report = validate_dataset(
        write(tmp_path, examples), DataParams(max_tokens=512), tokenizer=tok, budget=TrainingBudget(2, 64, 100)
    )
    totals = [count_tokens(tok, normalise_example(e)["messages"])[0] for e in examples]  # as prepare writes them
    stats = report.token_stats
    assert set(stats["total_tokens"]) == {"min", "max", "mean", "median", "p5", "p95"}
    assert (stats["total_tokens"]["min"], stats["total_tokens"]["max"]) == (min(totals), max(totals))
    assert stats["tokens_per_epoch"] == sum(totals)
    assert stats["steps_per_epoch"] == -(-sum(totals) // (2 * 64))
    assert stats["epochs"] == pytest.approx(100 / stats["steps_per_epoch"], rel=1e-3)
    assert stats["messages_per_example"]["median"] == 3


def test_validation_prepare_and_training_count_the_same_trained_tokens(tmp_path: Path, tok) -> None:
    examples = [chat(user=f"Rewrite 2020-01-{i:02d} ", answer=f"  January {i}, 2020") for i in range(1, 21)]
    examples.append(msgs(("user", "a"), ("assistant", "b c"), ("user", "d"), ("assistant", "e f")))
    path = write(tmp_path, examples)
    report = validate_dataset(path, DataParams(max_tokens=512), tokenizer=tok)
    stats = prepare_dataset(path, tmp_path / "prepared", Params(data=DataParams(path=str(path), max_tokens=512), train=TrainParams(seq_len=512)), tok)
    rows = [json.loads(x) for s in ("train", "val", "test") for x in (tmp_path / "prepared" / f"{s}.jsonl").read_text().splitlines()]
    labelled = sum(b.trained_tokens for b in prepare_batches(tok, rows, TrainParams(seq_len=512)))
    assert report.token_stats["trained_tokens_per_epoch"] == labelled
    assert sum(c for c in stats["counts"].values()) == 21
    # Each answer is trained on with its end-of-turn token, the one that stops generation.
    enc = encode_chat(tok, rows[0]["messages"])
    trained = [t for t, m in zip(enc.input_ids, enc.loss_mask) if m]
    assert tok.decode(trained) == rows[0]["messages"][-1]["content"] + "<|im_end|>"


def test_examples_without_trained_tokens_are_errors_with_their_lines(tmp_path: Path, tok) -> None:
    qwen3 = tok.__class__.from_pretrained(tok.name_or_path)
    qwen3.chat_template = QWEN3_TEMPLATE  # rewrites an answer that carries its reasoning inline
    lines = [GOOD, chat(answer="<think>plan</think>"), chat(user="x"), chat(user="y", answer="<think>z</think>")]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=128), tokenizer=qwen3)
    assert not report.valid and report.errors == {"no_trained_tokens": 2}
    assert report.error_lines["no_trained_tokens"] == [2, 4]
    assert report.bad_examples == {1, 3}


def test_an_answer_the_template_rewrites_is_an_error_unless_it_is_not_trained(tmp_path: Path, tok) -> None:
    spelling = tok.__class__.from_pretrained(tok.name_or_path)
    spelling.chat_template = (  # ChatML that rewrites one word of the answers
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | replace('colour', 'color'))"
        " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    rewritten = msgs(("user", "q"), ("assistant", "The colour is red."), ("user", "again"), ("assistant", "fine"))
    path = write(tmp_path, [GOOD, rewritten])
    report = validate_dataset(path, DataParams(max_tokens=128), tokenizer=spelling)
    assert report.errors == {"answer_not_located": 1} and report.error_lines["answer_not_located"] == [2]
    assert "set weight 0 on them" in report.error_rows[0]["message"] and report.unusable_examples == 1
    with pytest.raises(PrepareError, match=r"line 2: answer_not_located"):  # prepare refuses it too
        prepare_dataset(None, tmp_path / "out", Params(data=DataParams(sources=[{"path": str(path)}], max_tokens=128),
                                                       train=TrainParams(seq_len=128)), spelling)
    # Not trained, so nothing is lost: as context (weight 0), or before the last turn under train_turns: last.
    weighted = {"messages": [*rewritten["messages"][:1], {**rewritten["messages"][1], "weight": 0}, *rewritten["messages"][2:]]}
    assert validate_dataset(write(tmp_path, [GOOD, weighted]), DataParams(max_tokens=128), tokenizer=spelling).valid
    last_only = validate_dataset(path, DataParams(max_tokens=128), tokenizer=spelling, budget=TrainingBudget(train_turns="last"))
    assert last_only.valid and "answer_not_located" not in last_only.errors


def test_an_inline_trace_the_template_takes_out_is_a_lost_trace_and_its_answer_is_trained(tmp_path: Path, tok) -> None:
    qwen3 = tok.__class__.from_pretrained(tok.name_or_path)
    qwen3.chat_template = QWEN3_TEMPLATE  # drops the reasoning of answers before the last question
    inline = msgs(("user", "q"), ("assistant", "<think>plan</think>ok"), ("user", "again"), ("assistant", "fine"))
    path = write(tmp_path, [GOOD, inline])
    report = validate_dataset(path, DataParams(max_tokens=128), tokenizer=qwen3)
    assert report.errors == {"reasoning_dropped": 1} and report.error_lines["reasoning_dropped"] == [2]
    enc = encode_chat(qwen3, inline)
    assert qwen3.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m]).startswith("ok<|im_end|>")
    untraced = validate_dataset(path, DataParams(max_tokens=128), tokenizer=qwen3, budget=TrainingBudget(train_reasoning=False))
    assert untraced.valid  # the answer is located and trained (no answer_not_located)


def test_system_messages_are_reported_merged_for_a_template_that_refuses_them(tmp_path: Path, tok) -> None:
    gemma = tok.__class__.from_pretrained(tok.name_or_path)
    gemma.chat_template = GEMMA2_TEMPLATE
    path = write(tmp_path, [GOOD, chat(user="x", system=None), chat(user="y")])
    report = validate_dataset(path, DataParams(max_tokens=128), tokenizer=gemma)
    assert report.valid, report.error_rows
    assert report.system_message == {
        "policy": "auto", "action": "merge", "examples": 2,
        "reason": "raises 'System role not supported' on a system message",
    }  # fmt: skip
    with pytest.raises(ConfigError, match=r"System role not supported.*data.system_message=keep.*merge"):
        validate_dataset(path, DataParams(max_tokens=128, system_message="keep"), tokenizer=gemma)


def test_a_line_nested_thousands_deep_is_invalid_json(tmp_path: Path, tok) -> None:
    deep = '{"messages": ' + "[" * 5000 + "]" * 5000 + "}"
    report = validate_dataset(write(tmp_path, [GOOD, deep, GOOD | {"id": 1}]), fmt="openai", tokenizer=tok)
    assert report.errors["invalid_json"] == 1 and report.error_lines["invalid_json"] == [2]


def test_great_expectations_checkpoint_builds_data_docs(tmp_path: Path, tok) -> None:
    lines = [GOOD, chat(user="x"), msgs(("user", "q"), ("assistant", "a b"), ("user", "again")), GOOD]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=128), tokenizer=tok, data_docs_dir=tmp_path / "gx")
    assert report.data_docs and Path(report.data_docs).name == "index.html" and Path(report.data_docs).is_file()
    assert report.gx["success"] is False and not report.valid
    failed = {e["column"]: e["unexpected_count"] for e in report.gx["expectations"] if not e["success"]}
    assert failed == {"last_role": 1, "is_duplicate": 1}


def test_report_dict_holds_the_json_contract(tmp_path: Path) -> None:
    doc = validate_dataset(write(tmp_path, [GOOD, "oops"])).to_dict()
    for key in ("valid", "format", "examples", "errors", "error_rows", "warnings", "token_stats", "data_docs", "path", "md5", "dropped"):
        assert key in doc
    assert doc["error_rows"] == [{"line": 2, "category": "invalid_json", "message": doc["error_rows"][0]["message"]}]
    json.dumps(doc)


def test_error_rows_are_capped_at_100(tmp_path: Path) -> None:
    report = validate_dataset(write(tmp_path, ["x"] * 150))
    assert report.errors["invalid_json"] == 150 and len(report.error_rows) == 100


@pytest.mark.parametrize("make", [lambda p: p / "nope.jsonl", lambda p: p])
def test_unreadable_path_raises_data_file_error_naming_it(tmp_path: Path, make) -> None:
    with pytest.raises(DataFileError, match=str(make(tmp_path))):
        validate_dataset(make(tmp_path))


def test_seed_tasks_file_validates(tok) -> None:
    if not SEED_TASKS.is_file():
        pytest.skip(f"{SEED_TASKS} is absent (CI puts ../shared beside the repository)")
    report = validate_dataset(SEED_TASKS, DataParams(max_tokens=1024, max_drop_fraction=0.05), tokenizer=tok)
    assert report.valid, report.error_rows[:5]
    assert report.format == "alpaca" and report.examples == 175 and report.errors == {}


# ---------------------------------------------------------------------------- the CLI command


@pytest.fixture
def cli(monkeypatch, tmp_path: Path, tok):
    import ftllm.commands.validate as command

    monkeypatch.setattr(command, "GX_DIR", tmp_path / "gx")
    settings = tmp_path / "params.yaml"  # the models' defaults, whatever the user's params.yaml holds
    settings.write_text(render_params())
    return functools.partial(command.validate_command, params=settings)


def test_cli_invalid_file_exits_1_with_json_naming_category_and_line(cli, tmp_path: Path, capsys) -> None:
    path = write(tmp_path, [GOOD, msgs(("user", "q"), ("assistant", "ok"), ("user", "more"))])
    code = cli(path, json_out=True, report=tmp_path / "out/report.json")
    out = capsys.readouterr().out.strip().splitlines()
    doc = json.loads(out[-1])
    assert code == 1 and doc["valid"] is False
    assert doc["errors"] == {"last_not_assistant": 1}
    assert doc["error_rows"][0]["line"] == 2
    assert json.loads((tmp_path / "out/report.json").read_text())["errors"] == doc["errors"]


def test_cli_valid_file_exits_0_and_prints_a_table(cli, tmp_path: Path, capsys) -> None:
    assert cli(write(tmp_path, [GOOD])) == 0
    out = capsys.readouterr().out
    assert "VALID" in out and "Data Docs:" in out  # the GX checkpoint passed too


@pytest.mark.parametrize("args", [{"path": Path("does/not/exist.jsonl")}, {"path": None, "format": "csv"}])
def test_cli_unreadable_or_usage_error_exits_2_without_traceback(cli, tmp_path: Path, capsys, args) -> None:
    path = args.pop("path") or write(tmp_path, [GOOD])
    assert cli(path, **args) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err + captured.out


def test_cli_fix_writes_only_the_good_examples_in_canonical_form(cli, tmp_path: Path, capsys) -> None:
    good2 = {"instruction": "Name a colour.", "output": "Blue"}
    lines = [{"instruction": "Add 2 and 3.", "output": "5"}, "oops", good2, good2, {"instruction": "x"}]
    fixed = tmp_path / "fixed.jsonl"
    assert cli(write(tmp_path, lines), fix=fixed) == 1
    assert "dropped 3" in capsys.readouterr().out
    kept = [json.loads(x) for x in fixed.read_text().splitlines()]
    assert [e["messages"][0]["content"] for e in kept] == ["Add 2 and 3.", "Name a colour."]
    assert cli(fixed, json_out=True) == 0


def test_train_turns_last_never_trains_an_earlier_turn_in_place_of_a_rewritten_last_one(tok) -> None:
    spelling = tok.__class__.from_pretrained(tok.name_or_path)
    spelling.chat_template = (  # ChatML that rewrites one word of the answers
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | replace('colour', 'color'))"
        " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    conversation = msgs(("user", "q"), ("assistant", "fine"), ("user", "again"), ("assistant", "The colour is red."))
    [enc] = encode_chats(spelling, [conversation], train_turns="last")
    assert enc.trained_tokens == 0 and enc.unlocated == 1  # refused as answer_not_located, "fine" not trained instead
