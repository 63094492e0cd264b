"""The training loop: micro-batches, gradient accumulation, schedule, logging and checkpoints.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from tasks.config import TrainParams
from tasks.errors import RunFailed
from tasks.train.checkpoints import Checkpoints, Log, LoopState
from tasks.train.packing import Batch, to_tensors


def lr_schedule(train: TrainParams) -> Callable[[int], float]:
    """The learning rate at each optimizer step: transformers' linear warm-up and cosine decay.

    The floor is `train.min_lr_ratio` of the peak. Read as a function of the step rather than
    stepped with the optimizer, so a resumed run picks the schedule up at its checkpoint's step.
    """
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    warmup = train.warmup_steps * train.max_steps if train.warmup_steps < 1 else train.warmup_steps
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = get_cosine_with_min_lr_schedule_with_warmup(
        probe, num_warmup_steps=int(round(warmup)), num_training_steps=train.max_steps, min_lr_rate=train.min_lr_ratio,
    ).lr_lambdas[0]
    return lambda step: train.learning_rate * factor(step)


class Tracker:
    """MLflow logging into the flow's run (MLFLOW_RUN_ID); does nothing when it is not set."""

    def __init__(self, run_id: str | None, enabled: bool):
        self.run_id = run_id if enabled else None
        self._mlflow = None
        self._sent = 0

    def start(self, train: TrainParams, extra: dict) -> None:
        if not self.run_id:
            return
        import mlflow  # only here: the GPU image and plain runs do not need mlflow

        self._mlflow = mlflow
        # psutil makes system metrics cheap (a thread sampling every 10 s).
        try:
            import psutil  # noqa: F401

            system = True
        except ImportError:
            system = False
        mlflow.start_run(run_id=self.run_id, log_system_metrics=system)
        # init_md5 is the resolve stage's (the run that logged the other settings did not know it).
        mlflow.log_params({f"train.{k}": v for k, v in train.model_dump(mode="json", exclude={"init_md5"}).items()})
        mlflow.log_metrics(extra)

    def steps(self, history: list[dict]) -> None:
        """Send the per-step records not sent yet, in one batch."""
        if not self._mlflow:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(rec[key]), now, rec["step"])
            for rec in history[self._sent :]
            for key in ("loss", "lr", "tokens_per_second")
        ]
        if metrics:
            self._mlflow.tracking.MlflowClient().log_batch(self.run_id, metrics=metrics)
        self._sent = len(history)

    def finish(self, summary: dict, artifacts: list[Path], status: str = "FINISHED") -> None:
        if not self._mlflow:
            return
        self._mlflow.log_metrics({k: v for k, v in summary.items() if v is not None})
        for path in artifacts:
            if path.exists():
                self._mlflow.log_artifact(str(path))
        self._mlflow.end_run(status=status)
        self._mlflow = None


def plot_loss(history: list[dict], path: Path) -> Path:
    """The loss curve as a PNG (matplotlib's Agg canvas, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _next_indices(state: LoopState, count: int, rng: random.Random) -> list[int]:
    """The next `count` batch indices of the stream, shuffled anew at the start of every epoch."""
    out = []
    for _ in range(count):
        if state.cursor >= len(state.order):
            rng.shuffle(state.order)
            state.cursor = 0
        out.append(state.order[state.cursor])
        state.cursor += 1
    return out


def evaluate_loss(loss_model, batches: list[Batch], device: str, dtype=None) -> float | None:
    """Token-weighted mean loss over `batches` (the validation split)."""
    import torch

    if not batches:
        return None
    total, count = 0.0, 0
    loss_model.eval()
    with torch.no_grad(), _autocast(device, dtype):
        for b in batches:
            total += float(loss_model(*to_tensors(b, device)))
            count += b.trained_tokens
    loss_model.train()
    return total / max(1, count)


def _autocast(device: str, dtype):
    import torch

    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def train_loop(
    model,
    batches: list[Batch],
    train: TrainParams,
    device: str,
    log: Log = print,
    *,
    dtype=None,
    dist=None,
    checkpoints: Checkpoints | None = None,
    state: LoopState | None = None,
    optimizer=None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> LoopState:
    """Run optimizer steps up to `train.max_steps`, from `state` (a resumed run) or from scratch.

    Every step consumes `world * grad_accum` batches from one seeded stream shared by all
    ranks; rank r takes every world-th of them. The loss of a step is the token-weighted
    mean over all its batches, so N ranks give the same update as one process with N
    times the accumulation.
    """
    import torch

    from tasks.environment import ThreadShare
    from tasks.train.distributed import DistInfo, all_reduce_sum, set_gradient_sync
    from tasks.train.loss import CausalLMLoss

    dist = dist or DistInfo(device=device)
    loss_model = CausalLMLoss(model)
    runner = loss_model
    if dist.enabled and not dist.sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(loss_model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    # The cursor starts at the end of the order, so the first epoch is shuffled too: in their
    # built order the batches run from the shortest rows to the longest (make_batches), and
    # where length follows the kind of example (the tools task's three tools) a first epoch
    # in that order trains one kind after the other, forgetting the earlier ones.
    state = state or LoopState(order=list(range(len(batches))), cursor=len(batches))
    rng = random.Random(train.seed)
    if state.data_rng is not None:
        rng.setstate(state.data_rng)
    per_step = dist.world * train.grad_accum
    trained_of = [b.trained_tokens for b in batches]
    real_of = [b.real_tokens for b in batches]
    bar = None
    if progress and dist.is_main:
        from tqdm.auto import tqdm  # tqdm comes with transformers (huggingface_hub)

        # disable=None: a bar on a terminal only; logs get the progress lines below.
        bar = tqdm(total=train.max_steps, initial=state.step, desc="train", unit="step", file=sys.stderr, disable=None)
    model.train()
    start, done_before = time.perf_counter(), state.seconds
    first_step = state.step
    lr_at = lr_schedule(train)
    threads = ThreadShare()
    while state.step < train.max_steps:
        threads.adjust()
        t0 = time.perf_counter()
        lr = lr_at(state.step)
        for group in opt.param_groups:
            group["lr"] = lr
        chosen = _next_indices(state, per_step, rng)
        step_tokens = sum(trained_of[i] for i in chosen)
        if not step_tokens:  # a loss over nothing is 0 and would log as a perfect step
            raise RunFailed(
                f"step {state.step + 1}: its {len(chosen)} batch(es) hold 0 trained tokens, so there is nothing to learn; "
                "likely the chat template marks no assistant tokens (run `ftllm validate` on the data for "
                "no_trained_tokens) or train.seq_len cuts the answers off (raise train.seq_len or lower data.max_tokens)"
            )
        mine = chosen[dist.rank :: dist.world]
        loss_sum = torch.zeros((), device=device)
        for k, i in enumerate(mine):
            last = k == len(mine) - 1
            if dist.sharded:  # FSDP2: reduce-scatter the gradients after the last micro-batch only
                set_gradient_sync(model, last)
            sync = nullcontext() if last or not dist.enabled or dist.sharded else runner.no_sync()
            with sync:
                with _autocast(device, dtype):
                    s = runner(*to_tensors(batches[i], device))
                # DDP and FSDP average gradients over ranks, hence the factor world.
                (s * (dist.world / max(1, step_tokens))).backward()
            loss_sum += s.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor when sharded
            grad_norm = grad_norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(all_reduce_sum(loss_sum, dist)) / max(1, step_tokens)
        state.step += 1
        state.trained_tokens += step_tokens
        state.seconds = done_before + time.perf_counter() - start
        state.data_rng = rng.getstate()
        state.history.append(
            {
                "step": state.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": step_tokens,
                "real_tokens": sum(real_of[i] for i in chosen),
                "batches": chosen,
                "step_seconds": time.perf_counter() - t0,
                "tokens_per_second": state.trained_tokens / max(state.seconds, 1e-9),
            }
        )
        if checkpoints and train.save_steps and state.step % train.save_steps == 0:
            checkpoints.save(model, opt, state, dist)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if dist.is_main and (state.step % train.log_every == 0 or state.step == train.max_steps):
            elapsed = time.perf_counter() - start
            eta = elapsed / max(1, state.step - first_step) * (train.max_steps - state.step)
            log(
                f"step {state.step}/{train.max_steps} loss {loss:.4f} lr {lr:.2e} "
                f"tokens/s {state.history[-1]['tokens_per_second']:.0f} eta {eta:.0f}s"
            )
            if tracker:
                tracker.steps(state.history)
    if bar is not None:
        bar.close()
    return state


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
