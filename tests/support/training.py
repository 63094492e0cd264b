"""Helpers of the training tests: small settings, a small prepared data folder, the stage as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from scripts.make_data import make_examples
from tasks.config import Params, TrainParams
from tests.support.project import REPO


def write_data(folder: Path) -> Path:
    examples = make_examples(60, seed=3)
    d = folder / "prepared"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:48]))
    (d / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[48:]))
    return d


def small_params(**train) -> Params:
    settings = dict(max_steps=6, batch_size=4, seq_len=128, save_steps=0, log_every=1, learning_rate=0.004)
    settings.update(train)
    return Params(train=TrainParams(**settings))


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def start_stage(params_file: Path, data_dir: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.stages.finetune", "--params", str(params_file), "--data", str(data_dir), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))

