"""A `bentoml serve` killed with SIGKILL leaves no worker answering on its port (serving/lifetime.py)."""

from __future__ import annotations

import urllib.error
import urllib.request

import psutil


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
        try:
            urllib.request.urlopen(f"{url}/livez", timeout=5)
            answered = True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            answered = False
        assert not answered, "something still answers on the port"
