"""The result of one retraining run: the `ftllm run --json` contract.

`RunResult` is what the `retrain` flow returns (also as the data of a failed flow run) and
what `ftllm run --json` prints, as `model_dump_json()`, on the last line of stdout. The
flow fills it in step by step as the run goes; a field that a run did not reach keeps its
empty default (`None`, `{}`), so a failed run still prints an object of the same shape.
The commands guide (docs/guides/commands.md) and `RunResult.model_json_schema()` describe the same
keys (`tests/unit/pipeline/test_run_result.py` checks the schema against the guide).

No Prefect here: the library describes the result, the flow builds it. Plain pydantic
models pickle and serialise to JSON, which is what Prefect needs to store a flow's result.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RunStatus = Literal["promoted", "rejected", "failed"]
Metrics = dict[str, float]


class _Part(BaseModel):
    # Not frozen: the flow fills a result in as the run goes. Unknown keys are refused, so
    # a misspelt attribute fails where it is set instead of vanishing from the contract.
    # An infinite perplexity stays `Infinity` (as Python's json writes and reads it), not
    # a null that would no longer validate as a number.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, ser_json_inf_nan="constants")


class GateCheck(_Part):
    """One check of the gate."""

    name: str = Field(description="The check, e.g. min_exact_match or no_regression_perplexity.")
    value: float = Field(description="What the candidate measured.")
    threshold: float = Field(description="The bound it was held to.")
    passed: bool = Field(description="Whether the value is within the bound.")
    estimate: float | None = Field(None, description="Point estimate: the candidate's value, or its change from the champion.")
    low: float | None = Field(None, description="Lower bound of the estimate's confidence interval (gate.confidence).")
    high: float | None = Field(None, description="Upper bound of that interval.")
    p_value: float | None = Field(None, description="McNemar's exact test against the champion, for 0/1 scores.")
    n: int | None = Field(None, description="Test examples the estimate rests on.")
    method: str = Field("threshold", description="threshold | paired bootstrap | paired bootstrap + McNemar | fixed margin.")
    underpowered: bool = Field(False, description="The interval is wider than the margin the check enforces.")
    examples_needed: int | None = Field(None, description="Test examples that would narrow the interval to the margin.")
    note: str | None = Field(None, description="What the check wants a reader to know (e.g. why it is underpowered).")


class GateResult(_Part):
    """The gate's verdict: passed when every check passed."""

    passed: bool = Field(description="Every check passed.")
    checks: list[GateCheck] = Field(default_factory=list, description="Every check (empty for an unchanged run).")
    notes: list[str] = Field(default_factory=list, description="The checks' notes, one line each.")


class RunMetrics(_Part):
    """Metrics per model, scored on the same test split (exact_match, bleu, rouge_l, perplexity, latency...)."""

    candidate: Metrics = Field(default_factory=dict, description="The model this run trained.")
    base_zero_shot: Metrics | None = Field(None, description="The base model prompted zero-shot.")
    base_few_shot: Metrics | None = Field(None, description="The base model prompted few-shot (eval.few_shot_k > 0).")
    champion: Metrics | None = Field(None, description="The champion before this run, when there was one.")
    candidate_feedback: Metrics | None = Field(
        None, description="The candidate on the feedback split (corrected answers held out of training), when there is one.")
    champion_feedback: Metrics | None = Field(None, description="The champion on the same feedback split.")
    candidate_preference: Metrics | None = Field(
        None, description="The candidate on the held-out preference split (reward accuracy and margin, rated-down "
                          "repeats), when there is one.")
    champion_preference: Metrics | None = Field(None, description="The champion on the same held-out preference split.")

    def by_model(self) -> dict[str, Metrics]:
        """The models that were scored, by role, in the order candidate, baselines, champion."""
        return {role: values for role, values in self if values}


class SourceSummary(_Part):
    """One source of `data.sources` (or `data.path`) and what the run kept of it."""

    path: str = Field(description="The source's file (a feedback source's export).")
    md5: str | None = Field(None, description="Its md5.")
    feedback: bool = Field(False, description="The service's feedback, exported by the run.")
    examples: int | None = Field(None, description="Examples in the file.")
    invalid: int | None = Field(None, description="Examples that cannot be trained on (left out under invalid_rows: drop); "
                                                  "past data.max_drop_fraction of the source, its over-long ones too "
                                                  "(then also in length_dropped).")
    invalid_rows: str = Field("fail", description="The source's invalid-row policy: fail or drop.")
    kept: int | None = Field(None, description="Examples kept after corrections, deduplication, cap, weight and "
                                               "the length policy.")
    length_dropped: int | None = Field(None, description="Examples the length policy dropped (over data.max_tokens), "
                                                         "counted in invalid too where the source's share made them so.")


class DataSummary(_Part):
    """The data the run trained on."""

    path: str = Field(description="The data file (the first source's).")
    md5: str | None = Field(None, description="Its md5 (the DVC content hash), once validated; with several sources, "
                                              "the md5 of their paths and md5s.")
    examples: int | None = Field(None, description="Examples in the file (in all sources), once validated.")
    sources: list[SourceSummary] = Field(default_factory=list, description="Every source with its md5 and counts.")
    splits: dict[str, int] = Field(default_factory=dict, description="Examples per split (train, val, test, feedback).")
    feedback_id: int | None = Field(
        None, description="The highest feedback id of the service's log that the run's export read (None: the run "
                          "reads no feedback); the monitor's cursor moves to it once the run's stages trained.")


class ErrorRow(BaseModel):
    """One invalid example of the validation report."""

    model_config = ConfigDict(extra="allow")  # the report may say more about a row than the contract needs

    line: int | None = Field(None, description="Line (JSONL) or index + 1 (JSON array) of the example.")
    category: str = Field(description="The kind of error, e.g. not_json or last_not_assistant.")
    message: str = Field("", description="What is wrong, in words.")


class ValidationSummary(_Part):
    """What validation found in the data."""

    valid: bool = Field(description="No error (warnings allowed), or only invalid rows a source's invalid_rows: drop "
                                      "leaves out.")
    errors: dict[str, int] = Field(default_factory=dict, description="Invalid examples per category.")
    warnings: dict[str, int] = Field(default_factory=dict, description="Warnings per category.")
    error_rows: list[ErrorRow] = Field(default_factory=list, description="The first invalid examples.")
    data_docs: str | None = Field(None, description="The Great Expectations Data Docs page.")


class StagesSummary(_Part):
    """The DVC stages of the run."""

    ran: list[str] = Field(default_factory=list, description="Stages that ran.")
    skipped: list[str] = Field(default_factory=list, description="Stages DVC found up to date.")
    trained_by: str | None = Field(None, description="The Prefect deployment that ran finetune, or none: this run.")


class RunResult(_Part):
    """The outcome of one `retrain` run, as `ftllm run --json` prints it."""

    status: RunStatus = Field("failed", description="promoted, rejected (by the gate) or failed.")
    model_name: str | None = Field(None, description="The registered model (registry.model_name).")
    version: str | None = Field(None, description="The model version this run registered (or found unchanged).")
    champion_version: str | None = Field(None, description="The champion after the run.")
    gate: GateResult | None = Field(None, description="The gate's verdict; none when the run stopped before it.")
    metrics: RunMetrics = Field(default_factory=RunMetrics, description="Candidate, baselines and champion.")
    data: DataSummary | None = Field(None, description="The data file, its md5 and its examples.")
    mlflow_run_id: str | None = Field(None, description="The MLflow run holding params, metrics and artifacts.")
    bento: str | None = Field(None, description="The bento built (only for a promoted model).")
    bento_model: str | None = Field(None, description="The model's tag in the BentoML store.")
    durations: dict[str, float] = Field(default_factory=dict, description="Seconds per step (validate, stages...).")
    changed: bool = Field(True, description="False: data, code and settings as before, nothing registered.")
    stages: StagesSummary | None = Field(None, description="DVC stages run and skipped.")
    validation: ValidationSummary | None = Field(None, description="The validation report's summary.")
    dvc_push: str | None = Field(None, description="The DVC remote the outputs were pushed to, if any.")
    feedback: dict[str, Any] | None = Field(
        None, description="The feedback export: examples, by_key, users, held, capped, erased, redacted "
                          "(findings per category, examples changed/dropped), and `preference`: what the ratings "
                          "became (desirable, undesirable, pairs, middle ratings left out, rows capped per key).")
    approval: dict[str, Any] | None = Field(
        None, description="The approval step: held rows, whether the run paused or timed out, what was decided.")
    error: str | None = Field(None, description="Why a failed run failed, in one sentence.")
    exit_code: int | None = Field(None, description="What `ftllm run` exits with: 0 promoted, 3 rejected; for a failed "
                                                    "run 2 for settings the run cannot use (found once the base model "
                                                    "is read), else 1. The flow sets it for a failed run only.")

    @property
    def failed_checks(self) -> list[str]:
        """Names of the gate checks that failed."""
        return [c.name for c in self.gate.checks if not c.passed] if self.gate else []


def _invalid(report: dict) -> int:
    """A source's examples that cannot be trained on, as its invalid-row policy counts them
    (`tasks.data.sources.accept_report`): past data.max_drop_fraction of it, the over-long ones too."""
    over = report.get("dropped", 0) if "over_token_limit" in report.get("errors", {}) else 0
    return min(report["examples"], report.get("unusable_examples", 0) + over)


def summarise_sources(path: str, sources: list[dict], reports: list[dict | None]) -> DataSummary:
    """The data part of a result from each source (`path`, `md5`, `feedback`, `invalid_rows`) and its
    validation report (None for an empty feedback export, which is not validated)."""
    parts = [
        SourceSummary(path=s["path"], md5=r["md5"] if r else s["md5"], feedback=s["feedback"],
                      examples=r["examples"] if r else 0, invalid=_invalid(r) if r else 0,
                      invalid_rows=s["invalid_rows"])
        for s, r in zip(sources, reports)
    ]
    if len(parts) == 1:
        md5 = parts[0].md5
    else:  # as tasks.data.sources.sources_md5 writes it into stats.json
        md5 = hashlib.md5("\n".join(f"{p.path}\t{p.md5}" for p in parts).encode()).hexdigest()
    return DataSummary(path=path, md5=md5, examples=sum(p.examples or 0 for p in parts), sources=parts)


def combine_reports(reports: list[dict | None], accepted: bool) -> ValidationSummary:
    """One validation summary of several sources' reports: counts summed, error rows tagged with their source."""
    errors: dict[str, int] = {}
    warnings: dict[str, int] = {}
    rows: list[ErrorRow] = []
    for i, report in enumerate(reports):
        if report is None:
            continue
        for total, counts in ((errors, report["errors"]), (warnings, report["warnings"])):
            for category, n in counts.items():
                total[category] = total.get(category, 0) + n
        tag = {"source": i} if len(reports) > 1 else {}
        rows += [ErrorRow.model_validate({**r, **tag}) for r in report["error_rows"]]
    docs = next((r.get("data_docs") for r in reports if r is not None), None)
    return ValidationSummary(valid=accepted, errors=errors, warnings=warnings, error_rows=rows[:100], data_docs=docs)
