"""Assistant masks under real chat templates: exactly the answers and their end-of-turn tokens.

Each family's tokenizer (tests/support/families.py) carries its published template, special tokens
and BOS post-processor, so these tests meet Mistral's system message in the last user
turn, Gemma's refusal of a system role, Phi-3's role tokens that eat a newline, Qwen 3's
rewriting of the last answer, and BOS written by both template and tokenizer.
"""

from __future__ import annotations

import pytest

from tasks.config import ModelParams, TrainParams
from tasks.errors import ConfigError
from tasks.model.chat import encode_chat, encode_chats, encode_text, render_prompt, system_handling
from tasks.model.loading import resolve_base
from tasks.train.packing import prepare_batches

SYSTEM = "Answer in words."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, 6."},
]
ANSWERS = ("It is four.", "Six, 6.")

# What the model writes after each generation prompt: the answer as the template puts it
# (Mistral's leading space, Qwen 3's empty think block on the last turn) and the end of turn.
EXPECTED = {
    "llama3": ["{0}<|eot_id|>", "{1}<|eot_id|>"],
    "qwen2.5": ["{0}<|im_end|>", "{1}<|im_end|>"],
    "qwen3": ["{0}<|im_end|>", "<think>\n\n</think>\n\n{1}<|im_end|>"],
    "mistral": [" {0}</s>", " {1}</s>"],
    "gemma2": ["{0}<end_of_turn>", "{1}<end_of_turn>"],
    "phi3": ["{0}<|end|>", "{1}<|end|>"],
}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def tiny():
    return _tokenizer(resolve_base(ModelParams()))


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


@pytest.mark.parametrize("family", list(EXPECTED))
@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
def test_masked_tokens_are_the_answers_and_their_end_of_turn(family_models, family: str, system: bool) -> None:
    tok = _tokenizer(family_models(family))
    enc = encode_chat(tok, CONVERSATION if system else CONVERSATION[1:])
    assert trained_runs(tok, enc) == [e.format(*ANSWERS) for e in EXPECTED[family]]
    if family in ("llama3", "mistral", "gemma2"):  # BOS from the template; the tokenizer would add another
        assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", [*EXPECTED, "tiny"])
def test_an_answer_that_ends_in_a_character_of_several_bytes_is_trained_to_its_end_of_turn(tiny, family_models,
                                                                                           family: str) -> None:
    """A byte-level BPE writes "✓" as three tokens with the character's offsets: only the first was
    trained, and neither the rest of the character nor the end of turn, so the model never learnt to stop."""
    tok = tiny if family == "tiny" else _tokenizer(family_models(family))
    end = {"tiny": ["{0}<|im_end|>", "{1}<|im_end|>"], **EXPECTED}[family]
    answers = ("Gespeichert ✓", "東京 🚀")
    conversation = [*CONVERSATION[1:2], {"role": "assistant", "content": answers[0]},
                    *CONVERSATION[3:4], {"role": "assistant", "content": answers[1]}]
    enc = encode_chat(tok, conversation)
    assert trained_runs(tok, enc) == [e.format(*answers) for e in end]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_the_served_prompt_is_the_trained_text_before_the_last_answer(family_models, family: str) -> None:
    tok = _tokenizer(family_models(family))
    enc = encode_chat(tok, CONVERSATION)
    last_end = max(i for i, m in enumerate(enc.loss_mask) if m) + 1
    last_start = last_end - enc.last_answer_tokens
    assert enc.loss_mask[last_start:last_end] == [1] * enc.last_answer_tokens and enc.loss_mask[last_start - 1] == 0
    prompt = render_prompt(tok, CONVERSATION[:-1])
    assert tok(prompt, add_special_tokens=False)["input_ids"] == enc.input_ids[:last_start]
    assert SYSTEM in prompt  # kept, or merged into the first user turn: never lost


@pytest.mark.parametrize("family", list(EXPECTED))
def test_the_served_prompt_encodes_as_the_tokenizer_encodes_it(family_models, family: str) -> None:
    tok = _tokenizer(family_models(family))
    texts = [render_prompt(tok, CONVERSATION[:-1]), " leading space, two  spaces\n\ttab", "naïve — 日本語 🙂",
             f"{tok.eos_token} written as text, then {tok.pad_token or ''}"]
    for text in texts:
        assert encode_text(tok, text) == tok.encode(text, add_special_tokens=False), text


def test_tiny_chatml_masks_answers_with_im_end(tiny) -> None:
    enc = encode_chat(tiny, CONVERSATION)
    assert trained_runs(tiny, enc) == [f"{a}<|im_end|>" for a in ANSWERS]
    assert enc.last_answer_tokens == len(tiny.encode("Six, 6.<|im_end|>", add_special_tokens=False))


def test_generation_blocks_decide_the_mask(tiny) -> None:
    tok = tiny.__class__.from_pretrained(tiny.name_or_path)
    tok.chat_template = (  # plain ChatML, with the answers in generation blocks
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    enc = encode_chat(tok, CONVERSATION)
    assert trained_runs(tok, enc) == [f"{a}<|im_end|>" for a in ANSWERS]
    expected = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert enc.loss_mask == list(expected["assistant_masks"])


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_auto_merges_a_system_message_the_template_would_lose_and_keep_refuses(family_models, family: str) -> None:
    tok = _tokenizer(family_models(family))
    assert system_handling(tok, "auto").action == "merge"
    text = tok.decode(encode_chat(tok, CONVERSATION).input_ids)
    assert f"{SYSTEM}\n\nWhat is 2+2?" in text and text.count(SYSTEM) == 1
    with pytest.raises(ConfigError, match=rf"{family}.*data.system_message=keep.*set data.system_message to merge"):
        encode_chat(tok, CONVERSATION, system_message="keep")


def test_drop_removes_the_system_message(family_models) -> None:
    tok = _tokenizer(family_models("llama3"))
    assert SYSTEM not in tok.decode(encode_chat(tok, CONVERSATION, system_message="drop").input_ids)
    assert SYSTEM in render_prompt(tok, CONVERSATION[:2], "keep")


def test_a_template_that_loses_the_answers_is_refused_before_training(tiny) -> None:
    tok = tiny.__class__.from_pretrained(tiny.name_or_path)
    tok.chat_template = (  # writes a placeholder for every answer: there is nothing to learn from
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}(answer){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.name_or_path = "lossy-model"
    with pytest.raises(ConfigError, match=r"lossy-model: cannot find the assistant tokens.*does not write answer 3"):
        prepare_batches(tok, [{"messages": CONVERSATION}], TrainParams())


def test_one_batched_call_equals_one_call_per_conversation(family_models) -> None:
    tok = _tokenizer(family_models("qwen3"))
    convs = [CONVERSATION, CONVERSATION[1:3], [*CONVERSATION[:2], {"role": "assistant", "content": "<think>x</think>y"}]]
    assert encode_chats(tok, convs) == [encode_chat(tok, c) for c in convs]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}


def test_tools_reach_the_template_in_the_tiny_models_namespace_format(tiny) -> None:
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    prompt = render_prompt(tiny, question, tools=[WEATHER_TOOL])
    assert prompt.startswith(
        "<|im_start|>system\n# Tools\nnamespace functions {\n// The weather in a city.\n"
        "type get_weather = (_: {\ncity: string,\n}) => any;\n}\n"
    )
    assert '<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tiny, question) == "<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
    # encode_chats reads the tools of each example
    with_tools, without = encode_chats(tiny, [{"messages": question, "tools": [WEATHER_TOOL]}, {"messages": question}])
    assert "get_weather" in tiny.decode(with_tools.input_ids) and "get_weather" not in tiny.decode(without.input_ids)


def test_encoding_after_batched_generation_pads_nothing():
    """Batched generation pads on the left through the tokenizer's Python wrapper, which leaves
    padding on in its Rust tokenizer: every conversation encoded after it came back padded to
    the longest of its batch, and evaluation scored the pad tokens of the candidate (which had
    generated) but not of the champion (loaded afresh)."""
    import torch

    from tasks.evaluate.generation import generate_batched
    from tasks.evaluate.preference import log_ratios
    from tasks.model.loading import load_base_model, load_base_tokenizer

    tok = load_base_tokenizer(ModelParams())
    model = load_base_model(ModelParams(), tok).eval()
    chats = [[{"role": "user", "content": "2024-01-05"}, {"role": "assistant", "content": "January 5, 2024"}],
             [{"role": "user", "content": "Rewrite the ISO date 1999-12-31 in words, please"},
              {"role": "assistant", "content": "December 31, 1999"}]]
    before = [(e.input_ids, e.loss_mask) for e in encode_chats(tok, chats)]
    texts = [render_prompt(tok, c[:1]) for c in chats]
    before_text = [encode_text(tok, t) for t in texts]
    torch.manual_seed(0)
    generate_batched(model, tok, texts, 2, 2)
    assert [(e.input_ids, e.loss_mask) for e in encode_chats(tok, chats)] == before
    assert [encode_text(tok, t) for t in texts] == before_text
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    fresh = load_base_tokenizer(ModelParams())
    assert log_ratios(peft, tok, [{"messages": c} for c in chats], "auto", 2) == pytest.approx(
        log_ratios(peft, fresh, [{"messages": c} for c in chats], "auto", 2), abs=1e-6)
