"""Tool calling over real HTTP with the official openai client: a call, streamed and not, then its
result sent back and the answer received with its reasoning trace apart.

The server (`tools_server`) serves a tiny model trained in the session to call
`get_weather` (`train_tool_caller` in tests/support/training.py says how and why): a random-weight model
never writes a call, so only a model that does can show that the service renders the
tools, lets the model write the call, parses and checks it, and returns it as OpenAI does.
"""

from __future__ import annotations

import json

import httpx
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.support.training import TOOLS_MODEL_NAME, WEATHER_TOOLS

ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def _joined_stream(chunks) -> tuple[str, list[dict], str | None]:
    """(content, calls, finish_reason) from streamed chunks, joined as OpenAI's clients join them."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.slow
def test_the_openai_client_gets_a_call_streamed_and_not_then_the_answer_from_its_result(tools_server, serving_dir):
    client = _client(tools_server)
    done = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                          temperature=0, max_tokens=120)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}

    stream = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                            temperature=0, max_tokens=120, stream=True)
    chunks = list(stream)
    content, calls, finish = _joined_stream(chunks)
    assert (content, finish) == ("", "tool_calls")
    # As OpenAI sends a call that comes first: the role and the call in one chunk, content null;
    # the client library's own stream accumulator then makes the message the answer not streamed is.
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.content is None and opening.tool_calls
    state = ChatCompletionStreamState(input_tools=WEATHER_TOOLS)
    for chunk in chunks:
        state.handle_chunk(chunk)
    accumulated = state.get_final_completion().choices[0]
    assert accumulated.finish_reason == "tool_calls" and accumulated.message.content is None
    assert [(c.id.startswith("call_"), c.function.name, c.function.arguments) for c in accumulated.message.tool_calls] == [
        (True, "get_weather", call.function.arguments)]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0]["id"].startswith("call_")
    # As OpenAI streams a call: first its id and name, then its arguments.
    call_deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert call_deltas[0].id and call_deltas[0].function.name == "get_weather"
    assert call_deltas[-1].id is None and call_deltas[-1].function.arguments

    # The tool's result goes back with the assistant's call, as an agent loop sends it.
    followed = [*ASK, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "12 degrees and rain"}]
    final = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=followed, tools=WEATHER_TOOLS,
                                           temperature=0, max_tokens=60)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == "In Oslo it is 12 degrees and rain."
    assert not final.choices[0].message.tool_calls
    # The model's trace (its <think> block) comes apart from the answer, as reasoning APIs return it.
    assert final.choices[0].message.model_extra["reasoning_content"] == "The tool says 12 degrees and rain."
    chunks = list(client.chat.completions.create(
        model=TOOLS_MODEL_NAME, messages=followed, tools=WEATHER_TOOLS, temperature=0, max_tokens=60, stream=True))
    assert _joined_stream(chunks) == ("In Oslo it is 12 degrees and rain.", [], "stop")
    trace = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert trace == "The tool says 12 degrees and rain."

    # A rated call is exported as a training example with its tools and its call. The server
    # has no keys, so the rating waits for approval: the export admits it once approved.
    assert httpx.post(f"{tools_server}/feedback", json={"id": done.id, "rating": 5}).status_code == 200
    from tasks.feedback.export import ExportPolicy, export_feedback

    out = serving_dir / "tools-feedback.jsonl"
    export_feedback(serving_dir / "tools-feedback.db", out, 4, policy=ExportPolicy(auto_approve="all"))
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    [example] = [e for e in exported if e["messages"][-1].get("tool_calls")]
    assert example["tools"] == WEATHER_TOOLS and example["messages"][:-1] == [{**ASK[0], "content": ASK[0]["content"]}]
    assert example["messages"][-1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                                     "arguments": '{"city": "Oslo"}'}


@pytest.mark.slow
def test_a_call_a_stop_string_cuts_short_ends_with_stop_not_as_an_invalid_call(tools_server):
    """The client's `stop` cut the call mid-way, and the answer came back `invalid_tool_call`, as if
    the model had written a broken call; a `max_tokens` cut says `length`."""
    client = _client(tools_server)
    cut = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                         temperature=0, max_tokens=120, stop=["Oslo"])
    assert cut.choices[0].finish_reason == "stop" and not cut.choices[0].message.tool_calls
    assert "get_weather" in cut.choices[0].message.content and "Oslo" not in cut.choices[0].message.content
    chunks = list(client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                                 temperature=0, max_tokens=120, stop=["Oslo"], stream=True))
    content, calls, finish = _joined_stream(chunks)
    assert (content, calls, finish) == (cut.choices[0].message.content, [], "stop")


@pytest.mark.slow
def test_tool_choice_none_gets_no_call_and_a_named_choice_forces_that_function(tools_server, serving_dir):
    client = _client(tools_server)
    none = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                          tool_choice="none", temperature=0, max_tokens=30)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    # "Hello there" is answered with text when the model may choose; named, the call is forced.
    hello = [{"role": "user", "content": "Hello there"}]
    free = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=hello, tools=WEATHER_TOOLS,
                                          temperature=0, max_tokens=30)
    assert free.choices[0].finish_reason == "stop" and not free.choices[0].message.tool_calls
    forced = client.chat.completions.create(
        model=TOOLS_MODEL_NAME, messages=hello, tools=WEATHER_TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = forced.choices[0]
    assert choice.finish_reason in ("tool_calls", "invalid_tool_call"), choice
    if choice.finish_reason == "tool_calls":
        assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    else:  # the model wrote arguments that fail the schema: returned as the text it wrote
        assert choice.message.content.startswith('<tool_call>\n{"name": "get_weather"')
    # The log keeps the choice that forced each answer, so the exports do not teach it as the model's own.
    from tasks.feedback import FeedbackReader

    for done in (none, free, forced):
        assert httpx.post(f"{tools_server}/feedback", json={"id": done.id, "rating": 5}).status_code == 200
    with FeedbackReader(serving_dir / "tools-feedback.db") as reader:
        logged = {i.id: i for i, _ in reader.rated_completions()[0]}
    assert [logged[d.id].tool_choice for d in (none, free, forced)] == [
        "none", None, {"type": "function", "function": {"name": "get_weather"}}]
    assert [logged[d.id].forced for d in (none, free, forced)] == [True, False, True]


@pytest.mark.slow
def test_a_correction_of_an_answer_under_tool_choice_none_is_exported_with_the_declared_tools(tools_server, serving_dir):
    """Agent loops send the last round, with the call and its result in the history, under
    `tool_choice: none`: the log kept no tools, so the corrected example's call named no declared
    tool and the export left the correction out."""
    import uuid

    from tasks.feedback.export import ExportPolicy, export_feedback

    call = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    city = f"Oslo {uuid.uuid4().hex[:6]}"  # this test's own example among the session's
    history = [{"role": "user", "content": f"What is the weather in {city}?"},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_0", "content": "12 degrees and rain"}]
    done = _client(tools_server).chat.completions.create(model=TOOLS_MODEL_NAME, messages=history, tools=WEATHER_TOOLS,
                                                         tool_choice="none", temperature=0, max_tokens=30)
    corrected = {"id": done.id, "rating": 1, "correction": "In Oslo it is 12 degrees and rain."}
    assert httpx.post(f"{tools_server}/feedback", json=corrected).status_code == 200
    out = serving_dir / "tools-none-feedback.jsonl"
    export_feedback(serving_dir / "tools-feedback.db", out, 4, policy=ExportPolicy(auto_approve="all"))
    [example] = [e for line in out.read_text().splitlines()
                 if (e := json.loads(line))["messages"][0]["content"].endswith(f"{city}?")]
    assert example["tools"] == WEATHER_TOOLS
    assert example["messages"][-1]["content"] == "In Oslo it is 12 degrees and rain."
    assert example["messages"][1]["tool_calls"] == [call]  # the history's call, as sent


# ------------------------------------------------------------------------------ what clients send
# The requests that the openai client's tool loop and agent frameworks send, over HTTP.

CALLED = ("get_weather", {"city": "Oslo"})


def _call_of(completion) -> tuple[str, dict]:
    [call] = completion.choices[0].message.tool_calls
    return call.function.name, json.loads(call.function.arguments)


@pytest.mark.slow
def test_the_answer_goes_back_as_the_client_holds_it_object_or_dumped(tools_server):
    """OpenAI's function-calling guide appends the client's message object; other loops its
    `model_dump()` (refusal, annotations, audio, function_call as null) or without the nulls,
    or the message the client's stream helper joined (with `index`, `parsed_arguments`, `parsed`)."""
    client = _client(tools_server)
    asked = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, temperature=0,
                                           max_tokens=120)
    with client.chat.completions.stream(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, temperature=0,
                                        max_tokens=120) as stream:
        joined = stream.get_final_completion().choices[0].message
    for message in (asked.choices[0].message, joined):
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [CALLED]
        result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "12 degrees and rain"}
        for echoed in (message, message.model_dump(), message.model_dump(exclude_none=True)):
            final = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=[*ASK, echoed, result],
                                                   tools=WEATHER_TOOLS, temperature=0, max_tokens=60)
            assert final.choices[0].message.content == "In Oslo it is 12 degrees and rain.", echoed


@pytest.mark.slow
def test_parallel_calls_and_their_results_are_all_rendered(tools_server):
    client = _client(tools_server)

    def call(i: int, city: str) -> dict:
        return {"id": f"call_{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}

    one = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call(1, "Oslo")]},
           {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees and rain"}]
    two = [*one[:1], {"role": "assistant", "content": None, "tool_calls": [call(1, "Oslo"), call(2, "Paris")]},
           one[2], {"role": "tool", "tool_call_id": "call_2", "content": "20 degrees and sun"}]
    sizes = [client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=m, tools=WEATHER_TOOLS, temperature=0,
                                            max_tokens=4).usage.prompt_tokens for m in (one, two)]
    assert sizes[1] > sizes[0] + 10  # the second call and its result are in the prompt
    for parallel in (True, False):
        done = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, temperature=0,
                                              max_tokens=120, parallel_tool_calls=parallel)
        assert _call_of(done) == CALLED


@pytest.mark.slow
def test_required_and_named_tool_choice_force_the_call_streamed_and_not(tools_server):
    import openai

    client = _client(tools_server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        done = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                              tool_choice=choice, temperature=0, max_tokens=120)
        assert done.choices[0].finish_reason == "tool_calls", done.choices[0]
        assert _call_of(done) == CALLED
        _, calls, finish = _joined_stream(client.chat.completions.create(
            model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, tool_choice=choice, temperature=0,
            max_tokens=120, stream=True))
        assert finish == "tool_calls" and [(c["name"], json.loads(c["arguments"])) for c in calls] == [CALLED]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert refused.value.param == "tool_choice.function.name" and "get_time" in refused.value.message


@pytest.mark.slow
def test_a_forced_calls_opening_is_answer_in_usage_and_under_max_tokens(tools_server):
    """The service writes a forced call's opening into the prompt, but the client gets it as
    answer: counted as completion tokens, as the same call written by the model under `auto`."""
    import openai

    client = _client(tools_server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    usage = {choice if isinstance(choice, str) else "named": client.chat.completions.create(
        model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, tool_choice=choice, temperature=0,
        max_tokens=120).usage for choice in ("auto", "required", named)}
    for forced in ("required", "named"):
        assert usage[forced].prompt_tokens == usage["auto"].prompt_tokens, usage
        assert abs(usage[forced].completion_tokens - usage["auto"].completion_tokens) <= 1, usage
    cut = client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, tool_choice=named,
                                         temperature=0, max_tokens=usage["auto"].completion_tokens - 2)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == usage["auto"].completion_tokens - 2
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, tool_choice=named,
                                       max_tokens=1)
    assert refused.value.param == "max_tokens" and "opening" in refused.value.message


@pytest.mark.slow
def test_fields_clients_send_at_their_defaults_change_nothing(tools_server):
    client = _client(tools_server)
    plain = dict(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS, temperature=0, max_tokens=120)
    for extra in ({"n": 1}, {"max_completion_tokens": 120}, {"seed": 42}, {"stop": "###"}, {"stop": ["\n\n\n", "###"]},
                  {"user": "user-7"}, {"store": True}, {"metadata": {}}, {"logprobs": False},
                  {"presence_penalty": 0}, {"frequency_penalty": 0}, {"response_format": {"type": "text"}},
                  {"tool_choice": "auto"}, {"parallel_tool_calls": True}):
        done = client.chat.completions.create(**{**plain, **extra})
        assert done.choices[0].finish_reason == "tool_calls" and _call_of(done) == CALLED, extra


@pytest.mark.slow
def test_the_usage_chunk_comes_as_openai_sends_it(tools_server):
    client = _client(tools_server)
    chunks = list(client.chat.completions.create(model=TOOLS_MODEL_NAME, messages=ASK, tools=WEATHER_TOOLS,
                                                 temperature=0, max_tokens=120, stream=True,
                                                 stream_options={"include_usage": True}))
    *answer, last = chunks
    assert last.choices == [] and last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens > 5 and all(c.usage is None and c.choices for c in answer)
    body = {"messages": ASK, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    events = [json.loads(line[6:]) for line in httpx.post(f"{tools_server}/v1/chat/completions", json=body,
                                                           timeout=60).text.splitlines()
              if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])  # null, as OpenAI writes it
    assert events[-1]["choices"] == [] and events[-1]["system_fingerprint"] == events[0]["system_fingerprint"]


@pytest.mark.slow
def test_refusals_reach_the_client_as_openai_errors(tools_server):
    import openai

    client = _client(tools_server)
    cases = [
        (openai.NotFoundError, "model", {"model": "gpt-4o"}),
        (openai.BadRequestError, "messages.0.content",
         {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}),
        (openai.BadRequestError, "tools.0.function.parameters",
         {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}),
        (openai.BadRequestError, "response_format", {"response_format": {"type": "json_object"}}),
        (openai.BadRequestError, "stream_options", {"stream_options": {"include_usage": True}}),
        (openai.APIStatusError, None, {"messages": [{"role": "user", "content": "x" * 100_000}]}),
    ]
    for error, param, body in cases:
        with pytest.raises(error) as raised:
            client.chat.completions.create(**{"model": TOOLS_MODEL_NAME, "messages": ASK, "max_tokens": 8, **body})
        assert set(raised.value.body) == {"message", "type", "param", "code"}, raised.value.body
        assert raised.value.param == param and raised.value.message, raised.value.body
    assert client.models.retrieve(TOOLS_MODEL_NAME).id == TOOLS_MODEL_NAME
    with pytest.raises(openai.NotFoundError) as unknown:
        client.models.retrieve("gpt-4o")
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model=TOOLS_MODEL_NAME, input="hi")
    assert unknown.value.code == "not_found"
    assert "POST /v1/responses" in unknown.value.message and "/v1/chat/completions" in unknown.value.message


@pytest.mark.slow
def test_an_open_services_feedback_limit_is_per_client_address(tools_server):
    """With no key set every caller is `anonymous`: the limit (30 a minute, the shipped setting)
    is the client's address, as the real server sees it. Last in this module: it uses up
    127.0.0.1's limit for a minute."""
    missing = {"id": "chatcmpl-none", "rating": 3}
    with httpx.Client(base_url=tools_server, timeout=30) as local:
        statuses = [local.post("/feedback", json=missing).status_code for _ in range(31)]
        assert statuses[-1] == 429 and set(statuses[:-1]) <= {404, 429}, statuses
        limited = local.post("/feedback", json=missing).json()["error"]["message"]
        assert "for the client '127.0.0.1'" in limited, limited
    other = httpx.Client(base_url=tools_server, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:  # another client (Linux answers on all of 127.0.0.0/8) has a limit of its own
        assert other.post("/feedback", json=missing).status_code == 404
