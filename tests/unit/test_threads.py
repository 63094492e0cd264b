"""The thread policy of the compute processes: `tasks.environment.thread_defaults` (part of
the embedded defaults, so `ftllm`, the flows and the stage processes they start set it
before torch loads OpenMP) and `ThreadShare` (the compute threads other processes leave free)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks import environment
from tasks.environment import ThreadShare, defaults_for, thread_defaults, usable_cpus

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


def test_compute_processes_keep_openmps_wait_and_torchs_own_thread_count(monkeypatch):
    monkeypatch.delenv("FTLLM_TORCH_THREADS", raising=False)
    assert thread_defaults() == {}
    assert "OMP_NUM_THREADS" not in defaults_for(ROOT) and "OMP_WAIT_POLICY" not in defaults_for(ROOT)


def test_ftllm_torch_threads_names_the_thread_count(monkeypatch):
    monkeypatch.setenv("FTLLM_TORCH_THREADS", "3")
    assert thread_defaults() == {"OMP_NUM_THREADS": "3"}


def test_torch_in_a_process_with_the_defaults_runs_on_the_usable_cpus():
    assert probe() == {"threads": usable_cpus(), "policy": None}
    assert probe(FTLLM_TORCH_THREADS="1") == {"threads": 1, "policy": None}


def test_variables_the_user_set_win():
    assert probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1", FTLLM_TORCH_THREADS="2") == {
        "threads": 1, "policy": "ACTIVE"}


def _share(monkeypatch, machine: int, own: int) -> ThreadShare:
    for name in ("FTLLM_TORCH_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(environment, "_runnable_threads", lambda: (machine, own))
    share = ThreadShare(every=0.0, samples=1)
    share.cpus = 4
    return share


def test_the_share_is_the_cpus_other_processes_leave_free_and_at_least_one(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        assert _share(monkeypatch, machine=2, own=2).adjust() == 4  # alone: every CPU
        assert torch.get_num_threads() == 4
        assert _share(monkeypatch, machine=3, own=2).adjust() == 3  # one other runnable thread
        assert _share(monkeypatch, machine=9, own=1).adjust() == 1  # a crowded machine: one thread, never 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_count_the_user_fixed_is_left_alone(monkeypatch):
    share = _share(monkeypatch, machine=9, own=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert ThreadShare().adjust() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("FTLLM_TORCH_THREADS", "2")
    assert ThreadShare().adjust() is None
    assert share.enabled


def test_other_processes_busy_threads_are_seen_in_proc():
    burn = [sys.executable, "-c", "while True: pass"]
    procs = [subprocess.Popen(burn) for _ in range(2)]
    try:
        import time

        time.sleep(0.5)
        assert ThreadShare(samples=7).others() >= 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
