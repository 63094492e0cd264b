"""The workspace lock (a second retraining run waits, then gives up with a clear message) and
the push of a run's outputs to a DVC remote outside the workspace."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tasks.stages import StageError, push_outputs, push_remote, run_stages, workspace_lock
from tests.conftest import REPO

HOLD = """
import sys, time
from pathlib import Path
from tasks.stages import workspace_lock
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
    noisy = "import sys; [print('step', i) for i in range(40)]; sys.exit(3)"
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        f"  first:\n    cmd: {sys.executable} -c 'open(\"a.txt\", \"w\").write(\"a\")'\n    outs: [a.txt]\n"
        f"  second:\n    cmd: {sys.executable} -c \"{noisy}\"\n    deps: [a.txt]\n"
    )
    with pytest.raises(StageError) as failed:
        run_stages(tmp_path, {}, None, log=lambda line: None)
    assert str(failed.value).startswith("dvc repro failed in stage 'second' (exit ")


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
