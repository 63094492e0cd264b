"""Run the DVC stages of a retraining run, one run per workspace at a time.

`dvc repro` decides what to recompute: an unchanged stage is skipped. The run's `--set`
overrides reach the stages through FTLLM_OVERRIDES (read by the `resolve` stage), and the
MLflow run id through MLFLOW_RUN_ID.

`workspace_lock` makes a second run on the same workspace wait for the first (DVC itself
would fail on its own lock instead). The retrain flow holds it from validation to
promotion, not only around `dvc repro`: the outputs it registers and packages
(`artifacts/model`, `metrics.json`, `dvc.lock`) must be the ones its own stages wrote, not
those of a run that started repro in between.

After the stages, `push_outputs` sends what they produced to the default DVC remote, when
that remote lies outside the workspace (see `push_remote`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
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


@contextmanager
def workspace_lock(root: Path, timeout: float):
    """Hold the workspace's retraining lock (a file lock under `.dvc/tmp`), waiting up to `timeout` seconds.

    The lock dies with the process that holds it, so a killed run never leaves it behind.

    Raises:
        StageError: another run held the lock for longer than `timeout`.
    """
    path = root / ".dvc" / "tmp" / "ftllm-retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StageError(
            f"another retraining run holds {lock.lock_file} for more than {timeout:.0f}s; try again later"
        ) from None
    try:
        yield
    finally:
        lock.release()


def workspace_locked(root: Path) -> bool:
    """Whether another run holds the workspace lock right now (for a log line; it may change at once)."""
    try:
        with workspace_lock(root, timeout=0):
            return False
    except StageError:
        return True


def run_stages(root: Path, overrides: dict, mlflow_run_id: str | None, log=print) -> ReproResult:
    """`dvc repro` in `root` with the run's overrides; the caller holds `workspace_lock`.

    Raises:
        StageError: a stage failed.
    """
    env = _venv_env({"FTLLM_OVERRIDES": json.dumps(overrides), "DVC_NO_ANALYTICS": "1"})
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    code, lines = _dvc(root, ["repro"], env, log)
    output = "\n".join(lines)
    if code != 0:
        started = re.findall(r"Running stage '([^']+)'", output)
        where = f" in stage {started[-1]!r}" if started else ""
        tail = "\n".join(lines[-15:])
        raise StageError(f"dvc repro failed{where} (exit {code}):\n{tail}")
    ran = [s for s in STAGES if f"Running stage '{s}'" in output]
    return ReproResult(ran=ran, skipped=[s for s in STAGES if s not in ran], output=output)


def _dvc(root: Path, args: list[str], env: dict[str, str], log) -> tuple[int, list[str]]:
    """`dvc ARGS` in `root`; its exit code and output lines (each also passed to `log`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        log(line.rstrip())
    return proc.wait(), lines


def push_remote(root: Path) -> str | None:
    """The default DVC remote to push a run's outputs to, or None to keep them in the local cache.

    None when no default remote is set, or when it lies inside the workspace: the project
    ships `dvcstore/` (tracked by git, so that a fresh clone can `dvc pull` offline), and
    pushing every run's model there would add no copy on another disk and grow the git
    repository. A remote elsewhere (S3, GCS, SSH, a shared mount), set with
    `dvc remote add -d` (in `.dvc/config.local` for a machine's own), is pushed to.
    """
    from dvc.config import Config

    config = Config(dvc_dir=root / ".dvc")  # merges config and config.local; relative paths made absolute
    name = config["core"].get("remote")
    if not name:
        return None
    if name not in config["remote"]:
        raise StageError(f"the default DVC remote {name!r} is not defined; see `dvc remote list` in {root}")
    url = config["remote"][name]["url"]
    if "://" not in url and Path(url).resolve().is_relative_to(root.resolve()):
        return None
    return name


def push_outputs(root: Path, remote: str, log=print) -> str:
    """`dvc push -r REMOTE` of the data and stage outputs that dvc.lock names; the caller holds `workspace_lock`.

    Returns:
        DVC's summary line (`3 files pushed`, `Everything is up to date.`).

    Raises:
        StageError: the push failed (unreachable remote, missing credentials); the message
            holds DVC's output.
    """
    env = _venv_env({"DVC_NO_ANALYTICS": "1"})
    code, lines = _dvc(root, ["push", "-r", remote], env, log)
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise StageError(f"dvc push to remote {remote!r} failed (exit {code}):\n{tail}")
    # DVC's warnings (a file missing from the local cache) may come after its summary.
    return next((line for line in reversed(lines) if "pushed" in line or "up to date" in line), "")


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
