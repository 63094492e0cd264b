"""Turning chat messages into text and tokens, shared by training, evaluation and serving.

Training, evaluation and the BentoML service all format prompts through this module, so
the text a model is trained on and the text it is served with cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]


def render_prompt(tokenizer, messages: list[Message]) -> str:
    """The text the model continues: every message, then the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The messages before the last assistant answer (what a model is asked)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def reference_answer(messages: list[Message]) -> str:
    """The last assistant answer of an example (what a model should say)."""
    return [m for m in messages if m["role"] == "assistant"][-1]["content"]


@dataclass(frozen=True)
class Encoded:
    """One example as token ids with a loss mask (1 where the token is trained on)."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


def encode_chat(tokenizer, messages: list[Message], train_on_prompt: bool = False) -> Encoded:
    """Tokenize a conversation with the chat template, marking the assistant tokens.

    Each assistant turn is located by rendering the conversation up to it with the
    generation prompt; the template must render a prefix of the conversation as a prefix
    of the text (ChatML and Llama/Mistral templates do).
    """
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if message["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prompt_part, answer_part = head[len(rendered):], upto[len(head):]
        else:
            prompt_part, answer_part = upto[len(rendered):], ""
        p_ids = tokenizer.encode(prompt_part, add_special_tokens=False) if prompt_part else []
        a_ids = tokenizer.encode(answer_part, add_special_tokens=False) if answer_part else []
        ids += p_ids + a_ids
        mask += [1 if train_on_prompt else 0] * len(p_ids) + [1] * len(a_ids)
        rendered = upto
    return Encoded(ids, mask)


def count_tokens(tokenizer, messages: list[Message]) -> tuple[int, int]:
    """(total tokens, assistant tokens) of a conversation under the chat template."""
    enc = encode_chat(tokenizer, messages)
    return len(enc.input_ids), enc.trained_tokens
