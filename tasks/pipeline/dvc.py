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

The finetune stage can run in another checkout, on a training worker's machine:
`run_stages(..., train_elsewhere=...)` on the run's side, `train_stage` on the worker's;
the prepared data and the model travel through that same remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from tasks.errors import StageError

STAGES = ("resolve", "prepare", "finetune", "preference", "evaluate")
WORKSPACE_WAIT_SECONDS = 3600  # how long a second run on the same workspace waits for the first



@dataclass(frozen=True)
class ReproResult:
    ran: list[str]

    @property
    def skipped(self) -> list[str]:
        return [s for s in STAGES if s not in self.ran]


def _venv_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python`: make it this interpreter's, whatever PATH the caller had.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@contextmanager
def workspace_lock(root: Path, timeout: float = WORKSPACE_WAIT_SECONDS, log=None):
    """Hold the workspace's retraining lock (a file lock under `.dvc/tmp`), waiting up to `timeout` seconds.

    The lock dies with the process that holds it, so a killed run never leaves it behind.
    `log`, when given, hears that this run waits for another one.

    Raises:
        StageError: another run held the lock for longer than `timeout`.
    """
    path = root / ".dvc" / "tmp" / "ftllm-retrain.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if log is not None:
                log(f"another run holds the workspace lock of {root}: waiting up to {timeout:.0f}s")
            lock.acquire(timeout=timeout)
    except Timeout:
        raise StageError(
            f"another retraining run holds {lock.lock_file} for more than {timeout:.0f}s; try again later"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _stage_env(overrides: dict, mlflow_run_id: str | None) -> dict[str, str]:
    env = _venv_env({"FTLLM_OVERRIDES": json.dumps(overrides), "DVC_NO_ANALYTICS": "1"})
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    return env


def _repro(root: Path, args: list[str], env: dict[str, str], log) -> list[str]:
    """`dvc repro ARGS`; the stages that ran. Raises StageError naming the stage that failed."""
    code, lines = _dvc(root, ["repro", *args], env, log)
    output = "\n".join(lines)
    if code != 0:
        started = re.findall(r"Running stage '([^']+)'", output)
        where = f" in stage {started[-1]!r}" if started else ""
        tail = "\n".join(lines[-15:])
        # The stage's own `error: ...` line (every stage command writes its refusal so) goes in the
        # first line too: a flow run's state message, and a notification, show only that one.
        said = [line for line in lines if line.startswith("error: ")]
        cause = f" {said[-1]}" if said else ""
        raise StageError(f"dvc repro failed{where} (exit {code}):{cause}\n{tail}")
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def _dvc_ok(root: Path, args: list[str], env: dict[str, str], log) -> list[str]:
    """`dvc ARGS`, which must succeed; its output lines."""
    code, lines = _dvc(root, args, env, log)
    if code != 0:
        tail = "\n".join(lines[-15:])
        raise StageError(f"dvc {' '.join(args)} failed (exit {code}):\n{tail}")
    return lines


def _stage_changes(root: Path, stage: str, env: dict[str, str]) -> dict:
    """What `dvc status STAGE` reports as changed for that stage alone; {} when it is up to date."""
    lines = _dvc_ok(root, ["status", "--json", stage], env, log=lambda line: None)
    return json.loads("\n".join(lines) or "{}")


def run_stages(root: Path, overrides: dict, mlflow_run_id: str | None, log=print,
               train_elsewhere: Callable[[str], dict] | None = None) -> ReproResult:
    """`dvc repro` in `root` with the run's overrides; the caller holds `workspace_lock`.

    With `train_elsewhere`, the finetune stage runs on another machine (a training worker):
    this workspace reproduces `resolve` and `prepare`, pushes `prepare`'s output to the
    default remote, and calls `train_elsewhere(dvc.lock text)`, which must return the
    finetune stage's dvc.lock entry as the worker wrote it (see `train_stage`). That entry
    goes into this dvc.lock, the model is pulled from the remote, and `dvc repro` goes on
    with `evaluate`. Nothing is sent when finetune is already up to date here.

    Raises:
        StageError: a stage failed, or the worker's finetune stage does not match this
            workspace's (other code or settings in its checkout).
    """
    env = _stage_env(overrides, mlflow_run_id)
    if train_elsewhere is None:
        ran = _repro(root, [], env, log)
        return ReproResult(ran=ran)
    remote = push_remote(root)
    if remote is None:
        raise StageError(
            "training on another worker needs a default DVC remote outside the workspace that both machines "
            "reach (e.g. `dvc remote add --local -d s3 s3://BUCKET/dvc`); the data and model travel through it"
        )
    ran = _repro(root, ["prepare"], env, log)
    if _stage_changes(root, "finetune", env):
        _dvc_ok(root, ["push", "-r", remote, "prepare"], env, log)
        entry = train_elsewhere((root / "dvc.lock").read_text())
        _set_lock_entry(root, "finetune", entry)
        _dvc_ok(root, ["pull", "-r", remote, "finetune"], env, log)
        changes = _stage_changes(root, "finetune", env)
        if changes:
            raise StageError(
                "the training worker's finetune stage does not match this workspace (is its checkout at the "
                f"same commit, with the same params.yaml?): dvc status finetune: {json.dumps(changes)}"
            )
        ran.append("finetune")
    ran += [s for s in _repro(root, [], env, log) if s not in ran]
    return ReproResult(ran=[s for s in STAGES if s in ran])


def train_stage(root: Path, overrides: dict, dvc_lock: str, mlflow_run_id: str | None, log=print) -> dict:
    """On a training worker: the finetune stage of another workspace's run; its dvc.lock entry.

    `dvc_lock` is the orchestrating workspace's lock, whose `prepare` entry names the
    prepared data in the default remote. This checkout (same commit and params.yaml)
    resolves the run's settings, pulls that data, reproduces `finetune` alone and pushes
    the model. A previous run's checkpoints here let an interrupted training resume. The
    caller holds `workspace_lock`.

    Raises:
        StageError: no remote to exchange through, a failed pull or push, or a failed stage.
    """
    remote = push_remote(root)
    if remote is None:
        raise StageError(f"the training worker's checkout {root} has no default DVC remote outside it to pull the data from")
    env = _stage_env(overrides, mlflow_run_id)
    _write_atomically(root / "dvc.lock", dvc_lock)
    _repro(root, ["--single-item", "resolve"], env, log)
    _dvc_ok(root, ["pull", "-r", remote, "prepare"], env, log)
    _repro(root, ["--single-item", "finetune"], env, log)
    _dvc_ok(root, ["push", "-r", remote, "finetune"], env, log)
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["finetune"]


def _set_lock_entry(root: Path, stage: str, entry: dict) -> None:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock["stages"][stage] = entry
    _write_atomically(root / "dvc.lock", yaml.safe_dump(lock, sort_keys=False))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
    lines = _dvc_ok(root, ["push", "-r", remote], _venv_env({"DVC_NO_ANALYTICS": "1"}), log)
    # DVC's warnings (a file missing from the local cache) may come after its summary.
    return next((line for line in reversed(lines) if "pushed" in line or "up to date" in line), "")


def track_data(root: Path, path: Path, log=print) -> str | None:
    """`dvc add` the DVC-tracked folder that holds `path` (`data/` of `data.dvc`); the .dvc file, or None.

    A run writes its feedback export under `data/`: re-adding the folder puts that version
    in the DVC cache (and the next `dvc push`), so that the data a version was trained on
    can be checked out and `dvc repro` of it rebuilds the same splits. None when no .dvc
    file tracks a folder above `path`.
    """
    root, path = root.resolve(), Path(path).resolve()
    for folder in (path, *path.parents):
        if folder == root or not folder.is_relative_to(root):
            return None
        dvc_file = folder.with_name(folder.name + ".dvc")
        if dvc_file.is_file():
            _dvc_ok(root, ["add", "-q", str(folder.relative_to(root))], _venv_env({"DVC_NO_ANALYTICS": "1"}), log)
            return str(dvc_file.relative_to(root))
    return None


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
        # dvc.lock is rewritten by every run, and a .dvc file by a run that exports feedback:
        # they are lineage (recorded as md5s), not a change to the code.
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock",
                  ":(exclude)*.dvc"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
