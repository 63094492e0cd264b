"""Fine-tune the base model on the prepared train split (DVC stage `finetune`).

Set-up (checks, base model, tokenizer, LoRA / QLoRA / full) → packed batches → a plain
PyTorch training loop with checkpoints → a self-describing output folder: the adapter (or
full weights), the tokenizer with its chat template, the resolved settings, the training
summary and the loss history (`history.json`, a DVC plot).

Packing puts examples into `train.seq_len` rows by best-fit decreasing, then batches rows
of similar length together, so almost no compute goes to padding. Position ids restart at
every example and no attention mask is passed; attention stays inside each example either
through `tasks.attention` (`train.attention: packed`, causal attention per example, no
dense mask) or through the block-diagonal causal mask transformers builds from the
position ids (`mask`). Unit tests check the logits of both against unpacked examples.

Checkpoints (every `train.save_steps` steps) go to `<out>.checkpoints/`, beside the DVC
output rather than inside it; a re-run with the same settings and data resumes from the
last one. `train.num_processes > 1` relaunches the stage under torchrun (DDP, or FSDP2 with
`train.distributed: fsdp`).

Run alone (after `tasks.prepare`):

    python -m tasks.finetune --params artifacts/params.yaml --data artifacts/prepared --out artifacts/model

When MLFLOW_RUN_ID is set (the retrain flow sets it) the stage logs into that run.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from tasks.config import ConfigError, Params, TrainParams, file_md5, load_params
from tasks.modeling import Encoded, encode_chat, load_causal_lm, load_tokenizer, resolve_base

IGNORE = -100
Row = tuple[list[int], list[int], list[int]]  # input ids, labels (unshifted), position ids
Log = Callable[[str], None]
# Settings that do not change what is trained: a checkpoint stays valid when they change.
_NOT_TRAINING = {"save_steps", "keep_checkpoints", "log_every", "merge_adapter"}


def seed_everything(seed: int) -> None:
    """The one seeding helper: Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file of canonical examples."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Token ids, shifted labels and position ids of shape (batch, width), as lists.

    Padding has position -1 and label IGNORE; labels are already shifted for next-token
    prediction and never cross from one packed example into the next.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]

    @property
    def real_tokens(self) -> int:
        return sum(1 for row in self.position_ids for p in row if p >= 0)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for row in self.labels for t in row if t != IGNORE)


def _row_of(ex: Encoded, seq_len: int) -> Row:
    ids = ex.input_ids[:seq_len]
    labels = [t if m else IGNORE for t, m in zip(ids, ex.loss_mask[:seq_len])]
    return ids, labels, list(range(len(ids)))


def pack_sequences(examples: list[Encoded], seq_len: int, seed: int = 0) -> list[Row]:
    """Pack examples into rows of at most `seq_len` tokens by best-fit decreasing.

    Longest examples first, each into the row with the least room that still fits it (a
    new row when none does); ties are broken by a seeded shuffle. Best-fit decreasing
    needs at most 11/9 of the optimal number of rows, against 2x for greedy in-order
    packing. Examples longer than `seq_len` are cut to it (prepare's length policy has
    already dealt with over-long examples). Position ids restart at 0 for every example.
    """
    items = [_row_of(ex, seq_len) for ex in examples]
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(items[i][0]))
    rows: list[Row] = []
    # Sorted (room left, row index) pairs: bisect finds the tightest row that fits.
    room: list[tuple[int, int]] = []
    for i in order:
        ids, labels, pos = items[i]
        k = bisect.bisect_left(room, (len(ids), -1))
        if k == len(room):
            rows.append(([], [], []))
            r, left = len(rows) - 1, seq_len
        else:
            left, r = room.pop(k)
        rows[r][0].extend(ids)
        rows[r][1].extend(labels)
        rows[r][2].extend(pos)
        bisect.insort(room, (left - len(ids), r))
    return rows


def pad_sequences(examples: list[Encoded], seq_len: int) -> list[Row]:
    """One example per row (packing off), cut to `seq_len`; rows are padded per batch later."""
    return [_row_of(ex, seq_len) for ex in examples]


def make_batches(rows: list[Row], batch_size: int, pad_id: int, seed: int = 0) -> list[Batch]:
    """Group rows of similar length into batches, each padded to its longest row.

    Grouping by length keeps the padding per batch small; the training loop shuffles the
    order of the batches every epoch.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: len(rows[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        width = max(len(r[0]) for r in chunk)
        ids, labels, pos = [], [], []
        for x, y, p in chunk:
            n = width - len(x)
            ids.append(x + [pad_id] * n)
            p_full = p + [-1] * n
            y_full = y + [IGNORE] * n
            # Token i predicts token i+1, unless i+1 starts the next example or is padding.
            labels.append([y_full[i + 1] if i + 1 < width and p_full[i + 1] > 0 else IGNORE for i in range(width)])
            pos.append(p_full)
        batches.append(Batch(ids, labels, pos))
    return batches


def padding_fraction(batches: list[Batch]) -> float:
    """Share of batch positions that hold padding rather than an example's token."""
    total = sum(len(b.input_ids) * len(b.input_ids[0]) for b in batches)
    real = sum(b.real_tokens for b in batches)
    return 1.0 - real / total if total else 0.0


def to_tensors(batch: Batch, device: str):
    """(input_ids, position_ids, labels) tensors.

    The padding at the end of a row gets positions 0, 1, 2, ...: one more example, which no
    real token can attend to (it comes last) and whose outputs carry no label.
    """
    import torch

    ids = torch.tensor(batch.input_ids, device=device)
    pos = torch.tensor(batch.position_ids, device=device)
    real = (pos >= 0).sum(dim=1, keepdim=True)
    pos = torch.where(pos >= 0, pos, torch.arange(pos.shape[1], device=device) - real)
    labels = torch.tensor(batch.labels, device=device)
    return ids, pos, labels


# --------------------------------------------------------------------------- set-up


def pick_precision(precision: str, device: str):
    """bf16 where asked for or where the GPU supports it; fp32 otherwise (CPU)."""
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_config(train: TrainParams, base_path: str, device: str) -> None:
    """Refuse, before any training, a configuration that cannot run here; the message names the key."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_path)
    context = getattr(cfg, "max_position_embeddings", None)
    if context and train.seq_len > context:
        raise ConfigError(
            f"train.seq_len={train.seq_len} is longer than the context of the base model "
            f"(max_position_embeddings={context}); lower train.seq_len to at most {context}"
        )
    cuda = device.startswith("cuda")
    if train.method == "qlora":
        if not cuda:
            raise ConfigError(
                "train.method=qlora needs a CUDA GPU and the bitsandbytes package (4-bit NF4); "
                "use train.method=lora on this machine"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("train.method=qlora needs the bitsandbytes package; install it or use train.method=lora") from None
    if train.precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16: this GPU has no bf16 support; use train.precision=auto or fp32")
    if cuda and train.num_processes > torch.cuda.device_count():
        raise ConfigError(
            f"train.num_processes={train.num_processes} is more than the {torch.cuda.device_count()} GPUs here"
        )
    if cuda:
        # Weights plus optimizer state, per parameter: full fine-tuning keeps fp32 weights,
        # gradients and two Adam moments (16 B); LoRA keeps frozen bf16/fp32 weights; QLoRA 4-bit ones.
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        per_param = {"full": 16.0, "lora": 2.0 if train.precision != "fp32" else 4.0, "qlora": 0.6}[train.method]
        shards = train.num_processes if train.distributed == "fsdp" else 1  # FSDP splits all of it over the GPUs
        need, have = n * per_param / shards, torch.cuda.get_device_properties(device).total_memory
        if need > 0.9 * have:
            raise ConfigError(
                f"train.method={train.method}: the base model ({n / 1e9:.1f}B parameters) needs about "
                f"{need / 2**30:.0f} GiB before activations, the GPU has {have / 2**30:.0f} GiB; "
                "use train.method=lora or qlora, train.distributed=fsdp over more GPUs, or a smaller model.base"
            )


def build_model(base_path: str, train: TrainParams, device: str, dtype):
    """Load the base model and wrap it for the training method (LoRA, QLoRA or full).

    Mixed precision: frozen weights may be bf16, trainable ones are always fp32 (the
    forward pass runs under bf16 autocast), so Adam's updates are not lost to rounding.
    """
    import torch

    quant = None
    if train.method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
        )
    load_dtype = torch.float32 if train.method == "full" else dtype
    model = load_causal_lm(base_path, dtype=load_dtype, device=device, quantization_config=quant)
    return wrap_for_training(model, train, quantized=quant is not None)


def wrap_for_training(model, train: TrainParams, quantized: bool = False):
    """Switch a loaded causal LM to training: no KV cache, checkpointing, LoRA; trainables in fp32."""
    import torch

    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.method != "full":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        targets = train.lora_target_modules
        config = LoraConfig(
            r=train.lora_r,
            lora_alpha=train.lora_alpha,
            lora_dropout=train.lora_dropout,
            target_modules="all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            modules_to_save=[m.strip() for m in train.lora_modules_to_save.split(",") if m.strip()] or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if train.attention == "packed":
        from tasks.attention import use_packed_attention

        use_packed_attention(model)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def lr_at(step: int, train: TrainParams) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    warmup = train.warmup_steps * train.max_steps if train.warmup_steps < 1 else train.warmup_steps
    if step < warmup:
        return train.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1.0, train.max_steps - warmup)
    return train.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_digest(params: Params, train_file: Path) -> str:
    """Hash of what determines the training: model and train settings and the train split's bytes."""
    doc = {
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json", exclude=_NOT_TRAINING),
        "train_md5": file_md5(train_file),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- checkpoints


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

        from tasks.train_dist import optimizer_state, trainable_state

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

        from tasks.train_dist import load_trainable_state

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


# --------------------------------------------------------------------------- tracking


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
        mlflow.log_params({f"train.{k}": v for k, v in train.model_dump(mode="json").items()})
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


# --------------------------------------------------------------------------- training loop


def _next_indices(state: LoopState, count: int, rng: random.Random) -> list[int]:
    """The next `count` batch indices of the stream, reshuffling at every epoch's end."""
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

    from tasks.train_dist import CausalLMLoss, DistInfo, all_reduce_sum, set_gradient_sync

    dist = dist or DistInfo(device=device)
    loss_model = CausalLMLoss(model)
    runner = loss_model
    if dist.enabled and not dist.sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(loss_model, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    state = state or LoopState(order=list(range(len(batches))))
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
    while state.step < train.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(state.step, train)
        for group in opt.param_groups:
            group["lr"] = lr
        chosen = _next_indices(state, per_step, rng)
        step_tokens = sum(trained_of[i] for i in chosen)
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
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
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


# --------------------------------------------------------------------------- outputs


@dataclass
class TrainSummary:
    method: str
    steps: int
    final_loss: float
    val_loss: float | None
    trained_tokens: int
    tokens_per_second: float
    padding_fraction: float
    seconds: float
    peak_memory_mb: float
    device: str
    precision: str
    trainable_params: int
    total_params: int
    mlflow_run_id: str | None
    resumed_from_step: int = 0
    num_processes: int = 1


def peak_memory_mb(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_model(
    model, tokenizer, out: Path, params: Params, base_path: str, summary: TrainSummary, merge: bool,
    history: list[dict] | None = None,
) -> Path:
    """Write the self-describing model folder atomically (temp folder, then rename)."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = "full" if params.train.method == "full" else "adapter"
    if kind == "adapter":
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        if merge:
            # merge_and_unload changes the model in place: it comes after the adapter is saved.
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
    else:
        model.save_pretrained(tmp / "weights", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "weights")
    tokenizer.save_pretrained(tmp)
    info = {
        "kind": kind,
        "base": params.model.base,
        "base_path": base_path,
        "model_params": params.model.model_dump(),
        "method": params.train.method,
        "params_digest": params.digest(),
    }
    (tmp / "ftllm_model.json").write_text(json.dumps(info, indent=2))
    (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    (tmp / "train_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    history = history or []
    (tmp / "history.json").write_text(
        json.dumps([{k: r[k] for k in ("step", "loss", "lr", "tokens_per_second")} for r in history])
    )
    if history:
        plot_loss(history, tmp / "loss.png")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def prepare_batches(tokenizer, rows: list[dict], train: TrainParams) -> list[Batch]:
    """Encode chat examples (assistant-only labels unless train_on_prompt), pack and batch them."""
    encoded = [encode_chat(tokenizer, r["messages"], train.train_on_prompt) for r in rows]
    if train.packing:
        packed = pack_sequences(encoded, train.seq_len, train.seed)
    else:
        packed = pad_sequences(encoded, train.seq_len)
    return make_batches(packed, train.batch_size, tokenizer.pad_token_id, train.seed) if packed else []


def finetune(params: Params, data_dir: Path, out: Path, log: Log = print) -> TrainSummary:
    """Fine-tune `params.model.base` on `data_dir/train.jsonl` and write the model folder to `out`.

    Resumes from `<out>.checkpoints/` when a checkpoint of the same settings and data is
    there. Under torchrun (see `main`) every rank trains and only rank 0 logs and writes.

    Raises:
        ConfigError: a setting that cannot work here (named), or an empty train split.
    """
    import torch

    from tasks.train_dist import CausalLMLoss, barrier, init_distributed, shard_model, shutdown, trainable_state

    train = params.train
    dist = init_distributed(fsdp=train.distributed == "fsdp")
    device = dist.device
    say: Log = log if dist.is_main else (lambda _msg: None)
    try:
        if train.num_processes > 1 and not dist.enabled:
            say(f"train.num_processes={train.num_processes} takes effect through `python -m tasks.finetune` (torchrun); "
                "training in this one process")
        base_path = resolve_base(params.model)
        check_config(train, base_path, device)
        train_file = data_dir / "train.jsonl"
        if not train_file.is_file():
            raise ConfigError(f"{train_file}: no train split; run the prepare stage first (python -m tasks.prepare)")
        seed_everything(train.seed)
        dtype = pick_precision(train.precision, device)
        tokenizer = load_tokenizer(base_path)
        batches = prepare_batches(tokenizer, read_jsonl(train_file), train)
        if not batches:
            raise ConfigError(f"{train_file}: the train split is empty; add data or lower data.test_fraction")
        val_path = data_dir / "val.jsonl"
        val_batches = prepare_batches(tokenizer, read_jsonl(val_path), train) if val_path.exists() else []
        model = build_model(base_path, train, device, dtype)
        if dist.sharded:
            shard_model(model)
        # Dropout differs per rank; the weights are the same (seeded alike, and DDP broadcasts them too).
        torch.manual_seed(train.seed + dist.rank)
        pad_frac = padding_fraction(batches)

        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=train.learning_rate, weight_decay=train.weight_decay
        )
        checkpoints = Checkpoints(checkpoints_dir(out), training_digest(params, train_file), train.keep_checkpoints)
        state = None
        latest = checkpoints.latest(say) if dist.is_main else None
        if dist.enabled:  # every rank resumes from the checkpoint rank 0 chose
            import torch.distributed as tdist

            box = [str(latest) if latest else None]
            tdist.broadcast_object_list(box, src=0)
            latest = Path(box[0]) if box[0] else None
        if latest is not None:
            state = Checkpoints.load(latest, model, opt, device, dist.sharded)
            say(f"resuming from step {state.step} ({latest})")
        resumed = state.step if state else 0
        say(
            f"training {train.method} on {device} ({str(dtype).removeprefix('torch.')}, {dist.world} process(es)): "
            f"{len(batches)} batches, padding {pad_frac:.1%}, {train.max_steps} steps"
        )
        tracker = Tracker(os.environ.get("MLFLOW_RUN_ID"), enabled=dist.is_main)
        tracker.start(train, {"padding_fraction": pad_frac})
        try:
            state = train_loop(
                model, batches, train, device, say, dtype=dtype, dist=dist, checkpoints=checkpoints,
                state=state, optimizer=opt, tracker=tracker,
            )
            if train.save_steps and state.step % train.save_steps:
                checkpoints.save(model, opt, state, dist)  # the final state: a re-run with the same settings is a no-op
            if dist.sharded:  # gather the trained weights into one whole model on rank 0
                whole = trainable_state(model, sharded=True)
                model = build_model(base_path, train, device, dtype) if dist.is_main else model
                if dist.is_main:
                    named = dict(model.named_parameters())
                    for name, value in whole.items():
                        named[name].data.copy_(value)
            val_loss = evaluate_loss(CausalLMLoss(model), val_batches, device, dtype) if dist.is_main else None
            final = state.history[-1]["loss"] if state.history else float("nan")
            summary = TrainSummary(
                method=train.method,
                steps=state.step,
                final_loss=final,
                val_loss=val_loss,
                trained_tokens=state.trained_tokens,
                tokens_per_second=state.trained_tokens / max(state.seconds, 1e-9),
                padding_fraction=pad_frac,
                seconds=state.seconds,
                peak_memory_mb=peak_memory_mb(device),
                device=device,
                precision=str(dtype).removeprefix("torch."),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                total_params=sum(p.numel() for p in model.parameters()),
                mlflow_run_id=tracker.run_id,
                resumed_from_step=resumed,
                num_processes=dist.world,
            )
            if dist.is_main:
                save_model(model, tokenizer, out, params, base_path, summary, train.merge_adapter, state.history)
                tracker.steps(state.history)
                tracker.finish(
                    {
                        "train_loss": summary.final_loss,
                        "val_loss": summary.val_loss,
                        "train_tokens_per_second": summary.tokens_per_second,
                        "train_seconds": summary.seconds,
                        "peak_memory_mb": summary.peak_memory_mb,
                    },
                    [out / "loss.png", out / "history.json", out / "train_summary.json"],
                )
        except BaseException:
            tracker.finish({}, [], status="FAILED")
            raise
        barrier(dist)
        return summary
    finally:
        shutdown(dist)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fine-tune the base model (DVC stage).")
    ap.add_argument("--params", default="artifacts/params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/model"))
    raw_argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(raw_argv)
    from tasks.train_dist import relaunch_with_torchrun, under_torchrun

    try:
        params = load_params(args.params)
        if params.train.num_processes > 1 and not under_torchrun():
            print(f"launching {params.train.num_processes} processes with torchrun", flush=True)
            return relaunch_with_torchrun(params.train.num_processes, "tasks.finetune", raw_argv)
        summary = finetune(params, args.data, args.out, log=lambda m: print(m, flush=True))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(asdict(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
