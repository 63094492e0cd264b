"""Evaluation's batched generation reads calls as the service does."""

from __future__ import annotations

from tasks.evaluate.generation import generate_batched
from tasks.model.responses import parse_generation

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_a_call_behind_a_special_token_marker_is_read_as_a_call(family_models):
    """Mistral v0.3's `[TOOL_CALLS]` is a special token: the decoded generation keeps it, so
    the call is counted (and not scored as text), as the service returns it."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_models("mistral"))
    written = tok.encode('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]</s>',
                         add_special_tokens=False)

    class Scripted(torch.nn.Module):
        """A model that writes `written` after any prompt."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **_kwargs):
            return torch.cat([input_ids, torch.tensor([written] * len(input_ids))], dim=1)

    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS,
                                     tokenize=False, add_generation_prompt=True)
    tok.pad_token = tok.eos_token
    (text,), _latencies, _lengths = generate_batched(Scripted(), tok, [prompt], 64, 1)
    parsed = parse_generation(tok, text, prompt, TOOLS)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Oslo"})]
