"""The service's worker stops when the process that started it is gone.

`bentoml serve` starts the service in a worker process of its own (another process group),
and stops it on SIGTERM or Ctrl-C. Killed with SIGKILL (`kill -9`, an OOM kill), it cannot:
the worker would go on answering on the port, logging to the feedback log with a model that
no longer follows the registry's champion, until someone finds and kills it. A thread of
the worker watches its parent and, once it is gone, stops the worker the orderly way (its
own SIGTERM: the shutdown hooks write what the log has queued and stop the engine).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("ftllm.serving")


def exit_with_parent(interval: float = 1.0) -> threading.Thread | None:
    """In a worker of `bentoml serve`, start the daemon thread that sends this process SIGTERM once
    its parent process is gone; elsewhere (the service built in-process, as tests do) nothing."""
    from bentoml import server_context

    if server_context.worker_index is None:
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.warning("the process that started this worker (%d) is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="ftllm-parent-watch", daemon=True)
    thread.start()
    return thread
