"""Scoring tool calls: was the right function called, with the right arguments, in a valid call?

For each assistant turn of a test example that calls a tool (its reference turn, the last
assistant turn, or an earlier one, as in a call followed by its result and an answer from
it), the model is asked the conversation before that turn; its generation is parsed with
`tasks.model.responses.parse_generation` (the parser the service returns calls with)
against the example's `tools`, and scored per call turn:

- `tool_name_match`: 1 when the functions called are the reference's, in order;
- `tool_arguments_match`: 1 when, besides, every call's arguments are JSON-equal to the
  reference's (`{"a": 1}` equals `{"a": 1.0}`; key order does not matter);
- `tool_valid_call`: 0 when the model wrote a call that is invalid (unparseable, naming a
  function the example does not declare, or with arguments failing its schema), else 1.

Their means are `tool_name_accuracy`, `tool_arguments_match` and `tool_invalid_rate`
(1 - mean of `tool_valid_call`), over `tool_calls` call turns. The gate compares the
per-example scores with the champion's (`tasks.evaluate.gate`).
"""

from __future__ import annotations

import json
from typing import Any

from tasks.model.chat import reference_index
from tasks.model.responses import ParsedResponse

TOOL_SCORES = ("tool_name_match", "tool_arguments_match", "tool_valid_call")


def reference_turn(messages: list[dict]) -> dict:
    """The turn a model is scored on: the last assistant message not marked `weight: 0` (`reference_index`)."""
    return messages[reference_index(messages)]


def call_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant turns that call a tool (not those of weight 0, which are not to be learnt):
    each is scored as a call, with the messages before it as the prompt."""
    return [i for i, m in enumerate(messages)
            if m["role"] == "assistant" and m.get("tool_calls") and m.get("weight", 1) != 0]


def reference_calls(turn: dict) -> list[tuple[str, Any]] | None:
    """(name, arguments) of each call of a reference turn, arguments decoded; None when it makes no call."""
    calls = turn.get("tool_calls")
    if not calls:
        return None
    out = []
    for call in calls:
        fn = call.get("function", call)
        arguments = fn.get("arguments", {})
        out.append((fn["name"], json.loads(arguments) if isinstance(arguments, str) else arguments))
    return out


def calls_text(calls: list[tuple[str, Any]]) -> str:
    """Calls as one canonical JSON text (sorted keys): what text metrics compare for a call."""
    return json.dumps([{"name": n, "arguments": a} for n, a in calls], sort_keys=True, ensure_ascii=False)


def answer_text(parsed: ParsedResponse) -> str:
    """What a parsed generation is scored as: its calls' canonical text, else its answer without the reasoning trace."""
    if parsed.tool_calls:
        return calls_text([(c.name, c.arguments) for c in parsed.tool_calls])
    return parsed.answer.strip()


def tool_scores(parsed: list[ParsedResponse], references: list[list[tuple[str, Any]]]) -> dict[str, list[float]]:
    """Per-example `TOOL_SCORES` of parsed generations against reference calls (aligned lists)."""
    scores: dict[str, list[float]] = {k: [] for k in TOOL_SCORES}
    for got, want in zip(parsed, references):
        calls = [(c.name, c.arguments) for c in got.tool_calls]
        names = [n for n, _ in calls] == [n for n, _ in want]
        scores["tool_name_match"].append(float(names))
        scores["tool_arguments_match"].append(float(names and all(_json_equal(a, b) for (_, a), (_, b)
                                                                  in zip(calls, want))))
        scores["tool_valid_call"].append(0.0 if got.invalid else 1.0)
    return scores


def tool_metrics(scores: dict[str, list[float]]) -> dict[str, float]:
    """The aggregate tool metrics of per-example `tool_scores` ({} when no example is a call)."""
    n = len(scores.get("tool_name_match", []))
    if not n:
        return {}
    return {
        "tool_calls": n,
        "tool_name_accuracy": sum(scores["tool_name_match"]) / n,
        "tool_arguments_match": sum(scores["tool_arguments_match"]) / n,
        "tool_invalid_rate": 1 - sum(scores["tool_valid_call"]) / n,
    }


def _json_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (1 == 1.0, but True is not 1), objects regardless of key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b
