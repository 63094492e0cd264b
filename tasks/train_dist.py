"""The torch-level pieces of the fine-tuning engine: the packed loss and multi-process set-up.

Kept apart from `tasks.finetune` so that the stage module imports without torch (the
evaluate stage imports `read_jsonl` from it), and so that the GPU benchmark can reuse the
exact loss the stage trains with.

Multi-process training: `tasks.finetune.main` relaunches itself under
`python -m torch.distributed.run --standalone --nproc_per_node N` when
`train.num_processes > 1`; every rank builds the same batches in the same order and takes
its share of each optimizer step's micro-batches, so N processes with grad_accum A see
exactly the batches that one process with grad_accum N*A sees.

`train.distributed: ddp` keeps a full copy of the model per process and averages the
gradients. `fsdp` shards weights, gradients and optimizer state over the processes with
FSDP2 (`fully_shard` per decoder layer, then the root), for models whose full fine-tuning
does not fit one device; checkpoints and the final model are then gathered into full
state dicts on rank 0, so their files are the same as those of one process.
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
    sharded: bool = False  # FSDP: the model's weights are split over the ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(fsdp: bool = False) -> DistInfo:
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
    return DistInfo(dist.get_rank(), world, local_rank, f"cuda:{local_rank}" if cuda else "cpu", sharded=fsdp)


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


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2: shard every decoder layer, then the decoder (embeddings, norm), then the LM head.

    The decoder and the head are sharded apart, not under the model's root, because
    `CausalLMLoss` calls them directly (the head on the labelled positions only), so the
    root's forward, where FSDP would gather its parameters, never runs. Call this before
    the optimizer is created: sharding replaces the parameters with DTensors. All ranks
    must hold the same initial weights (the stage seeds them identically).
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix)
    for layer in decoder.layers:
        fully_shard(layer)
    fully_shard(decoder)
    fully_shard(base.get_output_embeddings())


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP: reduce-scatter gradients after this backward (the last micro-batch of a step) or keep them local."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def trainable_state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole and on the CPU (on rank 0 only when sharded: a collective)."""
    if not sharded:
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=True))


def optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict:
    """The optimizer's state, whole (a collective when sharded; the full dict lands on rank 0)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_trainable_state(model: torch.nn.Module, optimizer, trainable: dict, optim: dict, sharded: bool) -> None:
    """Put whole saved state back into a (possibly sharded) model and its optimizer."""
    if not sharded:
        params = dict(model.named_parameters())
        for name, value in trainable.items():
            params[name].data.copy_(value)
        optimizer.load_state_dict(optim)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, trainable, options=_full_options(strict=False))
    set_optimizer_state_dict(model, optimizer, optim, options=_full_options())
