"""Run the DVC stages of a retraining run, one run per workspace at a time.

`dvc repro` decides what to recompute: an unchanged stage is skipped. The run's `--set`
overrides reach the stages through FTLLM_OVERRIDES (read by the `resolve` stage), and the
MLflow run id through MLFLOW_RUN_ID. A file lock around the whole repro makes a second run
on the same workspace wait for the first (DVC itself would fail on its own lock instead).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

STAGES = ("resolve", "prepare", "finetune", "evaluate")


class StageError(RuntimeError):
    """A DVC stage failed; the message holds the tail of its output."""


@dataclass(frozen=True)
class ReproResult:
    ran: list[str]
    skipped: list[str]
    output: str


def _venv_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python`: make it this interpreter's, whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_stages(root: Path, overrides: dict, mlflow_run_id: str | None, lock_timeout: float, log=print) -> ReproResult:
    """`dvc repro` in `root` with the run's overrides, under the workspace lock.

    Raises:
        StageError: a stage failed, or another run held the lock longer than `lock_timeout`.
    """
    env = _venv_env({"FTLLM_OVERRIDES": json.dumps(overrides), "DVC_NO_ANALYTICS": "1"})
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    lock = FileLock(root / ".dvc" / "tmp" / "ftllm-retrain.lock")
    try:
        with lock.acquire(timeout=lock_timeout):
            proc = subprocess.Popen(
                [sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            lines = []
            for line in proc.stdout:
                lines.append(line.rstrip())
                log(line.rstrip())
            code = proc.wait()
    except Timeout:
        raise StageError(
            f"another retraining run holds {lock.lock_file} for more than {lock_timeout:.0f}s; try again later"
        ) from None
    output = "\n".join(lines)
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise StageError(f"dvc repro failed (exit {code}):\n{tail}")
    ran = [s for s in STAGES if f"Running stage '{s}'" in output]
    return ReproResult(ran=ran, skipped=[s for s in STAGES if s not in ran], output=output)


def lock_digest(root: Path) -> str:
    """md5 of dvc.lock: which data, code, settings and outputs the run used."""
    path = root / "dvc.lock"
    return hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else ""


def stage_out_md5(root: Path, stage: str, out: str) -> str:
    """The md5 DVC recorded for output `out` of `stage` (a content fingerprint of the model)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    for entry in lock["stages"][stage]["outs"]:
        if entry["path"] == out:
            return entry["md5"]
    raise KeyError(f"dvc.lock has no output {out!r} for stage {stage!r}")


def git_commit(root: Path) -> str:
    """The commit of the project's code, with `-dirty` when the work tree has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        # dvc.lock is rewritten by every run: it is lineage, not a change to the code.
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
