"""Checkpoints of a training run: trainable weights, optimizer, RNG state and data position.

Written atomically every `train.save_steps` to `<out>.checkpoints/`, beside the DVC output
rather than inside it; a re-run with the same settings and data resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tasks.config import Params
from tasks.files import file_md5

Log = Callable[[str], None]


# Settings that do not change what is trained: a checkpoint stays valid when they change.
_NOT_TRAINING = {"save_steps", "keep_checkpoints", "log_every", "merge_adapter"}


def training_digest(params: Params, train_file: Path) -> str:
    """Hash of what determines the training: model and train settings and the train split's bytes."""
    doc = {
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json", exclude=_NOT_TRAINING),
        "train_md5": file_md5(train_file),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)
    data_rng: object = None  # random.Random state of the batch order
    trained_tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def checkpoints_dir(out: Path) -> Path:
    """`<out>.checkpoints`, a sibling of the output folder (DVC replaces the output folder)."""
    return out.with_name(out.name + ".checkpoints")


class Checkpoints:
    """Atomic checkpoints `step-NNNNNNNN/` under one folder, the last `keep` kept."""

    def __init__(self, root: Path, digest: str, keep: int):
        self.root, self.digest, self.keep = root, digest, keep

    def _all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "meta.json").is_file())

    def save(self, model, optimizer, state: LoopState, dist=None) -> Path | None:
        """Write a checkpoint from rank 0. Every rank must call it when the model is sharded (a collective)."""
        import numpy as np
        import torch

        from tasks.train.distributed import optimizer_state, trainable_state

        sharded = bool(dist and dist.sharded)
        if dist and not dist.is_main and not sharded:
            return None
        trainable, optim = trainable_state(model, sharded), optimizer_state(model, optimizer, sharded)
        if dist and not dist.is_main:
            return None
        final = self.root / f"step-{state.step:08d}"
        tmp = self.root / f".tmp-step-{state.step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(trainable, tmp / "trainable.pt")
        torch.save(optim, tmp / "optimizer.pt")
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save({"loop": asdict(state), "rng": rng}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": state.step, "digest": self.digest}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._all()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self, log: Log) -> Path | None:
        """The newest checkpoint written with this digest; stale ones are removed, saying why."""
        found = self._all()
        if not found:
            return None
        last = found[-1]
        digest = json.loads((last / "meta.json").read_text()).get("digest")
        if digest != self.digest:
            log(
                f"not resuming: the checkpoints in {self.root} were written with other settings or data "
                f"(digest {digest} != {self.digest}); starting over"
            )
            shutil.rmtree(self.root, ignore_errors=True)
            return None
        return last

    @staticmethod
    def load(path: Path, model, optimizer, device: str, sharded: bool = False) -> LoopState:
        import numpy as np
        import torch

        from tasks.train.distributed import load_trainable_state

        where = "cpu" if sharded else device
        trainable = torch.load(path / "trainable.pt", map_location=where)
        load_trainable_state(model, optimizer, trainable, torch.load(path / "optimizer.pt", map_location=where), sharded)
        # Our own file (python RNG tuples, numpy state): not loadable with weights_only.
        saved = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return LoopState(**saved["loop"])
