"""A server killed with SIGKILL leaves nothing answering on its port: `bentoml serve`'s workers
stop with it (serving/lifetime.py), and `bentoml serve` stops with the `ftllm serve` that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import psutil

from tests.support.project import REPO, as_a_terminal_job, free_port, wait_until_up


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/livez", timeout=5)
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def test_the_worker_stops_when_its_server_is_killed(http_server, serving_dir):
    with http_server(serving_dir / "bentoml-serve-killed.log",
                     {"FTLLM_FEEDBACK_DB": str(serving_dir / "killed-feedback.db")}) as url:
        port = url.rsplit(":", 1)[1]
        server = next(p for p in psutil.Process().children() if "serve" in p.cmdline() and port in p.cmdline())
        workers = server.children(recursive=True)
        assert workers, "bentoml serve started no worker"
        server.kill()  # it cannot stop its workers
        gone, alive = psutil.wait_procs(workers, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
        assert not answers(url), "something still answers on the port"


def test_the_server_stops_when_ftllm_serve_is_killed(registry, serving_dir):
    port = free_port()
    env = {**os.environ, "FTLLM_ROOT": str(REPO), "FTLLM_FEEDBACK_DB": str(serving_dir / "killed-cli-feedback.db")}
    with open(serving_dir / "ftllm-serve-killed.log", "w") as log:
        cli = subprocess.Popen([sys.executable, "-m", "ftllm.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
        url, started = f"http://127.0.0.1:{port}", []
        try:
            wait_until_up(f"{url}/readyz", cli, 180, serving_dir / "ftllm-serve-killed.log")
            started = psutil.Process(cli.pid).children(recursive=True)
            assert started, "ftllm serve started no server"
            cli.kill()  # it cannot pass a signal on
            cli.wait(10)
            gone, alive = psutil.wait_procs(started, timeout=60)
            assert not alive, [p.cmdline() for p in alive]
            assert not answers(url), "something still answers on the port"
        finally:  # whatever the test found, nothing of it outlives the test
            cli.kill()
            for proc in started:
                if proc.is_running():
                    proc.kill()


def test_ftllm_serve_stops_on_a_sigint_sent_to_it_alone_and_on_a_hangup(registry, serving_dir):
    """`kill -INT` (a script, `timeout -s INT`) reached the command alone: the server never saw it,
    and the command waited on it for good. A closed terminal sends SIGHUP to the foreground group.
    (Ctrl-C signals that group too: as the server runs in a session of its own, the SIGINT
    reaches the command alone, the first case.)"""
    import signal

    for how in ("alone", "hangup"):
        port = free_port()
        env = {**os.environ, "FTLLM_ROOT": str(REPO), "FTLLM_FEEDBACK_DB": str(serving_dir / f"sigint-{how}.db")}
        with open(serving_dir / f"ftllm-serve-sigint-{how}.log", "w") as log:
            cli = subprocess.Popen([sys.executable, "-m", "ftllm.cli", "serve", "--port", str(port)], cwd=REPO,
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=as_a_terminal_job)
            url, started = f"http://127.0.0.1:{port}", []
            try:
                wait_until_up(f"{url}/readyz", cli, 180, serving_dir / f"ftllm-serve-sigint-{how}.log")
                started = psutil.Process(cli.pid).children(recursive=True)
                if how == "alone":
                    os.kill(cli.pid, signal.SIGINT)
                else:  # a closed terminal: BentoML would reload its workers on a SIGHUP passed on as it is
                    os.killpg(cli.pid, signal.SIGHUP)
                assert cli.wait(90) == 0, how
                gone, alive = psutil.wait_procs(started, timeout=60)
                assert not alive, (how, [p.cmdline() for p in alive])
                assert not answers(url), f"{how}: something still answers on the port"
            finally:
                cli.kill()
                for proc in started:
                    if proc.is_running():
                        proc.kill()
