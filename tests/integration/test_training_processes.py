"""The finetune stage as processes: a killed stage resumes, torchrun with DDP and FSDP2 follows one process's curve."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.support.training import (
    small_params,
    start_stage,
    torch_equal,
    write_data,
    write_params,
)


@pytest.fixture()
def data_dir(tmp_path):
    return write_data(tmp_path)


@pytest.fixture(scope="module")
def one_process_curve(tmp_path_factory) -> tuple[Path, list[float]]:
    """The data and the loss curve of one process with grad_accum 2 (the reference of the 2-process tests)."""
    root = tmp_path_factory.mktemp("one-process")
    data = write_data(root)
    params = write_params(root / "one.yaml", small_params(max_steps=8, batch_size=2, grad_accum=2))
    proc = start_stage(params, data, root / "one")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    return data, [h["loss"] for h in json.loads((root / "one" / "history.json").read_text())]


@pytest.mark.slow
def test_killed_stage_resumes_from_its_last_checkpoint(data_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", small_params(max_steps=30, save_steps=5))
    out = tmp_path / "model"
    proc = start_stage(params, data_dir, out)
    for line in proc.stdout:
        if line.startswith("step 13/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    rerun = start_stage(params, data_dir, out)
    text, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, text
    assert "resuming from step 10" in text  # at most save_steps steps repeated
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 30 and summary["resumed_from_step"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_follow_the_loss_curve_of_one_with_the_same_global_batch(one_process_curve, tmp_path, distributed):
    data_dir, a = one_process_curve
    two = write_params(
        tmp_path / "two.yaml",
        small_params(max_steps=8, batch_size=2, num_processes=2, distributed=distributed, save_steps=4),
    )
    proc = start_stage(two, data_dir, tmp_path / "two")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    b = [h["loss"] for h in json.loads((tmp_path / "two" / "history.json").read_text())]
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["num_processes"] == 2
    assert a[-1] < a[0] and b[-1] < b[0]
    assert b == pytest.approx(a, rel=1e-3)
    # The checkpoints hold whole state (gathered from the shards under FSDP): a re-run loads
    # the last one into the sharded model, trains no further step and writes the same adapter.
    from safetensors.torch import load_file

    before = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    proc = start_stage(two, data_dir, tmp_path / "two")
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resuming from step 8" in text, text
    after = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch_equal(before[k], after[k]) for k in before)

