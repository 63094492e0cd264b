"""A row ends at any of the model's end tokens, not only the tokenizer's end of sequence:
Llama 3.1 ends a call with `<|eom_id|>`, and what it would write after it is not the call."""

from __future__ import annotations

from serving.decoding import LoadedModel, Row, Tokens
from tasks.model.decoding import end_token_ids
from tasks.model.responses import parse_generation

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_a_llama_call_ends_at_end_of_message_and_is_read_as_a_call(family_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = family_models("llama3.1")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    loaded = LoadedModel(model, tok, 2048, end_ids=end_token_ids(model))  # as load_model_dir loads it
    assert tok.convert_tokens_to_ids("<|eom_id|>") in loaded.end_ids
    written = tok.encode('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>'
                         "<|start_header_id|>ipython<|end_header_id|>\n\n42", add_special_tokens=False)
    row = Row(0, [1], 64, 0.0, 1.0, [], False, loaded)
    tokens = Tokens(tok, loaded.end_ids)
    for token in written:
        if not row.done:
            tokens.add([row], [token])
    assert (row.done, row.finish) == (True, "stop")
    text = "".join(event[1] for _, event in tokens.events if event[0] == "delta")
    parsed = parse_generation(tok, text, "", TOOLS)
    assert parsed.invalid == "" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
    # Without the model's end tokens the row runs on past the call, and the call cannot be read.
    row, tokens = Row(0, [1], len(written), 0.0, 1.0, [], False, loaded), Tokens(tok)
    for token in written:
        tokens.add([row], [token])
    text = "".join(event[1] for _, event in tokens.events if event[0] == "delta")
    assert parse_generation(tok, text, "", TOOLS).invalid
