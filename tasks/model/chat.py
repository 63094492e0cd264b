"""Turning chat messages into text and tokens, shared by training, evaluation and serving.

Training, evaluation, the MLflow pyfunc model and the BentoML service all format prompts
through this module, and validation, prepare and training all count and mask tokens
through `encode_chats`, so the text a model is trained on and the text it is served with
cannot drift apart, and there is one token count.

Examples carry OpenAI tool schemas beside their messages (`{"messages": [...], "tools":
[...]}`); the tools reach the template wherever the project renders (`tools=` of
`apply_chat_template`), and messages are given to it in the form published templates read
(`template_messages`: call arguments as objects, `thinking` as `reasoning_content`).

Assistant masks are exact for any chat template. Every assistant turn is trained, a tool
call (as the template writes it) as well as an answer, with its reasoning trace unless
`train.train_reasoning` is off; a `weight: 0` turn is not, and `train.train_turns: last`
trains only the last one. Prompts, system text, tool schemas and tool results never are.
The assistant tokens are found in one of two ways:

- a template with `{% generation %}` blocks marks the assistant text itself (the spans
  transformers' `return_assistant_tokens_mask` reads);
- any other template is rendered once per conversation and tokenized once with character
  offsets. Each assistant turn is located by characters: the conversation up to it,
  rendered with the generation prompt, must be a prefix of the whole text, and the answer
  (or the trace, content and each call's name and arguments, up to the end-of-turn token)
  must follow (where a template moves text between turns, as Mistral v0.3 moves the tools
  to the last user message, the turn's text is found in the conversation rendered up to
  it and then in the whole text). The mask is everything the model writes after that
  prompt (the answer, and text such as Qwen 3's empty `<think>` block), plus the special
  tokens the template puts
  right after it before the next turn (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`,
  `<|end|>`, `</s>`), so the model learns to stop. Characters are mapped to tokens through
  the offsets, so BPE merges across a boundary cannot shift the mask. The text is encoded
  without the tokenizer's own special tokens, as `apply_chat_template` does: a template
  that writes BOS gets no second one.

Where neither method can mask a template, `check_template` raises a `ConfigError` before
anything is trained, naming the model, what the template did and the setting that fixes it;
so do `check_tool_rendering` and `check_reasoning_rendering`, probed once per template when
the data has tools or traces, for a template that would lose them.

System messages follow `data.system_message`: `keep`, `merge` (into the first user turn),
`drop`, or `auto`, which keeps them unless the template raises on them or loses them
(Gemma raises; Mistral v0.3 drops them from a conversation that ends with an answer), and
merges them there. The choice is probed once per template.

The module is long but cohesive: rendering, the system-message policy and the mask must
change together, or what training masks and what serving renders drift apart again.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal

from tasks.errors import ConfigError

Message = dict[str, Any]
Tools = list[dict] | None
# An example as the data holds it: {"messages": [...], "tools": [...]}; or just its messages.
Conversation = list[Message] | dict[str, Any]
SystemPolicy = Literal["auto", "keep", "merge", "drop"]
SYSTEM_POLICIES = ("auto", "keep", "merge", "drop")

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Contents are replaced by these markers to render one skeleton per sequence of roles.
_MARKER = re.compile("\ue000(\\d+)\ue001")


def _marker(j: int) -> str:
    return f"\ue000{j}\ue001"


# A probe conversation: two turns, a system message whose text must survive rendering.
_PROBE_SYSTEM = "Probe system text 7301."
_PROBE = [
    {"role": "system", "content": _PROBE_SYSTEM},
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two?"},
    {"role": "assistant", "content": "Probe answer two."},
]

_CACHE: dict[tuple, Any] = {}


def reference_index(messages: list[Message]) -> int:
    """The index of the turn a model is scored on: the last assistant turn not marked `weight: 0`.

    A weight-0 turn is one the data keeps as context but says not to learn, so it is no
    reference either (the last assistant turn when every one has weight 0, which
    validation refuses).
    """
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return next((i for i in reversed(turns) if messages[i].get("weight", 1) != 0), turns[-1])


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The messages before the reference answer (what a model is asked); see `reference_index`."""
    return messages[: reference_index(messages)]


def reference_answer(messages: list[Message]) -> str:
    """The reference answer of an example (what a model should say); see `reference_index`."""
    return messages[reference_index(messages)]["content"]


# ------------------------------------------------------------------------ system messages


@dataclass(frozen=True)
class SystemHandling:
    """What a policy does with system messages under one template.

    Attributes:
        policy: the setting (`data.system_message`).
        action: what is done: "keep", "merge" or "drop".
        reason: why `auto` chose `merge` (what the template does with a system message), or "".
    """

    policy: str
    action: str
    reason: str = ""


def system_handling(tokenizer, policy: str = "auto") -> SystemHandling:
    """Decide what `policy` does with system messages under the tokenizer's template (cached).

    Raises:
        ConfigError: `policy` is unknown, the tokenizer has no chat template, or `keep`
            with a template that raises on a system message or loses it.
    """
    if policy not in SYSTEM_POLICIES:
        raise ConfigError(f"data.system_message={policy!r}: use one of {', '.join(SYSTEM_POLICIES)}")
    key = ("system", _template_key(tokenizer), policy)
    if key not in _CACHE:
        if policy in ("merge", "drop"):
            _CACHE[key] = SystemHandling(policy, policy)
        else:
            loss = _system_loss(tokenizer)
            if loss and policy == "keep":
                raise ConfigError(
                    f"{_model_name(tokenizer)}: the chat template {loss}, so data.system_message=keep cannot keep it; "
                    "set data.system_message to merge (into the first user turn), drop or auto"
                )
            _CACHE[key] = SystemHandling(policy, "merge" if loss else "keep", loss or "")
    return _CACHE[key]


def apply_system_policy(messages: list[Message], action: str) -> list[Message]:
    """The messages with a leading system message kept, merged into the first user turn, or dropped."""
    if action == "keep" or not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0], messages[1:]
    if action == "drop":
        return rest
    text = system.get("content") or ""
    if rest and rest[0].get("role") == "user" and isinstance(rest[0].get("content"), str):
        return [{**rest[0], "content": f"{text}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": text}, *rest]


def _system_loss(tokenizer) -> str | None:
    """What the template does to lose a system message (raise, drop), or None when it keeps it."""
    from jinja2 import TemplateError

    for messages, prompt in ((_PROBE[:2], True), (_PROBE[:3], False), (_PROBE, False), (_PROBE[:4], True)):
        try:
            text = _render(tokenizer, [messages], prompt)[0]
        except TemplateError as exc:
            return f"raises {str(exc)!r} on a system message"
        if _PROBE_SYSTEM not in text:
            ending = "a question" if prompt else "an answer"
            return f"drops the system message from a conversation of {len(messages)} messages ending with {ending}"
    return None


# ------------------------------------------------------------------------------ rendering


def render_prompt(tokenizer, messages: list[Message], system_message: str = "auto", tools: Tools = None) -> str:
    """The text the model continues: every message, then the assistant's turn opened.

    Args:
        tokenizer: the model's tokenizer, with its chat template.
        messages: the conversation so far (assistant `tool_calls`, `tool` results and
            `reasoning_content` included).
        system_message: the policy the model was trained with (`data.system_message`).
        tools: the OpenAI tool schemas the model may call (`[{"type": "function",
            "function": {name, description, parameters}}]`), rendered by the template.
    """
    return _render(tokenizer, [messages_for_template(tokenizer, messages, system_message)], True, tools)[0]


def messages_for_template(tokenizer, messages: list[Message], system_message: str = "auto") -> list[Message]:
    """The messages as this tokenizer's chat template renders them: the system-message policy applied,
    `template_messages`, and call ids shortened where the template requires it (`needs_short_call_ids`)."""
    messages = template_messages(apply_system_policy(messages, system_handling(tokenizer, system_message).action))
    return short_call_ids(messages) if needs_short_call_ids(tokenizer) else messages


def template_messages(messages: list[Message]) -> list[Message]:
    """The messages as chat templates read them.

    `thinking` is renamed `reasoning_content` (the name templates read), keys set to
    None and an empty `tool_calls` list (API exports write `[]` on a plain answer) are left
    out (Llama 3.1 tests `'tool_calls' in message`, and raises on a turn of no call), and a call's
    `arguments`, a JSON string in the OpenAI format, become the object it encodes: the
    published templates write them with `tojson`, which would quote a string a second time.
    """
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if (v is not None or k == "content") and not (k == "tool_calls" and v == [])}
        if "thinking" in m:
            m = {k: v for k, v in m.items() if k != "thinking"} | {"reasoning_content": m["thinking"]}
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_call_for_template(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


_SHORT_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def needs_short_call_ids(tokenizer) -> bool:
    """Whether the template refuses OpenAI's call ids (`call_…`) and takes nine alphanumerics (Mistral v0.3's does).

    Probed once per template on a conversation with one call and its result.
    """
    from jinja2 import TemplateError

    key = ("short_ids", _template_key(tokenizer))
    if key not in _CACHE:
        def renders(call_id: str) -> bool:
            call = {**_PROBE_CALLS[1]["tool_calls"][0], "id": call_id}
            probe = [_PROBE_CALLS[0], {**_PROBE_CALLS[1], "tool_calls": [call]}, {**_PROBE_CALLS[2], "tool_call_id": call_id}]
            try:
                _render(tokenizer, [template_messages(probe)], False, [_PROBE_TOOL])
            except TemplateError:
                return False
            return True

        _CACHE[key] = not renders("call_probe_7306") and renders("probe0001")
    return _CACHE[key]


def short_call_ids(messages: list[Message]) -> list[Message]:
    """The messages with each call id that is not nine alphanumerics replaced by nine hex digits of its hash.

    A call and the result that answers it keep the same id, so the pairing the data writes
    is what the template renders; ids are opaque, and the model learns to write ids of the
    form the template's family uses.
    """
    import hashlib

    def short(call_id: Any) -> Any:
        if not isinstance(call_id, str) or _SHORT_ID.match(call_id):
            return call_id
        return hashlib.sha1(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:9]

    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [{**c, "id": short(c.get("id"))} if isinstance(c, dict) and "id" in c else c
                                     for c in m["tool_calls"]]}
        if "tool_call_id" in m:
            m = {**m, "tool_call_id": short(m["tool_call_id"])}
        out.append(m)
    return out


def _call_for_template(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # validation names it; the template writes the text as given
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call


def encode_text(tokenizer, text: str) -> list[int]:
    """The token ids of `text`, without special tokens added: `tokenizer.encode(text,
    add_special_tokens=False)`, straight from the Rust tokenizer where there is one (the
    same ids, without the Python wrapper's per-call work, which was most of the time the
    service spent tokenizing a prompt)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode"):
        return plain_backend(tokenizer).encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def plain_backend(tokenizer):
    """The Rust tokenizer behind `tokenizer`, padding and truncating nothing.

    A call of the Python wrapper with `padding=True` (batched generation pads on the left)
    leaves padding on in the Rust tokenizer; the wrapper turns it off again at its next call,
    but encoding through the Rust tokenizer directly skips that, and every later batch came
    back padded to its longest text: evaluation scored the pad tokens of the candidate's
    conversations after it had generated (and the champion's, loaded afresh, without them).
    """
    backend = tokenizer.backend_tokenizer
    if backend.padding is not None:
        backend.no_padding()
    if backend.truncation is not None:
        backend.no_truncation()
    return backend


def _render(
    tokenizer, conversations: list[list[Message]], add_generation_prompt: bool, tools: Tools = None
) -> list[str]:
    """Conversations (in template form) rendered by the chat template, all with the same `tools`."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(
            f"{_model_name(tokenizer)}: the tokenizer has no chat template; use a chat/instruct model as model.base "
            "or give the base model a chat template"
        )
    return tokenizer.apply_chat_template(
        conversations, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _template_key(tokenizer) -> tuple:
    """What rendering and token ids depend on: the template, the special tokens it can write, the vocabulary.

    The model's name and vocabulary size are in the key because cached plans hold token
    ids: two models may share a template (ChatML given to GPT-2 and to Pythia) and give
    its tokens different ids.
    """
    return (getattr(tokenizer, "chat_template", None), repr(sorted(tokenizer.special_tokens_map.items())),
            _model_name(tokenizer), len(tokenizer))


def _model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


# ------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """One example as token ids with a loss mask (1 where the token is trained on).

    Attributes:
        input_ids: the tokens of the rendered conversation.
        loss_mask: 1 for the assistant tokens (every token with `train_on_prompt`).
        last_answer_tokens: assistant tokens of the last answer (what truncation may cut).
        unlocated: assistant turns to train (answers or tool calls; not weight-0 turns, nor
            earlier turns under `train_turns: last`) that the template rewrote so that they
            could not be found in the rendered text: they would not be trained on.
        error: why the template could not render the conversation at all ("" when it could).
        reasoning_lost: assistant turns whose reasoning trace the template left out of the
            text (Qwen 3 keeps only the traces after the last user message), counted where
            traces are trained (`train_reasoning`).
        calls_lost: the unlocated turns that hold tool calls (Llama 3.1 drops the text of a
            turn that also calls a tool): calls that would not be trained on.
        calls_lost_with_text: those of them that also hold text beside their calls.
        names_lost: system, user and assistant messages whose `name` the template does not
            write (most do not): the model would not see who speaks.
    """

    input_ids: list[int]
    loss_mask: list[int]
    last_answer_tokens: int = 0
    unlocated: int = 0
    error: str = ""
    reasoning_lost: int = 0
    calls_lost: int = 0
    names_lost: int = 0
    calls_lost_with_text: int = 0

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class _Span:
    """Characters [start, end) of what the model writes in one assistant turn.

    Attributes:
        message: the index of the assistant message (-1 where unknown).
        answer: where the text after its reasoning trace starts (`start` when it has none).
        reasoning_lost: the message has a reasoning trace that the template did not write.
    """

    start: int
    end: int
    message: int = -1
    answer: int = -1
    reasoning_lost: bool = False


@dataclass(frozen=True)
class TemplatePlan:
    """How assistant tokens are found under one template.

    Attributes:
        method: "generation" (the template's `{% generation %}` blocks) or "offsets".
        end_of_turn: the special tokens the template writes right after every answer (the
            tokens that stop generation), trained on with the answer; () with "generation".
    """

    method: str
    end_of_turn: tuple[int, ...] = ()


def encode_chats(
    tokenizer, conversations: list[Conversation], train_on_prompt: bool = False, system_message: str = "auto",
    tools: Tools = None, train_turns: str = "all", train_reasoning: bool = True,
) -> list[Encoded]:
    """Tokenize conversations with the chat template, marking the assistant tokens exactly.

    The one implementation behind validation's token counts, prepare's length policy,
    training's labels and evaluation's perplexity. Fast for large batches: conversations
    with the same sequence of roles share one rendered skeleton (contents replaced by
    markers) in which every answer is located once; each conversation is rendered once
    for real and must equal its filled-in skeleton (otherwise, e.g. a template that
    rewrites contents, or a conversation with tools, its turns are located by rendering
    its own prefixes). The texts are encoded in one batch by the Rust tokenizer.

    Trained: every assistant turn, a tool call's rendered text as well as an answer,
    with its end-of-turn tokens; not a turn with `weight: 0`; only the last trained turn
    with `train_turns="last"`; the reasoning trace as part of the answer unless
    `train_reasoning` is False. Prompts, system text and tool results never.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a chat template.
        conversations: canonical examples (`{"messages": [...], "tools": [...]}`, the
            tools read per example) or bare message lists (structurally valid).
        train_on_prompt: mark every token, not only the assistant's.
        system_message: `data.system_message` (auto, keep, merge, drop).
        tools: the tool schemas of conversations that carry none of their own.
        train_turns: `train.train_turns`: "all" assistant turns, or the "last" one.
        train_reasoning: `train.train_reasoning`: reasoning traces are trained.

    Returns:
        One `Encoded` per conversation.

    Raises:
        ConfigError: the template cannot be masked (see `check_template`), or cannot
            render the tools, tool calls or reasoning traces the conversations hold
            (`check_tool_rendering`, `check_reasoning_rendering`).
    """
    if not conversations:
        return []
    if train_turns not in ("all", "last"):
        raise ConfigError(f"train.train_turns={train_turns!r}: use all or last")
    plan = check_template(tokenizer, system_message)
    action = system_handling(tokenizer, system_message).action
    chats = [_chat(c, tools, action) for c in conversations]
    if any(m.get("tool_calls") or m.get("role") == "tool" for c in chats for m in c.messages) and needs_short_call_ids(tokenizer):
        chats = [_Chat(short_call_ids(c.messages), c.tools) for c in chats]
    if any(c.tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in c.messages) for c in chats):
        check_tool_rendering(tokenizer)
    if train_reasoning and any(m.get("reasoning_content") for c in chats for m in c.messages):
        check_reasoning_rendering(tokenizer)
    texts, spans, errors = (_generation_spans if plan.method == "generation" else _offset_spans)(
        tokenizer, chats, plan.end_of_turn
    )
    encodings = plain_backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    named = named_roles(tokenizer, action)
    out = []
    for conversation, chat, enc, found, error in zip(conversations, chats, encodings, spans, errors):
        ids = enc.ids  # a fresh list on every access of the Rust encoding
        trained = _trained_spans(chat.messages, found, train_turns, train_reasoning)
        mask, last = _mask(ids, enc.offsets, trained, plan.end_of_turn)
        lost = sum(s.reasoning_lost for s in trained) if train_reasoning else 0  # a turn not trained loses nothing
        if train_on_prompt:
            mask = [1] * len(mask)
        unlocated, calls_lost, with_text = (0, 0, 0) if error else _unlocated(chat.messages, found, train_turns)
        out.append(Encoded(ids, mask, last, unlocated, error, lost, calls_lost, _names_lost(conversation, named), with_text))
    return out


def _names_lost(conversation: Conversation, named: frozenset[str]) -> int:
    """Messages whose `name` the template does not write (a tool result's name repeats its call's: not counted)."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    return sum(1 for i in _named(messages) if messages[i]["role"] not in named)


def _named(messages: list[Message]) -> list[int]:
    """The indexes of the system, user and assistant messages that have a `name`."""
    return [i for i, m in enumerate(messages) if m.get("role") in _NAMED_ROLES
            and isinstance(m.get("name"), str) and m["name"].strip()]


def _unlocated(messages: list[Message], found: list[_Span], train_turns: str) -> tuple[int, int, int]:
    """(turns to train that were not found in the rendered text, how many of them hold tool
    calls, how many of those hold text beside their calls).

    A turn that is not trained loses nothing: weight-0 turns, and with `train_turns: last`
    every turn but the last, are not counted. Where the spans name no turn (a template's
    `{% generation %}` marks), the shortfall of spans is counted, calls first.
    """
    turns = [i for i, m in enumerate(messages) if _is_turn(m)]
    wanted = [i for i in turns if messages[i].get("weight", 1) != 0]
    if train_turns == "last":
        wanted = wanted[-1:]
    calls = [i for i in wanted if messages[i].get("tool_calls")]
    with_text = [i for i in calls if str(messages[i].get("content") or "").strip()]
    if any(s.message < 0 for s in found):
        missing = max(0, len(turns) - len(found))
        return missing, min(missing, len(calls)), min(missing, len(with_text))
    located = {s.message for s in found}
    lost = [i for i in wanted if i not in located]
    return len(lost), sum(1 for i in lost if i in calls), sum(1 for i in lost if i in with_text)


def _is_turn(message: Message) -> bool:
    """An assistant turn the model writes: an answer, tool calls, or both."""
    return message.get("role") == "assistant" and (isinstance(message.get("content"), str) or bool(message.get("tool_calls")))


def _trained_spans(messages: list[Message], spans: list[_Span], train_turns: str, train_reasoning: bool) -> list[_Span]:
    """The spans the loss covers: weight-0 turns out, the last turn only with `last`, traces out if asked."""
    kept = [s for s in spans if s.message < 0 or messages[s.message].get("weight", 1) != 0]
    if train_turns == "last" and kept and all(s.message >= 0 for s in kept):
        # The last turn to train, not the last one found: an earlier turn stands in for none.
        last = max(i for i, m in enumerate(messages) if _is_turn(m) and m.get("weight", 1) != 0)
        kept = [s for s in kept if s.message == last]
    elif train_turns == "last":
        kept = kept[-1:]
    if not train_reasoning:
        kept = [_Span(s.answer, s.end, s.message, s.answer) if s.answer > s.start else s for s in kept]
    return kept


@dataclass(frozen=True)
class _Chat:
    """One conversation as the template renders it: its messages (system policy applied) and tools."""

    messages: list[Message]
    tools: Tools = None


def _chat(conversation: Conversation, tools: Tools, action: str) -> _Chat:
    if isinstance(conversation, dict):
        tools, conversation = conversation.get("tools") or tools, conversation["messages"]
    return _Chat(template_messages(apply_system_policy(conversation, action)), tools or None)


def encode_chat(
    tokenizer, messages: Conversation, train_on_prompt: bool = False, system_message: str = "auto", tools: Tools = None,
    train_turns: str = "all", train_reasoning: bool = True,
) -> Encoded:
    """`encode_chats` for one conversation."""
    return encode_chats(tokenizer, [messages], train_on_prompt, system_message, tools, train_turns, train_reasoning)[0]


def count_tokens(tokenizer, messages: Conversation, system_message: str = "auto", tools: Tools = None) -> tuple[int, int]:
    """(total tokens, assistant tokens) of a conversation under the chat template."""
    enc = encode_chat(tokenizer, messages, system_message=system_message, tools=tools)
    return len(enc.input_ids), enc.trained_tokens


def check_template(tokenizer, system_message: str = "auto") -> TemplatePlan:
    """Check once per template that assistant tokens can be masked exactly, on a probe conversation.

    Returns:
        How the assistant tokens are found, and the template's end-of-turn tokens.

    Raises:
        ConfigError: the tokenizer is not a fast one (no character offsets), or the
            template neither marks generation nor renders each conversation prefix as a
            prefix of the text, naming the model, what was found and the setting to change.
    """
    from jinja2 import TemplateError

    key = ("plan", _template_key(tokenizer), system_message)
    if key in _CACHE:
        return _CACHE[key]
    name = _model_name(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{name}: assistant masks need a fast tokenizer (tokenizer.json) for character offsets")
    action = system_handling(tokenizer, system_message).action
    probe = apply_system_policy(_PROBE, action)
    if _GENERATION_BLOCK.search(tokenizer.get_chat_template()):
        _, spans, errors = _generation_spans(tokenizer, [_Chat(probe)])
        problem = errors[0] or (None if spans[0] else "has {% generation %} blocks but marks no assistant text in them")
        plan = TemplatePlan("generation")
    else:
        try:
            text = _render(tokenizer, [probe], False)[0]
            found = _locate(tokenizer, probe, text)
        except TemplateError as exc:
            found = f"raises {str(exc)!r}"
        problem = found if isinstance(found, str) else None
        plan = None if problem else TemplatePlan("offsets", _end_of_turn(tokenizer, text, found))
        if plan is not None:
            _CACHE[("eot", _template_key(tokenizer))] = plan.end_of_turn
    if problem:
        fix = (
            "set data.system_message: merge" if action == "keep" and probe[0]["role"] == "system"
            else "use a chat template that renders each conversation prefix as a prefix of the text, "
                 "or one with {% generation %} blocks"
        )  # fmt: skip
        raise ConfigError(
            f"{name}: cannot find the assistant tokens to train on: the chat template {problem} "
            f"(data.system_message={system_message}); {fix}"
        )
    _CACHE[key] = plan
    return plan


def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """The special tokens the template writes right after an answer to end the turn (cached).

    `<|eot_id|>` (Llama 3), `<|im_end|>` (ChatML), `<end_of_turn>` (Gemma), `<|end|>`
    (Phi-3), `</s>` (Mistral): the tokens that stop generation, which training masks in
    with each answer and `tasks.model.loading` makes the tokenizer's eos. () when the
    template ends turns without a special token or cannot be rendered on the probe.
    """
    from jinja2 import TemplateError

    key = ("eot", _template_key(tokenizer))
    if key not in _CACHE:
        try:
            probe = apply_system_policy(_PROBE, system_handling(tokenizer).action)
            text = _render(tokenizer, [probe], False)[0]
            found = _locate(tokenizer, probe, text)
        except (TemplateError, ConfigError):
            found = "unrenderable"
        _CACHE[key] = () if isinstance(found, str) else _end_of_turn(tokenizer, text, found)
    return _CACHE[key]


# A probe of tool calling: a declared tool, a call to it, its result, and a final answer.
_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool_7301", "description": "Probe tool description.",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]},
}}
_PROBE_CALLS = [
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "probe0001", "type": "function", "function": {
        "name": "probe_tool_7301", "arguments": '{"probe_arg": "probe value 7302"}'}}]},
    {"role": "tool", "tool_call_id": "probe0001", "content": "probe result 7303"},
    {"role": "assistant", "content": "Probe answer one."},
]
_PROBE_REASONING = [
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one.", "reasoning_content": "Probe reasoning 7304."},
]
_TOOL_FIX = (
    "set model.chat_template: chatml (ChatML with a tool format) or the path of a Jinja template that "
    "renders tools, tool_calls and tool messages"
)


def check_tool_rendering(tokenizer) -> None:
    """Refuse, once per template, a template that would lose tools, tool calls or tool results.

    Rendered on a probe, the tool's schema must reach the prompt, and the call (its name
    and argument values) and the result must be written and the call turn located.

    Raises:
        ConfigError: naming the model, what the template lost, and the setting that fixes it.
    """
    from jinja2 import TemplateError

    key = ("tools", _template_key(tokenizer))
    if key not in _CACHE:
        messages, tools = template_messages(_PROBE_CALLS), [_PROBE_TOOL]
        try:
            prompt = _render(tokenizer, [messages[:1]], True, tools)[0]
            text = _render(tokenizer, [messages], False, tools)[0]
            ends = end_of_turn_ids(tokenizer)
            found = _locate(tokenizer, messages, text, tools=tools, end_text=tokenizer.decode(list(ends)) if ends else "")
        except TemplateError as exc:
            prompt, text, found = "", "", f"raises {str(exc)!r} on a conversation with a tool call"
        if isinstance(found, str):
            problem = found
        elif "Probe tool description." not in prompt:
            problem = "does not write the tools' schemas into the prompt"
        elif "probe result 7303" not in text:
            problem = "does not write a tool message's result"
        else:
            problem = ""
        _CACHE[key] = problem
    if _CACHE[key]:
        raise ConfigError(f"{_model_name(tokenizer)}: the chat template cannot train tool calling: it {_CACHE[key]}; {_TOOL_FIX}")


_NAMED_ROLES = ("system", "user", "assistant")


def named_roles(tokenizer, action: str = "keep") -> frozenset[str]:
    """The roles whose `name` (OpenAI's participant name) the template writes, probed once per template.

    Args:
        action: what the system-message policy does (a merged system message keeps no name).
    """
    from jinja2 import TemplateError

    key = ("names", _template_key(tokenizer), action)
    if key not in _CACHE:
        probe = [{**m, "name": f"probe_{m['role']}_7305"} for m in _PROBE[:3]]
        try:
            text = _render(tokenizer, [template_messages(apply_system_policy(probe, action))], False)[0]
        except TemplateError:
            text = ""
        written = {role for role in _NAMED_ROLES if f"probe_{role}_7305" in text}
        _CACHE[key] = frozenset(written | ({"system"} if action == "drop" else set()))  # dropped whole, by choice
    return _CACHE[key]


def unwritten_names(tokenizer, messages: list[Message], system_message: str = "auto") -> list[int]:
    """The indexes of the messages whose `name` the chat template does not write (`named_roles`).

    A tool result's name repeats its call's and is not counted, as in validation (`name_dropped`).
    """
    named = _named(messages)
    if not named:
        return []
    written = named_roles(tokenizer, system_handling(tokenizer, system_message).action)
    return [i for i in named if messages[i]["role"] not in written]


def check_reasoning_rendering(tokenizer) -> None:
    """Refuse, once per template, a template that drops an answer's reasoning trace (`reasoning_content`).

    Raises:
        ConfigError: naming the model and the settings that fix it.
    """
    from jinja2 import TemplateError

    key = ("reasoning", _template_key(tokenizer))
    if key not in _CACHE:
        try:
            text = _render(tokenizer, [template_messages(_PROBE_REASONING)], False)[0]
            _CACHE[key] = "Probe reasoning 7304." in text
        except TemplateError:
            _CACHE[key] = False
    if not _CACHE[key]:
        raise ConfigError(
            f"{_model_name(tokenizer)}: the chat template drops the reasoning traces (reasoning_content) of the data; "
            "set model.chat_template: chatml (it writes them in <think> blocks) or a template that renders them, "
            "or set train.train_reasoning: false to leave them out of training"
        )


def _end_of_turn(tokenizer, text: str, spans: list[_Span]) -> tuple[int, ...]:
    """The special tokens written right after both a middle and the last answer of the probe.

    What follows a middle answer also opens the next turn (`<|end|>\n<|user|>`), what
    follows the last one may close the conversation (`<|end|>\n<|endoftext|>`): the
    tokens they share are the end of a turn, the ones that stop generation.
    """
    middle, last = text[spans[0].end : spans[1].start], text[spans[-1].end :]
    a, b = (e.ids for e in plain_backend(tokenizer).encode_batch([middle, last], add_special_tokens=False))
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    shared = []
    for x, y in zip(a, b):
        if x != y or x not in special:
            break
        shared.append(x)
    return tuple(shared)


def _generation_spans(
    tokenizer, chats: list[_Chat], end_of_turn: tuple[int, ...] = ()
) -> tuple[list[str], list[list[_Span]], list[str]]:
    """Texts, the `{% generation %}` spans of each (the template decides what is trained), and errors.

    The blocks are matched to the assistant turns in order when there is one per turn (so
    weights and `train_turns` apply); otherwise their turns are unknown and all are kept.
    """
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans, errors = [], [], []
    for chat in chats:
        plain = [{k: v for k, v in m.items() if v is not None} for m in chat.messages]  # as apply_chat_template does
        try:
            rendered, indices = render_jinja_template(
                conversations=[plain], tools=chat.tools, chat_template=tokenizer.get_chat_template(),
                return_assistant_tokens_mask=True, add_generation_prompt=False, **tokenizer.special_tokens_map,
            )  # fmt: skip
        except TemplateError as exc:
            rendered, indices = [""], [[]]
            errors.append(f"raises {str(exc)!r}")
        else:
            errors.append("")
        texts.append(rendered[0])
        found = [(a, b) for a, b in indices[0] if b > a]
        turns = [i for i, m in enumerate(chat.messages) if _is_turn(m)]
        owners = turns if len(turns) == len(found) else [-1] * len(found)
        spans.append([_Span(a, b, i, a) for (a, b), i in zip(found, owners)])
    return texts, spans, errors


def _offset_spans(
    tokenizer, chats: list[_Chat], end_of_turn: tuple[int, ...] = ()
) -> tuple[list[str], list[list[_Span]], list[str]]:
    """Texts, located assistant answers (through one skeleton per sequence of roles), and errors."""
    from jinja2 import TemplateError

    rendered: list[str | None] = [None] * len(chats)
    plain = [k for k, c in enumerate(chats) if not c.tools]  # rendered in one call; those with tools one by one
    try:
        for k, text in zip(plain, _render(tokenizer, [chats[k].messages for k in plain], False) if plain else []):
            rendered[k] = text
    except TemplateError:
        pass  # one of them is refused: render each alone to tell which
    texts, spans, errors = [], [], []
    for chat, text in zip(chats, rendered):
        try:
            text = _render(tokenizer, [chat.messages], False, chat.tools)[0] if text is None else text
        except TemplateError as exc:
            texts.append("")
            spans.append([])
            errors.append(f"raises {str(exc)!r}")
            continue
        found = None if chat.tools else _from_skeleton(tokenizer, chat.messages, text)
        if found is None:  # the template treats this conversation's contents specially
            end = tokenizer.decode(list(end_of_turn)) if end_of_turn else ""
            located = _locate(tokenizer, chat.messages, text, per_turn=True, tools=chat.tools, end_text=end)
            found = located if isinstance(located, list) else []
        texts.append(text)
        spans.append(found)
        errors.append("")
    return texts, spans, errors


def _from_skeleton(tokenizer, conv: list[Message], text: str) -> list[_Span] | None:
    """The answers of `conv` from its roles' skeleton, or None when the skeleton does not fill to `text`."""
    if any(set(m) - {"role", "content", "weight"} or not isinstance(m.get("content"), str) for m in conv):
        return None
    roles = tuple(m["role"] for m in conv)
    key = ("skeleton", _template_key(tokenizer), roles)
    if key not in _CACHE:
        from jinja2 import TemplateError

        marked = [{"role": r, "content": _marker(j)} for j, r in enumerate(roles)]
        try:
            skeleton = _render(tokenizer, [marked], False)[0]
            turns = _locate(tokenizer, marked, skeleton)
        except TemplateError:
            skeleton, turns = "", None
        _CACHE[key] = (skeleton, turns if isinstance(turns, list) else None)
    skeleton, turns = _CACHE[key]
    if turns is None:
        return None
    # Fill the markers in; a position after a marker moves by its content's length difference.
    pieces, starts, shifts, at, shift = [], [], [], 0, 0
    for k, part in enumerate(_MARKER.split(skeleton)):
        if k % 2:
            content, width = conv[int(part)]["content"], len(_marker(int(part)))
            starts.append(at)
            shift += len(content) - width
            shifts.append(shift)
            pieces.append(content)
            at += width
        else:
            pieces.append(part)
            at += len(part)
    if "".join(pieces) != text:
        return None

    def moved(pos: int) -> int:
        k = bisect.bisect_left(starts, pos)  # markers that start before pos lie wholly before it
        return pos + (shifts[k - 1] if k else 0)

    return [_Span(moved(s.start), moved(s.end), s.message, moved(s.answer)) for s in turns]


def _locate(
    tokenizer, messages: list[Message], text: str, per_turn: bool = False, tools: Tools = None, end_text: str = ""
) -> list[_Span] | str:
    """Find each assistant turn of `messages` in their rendered `text`.

    The conversation before a turn, rendered with the generation prompt, must be a prefix
    of `text`, and the turn must be written after that prompt, before the next turn's
    prompt ends. The span runs from the prompt's end: text the template inserts before the
    answer (Mistral's space, Qwen 3's `<think>` block) is what the model writes too. A plain
    answer ends where its content does. A turn with tool calls or a reasoning trace ends
    where the template ends the turn (`end_text`, its end-of-turn tokens), after every part
    of it is found in order: the trace, the content, each call's name and argument values.
    A trace the template leaves out (Qwen 3 before the last user message) is marked lost.

    Args:
        per_turn: skip a turn that cannot be located instead of failing.
        tools: the conversation's tool schemas.
        end_text: the template's end-of-turn text ("" when it has none).

    Returns:
        The spans, or a description of the first turn that could not be located.
    """
    from jinja2 import TemplateError

    turns = [i for i, m in enumerate(messages) if _is_turn(m)]
    try:
        prompts = [_render(tokenizer, [messages[:i]], True, tools)[0] if i else "" for i in turns]
    except TemplateError as exc:
        return [] if per_turn else f"raises {str(exc)!r} on a conversation that ends with a question"
    spans: list[_Span] = []
    for n, (i, prompt) in enumerate(zip(turns, prompts)):
        bound = len(prompts[n + 1]) if n + 1 < len(prompts) else len(text)
        if text.startswith(prompt):
            found = _locate_turn(text, len(prompt), bound, messages, i, end_text)
        else:
            found = (
                f"renders the conversation before message {i + 1} (with the generation prompt) differently from "
                "the start of the whole conversation (a prefix of the conversation is not a prefix of the text)"
            )
            if per_turn:  # e.g. Mistral v0.3 writes the tools before the last user message only
                found = _locate_moved(tokenizer, messages, i, prompt, text, spans[-1].end if spans else 0, tools,
                                      end_text) or found
        if isinstance(found, _Span):
            spans.append(_Span(found.start, found.end, i, found.answer, found.reasoning_lost))
        elif not per_turn:
            return found
    return spans


def _locate_turn(text: str, start: int, bound: int, messages: list[Message], i: int, end_text: str) -> _Span | str:
    """The span of assistant turn `i` written after its prompt (which ends at `start`), or why it is not found."""
    message = messages[i]
    if message.get("tool_calls") or message.get("reasoning_content"):
        found = _locate_parts(text, start, bound, message, end_text)
        return found if isinstance(found, _Span) else f"{found} in turn {i + 1}"
    content, lost = message["content"], False
    at = text.find(content, start) if content else -1
    if at < 0 and content.strip():
        content = content.strip()  # templates that trim answers (Llama 3, Gemma, Mistral)
        at = text.find(content, start)
    if at < 0 and "</think>" in content:
        # A trace written inline (`<think>…</think>answer`) that the template rewrites: Qwen 3
        # writes the last turn's trace in its own block (other whitespace around it) and takes
        # it out of an earlier turn. The span runs from the prompt's end, so a trace written
        # before the answer is trained; one the template took out is lost.
        trace = content.split("</think>")[0].split("<think>")[-1].strip()
        content = content.split("</think>")[-1].strip()
        # Written: inside a `<think>` block the template opened, the answer after its close
        # (the answer and the trace may share words, so neither is looked for elsewhere).
        opened = text.find("<think>", start, bound)
        written = text.find(trace, opened, bound) if trace and opened >= 0 else -1
        closed = text.find("</think>", written + len(trace), bound) if written >= 0 else -1
        at = text.find(content, closed + len("</think>"), bound) if content and closed >= 0 else -1
        if at < 0:  # taken out of the turn: the answer from the prompt's end, the trace lost
            at, lost = (text.find(content, start) if content else -1), bool(trace)
    if at < 0 or at + len(content) > bound or _MARKER.search(text, start, at):
        return f"does not write answer {i + 1} as given right after its prompt"
    return _Span(start, at + len(content), answer=start, reasoning_lost=lost)


def _locate_moved(
    tokenizer, messages: list[Message], i: int, prompt: str, text: str, after: int, tools: Tools, end_text: str
) -> _Span | None:
    """Turn `i` of a template whose earlier prompts are not prefixes of the whole text, or None.

    The conversation up to and including the turn is rendered; there its prompt is a prefix,
    so the turn's text (what the model writes, up to the end of turn) is found as usual, and
    then found again in the whole text after the previous turn. This is the text the whole
    conversation trains, as mistral-finetune trains every turn of the rendered sequence.
    """
    from jinja2 import TemplateError

    try:
        own = _render(tokenizer, [messages[: i + 1]], False, tools)[0]
    except TemplateError:
        return None
    found = _locate_turn(own, len(prompt), len(own), messages, i, end_text) if own.startswith(prompt) else None
    if not isinstance(found, _Span) or found.reasoning_lost:
        return None
    written = own[found.start : found.end]
    at = text.find(written, after) if written else -1
    if at >= 0:
        return _Span(at, at + len(written), i, at + found.answer - found.start)
    # Qwen 3 writes a `<think>` block (the trace, or an empty one) in a turn after the last user
    # message, and none once a later user message follows: the turn from its own words on,
    # and its trace, if it has one, lost.
    block = _THINK_BLOCK.match(written)
    if block is None or not written[block.end() :]:
        return None
    written = written[block.end() :]
    at = text.find(written, after)
    later = next((m.get("content") for m in messages[i + 1 :] if m.get("role") == "user"), None)
    bound = text.find(later, after) if isinstance(later, str) and later else -1
    if at < 0 or 0 <= bound < at:  # not found, or only in a later user turn's words
        return None
    return _Span(at, at + len(written), i, at, reasoning_lost=bool(messages[i].get("reasoning_content")))


def _locate_parts(text: str, start: int, bound: int, message: Message, end_text: str) -> _Span | str:
    """The span of a turn with tool calls or a reasoning trace, or what the template did not write."""
    at, answer, lost = start, start, False
    reasoning = (message.get("reasoning_content") or "").strip()
    if reasoning:
        found = text.find(reasoning, at, bound)
        if found < 0:
            lost = True
        else:
            at = answer = found + len(reasoning)
            closing = _THINK_END.match(text, at)  # the trace's closing tag belongs to the trace
            answer = closing.end() if closing else answer
    parts = [("content", (message.get("content") or "").strip())]
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        parts.append((f"the call to {function.get('name')}", str(function.get("name"))))
        arguments = function.get("arguments")
        values = arguments.values() if isinstance(arguments, dict) else []  # a string left unparsed: validation names it
        parts += [(f"the arguments of {function.get('name')}", _argument_text(v)) for v in values]
    for what, part in parts:
        found = text.find(part, at, bound) if part else at
        if found < 0:
            return f"does not write {what}"
        at = found + len(part)
    end = text.find(end_text, at, bound) if end_text else -1
    return _Span(start, end if end >= 0 else at, answer=answer, reasoning_lost=lost)


_THINK_END = re.compile(r"\s*</think>\s*")
_THINK_BLOCK = re.compile(r"\s*<think>.*?</think>\s*", re.DOTALL)


def _argument_text(value: Any) -> str:
    """How the published templates write an argument's value: JSON (`tojson`)."""
    return json.dumps(value, ensure_ascii=False)


def _mask(ids: list[int], offsets: list[tuple[int, int]], spans: list[_Span], end_of_turn: tuple[int, ...]) -> tuple[list[int], int]:
    """The loss mask from character spans: the tokens of each answer, then its end-of-turn tokens.

    Token k covers the characters after the previous token's end up to its own end, so
    offsets that a post-processor trimmed (a leading space) cannot leave a gap.

    Returns:
        (mask, tokens marked for the last span).
    """
    n, m = len(ids), len(end_of_turn)
    ends = list(accumulate((e for _, e in offsets), max))
    mask, last = [0] * n, 0
    for span in spans:
        k = bisect.bisect_right(ends, span.start)  # the first token ending after the answer's start
        first = k
        while k < n and (ends[k - 1] if k else 0) < span.end:
            mask[k], k = 1, k + 1
        # The rest of the answer's last character: a byte-level BPE writes "✓" as three tokens,
        # each with the character's offsets, so the loop above stops after the first.
        while first < k < n and offsets[k][0] < offsets[k][1] == ends[k - 1] and offsets[k][0] < span.end:
            mask[k], k = 1, k + 1
        if m and tuple(ids[k : k + m]) == end_of_turn and offsets[k][0] == ends[k - 1]:
            mask[k : k + m] = [1] * m
            k += m
        last = k - first
    return mask, last
