"""Test-session settings: every service state goes to a temporary folder, never the project's.

Set at import, before any test module imports prefect, mlflow or bentoml (BentoML reads
BENTOML_HOME when first imported).
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

# pytest loads this file as `conftest`, and test modules import it again as `tests.conftest`
# (for free_port): the second load must reuse the first one's folder, not make another.
_STATE = Path(os.environ.get("FTLLM_TEST_STATE") or tempfile.mkdtemp(prefix="ftllm-tests-"))
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

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def state_dir() -> Path:
    """The session's folder for service state (MLflow, BentoML, Prefect)."""
    return _STATE


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
