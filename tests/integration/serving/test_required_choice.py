"""`tool_choice: "required"` with several tools: the call names a declared function, the one
the model is likeliest to write, on a real model through the chat route and the own decoding loop."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.support.scripted_service import local_chat, scripted_chat

QUESTION = [{"role": "user", "content": "What time is it in Oslo?"}]


def _tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"The {name}.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# `get_time` begins `get_time_zone`: a name is scored with the text after it, not as a prefix.
TOOLS = [_tool("get_time"), _tool("get_time_zone"), _tool("get_weather"), _tool("convert_currency")]


@pytest.fixture(scope="module")
def untrained():
    """The `tiny` base model (random weights, built once and cached): it writes no valid name by itself."""
    from transformers import AutoTokenizer

    from serving.decoding import LoadedModel
    from tasks.config import ModelParams
    from tasks.model.loading import load_causal_lm, resolve_base

    base = resolve_base(ModelParams())
    return LoadedModel(load_causal_lm(base).eval(), AutoTokenizer.from_pretrained(base), 2048)


def _likeliest(loaded, tools: list[dict]) -> str:
    """The function whose name (and the text up to its arguments) the model gives the highest
    probability after the prompt, each computed alone by a forward pass over the whole text."""
    import torch

    from tasks.model.chat import encode_text, render_prompt
    from tasks.model.forced_calls import call_choices

    prompt = render_prompt(loaded.tokenizer, QUESTION, "auto", tools)
    choices = call_choices(loaded.tokenizer, QUESTION, tools)
    texts = [encode_text(loaded.tokenizer, prompt + choice.opening) for choice in choices]
    start = len(os.path.commonprefix(texts))  # the functions' texts differ from here on
    best, name = -math.inf, None
    for choice, ids in zip(choices, texts, strict=True):
        with torch.inference_mode():
            logps = loaded.model(torch.tensor([ids])).logits[0].log_softmax(-1)
        score = sum(logps[i - 1, ids[i]].item() for i in range(start, len(ids)))
        if score > best:
            best, name = score, choice.name
    return name


def test_required_calls_the_declared_function_the_model_finds_likeliest(untrained):
    from tasks.model.forced_calls import forced_call_opening

    with local_chat(untrained) as client:
        for tools in (TOOLS, TOOLS[::-1]):  # the declaration's order is part of the prompt
            wanted = _likeliest(untrained, tools)
            resp = client.post("/v1/chat/completions", json={
                "messages": QUESTION, "tools": tools, "tool_choice": "required", "max_tokens": 24, "temperature": 0})
            assert resp.status_code == 200, resp.text
            message = resp.json()["choices"][0]["message"]
            # Random weights write no valid arguments: the call comes back as text, opened with the name.
            text = message["content"] or ""
            opening = forced_call_opening(untrained.tokenizer, QUESTION, tools, wanted)
            assert text.startswith(opening), (wanted, text)
            rest = text[len(opening):]
            assert not any(rest.startswith(tail) for tail in ("_zone", "_", "z")), text  # not a longer name


def test_sampled_required_calls_are_drawn_among_the_declared_functions(untrained):
    from tasks.model.forced_calls import call_choices

    openings = {c.name: c.opening for c in call_choices(untrained.tokenizer, QUESTION, TOOLS)}
    seen = set()
    with local_chat(untrained) as client:
        for seed in range(12):
            resp = client.post("/v1/chat/completions", json={
                "messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "max_tokens": 40,  # the forced opening (17 tokens) counts
                "temperature": 1.0, "seed": seed})
            assert resp.status_code == 200, resp.text
            text = resp.json()["choices"][0]["message"]["content"] or ""
            names = [n for n, o in openings.items() if text.startswith(o)]
            assert names, text
            seen.add(max(names, key=len))
    assert len(seen) >= 2, seen  # drawn by likelihood, not always the likeliest (three lie within a nat)


def test_a_function_is_drawn_as_a_token_is_with_temperature_and_top_p():
    from serving.service import _draw

    scores = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert _draw(scores[::-1], 0.0, 1.0, None) == 2  # greedy: the likeliest, wherever it is
    assert {_draw(scores, 1.0, 0.5, seed) for seed in range(50)} == {0}  # 0.5 of the mass: the likeliest alone
    assert {_draw(scores, 1.0, 0.7, seed) for seed in range(50)} == {0, 1}
    drawn = [_draw(scores, 1.0, 1.0, seed) for seed in range(2000)]
    assert [round(drawn.count(i) / 2000, 1) for i in range(3)] == [0.5, 0.3, 0.2]
    assert _draw(scores, 1.0, 1.0, 7) == _draw(scores, 1.0, 1.0, 7)


def test_a_prompt_that_leaves_no_room_for_a_calls_opening_is_refused_for_its_length(untrained):
    """2,039 tokens with the opening of any call, 2,050 with a name and what follows it: past the
    context of 2,048, so the name cannot be chosen; the request was answered with a name the
    model wrote unconstrained."""
    long = [{"role": "user", "content": "What time is it in Oslo? " + "now " * 621}]
    with local_chat(untrained) as client:
        resp = client.post("/v1/chat/completions", json={
            "messages": long, "tools": TOOLS, "tool_choice": "required", "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert "with the opening of a call" in error["message"]


def test_the_scripted_model_calls_the_function_scored_highest_and_writes_its_own_name_when_scoring_fails(family_models):
    from serving.engine_process import EngineError
    from tasks.model.forced_calls import forced_call_opening

    tools = TOOLS[:3]
    with scripted_chat(family_models("qwen2.5")) as chat:
        tok = chat.engine.tokenizer
        chat.engine.scores = [-6.0, -0.5, -3.0]
        call = '<tool_call>\n{"name": "get_time_zone", "arguments": {"city": "Oslo"}}\n</tool_call>'
        chat.writes(call.removeprefix(forced_call_opening(tok, QUESTION, tools, "get_time_zone")))
        message = chat.post(messages=QUESTION, tools=tools, tool_choice="required")["choices"][0]["message"]
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time_zone"]

        async def fails(*_args):
            raise EngineError("the engine could not score")

        chat.engine.score = fails
        chat.writes(call.removeprefix(forced_call_opening(tok, QUESTION, tools, None)))
        message = chat.post(messages=QUESTION, tools=tools, tool_choice="required")["choices"][0]["message"]
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time_zone"]
        for scores in ([float("nan"), -1.0, -2.0], [float("-inf")] * 3):  # no likelihood to choose by: the same
            async def scored(*_args, scores=scores):
                return scores

            chat.engine.score = scored
            message = chat.post(messages=QUESTION, tools=tools, tool_choice="required", temperature=1.0,
                                seed=3)["choices"][0]["message"]
            assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time_zone"]


def test_a_forced_name_is_closed_so_the_model_cannot_run_it_on_into_another(untrained):
    """The named opening ended at the name (`"name": "get`): the model could go on to `get_time` or
    `get_weather` and the answer called another function than the one named, greedy or not."""
    tools = [_tool("get"), _tool("get_time"), _tool("get_weather")]
    with local_chat(untrained) as client:
        for choice in ({"type": "function", "function": {"name": "get"}}, "required"):
            for seed in range(4):
                resp = client.post("/v1/chat/completions", json={
                    "messages": QUESTION, "tools": tools, "tool_choice": choice, "max_tokens": 30,  # the forced opening (15 tokens) counts
                    "temperature": 1.0, "seed": seed})
                assert resp.status_code == 200, resp.text
                message = resp.json()["choices"][0]["message"]
                text = message["content"] or json.dumps(message["tool_calls"])
                name = text.split('"name": "', 1)[1].split('"', 1)[0] if message["content"] else \
                    message["tool_calls"][0]["function"]["name"]
                assert name in {"get", "get_time", "get_weather"}, text
                if choice != "required":
                    assert name == "get", text
