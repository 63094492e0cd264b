"""Training on several processes: torchrun launch, DDP and FSDP2 sharding, whole-model state on rank 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch


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
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, trainable, options=_full_options(strict=False))
    set_optimizer_state_dict(model, optimizer, optim, options=_full_options())
