"""Whole-flow tests: a copy of the project in a temporary git repo, one Prefect test harness."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

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


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's files plus its data, as a fresh git repo (DVC needs one), one per test module."""
    root = tmp_path_factory.mktemp("project")
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    shutil.copytree(REPO / "data", root / "data")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root
