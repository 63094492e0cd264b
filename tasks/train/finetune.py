"""Fine-tune the base model on the prepared train split (library side of the `finetune` stage).

Set-up (checks, base model, tokenizer, LoRA / QLoRA / full) → packed batches
(`tasks.train.packing`) → the training loop with checkpoints (`tasks.train.loop`) → a
self-describing output folder: the adapter (or full weights), the tokenizer with its chat
template, the resolved settings, the training summary and the loss history (`history.json`,
a DVC plot).

Attention stays inside each packed example either through `tasks.train.attention`
(`train.attention: packed`, causal attention per example, no dense mask) or through the
block-diagonal causal mask transformers builds from the position ids (`mask`); `auto`,
the default, takes packed where it is exact and the mask for a model whose attention it
would change (`tasks.model.loading.resolve_attention`).
`train.num_processes > 1` relaunches the stage under torchrun (DDP, or FSDP2 with
`train.distributed: fsdp`). When MLFLOW_RUN_ID is set (the retrain flow sets it) the
stage logs into that run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from tasks.config import Params, TrainParams
from tasks.environment import environment
from tasks.errors import ConfigError
from tasks.files import read_jsonl
from tasks.model.loading import (
    added_token_ids,
    check_fit,
    grow_embeddings,
    load_base_tokenizer,
    load_causal_lm,
    resolve_attention,
    resolve_base,
)
from tasks.train.checkpoints import Checkpoints, checkpoints_dir, training_digest
from tasks.train.loop import (
    Log,
    Tracker,
    evaluate_loss,
    peak_memory_mb,
    plot_loss,
    train_loop,
)
from tasks.train.packing import padding_fraction, prepare_batches
from tasks.train.warm_start import load_init_adapter, scaled_steps


def seed_everything(seed: int) -> None:
    """The one seeding helper: Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)



def pick_precision(precision: str, device: str):
    """bf16 where asked for or where the GPU supports it; fp32 otherwise (CPU)."""
    import torch

    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_config(train: TrainParams, base_path: str, device: str) -> None:
    """Refuse, before any training, a configuration that cannot run on this machine; the message names the key.

    What the base model itself cannot run (lengths beyond its context, packed attention
    it would change) is `tasks.model.loading.check_fit`'s, which the flow also runs up front.
    """
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(base_path)
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
    if train.trainable_precision == "bf16" and pick_precision(train.precision, device) != torch.bfloat16:
        raise ConfigError(
            f"train.trainable_precision=bf16 needs a bf16 run, and train.precision={train.precision} runs fp32 on "
            f"{device}; set train.precision=bf16 or train.trainable_precision=fp32"
        )
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


def build_model(base_path: str, train: TrainParams, device: str, dtype, tokenizer=None, new_ids: list[int] = ()):
    """Load the base model and wrap it for the training method (LoRA, QLoRA or full).

    Mixed precision: frozen weights may be bf16, trainable ones are fp32 (the forward pass
    runs under bf16 autocast), so Adam's updates are not lost to rounding; with
    `train.trainable_precision: bf16` they are bf16 too and nothing is autocast.

    Args:
        base_path: the base model folder or id.
        train: the training settings.
        device, dtype: where and in which precision the frozen weights live.
        tokenizer: the run's tokenizer (`load_base_tokenizer`); with `new_ids`, the tokens
            it added to the base tokenizer, which get embedding rows and are trained.
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
    if tokenizer is not None:
        grow_embeddings(model, tokenizer, list(new_ids))
    tiny = (Path(base_path) / "tiny.json").is_file()
    trained_rows = [i for i in new_ids if tokenizer is None or i != tokenizer.pad_token_id]
    return wrap_for_training(model, train, quantized=quant is not None, tiny=tiny, new_ids=trained_rows)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module).rsplit(".", 1)[-1]


def embedding_trainables(model, setting: str, tiny: bool, new_ids: list[int]) -> dict:
    """What LoRA trains of the embeddings besides the adapter, as LoraConfig arguments.

    `train.lora_modules_to_save: auto` trains the whole embedding and LM head of the tiny
    model only: its weights are random, and it learns the task through them. A real model
    keeps them frozen: in full they are ~1 B parameters of Llama-3-8B, with Adam's state on
    top. Where the tokenizer gained tokens (ChatML on a base model), only their rows are
    trained, through peft's `trainable_token_indices`, in the input embedding and, when it
    is not tied to it, the output embedding (the model must learn to emit `<|im_end|>`).
    A pad token that was added is not among them: padding is never attended to nor a label.
    An explicit list (or "") is used as it is.
    """
    if setting != "auto":
        return {"modules_to_save": [m.strip() for m in setting.split(",") if m.strip()] or None}
    if tiny:
        return {"modules_to_save": ["embed_tokens", "lm_head"]}
    if not new_ids:
        return {}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {_module_name(model, inputs): list(new_ids)}
    if outputs is not None and outputs.weight is not inputs.weight:
        rows[_module_name(model, outputs)] = list(new_ids)
    return {"trainable_token_indices": rows}


def wrap_for_training(model, train: TrainParams, quantized: bool = False, tiny: bool = False,
                      new_ids: list[int] = ()):
    """Switch a loaded causal LM to training: no KV cache, checkpointing, LoRA, trainables' dtype, compiled layers.

    Trainables are fp32 unless `train.trainable_precision` is bf16 (see `loop_dtype`).
    `train.compile` compiles each decoder layer in place (`nn.Module.compile`): parameter
    names, checkpoints and the saved adapter stay those of the eager model.
    `tiny` and `new_ids` (token rows to train) resolve `train.lora_modules_to_save: auto`
    (`embedding_trainables`).
    """
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
            task_type="CAUSAL_LM",
            **embedding_trainables(model, train.lora_modules_to_save, tiny, list(new_ids)),
        )
        model = get_peft_model(model, config)
    if resolve_attention(train.attention, model.config, train.seq_len) == "packed":
        from tasks.train.attention import use_packed_attention

        use_packed_attention(model)
    trained_dtype = torch.bfloat16 if train.trainable_precision == "bf16" else torch.float32
    for p in model.parameters():
        if p.requires_grad and p.dtype != trained_dtype:
            p.data = p.data.to(trained_dtype)
    if train.compile:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in decoder_layers(base):
            layer.compile(**COMPILE_OPTIONS)
    return model


# Keyword arguments of torch.compile for `train.compile`; inductor, the default, unless changed.
COMPILE_OPTIONS: dict = {}


def decoder_layers(base) -> list:
    """The repeated decoder blocks of a transformers causal LM (`model.layers`, GPT-2's `transformer.h`, ...)."""
    import torch

    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    for name in ("layers", "h", "blocks"):
        if isinstance(getattr(decoder, name, None), torch.nn.ModuleList):
            return list(getattr(decoder, name))
    raise ConfigError(f"train.compile: found no decoder layers in {type(base).__name__}; set train.compile=false")


def loop_dtype(train: TrainParams, dtype):
    """The autocast dtype of the training loop: none when the trained weights are bf16 themselves."""
    return None if train.trainable_precision == "bf16" else dtype


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


def save_model(
    model, tokenizer, out: Path, params: Params, base_path: str, summary: TrainSummary, merge: bool,
    history: list[dict] | None = None, added_ids: list[int] = (),
) -> Path:
    """Write the self-describing model folder atomically (temp folder, then rename).

    The folder's tokenizer is the run's (chat template, eos, pad and added tokens), so
    evaluation, the registry's pyfunc model, the bento and the service render what training
    rendered; `added_token_ids` in `ftllm_model.json` lets `load_trained` grow the base's
    embeddings as training did before the adapter is loaded.
    """
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kind = "full" if params.train.method == "full" else "adapter"
    if kind == "adapter":
        # The rows of added tokens are rebuilt by `grow_embeddings` on load (deterministically)
        # and their trained values are in the adapter: no need for a copy of the whole embedding.
        model.save_pretrained(tmp / "adapter", safe_serialization=True,
                              save_embedding_layers=False if added_ids else "auto")
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
        # Without the resolve stage's None fields: BentoML keeps this file as model metadata, which takes no None.
        "model_params": params.model.model_dump(exclude_none=True),
        "added_token_ids": list(added_ids),
        "method": params.train.method,
        "params_digest": params.digest(),
        # How system messages were rendered in training; serving renders prompts the same way.
        "system_message": params.data.system_message,
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


def finetune(params: Params, data_dir: Path, out: Path, log: Log = print) -> TrainSummary:
    """Fine-tune `params.model.base` on `data_dir/train.jsonl` and write the model folder to `out`.

    Resumes from `<out>.checkpoints/` when a checkpoint of the same settings and data is
    there. Under torchrun (see `main`) every rank trains and only rank 0 logs and writes.

    Raises:
        ConfigError: a setting that cannot work here (named), or an empty train split.
    """
    import torch

    from tasks.train.distributed import (
        barrier,
        init_distributed,
        shard_model,
        shutdown,
        trainable_state,
    )
    from tasks.train.loss import CausalLMLoss

    train = params.train
    dist = init_distributed(fsdp=train.distributed == "fsdp")
    device = dist.device
    say: Log = log if dist.is_main else (lambda _msg: None)
    try:
        if train.num_processes > 1 and not dist.enabled:
            say(f"train.num_processes={train.num_processes} takes effect through `python -m tasks.stages.finetune` (torchrun); "
                "training in this one process")
        base_path = resolve_base(params.model)
        check_fit(params, base_path)
        check_config(train, base_path, device)
        train_file = data_dir / "train.jsonl"
        if not train_file.is_file():
            raise ConfigError(f"{train_file}: no train split; run the prepare stage first (python -m tasks.stages.prepare)")
        seed_everything(train.seed)
        dtype = pick_precision(train.precision, device)
        tokenizer = load_base_tokenizer(params.model, base_path)
        new_ids = added_token_ids(tokenizer, base_path)
        policy = params.data.system_message
        batches = prepare_batches(tokenizer, read_jsonl(train_file), train, policy)
        if not batches:
            raise ConfigError(f"{train_file}: the train split is empty; add data or lower data.test_fraction")
        configured, train = train, train.model_copy(update={"max_steps": scaled_steps(train, len(batches), dist.world)})
        val_path = data_dir / "val.jsonl"
        val_batches = prepare_batches(tokenizer, read_jsonl(val_path), train, policy) if val_path.exists() else []
        model = build_model(base_path, train, device, dtype, tokenizer, new_ids)
        if train.init_path:
            say(f"warm start: {load_init_adapter(model, Path(train.init_path))} adapter tensors of {train.init_path}")
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
        tracker = Tracker(environment().mlflow_run_id, enabled=dist.is_main)
        # The settings as the run recorded them (train.max_steps as set; the steps trained are a metric).
        tracker.start(configured, {"padding_fraction": pad_frac, "train_steps": train.max_steps})
        try:
            state = train_loop(
                model, batches, train, device, say, dtype=loop_dtype(train, dtype), dist=dist, checkpoints=checkpoints,
                state=state, optimizer=opt, tracker=tracker,
            )
            if train.save_steps and state.step % train.save_steps:
                checkpoints.save(model, opt, state, dist)  # the final state: a re-run with the same settings is a no-op
            if dist.sharded:  # gather the trained weights into one whole model on rank 0
                whole = trainable_state(model, sharded=True)
                model = build_model(base_path, train, device, dtype, tokenizer, new_ids) if dist.is_main else model
                if dist.is_main:
                    named = dict(model.named_parameters())
                    for name, value in whole.items():
                        named[name].data.copy_(value)
            val_loss = evaluate_loss(CausalLMLoss(model), val_batches, device, loop_dtype(train, dtype)) if dist.is_main else None
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
                save_model(model, tokenizer, out, params, base_path, summary, train.merge_adapter, state.history,
                           new_ids)
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
