"""The project under test and its servers: where the repository is, a run's small budget,
free loopback ports, and waiting for a server to answer."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def as_a_terminal_job() -> None:
    """Run in a started process before its program (`preexec_fn`): SIGINT and SIGQUIT at their
    defaults, as for a command a person runs in a terminal. A test suite started as a background
    job of a non-interactive shell (`make test &` in a script) hands them down ignored, and a
    command started ignoring SIGINT rightly keeps ignoring it (as under `nohup`), so a test of
    what Ctrl-C does would test that instead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float, log_path: Path | None = None) -> None:
    """Poll `url` until it answers 200; fail with the server's last output if it dies or `seconds` pass."""
    from serving.bench.serve_peer import PeerError, wait_ready

    try:
        wait_ready("the server", proc, url, log_path, seconds)
    except PeerError as exc:
        pytest.fail(str(exc))


# A small budget: enough for the tiny model to learn the date task well past the base.
FAST = {
    "train.max_steps": 200,
    "train.learning_rate": 0.004,
    "eval.max_examples": 60,
    "gate.min_exact_match": 0.5,
    "gate.max_perplexity": 5.0,
    # Latency depends on the load of the machine running the tests, not on the code under test.
    "gate.max_p95_latency_ms": 60000,
}

# A gate that any candidate passes, for runs that are about something else than the model
# (a family's template, where files land): the checks still run and are recorded.
ANY_CANDIDATE_PASSES = {
    "gate.min_exact_match": 0.0,
    "gate.max_perplexity": 1e9,
    "gate.min_gain_over_prompting": -1.0,
    "gate.max_regression": 1.0,
    "gate.max_p95_latency_ms": 600000,
}

# A few steps of a family's random-weight test model and a short evaluation.
FAMILY_RUN = {
    "train.save_steps": 0,
    "eval.few_shot_k": 1,
    "eval.max_new_tokens": 8,
    **ANY_CANDIDATE_PASSES,
}
