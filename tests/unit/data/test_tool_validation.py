"""Validation of tool calling, weights and reasoning traces: each category with its lines.

At least as strict as mistral-finetune: tool schemas, call ids, declared tools, arguments
(a JSON object that the tool's schema accepts), a result per pending call, 0/1 weights on
assistant messages only. The categories flow like every other one: the report, `--fix`,
and a source's `invalid_rows` policy. ShareGPT's `function_call`/`observation` turns and
OpenAI's legacy `function_call` become tool calls, and reasoning keys are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import DataParams, ModelParams, Params, TrainParams
from tasks.data.checks import iter_checked
from tasks.data.prepare import prepare_dataset
from tasks.data.tokens import TrainingBudget
from tasks.data.validate import validate_dataset, write_fixed
from tasks.errors import PrepareError
from tasks.model.loading import load_tokenizer, resolve_base
from tests.support.project import REPO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_base(ModelParams()))


def tool(name: str = "get_time", description: str | None = "The local time in a city.", parameters=None) -> dict:
    function = {"name": name, "parameters": parameters if parameters is not None else {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False,
    }}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def call(arguments: str = '{"city": "Oslo"}', name: str = "get_time", call_id: str | None = "call00001") -> dict:
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return c if call_id is None else {"id": call_id, **c}


def example(calls: list | None = None, results: list | None = None, tools: list | None = None, answer_weight=None,
            user_weight=None, **extra) -> dict:
    calls = [call()] if calls is None else calls
    results = [{"role": "tool", "tool_call_id": "call00001", "content": "20:03"}] if results is None else results
    user = {"role": "user", "content": f"What time is it in Oslo? {extra.pop('tag', '')}".strip()}
    if user_weight is not None:
        user["weight"] = user_weight
    answer = {"role": "assistant", "content": "It is 20:03 in Oslo."}
    if answer_weight is not None:
        answer["weight"] = answer_weight
    messages = [user, {"role": "assistant", "content": None, "tool_calls": calls, **extra}, *results, answer]
    return {"messages": messages, "tools": [tool()] if tools is None else tools}


def write(tmp_path: Path, lines: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


GOOD = example()


def moved(index: int, tag: str, **fields) -> dict:
    """GOOD with `fields` set on its message `index` (0: the user's, 2: the tool result, 3: the answer)."""
    e = example(tag=tag)
    e["messages"][index] = {**e["messages"][index], **fields}
    return e


NESTED: dict = {"type": "string"}
for _ in range(300):
    NESTED = {"type": "object", "properties": {"x": NESTED}}
RESULT = {"role": "tool", "tool_call_id": "call00001", "content": "20:03"}
# category -> (lines of the file, expected offending line numbers)
CASES = {
    "bad_tool_schema": ([GOOD, example(tools=[tool(name="get time")], tag="a"), example(tools=[tool(description=None)], tag="b"),
                         example(tools=[tool(parameters={"type": "objekt"})], tag="c"), example(tools="get_time", tag="d"),
                         # a $ref that points nowhere, and one to a URL (never fetched)
                         example(tools=[tool(parameters={"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}})],
                                 tag="e"),
                         example(tools=[tool(parameters={"type": "object", "properties": {
                             "city": {"$ref": "http://127.0.0.1:9/city.json"}}})], tag="f"),
                         # references in a loop, a schema nested past the checker's recursion, no object
                         example(tools=[tool(parameters={"type": "object", "properties": {"city": {"$ref": "#/$defs/a"}},
                                                         "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}})],
                                 tag="g"),
                         example(tools=[tool(parameters=NESTED)], tag="h"),
                         example(tools=[tool(parameters={"type": "string"})], tag="i")],
                        [2, 3, 4, 5, 6, 7, 8, 9, 10]),
    "bad_tool_call": ([GOOD, {**GOOD, "messages": [GOOD["messages"][0], {**GOOD["messages"][1], "tool_calls": [call(call_id=None)]}]},
                       example(calls=[call(), call()], results=[{"role": "tool", "tool_call_id": "call00001", "content": "1"}] * 2,
                               tag="b"),
                       # calls on a message that is not the assistant's: no template writes them there
                       moved(0, "c", tool_calls=[call(call_id="call00002")]), moved(2, "d", tool_calls=[call(call_id="call00002")])],
                      [2, 3, 4, 5]),
    "undeclared_tool": ([GOOD, example(calls=[call(name="get_weather")], tag="a"), {**example(tag="b"), "tools": []}],
                        [2, 3]),
    "bad_tool_arguments": ([GOOD, example(calls=[call(arguments="Oslo")], tag="a"), example(calls=[call(arguments='["Oslo"]')], tag="b"),
                            example(calls=[{**call(), "function": {"name": "get_time", "arguments": ["Oslo"]}}], tag="c"),
                            # JSON has no NaN or Infinity (Python's parser reads them), as a string or as the object
                            example(calls=[call(arguments='{"city": NaN}')], tag="d"),
                            example(calls=[call(arguments='{"city": "Oslo", "n": 1e999}')], tag="e"),
                            example(calls=[{**call(), "function": {"name": "get_time", "arguments": {"city": float("nan")}}}],
                                    tag="f")],
                           [2, 3, 4, 5, 6, 7]),
    "arguments_fail_schema": ([GOOD, example(calls=[call(arguments='{"town": "Oslo"}')], tag="a"),
                               example(calls=[call(arguments='{"city": 7}')], tag="b")],
                              [2, 3]),
    "unexpected_tool_result": ([GOOD, example(results=[RESULT, {"role": "tool", "tool_call_id": "call00009", "content": "x"}], tag="a"),
                                example(results=[RESULT] * 2, tag="b"),
                                example(results=[RESULT, {"role": "tool", "content": "x"}], tag="c"),
                                moved(3, "d", tool_call_id="call00001"), moved(0, "e", tool_call_id="call00001"),
                                # a result that names another function than the call it answers
                                moved(2, "f", name="get_weather")],
                               [2, 3, 4, 5, 6, 7]),
    "missing_tool_result": ([GOOD, example(results=[{"role": "user", "content": "Well?"}], tag="a")], [2]),
    "bad_weight": ([GOOD, example(answer_weight=0.5, tag="a"), example(user_weight=1, tag="b"), example(answer_weight=True, tag="c")],
                   [2, 3, 4]),
    "all_weights_zero": ([GOOD, example(weight=0, answer_weight=0, tag="a")], [2]),
    "bad_reasoning": ([GOOD, example(reasoning_content=["x"], tag="a"), example(reasoning_content="  ", tag="b"),
                       # two spellings of the trace that differ: neither is dropped in silence
                       example(reasoning_content="Look it up.", thinking="Guess.", tag="c"),
                       # a trace on a message that is not the assistant's: no template writes it there
                       moved(0, "d", reasoning_content="Ask about Oslo."), moved(2, "e", thinking="It says 20:03.")],
                      [2, 3, 4, 5, 6]),
}


def test_a_result_named_for_no_pending_call_names_the_calls_that_wait(tmp_path: Path) -> None:
    """It was told it "follows no call still without a result" while the call waited."""
    line = example(results=[{"role": "tool", "name": "get_nope", "content": "20:03"}])
    report = validate_dataset(write(tmp_path, [line]), fmt="openai")
    [row] = [r for r in report.error_rows if r["category"] == "unexpected_tool_result"]
    assert "names 'get_nope', which none of the pending calls makes (get_time ('call00001'))" in row["message"]


def test_a_call_id_numbered_afresh_in_a_later_turn_is_valid(tmp_path: Path, tok) -> None:
    """Agent frameworks and converted data sets number each turn's calls afresh: the service takes
    it, and refusing it in validation left such corrections out of every export."""
    first = example()
    again = [{"role": "user", "content": "And in Lima?"},
             {"role": "assistant", "content": None, "tool_calls": [call('{"city": "Lima"}')]},
             {"role": "tool", "tool_call_id": "call00001", "content": "13:03"},
             {"role": "assistant", "content": "It is 13:03 in Lima."}]
    line = {**first, "messages": [*first["messages"], *again]}
    report = validate_dataset(write(tmp_path, [line]), DataParams(max_tokens=1024), fmt="openai", tokenizer=tok)
    assert report.valid and report.errors == {}, report.error_rows


@pytest.mark.parametrize("category", list(CASES))
def test_each_tool_category_is_counted_with_its_lines(tmp_path: Path, category: str) -> None:
    lines, expected = CASES[category]
    report = validate_dataset(write(tmp_path, lines), fmt="openai")
    assert not report.valid
    assert report.errors == {category: len(expected)}
    assert report.error_lines[category] == expected
    assert all(r["message"] for r in report.error_rows)


def test_the_same_trace_in_both_spellings_is_one_trace(tmp_path: Path) -> None:
    report = validate_dataset(write(tmp_path, [GOOD, example(reasoning_content="Look.", thinking="Look.", tag="a")]),
                              fmt="openai")
    assert report.valid, report.error_rows


def test_a_valid_tool_file_is_valid_and_its_calls_are_counted_as_trained(tmp_path: Path, tok) -> None:
    lines = [GOOD, example(answer_weight=0, tag="b"), example(reasoning_content="Ask the clock.", tag="c"),
             {**example(tag="d"), "messages": [*example()["messages"][:1], {**example()["messages"][1], "thinking": "Hmm."},
                                               *example()["messages"][2:]]}]
    report = validate_dataset(write(tmp_path, lines), DataParams(max_tokens=1024), tokenizer=tok,
                              budget=TrainingBudget(seq_len=1024))
    assert report.valid and report.errors == {} and "unrecognised_keys" not in report.warnings
    with_weight_zero = report.token_stats["assistant_tokens"]["min"]
    assert 0 < with_weight_zero < report.token_stats["assistant_tokens"]["max"]


def test_fix_leaves_out_the_examples_with_tool_errors_and_keeps_tools_in_canonical_form(tmp_path: Path) -> None:
    lines = [GOOD, *[CASES[c][0][1] for c in CASES], example(tag="last")]
    path = write(tmp_path, lines)
    report = validate_dataset(path, fmt="openai")
    kept, dropped = write_fixed(path, report, tmp_path / "fixed.jsonl")
    assert (kept, dropped) == (2, len(CASES))
    rows = [json.loads(x) for x in (tmp_path / "fixed.jsonl").read_text().splitlines()]
    assert rows[0] == GOOD and rows[1]["tools"] == [tool()]  # tools, tool_calls and ids kept as given
    assert validate_dataset(tmp_path / "fixed.jsonl", fmt="openai").valid


def test_a_sources_invalid_rows_policy_applies_to_tool_errors(tmp_path: Path, tok) -> None:
    good = [example(tag=str(i)) for i in range(40)]
    data = write(tmp_path, [*good, CASES["undeclared_tool"][0][1]])
    params = Params(data=DataParams(sources=[{"path": str(data), "invalid_rows": "drop", "max_invalid_share": 0.05}],
                                    max_tokens=1024), train=TrainParams(seq_len=1024))
    stats = prepare_dataset(None, tmp_path / "out", params, tok)
    assert stats["invalid_dropped"] == 1 and stats["sources"][0]["invalid_lines"] == [{"line": 41, "category": "undeclared_tool"}]
    train = [json.loads(x) for x in (tmp_path / "out/train.jsonl").read_text().splitlines()]
    assert all(row["tools"] == [tool()] and row["messages"][1]["tool_calls"] for row in train)
    with pytest.raises(PrepareError, match=r"line 41: undeclared_tool: message 2 calls 'get_weather'"):
        prepare_dataset(None, tmp_path / "out2", Params(data=DataParams(sources=[{"path": str(data)}], max_tokens=1024),
                                                                train=TrainParams(seq_len=1024)), tok)


def test_sharegpt_function_call_and_observation_become_tool_calls_and_results(tmp_path: Path) -> None:
    tools = json.dumps([{"name": "get_time", "description": "The local time in a city.", "parameters": tool()["function"]["parameters"]}])
    row = {"conversations": [
        {"from": "human", "value": "What time is it in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "20:03"},
        {"from": "gpt", "value": "It is 20:03 in Oslo."},
    ], "tools": tools}
    (checked,) = list(iter_checked(write(tmp_path, [row]), "sharegpt"))
    assert checked.problems == {}
    assert checked.example["tools"] == [tool()]
    assert checked.example["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [call()]}
    assert checked.example["messages"][2] == {"role": "tool", "content": "20:03", "tool_call_id": "call00001"}
    bad = {**row, "conversations": [*row["conversations"][:2], *row["conversations"][2:3] * 2, row["conversations"][3]]}
    report = validate_dataset(write(tmp_path, [row, bad], "s.jsonl"), fmt="sharegpt")
    assert report.errors == {"unexpected_tool_result": 1} and report.error_lines["unexpected_tool_result"] == [2]
    # Each refusal says what is wrong in ShareGPT's terms: a result that follows no call (ShareGPT
    # has no call ids), a function_call value that is not JSON (not "a tool call has no id").
    (extra,) = list(iter_checked(write(tmp_path, [bad], "e.jsonl"), "sharegpt"))
    assert "has no tool_call_id and follows no call still without a result" in extra.problems["unexpected_tool_result"]
    garbled = {**row, "conversations": [row["conversations"][0], {"from": "function_call", "value": "{not json"},
                                        *row["conversations"][2:]]}
    (checked,) = list(iter_checked(write(tmp_path, [garbled], "g.jsonl"), "sharegpt"))
    assert set(checked.problems) == {"bad_tool_call"} and '(its function: "{not json")' in checked.problems["bad_tool_call"]
    # A call the answer follows with no observation between them is a call left without its result.
    unanswered = {**row, "conversations": [*row["conversations"][:2], row["conversations"][3]]}
    (checked,) = list(iter_checked(write(tmp_path, [unanswered], "u.jsonl"), "sharegpt"))
    assert set(checked.problems) == {"missing_tool_result"}
    assert "message 2 calls a tool and message 3 answers with no tool result" in checked.problems["missing_tool_result"]


def test_openai_legacy_functions_become_tools_and_tool_calls(tmp_path: Path) -> None:
    row = {"functions": [tool()["function"]], "messages": [
        {"role": "user", "content": "What time is it in Oslo?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": '{"city": "Oslo"}'}},
        {"role": "function", "name": "get_time", "content": "20:03"},
        {"role": "assistant", "content": "It is 20:03 in Oslo."},
    ]}
    (checked,) = list(iter_checked(write(tmp_path, [row]), "openai"))
    assert checked.problems == {}
    assert checked.example["tools"] == [tool()] and checked.example["messages"][1]["tool_calls"] == [call()]
    assert checked.example["messages"][2]["role"] == "tool" and checked.example["messages"][2]["tool_call_id"] == "call00001"


def test_a_trace_the_template_drops_is_an_error_with_its_line_unless_traces_are_not_trained(
    tmp_path: Path, family_models
) -> None:
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(str(family_models("qwen3")))
    two_turns = {"messages": [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Yes.", "reasoning_content": "First."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "No.", "reasoning_content": "Second."},
    ]}
    one_turn = {"messages": two_turns["messages"][2:]}
    path = write(tmp_path, [one_turn, two_turns])
    report = validate_dataset(path, DataParams(max_tokens=512), tokenizer=qwen3, budget=TrainingBudget(seq_len=512))
    assert report.errors == {"reasoning_dropped": 1} and report.error_lines["reasoning_dropped"] == [2]
    assert "train.train_reasoning: false" in report.error_rows[0]["message"]
    off = validate_dataset(path, DataParams(max_tokens=512), tokenizer=qwen3,
                           budget=TrainingBudget(seq_len=512, train_reasoning=False))
    assert off.valid


def test_the_tools_task_data_is_deterministic_and_valid(tmp_path: Path, tok) -> None:
    from scripts.make_tools_data import main, make_tool_examples

    assert make_tool_examples(30, seed=11) == make_tool_examples(30, seed=11) != make_tool_examples(30, seed=12)
    assert main(["--out", str(tmp_path / "tools.jsonl"), "--count", "2000", "--seed", "11"]) == 0
    # the tracked file (data.dvc; `dvc pull`) is what the generator writes
    assert (REPO / "data/tools.jsonl").read_bytes() == (tmp_path / "tools.jsonl").read_bytes()
    write(tmp_path, make_tool_examples(60, seed=11), "small.jsonl")
    report = validate_dataset(tmp_path / "small.jsonl", DataParams(max_tokens=1280), tokenizer=tok,
                              budget=TrainingBudget(seq_len=1280))
    assert report.valid and report.errors == {} and report.warnings == {"no_system_message": 60}
    names = {e["messages"][1]["tool_calls"][0]["function"]["name"] for e in make_tool_examples(60, seed=11)}
    assert names == {"get_weather", "get_time", "convert_currency"}


def _family_tokenizer(name: str, tok, family_models):
    from transformers import AutoTokenizer

    return tok if name == "tiny" else AutoTokenizer.from_pretrained(str(family_models(name)))


def _trained_text(tokenizer, path: Path) -> list[str]:
    """The trained tokens of each example of a file, decoded, as training would mask them."""
    from tasks.data.checks import normalise_example
    from tasks.model.chat import encode_chats

    encoded = encode_chats(tokenizer, [normalise_example(c.example) for c in iter_checked(path, "openai")])
    return [tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in encoded]


WIDE = DataParams(max_tokens=4096)
WIDE_BUDGET = TrainingBudget(seq_len=4096)


@pytest.mark.parametrize("family", ["tiny", "qwen2.5", "llama3.1", "mistral"])
def test_openais_documented_function_calling_lines_are_valid_and_their_calls_trained(
    tmp_path: Path, tok, family_models, family: str
) -> None:
    strict = {**tool(), "function": {**tool()["function"], "strict": True}}
    parts = [{"type": "text", "text": "What time is it "}, {"type": "text", "text": "in Oslo?"}]
    openai_call = call(call_id="call_id")  # OpenAI's ids, which Mistral's template refuses as they are
    lines = [
        # the call is the last turn, with no content key at all; strict schema, parallel_tool_calls, developer role
        {"messages": [{"role": "developer", "content": "You call tools."}, {"role": "user", "content": "What time is it in Oslo?"},
                      {"role": "assistant", "tool_calls": [openai_call]}], "tools": [strict], "parallel_tool_calls": False},
        # content "" on the call turn, a tool message with its name too, text parts on the user message
        {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "", "tool_calls": [openai_call]},
                      {**RESULT, "tool_call_id": "call_id", "name": "get_time"},
                      {"role": "assistant", "content": "It is 20:03 in Oslo."}],
         "tools": [tool()]},
    ]
    path = write(tmp_path, lines)
    tokenizer = _family_tokenizer(family, tok, family_models)
    report = validate_dataset(path, WIDE, tokenizer=tokenizer, budget=WIDE_BUDGET)
    assert report.valid and report.errors == {}  # every turn located: no answer_not_located
    trained = _trained_text(tokenizer, path)
    assert all('"city": "Oslo"' in text and "get_time" in text for text in trained)
    assert "20:03 in Oslo." in trained[1] and "You call tools." not in trained[0]
    assert all("What time is it" not in text for text in trained)


def test_content_that_is_not_text_is_refused_naming_the_fix(tmp_path: Path) -> None:
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/clock.png"}}]
    lines = [
        GOOD,
        {**example(tag="a"), "messages": [{"role": "user", "content": image}, {"role": "assistant", "content": "A clock."}]},
        example(results=[{**RESULT, "content": {"time": "20:03"}}], tag="b"),
    ]
    report = validate_dataset(write(tmp_path, lines), fmt="openai")
    assert report.errors == {"bad_content": 2} and report.error_lines["bad_content"] == [2, 3]
    messages = [r["message"] for r in report.error_rows]
    assert "of type image_url; only text parts" in messages[0] and "write the content as text" in messages[0]
    assert "message 3 content is dict" in messages[1] and "JSON string" in messages[1]


def test_the_same_conversation_under_other_tools_is_not_a_duplicate(tmp_path: Path) -> None:
    other = tool(description="The time of day in a city, as HH:MM.")
    report = validate_dataset(write(tmp_path, [GOOD, {**GOOD, "tools": [other]}, GOOD]), fmt="openai")
    assert report.errors == {"duplicate": 1} and report.error_lines["duplicate"] == [3]


def test_tool_results_that_differ_in_case_are_other_examples_and_user_text_is_not(tmp_path: Path) -> None:
    """Case was ignored in tool results as in what people write: `--fix` dropped an example whose
    function returned "Status A" where another's returned "status a"."""
    upper = example(results=[{**RESULT, "content": "Status A"}])
    lower = example(results=[{**RESULT, "content": "status a"}])
    shouted = {**upper, "messages": [{**upper["messages"][0], "content": "WHAT TIME IS IT IN OSLO?"}, *upper["messages"][1:]]}
    report = validate_dataset(write(tmp_path, [upper, lower, shouted]), fmt="openai")
    assert report.errors == {"near_duplicate": 1} and report.error_lines["near_duplicate"] == [3]


def test_tool_results_that_differ_in_outer_whitespace_are_other_examples(tmp_path: Path) -> None:
    """Prepare stripped every message's content, a function's output too, so two results that
    differ only in a trailing newline became one example, dropped as a duplicate."""
    from tasks.data.checks import normalise_example

    padded = example(results=[{**RESULT, "content": "20:03\n"}])
    spaced = {**GOOD, "messages": [{**GOOD["messages"][0], "content": " What time is it in Oslo? "}, *GOOD["messages"][1:]]}
    report = validate_dataset(write(tmp_path, [GOOD, padded, spaced]), fmt="openai")
    assert report.errors == {"duplicate": 1} and report.error_lines["duplicate"] == [3]  # what people write is stripped
    assert normalise_example(padded)["messages"][2]["content"] == "20:03\n"


def test_a_call_turn_lost_without_text_beside_it_is_not_told_to_drop_that_text() -> None:
    """A template that rewrites the calls themselves (their arguments) was met with "set content to
    null on those turns", which it already was."""
    from tasks.data.tokens import TokenCount, untrainable
    from tasks.model.chat import _Span, _unlocated

    lost = TokenCount(total=90, trained=20, last_answer=8, calls_lost=1, unlocated=1)
    category, message = untrainable(lost, example())
    assert category == "tool_call_dropped" and "content to null" not in message
    assert "write the calls as the template renders them, or set model.chat_template: chatml" in message
    assert "set content to null on those turns" in untrainable(TokenCount(90, 20, 8, 1, calls_lost=1,
                                                                          calls_lost_with_text=1), example())[1]
    # The hint follows the turn that was lost, not any call turn: one with text, kept as context
    # (weight 0), says nothing of a later call turn whose arguments the template rewrote.
    first = {"role": "assistant", "content": "Let me look.", "weight": 0, "tool_calls": [call()]}
    second = {"role": "assistant", "content": None, "tool_calls": [call(call_id="call00002")]}
    messages = [{"role": "user", "content": "Time?"}, first, RESULT, second,
                {**RESULT, "tool_call_id": "call00002"}, {"role": "assistant", "content": "It is 20:03."}]
    assert _unlocated(messages, [_Span(0, 5, message=5)], "all") == (1, 1, 0)  # the second call turn, no text
    # spans that name no turn (a template's generation marks): the context turn is not the one lost
    assert _unlocated(messages, [_Span(0, 5), _Span(6, 9)], "all") == (1, 1, 0)
    assert _unlocated(messages, [_Span(0, 5, message=3), _Span(6, 9, message=5)], "all") == (0, 0, 0)
    first["weight"] = 1
    assert _unlocated(messages, [_Span(0, 5, message=5)], "all") == (2, 2, 1)


def test_a_call_turn_the_template_does_not_write_is_an_error_naming_the_fix(tmp_path: Path, tok, family_models) -> None:
    llama = _family_tokenizer("llama3.1", tok, family_models)
    with_text = example(tag="a")
    with_text["messages"][1] = {**with_text["messages"][1], "content": "Let me look at the clock."}
    path = write(tmp_path, [GOOD, with_text, example(calls=[call(), call(call_id="call00002")], results=[
        RESULT, {**RESULT, "tool_call_id": "call00002"}], tag="b")])
    report = validate_dataset(path, WIDE, tokenizer=llama, budget=WIDE_BUDGET)
    assert report.errors == {"tool_call_dropped": 1, "no_trained_tokens": 1}
    assert report.error_lines == {"tool_call_dropped": [2], "no_trained_tokens": [3]}
    dropped, parallel = sorted(report.error_rows, key=lambda r: r["line"])
    assert "set content to null on those turns, or set model.chat_template: chatml" in dropped["message"]
    assert "only supports single tool-calls" in parallel["message"] and "model.chat_template: chatml" in parallel["message"]
    assert report.unusable_examples == 2
    # the same lines train whole under the tiny model's ChatML
    assert validate_dataset(path, WIDE, tokenizer=tok, budget=WIDE_BUDGET).valid


@pytest.mark.parametrize("family", ["tiny", "qwen2.5"])
def test_a_name_the_template_does_not_write_is_an_error_naming_the_fix(tmp_path: Path, tok, family_models, family: str) -> None:
    tokenizer = _family_tokenizer(family, tok, family_models)
    named = {"messages": [{"role": "system", "content": "Answer the user by name."},
                          {"role": "user", "content": "Hi, who am I?", "name": "alice"},
                          {"role": "assistant", "content": "You are Alice."}]}
    path = write(tmp_path, [GOOD, named])
    report = validate_dataset(path, WIDE, tokenizer=tokenizer, budget=WIDE_BUDGET)
    assert report.errors == {"name_dropped": 1} and report.error_lines["name_dropped"] == [2]
    assert "message 2 has the name 'alice'" in report.error_rows[0]["message"]
    assert "remove name from those messages" in report.error_rows[0]["message"]
    with pytest.raises(PrepareError, match=r"line 2: name_dropped"):
        prepare_dataset(None, tmp_path / "out", Params(data=DataParams(sources=[{"path": str(path)}], max_tokens=4096),
                                                       train=TrainParams(seq_len=4096)), tokenizer)
    # a system message left out by data.system_message: drop takes its name with it, by choice
    system_named = {"messages": [{**named["messages"][0], "name": "rules"}, *named["messages"][1:]]}
    system_named["messages"][1] = {k: v for k, v in named["messages"][1].items() if k != "name"}
    dropped = validate_dataset(write(tmp_path, [system_named], "s.jsonl"), DataParams(max_tokens=4096, system_message="drop"),
                               tokenizer=tokenizer, budget=WIDE_BUDGET)
    assert dropped.valid


def test_sharegpt_parallel_calls_and_calls_written_as_objects_become_tool_calls(tmp_path: Path, tok) -> None:
    function = tool()["function"]
    rows = [
        {"conversations": [{"from": "human", "value": "Time in Oslo and Rome?"},
                           {"from": "function_call", "value": json.dumps([{"name": "get_time", "arguments": {"city": c}}
                                                                          for c in ("Oslo", "Rome")])},
                           {"from": "observation", "value": "20:03"}, {"from": "observation", "value": "20:03"},
                           {"from": "gpt", "value": "It is 20:03 in both."}], "tools": [function]},
        {"conversations": [{"from": "human", "value": "Time in Oslo?"},
                           {"from": "function_call", "value": {"name": "get_time", "arguments": {"city": "Oslo"}}},
                           {"from": "observation", "value": "20:03"}, {"from": "gpt", "value": "It is 20:03 in Oslo."}],
         "tools": [function]},
    ]
    path = write(tmp_path, rows)
    parallel, single = (c.example["messages"][1]["tool_calls"] for c in iter_checked(path, "sharegpt"))
    assert [c["id"] for c in parallel] == ["call00001", "call00002"] and single == [call()]
    report = validate_dataset(path, WIDE, tokenizer=tok, budget=WIDE_BUDGET)
    assert report.valid and report.errors == {}


def test_a_tool_result_with_a_name_and_no_call_id_answers_the_pending_call_of_that_function(tmp_path: Path) -> None:
    times = [call(call_id="call_a"), call(arguments='{"city": "Rome"}', call_id="call_b")]
    tools = [tool(), tool(name="get_weather", description="The weather in a city.")]
    weather = {"id": "call_c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    lines = [
        example(calls=[*times, weather], tools=tools, results=[
            {"role": "tool", "name": "get_weather", "content": "rain"},  # answers call_c, not the older call_a
            {"role": "tool", "tool_call_id": "call_a", "content": "20:03"},
            {"role": "tool", "content": "20:03"}]),  # no name: the oldest pending call, call_b
        example(results=[{"role": "tool", "name": "get_weather", "content": "rain"}], tag="a"),  # no such call
    ]
    checked = list(iter_checked(write(tmp_path, lines), "openai"))
    assert [m.get("tool_call_id") for m in checked[0].example["messages"][2:5]] == ["call_c", "call_a", "call_b"]
    assert checked[0].problems == {}
    assert set(checked[1].problems) == {"unexpected_tool_result", "missing_tool_result"}


def test_an_empty_tool_result_is_valid_and_parallel_calls_contradicting_the_example_are_not(tmp_path: Path) -> None:
    two = [call(), call(arguments='{"city": "Rome"}', call_id="call00002")]
    results = [RESULT, {**RESULT, "tool_call_id": "call00002"}]
    lines = [
        example(results=[{**RESULT, "content": ""}]),  # the function returned nothing
        {**example(calls=two, results=results, tag="a"), "parallel_tool_calls": True},
        {**example(calls=two, results=results, tag="b"), "parallel_tool_calls": False},
        {**example(tag="c"), "parallel_tool_calls": False},
    ]
    report = validate_dataset(write(tmp_path, lines), fmt="openai")
    assert report.errors == {"bad_tool_call": 1} and report.error_lines["bad_tool_call"] == [3]
    assert "parallel_tool_calls: false" in report.error_rows[0]["message"]


def test_call_arguments_written_as_an_object_become_its_json_string(tmp_path: Path) -> None:
    as_object = {**call(), "function": {"name": "get_time", "arguments": {"city": "Oslo"}}}
    (checked,) = iter_checked(write(tmp_path, [example(calls=[as_object])]), "openai")
    assert checked.problems == {} and checked.example["messages"][1]["tool_calls"] == [call()]


def test_a_ref_inside_the_schema_is_followed_and_nothing_is_fetched(tmp_path: Path, monkeypatch) -> None:
    """A tool schema's $ref to its own definitions validates calls; one to a URL is refused
    as a schema error without any connection (a schema from data or a request must not make
    the process open a URL)."""
    import socket
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a $ref was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    city = {"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "$defs": {"City": {"type": "string"}},
            "required": ["city"]}
    lines = [example(tools=[tool(parameters=city)]), example(tools=[tool(parameters=city)], calls=[call('{"city": 7}')], tag="a"),
             example(tools=[tool(parameters={"type": "object", "properties": {"city": {"$ref": "http://127.0.0.1:9/c.json"}}})],
                     tag="b")]
    report = validate_dataset(write(tmp_path, lines), fmt="openai")
    assert report.error_lines == {"arguments_fail_schema": [2], "bad_tool_schema": [3]}
    assert "nothing is fetched" in next(r["message"] for r in report.error_rows if r["line"] == 3)


def test_a_call_turn_with_empty_content_is_no_short_answer(tmp_path: Path) -> None:
    """A call turn's content may be null, "" or absent (OpenAI writes any of them): none is an answer to warn about."""
    empty = example()
    empty["messages"][1]["content"] = ""
    absent = example(tag="a")
    del absent["messages"][1]["content"]
    short = example(tag="b")
    short["messages"][-1]["content"] = "K"
    report = validate_dataset(write(tmp_path, [empty, absent, short]), fmt="openai")
    assert report.valid and report.warnings.get("short_answer") == 1


def test_the_printed_report_keeps_brackets_of_the_messages(tmp_path: Path) -> None:
    """The console report prints each message as written: `^[a-zA-Z0-9_-]{1,64}$` is no rich markup."""
    import io

    from rich.console import Console

    from tasks.data.validate import render_report

    folder = tmp_path / "[red]"  # a path that reads as markup too
    folder.mkdir()
    report = validate_dataset(write(folder, [GOOD, example(tools=[tool(name="get time")], tag="a")]), fmt="openai")
    out = io.StringIO()
    render_report(report, Console(file=out, width=300))
    assert "names match ^[a-zA-Z0-9_-]{1,64}$" in out.getvalue() and "[red]" in out.getvalue()
