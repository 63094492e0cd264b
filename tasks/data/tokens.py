"""Token counts, what a template leaves untrained, the length policy and the training estimate,
shared by validation and prepare.

Every count comes from `tasks.model.chat.encode_chats`, the implementation that also
builds training's labels and evaluation's perplexity masks: the tokens validation reports
as trained are the tokens training trains on, under the run's tokenizer, chat template
and `data.system_message`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tasks.config import TrainParams
from tasks.model.chat import encode_chats

# Conversations encoded per call: bounds the memory of token ids held at once.
TOKEN_CHUNK = 2048


@dataclass(frozen=True)
class TokenCount:
    """Tokens of one conversation under the chat template.

    Attributes:
        total: every token of the rendered conversation.
        trained: assistant tokens (answers and their end-of-turn tokens): what training trains on.
        last_answer: trained tokens of the last answer (what truncation may cut).
        unlocated: assistant turns to train that the template rewrote beyond recognition (not trained on).
        error: why the template refused the conversation ("" when it rendered it).
        reasoning_lost: reasoning traces the template left out of the text (not trained on).
        calls_lost: assistant turns with tool calls the template rewrote beyond recognition (not trained on).
        calls_lost_with_text: those of them that hold text beside their calls (what some templates drop).
        names_lost: messages whose `name` the template does not write (the model would not see it).
    """

    total: int
    trained: int
    last_answer: int
    unlocated: int = 0
    error: str = ""
    reasoning_lost: int = 0
    calls_lost: int = 0
    names_lost: int = 0
    calls_lost_with_text: int = 0


@dataclass(frozen=True)
class TrainingBudget:
    """The training settings that turn token counts into steps and epochs, and choose what is trained."""

    batch_size: int = 8
    seq_len: int = 256
    max_steps: int | None = None
    train_turns: str = "all"
    train_reasoning: bool = True

    @classmethod
    def of(cls, train: TrainParams) -> "TrainingBudget":
        """The budget of a run's `train:` settings."""
        return cls(train.batch_size, train.seq_len, train.max_steps, train.train_turns, train.train_reasoning)


def count_chat_tokens(
    tokenizer, conversations: list, system_message: str = "auto", budget: TrainingBudget | None = None
) -> list[TokenCount]:
    """Count the tokens of conversations exactly as training will see them.

    Args:
        tokenizer: the run's tokenizer (fast, with a chat template).
        conversations: canonical examples (with their `tools`) or message lists (structurally valid).
        system_message: `data.system_message`.
        budget: the run's training settings (`train.train_turns`, `train.train_reasoning`);
            defaults when None.

    Raises:
        ConfigError: the chat template cannot be masked (`tasks.model.chat.check_template`),
            or cannot render the tools, calls or traces the data holds.
    """
    budget = budget or TrainingBudget()
    return [
        TokenCount(
            len(e.input_ids), e.trained_tokens, e.last_answer_tokens, e.unlocated, e.error, e.reasoning_lost, e.calls_lost,
            e.names_lost, e.calls_lost_with_text,
        )
        for e in encode_chats(
            tokenizer, conversations, system_message=system_message, train_turns=budget.train_turns,
            train_reasoning=budget.train_reasoning,
        )
    ]


# The categories `untrainable` names.
UNTRAINABLE = ("no_trained_tokens", "reasoning_dropped", "tool_call_dropped", "answer_not_located", "name_dropped")


def untrainable(count: TokenCount, example: dict) -> tuple[str, str] | None:
    """(category, message) when the chat template trains nothing of an example, or loses a part of it
    that the data holds (a reasoning trace, a tool call, an answer it rewrites, a speaker's name);
    None when it trains it whole.

    Validation reports these as errors; prepare leaves the examples out (`tasks.data.sources`).
    """
    if not count.trained:
        why, fix = (
            (f"the chat template {count.error}", "write the example as the template requires, drop it (--fix), "
             "or set model.chat_template: chatml") if count.error
            else ("the chat template marks no assistant token in it", "fix or drop the example")
        )  # fmt: skip
        return "no_trained_tokens", f"{why}: there is nothing to train on; {fix}"
    if count.reasoning_lost:
        return "reasoning_dropped", (
            f"the chat template leaves out {count.reasoning_lost} reasoning trace(s) of assistant turns before the "
            "last user message, which would not be trained on; split the conversation into one example per "
            "turn, set train.train_turns: last (or weight 0 on the earlier turns), or set train.train_reasoning: false"
        )
    if count.calls_lost:
        why, fix = (
            ("some templates, Llama 3.1's and Mistral v0.3's among them, drop the text of a turn that also calls a "
             "tool", "set content to null on those turns, or set model.chat_template: chatml") if count.calls_lost_with_text
            else ("it leaves out or rewrites a part of the calls, such as their arguments",
                  "write the calls as the template renders them, or set model.chat_template: chatml")
        )  # fmt: skip
        return "tool_call_dropped", (
            f"the chat template does not write {count.calls_lost} assistant turn(s) with tool calls as given "
            f"({why}), so the calls would not be trained on; {fix}"
        )
    if count.unlocated > count.calls_lost:
        return "answer_not_located", (
            f"the chat template rewrites {count.unlocated - count.calls_lost} assistant answer(s) (their words or "
            "whitespace), so they cannot be found in the text it renders and would not be trained on; write those "
            "answers as the template writes them, set weight 0 on them to keep them as context only, or drop the "
            "example (--fix)"
        )
    if count.names_lost:
        k, name = next((k, m["name"]) for k, m in enumerate(example["messages"], start=1)
                       if m.get("role") != "tool" and m.get("name"))
        return "name_dropped", (
            f"message {k} has the name {name!r}, which the chat template does not write ({count.names_lost} "
            "message(s) in all), so the model would not see who speaks; remove name from those messages "
            "(or write the speaker into the content), or use a chat template that renders names"
        )
    return None


def length_decision(count: TokenCount, max_tokens: int | None, policy: str) -> str:
    """What the length policy does with one example: "keep", "truncate" or "drop".

    Truncation cuts the last answer and keeps at least one of its tokens, so an example
    whose prompt alone reaches the limit cannot be truncated and is dropped.
    """
    if max_tokens is None or count.total <= max_tokens:
        return "keep"
    if policy == "truncate" and count.total - count.last_answer + 1 <= max_tokens:
        return "truncate"
    return "drop"


def summarize(values: list[float]) -> dict[str, float] | None:
    """min, max, mean, median, p5 and p95 (linear interpolation) of `values`."""
    if not values:
        return None
    import numpy as np

    arr = np.asarray(values, dtype=float)
    p5, median, p95 = np.percentile(arr, [5, 50, 95])
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": round(float(arr.mean()), 3),
        "median": float(median),
        "p5": float(p5),
        "p95": float(p95),
    }


def estimate_training(total_tokens: int, trained_tokens: int, budget: TrainingBudget) -> dict[str, Any]:
    """Steps per epoch with packing (total tokens / (batch_size * seq_len)) and epochs for max_steps."""
    steps = max(1, math.ceil(total_tokens / (budget.batch_size * budget.seq_len))) if total_tokens else 0
    return {
        "tokens_per_epoch": total_tokens,
        "trained_tokens_per_epoch": trained_tokens,
        "batch_size": budget.batch_size,
        "seq_len": budget.seq_len,
        "steps_per_epoch": steps,
        "max_steps": budget.max_steps,
        "epochs": round(budget.max_steps / steps, 3) if (budget.max_steps and steps) else None,
    }
