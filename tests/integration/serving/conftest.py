"""Fixtures of the serving tests: one tiny trained model, a registry and a service per session.

BentoML, MLflow and the feedback log all point into one temporary folder. Those variables
are set here, at import, because BentoML and MLflow read them when first imported. The
service's own (its settings file, its model) are set around each test of this folder
only (`pytest_runtest_setup`), so that tests elsewhere in the session do not serve or
read this folder's settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.project import REPO, free_port, wait_until_up

STATE = Path(tempfile.mkdtemp(prefix="ftllm-serving-tests-"))
MODEL_NAME = "ftllm-chat-test"

# tests/conftest.py points BentoML, MLflow and the feedback log at the session's temporary
# folder; these defaults only matter when this folder's tests run without it.
for key, value in {
    "BENTOML_HOME": str(STATE / "bentoml"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{STATE / 'mlflow.db'}",
    "MLFLOW_REGISTRY_URI": f"sqlite:///{STATE / 'mlflow.db'}",
    "FTLLM_FEEDBACK_DB": str(STATE / "feedback.db"),
    "HF_HUB_OFFLINE": "1",
    "BENTOML_DO_NOT_TRACK": "true",
}.items():
    os.environ.setdefault(key, value)
SERVICE_ENV = {
    "FTLLM_PARAMS": str(STATE / "params.yaml"),
    "FTLLM_BENTO_MODEL": f"{MODEL_NAME}:v1",
    "FTLLM_TORCH_THREADS": "1",
}
KEY_ENV = ("FTLLM_API_KEY", "FTLLM_API_KEYS", "FTLLM_API_KEYS_FILE")  # no test inherits another's keys
_outside: dict[str, str | None] = {}  # the values of SERVICE_ENV's keys outside this folder's tests
sys.path.insert(0, str(REPO / "scripts"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Before the test's fixtures (the session's service among them) are set up."""
    if not _outside:
        _outside.update({key: os.environ.get(key) for key in [*SERVICE_ENV, *KEY_ENV]})
    os.environ.update(SERVICE_ENV)
    for key in KEY_ENV:
        os.environ.pop(key, None)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """After the test's fixtures are torn down: the session's environment as it was."""
    for key, value in _outside.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _outside.clear()

# A small engine batch, so the tests see that the service passes serving.max_batch on.
SERVING_OVERRIDES = {"serving.reload_seconds": 1.0, "serving.max_batch": 4, "registry.model_name": MODEL_NAME}


def _write_params() -> None:
    import yaml

    from tasks.config import load_params

    params = load_params(None, SERVING_OVERRIDES)  # the defaults, whatever the user's params.yaml holds
    (STATE / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))


_write_params()


@contextmanager
def _serve_over_http(log_path: Path, env: dict[str, str]) -> Iterator[str]:
    """`bentoml serve` of the service on a free loopback port, with `env` added; yields its URL.

    Waits for `/readyz` (the model is loaded by then) and stops the server on exit; its
    output goes to `log_path`, whose tail is the error when it dies before being ready.
    """
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:ChatService",
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                                env={**os.environ, "FTLLM_ROOT": str(REPO), **env}, stdout=log,
                                stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{url}/readyz", proc, 120, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def serving_dir() -> Path:
    """This folder's scratch space (the model, the test settings, exports)."""
    return STATE


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """A tiny model trained for 15 steps (about 15 s on two cores): long enough to answer with text."""
    from make_data import make_examples

    from tasks.config import load_params
    from tasks.train.finetune import finetune

    data = STATE / "prepared"
    data.mkdir(exist_ok=True)
    examples = make_examples(48, 0)
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:40]))
    (data / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[40:]))
    out = STATE / "model"
    finetune(load_params(None, {"train.max_steps": 15}), data, out, log=lambda *a, **k: None)
    return out


def serving_experiment() -> str:
    """The id of this folder's MLflow experiment, its artifacts in the scratch folder (by
    default MLflow would put them under `./mlruns`, in the project). An explicit experiment,
    not set_experiment(): that would pin the whole test session's fluent runs to it."""
    from tasks.registry.versions import ensure_experiment

    return ensure_experiment("serving-tests", STATE / "mlartifacts")


@dataclass
class Registered:
    """The registry of the serving tests, and what MLflow warned while registering its versions."""

    client: object
    warnings: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def registered(model_dir: Path) -> Registered:
    """Two MLflow versions of the model, `champion` on 1; version 1 is also in the BentoML store.

    Both are registered as the pipeline registers a candidate (`register_candidate`: a pyfunc
    model logged from code, the model folder as its artifact). So the service loads version 1
    from the BentoML store and version 2 from MLflow's artifacts (`artifacts/model_dir`),
    both real loads. Warnings raised from MLflow's code, and warnings its loggers log, are
    kept: registering must raise none.
    """
    import logging
    import warnings

    import mlflow

    from tasks.registry.bento import import_model
    from tasks.registry.versions import register_candidate

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(f"{record.name}: {record.getMessage()}")

    heard: list[str] = []
    client = mlflow.MlflowClient()
    experiment_id = serving_experiment()
    handler = Keep(logging.WARNING)
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                run_id = client.create_run(experiment_id).info.run_id
                register_candidate(run_id, model_dir, MODEL_NAME, {"source": "tests"})
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    heard += [f"{w.filename}: {w.message}" for w in caught if f"{os.sep}mlflow{os.sep}" in w.filename]
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    import_model(model_dir, MODEL_NAME, "1", {"source": "tests"})
    return Registered(client, heard)


@pytest.fixture(scope="session")
def registry(registered: Registered):
    """The MLflow client of the registry above."""
    return registered.client


@pytest.fixture(scope="session")
def client(registry):
    """The service in-process (its lifespan loads the champion)."""
    from starlette.testclient import TestClient

    import serving.service
    from serving.service import ChatService

    # The module binds its model when first imported: by a test of this folder, or not at all.
    assert serving.service.BENTO_MODEL_TAG == SERVICE_ENV["FTLLM_BENTO_MODEL"], (
        "serving.service was imported before the serving tests, without their settings; import it in a "
        "process of its own there")
    with TestClient(ChatService.to_asgi()) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def http_server(registry):
    """Starts the service over real HTTP: `with http_server(log_path, env) as url:`.

    A factory rather than a server, so that each test module picks its own key and
    settings (`env`) and starts it at module scope.
    """
    return _serve_over_http


# ------------------------------------------------------------------------------ tool calling

@pytest.fixture(scope="session")
def tools_server(registry):
    """The service over HTTP, serving the tool-calling model (`train_tool_caller`) from the BentoML store."""
    import yaml

    from tasks.config import load_params
    from tasks.registry.bento import import_model
    from tests.support.training import TOOLS_MODEL_NAME, train_tool_caller

    model = train_tool_caller(STATE / "tool-model")
    import_model(model, TOOLS_MODEL_NAME, "1", {"source": "tests"})
    params = load_params(REPO / "params.yaml", {**SERVING_OVERRIDES, "registry.model_name": TOOLS_MODEL_NAME})
    (STATE / "tools-params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    env = {"FTLLM_PARAMS": str(STATE / "tools-params.yaml"), "FTLLM_BENTO_MODEL": f"{TOOLS_MODEL_NAME}:v1",
           "FTLLM_FEEDBACK_DB": str(STATE / "tools-feedback.db")}
    with _serve_over_http(STATE / "tools-serve.log", env) as url:
        yield url
