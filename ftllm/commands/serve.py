"""`ftllm serve`: serve the champion with `bentoml serve`, on loopback unless told otherwise.

Serves the newest bento of the chat service built for this project's `registry.model_name`
(by the pipeline's package step), or, where none was built yet, the service straight from
`serving/` in the project. The
service then picks the registry's `champion` and follows it as it moves.

    ftllm serve --host 127.0.0.1 --port 3000 [--bento ftllm_chat:ftllm-chat-v3] [--set serving.max_batch=16]
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import OVERRIDES_ENV, Params, load_params
from tasks.environment import apply_defaults, environment
from tasks.errors import UsageError

BENTO_NAME = "ftllm_chat"
SOURCE_SERVICE = "serving.service:ChatService"
# How long the server may take to stop once a stop signal was passed on (its workers drain in
# BentoML's 30-second graceful window) before its whole session is killed: a stop never hangs.
STOP_TIMEOUT_S = 60.0


def _stop_with_parent(parent: int) -> Callable[[], None] | None:
    """What the server's process runs before `bentoml serve` starts, on Linux: the kernel sends it
    SIGTERM once this process is gone. Killed with SIGKILL (an OOM kill, `kill -9`), this process
    cannot pass a signal on, and the server would keep the port, logging feedback for nobody;
    its workers stop with it (serving/lifetime.py). Elsewhere, or where the C library's prctl
    cannot be found, None (nothing to run: the server then outlives a SIGKILL of this process).

    The kernel watches the thread that starts the server: call it from the thread that waits
    for the server (the command's main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError) as exc:
        print(f"warning: prctl not found ({exc}): the server will not stop if this process is killed",
              file=sys.stderr)
        return None
    pr_set_pdeathsig, sigterm, getppid, exit_now = 1, int(signal.SIGTERM), os.getppid, os._exit

    def arm() -> None:  # in the child, between fork and exec
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)
        if getppid() != parent:  # this process was gone before the request was made
            exit_now(1)
    return arm


def latest_bento(model_name: str, name: str = BENTO_NAME) -> str | None:
    """The tag of the most recently built bento called `name` for the registered model `model_name`, or None.

    The package step versions each bento `<model_name>-v<version>`: one store may hold the
    bentos of several registered models, and the newest of them all may be another's.
    """
    import bentoml

    # BentoML keeps tag versions in lower case; `<name>-v<digits>` exactly, or model "chat" would
    # also take the bentos of model "chat-v2".
    version = re.compile(rf"{re.escape(model_name.lower())}-v\d+")
    bentos = [b for b in bentoml.list() if b.tag.name == name and version.fullmatch(str(b.tag.version))]
    if not bentos:
        return None
    return str(max(bentos, key=lambda b: b.info.creation_time).tag)


def _serving_target(bento: str | None, model_name: str) -> str:
    """What `bentoml serve` runs: the bento asked for, else the newest built for `model_name`,
    else the service in `serving/`, which needs the model the package step stores. A bento
    whose code cannot read this checkout's feedback log (an older schema: the service would
    stop at start-up with a traceback) is refused when asked for, and passed over when newest.

    Raises:
        UsageError: `bento` is not in the store or reads an older log, or nothing was packaged
            for `model_name` yet (BentoML's own message spoke of a cloud context).
    """
    import bentoml
    from bentoml.exceptions import BentoMLException, NotFound

    from tasks.feedback.schema import SCHEMA_VERSION

    if bento is not None:
        try:
            bentoml.get(bento)
        except (NotFound, BentoMLException, ValueError):
            built = latest_bento(model_name)
            store = os.environ.get("BENTOML_HOME", "the BentoML store")
            raise UsageError(f"--bento {bento}: no such bento in {store}; "
                             + (f"the newest for {model_name} is {built}" if built else "leave --bento out")) from None
        reads = log_version_read_by(bento)
        if reads is not None and reads < SCHEMA_VERSION:
            raise UsageError(f"--bento {bento}: its code reads feedback logs up to version {reads}, and this checkout "
                             f"writes version {SCHEMA_VERSION}; the service would stop on the log. Leave --bento out, "
                             "or run `ftllm run` to package the champion with this code")
        return bento
    built = latest_bento(model_name)
    if built is not None:
        reads = log_version_read_by(built)
        if reads is None or reads >= SCHEMA_VERSION:
            return built
        print(f"note: {built} was packaged by code that reads feedback logs up to version {reads}, older than this "
              f"checkout's {SCHEMA_VERSION}: serving the champion with this checkout's service instead", file=sys.stderr)
    tag = environment().bento_model or f"{model_name}:latest"
    try:
        bentoml.models.get(tag)
    except (NotFound, BentoMLException, ValueError):
        raise UsageError(f"no model packaged for registry.model_name={model_name} yet: run `ftllm run` first (it "
                         "trains, registers and packages the champion), or pass --params with the settings of the "
                         "run that did") from None
    return SOURCE_SERVICE


def log_version_read_by(tag: str) -> int | None:
    """The newest feedback-log version the code packaged in bento `tag` reads (`SCHEMA_VERSION`
    in its `tasks/feedback/`: schema.py now, store.py in older code), or None where it does not say."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        folder = Path(bentoml.get(tag).path)
    except (BentoMLException, ValueError):  # not in the store: `bentoml serve` says so
        return None
    for module in sorted((folder / "src" / "tasks" / "feedback").glob("*.py")):
        found = re.search(r"^SCHEMA_VERSION = (\d+)", module.read_text(encoding="utf-8"), re.M)
        if found:
            return int(found.group(1))
    return None


def project_params(root: Path, overrides: dict[str, Any] | None = None, params_file: Path | None = None) -> Params:
    """The settings the service will read: `params_file`, else FTLLM_PARAMS, else the project's
    params.yaml, else the defaults; with the `--set` overrides on top.

    All sections are validated here, as every command does with the code of this checkout; the
    service itself reads only its own sections (a bento may carry older code).
    """
    path = root / (params_file or environment().params_file or "params.yaml")  # relative to the project, as the service reads it
    return load_params(path if path.is_file() else None, overrides)


def _check_bindable(host: str, port: int) -> None:
    """Refuse a port in use or an address this machine does not have, before the server starts
    (bentoml would fail with a traceback after the service was announced)."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    for family, kind, proto, _, address in infos:  # every address the name has (`localhost`: ::1 and 127.0.0.1)
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EAFNOSUPPORT:  # no IPv6 here: the server cannot use that address either
                continue
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another port, "
                             "or stop what uses it") from None


def serve_command(host: str = "127.0.0.1", port: int = 3000, bento: str | None = None,
                  overrides: dict[str, Any] | None = None, params: Path | None = None) -> int:
    """Run `bentoml serve` in the foreground; return its exit code.

    Args:
        host: the interface to bind; 127.0.0.1 keeps the service on this machine.
        port: the TCP port.
        bento: a bento tag to serve; default: the newest `ftllm_chat` bento of the project's
            `registry.model_name` (FTLLM_PARAMS or params.yaml), else `serving/`.
        overrides: `--set` overrides of the service's settings, handed to it in FTLLM_OVERRIDES.
        params: the settings file (`--params`; e.g. params.tools.yaml serves the tools task's
            model), handed to the service in FTLLM_PARAMS; default: FTLLM_PARAMS, else params.yaml.

    Raises:
        UsageError: the port is out of range, in use or not bindable, or `params` is not a file.
        ConfigError: the settings, with their overrides, do not validate; or FTLLM_API_KEYS,
            FTLLM_API_KEYS_FILE or FTLLM_API_KEY cannot be used.
        DataFileError: the feedback log (FTLLM_FEEDBACK_DB, else feedback.db) cannot be opened
            or written, or is not a feedback log.
    """
    root = apply_defaults()
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: expected 1..65535")
    if params is not None and not params.is_file():
        raise UsageError(f"--params {params}: no such settings file")
    params = params.resolve() if params is not None else None
    model_name = project_params(root, overrides, params).registry.model_name
    target = _serving_target(bento, model_name)
    from serving.keys import load_keyring

    keys = load_keyring()  # a bad key setting is a usage error here, before the server starts
    from tasks.feedback import FeedbackStore, default_db_path

    FeedbackStore(default_db_path(root)).close()  # so is a log it could not write: opened (made) here first
    _check_bindable(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and keys is None:
        print(f"warning: binding {host} without FTLLM_API_KEYS or FTLLM_API_KEY: anyone who reaches this port can "
              "use and teach the model", file=sys.stderr)
    print(f"serving {target} on http://{host}:{port} (OpenAI base URL http://{host}:{port}/v1)", file=sys.stderr)
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(port)]
    env = {**os.environ, "FTLLM_ROOT": str(root), OVERRIDES_ENV: json.dumps(overrides or {}),
           **({"FTLLM_PARAMS": str(params)} if params is not None else {})}
    # The server runs in a session of its own, and this process passes it every stop signal it
    # gets, once: Ctrl-C in a terminal, a supervisor's SIGTERM (systemd, `docker stop`), a
    # SIGINT sent to this process alone (`kill -INT`, `timeout -s INT`: the server never saw
    # it, and this process waited on for good), a closed terminal's SIGHUP, passed on as
    # SIGTERM (BentoML reloads its workers on SIGHUP). A second Ctrl-C reaches the server as a
    # second SIGINT: its forced stop. A signal this process was started ignoring (`nohup`, a
    # background job's SIGINT) stays ignored.
    stopped: list[int] = []
    since: list[float] = []  # when the first stop came
    server: subprocess.Popen | None = None

    def pass_on(signum: int, _frame: object) -> None:
        stopped.append(signal.SIGTERM if signum == signal.SIGHUP else signum)  # as the server is to get it
        since[:] = since or [time.monotonic()]
        if server is not None:
            server.send_signal(stopped[-1])

    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, pass_on)
    server = subprocess.Popen(cmd, cwd=root, env=env, preexec_fn=_stop_with_parent(os.getpid()), start_new_session=True)
    if stopped:  # a stop that came while it started
        server.send_signal(stopped[-1])
    code = wait_for_server(server, since)
    return 0 if stopped else code


def wait_for_server(server: subprocess.Popen, since: list[float], timeout_s: float | None = None) -> int:
    """The server's exit code. Once a stop was passed on to it (`since` holds its time), it has
    `timeout_s` (STOP_TIMEOUT_S) to stop; then its session, the server and every process it
    started, is killed (SIGKILL), said on stderr: Ctrl-C or a supervisor's stop never leaves
    this command waiting on a server that did not act on it.
    """
    timeout_s = STOP_TIMEOUT_S if timeout_s is None else timeout_s
    while True:
        try:
            return server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if since and time.monotonic() - since[0] > timeout_s:
                break
    print(f"the server did not stop within {timeout_s:g} s of the stop signal: killing it and its workers", file=sys.stderr)
    try:
        os.killpg(server.pid, signal.SIGKILL)  # its own session: `bentoml serve`, its workers, their engines
    except ProcessLookupError:
        pass
    return server.wait()
