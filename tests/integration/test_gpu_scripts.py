"""The GPU benchmark scripts still run, on this machine's CPU with their small models.

A GPU is at hand only now and then, and for minutes: these scripts must work when it is.
Each runs as a user runs it (`PYTHONPATH=. python benchmarks/...`), writes its JSON, and
its rows must hold figures, not errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.project import REPO


def run_script(name: str, args: list[str], out, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OUT": str(out)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / name.replace(".py", ".json")).read_text())


def test_gpu_bench_runs_the_trainer_and_trl_on_a_small_model(tmp_path):
    report = run_script("gpu_bench.py", ["--device", "cpu", "--tiny", "--variants", "varlen,trl", "--steps", "2",
                                         "--warmup", "1"], tmp_path)
    names = [row["trainer"] for row in report["rows"]]
    assert names[0].startswith("ours varlen") and names[1].startswith("TRL SFTTrainer"), names
    for row in report["rows"]:
        assert row["status"] == "ok" and row["trained_tokens_per_s"] > 0, row


def test_gpu_serve_bench_runs_both_decoding_loops_on_a_small_model(tmp_path):
    report = run_script("gpu_serve_bench.py", ["--tiny", "--requests", "6", "--levels", "1,3", "--repeats", "1",
                                               "--max-new", "4"], tmp_path)
    assert [level["clients"] for level in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["errors"] == 0 and level["own"]["rps"] > 0 and level["transformers"]["rps"] > 0, level
        assert level["answers_equal"] == "6/6", level  # greedy, fp32 on a CPU: the two loops agree
