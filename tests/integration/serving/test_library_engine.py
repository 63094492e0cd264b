"""`serving.engine: transformers` on the tiny model: the library's continuous batching in the
engine process answers as the own engine does, through the same `EngineProcess` interface."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal

import httpx
import pytest
import yaml

from serving.decoding import STOP_SEQUENCE, load_model_dir
from serving.engine_process import Completion, EngineError, EngineProcess
from tasks.config import ServingParams

_DEFAULTS = ServingParams()
KNOBS = {"max_batch": 4, "join_ratio": _DEFAULTS.join_ratio, "join_after_steps": _DEFAULTS.join_after_steps,
         "prefix_min_tokens": _DEFAULTS.prefix_min_tokens}
USERS = ["2001-02-03", "1999-12-31", "2020-06-15", "1987-07-04", "2012-11-30", "1969-01-20"]


def _prompt_ids(tokenizer, user: str) -> list[int]:
    from tasks.model.chat import render_prompt

    messages = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": user}]
    return tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)


def _completion(key: str, ids: list[int], max_new: int, *, stream: bool = False, stops: list[str] | None = None,
                temperature: float = 0.0, top_p: float = 1.0) -> Completion:
    return Completion("", ids, max_new, temperature, top_p, stops or [], stream, key, "1",
                      asyncio.get_running_loop(), asyncio.Queue())


async def _answer(c: Completion) -> tuple[str, tuple]:
    parts = []
    while (event := await asyncio.wait_for(c.queue.get(), 120))[0] == "delta":
        parts.append(event[1])
    return "".join(parts), event


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    tokenizer = load_model_dir(model_dir).tokenizer
    return [_prompt_ids(tokenizer, user) for user in USERS]


def _serve(kind: str, model_dir, scenario) -> object:
    """Run `scenario(engine, key)` against an engine process of `kind` with the model loaded."""
    engine = EngineProcess(**KNOBS, engine=kind)
    try:
        key, _context = engine.load(model_dir)
        return asyncio.run(scenario(engine, key))
    finally:
        engine.close(timeout=10)


async def _greedy(engine: EngineProcess, key: str, prompts: list[list[int]], stops: list[list[str]]):
    """Every prompt at once (more than max_batch: some wait for a row to leave), half streamed;
    then each with its stop strings."""
    many = [_completion(key, ids, 24, stream=i % 2 == 0) for i, ids in enumerate(prompts)]
    for c in many:
        await engine.submit(c)
    plain = [await _answer(c) for c in many]
    stopped = [_completion(key, ids, 24, stream=True, stops=s) for ids, s in zip(prompts, stops)]
    for c in stopped:
        await engine.submit(c)
    return plain, [await _answer(c) for c in stopped]


def test_greedy_answers_are_the_own_engines(model_dir, prompts):
    own, _ = _serve("own", model_dir, lambda engine, key: _greedy(engine, key, prompts, [[]] * len(prompts)))
    assert all(end[0] == "end" for _, end in own), own
    assert any(text for text, _ in own), "the tiny model answered nothing: nothing would be compared"
    # a stop string from the middle of each answer (where it has one), so both engines cut there
    stops = [[text[len(text) // 2:len(text) // 2 + 2]] if len(text) >= 4 else [] for text, _ in own]
    own_plain, own_stopped = _serve("own", model_dir, lambda engine, key: _greedy(engine, key, prompts, stops))
    lib_plain, lib_stopped = _serve("transformers", model_dir,
                                    lambda engine, key: _greedy(engine, key, prompts, stops))
    assert lib_plain == own_plain
    assert lib_stopped == own_stopped
    assert any(end[1] == STOP_SEQUENCE for _, end in own_stopped), own_stopped  # cut by their stop strings


def test_sampled_cancelled_and_dead_rows_end_as_with_the_own_engine(model_dir, prompts):
    async def scenario(engine: EngineProcess, key: str):
        sampled = [_completion(key, ids, 12, temperature=0.9, top_p=0.8) for ids in prompts[:3]]
        for c in sampled:
            await engine.submit(c)
        for c in sampled:
            text, end = await _answer(c)
            # a draw may be the end-of-turn token at once: an empty answer that ended, not an error
            assert end[0] == "end" and end[1] in {"stop", "length"} and 0 <= end[2] <= 12, (text, end)
            assert end[1] == "stop" or end[2] == 12, (text, end)

        # a client that leaves: its row stops, the next request is answered
        gone = _completion(key, prompts[0], 2000, stream=True)
        await engine.submit(gone)
        await asyncio.wait_for(gone.queue.get(), 120)  # it is generating
        engine.cancel(gone)
        after = _completion(key, prompts[1], 8)
        await engine.submit(after)
        assert (await _answer(after))[1][0] == "end"

        unknown = _completion("m999", prompts[0], 8)
        await engine.submit(unknown)
        assert (await _answer(unknown))[1] == ("error", "model m999 is not loaded in the engine")

        stuck = _completion(key, prompts[0], 2000, stream=True)
        os.kill(engine.process.pid, signal.SIGSTOP)  # it cannot answer the row before it dies
        await engine.submit(stuck)
        os.kill(engine.process.pid, signal.SIGKILL)
        assert (await _answer(stuck))[1] == ("error", "the generation engine stopped")
        assert not engine.alive
        with pytest.raises(EngineError, match="not running"):
            await engine.submit(_completion(key, prompts[0], 8))

    _serve("transformers", model_dir, scenario)


@pytest.mark.slow
def test_the_service_with_serving_engine_transformers_answers_as_with_its_own(http_server, client, serving_dir):
    """`serving.engine` reaches the engine process: over HTTP, the library's loop answers the
    chat route (plain and streamed) as the in-process service on the own engine does."""
    params = yaml.safe_load((serving_dir / "params.yaml").read_text())
    params["serving"]["engine"] = "transformers"
    path = serving_dir / "params-transformers.yaml"
    path.write_text(yaml.safe_dump(params))
    body = {"model": "ftllm-chat-test", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "system", "content": "Rewrite the ISO date in words."},
                         {"role": "user", "content": "1999-12-31"}]}
    own = client.post("/v1/chat/completions", json=body).json()
    with http_server(serving_dir / "bentoml-serve-transformers.log", {"FTLLM_PARAMS": str(path)}) as url:
        lib = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        streamed = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120).text
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert lib["choices"][0]["message"] == own["choices"][0]["message"]
    assert lib["choices"][0]["finish_reason"] == own["choices"][0]["finish_reason"]
    assert lib["usage"] == own["usage"]
    chunks = [line[len("data: "):] for line in streamed.splitlines() if line.startswith("data: {")]
    text = "".join((json.loads(c)["choices"][0]["delta"].get("content") or "") for c in chunks
                   if json.loads(c)["choices"])
    assert text == own["choices"][0]["message"]["content"]
    # the own engine reports its decoding steps; the library's loop reports none
    counts = [float(n) for n in re.findall(r"^ftllm_batch_size_count(?:\{[^}]*\})? (\S+)$", metrics, re.M)]
    assert counts == [0.0], metrics


def test_rows_in_flight_finish_on_a_model_the_service_dropped(model_dir, prompts):
    """A hot swap: the service loads the new model, then drops the old one while its rows still
    generate. They finish on it (no error), as with the own engine, and the new model answers."""
    async def scenario(engine: EngineProcess, key: str):
        new_key, _context = await asyncio.to_thread(engine.load, model_dir)
        running = [_completion(key, ids, 400, stream=True) for ids in prompts]
        for c in running:
            await engine.submit(c)
        await asyncio.wait_for(running[0].queue.get(), 120)  # generating
        engine.drop(key)
        ends = [(await _answer(c))[1] for c in running]
        after = _completion(new_key, prompts[0], 8)
        await engine.submit(after)
        return ends, (await _answer(after))[1]

    for kind in ("own", "transformers"):
        ends, after = _serve(kind, model_dir, scenario)
        assert [end[0] for end in ends] == ["end"] * len(prompts), (kind, ends)
        assert after[0] == "end", (kind, after)


@pytest.mark.parametrize("kind", ["own", "transformers"])
def test_scoring_beside_the_decoding_loop_matches_a_forward_pass_in_this_process(model_dir, prompts, kind):
    """`tool_choice: required` ranks functions by the engine's scores: beside the own loop's rows
    each score is the continuation's log-probability as this process computes it, and the rows
    still end. Beside the library's continuous batching a pass scored up to 0.8 nats off (its
    steps change the model's attention), so that engine refuses to score and says so."""
    from serving.decoding import continuation_logps

    continuations = [prompts[1][-3:], prompts[2][-5:], prompts[3][-1:]]

    async def scenario(engine: EngineProcess, key: str):
        rows = [_completion(key, ids, 24, stream=True) for ids in prompts[:3]]
        for c in rows:
            await engine.submit(c)
        await asyncio.wait_for(rows[0].queue.get(), 120)  # decoding has begun
        try:
            scores = await engine.score(key, prompts[0], continuations)
        except EngineError as exc:
            scores = str(exc)
        ends = [(await _answer(c))[1][0] for c in rows]
        with pytest.raises(EngineError, match="m999 is not loaded" if kind == "own" else "does not score"):
            await engine.score("m999", prompts[0], continuations)
        return scores, ends

    scores, ends = _serve(kind, model_dir, scenario)
    assert ends == ["end"] * 3
    if kind == "transformers":
        assert "serving.engine: transformers does not score continuations" in scores
        return
    expected = continuation_logps(load_model_dir(model_dir), prompts[0], continuations)
    assert scores == pytest.approx(expected, abs=1e-3)
    assert all(s < 0 for s in scores) and len(set(scores)) == 3
