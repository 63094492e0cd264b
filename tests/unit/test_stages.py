"""The workspace lock: a second retraining run waits, then gives up with a clear message."""

from __future__ import annotations

import pytest
from filelock import FileLock

from tasks.stages import StageError, run_stages


def test_second_run_on_a_locked_workspace_is_refused(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    held = FileLock(tmp_path / ".dvc" / "tmp" / "ftllm-retrain.lock")
    with held:
        with pytest.raises(StageError, match="another retraining run holds"):
            run_stages(tmp_path, {}, None, lock_timeout=0.2, log=lambda line: None)


def test_failed_repro_reports_dvc_output(tmp_path):
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    with pytest.raises(StageError, match="dvc repro failed"):
        run_stages(tmp_path, {}, None, lock_timeout=1, log=lambda line: None)
