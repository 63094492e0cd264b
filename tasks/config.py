"""Settings of the pipeline: `params.yaml` validated into frozen pydantic models.

Every stage reads its settings through `load_params`, so that a bad key fails in one
place with a message that names it. `--set section.key=value` overrides are applied on
top of the file before validation.

The first DVC stage (`python -m tasks.stages.resolve`) writes a run's resolved settings;
overrides for that run come from the environment variable `FTLLM_OVERRIDES` (a JSON
object of dotted keys), so that `dvc repro` sees them without `params.yaml` being edited.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.environment import environment
from tasks.errors import ConfigError
from tasks.files import file_md5, write_atomic

OVERRIDES_ENV = "FTLLM_OVERRIDES"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataParams(_Section):
    path: str = Field("data/dates.jsonl", description="Training data file (JSONL or JSON array).")
    format: Literal["auto", "openai", "alpaca", "sharegpt"] = Field(
        "auto", description="Input format; auto detects it from the first example."
    )
    max_tokens: int = Field(128, ge=8, le=131072, description="Token limit per example, chat template included.")
    length_policy: Literal["drop", "truncate"] = Field(
        "drop", description="What prepare does with examples over max_tokens."
    )
    max_drop_fraction: float = Field(0.05, ge=0.0, le=1.0, description="Largest share of examples that may be dropped.")
    min_answer_chars: int = Field(2, ge=0, description="Answers shorter than this are reported as a warning.")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of examples in the validation split.")
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of examples in the test split.")
    md5: str | None = Field(
        None, description="Filled in by the resolve stage: the data file's md5, so DVC reruns when it changes."
    )


class ModelParams(_Section):
    base: str = Field("tiny", min_length=1, description='"tiny", a Hugging Face model id, or a local directory.')
    seed: int = Field(1234, ge=0, description="Seed of the tiny base model's weights.")
    tiny_hidden_size: int = Field(128, ge=16, le=4096, description="Hidden size of the tiny base model.")
    tiny_layers: int = Field(2, ge=1, le=64, description="Decoder layers of the tiny base model.")
    tiny_heads: int = Field(4, ge=1, le=64, description="Attention heads of the tiny base model.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelParams":
        if self.tiny_hidden_size % self.tiny_heads:
            raise ValueError(
                f"tiny_hidden_size ({self.tiny_hidden_size}) must be a multiple of tiny_heads ({self.tiny_heads})"
            )
        return self


class TrainParams(_Section):
    method: Literal["lora", "qlora", "full"] = Field("lora", description="lora, qlora (CUDA only) or full.")
    learning_rate: float = Field(0.004, ge=0.0, le=1.0, description="Peak learning rate.")
    max_steps: int = Field(300, ge=1, le=10_000_000, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=4096, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, ge=8, le=131072, description="Tokens per (packed) sequence.")
    warmup_steps: float = Field(0.05, ge=0.0, description="Warm-up steps; a float below 1 is a share of max_steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Floor of the cosine decay, as a share of the peak learning rate.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradients are clipped to this global L2 norm before each step.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = Field(42, ge=0, description="Seed of data order, dropout and adapter initialisation.")
    packing: bool = Field(True, description="Pack examples into seq_len sequences (attention kept per example).")
    attention: Literal["packed", "mask"] = Field(
        "packed",
        description="packed: causal attention per example (flash varlen on CUDA, SDPA per example elsewhere); "
        "mask: SDPA with a block-diagonal mask over the whole row.",
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: str = Field("all-linear", description='"all-linear" or comma-separated module names.')
    lora_modules_to_save: str = Field(
        "embed_tokens,lm_head", description="Comma-separated modules trained in full beside the adapter."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 where the GPU supports it.")
    gradient_checkpointing: bool = False
    save_steps: int = Field(100, ge=0, description="Checkpoint every N steps; 0 never.")
    keep_checkpoints: int = Field(2, ge=1, le=100)
    num_processes: int = Field(1, ge=1, le=1024, description="More than 1 runs the stage under torchrun.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes > 1: ddp (a full copy per process) or fsdp (weights sharded, FSDP2)."
    )
    merge_adapter: bool = Field(False, description="Also write the adapter merged into the base weights.")
    log_every: int = Field(10, ge=1)


class EvalParams(_Section):
    task: Literal["generation", "classification"] = "generation"
    max_examples: int = Field(200, ge=1, description="Test examples scored per model.")
    few_shot_k: int = Field(3, ge=0, le=64, description="Train examples shown before each prompt (few-shot baseline).")
    max_new_tokens: int = Field(24, ge=1, le=8192)
    batch_size: int = Field(32, ge=1, le=4096)


class GateParams(_Section):
    min_exact_match: float = Field(0.7, ge=0.0, le=1.0, description="Lowest exact match of the candidate.")
    max_perplexity: float = Field(3.0, gt=0.0, description="Highest perplexity on assistant tokens.")
    min_gain_over_prompting: float = Field(
        0.1, ge=-1.0, le=1.0, description="Exact match above the best prompting baseline."
    )
    max_regression: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Largest drop against the champion (absolute for scores in [0, 1], relative for perplexity) "
                    "that the gate tolerates; a check fails only when the drop is larger at gate.confidence.",
    )
    max_p95_latency_ms: float = Field(5000, gt=0, description="Highest p95 latency per example.")
    confidence: float = Field(
        0.95, ge=0.5, lt=1.0,
        description="Coverage of the paired confidence intervals (candidate - champion) the gate decides on.",
    )
    bootstrap_resamples: int = Field(
        5000, ge=200, le=200_000, description="Resamples of the paired bootstrap (fixed seed: same scores, same verdict).",
    )
    require_improvement: bool = Field(
        False, description="Also demand a significant gain in exact match over the champion (interval above 0).",
    )


class RegistryParams(_Section):
    model_name: str = Field("ftllm-chat", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    auto_promote: bool = Field(True, description="A run that passes the gate becomes champion by itself.")


class ServingParams(_Section):
    max_tokens: int = Field(256, ge=1, le=32768)
    max_messages: int = Field(64, ge=1, le=10_000)
    max_request_bytes: int = Field(65536, ge=256, le=64 * 1024 * 1024)
    max_concurrency: int = Field(64, ge=1, le=100_000)
    reload_seconds: float = Field(10, gt=0)


class ScheduleParams(_Section):
    cron: str = Field("0 3 * * 1", description="Cron expression of scheduled retraining.")
    timezone: str = "UTC"
    active: bool = False


class WorkersParams(_Section):
    train_deployment: str | None = Field(
        None, pattern=r"^[^/\s]+/[^/\s]+$",
        description="Prefect deployment (flow/name, e.g. finetune/ftllm-gpu) that runs the finetune stage on "
                    "a training worker; none: in this run's own process.",
    )
    train_start_timeout_seconds: float = Field(
        900, gt=0, description="How long the training may wait for a worker to start it before the run fails.",
    )


class MonitorParams(_Section):
    window: int = Field(
        200, ge=1, le=1_000_000,
        description="Latest ratings the mean rating is taken over, and latest interactions whose prompts are "
                    "compared with the training data.",
    )
    min_ratings: int = Field(20, ge=1, description="Fewest new ratings the mean rating is judged on.")
    min_mean_rating: float = Field(
        3.5, ge=1.0, le=5.0, description="Retraining is recommended when the mean of the new ratings falls below this.",
    )
    min_new_corrections: int = Field(
        50, ge=1, description="Retraining is recommended once this many corrected answers came in since the last time.",
    )
    max_prompt_length_drift: float = Field(
        0.5, gt=0.0, description="Relative change of the mean prompt length (tokens) against the train split that "
                                 "is reported as drift.",
    )
    max_unknown_token_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of prompt tokens never seen in the train split that is reported as drift.",
    )
    cron: str = Field("0 * * * *", description="Cron expression of the monitor deployment (timezone: schedule.timezone).")
    active: bool = Field(False, description="true: the monitor deployment's schedule is on when deployed.")
    retrain: bool = Field(
        True, description="true: the automation starts the retrain deployment when the monitor recommends it.",
    )


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    schedule: ScheduleParams = ScheduleParams()
    workers: WorkersParams = WorkersParams()
    monitor: MonitorParams = MonitorParams()

    def digest(self) -> str:
        """A short hash of every setting, recorded with the models it produced."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `KEY=VALUE` strings into a dict of dotted keys; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=100")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides applied; unknown sections are refused."""
    merged = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if len(parts) != 2 or parts[0] not in Params.model_fields:
            sections = ", ".join(Params.model_fields)
            raise ConfigError(f"--set {dotted}: expected section.key with a section among {sections}")
        section = merged.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section {parts[0]!r} must be a mapping")
        section[parts[1]] = value
    return merged


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against params.yaml"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def load_params(path: Path | str = "params.yaml", overrides: dict[str, Any] | None = None,
                sections: tuple[str, ...] | None = None) -> Params:
    """Read, override and validate the settings.

    Args:
        path: the YAML settings file.
        overrides: dotted keys to values, applied on top of the file.
        sections: validate only these top-level sections (the others take their defaults);
            for a reader that uses a few of them, such as the service.

    Raises:
        ConfigError: the file is missing or malformed, or a key is unknown or out of range.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found; pass --params FILE or run from the project root") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or {}, str(path))
    if sections is not None:
        raw = {name: value for name, value in raw.items() if name in sections}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path))) from None


def overrides_from_env() -> dict[str, Any]:
    """Overrides handed to DVC stages by the flow, as a JSON object in FTLLM_OVERRIDES."""
    text = environment().overrides.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{OVERRIDES_ENV}: not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{OVERRIDES_ENV}: expected a JSON object of dotted keys")
    return value


def write_resolved(params: Params, out: Path) -> Path:
    """Write the settings a run uses, plus the data file's md5 so DVC reruns when the data changes."""
    doc = params.model_dump(mode="json")
    data_path = Path(params.data.path)
    doc["data"]["md5"] = file_md5(data_path) if data_path.is_file() else None
    return write_atomic(out, yaml.safe_dump(doc, sort_keys=False))

