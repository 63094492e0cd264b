"""Masks of tool calling, weights and reasoning traces under real chat templates.

Every family whose published template renders tools (Qwen 2.5, Qwen 3, Llama 3.1, Mistral
v0.3) and the built-in `tiny` model's ChatML: the tool-call turn is trained as the template
writes it, with its end-of-turn token; the tool schemas and results are rendered and never
trained; `weight: 0` turns are left out; reasoning traces are trained unless
`train.train_reasoning` is off. Templates that would lose any of it are refused.
"""

from __future__ import annotations

import pytest

from tasks.config import ModelParams
from tasks.errors import ConfigError
from tasks.model.chat import encode_chat, encode_chats, render_prompt, unwritten_names
from tasks.model.loading import load_base_tokenizer, resolve_base

TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}
MESSAGES = [
    {"role": "user", "content": "What time is it in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "content": "20:03"},
    {"role": "assistant", "content": "It is 20:03 in Oslo."},
]
EXAMPLE = {"messages": MESSAGES, "tools": TOOLS}
ANSWER = "It is 20:03 in Oslo."

# What each template trains: the call as it writes it, the answer, each with its end of turn.
EXPECTED = {
    "tiny": ['<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
             f"{ANSWER}<|im_end|>"],
    "qwen2.5": ['<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                f"{ANSWER}<|im_end|>"],
    "qwen3": ['<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
              f"<think>\n\n</think>\n\n{ANSWER}<|im_end|>"],
    "llama3.1": ['{"name": "get_time", "parameters": {"city": "Oslo"}}<|eot_id|>', f"{ANSWER}<|eot_id|>"],
    "mistral": ['[TOOL_CALLS] [{"name": "get_time", "arguments": {"city": "Oslo"}, "id": "call00001"}]</s>',
                f" {ANSWER}</s>"],
}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny():
    return _tokenizer(resolve_base(ModelParams()))


@pytest.fixture
def tokenizer(request, tiny, family_models):
    return tiny if request.param == "tiny" else _tokenizer(family_models(request.param))


def trained_runs(tokenizer, enc) -> list[str]:
    """The decoded runs of consecutive masked-in tokens."""
    runs, run = [], []
    for token, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("tokenizer", list(EXPECTED), indirect=True)
def test_the_call_and_the_answer_are_trained_the_schema_and_the_result_are_not(tokenizer) -> None:
    family = "tiny" if "tiny" in tokenizer.name_or_path else tokenizer.name_or_path.rsplit("/", 1)[-1]
    enc = encode_chat(tokenizer, EXAMPLE)
    assert trained_runs(tokenizer, enc) == EXPECTED[family]
    assert enc.unlocated == 0
    text = tokenizer.decode(enc.input_ids)
    assert "The local time in a city." in text and "20:03" in text.split(ANSWER)[0]  # schema and result rendered
    # the prompt the service renders before the call is the trained text before it
    prompt = render_prompt(tokenizer, MESSAGES[:1], tools=TOOLS)
    first = enc.loss_mask.index(1)
    assert tokenizer.encode(prompt, add_special_tokens=False) == enc.input_ids[:first]


@pytest.mark.parametrize("tokenizer", ["tiny", "qwen3", "mistral"], indirect=True)
def test_weight_zero_turns_are_not_trained(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Rewrite 2006-02-20 in words."},
        {"role": "assistant", "content": "WRONG ANSWER DO NOT LEARN", "weight": 0},
        {"role": "user", "content": "Try again."},
        {"role": "assistant", "content": "February 20, 2006", "weight": 1},
    ]
    runs = trained_runs(tokenizer, encode_chat(tokenizer, messages))
    assert len(runs) == 1 and "February 20, 2006" in runs[0] and "WRONG" not in "".join(runs)
    assert "WRONG ANSWER" in tokenizer.decode(encode_chat(tokenizer, messages).input_ids)  # kept as context
    # with tools and a weight-0 call, only the answer is trained
    weighted = {**EXAMPLE, "messages": [MESSAGES[0], {**MESSAGES[1], "weight": 0}, *MESSAGES[2:]]}
    runs = trained_runs(tokenizer, encode_chat(tokenizer, weighted))
    assert len(runs) == 1 and ANSWER in runs[0] and "get_time" not in runs[0]


@pytest.mark.parametrize("tokenizer", ["tiny", "llama3.1"], indirect=True)
def test_train_turns_last_trains_only_the_last_assistant_turn(tokenizer) -> None:
    both = encode_chat(tokenizer, EXAMPLE)
    last = encode_chat(tokenizer, EXAMPLE, train_turns="last")
    assert len(trained_runs(tokenizer, both)) == 2
    assert trained_runs(tokenizer, last) == trained_runs(tokenizer, both)[-1:]
    with pytest.raises(ConfigError, match="train.train_turns='first'"):
        encode_chat(tokenizer, EXAMPLE, train_turns="first")


REASONED = [
    {"role": "user", "content": "What time is it in Oslo?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the clock of Oslo.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call00001", "content": "20:03"},
    {"role": "assistant", "content": ANSWER, "thinking": "The tool says 20:03."},
]


@pytest.mark.parametrize("tokenizer", ["qwen3", "tiny"], indirect=True)
def test_reasoning_traces_are_trained_unless_the_setting_leaves_them_out(tokenizer) -> None:
    example = {"messages": REASONED, "tools": TOOLS}
    runs = trained_runs(tokenizer, encode_chat(tokenizer, example))
    assert runs == [
        ('<think>\nI need the clock of Oslo.\n</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}'
         "\n</tool_call><|im_end|>"),
        f"<think>\nThe tool says 20:03.\n</think>\n\n{ANSWER}<|im_end|>",
    ]
    without = encode_chat(tokenizer, example, train_reasoning=False)
    assert trained_runs(tokenizer, without) == [
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>', f"{ANSWER}<|im_end|>"
    ]
    assert "I need the clock of Oslo." in tokenizer.decode(without.input_ids)  # still in the context


def test_a_trace_qwen3_drops_before_the_last_question_is_counted(family_models) -> None:
    tok = _tokenizer(family_models("qwen3"))
    messages = [
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "First trace."},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "No.", "reasoning_content": "Second trace."},
    ]
    enc = encode_chat(tok, messages)
    assert enc.reasoning_lost == 1 and enc.unlocated == 0
    assert trained_runs(tok, enc) == ["Yes.<|im_end|>", "<think>\nSecond trace.\n</think>\n\nNo.<|im_end|>"]
    assert encode_chat(tok, messages, train_reasoning=False).reasoning_lost == 0


def test_a_tool_round_before_a_later_question_is_trained_under_qwen3(family_models) -> None:
    """Qwen 3 writes a `<think>` block in a turn after the last user message and none once a later
    question follows, so the conversation before such a turn is not a prefix of the whole: the
    turn is found by its own words, and its trace, which the whole text does not hold, is lost."""
    tok = _tokenizer(family_models("qwen3"))
    call = {"id": "call00001", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}
    messages = [
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Look it up."},
        {"role": "tool", "tool_call_id": "call00001", "content": "20:03"},
        {"role": "assistant", "content": "It is 20:03.", "reasoning_content": "Read the result."},
        {"role": "user", "content": "Thanks. And Lima?"},
        {"role": "assistant", "content": "I would look it up."},
    ]
    example = {"messages": messages, "tools": TOOLS}
    runs = ['<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
            "It is 20:03.<|im_end|>", "<think>\n\n</think>\n\nI would look it up.<|im_end|>"]
    left_out = encode_chat(tok, example, train_reasoning=False)
    assert (left_out.unlocated, left_out.reasoning_lost) == (0, 0) and trained_runs(tok, left_out) == runs
    kept = encode_chat(tok, example)  # both traces are before the last question: both lost, both said
    assert (kept.unlocated, kept.reasoning_lost) == (0, 2)


def test_one_batched_call_equals_one_call_per_example(tiny) -> None:
    examples = [EXAMPLE, {"messages": REASONED, "tools": TOOLS}, {"messages": MESSAGES[:1] + [MESSAGES[-1]]}]
    assert encode_chats(tiny, examples) == [encode_chat(tiny, e) for e in examples]


@pytest.mark.parametrize("family", ["llama3", "gemma2", "phi3"])
def test_a_template_without_tools_is_refused_with_the_fix(family_models, family: str) -> None:
    tok = _tokenizer(family_models(family))
    with pytest.raises(ConfigError, match=rf"{family}: the chat template cannot train tool calling: .*"
                                          r"set model\.chat_template: chatml"):
        encode_chat(tok, EXAMPLE)
    fixed = load_base_tokenizer(ModelParams(base=str(family_models(family)), chat_template="chatml"))
    assert trained_runs(fixed, encode_chat(fixed, EXAMPLE)) == EXPECTED["tiny"]


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.1", "mistral"])
def test_a_template_that_drops_reasoning_is_refused_unless_traces_are_left_out(family_models, family: str) -> None:
    tok = _tokenizer(family_models(family))
    example = {"messages": [MESSAGES[0], {"role": "assistant", "content": ANSWER, "reasoning_content": "Hmm."}]}
    with pytest.raises(ConfigError, match=rf"{family}: the chat template drops the reasoning traces.*"
                                          r"model\.chat_template: chatml.*train\.train_reasoning: false"):
        encode_chat(tok, example)
    assert ANSWER in trained_runs(tok, encode_chat(tok, example, train_reasoning=False))[0]


@pytest.mark.parametrize("tokenizer", ["tiny", "qwen2.5", "llama3.1", "mistral"], indirect=True)
def test_an_empty_tool_calls_list_on_an_answer_is_a_plain_answer(tokenizer) -> None:
    # API exports write `"tool_calls": []` (or null) on an answer that calls nothing
    plain = [MESSAGES[0], {"role": "assistant", "content": ANSWER}]
    exported = [MESSAGES[0], {"role": "assistant", "content": ANSWER, "tool_calls": []}]
    enc = encode_chat(tokenizer, exported)
    assert enc.error == "" and enc.unlocated == 0
    assert enc == encode_chat(tokenizer, plain) and ANSWER in trained_runs(tokenizer, enc)[0]


def test_a_trace_written_inline_is_a_trace_and_a_turn_left_untrained_loses_none(family_models) -> None:
    tok = _tokenizer(family_models("qwen3"))
    inline = [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "<think>\nFirst trace.\n</think>\n\nYes."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "<think>\nSecond trace.\n</think>\n\nNo."},
    ]
    enc = encode_chat(tok, inline)  # Qwen 3 takes the first trace out, as it does a reasoning_content
    assert enc.unlocated == 0 and enc.reasoning_lost == 1
    assert trained_runs(tok, enc) == ["Yes.<|im_end|>", "<think>\nSecond trace.\n</think>\n\nNo.<|im_end|>"]
    keyed = [inline[0], {"role": "assistant", "content": "Yes.", "reasoning_content": "First trace."}, *inline[2:]]
    assert encode_chat(tok, keyed, train_turns="last").reasoning_lost == 0  # the lost trace is not trained anyway
    weighted = [inline[0], {**keyed[1], "weight": 0}, *inline[2:]]
    assert encode_chat(tok, weighted).reasoning_lost == 0
    # A trace taken out of an earlier turn whose words the answer (or the next question) repeats
    for first in ("<think>\nParis\n</think>\n\nThe capital is Paris.", "<think>Yes</think>Yes"):
        answer = first.split("</think>")[-1].strip()
        repeated = [{"role": "user", "content": "Capital? Yes or no?"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": f"{answer} Sure?"}, inline[3]]
        enc = encode_chat(tok, repeated)
        assert (enc.unlocated, enc.reasoning_lost) == (0, 1)
        assert trained_runs(tok, enc)[0] == f"{answer}<|im_end|>"



@pytest.mark.parametrize("answer", ["<think>double 2</think>4", "<think> double 2 </think> 4", "<think>\ndouble 2\n</think>\n\n4",
                                    "<think>double 2, is 4</think>4"])  # the answer's text inside the trace too
def test_a_trace_written_inline_in_other_whitespace_is_trained_not_lost(family_models, answer) -> None:
    """Qwen 3 writes the last turn's inline trace in its own block, with its own whitespace: the
    trace is in the trained text, so it is not lost (which validation would refuse)."""
    tok = _tokenizer(family_models("qwen3"))
    enc = encode_chat(tok, [{"role": "user", "content": "What is 2*2?"}, {"role": "assistant", "content": answer}])
    assert enc.reasoning_lost == 0 and enc.unlocated == 0 and enc.error == ""
    [run] = trained_runs(tok, enc)
    assert run.startswith("<think>\n") and "double 2" in run and run.replace(" ", "").endswith("</think>\n\n4<|im_end|>")

@pytest.mark.parametrize("tokenizer", ["mistral", "qwen2.5"], indirect=True)
def test_openai_call_ids_are_shortened_only_for_a_template_that_refuses_them(tokenizer) -> None:
    from tasks.model.chat import needs_short_call_ids

    openai = [MESSAGES[0], {**MESSAGES[1], "tool_calls": [{**CALL, "id": "call_abc123XYZ"}]},
              {**MESSAGES[2], "tool_call_id": "call_abc123XYZ"}, MESSAGES[3]]
    enc = encode_chat(tokenizer, {"messages": openai, "tools": TOOLS})
    assert enc.error == "" and enc.unlocated == 0 and len(trained_runs(tokenizer, enc)) == 2
    text = tokenizer.decode(enc.input_ids)
    mistral = "mistral" in tokenizer.name_or_path
    assert needs_short_call_ids(tokenizer) == mistral
    if mistral:  # v0.3 takes nine alphanumerics: the same ones for the call and its result
        short = text.split('"id": "', 1)[1][:9]
        assert "call_abc123XYZ" not in text and short.isalnum() and text.count(short) == 2
        # the service's prompt, with the same ids, is the trained text before the answer
        prompt = render_prompt(tokenizer, openai[:3], tools=TOOLS)
        assert text.startswith(tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False)))
    else:  # ids are not rendered: nothing changes
        assert text == tokenizer.decode(encode_chat(tokenizer, EXAMPLE).input_ids)


@pytest.mark.parametrize("tokenizer", ["mistral", "llama3.1", "tiny"], indirect=True)
def test_every_turn_of_a_multi_turn_tool_conversation_is_trained(tokenizer) -> None:
    # Mistral v0.3 writes the tools before the last user message only: an earlier turn's
    # prompt is not a prefix of the whole text, and its turns are found in it all the same
    rome = {**CALL, "id": "call00002", "function": {"name": "get_time", "arguments": '{"city": "Rome"}'}}
    messages = [
        {"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hello, how can I help?"},
        *MESSAGES,
        {"role": "user", "content": "And in Rome?"}, {"role": "assistant", "content": None, "tool_calls": [rome]},
        {"role": "tool", "tool_call_id": "call00002", "content": "20:03"}, {"role": "assistant", "content": "The same."},
    ]
    enc = encode_chat(tokenizer, {"messages": messages, "tools": TOOLS})
    runs = trained_runs(tokenizer, enc)
    assert enc.unlocated == 0 and enc.calls_lost == 0 and len(runs) == 5
    assert "Hello, how can I help?" in runs[0] and '"Oslo"' in runs[1] and ANSWER in runs[2]
    assert '"Rome"' in runs[3] and "The same." in runs[4]
    assert all("20:03" not in r for r in runs[:2] + runs[3:4])  # results stay untrained


NAMED = [{"role": "system", "content": "Answer the user by name.", "name": "rules"},
         {"role": "user", "content": "Hi, who am I?", "name": "alice"},
         {"role": "assistant", "content": "You are Alice."}]
NAMES_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if m.name %} {{ m.name }}{% endif %}{{ '\\n' }}"
                  "{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("tokenizer", ["tiny", "qwen2.5"], indirect=True)
def test_names_a_template_does_not_write_are_found_by_message(tokenizer) -> None:
    # What the service refuses a request for, and validation a line for (name_dropped).
    assert unwritten_names(tokenizer, NAMED) == [0, 1]
    assert unwritten_names(tokenizer, [*MESSAGES[:2], {**MESSAGES[2], "name": "get_time"}]) == []  # a result's name


def test_names_reach_a_template_that_writes_them(tiny) -> None:
    writer = _tokenizer(resolve_base(ModelParams()))
    writer.chat_template = NAMES_TEMPLATE
    assert unwritten_names(writer, NAMED) == []
    assert render_prompt(writer, NAMED[:2]).startswith("<|im_start|>system rules\n")
    assert "<|im_start|>user alice\nHi, who am I?" in render_prompt(writer, NAMED[:2])
