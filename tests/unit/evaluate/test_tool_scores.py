"""Tool-call scores on hand-written generations, and the gate's tool checks against the champion."""

from __future__ import annotations

import pytest

from tasks.config import GateParams
from tasks.evaluate.gate import apply_gate
from tasks.evaluate.tools import answer_text, calls_text, reference_calls, tool_metrics, tool_scores
from tasks.model.responses import parse_generation

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
REFERENCE = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"days": 2, "city": "Oslo"}'}}]}


def _call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen(family_models):  # noqa: F811
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(family_models("qwen2.5")))


def test_each_generation_is_scored_on_name_arguments_and_validity(qwen):
    generations = [
        _call("get_weather", '{"city": "Oslo", "days": 2.0}'),  # right: key order and 2 == 2.0 do not matter
        _call("get_weather", '{"city": "Bergen", "days": 2}'),  # right function, wrong argument
        _call("get_time", "{}"),  # wrong function
        _call("get_weather", '{"city": "Oslo", "days": "2"}'),  # fails the schema: invalid
        _call("get_weather", '{"city": "Os'),  # cut off: invalid
        "It is sunny in Oslo.",  # no call at all: wrong, but not an invalid call
        "<think>\nNeed the weather.\n</think>\n\n" + _call("get_weather", '{"city": "Oslo", "days": 2}'),
    ]
    parsed = [parse_generation(qwen, g, "", TOOLS) for g in generations]
    want = reference_calls(REFERENCE)
    scores = tool_scores(parsed, [want] * len(parsed))
    assert scores == {
        "tool_name_match": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        "tool_arguments_match": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        "tool_valid_call": [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    }
    metrics = tool_metrics(scores)
    assert metrics["tool_calls"] == 7
    assert metrics["tool_name_accuracy"] == pytest.approx(3 / 7)
    assert metrics["tool_arguments_match"] == pytest.approx(2 / 7)
    assert metrics["tool_invalid_rate"] == pytest.approx(2 / 7)
    # The reasoning trace is not part of the scored answer: the call alone is.
    assert answer_text(parsed[6]) == calls_text(want) == '[{"arguments": {"city": "Oslo", "days": 2}, "name": "get_weather"}]'
    assert answer_text(parsed[5]) == "It is sunny in Oslo."
    assert tool_metrics({k: [] for k in scores}) == {}


GOOD = {"exact_match": 0.9, "perplexity": 1.2, "latency_p95_ms": 100.0, "rouge_l": 0.95}


def _with_tools(names: list[int], arguments: list[int], valid: list[int]) -> tuple[dict, dict]:
    n = len(names)
    text = {"ids": [f"ex{i}" for i in range(n)], "exact_match": [1.0] * n, "nll": [1.0] * n, "tokens": [5] * n}
    scores = {**text, "tool_ids": [f"ex{i}" for i in range(n)], "tool_name_match": [float(x) for x in names],
              "tool_arguments_match": [float(x) for x in arguments], "tool_valid_call": [float(x) for x in valid]}
    return {**GOOD, **tool_metrics(scores)}, scores


def test_the_gate_fails_a_candidate_that_calls_worse_than_the_champion():
    n = 60
    champion, champion_scores = _with_tools([1] * n, [1] * n, [1] * n)
    worse, worse_scores = _with_tools([1] * 30 + [0] * 30, [1] * 30 + [0] * 30, [1] * 40 + [0] * 20)
    verdict = apply_gate({"candidate": worse, "champion": champion}, GateParams(),
                         {"candidate": worse_scores, "champion": champion_scores})
    assert set(verdict.failed) == {"no_regression_tool_name_match", "no_regression_tool_arguments_match",
                                   "no_regression_tool_valid_call"}  # exact match and perplexity are equal
    check = next(c for c in verdict.checks if c.name == "no_regression_tool_name_match")
    assert check.method == "paired bootstrap + McNemar" and check.n == n and check.estimate == pytest.approx(-0.5)

    same = apply_gate({"candidate": champion, "champion": champion}, GateParams(),
                      {"candidate": champion_scores, "champion": champion_scores})
    assert same.passed and {c.name for c in same.checks} >= {"no_regression_tool_valid_call"}


def test_without_per_example_tool_scores_the_gate_compares_aggregates():
    champion, _ = _with_tools([1] * 10, [1] * 10, [1] * 10)
    worse, _ = _with_tools([1] * 5 + [0] * 5, [1] * 10, [1] * 8 + [0] * 2)
    verdict = apply_gate({"candidate": worse, "champion": champion}, GateParams())
    assert set(verdict.failed) == {"no_regression_tool_name_match", "no_regression_tool_valid_call"}
    invalid = next(c for c in verdict.checks if c.name == "no_regression_tool_valid_call")
    assert (invalid.value, invalid.method) == (pytest.approx(0.2), "fixed margin")


def test_no_tool_checks_when_the_test_split_has_no_tool_calls():
    verdict = apply_gate({"candidate": GOOD, "champion": GOOD}, GateParams())
    assert not any(c.name.startswith("no_regression_tool") for c in verdict.checks)


def test_every_call_turn_is_scored_with_the_conversation_before_it_as_the_prompt():
    """The function-calling task's examples end with an answer from the tool's result: their
    call, an earlier turn, is scored as a call of its own; a reference turn that is a call too."""
    from scripts.make_tools_data import make_tool_examples
    from tasks.config import EvalParams, ModelParams
    from tasks.evaluate.score import earlier_calls, evaluate_model, example_id
    from tasks.model.loading import load_causal_lm, load_tokenizer, resolve_base

    examples = make_tool_examples(3, seed=11)
    ends_with_call = {**examples[0], "messages": examples[0]["messages"][:2]}
    earlier = earlier_calls(examples)
    assert [c.example for c in earlier] == [0, 1, 2]
    assert [c.question for c in earlier] == [e["messages"][:1] for e in examples]
    assert [c.calls for c in earlier] == [reference_calls(e["messages"][1]) for e in examples]
    assert earlier[0].id == example_id(ends_with_call) != example_id(examples[0])
    assert earlier_calls([ends_with_call]) == []  # its call is the reference turn, scored as before

    path = resolve_base(ModelParams())
    model, tokenizer = load_causal_lm(path).eval(), load_tokenizer(path)
    result = evaluate_model(model, tokenizer, [*examples, ends_with_call], EvalParams(max_new_tokens=4, batch_size=4))
    metrics, scores = result["metrics"], result["per_example"]
    assert metrics["examples"] == 4 and len(scores["exact_match"]) == 4  # text metrics: the reference turns
    assert metrics["tool_calls"] == 4  # the reference call, then the three earlier ones
    assert scores["tool_ids"] == [example_id(ends_with_call), *[c.id for c in earlier]]
    assert all(len(scores[k]) == 4 for k in ("tool_name_match", "tool_arguments_match", "tool_valid_call"))
    references = [s["reference"] for s in result["samples"]]
    assert references[4:] == [calls_text(c.calls) for c in earlier]


def test_a_turn_of_weight_zero_is_not_a_reference_nor_a_scored_call():
    from tasks.evaluate.score import earlier_calls
    from tasks.evaluate.tools import reference_turn
    from tasks.model.chat import prompt_messages, reference_answer

    wrong_call = {**REFERENCE, "weight": 0, "tool_calls": [{**REFERENCE["tool_calls"][0], "id": "call_0"}]}
    messages = [
        {"role": "user", "content": "Weather in Oslo for two days?"}, wrong_call,
        {"role": "tool", "tool_call_id": "call_0", "content": "error: bad call"}, REFERENCE,
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
        {"role": "assistant", "content": "Sunny, both days.", "weight": 1},
        {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "WRONG ANSWER DO NOT LEARN", "weight": 0},
    ]
    assert reference_turn(messages) == messages[5] and reference_answer(messages) == "Sunny, both days."
    assert prompt_messages(messages) == messages[:5]
    (call,) = earlier_calls([{"messages": messages}])  # the weight-1 call only
    assert call.question == messages[:3] and call.calls == reference_calls(REFERENCE)
