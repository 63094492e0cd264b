"""Generated ids back into text: the markers parsing reads survive, other special tokens do not."""

from __future__ import annotations

import pytest

from tasks.model.decoding import decode_generation, hidden_token_ids


@pytest.mark.parametrize(("family", "written", "read"), [
    # Special tokens in these tokenizers: a call marker kept, the turn's own tokens dropped.
    ("mistral", '[INST]Hi[TOOL_CALLS] [{"name": "f"}]</s>', 'Hi[TOOL_CALLS] [{"name": "f"}]'),
    ("llama3.1", '<|python_tag|>{"name": "f"}<|eom_id|><|eot_id|>', '<|python_tag|>{"name": "f"}'),
    # Added but not special: kept as before.
    ("qwen3", "<think>\nhm\n</think>\n\nHi<|im_end|><|endoftext|>", "<think>\nhm\n</think>\n\nHi"),
])
def test_call_and_reasoning_markers_are_kept_and_other_special_tokens_dropped(family_models, family, written, read):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_models(family))
    ids = tok.encode(written, add_special_tokens=False)
    assert decode_generation(tok, ids) == read
    # Where nothing but ordinary special tokens is written, the text is what skip_special_tokens gives.
    plain = tok.encode("Hello there" + tok.eos_token, add_special_tokens=False)
    assert decode_generation(tok, plain) == tok.decode(plain, skip_special_tokens=True)
    assert tok.eos_token_id in hidden_token_ids(tok)
