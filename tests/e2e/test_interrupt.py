"""A retraining run whose training step is killed: a clear failure, nothing registered, and a resume.

`ftllm run` runs in its own process; once the finetune stage has written a checkpoint, the
stage's process gets SIGKILL (as from the out-of-memory killer or a lost machine). The run
must end with exit status 1 and a message naming the failed stage, leave the registry
without a new version, and the next run must resume training from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.project import FAST, as_a_terminal_job

pytestmark = pytest.mark.slow
MODEL = "ftllm-interrupt"
# A short training and a gate any candidate passes: this test is about the kill and the resume.
OVERRIDES = {**FAST, "train.max_steps": 60, "train.save_steps": 20, "eval.max_examples": 20, "registry.model_name": MODEL,
             "gate.min_exact_match": 0.0, "gate.max_perplexity": 1e9, "gate.min_gain_over_prompting": -1.0}
BIN = Path(sys.executable).parent


def ftllm_run(project: Path) -> subprocess.Popen:
    """`ftllm run` in its own process, reporting to the session's Prefect server (the harness's) rather
    than starting a temporary one of its own: what is under test is the training process's death."""
    from prefect.settings import PREFECT_API_URL

    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, "FTLLM_ROOT": str(project), "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.Popen(
        [str(BIN / "ftllm"), "run", "--json", *sets], cwd=project, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finetune_process(parent: subprocess.Popen) -> psutil.Process | None:
    """The Python process that trains, not the shell DVC may start it through (`sh -c ...`).

    Killing only that shell leaves the trainer running on to the end, which is not the
    failure this test is about.
    """
    for child in psutil.Process(parent.pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if command[1:3] == ["-m", "tasks.stages.finetune"] and "python" in Path(command[0]).name:
            return child
    return None


def versions(name: str) -> list[str]:
    from mlflow import MlflowClient

    return [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")]


def test_killed_training_fails_the_run_and_the_next_run_resumes(project, prefect_harness):
    checkpoints = project / "artifacts" / "model.checkpoints"
    run = ftllm_run(project)
    victim, deadline = None, time.monotonic() + 600
    while time.monotonic() < deadline and run.poll() is None:
        victim = victim or finetune_process(run)
        if victim is not None and any(checkpoints.glob("step-*/meta.json")):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    else:
        run.kill()
        pytest.fail(f"no checkpoint of the finetune stage to interrupt: {run.communicate()[1][-3000:]}")
    out, err = run.communicate(timeout=300)
    assert run.returncode == 1, (out[-2000:], err[-3000:])
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "failed"
    assert "dvc repro failed" in summary["error"] and "finetune" in summary["error"]
    assert "Traceback" not in err
    assert versions(MODEL) == []  # nothing registered, no champion to move

    rerun = ftllm_run(project)
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, (out[-2000:], err[-3000:])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "promoted" and versions(MODEL) == [str(result["version"])]
    trained = json.loads((project / "artifacts" / "model" / "train_summary.json").read_text())
    # At most save_steps steps were repeated: training went on from the checkpoint.
    assert trained["resumed_from_step"] >= 20 and trained["steps"] == OVERRIDES["train.max_steps"]


def test_sigterm_stops_the_run_and_the_temporary_prefect_server_it_started(project):
    """A supervisor's stop (SIGTERM, as systemd, Kubernetes or a CI timeout send it) ends `ftllm
    run` as Ctrl-C does: the temporary Prefect server it started goes with it, instead of living
    on, orphaned, holding its port. (A closed terminal's SIGHUP takes the same handler:
    tests/unit/ftllm/test_cli.py.)"""
    stop = signal.SIGTERM
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.Popen([str(BIN / "ftllm"), "run", "--set", f"registry.model_name={MODEL}-term"], cwd=project,
                           env={**env, "FTLLM_ROOT": str(project)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline, server = time.monotonic() + 300, None
        while server is None and time.monotonic() < deadline and run.poll() is None:
            servers = [p for p in psutil.Process(run.pid).children(recursive=True)
                       if "prefect.server.api.server" in " ".join(p.cmdline())]
            server = servers[0] if servers else None
            time.sleep(0.5)
        assert server is not None, "the run started no temporary Prefect server"
        time.sleep(3)  # the flow is under way
        run.send_signal(stop)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE


def test_ctrl_c_in_a_terminal_stops_the_run_at_once(project):
    """Ctrl-C signals the terminal's whole foreground process group: the temporary Prefect server
    stopped with the run, and the flow, reporting its stop to a server that was gone, retried for
    minutes and exited 1 with tracebacks."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    run = subprocess.Popen([str(BIN / "ftllm"), "run", "--json", "--set", f"registry.model_name={MODEL}-int"],
                           cwd=project, env={**env, "FTLLM_ROOT": str(project)}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True,  # its own group, as a shell's job
                           preexec_fn=as_a_terminal_job)
    try:
        deadline = time.monotonic() + 300
        while finetune_process(run) is None and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before its training started"
        servers = [p for p in psutil.Process(run.pid).children(recursive=True)
                   if "prefect.server.api.server" in " ".join(p.cmdline())]
        os.killpg(run.pid, signal.SIGINT)
        stopped = time.monotonic()
        out, err = run.communicate(timeout=180)
    finally:
        run.kill()
    assert run.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"error": "interrupted", "exit_code": 130}
    assert time.monotonic() - stopped < 60  # it took 3.5 minutes of retries
    assert len(servers) == 1 and (not psutil.pid_exists(servers[0].pid) or servers[0].status() == psutil.STATUS_ZOMBIE)
