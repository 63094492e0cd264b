"""Settings of the pipeline: `params.yaml` validated into frozen pydantic models.

Every stage reads its settings through `load_params`, so that a bad key fails in one
place with a message that names it and its line. `--set section.key=value` overrides are
applied on top of the file before validation. A contradiction between settings (of one
section or of two) is a validator of these models, so it fails there too (exit 2).

The first DVC stage (`python -m tasks.stages.resolve`) writes a run's resolved settings;
overrides for that run come from the environment variable `FTLLM_OVERRIDES` (a JSON
object of dotted keys), so that `dvc repro` sees them without `params.yaml` being edited.

`params.yaml` is the user's file. The models hold the defaults and the descriptions:
`ftllm params --check params.yaml` validates a file and lists what differs from the
defaults (`check_params`); `ftllm params --write params.yaml` rewrites it with every
field's description as its comment and the keys it lacks at their defaults, keeping the
values it has (`write_params`). The module is long but cohesive: every section's model (and
a source of `data.sources`) lives here, next to the reading and rendering of params.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tasks.environment import environment
from tasks.errors import ConfigError
from tasks.files import file_md5, write_atomic

OVERRIDES_ENV = "FTLLM_OVERRIDES"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1: `max_steps: true` trained one step
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{str(value).lower()} is a boolean; give a number")
        return value


def checked_cron(expression: str, default: str) -> str:
    """`expression` if Prefect reads it as a cron schedule (what `ftllm deploy` builds from it).

    Prefect is imported only for a value other than the default, so reading the default
    settings stays light.

    Raises:
        ValueError: what Prefect says is wrong with it.
    """
    if expression != default:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=expression)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return expression


FEEDBACK_SNAPSHOT = "data/feedback.jsonl"


class SourceParams(_Section):
    """One data source of `data.sources`: a file, or the service's feedback (`feedback: true`)."""

    path: str | None = Field(
        None, description=f"The data file; for a feedback source, where the run writes its export ({FEEDBACK_SNAPSHOT}).",
    )
    format: Literal["auto", "openai", "alpaca", "sharegpt"] | None = Field(
        None, description="The file's format; none: data.format.",
    )
    weight: float | None = Field(
        None, gt=0.0, le=100.0,
        description="Each example counts this many times in the train split (2: twice; 0.5: a deterministic half "
                    "of the source is kept); val, test and feedback splits hold an example once. Default 1.",
    )
    cap: int | None = Field(None, ge=1, description="At most this many examples of the source (a deterministic sample).")
    feedback: bool = Field(
        False, description="The service's rated and corrected answers (FTLLM_FEEDBACK_DB, else feedback.db beside "
                           "params.yaml), exported by the run to `path`.",
    )
    min_rating: int = Field(4, ge=1, le=5, description="Feedback source: uncorrected answers rated at least this are kept.")
    invalid_rows: Literal["fail", "drop"] = Field(
        "fail", description="fail: an invalid row fails the run; drop: invalid rows are left out and reported, up to "
                            "max_invalid_share of the source's rows. A feedback source drops unless set: a served "
                            "conversation the settings cannot train (over data.max_tokens, two user turns in a row) "
                            "stays in the log, and must not fail every run that reads it.",
    )
    max_invalid_share: float = Field(
        0.01, ge=0.0, le=1.0, description="With invalid_rows: drop, the largest share of invalid rows a source may "
                                          "have (a feedback source: 1.0 unless set).",
    )
    md5: str | None = Field(None, description="Filled in by the resolve stage: the file's md5.")

    @model_validator(mode="before")
    @classmethod
    def _feedback_drops(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("feedback") is True:
            data = {"invalid_rows": "drop", "max_invalid_share": 1.0, **data}
        return data

    @model_validator(mode="after")
    def _one_of_weight_or_cap(self) -> "SourceParams":
        if self.weight is not None and self.cap is not None:
            raise ValueError("set weight or cap, not both")
        if self.path is None and not self.feedback:
            raise ValueError("a source needs a path (or feedback: true)")
        return self

    @property
    def file(self) -> str:
        """The file the source is read from (a feedback source's export)."""
        return self.path or FEEDBACK_SNAPSHOT


class DataParams(_Section):
    path: str = Field(
        "data/dates.jsonl",
        description="Training data (JSONL or JSON array), under data/ (tracked by data.dvc): the one source when "
                    "data.sources is empty, else the path of its first source.",
    )
    sources: list[SourceParams] = Field(
        [],
        description="Several sources merged (deduplicated, first source first; corrections from feedback replace "
                    "the answers of the same prompt), each {path, format, weight or cap, invalid_rows, "
                    "max_invalid_share} or {feedback: true}; empty: data.path alone.",
    )
    feedback: bool = Field(
        True,
        description="The service's rated and corrected answers join every run: exported before the stages and, when "
                    "the export holds any, added to the run's data.sources as {feedback: true} (recorded in its "
                    "settings). No feedback logged: the data is unchanged. A feedback source listed in data.sources "
                    "takes its place. false: runs never read feedback, and the monitor recommends no retraining.",
    )
    feedback_fraction: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of corrected prompts held out of training as the feedback split (stable hash of the "
                    "prompt), on which the gate checks the candidate does not regress against the champion.",
    )
    feedback_weight: float = Field(
        4.0, gt=0.0, le=100.0,
        description="Train copies of each example of a feedback source that sets no weight or cap of its own: the "
                    "few corrections of a round then count against the rest of the data (chosen by measurement: "
                    "benchmarks/bench_preference_defaults.py, figures in benchmarks/results/README.md).",
    )
    format: Literal["auto", "openai", "alpaca", "sharegpt"] = Field(
        "auto", description="auto | openai | alpaca | sharegpt; auto detects it from the first example."
    )
    max_tokens: int = Field(
        128, ge=8, le=131072,
        description="Token limit per example, counted with the run's tokenizer and chat template.",
    )
    length_policy: Literal["drop", "truncate"] = Field(
        "drop", description="drop | truncate: what prepare does with over-long examples (always reported)."
    )
    max_drop_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Validation fails when more than this share would be dropped."
    )
    min_answer_chars: int = Field(2, ge=0, description="Answers shorter than this are reported as a warning.")
    system_message: Literal["auto", "keep", "merge", "drop"] = Field(
        "auto",
        description="System messages: keep, merge (into the first user turn), drop, or auto (keep unless the chat "
        "template raises on them or loses them, then merge). Training, evaluation and serving render alike.",
    )
    val_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="Share of examples in the validation split (stable hash of the example)."
    )
    test_fraction: float = Field(
        0.1, gt=0.0, lt=0.5, description="Share of examples in the test split (stable hash of the example)."
    )
    md5: str | None = Field(
        None, description="Filled in by the resolve stage: the data file's md5, so DVC reruns when it changes."
    )

    @model_validator(mode="after")
    def _path_names_the_first_source(self) -> "DataParams":
        if self.sources and "path" in self.model_fields_set and self.path != self.sources[0].file:
            raise ValueError(
                f"data.path {self.path!r} and data.sources[0].path {self.sources[0].file!r} differ: with data.sources, "
                "data.path must be the path of the first source; set it so or leave data.sources empty"
            )
        return self

    def source_list(self) -> list[SourceParams]:
        """The sources of the run: `sources`, or `path` as the one source; a feedback source weighs `feedback_weight`."""
        return [s.model_copy(update={"weight": self.feedback_weight})
                if s.feedback and s.weight is None and s.cap is None and self.feedback_weight != 1 else s
                for s in self.sources] or [SourceParams(path=self.path, md5=self.md5)]

    def reads_feedback(self) -> bool:
        """Whether a run with these settings reads the service's feedback (a feedback source, or `feedback`)."""
        return self.feedback or any(s.feedback for s in self.sources)

    def sources_with_feedback(self) -> list[dict[str, Any]]:
        """`data.sources` as written, plus a feedback source: the override that adds the feedback to a run."""
        listed = [s.model_dump(mode="json", exclude_defaults=True, exclude={"md5"}) for s in self.source_list()]
        return [*listed, {"feedback": True}]


class ModelParams(_Section):
    base: str = Field(
        "tiny", min_length=1,
        description='"tiny" (built locally from model.seed), a Hugging Face model id, or a local directory.',
    )
    seed: int = Field(1234, ge=0, description="Seed of the tiny base model's weights.")
    tiny_hidden_size: int = Field(
        128, ge=16, le=4096, description="Hidden size of the tiny base model (only used when base is tiny)."
    )
    tiny_layers: int = Field(2, ge=1, le=64, description="Decoder layers of the tiny base model.")
    tiny_heads: int = Field(4, ge=1, le=64, description="Attention heads of the tiny base model.")
    chat_template: str = Field(
        "auto", pattern=r"^(auto|chatml|.+\.jinja)$",
        description="auto: the model's own chat template, ChatML for a model without one; chatml: ChatML "
        "always; or the path of a Jinja file. Tokens ChatML needs are added to the tokenizer and trained.",
    )
    chat_template_md5: str | None = Field(
        None, description="Filled in by the resolve stage: the md5 of a Jinja chat_template file, so DVC reruns "
        "prepare and finetune when the file changes.",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelParams":
        if self.tiny_hidden_size % self.tiny_heads:
            raise ValueError(
                f"model.tiny_hidden_size ({self.tiny_hidden_size}) must be a multiple of model.tiny_heads ({self.tiny_heads})"
            )
        return self


class TrainParams(_Section):
    method: Literal["lora", "qlora", "full"] = Field("lora", description="lora | qlora (CUDA only) | full.")
    learning_rate: float = Field(
        0.004, ge=0.0, le=1.0, description="Peak learning rate (linear warm-up, cosine decay)."
    )
    max_steps: int = Field(
        300, ge=1, le=10_000_000, description="Optimizer steps; benchmarks/results/ has how long the defaults take."
    )
    epochs: float | None = Field(
        None, gt=0.0, le=100_000.0,
        description="Passes over the train split; set, the steps are scaled to the data (epochs x optimizer steps per "
                    "pass) and replace max_steps; none: max_steps, whatever the data.",
    )
    init_from: Literal["base", "champion"] = Field(
        "base",
        description="base: train a fresh adapter on all the data; champion: continue the champion's adapter on the "
                    "feedback sources plus a replay sample of the others (train.replay_fraction); from the base while "
                    "there is no champion.",
    )
    replay_fraction: float = Field(
        0.25, ge=0.0, le=1.0,
        description="With train.init_from champion: the share of the non-feedback sources' train examples trained on "
                    "again (a stable sample), so the model keeps what it knew.",
    )
    init_path: str | None = Field(
        None, description="Filled in by the run with train.init_from champion: the champion's model folder.",
    )
    init_md5: str | None = Field(None, description="Filled in by the resolve stage: the md5 of init_path's adapter.")
    batch_size: int = Field(
        8, ge=1, le=4096, description="Sequences per micro-batch (packed sequences when packing is on)."
    )
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    seq_len: int = Field(256, ge=8, le=131072, description="Tokens per (packed) sequence.")
    warmup_steps: float = Field(0.05, ge=0.0, description="Warm-up steps; a float below 1 is a share of max_steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Floor of the cosine decay, as a share of the peak learning rate.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradients are clipped to this global L2 norm before each step.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay of the trained parameters.")
    seed: int = Field(42, ge=0, description="Seed of data order, dropout and adapter initialisation.")
    packing: bool = Field(True, description="Pack examples into seq_len sequences (attention kept per example).")
    attention: Literal["auto", "packed", "mask"] = Field(
        "auto",
        description="packed: causal attention per example (flash varlen on CUDA, SDPA per example elsewhere); "
        "mask: SDPA with a block-diagonal mask over the whole row; auto: packed where it is exact, mask for a "
        "model whose attention packed would change (a sliding window shorter than seq_len, soft-capped logits).",
    )
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens.")
    train_turns: Literal["all", "last"] = Field(
        "all", description="Assistant turns trained: all (tool calls included, weight 0 turns excepted) or the last one."
    )
    train_reasoning: bool = Field(
        True, description="Train reasoning traces (reasoning_content) as part of the answer; false leaves them out of the loss."
    )
    lora_r: int = Field(16, ge=1, le=1024, description="Rank of the LoRA update matrices.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling: the update is multiplied by lora_alpha / lora_r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    lora_target_modules: str = Field("all-linear", description='"all-linear" or comma-separated module names.')
    lora_modules_to_save: str = Field(
        "auto",
        description="Comma-separated modules trained in full beside the adapter (\"\" for none), or auto: "
        "embed_tokens,lm_head for the tiny model, only the rows of tokens added to the tokenizer for "
        "other models (none when nothing was added).",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto (bf16 on a GPU that supports it, else fp32) | bf16 | fp32."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory for one more forward pass."
    )
    trainable_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="fp32: the trained weights (adapter, modules to save) stay fp32 and the forward pass runs under "
                    "bf16 autocast; bf16 (lora only, needs a bf16 run): the trained weights are bf16 too and there "
                    "is no autocast (no casts, half the optimizer memory), but updates below bf16's resolution are lost.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (inductor); every batch is then padded to seq_len, so the "
                    "layers are compiled for a few shapes (full batches, the last one, validation), not one per "
                    "batch width. The first step waits for the compiler (minutes on a CPU); "
                    "benchmarks/gpu_bench.py measures the gain.",
    )
    save_steps: int = Field(100, ge=0, description="Checkpoint every N steps; 0 never.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Newest checkpoints kept on disk; older ones are deleted.")
    num_processes: int = Field(
        1, ge=1, le=1024, description="More than 1 runs the stage under torchrun (gloo on CPU, NCCL on GPU)."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With num_processes > 1: ddp (a full copy per process) or fsdp (weights sharded, FSDP2)."
    )
    merge_adapter: bool = Field(False, description="Also write the adapter merged into the base weights.")
    log_every: int = Field(10, ge=1, description="Optimizer steps between logged training metrics.")

    @model_validator(mode="after")
    def _bf16_trainables_need_a_bf16_lora_run(self) -> "TrainParams":
        if self.epochs is None and self.warmup_steps >= 1 and self.warmup_steps > self.max_steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps:g}) is more than train.max_steps "
                             f"({self.max_steps}): the run would end before the learning rate peaks")
        if self.trainable_precision == "bf16" and self.method != "lora":
            raise ValueError(
                f"train.trainable_precision=bf16 is for train.method=lora; {self.method} keeps fp32 trained weights "
                "(full: fp32 master weights; qlora: peft keeps its norms fp32)"
            )
        if self.trainable_precision == "bf16" and self.precision == "fp32":
            raise ValueError("train.trainable_precision=bf16 needs train.precision bf16 (or auto on a GPU with bf16)")
        if self.compile and self.distributed == "fsdp" and self.num_processes > 1:
            raise ValueError("train.compile is not supported with train.distributed=fsdp; use train.distributed=ddp or train.compile=false")
        return self


class EvalParams(_Section):
    task: Literal["generation", "classification"] = Field(
        "generation",
        description="generation | classification (labels: accuracy, precision, recall, macro-F1).",
    )
    max_examples: int = Field(200, ge=1, description="Test examples scored per model.")
    few_shot_k: int = Field(3, ge=0, le=64, description="Train examples shown before each prompt (few-shot baseline).")
    max_new_tokens: int = Field(24, ge=1, le=8192, description="Tokens generated per test prompt, at most.")
    batch_size: int = Field(32, ge=1, le=4096, description="Test prompts generated together.")
    reuse_baselines: bool = Field(
        True,
        description="Reuse the prompted base model's scores of an earlier run where nothing they depend on changed "
                    "(base model files, test examples, shots, these settings, code, libraries): the base model is not "
                    "loaded or run again (tasks/evaluate/baselines.py). false: score it in every run.",
    )
    prompt_date: str | None = Field(
        None, description="Filled in by the resolve stage: today's date where the run's chat template writes it into "
        "the prompt (strftime_now), so DVC scores the candidate again on another day, as the champion is.",
    )


class GateParams(_Section):
    min_exact_match: float = Field(
        0.7, ge=0.0, le=1.0, description="Lowest exact match of the candidate on the test split."
    )
    max_perplexity: float = Field(3.0, gt=0.0, description="Highest perplexity on assistant tokens.")
    min_gain_over_prompting: float = Field(
        0.1, ge=-1.0, le=1.0,
        description="Exact match above the best of zero-shot and few-shot prompting of the base model.",
    )
    max_regression: float = Field(
        0.04, ge=0.0, le=1.0,
        description="Largest drop against the champion (absolute for scores in [0, 1], relative for perplexity) "
                    "that the gate tolerates; a check fails when the drop is larger and significant at "
                    "gate.confidence (its interval excludes no change). "
                    "0.04 is above the spread of retrains that differ only in train.seed on the default data "
                    "(benchmarks/bench_gate.py). The preference stage applies the same check to its tuned model "
                    "against its supervised one on the val split.",
    )
    max_p95_latency_ms: float = Field(5000, gt=0, description="Highest p95 generation latency per example (ms).")
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
    model_name: str = Field(
        "ftllm-chat", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="MLflow registered model name."
    )
    auto_promote: bool = Field(
        True, description='A run that passes the gate moves the "champion" alias by itself.'
    )


class ServingParams(_Section):
    max_tokens: int = Field(256, ge=1, le=32768, description="Ceiling on a request's max_tokens.")
    max_messages: int = Field(64, ge=1, le=10_000, description="Ceiling on messages per request.")
    max_request_bytes: int = Field(65536, ge=256, le=64 * 1024 * 1024, description="Ceiling on a request body.")
    max_concurrency: int = Field(64, ge=1, le=100_000, description="Requests served at once; more get 429.")
    reload_seconds: float = Field(
        10, gt=0, description='How often the service checks whether "champion" moved (seconds).'
    )
    generate_max_tokens: int = Field(
        64, ge=1, le=32768, description="New tokens per /generate prompt (capped by max_tokens)."
    )
    max_batch: int = Field(
        32, ge=1, le=4096,
        description="Rows the engine decodes at once; more requests wait to join as rows leave. Memory for the "
                    "KV cache grows with it.",
    )
    join_ratio: float = Field(
        0.5, gt=0.0, le=1.0,
        description="Waiting requests join a running batch once they number this share of its rows (each join "
                    "is a prefill pass of its own, so joining one by one slows every row).",
    )
    join_after_steps: int = Field(
        4, ge=0, le=10_000,
        description="Most decoding steps a request waits to join a running batch before join_ratio is reached; "
                    "0 joins at once.",
    )
    engine: Literal["own", "transformers"] = Field(
        "own",
        description="The decoding loop of the engine process: own (serving/engine.py) or transformers (the "
                    "library's continuous batching with paged attention, serving/library_engine.py); same API, "
                    "answers and errors. transformers ignores join_ratio and join_after_steps, shares KV "
                    "blocks instead of the prefix cache (on while prefix_min_tokens > 0), and leaves the function "
                    "of tool_choice required among several tools to the model (it cannot score them).",
    )
    invalid_call_finish_reason: Literal["invalid_tool_call", "stop"] = Field(
        "invalid_tool_call",
        description="finish_reason of an answer whose tool call is returned as text (unparseable, an undeclared "
                    "function or arguments failing the schema): invalid_tool_call says so, but is outside "
                    "OpenAI's values, which clients that validate responses strictly refuse; stop is within them.",
    )
    prefix_min_tokens: int = Field(
        16, ge=0, le=1_000_000,
        description="Shortest prompt start (tokens) that the engine caches once a group of prompts shares it (the "
                    "chat template and a common system message), so later prompts prefill only the rest; 0: no "
                    "prefix cache.",
    )


class FeedbackParams(_Section):
    """Who may teach the model: review, limits, redaction and retention of production feedback
    (docs/guides/trust.md)."""

    auto_approve: Literal["trusted", "all", "none"] = Field(
        "trusted",
        description="Feedback that needs no person's approval: trusted (from keys marked trusted), all (every "
                    "key: no review), none (every row is reviewed). The rest is held until approved.",
    )
    approval: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Whether a retraining run with held feedback pauses for approval in the Prefect UI: auto "
                    "(when PREFECT_API_URL names a Prefect server whose UI someone can open), always, never (held "
                    "feedback waits for `ftllm feedback approve` and a later run).",
    )
    approval_timeout_seconds: int = Field(
        3600, ge=1, le=7 * 86400,
        description="How long a paused run waits for the approval form; then it goes on without the held "
                    "feedback, which stays held for the next run.",
    )
    redaction: Literal["mask", "drop"] = Field(
        "mask",
        description="Secrets and personal data found in feedback (e-mails, phones, cards, IBANs, identity numbers, IPs, keys): mask "
                    "them with a placeholder ([EMAIL], ...), or drop the whole example.",
    )
    max_key_share: float = Field(
        0.1, gt=0.0, le=1.0,
        description="Largest share of a run's training examples that one untrusted key's feedback may be "
                    "(its latest examples are kept); 1: no cap.",
    )
    retention_days: float = Field(
        90, ge=0,
        description="Interactions with no activity for this long (the answer and its latest feedback older than "
                    "this), or older than twice this, are erased, with their feedback, when a run exports feedback or "
                    "`ftllm feedback forget --expired` runs; 0 keeps them forever.",
    )
    per_key_per_minute: int = Field(
        30, ge=1, le=1_000_000,
        description="POST /feedback requests one key may send per minute (a trusted key: per end user it names; with "
                    "no key set: per client address); more get 429 with Retry-After.",
    )


class ScheduleParams(_Section):
    cron: str = Field("0 3 * * 1", description="Cron expression of scheduled retraining (weekly, Monday 03:00).")
    timezone: str = Field("UTC", description="Time zone of the cron expression (IANA name).")
    active: bool = Field(False, description="true: the deployment's schedule is on when deployed.")

    @field_validator("cron")
    @classmethod
    def _a_cron_expression(cls, value: str) -> str:
        return checked_cron(value, "0 3 * * 1")

    @field_validator("timezone")
    @classmethod
    def _an_iana_time_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (UTC, Europe/Oslo, America/New_York, ...)") from None
        return value


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
    min_distinct_sources: int = Field(
        2, ge=1,
        description="Fewest distinct sources among the new feedback for a recommendation, so one client cannot "
                    "force retraining: each untrusted key counts once, a trusted key once per end user it names.",
    )
    low_rating: int = Field(2, ge=1, le=5, description="A rating at most this counts as a low rating.")
    min_new_low_ratings: int = Field(
        30, ge=1,
        description="Retraining is recommended once this many low ratings came in since the last time (preference "
                    "tuning learns from them).",
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

    @field_validator("cron")
    @classmethod
    def _a_cron_expression(cls, value: str) -> str:
        return checked_cron(value, "0 * * * *")


PREFERENCE_SNAPSHOT = "data/preference.jsonl"


class PreferenceParams(_Section):
    """Preference tuning from production ratings (KTO, DPO), after supervised tuning.

    Off by data: a run tunes on preferences only when `path` holds examples (a run with a
    `feedback: true` source exports them there from the feedback log); otherwise the
    `preference` stage records that it had nothing to do and the supervised model is the
    candidate, as before.
    """

    path: str = Field(
        PREFERENCE_SNAPSHOT,
        description="Preference examples (KTO rows and DPO pairs); a run with a feedback source exports them here from "
                    "the feedback log. Read by prepare when the file exists.",
    )
    desirable_min_rating: int = Field(
        4, ge=1, le=5, description="An uncorrected answer rated at least this is a desirable (thumbs-up) KTO example.",
    )
    undesirable_max_rating: int = Field(
        2, ge=1, le=5,
        description="An uncorrected answer rated at most this is an undesirable (thumbs-down) KTO example; ratings in "
                    "between are left out.",
    )
    pair_min_rating_gap: int = Field(
        2, ge=1, le=4,
        description="Two answers to the same prompt whose ratings differ by at least this form a DPO pair (the "
                    "higher-rated chosen); a correction always pairs with the answer it replaces.",
    )
    heldout_fraction: float = Field(
        0.3, ge=0.0, lt=1.0,
        description="Share of preference prompts held out of all training (stable hash of the prompt), on which the "
                    "candidate's reward accuracy is measured and gated.",
    )
    min_examples: int = Field(
        8, ge=1, description="Fewest preference training examples the stage tunes on; with fewer it does nothing and says so.",
    )
    loss: Literal["kto", "sigmoid"] = Field(
        "kto",
        description="kto: KTO on thumbs up and down (pairs count as one of each); sigmoid: DPO on the pairs only.",
    )
    beta: float = Field(
        0.1, gt=0.0, le=10.0,
        description="Strength of the pull towards the reference (the supervised model, a frozen copy of its adapter).",
    )
    desirable_weight: float | None = Field(
        None, gt=0.0, le=100.0,
        description="KTO: weight of desirable examples; none: balanced automatically against the undesirable ones.",
    )
    undesirable_weight: float | None = Field(
        None, gt=0.0, le=100.0,
        description="KTO: weight of undesirable examples; none: balanced automatically against the desirable ones.",
    )
    learning_rate: float = Field(
        1e-4, gt=0.0, le=1.0,
        description="Peak learning rate of preference tuning; five times this broke generation on the default data, "
                    "this kept the test split within the gate's margin (benchmarks/bench_preference_defaults.py, "
                    "figures in benchmarks/results/README.md).",
    )
    max_steps: int = Field(40, ge=1, le=1_000_000, description="Optimizer steps of preference tuning.")
    batch_size: int = Field(8, ge=2, le=4096, description="Examples per step (KTO needs at least 2 for its KL estimate).")
    invalid_rows: Literal["fail", "drop"] = Field(
        "fail", description="fail: an invalid row of the preference file fails the run; drop: invalid rows are left "
                            "out and reported, up to max_invalid_share of its rows.",
    )
    max_invalid_share: float = Field(
        0.01, ge=0.0, le=1.0, description="With invalid_rows: drop, the largest share of invalid rows the file may have.",
    )
    md5: str | None = Field(None, description="Filled in by the resolve stage: the preference file's md5.")

    @model_validator(mode="after")
    def _thresholds_leave_a_gap(self) -> PreferenceParams:
        if self.undesirable_max_rating >= self.desirable_min_rating:
            raise ValueError(
                f"preference.undesirable_max_rating {self.undesirable_max_rating} must be below "
                f"preference.desirable_min_rating {self.desirable_min_rating}; lower the first or raise the second"
            )
        return self


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    gate: GateParams = GateParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()
    feedback: FeedbackParams = FeedbackParams()
    schedule: ScheduleParams = ScheduleParams()
    workers: WorkersParams = WorkersParams()
    monitor: MonitorParams = MonitorParams()
    preference: PreferenceParams = PreferenceParams()

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        """Contradictions between sections; each message names the keys to change."""
        if self.data.max_tokens > self.train.seq_len:
            raise ValueError(
                f"data.max_tokens={self.data.max_tokens} is longer than train.seq_len={self.train.seq_len}: a training "
                "row could not hold the longest example, whose answer would be cut off; raise train.seq_len or lower "
                "data.max_tokens"
            )
        if self.monitor.min_ratings > self.monitor.window:
            raise ValueError(
                f"monitor.min_ratings={self.monitor.min_ratings} is more than monitor.window={self.monitor.window}, "
                "the ratings the mean is taken over, so the mean rating could never be judged; lower "
                "monitor.min_ratings or raise monitor.window"
            )
        return self

    def digest(self) -> str:
        """A short hash of every setting, recorded with the models it produced."""
        return _short_hash(self.model_dump(mode="json"))

    def model_digest(self) -> str:
        """A short hash of the settings that make, score, gate and package a model: all but `RUN_ONLY_SECTIONS`.

        A run whose model and this digest match a registered version's registers nothing
        (`flows.retrain`), so a changed schedule or monitor threshold is no new version.
        """
        return _short_hash(self.model_dump(mode="json", exclude=set(RUN_ONLY_SECTIONS)))


# Sections that say how the project runs around a model, not what the model is, how it is
# scored, what the gate decides or what its bento carries: `serving` and `feedback` are read
# by the service, and a bento packs the params.yaml it was built with (a container serves that).
RUN_ONLY_SECTIONS = ("schedule", "workers", "monitor")


def _short_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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


_DOTTED_KEY = re.compile(r"\b([a-z]+)\.([a-z_0-9]+)\b")


def key_lines(text: str) -> dict[tuple, int]:
    """The line (from 1) of every key and list item of a YAML text, by path: `("train", "max_steps")`,
    `("data", "sources", 0, "path")`. Empty when the text is not YAML."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    walk(root, ())
    return lines


def _where(source: str, path: tuple, lines: dict[tuple, int], overrides: dict[str, Any]) -> str:
    """`FILE:LINE` of the deepest part of `path` written in the file, or the `--set` that gave it."""
    dotted = ".".join(str(p) for p in path[:2])
    if dotted in overrides:
        return f"--set {dotted}"
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return f"{source}:{lines[path[:end]]}"
    return source


def _format_error(err: ValidationError, source: str, lines: dict[tuple, int] | None = None,
                  overrides: dict[str, Any] | None = None) -> list[str]:
    """One line per error: where (file and line, or the `--set`), the key, what is wrong."""
    lines, overrides = lines or {}, overrides or {}
    out = []
    for e in err.errors():
        path = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the settings reference (ftllm params prints every key)"
        elif e["type"] == "model_type":  # a section given as a value: no class name of the code
            msg = f"a section of keys (indented `key: value` lines under it), not {e['input']!r}"
        named = [m.groups() for m in _DOTTED_KEY.finditer(msg) if m.group(1) in Params.model_fields]
        if e["type"] == "value_error" and named:  # a validator: a key it names that --set gave, else the file
            path = next((k for k in named if ".".join(k) in overrides), next((k for k in named if k in lines), named[0]))
        key = ".".join(str(p) for p in path) or "settings"
        where = _where(source, path, lines, overrides)
        out.append(f"{where}: {msg}" if where.startswith("--set") else f"{where}: {key}: {msg}")
    return out


def _read_settings(path: Path) -> tuple[dict[str, Any], str]:
    """The mapping of sections in a settings file, and its text.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: settings file not found; check the path (the commands read params.yaml "
                          "where they run: the project root)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a settings file; give the file's path") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    repeated = _repeated_key(text)
    if repeated is not None:  # YAML keeps the last one: the first one's settings would be dropped unsaid
        key, first, again = repeated
        raise ConfigError(f"{path}:{again}: {key} is given twice (lines {first} and {again}); the second would "
                          "replace the first whole: merge them into one")
    return raw, text


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the file's line and column, what the parser expected."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    opened = getattr(exc, "context_mark", None)
    if context and opened is not None:
        problem += f" ({context} opened on line {opened.line + 1})"
    return f"{where}: not valid YAML: {problem}; fix the file"


def _repeated_key(text: str) -> tuple[str, int, int] | None:
    """The first key a YAML mapping of `text` gives twice: (dotted path, first line, second line)."""
    def walk(node, path: tuple) -> tuple[str, int, int] | None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if key.value in seen:
                    return ".".join(map(str, (*path, key.value))), seen[key.value], line
                seen[key.value] = line
                found = walk(value, (*path, key.value))
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found = walk(item, (*path, i))
                if found:
                    return found
        return None

    return walk(yaml.compose(text), ())


def load_params(path: Path | str | None = "params.yaml", overrides: dict[str, Any] | None = None,
                sections: tuple[str, ...] | None = None) -> Params:
    """Read, override and validate the settings.

    Args:
        path: the YAML settings file; None: no file, the defaults.
        overrides: dotted keys to values, applied on top of the file.
        sections: validate only these top-level sections (the others take their defaults);
            for a reader that uses a few of them, such as the service.

    Raises:
        ConfigError: the file is missing or malformed, or a key is unknown, out of range or
            contradicts another; each error names its line in the file (or its `--set`).
    """
    raw, text = _read_settings(Path(path)) if path is not None else ({}, "")
    source = str(path) if path is not None else "the defaults"
    overrides = overrides or {}
    raw = apply_overrides(raw, overrides, source)
    if sections is not None:
        raw = {name: value for name, value in raw.items() if name in sections}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(_format_error(err, source, key_lines(text), overrides))) from None


def as_overrides(params: Params) -> dict[str, Any]:
    """Every setting of `params` as dotted-key overrides (the resolved-only keys left out).

    Applied on top of any settings file they give back `params`: what a run hands its DVC
    stages (FTLLM_OVERRIDES), so that the `resolve` stage, which reads params.yaml, writes
    the settings the run was started with, whether they came from params.yaml, from
    `--params FILE`, from `--set`, from the UI's form or from a deployment's parameters.
    """
    doc = params.model_dump(mode="json")
    return {f"{section}.{key}": value for section, fields in doc.items() for key, value in fields.items()
            if (section, key) not in RESOLVED_ONLY}


def section_overrides(sections: dict[str, BaseModel | None]) -> dict[str, Any]:
    """The fields each given section sets, as dotted-key overrides: a section is merged onto
    the settings file's, field by field, never put in its place (the retrain flow's form)."""
    return {f"{name}.{key}": value for name, section in sections.items() if section is not None
            for key, value in section.model_dump(mode="json", exclude_unset=True).items()}


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


def write_resolved(params: Params, out: Path, prompt_date: str | None = None) -> Path:
    """Write the settings a run uses, plus the md5 of the data file, of every source and of a chat template file,
    and `prompt_date` (`eval.prompt_date`: the day a dated chat template writes into the prompt).

    DVC reruns a stage when one of these changes, though the file's path did not.
    """
    return write_atomic(out, yaml.safe_dump(resolved_settings(params, prompt_date), sort_keys=False))


def resolved_settings(params: Params, prompt_date: str | None = None, root: Path = Path(".")) -> dict[str, Any]:
    """The settings as `write_resolved` writes them: with the md5 of every file they name (a
    relative path is under `root`; None for a file that is not there)."""
    def md5_of(path: str | Path) -> str | None:
        found = root / path
        return file_md5(found) if found.is_file() else None

    doc = params.model_dump(mode="json")
    doc["eval"]["prompt_date"] = prompt_date
    doc["data"]["md5"] = md5_of(params.data.path)
    # Every source's md5 sits in the `data` section the prepare stage depends on, so that
    # DVC reruns prepare when any of them changes (a source outside data/ included).
    for source in doc["data"]["sources"]:
        source["md5"] = md5_of(source["path"] or FEEDBACK_SNAPSHOT)
    # A template file is read by prepare and finetune, whose DVC deps name the `model` section.
    doc["preference"]["md5"] = md5_of(params.preference.path)
    init = Path(params.train.init_path or "") / "adapter" / "adapter_model.safetensors"
    doc["train"]["init_md5"] = md5_of(init) if params.train.init_path else None
    template = Path(params.model.chat_template)
    doc["model"]["chat_template_md5"] = md5_of(template) if template.suffix == ".jinja" else None
    return doc



PARAMS_HEADER = """\
# The settings of the pipeline: this file is yours to edit.
# DVC reads it for the stages in dvc.yaml (`dvc params diff` compares versions of it);
# tasks/config.py validates it into frozen pydantic models, which hold the defaults and
# the descriptions written beside each key. Override any key for one run with
# `--set section.key=value` (on every command that reads settings; it applies to the DVC
# stages too, and this file is not edited).
#
# `ftllm params --check params.yaml` validates this file and lists what differs from the
# defaults; `ftllm params --write params.yaml` refreshes the comments and adds new keys,
# keeping your values.
"""
# Keys the resolve stage fills in for a run; not settings a user writes.
RESOLVED_ONLY = {("data", "md5"), ("model", "chat_template_md5"), ("preference", "md5"), ("train", "init_md5"),
                 ("eval", "prompt_date")}
# Keys a run fills in for its stages (they travel in its overrides); not settings a user writes either.
RUN_FILLED = {("train", "init_path")}
COMMENT_COLUMN = 31  # where comments start, so that the values line up
LINE_WIDTH = 118


def setting_fields() -> list[tuple[str, str, Any]]:
    """(section, key, pydantic field) of every setting a user writes, in the order of the models."""
    return [(section, key, field)
            for section, info in Params.model_fields.items()
            for key, field in info.annotation.model_fields.items()
            if (section, key) not in RESOLVED_ONLY | RUN_FILLED]


def _yaml_line(key: str, value: Any) -> str:
    """`key: value` as YAML writes it (quoted where the value needs it; a list or mapping on one line)."""
    flow = isinstance(value, (list, dict))
    text = yaml.safe_dump(value, default_flow_style=flow, sort_keys=False, width=10_000).rstrip("\n")
    return f"{key}: {text.removesuffix(chr(10) + '...')}"


def _commented(line: str, comment: str) -> list[str]:
    """`line` with `comment` beside it, wrapped onto lines that start at the comment column."""
    column = max(COMMENT_COLUMN, len(line) + 1)
    width = max(LINE_WIDTH - column - 2, 40)
    chunks = textwrap.wrap(comment, width) or [""]
    first = f"{line.ljust(column - 1)} # {chunks[0]}"
    return [first] + [f"{' ' * column}# {chunk}" for chunk in chunks[1:]]


def render_params(values: dict[str, Any] | None = None) -> str:
    """The text of a `params.yaml`: every setting with its description as a comment.

    Args:
        values: the values to write, as sections of keys (a settings file's mapping); a key
            it lacks is written at its default. None: every default.
    """
    values = values or {}
    lines = PARAMS_HEADER.splitlines()
    for section, key, field in setting_fields():
        if f"{section}:" not in lines:
            lines += ["", f"{section}:"]
        given = values.get(section)
        value = given[key] if isinstance(given, dict) and key in given else field.default
        lines += _commented(f"  {_yaml_line(key, value)}", field.description or "")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class SettingsCheck:
    """What `check_params` found: errors (the file cannot be used), and information."""

    errors: list[str] = dataclasses.field(default_factory=list)
    differences: list[str] = dataclasses.field(default_factory=list)  # `FILE:LINE: key: value (default: d)`
    missing: list[str] = dataclasses.field(default_factory=list)  # keys the file lacks; their defaults apply


def check_params(path: Path | str) -> SettingsCheck:
    """Validate a settings file against the models, and compare it with the defaults.

    Unknown keys, bad values and contradictions are errors, each with its line; values that
    differ from the defaults, and keys the file lacks, are information.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping of sections.
    """
    path = Path(path)
    raw, text = _read_settings(path)
    lines = key_lines(text)
    report = SettingsCheck()
    try:
        Params.model_validate(raw)
    except ValidationError as err:
        report.errors = _format_error(err, str(path), lines)
    defaults = Params().model_dump(mode="json")
    for section, key, _ in setting_fields():
        given = raw.get(section)
        if not isinstance(given, dict) or key not in given:
            report.missing.append(f"{section}.{key} (default: {json.dumps(defaults[section][key])})")
        elif given[key] != defaults[section][key]:
            where = _where(str(path), (section, key), lines, {})
            report.differences.append(f"{where}: {section}.{key}: {json.dumps(given[key], default=str)} "
                                      f"(default: {json.dumps(defaults[section][key])})")
    return report


def write_params(path: Path | str) -> Path:
    """Write `params.yaml` at `path` (atomically): every key with its description as a comment.

    An existing file keeps its values (new keys are added at their defaults); it must name
    only known keys, which would otherwise be lost.

    Raises:
        ConfigError: the existing file cannot be read, or names a key the models lack.
    """
    path = Path(path)
    values: dict[str, Any] = {}
    if path.exists():
        values, text = _read_settings(path)
        known = {(section, key) for section, key, _ in setting_fields()} | RESOLVED_ONLY | RUN_FILLED
        lines = key_lines(text)
        unknown = [(section, key) for section, keys in values.items()
                   for key in (keys if isinstance(keys, dict) else {"": None})
                   if section not in Params.model_fields or (key and (section, key) not in known)]
        if unknown:
            named = "; ".join(f"{_where(str(path), (s, k) if k else (s,), lines, {})}: {s}{'.' + k if k else ''}"
                              for s, k in unknown)
            raise ConfigError(f"{path}: unknown keys would be lost ({named}); fix or remove them, then write again")
    return write_atomic(path, render_params(values))
