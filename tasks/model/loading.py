"""Loading base models, tokenizers and fine-tuned model folders.

Everything loads from safetensors through `from_pretrained`, never running code shipped
with a checkpoint. `model.base: tiny` is built locally (`tasks.model.tiny`) and cached.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.config import ModelParams
from tasks.environment import environment


def tiny_cache() -> Path:
    """Where built tiny base models are cached: artifacts/base of the project (git-ignored)."""
    return (environment().root or Path(".")) / "artifacts" / "base"


def resolve_base(model: ModelParams, cache_dir: Path | None = None) -> str:
    """Return what `from_pretrained` should load for `model.base`.

    "tiny" is built (once, then cached) under `cache_dir`; anything else is passed on as a
    Hugging Face model id or a local directory.
    """
    if model.base != "tiny":
        return model.base
    from tasks.model.tiny import build_tiny

    cache_dir = cache_dir or tiny_cache()
    name = f"tiny-s{model.seed}-h{model.tiny_hidden_size}-l{model.tiny_layers}-a{model.tiny_heads}"
    out = build_tiny(
        cache_dir.resolve() / name, model.seed, model.tiny_hidden_size, model.tiny_layers, model.tiny_heads
    )
    return str(out)


def load_tokenizer(path: str):
    """Load a tokenizer that has a chat template and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; use a chat/instruct model as model.base")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype=None, device: str | None = None, quantization_config=None):
    """Load a causal LM from safetensors, never running code shipped with the checkpoint."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device and quantization_config is None:
        model.to(device)
    return model


def load_trained(model_dir: Path, dtype=None, device: str | None = None):
    """Load a fine-tuned model folder written by `tasks.train.finetune`: (model, tokenizer, info).

    The folder is self-describing: `ftllm_model.json` says whether it holds an adapter or
    full weights, and which base the adapter belongs to.
    """
    info = json.loads((model_dir / "ftllm_model.json").read_text())
    tokenizer = load_tokenizer(str(model_dir))
    if info["kind"] == "adapter":
        from peft import PeftModel

        base_path = info["base_path"]
        if (model_dir / "base").is_dir():  # a packaged model carries its base beside the adapter
            base_path = str(model_dir / "base")
        elif not Path(base_path).exists() and info.get("base") == "tiny":
            # The tiny base is rebuilt from its seed where the folder is not on this machine.
            base_path = resolve_base(ModelParams(**info["model_params"]))
        base = load_causal_lm(base_path, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(model_dir / "adapter"))
    else:
        model = load_causal_lm(str(model_dir / "weights"), dtype=dtype, device=device)
    model.eval()
    return model, tokenizer, info
