"""The typed seams of serving: the decoding-loop protocol both loops implement, the messages
between the service and the engine process, and no import cycle."""

from __future__ import annotations

import inspect
import multiprocessing
import pickle
from pathlib import Path

import pytest

from serving.decoding import DecodingLoop, LoopFactory
from serving.engine import Engine
from serving.engine_process import LOOPS, CancelRow, Close, DropModel, Events, Loaded, LoadModel, StartRow
from serving.library_engine import LibraryEngine
from tests.support.imports import import_cycles

ROOT = Path(__file__).resolve().parents[3]


def protocol_methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(protocol).items()
            if callable(member) and not name.startswith("_")}


@pytest.mark.parametrize("loop", [Engine, LibraryEngine])
def test_both_loops_implement_the_decoding_loop_protocol(loop):
    for name, wanted in protocol_methods(DecodingLoop).items():
        assert callable(getattr(loop, name, None)), f"{loop.__name__} has no {name}"
        assert list(inspect.signature(getattr(loop, name)).parameters) == list(wanted.parameters), name
    # The engine process builds every loop with the same keywords (`LoopFactory`).
    wanted = inspect.signature(LoopFactory.__call__).parameters
    got = inspect.signature(loop.__init__).parameters
    assert list(got) == list(wanted), f"{loop.__name__}.__init__ takes {list(got)}, not {list(wanted)}"


def test_serving_engine_names_both_loops():
    assert LOOPS == {"own": Engine, "transformers": LibraryEngine}


def test_no_module_of_the_project_imports_itself_through_others():
    assert import_cycles(ROOT) == []


@pytest.mark.parametrize("message", [
    LoadModel("m1", "/models/a"), DropModel("m1"), CancelRow(3), Close(),
    StartRow(3, "m1", [1, 2, 3], 8, 0.0, 1.0, ["\n"], True),
    StartRow(4, "m1", [1, 2, 3], 8, 0.7, 0.9, [], False, seed=2**70),
    Loaded("m1", 2048), Loaded("m1", 0, "OSError: no such folder"),
    Events([(3, ("delta", "2024")), (3, ("end", "stop", 2)), (4, ("error", "the service is shutting down"))], [2, 1]),
])
def test_messages_cross_a_process_pipe_unchanged(message):
    parent, child = multiprocessing.Pipe()
    try:
        parent.send(message)
        received = child.recv()
    finally:
        parent.close()
        child.close()
    assert received == message and type(received) is type(message)
    assert pickle.loads(pickle.dumps(message)) == message


def test_messages_are_immutable():
    with pytest.raises(AttributeError):
        StartRow(3, "m1", [1], 8, 0.0, 1.0, [], False).max_new = 9  # type: ignore[misc]


def test_the_engine_process_hands_every_setting_of_a_row_to_its_loop(monkeypatch):
    """What `StartRow` carries reaches the decoding loop's `Row` (a setting dropped at this
    seam would be accepted by the service and silently not applied)."""
    import dataclasses
    import threading

    import serving.engine_process as engine_process
    from serving.decoding import LoadedModel

    submitted = []

    class Recording:
        def __init__(self, emit, **settings) -> None:
            pass

        def submit(self, row) -> None:
            submitted.append(row)

        def close(self) -> None:
            pass

        def join(self, timeout=None) -> None:
            pass

    monkeypatch.setitem(engine_process.LOOPS, "recording", Recording)
    monkeypatch.setattr(engine_process, "load_model_dir", lambda path: LoadedModel(None, None, 2048))
    monkeypatch.setattr(engine_process.gc, "freeze", lambda: None)
    service, engine = multiprocessing.Pipe()
    process = threading.Thread(target=engine_process.engine_main, args=(engine, 4, 0.5, 4, 0, "recording"))
    process.start()
    try:
        service.send(LoadModel("m1", "/models/a"))
        assert service.recv() == Loaded("m1", 2048)
        start = StartRow(3, "m1", [1, 2], 8, 0.7, 0.9, ["\n"], True, seed=7)
        service.send(start)
        service.send(Close())
        process.join(10)
    finally:
        service.close()
        engine.close()
    row = submitted[0]
    assert {f.name: getattr(row, f.name) for f in dataclasses.fields(start) if f.name != "key"} == {
        "id": 3, "prompt_ids": [1, 2], "max_new": 8, "temperature": 0.7, "top_p": 0.9, "stops": ["\n"], "stream": True,
        "seed": 7}


def test_an_answer_for_a_caller_that_went_away_does_not_end_the_reader():
    """A score or load whose request was cancelled has a done future: setting it raised
    InvalidStateError in the engine's reader thread, which then stopped reading every row's events."""
    from concurrent.futures import Future

    from serving.engine_process import Scored, _resolve

    gone: Future = Future()
    gone.cancel()
    _resolve(gone, Scored(1, [], None))
    waiting: Future = Future()
    _resolve(waiting, Scored(2, [-0.5]))
    assert waiting.result().scores == [-0.5]
    _resolve(None, Scored(3, []))  # nobody waits for it
