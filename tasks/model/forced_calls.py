"""Forcing a call: the text appended to a prompt so that the model's answer is a tool call.

`tool_choice` asks the service for a call (`required`) or for a call to one function (a
named choice). The chat template shows how a call opens: it renders a probe call after the
messages, and what it writes before the probe's function name opens every call
(`forced_call_opening`). With several tools, `required` ranks the declared functions by the
likelihood of each name with what follows it up to the arguments (`call_choices`; the
service scores them in the engine process) and forces the chosen one as a named choice.
"""

from __future__ import annotations

from dataclasses import dataclass

_PROBE_FUNCTION = "ftllm_probe_function"


def forced_call_opening(tokenizer, messages: list[dict], tools: list[dict], name: str | None,
                        system_message: str = "auto") -> str | None:
    """The text that makes the model's answer a call (to `name` when given), or None when the template shows none.

    The chat template renders a probe call after `messages`; what it writes between the
    generation prompt and the probe's function name opens every call (`<tool_call>\\n{"name": "`
    for Qwen, `{"name": "` for Llama 3.1, `[TOOL_CALLS] [{"name": "` for Mistral). Appended
    to the prompt, the model can only go on with a call: a function name (`tool_choice:
    required`), or with `name` written too, its arguments (a named `tool_choice`). The named
    opening runs on after the name through what the template writes up to the arguments
    (`", "arguments": ` for Qwen), so the name is closed: a model given `"name": "get` could
    go on to `get_weather`. It ends where a token of that text ends, as in the text the model
    was trained on (a lone `"` where the vocabulary writes `",` lost the thread).
    """
    probe = _probe_call(tokenizer, messages, tools, system_message)
    if probe is None:
        return None
    opening, after = probe
    return opening if name is None else _named_opening(tokenizer, opening, name, after)


@dataclass(frozen=True)
class CallChoice:
    """A function `tool_choice: required` may call, and the opening that forces a call to it: its
    name and what the template writes after a name up to the arguments (`", "arguments": ` in
    Qwen's template). The opening's likelihood ranks the function against the others: with the
    text after the name, a name that begins another (`get_time`, `get_time_zone`) is not
    favoured for being shorter."""

    name: str
    opening: str


def call_choices(tokenizer, messages: list[dict], tools: list[dict],
                 system_message: str = "auto") -> list[CallChoice] | None:
    """One `CallChoice` per tool, in `tools`' order; None when the template shows no calls."""
    probe = _probe_call(tokenizer, messages, tools, system_message)
    if probe is None:
        return None
    opening, after = probe
    return [CallChoice(name, _named_opening(tokenizer, opening, name, after))
            for name in (tool["function"]["name"] for tool in tools)]


def _probe_call(tokenizer, messages: list[dict], tools: list[dict], system_message: str) -> tuple[str, str] | None:
    """(what the template writes before a call's function name, what it writes after it) for a
    probe call rendered after `messages`; None when it renders none."""
    from jinja2 import TemplateError

    from tasks.model.chat import messages_for_template, render_prompt

    probe = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "probe0001", "type": "function", "function": {"name": _PROBE_FUNCTION, "arguments": {}}}]}
    try:
        prompt = render_prompt(tokenizer, messages, system_message, tools)
        full = tokenizer.apply_chat_template([messages_for_template(tokenizer, [*messages, probe], system_message)],
                                             tokenize=False, tools=tools, add_generation_prompt=False)[0]
    except TemplateError:
        return None
    at = full.find(_PROBE_FUNCTION, len(prompt))
    if not full.startswith(prompt) or at < 0:
        return None
    return full[len(prompt):at], full[at + len(_PROBE_FUNCTION):]


def _named_opening(tokenizer, opening: str, name: str, after: str) -> str:
    """`opening`, `name` and `after` up to the probe's empty arguments (`{}`), cut where a token
    ends past the name's closing quote; without arguments to find, through the quote."""
    named = opening + name
    closed = len(named) + after.startswith('"')
    arguments = after.find("{}")
    return _cut_at_token(tokenizer, named + after, closed, len(named) + arguments if arguments > 0 else closed)


def _cut_at_token(tokenizer, text: str, shortest: int, longest: int) -> str:
    """`text[:n]` for the largest n from `shortest` to `longest` at which a token of `text` ends (else `longest`)."""
    try:
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        return text[:longest]
    return text[:max((end for _, end in spans if shortest <= end <= longest), default=longest)]
