"""The torch-level pieces of the fine-tuning engine: the packed loss and multi-process set-up.

Kept apart from `tasks.finetune` so that the stage module imports without torch (the
evaluate stage imports `read_jsonl` from it), and so that the GPU benchmark can reuse the
exact loss the stage trains with.

Multi-process training is plain DDP: `tasks.finetune.main` relaunches itself under
`python -m torch.distributed.run --standalone --nproc_per_node N` when
`train.num_processes > 1`; every rank builds the same batches in the same order and takes
its share of each optimizer step's micro-batches, so N processes with grad_accum A see
exactly the batches that one process with grad_accum N*A sees. FSDP is left out: the
models this pipeline fine-tunes with LoRA fit on one device, and the adapter is what
moves between ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions of a batch.

    The language-model head runs only on the positions that carry a label (assistant
    tokens by default), not on every position: with a 32k vocabulary the head and its
    fp32 softmax over prompt and padding tokens cost as much as several decoder layers.
    Labels arrive already shifted (position i holds the id of token i+1), so packing can
    mask the boundary between two examples.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
        self._head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != IGNORE
        if self._decoder is None or self._head is None:  # an architecture without the usual layout
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[keep]
        else:
            # No attention mask: transformers then derives a block-diagonal causal mask from
            # the restarting position ids, so packed examples never attend to each other.
            hidden = self._decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            logits = self._head(hidden[keep])
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return DistInfo(device="cuda" if cuda else "cpu")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), world, local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module argv...` in `nproc` processes under torchrun; its exit status."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", module, *argv,
    ]
    return subprocess.run(cmd, check=False).returncode


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
