"""What the chat route accepts and refuses around tools, in-process: each refusal a 400 naming its field."""

from __future__ import annotations

import json

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
    ("response_format", {"type": "json_object"}), ("logprobs", True), ("top_logprobs", 2),
    ("frequency_penalty", 0.5), ("presence_penalty", 1), ("logit_bias", {"42": 5}),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("metadata", {"app": "x"}), ("reasoning_effort", "low"),
    ("not_an_openai_field", 1),
])
def test_a_field_the_service_does_not_honour_is_refused_by_name(client, field, value):
    message = refused(chat(client, **{field: value}), field)
    assert f"'{field}'" in message


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "text"}), ("logprobs", False), ("frequency_penalty", 0), ("presence_penalty", 0.0),
    ("logit_bias", {}), ("seed", None), ("store", False),
    # What OpenAI's clients and agent frameworks commonly send: honoured, or at their neutral value.
    ("n", 1), ("seed", 7), ("store", True), ("user", "user-1"), ("metadata", {}), ("top_logprobs", None),
    ("max_completion_tokens", 4), ("stop", "\n\n"), ("stop", ["\n\n", "###"]), ("service_tier", "auto"),
    ("model", "ftllm-chat-test"),
    # null, which OpenAI reads as "not given" and some clients send for every field they leave unset
    ("top_p", None), ("n", None), ("stream", None), ("max_completion_tokens", None), ("stop", None), ("tools", None),
    ("tool_choice", None), ("user", None), ("stream_options", None),
])
def test_a_field_at_the_value_that_asks_for_nothing_is_accepted(client, field, value):
    resp = chat(client, **{field: value})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == chat(client).json()["choices"][0]["message"]["content"]


def test_a_null_temperature_samples_at_the_default_temperature(client):
    assert chat(client, temperature=None, max_tokens=2).status_code == 200


def test_a_seed_with_sampling_repeats_the_answer_through_the_engine_process(client):
    def sampled(seed: int) -> str:
        resp = chat(client, seed=seed, temperature=1.0, max_tokens=12)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["message"]["content"]

    assert sampled(7) == sampled(7)


def test_a_model_the_service_does_not_serve_is_a_404_naming_the_served_one(client):
    resp = chat(client, model="gpt-4o")
    assert resp.status_code == 404, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("model", "model_not_found", "invalid_request_error")
    assert "'gpt-4o'" in error["message"] and "'ftllm-chat-test'" in error["message"]


def test_store_false_keeps_the_completion_out_of_the_interaction_log(client):
    def streamed_id(**body) -> str:
        first = next(line for line in chat(client, stream=True, **body).text.splitlines() if line.startswith("data: {"))
        return json.loads(first[6:])["id"]

    kept = [chat(client, store=True).json()["id"], streamed_id(store=True)]
    unlogged = [chat(client, store=False).json()["id"], streamed_id(store=False)]
    for cid in kept:
        assert client.post("/feedback", json={"id": cid, "rating": 4}).status_code == 200
    for cid in unlogged:
        resp = client.post("/feedback", json={"id": cid, "rating": 4})
        assert (resp.status_code, resp.json()["error"]["code"]) == (404, "not_found")


def test_developer_messages_are_rendered_as_system_messages(client):
    system = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]
    developer = [{**system[0], "role": "developer"}, system[1]]
    as_system, as_developer = chat(client, messages=system).json(), chat(client, messages=developer).json()
    assert as_developer["usage"] == as_system["usage"]
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]


def test_a_name_the_template_does_not_write_is_refused_and_a_tool_results_name_is_not(client):
    # The tiny model's ChatML writes no names: the model would not see who speaks.
    named = [{"role": "system", "content": "Rewrite the ISO date in words."},
             {"role": "user", "content": "2001-02-03", "name": "alice"}]
    message = refused(chat(client, messages=named), "messages.1.name", "unsupported_value")
    assert "'alice'" in message and "does not write" in message
    result = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "12 degrees"}]
    assert chat(client, messages=result, tools=TOOLS).status_code == 200


def test_a_prompt_that_fills_the_context_is_refused_without_max_tokens(client):
    long = [{"role": "user", "content": "2001-02-03 " * 3000}]
    resp = client.post("/v1/chat/completions", json={"messages": long})
    message = refused(resp, "messages", "context_length_exceeded")
    assert "max_tokens" not in message and "leaves no room for an answer" in message  # it said max_tokens=1, not sent
    resp = client.post("/v1/chat/completions", json={"messages": long, "max_completion_tokens": 5})
    assert "with max_completion_tokens=5 it exceeds the model's context" in refused(resp, "messages", "context_length_exceeded")


@pytest.mark.parametrize(("body", "param", "said"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content", "'image_url'"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "False"),
    ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 2}}, "stream_options.chunk_size", ""),
])
def test_what_the_service_cannot_honour_in_a_known_field_is_refused_by_name(client, body, param, said):
    message = refused(chat(client, **body), param, "invalid_value")
    assert said in message


def test_a_call_written_with_empty_arguments_is_read_as_no_arguments(client):
    call = {**CALL, "function": {"name": "get_weather", "arguments": ""}}
    written = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_abc", "content": "12 degrees"}]
    as_object = [written[0], {**written[1], "tool_calls": [{**CALL, "function": {**CALL["function"], "arguments": "{}"}}]},
                 written[2]]
    empty, braces = chat(client, messages=written, tools=TOOLS), chat(client, messages=as_object, tools=TOOLS)
    assert empty.status_code == 200, empty.text
    assert empty.json()["usage"] == braces.json()["usage"]


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
     "tools.0.function.parameters"),
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
                      "tool_choice.function.name", "invalid_value")
    assert "get_time" in message


def test_parallel_tool_calls_false_returns_the_first_call_only():
    """The tool model of the HTTP tests writes one call per turn, so this reads two calls as a
    model that writes them would, through the plan the chat route makes."""
    from transformers import AutoTokenizer

    from serving.service import ChatPlan
    from tasks.config import ModelParams
    from tasks.model.chat import render_prompt
    from tasks.model.loading import resolve_base
    from tests.support.families import QWEN25_TEMPLATE

    tok = AutoTokenizer.from_pretrained(resolve_base(ModelParams()))
    tok.chat_template = QWEN25_TEMPLATE
    prompt = render_prompt(tok, MESSAGES, tools=TOOLS)
    text = "".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>\n'
                   for city in ("Oslo", "Paris"))
    for single, cities in ((False, ["Oslo", "Paris"]), (True, ["Oslo"])):
        parsed = ChatPlan(tok, prompt, tools=TOOLS, parse=True, single_call=single).read(text)
        assert [c.arguments["city"] for c in parsed.tool_calls] == cities


def test_a_forced_call_is_kept_when_a_call_after_it_is_invalid():
    """`tool_choice: required` with a valid first call and a broken second returned both as text
    (`invalid_tool_call`), where a named choice kept the first: the request asked for a call."""
    from transformers import AutoTokenizer

    from serving.service import ChatPlan
    from tasks.config import ModelParams
    from tasks.model.chat import render_prompt
    from tasks.model.loading import resolve_base
    from tests.support.families import QWEN25_TEMPLATE

    tok = AutoTokenizer.from_pretrained(resolve_base(ModelParams()))
    tok.chat_template = QWEN25_TEMPLATE
    prompt = render_prompt(tok, MESSAGES, tools=TOOLS)
    opening = '<tool_call>\n{"name": "'  # what the service writes for `required`
    written = ('get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"ci')  # the second cut off by max_tokens
    free = ChatPlan(tok, prompt, tools=TOOLS, parse=True).read(opening + written)
    assert free.invalid and not free.tool_calls  # not forced: every call read, the text as written
    plan = ChatPlan(tok, prompt, opening=opening, tools=TOOLS, parse=True)
    parsed = plan.read(written)
    assert parsed.invalid == "" and [c.arguments for c in parsed.tool_calls] == [{"city": "Oslo"}]
    assert plan.finish_reason(parsed, "length") == "tool_calls"
    both = written.removesuffix('{"ci') + '{"city": "Paris"}}\n</tool_call>'
    assert [c.arguments["city"] for c in plan.read(both).tool_calls] == ["Oslo", "Paris"]  # parallel calls stay
    broken_first = 'get_time", "arguments": {}}\n</tool_call>'
    assert plan.read(broken_first).invalid and plan.read(broken_first).tool_calls == []  # no valid call: text


def test_a_call_returned_as_text_finishes_as_the_setting_says():
    """A call to a function the request did not declare is returned as text, with the finish
    reason `serving.invalid_call_finish_reason` names (the default says what happened)."""
    from transformers import AutoTokenizer

    from serving.service import ChatPlan
    from tasks.config import ModelParams, ServingParams
    from tasks.model.chat import render_prompt
    from tasks.model.loading import resolve_base
    from tests.support.families import QWEN25_TEMPLATE

    tok = AutoTokenizer.from_pretrained(resolve_base(ModelParams()))
    tok.chat_template = QWEN25_TEMPLATE
    prompt = render_prompt(tok, MESSAGES, tools=TOOLS)
    undeclared = '<tool_call>\n{"name": "get_stock_price", "arguments": {"symbol": "ACME"}}\n</tool_call>'
    valid = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for setting in ("invalid_tool_call", "stop"):
        plan = ChatPlan(tok, prompt, tools=TOOLS, parse=True,
                        invalid_finish=ServingParams(invalid_call_finish_reason=setting).invalid_call_finish_reason)
        parsed = plan.read(undeclared)
        assert not parsed.tool_calls and parsed.invalid and parsed.text == undeclared
        assert plan.finish_reason(parsed, "stop") == setting
        assert plan.finish_reason(plan.read(valid), "stop") == "tool_calls"
    assert ServingParams().invalid_call_finish_reason == "invalid_tool_call"
