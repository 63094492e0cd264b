"""Evaluation's batched generation reads calls as the service does."""

from __future__ import annotations

import torch

from tasks.evaluate.generation import generate_batched
from tasks.model.responses import ParsedResponse, parse_generation

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class Scripted(torch.nn.Module):
    """A model that writes `written` after any prompt, up to the first end token it is given, as `generate` does."""

    def __init__(self, written: list[int], generation_config=None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.written = written
        if generation_config is not None:
            self.generation_config = generation_config

    def generate(self, input_ids, eos_token_id, pad_token_id, **_kwargs):
        ends = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        cut = next((i + 1 for i, t in enumerate(self.written) if t in ends), len(self.written))
        row = self.written[:cut] + [pad_token_id] * (len(self.written) - cut)
        return torch.cat([input_ids, torch.tensor([row] * len(input_ids))], dim=1)


def generated_call(tok, model: Scripted) -> ParsedResponse:
    """What evaluation reads back from `model` asked for the weather in Oslo with `TOOLS`."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
                                     tokenize=False, add_generation_prompt=True)
    tok.pad_token = tok.eos_token
    (text,), _latencies, _lengths = generate_batched(model, tok, [prompt], 64, 1)
    return parse_generation(tok, text, prompt, TOOLS)


def test_a_call_behind_a_special_token_marker_is_read_as_a_call(family_models):
    """Mistral v0.3's `[TOOL_CALLS]` is a special token: the decoded generation keeps it, so
    the call is counted (and not scored as text), as the service returns it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_models("mistral"))
    written = tok.encode('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]</s>',
                         add_special_tokens=False)
    parsed = generated_call(tok, Scripted(written))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]


def test_generation_stops_at_the_models_end_tokens_as_the_service_does(family_models):
    """Llama 3.1 ends a call at `<|eom_id|>` (its generation config's end tokens): evaluation stops
    there as the service does, so what the model would write after it does not spoil the call."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = family_models("llama3.1")
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoModelForCausalLM.from_pretrained(folder).generation_config
    written = tok.encode('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>'
                         "<|start_header_id|>ipython<|end_header_id|>\n\n42", add_special_tokens=False)
    parsed = generated_call(tok, Scripted(written, config))
    assert parsed.invalid == "" and [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
