"""Loading base models, tokenizers and fine-tuned model folders.

Everything loads from safetensors through `from_pretrained`, never running code shipped
with a checkpoint. `model.base: tiny` is built locally (`tasks.model.tiny`) and cached.

A run's base tokenizer always comes from `load_base_tokenizer`, which applies
`model.chat_template` (the model's own template, ChatML, or a Jinja file), makes the
tokenizer's eos the token the template ends a turn with, and gives it a pad token that is
not that end-of-turn token. Tokens it adds (ChatML's on a base model, a pad token) get
rows in the embeddings through `grow_embeddings`, initialised deterministically, so a
trained adapter finds the same base rows on every machine that loads it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from tasks.config import ModelParams, Params
from tasks.environment import environment
from tasks.errors import ConfigError, DataFileError
from tasks.model.tiny import CHAT_TEMPLATE as CHATML_TEMPLATE

# peft reads transformers' deprecated `is_gradient_checkpointing` every time it wraps a model,
# which printed a FutureWarning no user can act on at every load of every run and service.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|pad|>"


def tiny_cache() -> Path:
    """Where built tiny base models are cached: artifacts/base of the project (git-ignored)."""
    return (environment().root or Path(".")) / "artifacts" / "base"


def resolve_base(model: ModelParams, cache_dir: Path | None = None) -> str:
    """Return what `from_pretrained` should load for `model.base`.

    "tiny" is built (once, then cached) under `cache_dir`; anything else must be a local
    model folder or a Hugging Face model id (`check_base` says which cannot load).

    Raises:
        ConfigError: `model.base` is neither a model folder nor loadable from the hub or its cache.
    """
    if model.base != "tiny":
        check_base(model.base)
        return model.base
    from tasks.model.tiny import build_tiny, tokenizer_digest

    cache_dir = cache_dir or tiny_cache()
    # The tokenizer's digest (template, corpus, vocabulary) is in the name: a folder cached
    # before any of them changed is not reused.
    name = f"tiny-s{model.seed}-h{model.tiny_hidden_size}-l{model.tiny_layers}-a{model.tiny_heads}-t{tokenizer_digest()}"
    out = build_tiny(
        cache_dir.resolve() / name, model.seed, model.tiny_hidden_size, model.tiny_layers, model.tiny_heads
    )
    return str(out)


def check_base(base: str) -> None:
    """Refuse, before any work, a `model.base` that `from_pretrained` cannot load here.

    A local folder must hold a `config.json`. A model id must be in the Hugging Face cache
    when the hub is offline (HF_HUB_OFFLINE=1); online, `from_pretrained` downloads it.

    Raises:
        ConfigError: one line naming `model.base`, why, and how to fetch the model.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.base={base}: the folder has no config.json; point model.base at a saved Hugging Face model folder"
            )
        return
    if base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ConfigError(f"model.base={base}: no such folder; point model.base at a model folder or a Hugging Face model id")
    try:
        cached = try_to_load_from_cache(base, "config.json")
    except HFValidationError:
        raise ConfigError(
            f"model.base={base}: neither a local folder nor a Hugging Face model id (owner/name); fix model.base"
        ) from None
    if not isinstance(cached, str) and constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"model.base={base}: neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"fetch it on a machine with network (`hf download {base}`) and copy the cache here or set HF_HOME "
            "to a cache that holds it, or point model.base at a model folder"
        )


def check_fit(params: Params, base_path: str | None = None, root: Path | None = None) -> None:
    """Refuse, before any work, settings that the base model cannot run; the message names the key.

    Checks that `model.base` loads (`check_base`) and transformers reads its config, that a
    `model.chat_template` file exists, that `train.method: qlora` has a CUDA GPU (unless a GPU
    worker trains: `workers.train_deployment`), that the data files exist (given `root`, the
    folder paths are relative to; a feedback source's file is the run's export), that a training row and a prompt plus its answer
    at evaluation (`data.max_tokens + eval.max_new_tokens`) fit the model's context, and that
    `train.attention: packed` is not asked of a model whose attention it would change (a
    sliding window shorter than a row, soft-capped attention logits; `auto` picks the mask
    for those), and that `train.lora_target_modules` names layers of the model LoRA adapts.

    Raises:
        ConfigError: naming the key to change and the limit.
    """
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base_path or resolve_base(params.model))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.base={params.model.base}: transformers cannot read its config.json "
                          f"({str(exc).splitlines()[0]}); point model.base at a saved model folder") from None
    template = params.model.chat_template
    if template not in ("auto", "chatml") and not Path(template).is_file():
        raise ConfigError(f"model.chat_template={template}: no such file; give the path of a Jinja file, or auto / chatml")
    if params.train.method == "qlora" and params.workers.train_deployment is None:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.method=qlora needs a CUDA GPU and the bitsandbytes package (4-bit NF4); use "
                              "train.method=lora on this machine, or train on a GPU worker (workers.train_deployment)")
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    data, train, evaluation = params.data, params.train, params.eval
    if context:
        if train.seq_len > context:
            raise ConfigError(
                f"train.seq_len={train.seq_len} is longer than the context of the base model "
                f"(max_position_embeddings={context}); lower train.seq_len to at most {context}"
            )
        if data.max_tokens + evaluation.max_new_tokens > context:
            raise ConfigError(
                f"data.max_tokens={data.max_tokens} plus eval.max_new_tokens={evaluation.max_new_tokens} is longer "
                f"than the context of the base model ({context} tokens); lower data.max_tokens or eval.max_new_tokens"
            )
    inexact = packed_attention_differs(cfg, train.seq_len)
    if train.attention == "packed" and inexact:
        raise ConfigError(f"train.attention=packed {inexact}; use train.attention=mask (or auto)")
    if train.method != "full" and train.lora_target_modules != "all-linear":
        check_lora_targets(cfg, train.lora_target_modules)
    for i, source in enumerate(params.data.source_list() if root is not None else []):
        path = Path(source.file) if Path(source.file).is_absolute() else root / source.file
        if not source.feedback and not path.is_file():
            key = f"data.sources[{i}].path" if params.data.sources else "data.path"
            raise DataFileError(f"{path}: data file not found; check {key}")


def check_lora_targets(cfg, targets: str) -> None:
    """Refuse `train.lora_target_modules` names that match no layer LoRA can adapt in this model.

    peft matches a name to a module whose dotted name is it or ends with `.name`. The model is
    built from its config on the meta device (no weights, well under a second); a config that
    cannot be built so is left to peft.

    Raises:
        ConfigError: naming the unmatched names and the model's adaptable layer names.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # The layers peft's LoRA adapts (it tests with isinstance: Falcon's FalconLinear is a Linear);
    # a name that matches any other module is refused by peft at training.
    adapts = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D,
              torch.nn.MultiheadAttention)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - an architecture transformers builds only from weights: peft checks at training
        return
    modules = [(name, module) for name, module in model.named_modules() if name]
    adaptable = sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, adapts)})
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    matched = {t: [m for name, m in modules if name == t or name.endswith("." + t)] for t in wanted}
    unknown = [t for t in wanted if not matched[t]]
    unfit = [t for t in wanted if any(not isinstance(m, adapts) for m in matched[t])]
    if unknown:
        what = f"no module of this model is called {' or '.join(unknown)}"
    elif unfit:
        found = sorted({type(m).__name__ for t in unfit for m in matched[t] if not isinstance(m, adapts)})
        what = f"{', '.join(unfit)}: {', '.join(found)}, not a layer LoRA adapts"
    elif not wanted:
        what = "no module named"
    else:
        return
    raise ConfigError(f"train.lora_target_modules={targets}: {what}; name some of {', '.join(adaptable)}, "
                      "or use all-linear")


def packed_attention_differs(cfg, seq_len: int) -> str | None:
    """How causal attention per packed example would differ from the model's own, or None where it is exact.

    Packed attention attends over the whole example: a sliding window shorter than a row
    would be ignored, and so would soft-capped attention logits (Gemma 2).
    """
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) is not False and seq_len > window:
        return (f"ignores the sliding window of {cfg.model_type} ({window} tokens), shorter than "
                f"train.seq_len={seq_len}; lower train.seq_len to {window}")
    if getattr(cfg, "attn_logit_softcapping", None):
        return f"does not soft-cap attention logits as {cfg.model_type} does (attn_logit_softcapping)"
    return None


def resolve_attention(setting: str, cfg, seq_len: int) -> str:
    """The attention a run trains with, `packed` or `mask`: `train.attention` as set, or for `auto`
    packed where it is exact (no dense mask, no compute between examples) and the mask otherwise."""
    if setting != "auto":
        return setting
    return "mask" if packed_attention_differs(cfg, seq_len) else "packed"


def apply_chat_template_setting(tokenizer, setting: str) -> list[str]:
    """Give `tokenizer` the chat template `model.chat_template` asks for; the tokens it had to add.

    auto: keep the model's own template; a model without one (a base model) gets ChatML.
    chatml: ChatML whatever the model has. Anything else: the path of a Jinja file.
    ChatML's `<|im_start|>`/`<|im_end|>` are added as special tokens where missing.

    Raises:
        ConfigError: the Jinja file cannot be read.
    """
    if setting not in ("auto", "chatml"):
        try:
            tokenizer.chat_template = Path(setting).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"model.chat_template={setting}: cannot read the template ({exc.strerror}); give the path of a "
                "Jinja file, or auto / chatml"
            ) from None
        return []
    if setting == "auto" and tokenizer.chat_template is not None:
        return []
    tokenizer.chat_template = CHATML_TEMPLATE
    return _add_special(tokenizer, CHATML_TOKENS)


def _add_special(tokenizer, tokens: tuple[str, ...]) -> list[str]:
    from tokenizers import AddedToken

    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with (None if it uses none).

    The first of `tasks.model.chat.end_of_turn_ids`: the same tokens that training masks in
    with each answer, so generation stops where the model learnt to stop.
    """
    from tasks.model.chat import end_of_turn_ids

    ends = end_of_turn_ids(tokenizer)
    return tokenizer.convert_ids_to_tokens(ends[0]) if ends else None


def settle_special_tokens(tokenizer) -> list[str]:
    """Make eos the end-of-turn token and give the tokenizer a pad token that is not it; tokens added.

    Evaluation and serving stop generating at `tokenizer.eos_token_id`: a template that ends
    turns with another token (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, ChatML on a base
    model) would otherwise never stop. The pad token must differ from the end-of-turn
    token: padding is dropped from attention and may be treated as a stop, and a model
    taught to end on its pad token is taught to end on padding. So pad is, in order, the
    model's own pad, its unk token, or a dedicated `<|pad|>` (one new embedding row, never
    trained on: padding is masked out of the attention and the loss).
    """
    end = end_of_turn_token(tokenizer)
    if end is not None and end != tokenizer.eos_token:
        tokenizer.eos_token = end
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return []
    if tokenizer.unk_token is not None and tokenizer.unk_token != tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.unk_token
        return []
    added = _add_special(tokenizer, (PAD_TOKEN,))
    tokenizer.pad_token = PAD_TOKEN
    return added


def load_base_tokenizer(model: ModelParams, base_path: str | None = None):
    """The tokenizer of a run's base model, with the run's chat template, eos and pad token.

    Every step that tokenizes for a run (validation, prepare, finetune, the base
    baselines of evaluate) loads it here, so they all render the same text.

    Args:
        model: the run's model settings (`model.base`, `model.chat_template`).
        base_path: `resolve_base(model)` where the caller has it already.

    Raises:
        ConfigError: the base model or the chat template file cannot be loaded.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path or resolve_base(model))
    apply_chat_template_setting(tokenizer, model.chat_template)
    settle_special_tokens(tokenizer)
    return tokenizer


def added_token_ids(tokenizer, base_path: str) -> list[int]:
    """Ids of the tokens `load_base_tokenizer` added to the base model's own tokenizer."""
    from transformers import AutoTokenizer

    return list(range(len(AutoTokenizer.from_pretrained(base_path)), len(tokenizer)))


def grow_embeddings(model, tokenizer, new_ids: list[int]) -> None:
    """Give the tokens `new_ids` embedding rows, set to the mean of the base tokenizer's own rows.

    Rows are added where the model has fewer than the tokenizer's size; some models have
    spare rows already (Qwen, Phi-3), which are overwritten. Added tokens take the ids
    after the base tokenizer's, so its own rows are those below the first new id; spare
    rows are left out of the mean. The mean, not a random draw: the rows come out the same
    on every load, so an adapter that trained only some of them (or none, like the pad
    row) loads onto the same base it was trained on.
    """
    import torch

    if not new_ids:
        return
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    own = min(new_ids)
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    with torch.no_grad():
        for layer in {id(w.weight): w for w in layers if w is not None}.values():
            layer.weight[new_ids] = layer.weight[:own].mean(0)


def load_base_model(model: ModelParams, tokenizer, base_path: str | None = None, dtype=None, device: str | None = None):
    """The run's base model, with embedding rows for the tokens its tokenizer gained (eval mode)."""
    base_path = base_path or resolve_base(model)
    lm = load_causal_lm(base_path, dtype=dtype, device=device)
    grow_embeddings(lm, tokenizer, added_token_ids(tokenizer, base_path))
    stop_at_eos(lm, tokenizer)
    return lm.eval()


def stop_at_eos(model, tokenizer) -> None:
    """Make `model.generate` stop at the tokenizer's eos and pad with its pad token, as serving does."""
    stops = model.generation_config.eos_token_id
    stops = list(stops) if isinstance(stops, (list, tuple)) else [stops] if stops is not None else []
    if tokenizer.eos_token_id not in stops:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(path: str):
    """Load the tokenizer of a trained model folder (it carries its chat template and pad token).

    Raises:
        ConfigError: the tokenizer has no chat template.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise ConfigError(
            f"{path}: the tokenizer has no chat template; load a base model with load_base_tokenizer "
            "(model.chat_template) or save the tokenizer with its template"
        )
    if tok.pad_token is None:
        settle_special_tokens(tok)
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
    full weights, which base the adapter belongs to, and which tokens training added to
    the base tokenizer (their rows are grown here exactly as they were for training).
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
        grow_embeddings(base, tokenizer, info.get("added_token_ids", []))
        model = PeftModel.from_pretrained(base, str(model_dir / "adapter"))
    else:
        model = load_causal_lm(str(model_dir / "weights"), dtype=dtype, device=device)
    stop_at_eos(model, tokenizer)
    model.eval()
    return model, tokenizer, info
