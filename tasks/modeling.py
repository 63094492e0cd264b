"""Loading models and turning chat messages into tokens, shared by training, evaluation and serving.

Training, evaluation and the BentoML service all format prompts through this module, so
the text a model is trained on and the text it is served with cannot drift apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import ModelParams

Message = dict[str, Any]

def tiny_cache() -> Path:
    """Where built tiny base models are cached: artifacts/base of the project (git-ignored)."""
    return Path(os.environ.get("FTLLM_ROOT", ".")) / "artifacts" / "base"


def resolve_base(model: ModelParams, cache_dir: Path | None = None) -> str:
    """Return what `from_pretrained` should load for `model.base`.

    "tiny" is built (once, then cached) under `cache_dir`; anything else is passed on as a
    Hugging Face model id or a local directory.
    """
    if model.base != "tiny":
        return model.base
    from tasks.tiny import build_tiny

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
    """Load a fine-tuned model folder written by `tasks.finetune`: (model, tokenizer, info).

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


def render_prompt(tokenizer, messages: list[Message]) -> str:
    """The text the model continues: every message, then the assistant's turn opened."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The messages before the last assistant answer (what a model is asked)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def reference_answer(messages: list[Message]) -> str:
    """The last assistant answer of an example (what a model should say)."""
    return [m for m in messages if m["role"] == "assistant"][-1]["content"]


@dataclass(frozen=True)
class Encoded:
    """One example as token ids with a loss mask (1 where the token is trained on)."""

    input_ids: list[int]
    loss_mask: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(self.loss_mask)


def encode_chat(tokenizer, messages: list[Message], train_on_prompt: bool = False) -> Encoded:
    """Tokenize a conversation with the chat template, marking the assistant tokens.

    Each assistant turn is located by rendering the conversation up to it with the
    generation prompt; the template must render a prefix of the conversation as a prefix
    of the text (ChatML and Llama/Mistral templates do).
    """
    ids: list[int] = []
    mask: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if message["role"] == "assistant":
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            prompt_part, answer_part = head[len(rendered):], upto[len(head):]
        else:
            prompt_part, answer_part = upto[len(rendered):], ""
        p_ids = tokenizer.encode(prompt_part, add_special_tokens=False) if prompt_part else []
        a_ids = tokenizer.encode(answer_part, add_special_tokens=False) if answer_part else []
        ids += p_ids + a_ids
        mask += [1 if train_on_prompt else 0] * len(p_ids) + [1] * len(a_ids)
        rendered = upto
    return Encoded(ids, mask)


def count_tokens(tokenizer, messages: list[Message]) -> tuple[int, int]:
    """(total tokens, assistant tokens) of a conversation under the chat template."""
    enc = encode_chat(tokenizer, messages)
    return len(enc.input_ids), enc.trained_tokens
