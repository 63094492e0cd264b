"""The thread policy of the compute processes (`tasks.environment.thread_defaults`): part of
the embedded defaults, so `ftllm`, the flows and the stage processes they start set it
before torch loads OpenMP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.environment import defaults_for, thread_defaults, usable_cpus

ROOT = Path(__file__).resolve().parents[2]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FTLLM_TORCH_THREADS")
# A process that applies the defaults as `ftllm` does, then loads torch.
PROBE = ("import json, os; from tasks.environment import apply_defaults; apply_defaults(); import torch; "
         "print(json.dumps({'threads': torch.get_num_threads(), 'policy': os.environ.get('OMP_WAIT_POLICY')}))")


def probe(**variables: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(variables, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compute_processes_wait_passively_with_torchs_own_thread_count(monkeypatch):
    monkeypatch.delenv("FTLLM_TORCH_THREADS", raising=False)
    assert thread_defaults() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert defaults_for(ROOT)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_NUM_THREADS" not in defaults_for(ROOT)


def test_ftllm_torch_threads_names_the_thread_count(monkeypatch):
    monkeypatch.setenv("FTLLM_TORCH_THREADS", "3")
    assert thread_defaults() == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}


def test_torch_in_a_process_with_the_defaults_runs_on_the_usable_cpus_and_waits_passively():
    assert probe() == {"threads": usable_cpus(), "policy": "PASSIVE"}
    assert probe(FTLLM_TORCH_THREADS="1") == {"threads": 1, "policy": "PASSIVE"}


def test_variables_the_user_set_win():
    assert probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1", FTLLM_TORCH_THREADS="2") == {
        "threads": 1, "policy": "ACTIVE"}
