"""The servers `ftllm bench serve --peer` measures: this project's service and, beside it,
`transformers serve --continuous-batching` on the same weights.

The peer needs a plain model folder (full weights, tokenizer, chat template), while a
registry version holds a LoRA adapter over its base; `merged_folder` writes the weights
the engine serves (`serving.decoding.load_model_dir`, LoRA folded in) to a temporary folder,
so both servers run the same numbers. Each server is a child process on a free loopback
port, waited for until its health probe answers, and stopped on exit; one that dies first
is a `PeerError` quoting the end of its output.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import FtllmError

# How long a server may take to load its model and answer its health probe. A busy 2-core
# machine needs about 15 s for the service (BentoML, MLflow and the engine process).
START_TIMEOUT_SECONDS = 180
# The peer's paged KV cache, sized for the bench rather than from free memory (which on a
# CPU takes 60% of the machine's RAM): blocks of 256 tokens, one per short chat completion,
# so 256 blocks hold far more rows than any concurrency level measured here.
PEER_NUM_BLOCKS = 256
PEER_MAX_BATCH_TOKENS = 2048
SERVICE = "serving.service:ChatService"


class PeerError(FtllmError):
    """A server of the comparison could not start (or the model folder could not be written)."""


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(name: str, cmd: list[str], health_url: str, log_path: Path, *, cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = START_TIMEOUT_SECONDS) -> Iterator[subprocess.Popen]:
    """Run `cmd` until the block ends, once `health_url` answers 200.

    Raises:
        PeerError: the process exited, or did not answer within `timeout` seconds; the
            message holds the last lines of its output (`log_path`).
    """
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise PeerError(f"{name} could not start ({' '.join(cmd[:3])} ...): {exc}") from None
        try:
            wait_ready(name, proc, health_url, log_path, timeout)
            yield proc
        finally:
            _stop(proc)


def wait_ready(name: str, proc: subprocess.Popen, health_url: str, log_path: Path | None = None,
               timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Poll `health_url` until it answers 200.

    Raises:
        PeerError: `proc` exited first, or `timeout` seconds passed; the message holds the
            last lines of its output (`log_path`) when there is one.
    """
    import httpx

    def output() -> str:
        return f"; the end of its output ({log_path}):\n{_tail(log_path)}" if log_path else ""

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise PeerError(f"{name} exited with code {proc.returncode} before it was ready{output()}")
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"{name} did not answer {health_url} within {timeout:.0f} s{output()}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def service_command(port: int) -> list[str]:
    """`bentoml serve` of this checkout's service (what `ftllm serve` runs when no bento was built)."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)]


def peer_env() -> dict[str, str]:
    """The peer's environment: torch's intra-op threads as many as the engine's.

    Left to its default (every core), the peer's OpenMP threads spin-wait for each other,
    and on a 2-core machine shared with other work it fell from 23 to 1.7 requests/s at
    concurrency 1 (and from 79 to 3 at 16), which would measure the machine, not the engine.
    """
    from serving.decoding import cpu_threads

    return {"OMP_NUM_THREADS": str(cpu_threads())}


def peer_command(model_dir: Path, port: int) -> list[str]:
    """`transformers serve --continuous-batching` of `model_dir` on the CPU, on loopback."""
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--continuous-batching",
            "--cb-num-blocks", str(PEER_NUM_BLOCKS), "--cb-max-batch-tokens", str(PEER_MAX_BATCH_TOKENS),
            "--log-level", "warning"]


@contextmanager
def served_model_dir(model_name: str, version: str, source: str) -> Iterator[Path]:
    """The folder of the model a service reports serving (`/v1/models`: its version and source)."""
    from serving.model_manager import version_files

    if source.startswith("bentoml:"):
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            yield Path(bentoml.models.get(source.removeprefix("bentoml:")).path)
            return
        except NotFound:
            raise PeerError(f"the service serves {source}, which this machine's BentoML store "
                            f"({os.environ.get('BENTOML_HOME')}) does not hold; pass --model-dir") from None
    with version_files(model_name, version) as (model_dir, _):
        yield model_dir


@contextmanager
def merged_folder(model_dir: Path) -> Iterator[Path]:
    """A temporary plain model folder holding the weights the engine serves from `model_dir`."""
    from transformers.utils import logging as hf_logging

    from serving.decoding import load_model_dir

    hf_logging.disable_progress_bar()  # the bench's own output is the report
    tmp = Path(tempfile.mkdtemp(prefix="ftllm-peer-"))
    try:
        try:
            loaded = load_model_dir(model_dir)
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
        except Exception as exc:  # any load failure of a foreign folder: say which folder
            raise PeerError(f"could not write the merged weights of {model_dir} for the peer: "
                            f"{type(exc).__name__}: {exc}") from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
