"""The engine process: a decoding loop in a spawned process, and the service's end of its pipe.

The service's event loop (HTTP, validation, templating) and the decoding loop run in two
processes so that they do not share a GIL (see `serving.engine`). They talk over a
`multiprocessing` pipe in the dataclass messages below: `LoadModel`, `DropModel`,
`StartRow`, `CancelRow`, `Score` and `Close` from the service; `Loaded`, `Events` and
`Scored` back. The
process runs the loop that `serving.engine` names (`LOOPS`), through the
`serving.decoding.DecodingLoop` protocol.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from serving.decoding import (
    CLOSE_TIMEOUT_SECONDS,
    Event,
    LoadedModel,
    LoopFactory,
    Row,
    continuation_logps,
    load_model_dir,
)
from serving.engine import Engine
from serving.library_engine import LibraryEngine

log = logging.getLogger("ftllm.serving")

# The decoding loops by `serving.engine`.
LOOPS: dict[str, LoopFactory] = {"own": Engine, "transformers": LibraryEngine}
# The loops beside which a forward pass scores as it would alone. The library's continuous
# batching does not: a pass run while its rows decode scored up to 0.8 nats differently.
SCORING_LOOPS = ("own",)


# -- messages from the service -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadModel:
    """Load the model folder `model_dir` under `key`; answered with `Loaded`."""

    key: str
    model_dir: str


@dataclass(frozen=True, slots=True)
class DropModel:
    """The service no longer sends rows for `key`; rows of it still generating finish."""

    key: str


@dataclass(frozen=True, slots=True)
class StartRow:
    """Generate one completion: up to `max_new` tokens after `prompt_ids` on model `key`."""

    id: int
    key: str
    prompt_ids: list[int]
    max_new: int
    temperature: float  # 0: greedy
    top_p: float
    stops: list[str]
    stream: bool
    seed: int | None = None  # seeds the row's sampling; None: the engine's own random state


@dataclass(frozen=True, slots=True)
class CancelRow:
    """The client of row `id` left."""

    id: int


@dataclass(frozen=True, slots=True)
class Score:
    """Score `continuations` after `context` on model `key` (`serving.decoding.continuation_logps`);
    answered with `Scored`."""

    id: int
    key: str
    context: list[int]
    continuations: list[list[int]]


@dataclass(frozen=True, slots=True)
class Close:
    """Answer the rows in flight with an error and end the process."""


# -- messages from the engine --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loaded:
    """The answer to `LoadModel`: the model's context length, or why it did not load."""

    key: str
    context_length: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Events:
    """Rows' events, `[(row id, event), ...]`, and the rows of each decoding step since the last."""

    events: list[tuple[int, Event]]
    step_sizes: list[int]


@dataclass(frozen=True, slots=True)
class Scored:
    """The answer to `Score`: a log-probability per continuation, or why there is none."""

    id: int
    scores: list[float]
    error: str | None = None


ToEngine = LoadModel | DropModel | StartRow | CancelRow | Score | Close
FromEngine = Loaded | Events | Scored


STOP_GRACE_S = 5.0  # how long a stop signal leaves the service to close the engine itself


def engine_main(conn, max_batch: int, join_ratio: float, join_after_steps: int, prefix_min_tokens: int = 0,
                kind: str = "own") -> None:
    """The engine process: load models and take rows from `conn`; send their events back.

    `max_batch`, `join_ratio`, `join_after_steps` and `prefix_min_tokens` are the loop's;
    `kind` is `serving.engine`, a key of `LOOPS`. A model dropped stays in memory while
    rows of it still generate (they hold it). Scoring runs in a thread of its own, beside
    the decoding loop: rows keep flowing meanwhile.

    The service stops it (`EngineProcess.close`), or its pipe's end does. A stop signal
    (BentoML sends one to the worker's whole process tree on every shutdown) gives the service
    `STOP_GRACE_S` to close it first, so that a clean stop is not an engine gone under the
    service, an error in its log; then the engine exits anyway (a service that never closes it,
    as at the exit of a process that skipped `close`, is not waited on for good).
    """
    import os
    import signal

    def stop_soon(_signum: int, _frame: object) -> None:
        timer = threading.Timer(STOP_GRACE_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    if threading.current_thread() is threading.main_thread():  # the engine's process (a test may run it in a thread)
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, stop_soon)
    send_lock = threading.Lock()
    models: dict[str, LoadedModel] = {}
    rows: dict[int, Row] = {}
    steps: list[int] = []

    def send(message: FromEngine) -> None:
        with send_lock:
            conn.send(message)

    def emit(events: list[tuple[Row, Event]]) -> None:
        for row, event in events:
            if event[0] != "delta":
                rows.pop(row.id, None)
        sizes = steps[:]
        del steps[: len(sizes)]
        send(Events([(row.id, event) for row, event in events], sizes))

    def load(message: LoadModel) -> None:
        try:
            models[message.key] = load_model_dir(Path(message.model_dir))
            # The libraries and the weights stay: kept out of the collector's sight, a full
            # collection does not stall every row's decoding for hundreds of milliseconds.
            gc.freeze()
            send(Loaded(message.key, models[message.key].context_length))
        except Exception as exc:
            log.exception("loading %s failed", message.model_dir)
            send(Loaded(message.key, 0, f"{type(exc).__name__}: {exc}"))

    def score(message: Score, loaded: LoadedModel) -> None:
        try:
            send(Scored(message.id, continuation_logps(loaded, message.context, message.continuations)))
        except Exception as exc:
            log.exception("scoring on model %s failed", message.key)
            send(Scored(message.id, [], f"{type(exc).__name__}: {exc}"))

    scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ftllm-score")
    engine = LOOPS[kind](emit, max_batch=max_batch, join_ratio=join_ratio, join_after_steps=join_after_steps,
                         on_step=steps.append, prefix_min_tokens=prefix_min_tokens)
    try:
        while True:
            try:
                message: ToEngine = conn.recv()
            except (EOFError, OSError):  # the service is gone
                break
            match message:
                case StartRow():
                    if message.key not in models:
                        send(Events([(message.id, ("error", f"model {message.key} is not loaded in the engine"))], []))
                        continue
                    row = rows[message.id] = Row(message.id, message.prompt_ids, message.max_new, message.temperature,
                                                 message.top_p, message.stops, message.stream, models[message.key],
                                                 seed=message.seed)
                    engine.submit(row)
                case Score():
                    if kind not in SCORING_LOOPS:
                        send(Scored(message.id, [], f"serving.engine: {kind} does not score continuations (its "
                                                    "decoding steps change the model's attention for a pass beside them)"))
                    elif message.key not in models:
                        send(Scored(message.id, [], f"model {message.key} is not loaded in the engine"))
                    else:
                        scorer.submit(score, message, models[message.key])
                case CancelRow():
                    if message.id in rows:
                        engine.cancel(rows[message.id])
                case LoadModel():  # in a thread: rows keep flowing while a model loads
                    threading.Thread(target=load, args=(message,), name="ftllm-load", daemon=True).start()
                case DropModel():
                    dropped = models.pop(message.key, None)
                    if dropped is not None:
                        engine.retire(dropped)
                case Close():
                    break
    finally:
        scorer.shutdown(wait=False, cancel_futures=True)
        engine.close()
        engine.join(CLOSE_TIMEOUT_SECONDS)


@dataclass(eq=False)
class Completion:
    """The service's side of one row: what to send to the engine, and where its events go."""

    prompt: str
    prompt_ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    stream: bool
    model_key: str
    version: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    seed: int | None = None
    id: int = -1
    finish: str = "length"
    completion_tokens: int = 0  # the tokens the engine generated
    ended: bool = False
    stop_sequence: bool = False  # a stop string of the request ended it (its finish is "stop")
    # The answer's first tokens, which the service wrote at the prompt's end (a forced call's
    # opening): part of the answer the client gets, so counted as completion, not prompt.
    opening_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as the client is told them (`usage`): without a forced opening."""
        return len(self.prompt_ids) - self.opening_tokens

    @property
    def answer_tokens(self) -> int:
        """The answer's tokens as the client is told them: the engine's and a forced opening's."""
        return self.completion_tokens + self.opening_tokens


class EngineError(RuntimeError):
    """The engine could not load a model, or is not running."""


class EngineProcess:
    """Starts the engine process and is the service's end of its pipe.

    `load` blocks until the model is in the engine (call it from a thread); `submit`
    sends a completion, whose events then arrive on its own event loop's queue. If the
    process dies, every completion in flight gets an ("error", ...) event and `alive`
    turns False.

    `max_batch`, `join_ratio`, `join_after_steps` and `prefix_min_tokens` are the loop's
    (plain values: they travel to a spawned process); `engine` is `serving.engine`, the
    decoding loop the process runs (a key of `LOOPS`); `on_steps` receives the rows of each
    decoding step, a list per message from the engine.
    """

    def __init__(self, *, max_batch: int, join_ratio: float, join_after_steps: int,
                 on_steps: Callable[[list[int]], None] | None = None, prefix_min_tokens: int = 0,
                 engine: str = "own") -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the service has threads
        self._conn, child = context.Pipe()
        self.process = context.Process(target=engine_main,
                                       args=(child, max_batch, join_ratio, join_after_steps, prefix_min_tokens, engine),
                                       name="ftllm-engine", daemon=True)
        self.process.start()
        child.close()
        self.on_steps = on_steps
        self.alive = True
        self._closing = False  # set by close(): the engine's end is then expected, not an error
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._keys = itertools.count(1)
        self._in_flight: dict[int, Completion] = {}
        self._loads: dict[str, Future] = {}
        self._scores: dict[int, Future] = {}
        self._reader = threading.Thread(target=self._read, name="ftllm-engine-reader", daemon=True)
        self._reader.start()

    def _send(self, message: ToEngine) -> None:
        if not self.alive:
            raise EngineError("the generation engine is not running")
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise EngineError(f"the generation engine is not running ({exc})") from None

    def load(self, model_dir: Path, timeout: float | None = None) -> tuple[str, int]:
        """Load a model folder into the engine: (key for completions, context length)."""
        key = f"m{next(self._keys)}"
        future: Future = Future()
        self._loads[key] = future
        self._send(LoadModel(key, str(model_dir)))
        loaded: Loaded = future.result(timeout)
        if loaded.error:
            raise EngineError(f"the engine could not load {model_dir}: {loaded.error}")
        return key, loaded.context_length

    def drop(self, key: str) -> None:
        if self.alive:
            self._send(DropModel(key))

    async def submit(self, completion: Completion) -> None:
        completion.id = next(self._ids)
        self._in_flight[completion.id] = completion
        try:
            self._send(StartRow(completion.id, completion.model_key, completion.prompt_ids, completion.max_new,
                                completion.temperature, completion.top_p, completion.stops, completion.stream,
                                completion.seed))
        except EngineError:
            self._in_flight.pop(completion.id, None)
            raise

    async def score(self, key: str, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Each continuation's log-probability after `context` on model `key` (see `Score`).

        Raises:
            EngineError: the engine is not running, or the scoring failed.
        """
        sid = next(self._ids)
        future: Future = Future()
        self._scores[sid] = future
        try:
            self._send(Score(sid, key, context, continuations))
            scored: Scored = await asyncio.wrap_future(future)
        finally:
            self._scores.pop(sid, None)
        if scored.error:
            raise EngineError(f"the engine could not score on model {key}: {scored.error}")
        return scored.scores

    def cancel(self, completion: Completion) -> None:
        """The client went away: stop generating for it."""
        if self._in_flight.pop(completion.id, None) is not None and self.alive:
            try:
                self._send(CancelRow(completion.id))
            except EngineError:
                pass

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            match message:
                case Events():
                    self._deliver(message.events)
                    if self.on_steps is not None and message.step_sizes:
                        self.on_steps(message.step_sizes)
                case Loaded():
                    _resolve(self._loads.pop(message.key, None), message)
                case Scored():
                    _resolve(self._scores.pop(message.id, None), message)
        self.alive = False
        code = self.process.exitcode
        if self._closing:
            log.info("the generation engine stopped (the service is closing)")
        else:
            log.error("the generation engine stopped (exit code %s)", code)
        for future in list(self._loads.values()):
            _resolve(future, Loaded("", 0, "the engine stopped"))
        for sid, future in list(self._scores.items()):
            _resolve(future, Scored(sid, [], "the engine stopped"))
        self._deliver([(cid, ("error", "the generation engine stopped")) for cid in list(self._in_flight)])

    def _deliver(self, events: list[tuple[int, Event]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Completion, Event]]] = {}
        for cid, event in events:
            completion = self._in_flight.get(cid)
            if completion is None:  # cancelled
                continue
            if event[0] != "delta":
                del self._in_flight[cid]
            by_loop.setdefault(completion.loop, []).append((completion, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_events, items)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        self._closing = True
        try:
            self._send(Close())
        except EngineError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def _resolve(future: Future | None, message: FromEngine) -> None:
    """Answer a waiting `load` or `score`; one whose caller went away (its request cancelled) is
    done already, and setting it would raise in the reader thread and end it."""
    if future is None:
        return
    try:
        future.set_result(message)
    except InvalidStateError:
        pass


def _put_events(items: list[tuple[Completion, Event]]) -> None:
    for completion, event in items:
        completion.queue.put_nowait(event)
