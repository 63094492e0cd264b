"""A real Prefect server for the tests that need one: `prefect server start` on a free loopback port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.project import free_port, wait_until_up

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory, project):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'server.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_until_up(f"{url}/health", proc, 120)
    except BaseException:
        proc.kill()
        raise
    client_env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home), "FTLLM_ROOT": str(project)}
    yield client_env
    proc.terminate()
    proc.wait(timeout=30)



def read_events(name: str, resource_id: str, expected: int) -> list:
    """The events `name` about `resource_id` on the current Prefect API, once `expected` of them are stored."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.worker import EventsWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    EventsWorker.drain_all()

    async def read() -> list:
        async with get_client() as client:
            page = await client.read_events(EventFilter(
                event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])), limit=50)
            return page.events

    deadline = time.monotonic() + 30
    while len(events := run_coro_as_sync(read())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)  # the server stores events asynchronously
    return events
