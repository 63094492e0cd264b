"""The workspace lock (a second retraining run waits, then gives up with a clear message),
the push of a run's outputs to a DVC remote outside the workspace, and the finetune stage run
in a training worker's checkout."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.errors import StageError
from tasks.pipeline.dvc import (
    push_outputs,
    push_remote,
    run_stages,
    train_stage,
    workspace_lock,
)
from tests.support.project import REPO

HOLD = """
import sys, time
from pathlib import Path
from tasks.pipeline.dvc import workspace_lock
with workspace_lock(Path(sys.argv[1]), timeout=5):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(root, seconds: float) -> subprocess.Popen:
    """Another process (another run) that takes the workspace lock and keeps it `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_locked_workspace_is_refused_after_its_timeout(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    holder = _holder(tmp_path, 30)
    try:
        with pytest.raises(StageError, match="another retraining run holds"):
            with workspace_lock(tmp_path, timeout=0.3):
                pass
    finally:
        holder.kill()


def test_second_run_waits_for_the_first_then_goes_on(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    holder = _holder(tmp_path, 1.5)
    started = time.monotonic()
    with workspace_lock(tmp_path, timeout=60):
        waited = time.monotonic() - started
    assert waited > 1.0  # it got the lock only once the first run let go of it
    assert holder.wait(timeout=30) == 0


def test_lock_of_a_killed_run_is_free(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    holder = _holder(tmp_path, 60)
    holder.kill()
    holder.wait()
    with workspace_lock(tmp_path, timeout=2):
        pass


def test_failed_repro_reports_dvc_output(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    with pytest.raises(StageError, match="dvc repro failed"):
        run_stages(tmp_path, {}, None, log=lambda line: None)


def test_failed_repro_names_the_stage_that_failed(tmp_path):
    """Named in the first line, not only in the output tail, which may hold other lines."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    noisy = "import sys; [print('step', i) for i in range(40)]; print('error' + chr(58), 'the cause', file=sys.stderr); sys.exit(3)"  # no ': ' in YAML
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        f"  first:\n    cmd: {sys.executable} -c 'open(\"a.txt\", \"w\").write(\"a\")'\n    outs: [a.txt]\n"
        f"  second:\n    cmd: {sys.executable} -c \"{noisy}\"\n    deps: [a.txt]\n"
    )
    with pytest.raises(StageError) as failed:
        run_stages(tmp_path, {}, None, log=lambda line: None)
    first_line = str(failed.value).splitlines()[0]
    assert first_line.startswith("dvc repro failed in stage 'second' (exit ") and first_line.endswith(": error: the cause")


def _dvc_project(root, config: str, local: str = "") -> None:
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(config)
    if local:
        (root / ".dvc" / "config.local").write_text(local)


def test_push_remote_skips_the_in_repo_store_and_takes_one_elsewhere(tmp_path):
    shipped = "[core]\n    remote = local\n['remote \"local\"']\n    url = ../dvcstore\n"
    _dvc_project(tmp_path / "default", shipped)
    assert push_remote(tmp_path / "default") is None  # dvcstore/ is inside the workspace

    s3 = "[core]\n    remote = s3\n['remote \"s3\"']\n    url = s3://bucket/dvc\n    endpointurl = http://127.0.0.1:9\n"
    _dvc_project(tmp_path / "s3", shipped, local=s3)
    assert push_remote(tmp_path / "s3") == "s3"  # config.local wins over the committed default

    _dvc_project(tmp_path / "none", "[core]\n    autostage = false\n")
    assert push_remote(tmp_path / "none") is None

    _dvc_project(tmp_path / "missing", "[core]\n    remote = gone\n")
    with pytest.raises(StageError, match="'gone' is not defined"):
        push_remote(tmp_path / "missing")


def test_push_outputs_sends_the_cache_to_a_remote_outside_the_workspace(tmp_path):
    root, store = tmp_path / "ws", tmp_path / "shared-store"
    root.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([*dvc, "remote", "add", "-d", "--local", "shared", str(store)], cwd=root, check=True)
    (root / "data.txt").write_text("a tracked file\n")
    subprocess.run([*dvc, "add", "-q", "data.txt"], cwd=root, check=True)

    assert push_remote(root) == "shared"
    assert "1 file pushed" in push_outputs(root, "shared", log=lambda line: None)
    assert len([p for p in store.rglob("*") if p.is_file()]) == 1


MINI_PIPELINE = """\
stages:
  resolve:
    cmd: python -c "import os; open('params.out', 'w').write(os.environ.get('FTLLM_OVERRIDES', '{}'))"
    outs:
      - params.out:
          cache: false
    always_changed: true
  prepare:
    cmd: python -c "import os; os.makedirs('prepared', exist_ok=True); open('prepared/p.txt', 'w').write(open('data.txt').read() + open('params.out').read())"
    deps: [data.txt, params.out]
    outs: [prepared]
  finetune:
    cmd: python -c "import os; os.makedirs('model', exist_ok=True); open('model/m.txt', 'w').write(open('prepared/p.txt').read() + ' trained in ' + os.getcwd())"
    deps: [prepared, train.py]
    outs: [model]
  evaluate:
    cmd: python -c "import json; json.dump(dict(chars=len(open('model/m.txt').read())), open('metrics.json', 'w'))"
    deps: [model]
    metrics:
      - metrics.json:
          cache: false
"""


def _mini_workspace(root: Path, store: Path, train_code: str = "v1") -> Path:
    """A stand-in for the project's four stages, with a default remote outside the workspace."""
    root.mkdir()
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([*dvc, "remote", "add", "-q", "-d", "--local", "shared", str(store)], cwd=root, check=True)
    (root / "dvc.yaml").write_text(MINI_PIPELINE)
    (root / "data.txt").write_text("the data ")
    (root / "train.py").write_text(train_code)
    return root


def test_finetune_runs_on_the_training_worker_and_the_rest_here(tmp_path):
    store = tmp_path / "store"
    here, worker = _mini_workspace(tmp_path / "here", store), _mini_workspace(tmp_path / "worker", store)
    calls = []

    def train_elsewhere(lock: str) -> dict:
        calls.append(lock)
        return train_stage(worker, {"train.lr": 1}, lock, None, log=lambda line: None)

    result = run_stages(here, {"train.lr": 1}, None, log=lambda line: None, train_elsewhere=train_elsewhere)
    assert result.ran == ["resolve", "prepare", "finetune", "evaluate"] and len(calls) == 1
    # The model was trained in the worker's checkout, on this run's prepared data and settings,
    # and reached this workspace through the remote.
    assert (here / "model" / "m.txt").read_text() == f'the data {{"train.lr": 1}} trained in {worker}'
    assert json.loads((here / "metrics.json").read_text())["chars"] == len((here / "model" / "m.txt").read_text())

    again = run_stages(here, {"train.lr": 1}, None, log=lambda line: None, train_elsewhere=train_elsewhere)
    assert "finetune" not in again.ran and len(calls) == 1  # up to date here: nothing sent


def test_a_worker_checkout_with_other_code_is_refused(tmp_path):
    store = tmp_path / "store"
    here = _mini_workspace(tmp_path / "here", store)
    worker = _mini_workspace(tmp_path / "worker", store, train_code="v2, not committed here")
    with pytest.raises(StageError, match="does not match this workspace") as refused:
        run_stages(here, {}, None, log=lambda line: None,
                   train_elsewhere=lambda lock: train_stage(worker, {}, lock, None, log=lambda line: None))
    assert "train.py" in str(refused.value)
    assert not (here / "metrics.json").exists()  # evaluate never ran on the foreign model


def test_training_elsewhere_needs_a_remote_outside_the_workspace(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    with pytest.raises(StageError, match="needs a default DVC remote outside the workspace"):
        run_stages(root, {}, None, log=lambda line: None, train_elsewhere=lambda lock: {})
