"""Generated token ids back into the text that `tasks.model.responses.parse_generation` reads.

The service's decoding loops (`serving.decoding.Tokens`) and evaluation
(`tasks.evaluate.generation.generate_batched`) both decode with `decode_generation`, so a
call the service returns is a call evaluation counts.

Decoding with `skip_special_tokens=True` would drop every token the tokenizer marks
special, and some families mark the very markers the parser looks for: Mistral v0.3's
`[TOOL_CALLS]` and Llama 3.1's `<|python_tag|>` are special tokens, so a call the model
writes on its own would be read as plain text (a call forced by the service still parsed,
as its opening is in the prompt, not in the generated ids). `decode_generation` keeps
those markers and drops the other special tokens: end of turn, padding, role headers,
which must not appear in an answer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

from tasks.model.responses import CALL_OPENINGS

# The markers the built-in response templates read: the call openings, Llama 3.1's tag
# before a call, the ends of a call and the reasoning block. Only those a tokenizer marks
# special matter; for the others (Qwen's `<tool_call>`, Qwen 3's `<think>`) decoding keeps them anyway.
PARSED_MARKERS = frozenset({*CALL_OPENINGS.values(), "</tool_call>", "<|python_tag|>", "<think>", "</think>"})

# Built once per tokenizer: the decoding loop makes a `Tokens` every step, and listing a
# tokenizer's added tokens (over 700 in Mistral v0.3's) every step would cost more than the step's decoding.
_HIDDEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_token_ids(model) -> frozenset[int]:
    """The ids the model's generation config ends a generation at (`generation_config.eos_token_id`,
    one or a list), besides the tokenizer's end of sequence: Llama 3.1 ends a call at `<|eom_id|>`
    and an answer at `<|eot_id|>`, and `generate` stops at either, so the service must too."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return frozenset(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])


def hidden_token_ids(tokenizer) -> frozenset[int]:
    """The ids `decode_generation` drops: every special token except the markers parsing reads.

    Special are the tokens `skip_special_tokens=True` would drop: those named in the
    tokenizer's special tokens map (bos, eos, pad, ...) and the added tokens it marks special.
    A model's own `response_template` adds the literal markers that open its fields.
    """
    hidden = _HIDDEN.get(tokenizer)
    if hidden is None:
        special = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        special |= set(getattr(tokenizer, "all_special_ids", []))
        kept = {i for i in special if tokenizer.convert_ids_to_tokens(i) in PARSED_MARKERS | _own_openings(tokenizer)}
        hidden = _HIDDEN[tokenizer] = frozenset(special - kept)
    return hidden


def decode_generation(tokenizer, ids: Iterable[int]) -> str:
    """The text of generated `ids`, with the call and reasoning markers kept (see the module docstring)."""
    hidden = hidden_token_ids(tokenizer)
    return tokenizer.decode([i for i in ids if i not in hidden], skip_special_tokens=False)


def _own_openings(tokenizer) -> set[str]:
    """The literal `open` markers of the tokenizer's own response template (none without one)."""
    template = getattr(tokenizer, "response_template", None)
    if not isinstance(template, dict):
        return set()
    openings: set[str] = set()
    for spec in (template.get("fields") or {}).values():
        literal = spec.get("open") if isinstance(spec, dict) else None
        openings.update([literal] if isinstance(literal, str) else literal if isinstance(literal, list) else [])
    return openings
