"""Calls the chat route reads from what a family's model writes, given as a script of tokens.

The route is the service's own; the engine decodes the scripted ids as the decoding loops do
(`tests.support.scripted_service`), with each family's real tokenizer and chat template.
"""

from __future__ import annotations

import json

import pytest

from tests.support.scripted_service import scripted_chat

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
TOOLS = [{"type": "function", "function": {"name": name, "description": description, "parameters": {
    "type": "object", "properties": properties, "required": list(properties)}}}
    for name, description, properties in (("get_weather", "The weather in a city.", {"city": {"type": "string"}}),
                                          ("get_time", "The time in a city.", {"city": {"type": "string"}}))]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def streamed_calls(chunks: list[dict]) -> tuple[list[dict], str, str]:
    """(the calls as the `openai` client's accumulator joins them, the content, the finish reason)."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chunks:
        choice = chunk["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            call["name"] += part.get("function", {}).get("name", "")
            call["arguments"] += part["function"].get("arguments", "")
        finish = choice["finish_reason"] or finish
    return [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()], content, finish


def answered_calls(answer: dict) -> tuple[list[dict], str | None, str]:
    """(the calls, the content, the finish reason) of a non-streamed answer."""
    choice = answer["choices"][0]
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for c in choice["message"].get("tool_calls") or []]
    return calls, choice["message"]["content"], choice["finish_reason"]


@pytest.mark.parametrize("family", ["mistral", "llama3.1"])
def test_a_call_the_model_writes_unforced_is_returned_as_a_call_streamed_or_not(family_models, family):
    """Mistral v0.3's `[TOOL_CALLS]` and Llama 3.1's `<|python_tag|>` are special tokens: the
    decoded text keeps them, so the call under `tool_choice: auto` is not read as text."""
    marker = {"mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
              "llama3.1": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}'}[family]
    wanted = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    with scripted_chat(family_models(family)) as chat:
        chat.writes(marker)
        assert answered_calls(chat.post(messages=MESSAGES, tools=TOOLS)) == (wanted, None, "tool_calls")
        assert streamed_calls(chat.stream(messages=MESSAGES, tools=TOOLS)) == (wanted, "", "tool_calls")


def test_text_before_an_unforced_mistral_call_is_its_content_and_other_special_tokens_are_dropped(family_models):
    with scripted_chat(family_models("mistral")) as chat:
        chat.writes('[INST]On it.[TOOL_CALLS] [{"name": "get_time", "arguments": {"city": "Oslo"}}]')
        calls, content, finish = answered_calls(chat.post(messages=MESSAGES, tools=TOOLS))
        assert (calls, content, finish) == ([{"name": "get_time", "arguments": {"city": "Oslo"}}], "On it.",
                                            "tool_calls")
        assert streamed_calls(chat.stream(messages=MESSAGES, tools=TOOLS)) == (calls, content, finish)
        # Without tools the text is the answer as written, the call marker included, the others not.
        chat.writes("[INST]Hello[TOOL_CALLS] there")
        assert answered_calls(chat.post(messages=MESSAGES))[1] == "Hello[TOOL_CALLS] there"


def test_a_stop_string_still_ends_the_answer_after_a_kept_marker(family_models):
    with scripted_chat(family_models("mistral")) as chat:
        chat.writes('Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
        answer = chat.post(messages=MESSAGES, stop=["[TOOL_CALLS]"])
        assert answered_calls(answer)[1:] == ("Sure.", "stop")
        chunks = chat.stream(messages=MESSAGES, stop=["[TOOL_CALLS]"])
        assert streamed_calls(chunks)[1:] == ("Sure.", "stop")


@pytest.mark.parametrize(("family", "calls", "all_valid"), [
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>', True),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                '{"name": "get_time", "arguments": {"city": "Oslo"}}]', True),
    # A call after the forced one to a function the request did not declare, or cut off by the
    # token limit, does not spoil the forced call.
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_news", "arguments": {}}\n</tool_call>', False),
    ("qwen2.5", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "argu', False),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "argu', False),
    # Llama 3.1 writes one call, an object rather than a list of them.
    ("llama3.1", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', False),
])
def test_a_named_tool_choice_returns_only_the_call_to_that_function(family_models, family, calls, all_valid):
    """OpenAI's named `tool_choice` answers with a call to that function only: calls the model
    writes after the forced one are dropped, whatever `parallel_tool_calls` says."""
    from tasks.model.forced_calls import forced_call_opening

    wanted = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    with scripted_chat(family_models(family)) as chat:
        # The model goes on from the opening the service appends to the prompt.
        opening = forced_call_opening(chat.engine.tokenizer, MESSAGES, TOOLS, "get_weather")
        assert calls.startswith(opening)
        chat.writes(calls.removeprefix(opening))
        for parallel in (None, True):
            body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": NAMED, "parallel_tool_calls": parallel}
            assert answered_calls(chat.post(**body)) == (wanted, None, "tool_calls")
            assert streamed_calls(chat.stream(**body)) == (wanted, "", "tool_calls")
        if not all_valid:
            return
        # `required` forces a call to the function the model scores highest (the first here: the
        # scripted engine scores them alike), and every call it writes comes back.
        opening = forced_call_opening(chat.engine.tokenizer, MESSAGES, TOOLS, "get_weather")
        chat.writes(calls.removeprefix(opening))
        body = {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"}
        assert [c["name"] for c in answered_calls(chat.post(**body))[0]] == ["get_weather", "get_time"]
        assert [c["name"] for c in streamed_calls(chat.stream(**body))[0]] == ["get_weather", "get_time"]


def test_a_trace_then_a_call_streams_as_it_answers_and_the_log_keeps_both(family_models, tmp_path):
    """Qwen 3 writes its `<think>` block before the call: streamed, the role's chunk carries the
    trace and `content: null`, so the client's accumulator makes the unstreamed message (content
    null beside the call); the log keeps the trace, and a call returned as text is logged as
    `invalid_tool_call` even when the client is told `stop`."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    from tasks.config import ServingParams
    from tasks.feedback import FeedbackReader, FeedbackStore

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        with scripted_chat(family_models("qwen3"), store) as chat:
            chat.writes(f"<think>\nI need the weather tool.\n</think>\n\n{call}")
            answer = chat.post(messages=MESSAGES, tools=TOOLS)
            message = answer["choices"][0]["message"]
            assert (message["content"], message["reasoning_content"]) == (None, "I need the weather tool.")
            chunks = chat.stream(messages=MESSAGES, tools=TOOLS)
            assert chunks[0]["choices"][0]["delta"]["content"] is None
            state = ChatCompletionStreamState()
            for chunk in chunks:
                state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
            accumulated = state.get_final_completion().choices[0]
            assert accumulated.message.content is None and accumulated.finish_reason == "tool_calls"
            assert accumulated.message.model_extra["reasoning_content"] == "I need the weather tool."
            chat.writes("<think>\nNothing to call.\n</think>\n\n")  # a trace, then no answer at all
            assert chat.post(messages=MESSAGES)["choices"][0]["message"]["content"] == ""
            state = ChatCompletionStreamState()
            for chunk in chat.stream(messages=MESSAGES):
                state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
            assert state.get_final_completion().choices[0].message.content == ""
            chat.service.limits = ServingParams(invalid_call_finish_reason="stop")
            chat.writes('<tool_call>\n{"name": "get_weather", "argu')
            broken = chat.post(messages=MESSAGES, tools=TOOLS)
            assert broken["choices"][0]["finish_reason"] == "stop"
        store.flush()
        with FeedbackReader(tmp_path / "feedback.db") as reader:
            logged = {row[0]: row[1:] for row in reader.conn.execute(
                "SELECT id, finish_reason, reasoning FROM interactions")}
        assert logged[answer["id"]] == ("tool_calls", "I need the weather tool.")
        assert logged[broken["id"]] == ("invalid_tool_call", None)
    finally:
        store.close()


def test_required_with_one_tool_writes_its_name_and_still_returns_every_call(family_models):
    """With one tool, `required` can only call that tool: its name is forced as a named choice
    forces it (a model that would write another name still calls it), yet, unlike a named
    choice, the calls it writes after the first come back too."""
    from tasks.model.forced_calls import forced_call_opening

    one = TOOLS[:1]
    calls = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    with scripted_chat(family_models("qwen2.5")) as chat:
        opening = forced_call_opening(chat.engine.tokenizer, MESSAGES, one, "get_weather")
        chat.writes(calls.removeprefix(opening))
        body = {"messages": MESSAGES, "tools": one, "tool_choice": "required"}
        wanted = [{"name": "get_weather", "arguments": {"city": city}} for city in ("Oslo", "Rome")]
        assert answered_calls(chat.post(**body)) == (wanted, None, "tool_calls")
        assert streamed_calls(chat.stream(**body)) == (wanted, "", "tool_calls")


@pytest.mark.parametrize(("family", "splits"), [("qwen2.5", False), ("llama3.1", False), ("qwen3", True)])
def test_a_think_block_is_read_alike_with_tools_offered_or_not(family_models, family, splits):
    """A trace is split off where the chat template writes traces (Qwen 3); where it does not,
    the model was never trained to write one, and a `<think>` block is answer text, also when
    the request offers tools (it was split off only then)."""
    text = "<think>\nçà 🙏\n</think>\n\nRéservé 東京 🙏"
    with scripted_chat(family_models(family)) as chat:
        chat.writes(text)
        for tools in (None, TOOLS):
            body = {"messages": MESSAGES, **({"tools": tools} if tools else {})}
            message = chat.post(**body)["choices"][0]["message"]
            streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chat.stream(**body))
            if splits:
                assert (message["content"], message["reasoning_content"]) == ("Réservé 東京 🙏", "çà 🙏")
            else:
                assert message["content"] == text and "reasoning_content" not in message, (tools, message)
            assert streamed == message["content"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e999"])
def test_a_call_whose_arguments_hold_nan_or_infinity_is_returned_as_text(family_models, value):
    """The library's parser reads NaN and Infinity, JSON does not define them: returned as a call,
    its `arguments` string would be refused by a client's JSON.parse."""
    call = f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo", "days": {value}}}}}\n</tool_call>'
    with scripted_chat(family_models("qwen2.5")) as chat:
        chat.writes(call)
        answer = chat.post(messages=MESSAGES, tools=TOOLS)
        assert answered_calls(answer) == ([], call, "invalid_tool_call")
        chunks = chat.stream(messages=MESSAGES, tools=TOOLS)
        assert not any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)


def test_arguments_nested_deeper_than_the_checks_recursed_are_checked_not_a_500(family_models):
    """A call whose arguments nest 450 deep made the route raise RecursionError in its NaN check (a
    500, or a stream cut off); as deep as JSON's parser reads, they are checked as any others.
    (Deeper ones, which the parser cannot read: tests/unit/model/test_responses.py.)"""
    from tasks.config import ServingParams

    deep = "[" * 450 + "]" * 450
    call = f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo", "x": {deep}}}}}\n</tool_call>'
    with scripted_chat(family_models("qwen2.5")) as chat:
        chat.service.limits = ServingParams(max_tokens=1300)
        chat.writes(call)
        answer = chat.post(messages=MESSAGES, tools=TOOLS, max_tokens=1300)
        chunks = chat.stream(messages=MESSAGES, tools=TOOLS, max_tokens=1300)
        assert answer["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_forced_opening_past_the_services_max_tokens_is_refused_not_run_past_it(family_models):
    """Without max_tokens the service's cap is the answer's: a forced opening that fills it would
    have the answer run past serving.max_tokens."""
    from tasks.config import ServingParams

    with scripted_chat(family_models("qwen2.5")) as chat:
        chat.service.limits = ServingParams(max_tokens=4)
        resp = chat.client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS,
                                                               "tool_choice": NAMED})
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "tool_choice" and "serving.max_tokens=4" in error["message"]
