"""Where training starts and how long it runs: the champion's adapter (warm start), steps scaled to the data.

`train.init_from: champion` continues the champion's LoRA adapter instead of a fresh one:
the run downloads the champion's model folder and names it in `train.init_path`
(`tasks.pipeline.warm_start`), prepare keeps the feedback and a replay sample of the rest
(`tasks.data.sources.select_replay`), and `load_init_adapter` puts the champion's adapter
weights (and the modules it trains in full) into the freshly wrapped model before the first
step. The optimizer state starts anew: the champion's was not kept.

`train.epochs`, when set, replaces the fixed `train.max_steps` with passes over the train
split, so a small warm-start split gets few steps and a grown data set more.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tasks.config import TrainParams
from tasks.errors import ConfigError


def scaled_steps(train: TrainParams, batches: int, world: int = 1) -> int:
    """Optimizer steps of the run: `train.max_steps`, or `train.epochs` passes over `batches` micro-batches.

    One optimizer step consumes `world * grad_accum` micro-batches.
    """
    if train.epochs is None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * batches / (world * train.grad_accum)))


def load_init_adapter(model, init_dir: Path) -> int:
    """Load the adapter of the model folder `init_dir` into `model` (a peft model of the same LoRA shape).

    Returns:
        The number of tensors loaded.

    Raises:
        ConfigError: the folder holds no adapter (full weights, or nothing), or its adapter does
            not fit this run's LoRA settings or tokenizer.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    init_dir = Path(init_dir)
    info_path, weights = init_dir / "ftllm_model.json", init_dir / "adapter" / "adapter_model.safetensors"
    if not info_path.is_file() or json.loads(info_path.read_text()).get("kind") != "adapter" or not weights.is_file():
        raise ConfigError(f"train.init_from=champion: {init_dir} holds no LoRA adapter to continue (a full model, or "
                          "no model folder); set train.init_from=base")
    if not hasattr(model, "peft_config"):
        raise ConfigError("train.init_from=champion continues a LoRA adapter; with train.method=full set train.init_from=base")
    state = load_file(str(weights))
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # a size mismatch: another lora_r, target modules or vocabulary
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"train.init_from=champion: the champion's adapter ({init_dir}) does not fit this run's "
                          f"train.lora_* settings or tokenizer ({first}); set train.init_from=base") from None
    if result.unexpected_keys:
        raise ConfigError(f"train.init_from=champion: the champion's adapter ({init_dir}) has weights this run's "
                          f"train.lora_* settings do not ({result.unexpected_keys[0]}, ...); set train.init_from=base")
    return len(state)
