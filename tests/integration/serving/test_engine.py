"""The continuous batcher on the tiny model: rows join and leave at any step; in-process
(`Engine`) and in its own process (`EngineProcess`)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal

import pytest
import torch

from serving.decoding import LoadedModel, Row, load_model_dir
from serving.engine import Engine, sample
from serving.engine_process import Completion, EngineProcess
from tasks.config import ServingParams

# The engine's knobs as the service passes them on the shipped defaults.
_DEFAULTS = ServingParams()
KNOBS = {"max_batch": _DEFAULTS.max_batch, "join_ratio": _DEFAULTS.join_ratio,
         "join_after_steps": _DEFAULTS.join_after_steps, "prefix_min_tokens": _DEFAULTS.prefix_min_tokens}

MESSAGES = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]
_ids = itertools.count()


@pytest.fixture(scope="module")
def loaded(model_dir) -> LoadedModel:
    return load_model_dir(model_dir)


class _NoEnd:
    """The model's tokenizer without an end-of-sequence token (and, in `endless`, the model without
    its end tokens): rows run to `max_new`."""

    eos_token_id = pad_token_id = None

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):  # everything else (template, vocabulary) is the model's
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)


def endless(loaded: LoadedModel) -> LoadedModel:
    return dataclasses.replace(loaded, tokenizer=_NoEnd(loaded.tokenizer), end_ids=frozenset())


def prompt_ids(tokenizer, user: str = "2001-02-03", system: str = MESSAGES[0]["content"]) -> list[int]:
    from tasks.model.chat import render_prompt

    prompt = render_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": user}])
    return tokenizer.encode(prompt, add_special_tokens=False)


class Harness:
    """An in-process engine whose events land in one asyncio queue per row; `kwargs` override
    the engine's arguments (`KNOBS`)."""

    def __init__(self, **kwargs) -> None:
        self.loop = asyncio.get_running_loop()
        self.queues: dict[int, asyncio.Queue] = {}
        self.engine = Engine(self._emit, **{**KNOBS, **kwargs})

    async def __aenter__(self) -> "Harness":
        return self

    async def __aexit__(self, *exc) -> None:
        self.engine.close()

    def _emit(self, events) -> None:
        def put():
            for row, event in events:
                self.queues[row.id].put_nowait(event)
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(put)

    def row(self, model: LoadedModel, max_new: int, *, user: str = "2001-02-03", temperature: float = 0.0,
            stream: bool = True, system: str = MESSAGES[0]["content"]) -> Row:
        """A row with its event queue, not yet submitted (rendering the prompt takes a while)."""
        row = Row(next(_ids), prompt_ids(model.tokenizer, user, system), max_new, temperature, 1.0, [], stream, model)
        self.queues[row.id] = asyncio.Queue()
        return row

    def submit(self, model: LoadedModel, max_new: int, **kwargs) -> Row:
        row = self.row(model, max_new, **kwargs)
        self.engine.submit(row)
        return row

    def submit_together(self, model: LoadedModel, max_new: int, prompts: list[tuple[str, str]]) -> list[Row]:
        """One row per (system, user) prompt, submitted as one arrival (requests landing in the
        same instant): the engine's thread takes all of them in one step, however it is scheduled."""
        rows = [Row(next(_ids), prompt_ids(model.tokenizer, user, system), max_new, 0.0, 1.0, [], True, model)
                for system, user in prompts]
        for row in rows:
            self.queues[row.id] = asyncio.Queue()
        self.engine.submit_together(rows)
        return rows

    async def next(self, row: Row, timeout: float = 60) -> tuple:
        return await asyncio.wait_for(self.queues[row.id].get(), timeout)

    async def until_end(self, row: Row) -> tuple[str, tuple]:
        parts = []
        while (event := await self.next(row))[0] == "delta":
            parts.append(event[1])
        return "".join(parts), event

    def pending(self, row: Row) -> list[tuple]:
        return list(self.queues[row.id]._queue)


def run(coro):
    return asyncio.run(coro)


def test_a_row_joins_a_running_batch_and_leaves_before_it(loaded):
    """A short request sent while a long one generates joins it within a few steps and is
    answered while the long one still runs, with the text it gets alone."""
    model = endless(loaded)
    steps: list[int] = []

    async def scenario():
        async with Harness(on_step=steps.append) as h:
            alone_text, _ = await h.until_end(h.submit(model, 6, user="1999-12-31"))
            steps.clear()
            long = h.submit(model, 120)
            assert (await h.next(long))[0] == "delta"  # generating
            short = h.submit(model, 6, user="1999-12-31")
            short_text, end = await h.until_end(short)
            assert end == ("end", "length", 6)
            assert not long.done, "the short row had to wait for the long one"
            assert short_text == alone_text  # joining a batch at another length changes nothing
            long_text, end = await h.until_end(long)
            assert end == ("end", "length", 120) and long_text

    run(scenario())
    assert max(steps) == 2 and steps[-1] == 1  # they shared steps; the long one ended alone


USERS = ["1901-02-11", "1999-12-31", "2024-07-04", "1960-05-23", "2001-02-03", "1987-10-19", "2012-01-09",
         "1945-08-15"]


def _answers_and_prefill_widths(model: LoadedModel, groups: list[list[tuple[str, str]]], **kwargs):
    """Each group's (system, user) prompts sent at once, a group after the previous one
    ended; the greedy answers, and per group the number of tokens each of its prefills ran
    per row. (The engine may start on a group's first row before the others arrive, which
    then join in a prefill of their own: a group may have several.)"""
    widths: list[list[int]] = []

    def record(_module, _args, inputs):
        if inputs["input_ids"].shape[1] > 1:  # a prefill (a decoding step feeds one token)
            widths[-1].append(inputs["input_ids"].shape[1])

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)

    async def scenario():
        texts = []
        async with Harness(**kwargs) as h:
            for group in groups:
                widths.append([])
                rows = h.submit_together(model, 10, group)
                texts += [(await h.until_end(row))[0] for row in rows]
        return texts

    try:
        return run(scenario()), widths
    finally:
        hook.remove()


def test_prompts_that_share_a_start_prefill_only_the_rest_and_answer_alike(loaded):
    system = MESSAGES[0]["content"]
    groups = [[(system, u) for u in USERS[:4]], [(system, u) for u in USERS[4:]], [("Say the year only.", USERS[0])]]
    cached_model, whole_model = endless(loaded), endless(loaded)
    cached, widths = _answers_and_prefill_widths(cached_model, groups)
    whole, whole_widths = _answers_and_prefill_widths(whole_model, groups, prefix_min_tokens=0)
    assert cached == whole and all(cached)  # the cache changes how much is computed, not the answers
    assert whole_model.prefix is None
    prompts = [prompt_ids(loaded.tokenizer, u) for u in USERS]
    prefix = cached_model.prefix.ids
    assert len(prefix) >= KNOBS["prefix_min_tokens"] and all(p[:len(prefix)] == prefix for p in prompts)
    longest = max(len(p) for p in prompts)
    # The first group runs whole (it is what the prefix is learnt from); the second runs
    # only what follows the prefix; a prompt with another system message runs whole again.
    first, second, other = widths
    assert max(first) == longest and max(second) <= longest - len(prefix)
    assert other == [len(prompt_ids(loaded.tokenizer, USERS[0], "Say the year only."))]
    assert max(whole_widths[0]) == longest and min(whole_widths[1]) > max(second)


def test_the_prepared_decoding_mask_decodes_as_the_models_own(loaded, monkeypatch):
    from serving import engine

    groups = [[(MESSAGES[0]["content"], u) for u in USERS]]
    prepared, _ = _answers_and_prefill_widths(endless(loaded), groups)
    original = engine._Batch.__init__

    def without(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.mask_4d = False

    monkeypatch.setattr(engine._Batch, "__init__", without)
    own, _ = _answers_and_prefill_widths(endless(loaded), groups)
    assert prepared == own and all(prepared)


@pytest.mark.parametrize(("join_ratio", "join_after_steps", "earliest", "latest"), [
    (0.5, 4, 4, 6),  # the defaults: one row is under half of four, so it waits its 4 steps
    (0.5, 12, 12, 14),  # a longer wait, as set
    (0.25, 12, 0, 2),  # one row is a quarter of four: it joins at once
])
def test_rows_join_in_groups_but_never_wait_long(loaded, join_ratio, join_after_steps, earliest, latest):
    """One row waiting beside a running batch of four joins once the waiting rows reach
    `join_ratio` of the running ones, else after `join_after_steps` decoding steps."""
    model = endless(loaded)
    steps: list[int] = []

    async def scenario():
        async with Harness(on_step=steps.append, join_ratio=join_ratio, join_after_steps=join_after_steps) as h:
            running = [h.submit(model, 40) for _ in range(4)]
            for row in running:
                assert (await h.next(row))[0] == "delta"
            late = h.row(model, 3)
            before = len(steps)
            h.engine.submit(late)
            after = len(steps)
            await h.until_end(late)
            # The late row's wait is the number of steps of four from its arrival to the first
            # step of five (plus the step that may have been under way when it came). The
            # engine's thread goes on stepping while this one submits, so the arrival lies
            # between the counts `before` and `after`: the wait lies between the two counts
            # from them, and one value in that range must be within the expected bounds.
            five = next(i for i, n in enumerate(steps) if i >= before and n == 5)
            assert five - before >= earliest and five - after <= latest, (before, after, steps[before:])
            for row in running:
                await h.until_end(row)

    run(scenario())


def test_without_a_mergeable_cache_a_row_waits_for_the_batch(loaded, monkeypatch):
    """Models whose cache cannot take rows mid-way (sliding windows, static caches) get
    batches formed between runs instead."""
    monkeypatch.setattr("serving.engine._mergeable", lambda cache: False)
    model = endless(loaded)

    async def scenario():
        async with Harness() as h:
            long = h.submit(model, 40)
            assert (await h.next(long))[0] == "delta"
            short = h.submit(model, 4)
            await h.until_end(short)
            assert long.done and h.pending(long)[-1][0] == "end"  # the long row ended first

    run(scenario())


def test_a_new_model_starts_once_the_running_rows_have_drained(loaded):
    """A hot swap: rows running on the old model finish on it; a row for the new one starts
    after them."""
    old, new = endless(loaded), endless(loaded)

    async def scenario():
        async with Harness() as h:
            running = h.submit(old, 30)
            assert (await h.next(running))[0] == "delta"
            after = h.submit(new, 4)
            await h.until_end(after)
            assert running.done and h.pending(running)[-1] == ("end", "length", 30)

    run(scenario())


def test_rows_with_other_sampling_settings_share_steps(loaded):
    """Greedy rows keep their greedy answer when sampled rows generate beside them."""
    steps: list[int] = []

    async def scenario():
        async with Harness(on_step=steps.append) as h:
            expected, _ = await h.until_end(h.submit(loaded, 12))
            steps.clear()
            torch.manual_seed(0)
            rows = [h.submit(loaded, 12, temperature=t) for t in (0.0, 1.5, 0.0, 0.7)]
            texts = [(await h.until_end(row))[0] for row in rows]
            assert texts[0] == texts[2] == expected

    run(scenario())
    assert max(steps) > 1


def test_a_client_that_leaves_frees_its_row(loaded):
    model = endless(loaded)
    steps: list[int] = []

    async def scenario():
        async with Harness(on_step=steps.append) as h:
            rows = [h.submit(model, 200) for _ in range(3)]
            for row in rows:  # all three generating
                await h.next(row)
            rows[1].done = True  # what the engine process does on a cancel
            for row in rows[::2]:
                assert (await h.until_end(row))[1] == ("end", "length", 200)
            assert len(rows[1].ids) < 200 and all(e[0] == "delta" for e in h.pending(rows[1]))  # it left: no end

    run(scenario())
    assert max(steps) == 3 and steps[-1] < 3


def test_a_failing_step_answers_its_rows_and_the_engine_goes_on(loaded):
    class Broken:
        device = loaded.model.device
        config = loaded.model.config

        def __call__(self, **kwargs):
            raise RuntimeError("out of memory")

    broken = dataclasses.replace(loaded, model=Broken())

    async def scenario():
        async with Harness() as h:
            rows = [h.submit(broken, 4), h.submit(broken, 4)]
            for row in rows:
                assert (await h.until_end(row))[1] == ("error", "generation failed: RuntimeError: out of memory")
            assert (await h.until_end(h.submit(loaded, 4)))[1][0] == "end"

    run(scenario())


def test_non_streamed_rows_get_their_text_in_one_delta(loaded):
    async def scenario():
        async with Harness() as h:
            streamed, whole = h.submit(loaded, 10), h.submit(loaded, 10, stream=False)
            text, _ = await h.until_end(streamed)
            await asyncio.sleep(0.1)
            assert len(h.pending(whole)) <= 2  # one delta (none if the answer is empty), then the end
            assert (await h.until_end(whole))[0] == text

    run(scenario())


def test_sample_is_greedy_at_temperature_zero_and_keeps_to_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5], [3.0, 2.9, 0.0, 0.0]])
    assert sample(logits, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])).tolist() == [1, 0]
    torch.manual_seed(0)
    # top_p small: only the most likely token is left, whatever the temperature
    drawn = {tuple(sample(logits, torch.tensor([2.0, 2.0]), torch.tensor([0.01, 0.01])).tolist()) for _ in range(50)}
    assert drawn == {(1, 0)}
    # the nucleus of row 2 at top_p 0.9 is its two first tokens: both are drawn, never the others
    seen = {int(sample(logits[1:], torch.tensor([1.0]), torch.tensor([0.9]))[0]) for _ in range(200)}
    assert seen == {0, 1}
    # top_p of 5e-324 (valid JSON, 0 once a float32 tensor): still the most likely token, not an error
    tiny = torch.tensor([5e-324, 5e-324])
    assert tiny.tolist() == [0.0, 0.0]
    assert sample(logits, torch.tensor([1.0, 1.0]), tiny).tolist() == [1, 0]


def test_sample_draws_a_seeded_row_from_its_own_generator():
    logits = torch.tensor([[0.0, 0.3, 0.1, 0.2], [0.5, 0.4, 0.3, 0.2], [0.1, 0.0, 0.2, 0.3]])
    hot, whole = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])

    def draws(seeded_row: int, others_seed: int) -> list[int]:
        """Row `seeded_row`'s draws under seed 7, while the other rows draw from the global state."""
        torch.manual_seed(others_seed)
        generators = [None] * 3
        generators[seeded_row] = torch.Generator().manual_seed(7)
        return [int(sample(logits, hot, whole, generators)[seeded_row]) for _ in range(40)]

    first = draws(0, others_seed=1)
    assert len(set(first)) > 1  # sampled, not greedy
    assert draws(0, others_seed=2) == first  # the other rows' draws do not move it
    # Another row with the same logits and seed draws the same tokens, wherever it sits.
    logits[2] = logits[0]
    assert draws(2, others_seed=3) == first


@pytest.fixture(scope="module")
def untrained() -> LoadedModel:
    """The `tiny` base model (random weights, built once and cached; nothing is trained)."""
    from transformers import AutoTokenizer

    from tasks.config import ModelParams
    from tasks.model.loading import load_causal_lm, resolve_base

    base = resolve_base(ModelParams())
    return LoadedModel(load_causal_lm(base).eval(), AutoTokenizer.from_pretrained(base), 2048)


def test_a_seeded_row_samples_the_same_text_alone_and_beside_other_rows(untrained):
    """OpenAI's `seed`: the same request with the same seed at temperature 1 gets the same answer,
    also when other rows (sampled, greedy, of other prompt lengths) share its decoding steps."""
    model = endless(untrained)

    async def scenario():
        async with Harness() as h:
            def seeded(seed: int | None, temperature: float = 1.0, user: str = "2001-02-03") -> Row:
                # Same id, so the row keeps the event queue `Harness.row` made for it.
                return dataclasses.replace(h.row(model, 16, user=user, temperature=temperature), seed=seed)

            answers = []
            for seed in (7, 7, 8):
                row = seeded(seed)
                h.engine.submit(row)
                answers.append((await h.until_end(row))[0])
            alone, again, other = answers
            assert alone == again and alone != other
            rows = [seeded(None, 1.2, user="1999-12-31 and more"), seeded(7), seeded(None, 0.0)]
            h.engine.submit_together(rows)
            assert (await h.until_end(rows[1]))[0] == alone

    run(scenario())


# ---------------------------------------------------------------------------------------
# The engine in its own process
# ---------------------------------------------------------------------------------------


def completion(key: str, ids: list[int], max_new: int, stream: bool = False) -> Completion:
    return Completion("", ids, max_new, 0.0, 1.0, [], stream, key, "1", asyncio.get_running_loop(), asyncio.Queue())


async def answer(c: Completion) -> tuple[str, tuple]:
    parts = []
    while (event := await asyncio.wait_for(c.queue.get(), 60))[0] == "delta":
        parts.append(event[1])
    return "".join(parts), event


def test_the_engine_process_answers_as_the_engine_does_and_fails_cleanly_when_it_dies(model_dir, loaded):
    from serving.engine_process import EngineError

    ids = prompt_ids(loaded.tokenizer)

    async def in_process() -> str:
        async with Harness() as h:
            return (await h.until_end(h.submit(loaded, 8)))[0]

    expected = run(in_process())
    engine = EngineProcess(**KNOBS)
    try:
        with pytest.raises(EngineError, match="could not load"):
            engine.load(model_dir / "missing")
        key, context = engine.load(model_dir)
        assert context == loaded.context_length

        async def scenario():
            many = [completion(key, ids, 8) for _ in range(6)]
            for c in many:
                await engine.submit(c)
            results = [await answer(c) for c in many]
            assert {text for text, _ in results} == {expected}
            assert {end for _, end in results} == {results[0][1]} and results[0][1][0] == "end"

            unknown = completion("m999", ids, 8)
            await engine.submit(unknown)
            assert (await answer(unknown))[1] == ("error", "model m999 is not loaded in the engine")

            # the process dies with a row in flight: the row is answered, not left hanging (the
            # process is stopped before the row is sent, so it cannot answer it before it dies: on
            # an idle machine the row's five tokens came back before the kill)
            stuck = completion(key, ids, 200, stream=True)
            os.kill(engine.process.pid, signal.SIGSTOP)
            await engine.submit(stuck)
            os.kill(engine.process.pid, signal.SIGKILL)
            _, end = await answer(stuck)
            assert end == ("error", "the generation engine stopped")
            assert not engine.alive
            with pytest.raises(EngineError, match="not running"):
                await engine.submit(completion(key, ids, 8))

        run(scenario())
    finally:
        engine.close(timeout=5)


def test_closing_the_engine_is_no_error_in_the_log(caplog):
    """Every clean shutdown of `ftllm serve` logged "the generation engine stopped" as an ERROR."""
    import logging

    engine = EngineProcess(**KNOBS)
    with caplog.at_level(logging.INFO, logger="ftllm.serving"):
        engine.close(timeout=10)
        engine._reader.join(10)
    assert not engine.alive
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "engine stopped" in r.getMessage()] == [
        ("INFO", "the generation engine stopped (the service is closing)")]


def test_a_stop_signal_to_the_whole_process_tree_leaves_the_engine_to_the_service(caplog, tmp_path):
    """BentoML signals a worker's whole tree on shutdown: the engine died of the SIGTERM before the
    service closed it, and every clean stop of `ftllm serve` logged an ERROR."""
    import logging

    from serving.engine_process import EngineError

    engine = EngineProcess(**KNOBS)
    with pytest.raises(EngineError, match="could not load"):
        engine.load(tmp_path / "missing")  # answered: the engine runs, its handlers set
    os.kill(engine.process.pid, signal.SIGTERM)
    engine.process.join(1)  # within the grace the signal leaves the service (STOP_GRACE_S)
    assert engine.process.is_alive() and engine.alive
    with caplog.at_level(logging.INFO, logger="ftllm.serving"):
        engine.close(timeout=10)
        engine._reader.join(10)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "engine stopped" in r.getMessage()] == [
        ("INFO", "the generation engine stopped (the service is closing)")]


def test_a_process_that_never_closes_its_engine_still_exits(tmp_path):
    """At exit, multiprocessing signals its daemonic children and waits on them: an engine that
    ignored the signal kept a process that skipped `close` (a service that failed to start) alive."""
    import subprocess
    import sys

    from tests.support.project import REPO

    script = tmp_path / "no_close.py"
    script.write_text(
        "from serving.engine_process import EngineError, EngineProcess\n"
        "from tests.integration.serving.test_engine import KNOBS\n"
        "if __name__ == '__main__':\n"
        "    engine = EngineProcess(**KNOBS)\n"
        "    try:\n"
        "        engine.load('/nowhere')\n"
        "    except EngineError:\n"
        "        print('started', flush=True)\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-2000:]
