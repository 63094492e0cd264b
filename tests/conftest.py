"""Test-session settings and shared fixtures: every service state goes to a temporary folder,
never the project's; whole-flow tests get a copy of the project and one Prefect test harness.

Set at import, before any test module imports prefect, mlflow or bentoml (BentoML reads
BENTOML_HOME when first imported).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.environment import thread_defaults

# A pytest started by a test (or this file loaded twice) reuses the session's folder. Under
# pytest-xdist each worker is a session of its own: its own MLflow database, Prefect home and
# BentoML store, in a folder of the one the controller made, which the workers inherit.
_STATE = Path(os.environ.get("FTLLM_TEST_STATE") or tempfile.mkdtemp(prefix="ftllm-tests-"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and _STATE.name != _WORKER:
    _STATE = _STATE / _WORKER
    _STATE.mkdir(exist_ok=True)
os.environ.update(
    {
        "FTLLM_TEST_STATE": str(_STATE),
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_STATE / 'mlflow.db'}",
        "MLFLOW_REGISTRY_URI": f"sqlite:///{_STATE / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "BENTOML_HOME": str(_STATE / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "FTLLM_FEEDBACK_DB": str(_STATE / "feedback.db"),
    }
)
# The compute processes' thread variables (a count FTLLM_TORCH_THREADS names), here as in
# `ftllm`: set before any test module loads torch.
for _name, _value in thread_defaults().items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

from tests.support.project import REPO  # noqa: E402

# Fixtures shared by the whole suite, defined beside their helpers in tests/support/.
pytest_plugins = ("tests.support.families", "tests.support.pages", "tests.support.servers")


# The modules that take minutes, longest first (wall time of each under two workers, from
# a profile of the whole suite; docs/guides/tests.md). pytest-xdist hands whole files to the
# workers in collection order (`make test` passes --no-loadscope-reorder: xdist would
# otherwise start with the files that hold the most tests, the quick unit ones, and leave a
# long file to run alone at the end); the other files follow in their usual order and fill
# the gaps. A file missing here only runs later; the order changes no result.
LONGEST_FIRST = (
    "tests/e2e/test_retrain.py",
    "tests/e2e/test_deployments.py",
    "tests/e2e/test_tools_run.py",
    "tests/e2e/test_family_runs.py",
    "tests/e2e/test_scaleout.py",
    "tests/integration/serving/test_tools_http.py",
    "tests/e2e/test_interrupt.py",
    "tests/e2e/test_operator_ui.py",
    "tests/integration/test_training_processes.py",
    "tests/integration/serving/test_library_engine.py",
    "tests/unit/train/test_finetune.py",
    "tests/integration/serving/test_fuzz.py",
    "tests/integration/test_dvc_stages.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """The session's folder for service state (MLflow, BentoML, Prefect)."""
    return _STATE


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
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
    # The models' defaults, not the user's params.yaml: the tests set what they need on top of them.
    from tasks.config import render_params

    (root / "params.yaml").write_text(render_params())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=root, check=True)
    # The copy's own feedback log, feedback.db beside its params.yaml as for a user: with
    # data.feedback on, feedback that another module of the same worker posted to the
    # session's log would otherwise become a data source of this module's runs.
    with pytest.MonkeyPatch.context() as env:
        env.delenv("FTLLM_FEEDBACK_DB", raising=False)
        yield root
