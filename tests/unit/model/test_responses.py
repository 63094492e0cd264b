"""Generations read back into answers, reasoning traces and tool calls, for each call format.

The generations are hand-written in the format each family's published chat template
renders a call in (tests/families.py: Qwen 2.5 and Qwen 3's `<tool_call>` blocks,
Mistral v0.3's `[TOOL_CALLS]`); Llama 3.1's JSON object is given through its template's
signature. The tokenizers are the families' real ones.
"""

from __future__ import annotations

import json

import pytest

from tasks.model.chat import render_prompt
from tasks.model.forced_calls import call_choices, forced_call_opening
from tasks.model.responses import (
    ResponseStream,
    check_calls,
    detect_format,
    parse_generation,
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def tokenizers(family_models):  # noqa: F811
    from transformers import AutoTokenizer

    return lambda name: AutoTokenizer.from_pretrained(str(family_models(name)))


class _Template:
    """A stand-in tokenizer with only a chat template (format detection and parsing read nothing else)."""

    def __init__(self, chat_template: str) -> None:
        self.chat_template = chat_template


LLAMA31 = _Template('{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}<|start_header_id|>')


@pytest.mark.parametrize(("family", "expected"), [("qwen2.5", "hermes"), ("qwen3", "hermes"), ("mistral", "mistral"),
                                                  ("llama3", None), ("gemma2", None)])
def test_the_call_format_is_read_from_the_chat_template(tokenizers, family, expected):
    assert detect_format(tokenizers(family)) == expected
    assert detect_format(LLAMA31) == "llama3"


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_hermes_calls_are_parsed_with_the_text_before_them_as_content(tokenizers, family):
    tok = tokenizers(family)
    prompt = render_prompt(tok, QUESTION, tools=TOOLS)
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen", "days": 2}}\n</tool_call>')
    parsed = parse_generation(tok, text, prompt, TOOLS)
    assert parsed.content == "Let me look." and parsed.invalid == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"}),
                                                                  ("get_weather", {"city": "Bergen", "days": 2})]
    first = parsed.tool_calls[0].openai()
    assert first["type"] == "function" and first["id"].startswith("call_") and len(first["id"]) > 12
    assert json.loads(first["function"]["arguments"]) == {"city": "Oslo"}
    assert parsed.tool_calls[0].id != parsed.tool_calls[1].id


def test_llama_json_and_mistral_tool_calls_are_parsed():
    llama = parse_generation(LLAMA31, '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", TOOLS)
    assert [(c.name, c.arguments) for c in llama.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert llama.content == ""
    typed = '{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}'  # Llama 3.2's habit: was text
    assert [(c.name, c.arguments) for c in parse_generation(LLAMA31, typed, "", TOOLS).tool_calls] == [("get_weather", {"city": "Oslo"})]
    json_answer = parse_generation(LLAMA31, '{"type": "object", "name": "x"}', "", TOOLS)  # JSON, not a call
    assert json_answer.tool_calls == [] and json_answer.invalid == "" and json_answer.content == '{"type": "object", "name": "x"}'
    plain = parse_generation(LLAMA31, "It is sunny.", "", TOOLS)
    assert plain.content == "It is sunny." and plain.tool_calls == []
    mistral = _Template("{{ '[TOOL_CALLS] ' }}[INST]")
    parsed = parse_generation(mistral, 'On it. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}, '
                                       '"id": "abcdefghi"}]', "", TOOLS)
    assert parsed.content == "On it." and [c.name for c in parsed.tool_calls] == ["get_weather"]


@pytest.mark.parametrize(("text", "problem"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', "unparseable tool call"),
    ('<tool_call>\n{"name": get_weather}\n</tool_call>', "unparseable tool call"),
    ('<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>', "unknown function 'get_time'"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>', "fail its schema"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": "two"}}\n</tool_call>', "fail its schema"),
    ('<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>', "not a JSON object"),
])
def test_an_invalid_call_is_no_call_and_keeps_its_text(tokenizers, text, problem):
    tok = tokenizers("qwen2.5")
    parsed = parse_generation(tok, text, render_prompt(tok, QUESTION, tools=TOOLS), TOOLS)
    assert parsed.tool_calls == [] and problem in parsed.invalid
    assert parsed.answer == text


def test_without_tools_the_text_is_the_answer_as_written(tokenizers):
    tok = tokenizers("qwen2.5")
    text = ' <tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call> '
    parsed = parse_generation(tok, text, render_prompt(tok, QUESTION), None)
    assert parsed.tool_calls == [] and parsed.answer == text.strip()  # the call's text stays, trimmed as any answer


def test_reasoning_is_returned_apart_from_the_answer(tokenizers):
    tok = tokenizers("qwen3")
    prompt = render_prompt(tok, QUESTION, tools=TOOLS)
    text = '<think>\nOslo is a city; call the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    parsed = parse_generation(tok, text, prompt, TOOLS)
    assert parsed.reasoning_content == "Oslo is a city; call the tool."
    assert parsed.content == "" and parsed.tool_calls[0].arguments == {"city": "Oslo"}
    answer = parse_generation(tok, "<think>\nEasy.\n</think>\n\nIt is 20:03.", render_prompt(tok, QUESTION), None)
    assert (answer.reasoning_content, answer.content) == ("Easy.", "It is 20:03.")
    # A prompt that opened the block already (DeepSeek-R1 style): the trace ends at </think>.
    opened = parse_generation(tok, "Easy.\n</think>\n\nIt is 20:03.", "<|im_start|>assistant\n<think>\n", None)
    assert (opened.reasoning_content, opened.content) == ("Easy.", "It is 20:03.")


def test_the_models_own_response_template_comes_first(tokenizers):
    tok = tokenizers("gemma2")  # no call format of its own in the chat template
    text = '<call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": "2"}}</call>'
    assert parse_generation(tok, text, "", TOOLS).tool_calls == []
    tok.response_template = {"defaults": {"role": "assistant"}, "start_anchor": "<start_of_turn>model\n", "fields": {
        "tool_calls": {"open": "<call>", "close_pattern": r"</call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"$", "content": "text"}}}
    parsed = parse_generation(tok, text, "", TOOLS)
    # The model's own parser types the arguments from the tool's schema ("2" to 2), as transformers does.
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo", "days": 2})]


def test_check_calls_accepts_each_shape_and_string_arguments():
    calls, problem = check_calls([{"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "X"}}}],
                                 TOOLS)
    assert problem == "" and [c.arguments["city"] for c in calls] == ["Oslo", "X"]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_streamed_pieces_join_to_the_parsed_message(tokenizers, family):
    tok = tokenizers(family)
    prompt = render_prompt(tok, QUESTION, tools=TOOLS)
    for text in ['<think>\nhmm, Oslo\n</think>\n\nSure thing.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
                 "Just text, with  spaces. ", '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
                 '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
                 # Text after a call (valid or not) is neither lost nor sent twice.
                 'Hello <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\ntrailing text',
                 'Hi <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call> after',
                 '\n Hi <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n']:
        stream = ResponseStream(tok, prompt, TOOLS)
        pieces = [p for i in range(0, len(text), 3) for p in stream.feed(text[i:i + 3])]
        parsed, owed = stream.finish()
        pieces += owed
        assert "".join(t for f, t in pieces if f == "content") == parsed.answer, text
        assert "".join(t for f, t in pieces if f == "reasoning_content") == (parsed.reasoning_content or "")
        assert not any("<tool_call>" in t for f, t in pieces) or parsed.invalid


def test_a_reasoning_template_streams_a_plain_answer_as_it_answers_it(tokenizers):
    """Qwen 3's template is parsed for a trace even without tools: an answer without one, with
    whitespace around it, streams to the answer the route returns (no piece sent twice)."""
    tok = tokenizers("qwen3")
    prompt = render_prompt(tok, QUESTION)
    text = "\n\nHello world "
    stream = ResponseStream(tok, prompt, None)
    pieces = [p for i in range(0, len(text), 2) for p in stream.feed(text[i:i + 2])]
    parsed, owed = stream.finish()
    assert "".join(t for _, t in pieces + owed) == parsed.answer == "Hello world"


def test_text_on_both_sides_of_a_call_is_all_answer(tokenizers):
    tok = tokenizers("qwen2.5")
    text = 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\nOne moment.'
    parsed = parse_generation(tok, text, render_prompt(tok, QUESTION, tools=TOOLS), TOOLS)
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    assert parsed.content == "Let me look. One moment."


@pytest.mark.parametrize("after", ['<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',  # an unknown function
                                   '<tool_call>\n{"name": "get_weather", "arguments": {"ci'])  # cut off by the limit
def test_with_the_first_call_only_what_follows_it_cannot_make_it_invalid(tokenizers, after):
    tok = tokenizers("qwen2.5")
    prompt = render_prompt(tok, QUESTION, tools=TOOLS)
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' + after
    assert parse_generation(tok, text, prompt, TOOLS).invalid  # every call read: the second spoils the answer
    parsed = parse_generation(tok, text, prompt, TOOLS, first_call_only=True)
    assert parsed.invalid == "" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
    stream = ResponseStream(tok, prompt, TOOLS, first_call_only=True)
    pieces = [p for i in range(0, len(text), 4) for p in stream.feed(text[i:i + 4])]
    streamed, owed = stream.finish()
    assert pieces + owed == [] and streamed.tool_calls[0].arguments == {"city": "Oslo"}
    # An invalid first call is no call: the answer is the text as written, all of it.
    text = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>\n' + after
    parsed = parse_generation(tok, text, prompt, TOOLS, first_call_only=True)
    assert parsed.invalid and parsed.answer == text.strip()



@pytest.mark.parametrize("after", ['{"name": "get_time", "argu',  # cut off by the limit
                                   '{"name": "nope", "arguments": {}}]'])  # an unknown function
def test_with_the_first_call_only_a_mistral_list_keeps_its_first_call(tokenizers, after):
    """Mistral writes every call in one JSON list: the list is read as closed after its first call."""
    tok = tokenizers("mistral")
    prompt = render_prompt(tok, QUESTION, tools=TOOLS)
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, ' + after
    assert parse_generation(tok, text, prompt, TOOLS).invalid
    parsed = parse_generation(tok, text, prompt, TOOLS, first_call_only=True)
    assert parsed.invalid == "" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
    stream = ResponseStream(tok, prompt, TOOLS, first_call_only=True)
    pieces = [p for i in range(0, len(text), 4) for p in stream.feed(text[i:i + 4])]
    streamed, owed = stream.finish()
    assert pieces + owed == [] and [c.name for c in streamed.tool_calls] == ["get_weather"]
    # An invalid first call is no call: the answer is the text as written, all of it.
    text = '[TOOL_CALLS] [{"name": "nope", "arguments": {}}, ' + after
    parsed = parse_generation(tok, text, prompt, TOOLS, first_call_only=True)
    assert parsed.invalid and parsed.answer == text.strip()

@pytest.mark.parametrize(("family", "required", "named"), [
    ("qwen2.5", '<tool_call>\n{"name": "', '<tool_call>\n{"name": "get_weather", "arguments":'),
    # Qwen 3 writes an empty reasoning block before the last turn's call: a forced call has no trace.
    ("qwen3", '<think>\n\n</think>\n\n<tool_call>\n{"name": "',
     '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments":'),
    ("mistral", '[TOOL_CALLS] [{"name": "', '[TOOL_CALLS] [{"name": "get_weather", "arguments":'),
    ("llama3.1", '{"name": "', '{"name": "get_weather", "parameters":'),
])
def test_the_opening_of_a_forced_call_comes_from_the_template_and_closes_the_name(tokenizers, family, required,
                                                                                   named):
    """A named opening runs on through what the template writes up to the arguments: ending at the
    name, the model went on from `get` to `get_weather` and called another function."""
    tok = tokenizers(family)
    assert forced_call_opening(tok, QUESTION, TOOLS, None) == required
    # up to where a token of the call ends: `": ` is one token in some vocabularies
    assert forced_call_opening(tok, QUESTION, TOOLS, "get_weather").rstrip(" ") == named
    assert forced_call_opening(tokenizers("gemma2"), QUESTION, TOOLS, None) is None


@pytest.mark.parametrize("family", ["qwen2.5", "mistral", "llama3.1"])
def test_each_function_of_a_choice_has_its_named_opening(tokenizers, family):
    """`tool_choice: required` ranks the functions by their openings' likelihood: the name with
    what follows it, so `get_weather` is not the likelier for being the start of `get_weather_now`."""
    tok = tokenizers(family)
    tools = [*TOOLS, {"type": "function", "function": {**TOOLS[0]["function"], "name": "get_weather_now"}}]
    choices = call_choices(tok, QUESTION, tools)
    assert [c.name for c in choices] == ["get_weather", "get_weather_now"]
    for choice in choices:
        assert choice.opening == forced_call_opening(tok, QUESTION, tools, choice.name)
        assert choice.opening.startswith(forced_call_opening(tok, QUESTION, tools, None) + choice.name + '"')
    assert call_choices(tokenizers("gemma2"), QUESTION, tools) is None


def test_a_named_opening_stops_where_the_vocabulary_ends_a_token():
    """The tiny model's vocabulary writes `",` as one token: a named opening that ended with
    the lone quote gave the model a token it never saw there, and it skipped its arguments."""
    from transformers import AutoTokenizer

    from tasks.config import ModelParams
    from tasks.model.loading import resolve_base
    from tests.support.families import QWEN25_TEMPLATE

    tok = AutoTokenizer.from_pretrained(resolve_base(ModelParams()))
    tok.chat_template = QWEN25_TEMPLATE
    assert '",' in tok.tokenize('{"name": "get_weather", "arguments": {}}')
    named = forced_call_opening(tok, QUESTION, TOOLS, "get_weather")
    assert named.startswith('<tool_call>\n{"name": "get_weather",') and named.rstrip(" ").endswith('"arguments":')
    text = named + ' {"city": "Oslo"}}'
    assert [s for _, s in tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]].count(
        len(named)) == 1  # a token of the call as written ends where the opening ends
    assert forced_call_opening(tok, QUESTION, TOOLS, None) == '<tool_call>\n{"name": "'


def test_a_call_nested_deeper_than_the_parser_reads_is_an_invalid_call_not_a_crash(tokenizers):
    tok = tokenizers("qwen2.5")
    prompt = render_prompt(tok, QUESTION, "auto", TOOLS)
    deep = "[" * 5000 + "]" * 5000
    text = f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo", "x": {deep}}}}}\n</tool_call>'
    parsed = parse_generation(tok, text, prompt, TOOLS)
    assert parsed.invalid and not parsed.tool_calls and parsed.answer == text
    stream = ResponseStream(tok, prompt, TOOLS)
    pieces = [p for i in range(0, len(text), 64) for p in stream.feed(text[i:i + 64])]
    final, owed = stream.finish()
    assert final.invalid and not final.tool_calls and "".join(d for _, d in pieces + owed) == text


def test_call_ids_have_openais_shape():
    import re

    from tasks.model.responses import new_call_id

    ids = {new_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
