"""What the chat route refuses before generating, as OpenAI refuses it: each refusal a 400 whose
`param` is the field's path in the request, and the sampling settings an accepted request
becomes.

The route is the service's own (`tests.support.scripted_service`): with a family model's
tokenizer and a scripted engine, and for what sampling does, with the own decoding loop on
the untrained `tiny` base model. Nothing here trains.
"""

from __future__ import annotations

import pytest

from tests.support.scripted_service import local_chat, scripted_chat

ASK = {"role": "user", "content": "What is the weather in Oslo?"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def call(cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def calling(*cids: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [call(c) for c in cids]}


def result(cid: str) -> dict:
    return {"role": "tool", "tool_call_id": cid, "content": "12 degrees"}


ANSWER = {"role": "assistant", "content": "It is 12 degrees."}
AGAIN = {"role": "user", "content": "And tomorrow?"}


@pytest.fixture(scope="module")
def chat(family_models):
    with scripted_chat(family_models("qwen2.5")) as scripted:
        scripted.writes("It is 12 degrees.")
        yield scripted


def send(chat, **body):
    return chat.client.post("/v1/chat/completions", json={"messages": [ASK], "max_tokens": 8, **body})


def refused(resp, param: str, code: str = "invalid_value") -> str:
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    return error["message"]


# -- the path of an invalid field ----------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "said", "unsaid"), [
    # a dict for a union of a literal and an object: what is wrong inside the object
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": 1}}},
     "tool_choice.function.name", "valid string", "'auto'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function", "required", "'auto'"),
    # a string for the same union: the literal's choices, not the object's
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'auto'", "NamedToolChoice"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text", "required", "str"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages.0.content.0.text", "valid string", "list["),
    ({"stop": 5}, "stop", "valid string or a valid list", "list[str]"),
    ({"stop": ["###", 5]}, "stop.1", "valid string", "list["),
])
def test_an_invalid_field_of_a_union_is_named_by_its_path_in_the_request(chat, body, param, said, unsaid):
    message = refused(send(chat, **body), param)
    assert message.startswith(f"Invalid value for '{param}': ") and said in message and unsaid not in message


# -- tool calls and their results --------------------------------------------------------


@pytest.mark.parametrize(("messages", "param", "said"), [
    ([ASK, calling("call_a"), result("call_b")], "messages.2.tool_call_id", "'call_b'"),
    ([ASK, result("call_a")], "messages.1.tool_call_id", "'call_a'"),
    ([ASK, calling("call_a"), result("call_a"), result("call_a")], "messages.3.tool_call_id", "'call_a'"),
    # a result of an earlier turn's call, after the turn ended
    ([ASK, calling("call_a"), result("call_a"), ANSWER, AGAIN, result("call_a")], "messages.5.tool_call_id",
     "'call_a'"),
    # calls without results, before the next turn and at the end
    ([ASK, calling("call_a"), AGAIN], "messages.1.tool_calls", "'call_a'"),
    ([ASK, calling("call_a", "call_b"), result("call_b"), ANSWER], "messages.1.tool_calls", "'call_a'"),
    ([ASK, calling("call_a")], "messages.1.tool_calls", "'call_a'"),
    ([ASK, calling("call_a", "call_a"), result("call_a")], "messages.1.tool_calls.1.id", "'call_a'"),
])
def test_tool_results_that_do_not_answer_the_calls_before_them_are_refused(chat, messages, param, said):
    message = refused(send(chat, messages=messages, tools=TOOLS), param)
    assert said in message


@pytest.mark.parametrize(("message", "param", "said"), [
    ({"role": "tool", "content": "12 degrees"}, "messages.1.tool_call_id", "needs the tool_call_id"),
    ({"role": "tool", "tool_call_id": "call_a", "content": None}, "messages.1.content", "content is required"),
    ({"role": "assistant", "content": None}, "messages.1.content", "content is required"),
    ({"role": "user", "content": "Oslo?", "tool_calls": [call("call_a")]}, "messages.1.tool_calls",
     "only an assistant message"),
])
def test_a_message_missing_what_its_role_needs_is_refused_naming_the_field(chat, message, param, said):
    assert said in refused(send(chat, messages=[ASK, message], tools=TOOLS), param)


@pytest.mark.parametrize(("message", "param", "code", "said"), [
    # what a message cannot hold where it is: no template writes it there
    ({"role": "user", "content": "Oslo?", "reasoning_content": "I wonder."}, "messages.1.reasoning_content",
     "invalid_value", "only an assistant message has a reasoning trace"),
    ({"role": "tool", "tool_call_id": "call_a", "content": "1", "thinking": "x"}, "messages.1.thinking",
     "invalid_value", "only an assistant message has a reasoning trace"),
    ({"role": "user", "content": "Oslo?", "tool_call_id": "call_a"}, "messages.1.tool_call_id", "invalid_value",
     "only a tool message has a tool_call_id"),
    # fields of training data, or of no API, are not ignored
    ({"role": "assistant", "content": "Sunny.", "weight": 0}, "messages.1.weight", "invalid_value",
     "is not a field of this API"),
    ({"role": "user", "content": "Oslo?", "foo": 1}, "messages.1.foo", "invalid_value", "is not a field"),
    ({"role": "assistant", "content": "Sunny.", "function_call": {"name": "get_weather", "arguments": "{}"}},
     "messages.1.function_call", "invalid_value", "send the call in tool_calls"),
])
def test_a_message_field_the_service_would_not_render_is_refused_naming_it(chat, message, param, code, said):
    assert said in refused(send(chat, messages=[ASK, message, AGAIN], tools=TOOLS), param, code)


def test_what_openais_client_echoes_from_an_answer_is_accepted():
    """`message.model_dump()` of an answer: refusal, annotations, audio and a null function_call."""
    from openai.types.chat import ChatCompletionMessage

    echoed = ChatCompletionMessage(role="assistant", content="Sunny.", refusal=None, annotations=[]).model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= echoed.keys()
    from serving.schemas import ChatMessage

    assert ChatMessage.model_validate(echoed).canonical() == {"role": "assistant", "content": "Sunny."}


def test_calls_answered_in_any_order_and_ids_reused_in_a_later_turn_are_accepted(chat):
    messages = [ASK, calling("call_a", "call_b"), result("call_b"), result("call_a"), ANSWER, AGAIN,
                calling("call_a"), result("call_a")]
    assert send(chat, messages=messages, tools=TOOLS).status_code == 200


def test_tools_that_share_a_function_name_are_refused(chat):
    message = refused(send(chat, tools=[*TOOLS, TIME_TOOL, TOOLS[0]]), "tools.2.function.name")
    assert "'get_weather'" in message



@pytest.mark.parametrize(("ref", "said"), [("#/$defs/City", "does not resolve"),
                                           ("http://127.0.0.1:9/city.json", "nothing is fetched")])
def test_a_tool_schema_whose_ref_leads_outside_it_is_refused_and_not_fetched(chat, monkeypatch, ref, said):
    import socket
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a $ref was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather.", "parameters": {
        "type": "object", "properties": {"city": {"$ref": ref}}}}}]
    assert said in refused(send(chat, tools=tools), "tools.0.function.parameters")


def _nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize(("parameters", "said"), [
    ({"type": "object", "properties": {"city": {"$ref": "#/$defs/a"}},
      "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}, "leads back to itself"),
    (_nested(300), "nested too deeply"),
    ({"type": "string"}, 'type is "object"'),
])
def test_a_tool_schema_no_arguments_can_be_checked_against_is_refused_not_a_500(chat, parameters, said):
    """A loop of references or a schema nested past the checker's recursion made jsonschema
    recurse until Python stopped it: a 500, or a stream cut off, once the model called the tool."""
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time.", "parameters": parameters}}]
    for stream in (False, True):
        assert said in refused(send(chat, tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}},
                                    stream=stream), "tools.0.function.parameters")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_call_arguments_with_nan_or_infinity_are_not_json(chat, value):
    bad = {**call("c1"), "function": {"name": "get_weather", "arguments": f'{{"city": "Oslo", "n": {value}}}'}}
    message = refused(send(chat, tools=TOOLS, messages=[ASK, {"role": "assistant", "content": None, "tool_calls": [bad]},
                                                         result("c1")]),
                      "messages.1.tool_calls.0.function.arguments")
    assert "JSON number" in message


# -- fields that need another ---------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options"),
    ({"tools": []}, "tools"),
    ({"tool_choice": "none"}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
])
def test_a_field_without_the_field_it_qualifies_is_refused(chat, body, param):
    message = refused(send(chat, **body), param)
    assert f"'{param}'" in message


@pytest.mark.parametrize("body", [
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream_options": None, "tool_choice": None, "parallel_tool_calls": None, "tools": None},
    {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": False},
])
def test_the_same_fields_with_what_they_qualify_or_null_are_accepted(chat, body):
    assert send(chat, **body).status_code == 200


# -- sampling settings ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "temperature"), [
    ({"temperature": 1.0, "top_p": 0}, 0.0),
    ({"temperature": 0.7, "top_p": 0.0}, 0.0),
    ({"temperature": 0.7, "top_p": 0.5}, 0.7),
    ({"temperature": 0}, 0.0),
])
def test_top_p_zero_is_accepted_and_decodes_greedily(chat, body, temperature):
    assert send(chat, **body).status_code == 200
    row = chat.engine.completions[-1]
    assert (row.temperature, row.top_p) == (temperature, body.get("top_p", 1.0))


@pytest.mark.parametrize(("seed", "temperature"), [(7, 1.0), (7, 0.0), (-3, 0.5), (2**70, 1.5), (None, 1.0)])
def test_a_seed_is_accepted_at_any_temperature_and_reaches_the_engine(chat, seed, temperature):
    assert send(chat, seed=seed, temperature=temperature).status_code == 200
    assert chat.engine.completions[-1].seed == seed



def test_the_library_engine_refuses_a_seed_it_would_not_apply(chat):
    """serving.engine: transformers draws every row from one random state: a seed that would
    change a sampled answer is refused, not ignored; at temperature 0 it changes nothing."""
    from tasks.config import ServingParams

    own = chat.service.limits
    chat.service.limits = ServingParams(engine="transformers")
    try:
        message = refused(send(chat, seed=7, temperature=1.0), "seed", "unsupported_parameter")
        assert "serving.engine" in message
        assert send(chat, seed=7, temperature=0).status_code == 200
        assert send(chat, temperature=1.0).status_code == 200
    finally:
        chat.service.limits = own

@pytest.fixture(scope="module")
def sampling():
    """The chat route generating with the own decoding loop on the `tiny` base model (random
    weights, built once and cached: nothing is trained), which samples a different text for
    almost every draw."""
    from transformers import AutoTokenizer

    from serving.decoding import LoadedModel
    from tasks.config import ModelParams
    from tasks.model.loading import load_causal_lm, resolve_base

    base = resolve_base(ModelParams())
    with local_chat(LoadedModel(load_causal_lm(base).eval(), AutoTokenizer.from_pretrained(base), 2048)) as client:
        yield client


def answer(client, **body) -> str:
    resp = client.post("/v1/chat/completions", json={"messages": [ASK], "max_tokens": 16, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def test_two_requests_with_the_same_seed_sample_the_same_answer(sampling):
    first = answer(sampling, seed=7, temperature=1.0)
    assert answer(sampling, seed=7, temperature=1.0) == first
    assert answer(sampling, seed=8, temperature=1.0) != first


def test_top_p_zero_answers_as_temperature_zero(sampling):
    greedy = answer(sampling, temperature=0)
    assert answer(sampling, temperature=1.5, top_p=0) == answer(sampling, temperature=1.0, top_p=0.0) == greedy
    assert answer(sampling, temperature=1.5, top_p=1.0, seed=3) != greedy


def test_thinking_is_rendered_as_reasoning_content_is(family_models):
    """`thinking` is the other spelling of a trace the training data accepts: the service renders
    it too, rather than ignoring it as an unknown field."""
    def prompt_with(**trace) -> str:
        turn = {**calling("c1"), **trace}
        resp = chat.client.post("/v1/chat/completions", json={"messages": [ASK, turn, result("c1")], "tools": TOOLS,
                                                              "max_tokens": 4})
        assert resp.status_code == 200, resp.text
        return chat.engine.tokenizer.decode(chat.engine.completions[-1].prompt_ids)

    with scripted_chat(family_models("qwen3")) as chat:
        chat.writes("It is 12 degrees.")
        rendered = prompt_with(thinking="Look it up first.")
        assert "<think>\nLook it up first.\n</think>" in rendered
        assert prompt_with(reasoning_content="Look it up first.") == rendered
        both = chat.client.post("/v1/chat/completions", json={"messages": [
            ASK, {**calling("c1"), "thinking": "a", "reasoning_content": "b"}, result("c1")], "tools": TOOLS})
        assert "reasoning_content and thinking are two spellings of the trace" in refused(both, "messages.1.thinking")
