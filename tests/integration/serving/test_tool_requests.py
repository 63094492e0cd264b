"""What the chat route accepts and refuses around tools, in-process: each refusal a 400 naming its field."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "max_tokens": 4, **body})


def refused(resp, param: str, code: str = "unsupported_parameter") -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("top_logprobs", 2), ("seed", 7),
    ("frequency_penalty", 0.5), ("presence_penalty", 1), ("logit_bias", {"42": 5}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("store", True), ("reasoning_effort", "low"),
    ("not_an_openai_field", 1),
])
def test_a_field_the_service_does_not_honour_is_refused_by_name(client, field, value):
    message = refused(chat(client, **{field: value}), field)
    assert f"'{field}'" in message


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "text"}), ("logprobs", False), ("frequency_penalty", 0), ("presence_penalty", 0.0),
    ("logit_bias", {}), ("seed", None), ("store", False), ("parallel_tool_calls", True),
])
def test_a_field_at_the_value_that_asks_for_nothing_is_accepted(client, field, value):
    assert chat(client, **{field: value}).status_code == 200


def test_tools_tool_messages_and_calls_are_accepted(client):
    conversation = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_abc", "content": "12 degrees"}]
    for stream in (False, True):
        resp = chat(client, messages=conversation, tools=TOOLS, tool_choice="auto", stream=stream)
        assert resp.status_code == 200, resp.text
    body = chat(client, messages=conversation, tools=TOOLS).json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls", "invalid_tool_call")


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools.0.function"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
    ({"messages": [*MESSAGES, {"role": "tool", "content": "12 degrees"}]}, "messages.1"),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": None}]}, "messages.1"),
    ({"messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": "{not json"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
])
def test_malformed_tools_and_tool_messages_are_refused(client, body, param):
    resp = chat(client, **body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"].startswith(param), resp.json()


def test_a_tool_choice_that_cannot_be_met_is_refused(client):
    refused(chat(client, tool_choice="required"), "tool_choice", "invalid_value")
    message = refused(chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}),
                      "tool_choice", "invalid_value")
    assert "get_time" in message
