"""The `retrain` flow: validate → DVC stages (prepare, finetune, evaluate) → gate → register → package.

The flow orchestrates; the work is in `tasks/`. It rejects bad settings and bad data up
front, runs the DVC stages (which skip what has not changed), scores the current champion
on the same test split, gates the candidate, registers it in MLflow and packages it with
BentoML. A run with unchanged data, code and settings ends early and registers nothing.
The flow returns a `tasks.pipeline.result.RunResult`, filled in step by step; it is what
`ftllm run --json` prints.

Its final state says what happened (Completed; Completed named "Rejected" or "Unchanged";
Failed with the reason), its MLflow run is named after the flow run and links back, and it
leaves two offline pages (the data report, the run dashboard) in `artifacts/reports/` and MLflow.

Run it with `ftllm run`, from a Prefect deployment (`ftllm deploy`), or `python -m flows.retrain`.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed, State

from flows.approval import export_feedback_snapshot, review_held_feedback, train_rows
from flows.publish import _publish, _publish_validation, send_notification
from flows.train_step import train_on_worker
from tasks.config import (
    DataParams,
    EvalParams,
    GateParams,
    Params,
    SourceParams,
    TrainParams,
    WorkersParams,
    as_overrides,
    load_params,
    section_overrides,
)
from tasks.data.sources import accept_report, source_label
from tasks.data.validate import TrainingBudget, validate_dataset
from tasks.environment import apply_defaults
from tasks.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, FtllmError, RunFailed, StageError
from tasks.evaluate.baselines import dated_today, read_scores, scoring_digest
from tasks.evaluate.gate import apply_gate
from tasks.evaluate.preference import candidate_dir, score_preference_dir
from tasks.evaluate.score import evaluate_model_dir, load_split
from tasks.feedback import default_db_path
from tasks.feedback.preference import preference_counts, snapshot_preference
from tasks.files import file_md5, write_atomic
from tasks.model.loading import check_fit
from tasks.monitor.cursor import Cursor, advance_cursor
from tasks.pipeline.dvc import (
    git_commit,
    lock_digest,
    push_outputs,
    push_remote,
    run_stages,
    stage_out_md5,
    workspace_lock,
)
from tasks.pipeline.notify import outcome_line
from tasks.pipeline.report import write_reports
from tasks.pipeline.result import (
    DataSummary,
    GateResult,
    RunMetrics,
    RunResult,
    StagesSummary,
    combine_reports,
    summarise_sources,
)
from tasks.pipeline.states import announce_outcome, failed_on_purpose
from tasks.registry.tracking import (
    end_tracking_run,
    flow_run_origin,
    link_tags,
    log_files,
    log_prepared,
    log_results,
    set_run_tags,
    start_tracking_run,
)
from tasks.registry.versions import (
    champion_version,
    download_version,
    find_version,
    metric_tags,
    promote,
    register_candidate,
    tag_version,
    version_folder,
    warm_start,
)


def _validation_key(context, arguments: dict) -> str:
    """Cache validation on the data's content and the settings it depends on, not on the path."""
    params: Params = arguments["params"]
    settings = json.dumps(
        [params.data.model_dump(exclude={"path", "md5"}), params.model.model_dump(), params.train.batch_size,
         params.train.seq_len, params.train.max_steps], sort_keys=True,
    )
    digest = hashlib.md5(f"{settings}{arguments.get('fmt')}".encode()).hexdigest()
    return f"validate-{file_md5(arguments['data_path'])}-{digest}"


@task(name="validate-data", cache_key_fn=_validation_key, persist_result=True, cache_expiration=timedelta(days=30))
def validate_data(params: Params, data_path: Path, report_dir: Path, fmt: str | None = None) -> dict:
    """Great Expectations suite plus chat-format checks on one source of the run (cached on its md5)."""
    from tasks.model.loading import load_base_tokenizer

    tokenizer = load_base_tokenizer(params.model)
    report = validate_dataset(data_path, params.data, fmt=fmt, tokenizer=tokenizer, budget=TrainingBudget.of(params.train),
                              data_docs_dir=report_dir / "gx")
    return report.to_dict()


@task(name="advance-monitor-cursor", retries=2, retry_delay_seconds=3)
def advance_monitor_cursor(model_name: str, feedback_id: int, decision: int = 0, log: Path | None = None, log_id: str = "") -> Cursor:
    """The monitor's cursor moves past the feedback this run trained on from `log`, of identity `log_id` (tasks/monitor/cursor.py)."""
    position = advance_cursor(model_name, Cursor(feedback_id, decision, log_id), log)
    get_run_logger().info(f"monitor cursor of {model_name} at {position}: this run read up to {feedback_id}, {decision}")
    return position


def _take_in_feedback(root: Path, params_file: str, params: Params, overrides: dict) -> tuple[Params, dict, dict[int, dict]]:
    """Export the service's feedback and make it a source of the run when it holds any (`data.feedback`).

    The source goes into the run's overrides, so the stages, the resolved settings and the
    MLflow params all see it. With no feedback to export nothing is written, but an earlier
    export is emptied (feedback erased since leaves the data). A source in `data.sources` is exported with the others.

    Returns:
        The run's settings and overrides, and the exports by source index (an empty export
        under -1: it read the log, but adds no source).
    """
    if not params.data.feedback or any(s.feedback for s in params.data.sources):
        return params, overrides, {}
    source = SourceParams(feedback=True, weight=params.data.feedback_weight)  # the weight the source will get
    others = train_rows(params.data.source_list(), [root / s.file for s in params.data.source_list()])
    out = root / source.file
    snapshot = export_feedback_snapshot(root, source, out, params, others, write_empty=out.is_file())
    if not snapshot["examples"]:
        return params, overrides, {-1: snapshot}
    overrides = {**overrides, "data.sources": params.data.sources_with_feedback()}
    params = load_params(params_file, overrides)
    return params, overrides, {len(params.data.sources) - 1: snapshot}


@task(name="export-preference")
def export_preference_snapshot(root: Path, params: Params) -> dict:
    """The log's admitted ratings of this model's answers as preference examples (`preference.path`), redacted, versioned."""
    feedback = params.feedback
    return snapshot_preference(root, params.preference, get_run_logger().info, feedback.auto_approve, feedback.redaction,
                               feedback.max_key_share, params.registry.model_name)


def _record_prepared(root: Path, run_id: str, result: RunResult, lineage: dict) -> None:
    """What prepare kept of each source: in the result, the lineage tags and the MLflow run."""
    stats = json.loads((root / "artifacts/prepared/stats.json").read_text())
    for summary, source in zip(result.data.sources, stats["sources"]):
        summary.kept, summary.length_dropped = source["kept"], source.get("length_dropped")
    result.data.splits = stats["counts"]
    lineage["data_sources"] = log_prepared(run_id, root / "artifacts")


@task(name="run-dvc-stages")
def run_dvc_stages(root: Path, overrides: dict, run_id: str, workers: WorkersParams) -> dict:
    """prepare → finetune → evaluate under DVC; unchanged stages are skipped.

    With `workers.train_deployment`, the finetune stage runs on that
    deployment's worker (`flows/train_step.py`), the data and model travelling through the
    DVC remote. Not retried: a stage that fails on its own code or data fails the same way
    again. A failure comes back as `error` so that the flow fails with the stage's message.
    """
    logger = get_run_logger()
    train_elsewhere = None
    if workers.train_deployment:
        def train_elsewhere(dvc_lock: str) -> dict:
            return train_on_worker(workers, overrides, dvc_lock, run_id)
    try:
        result = run_stages(root, overrides, run_id, log=logger.info, train_elsewhere=train_elsewhere)
    except StageError as exc:
        return {"error": str(exc)}
    return {"ran": result.ran, "skipped": result.skipped, "trained_by": workers.train_deployment}


@task(name="push-dvc-outputs", retries=2, retry_delay_seconds=10)
def push_dvc_outputs(root: Path) -> str | None:
    """Send the data and stage outputs to the default DVC remote; None where there is none to push to.

    Retried: a push is network I/O to object storage. Only a remote outside the workspace
    is pushed to (`tasks.stages.push_remote`), so the default offline run is unchanged.
    """
    logger = get_run_logger()
    remote = push_remote(root)
    if remote is None:
        logger.info("no DVC remote outside the workspace: outputs stay in the local DVC cache")
        return None
    return push_outputs(root, remote, log=logger.info)


@task(name="evaluate-champion")
def evaluate_champion(root: Path, params: Params, version: str, split: str = "test") -> dict:
    """Score the current champion on the same split as the candidate.

    Its scores are stored beside its download (`version_folder`: model name, version and the
    run that logged it), per split content and scoring settings (the `eval` settings, code and
    libraries: `scoring_digest`), and with the day where its chat template writes the date
    into the prompt: a later run with other eval settings, another registered model's version
    of the same number, or another day's prompt scores it again rather than pair the
    candidate with scores taken differently.

    Args:
        split: "test", "feedback" (the corrected answers held out of training) or "preference_heldout".

    Returns:
        `metrics` (aggregate), `per_example` (scores per example, paired by the gate with the
        candidate's) and `samples` (its first predictions, for the run dashboard).
    """
    split_path = root / f"artifacts/prepared/{split}.jsonl"
    folder = version_folder(root, params.registry.model_name, version)
    cache = folder.with_name(f"{folder.name}-{file_md5(split_path)[:12]}-{scoring_digest(params)}-scored.json")
    if (stored := read_scores(cache)) is not None:
        return stored
    model_dir = download_version(params.registry.model_name, version, folder)
    day = dated_today(model_dir)  # before scoring: the day its prompts carry, were the scoring to cross midnight
    scored = (score_preference_dir(model_dir, root / "artifacts/prepared", params.eval) if split == "preference_heldout"
              else evaluate_model_dir(model_dir, load_split(root / "artifacts/prepared", split, params.eval.max_examples), params.eval))
    result = {"metrics": scored["metrics"], "per_example": scored["per_example"], "samples": scored.get("samples", []),
              "date": day}
    write_atomic(cache, json.dumps(result))  # a run stopped mid-write leaves no half a file for the next to read
    return result


@task(name="register-candidate", retries=2, retry_delay_seconds=3)
def register(root: Path, params: Params, run_id: str, verdict: dict, metrics: dict, lineage: dict) -> str:
    """A new model version with its lineage and verdict; `challenger` points at it."""
    failed = [c["name"] for c in verdict["checks"] if not c["passed"]]
    tags = {
        **lineage,
        "gate_passed": str(verdict["passed"]).lower(),
        "gate_failed_checks": ",".join(failed) or "none",
        **metric_tags(metrics),
    }
    return register_candidate(run_id, candidate_dir(root / "artifacts/model", root / "artifacts/preference"),
                              params.registry.model_name, tags)


@task(name="package-bento", retries=1, retry_delay_seconds=3)
def package(root: Path, model_name: str, version: str, build: bool) -> dict:
    """Import the model into the BentoML store; build a bento from serving/ when it became champion."""
    from tasks.registry.bento import build_bento, import_model

    model_dir = candidate_dir(root / "artifacts/model", root / "artifacts/preference")
    model_tag = import_model(model_dir, model_name, version, {"mlflow_version": version})
    return {"model": model_tag, "bento": build_bento(model_tag, version, root) if build else None}


# Prefect shows a flow run's state name in its run list and can filter on it. A rejected
# candidate ends *Completed* named "Rejected", not Failed: the pipeline did its job (the gate
# is working as intended), so flow retries, failure automations and "failed runs" counts stay
# about a broken pipeline, which `ftllm run` also keeps apart (exit 3 rejected, 1 failed).
# The name makes a rejection easy to filter and to trigger on, and the notification is sent
# from the result's status, whatever the state.
def _final_state(status: str, changed: bool, message: str, result: Any) -> State:
    """The flow run's final state: what happened, in its name and message."""
    if status == "failed":
        return failed_on_purpose(message, data=result)  # no engine traceback on a worker
    if not changed:
        return Completed(name="Unchanged", message=message, data=result)
    if status == "rejected":
        return Completed(name="Rejected", message=message, data=result)
    return Completed(message=message, data=result)


@flow(name="retrain", log_prints=True, timeout_seconds=6 * 3600)
def retrain(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    data: DataParams | None = None,
    train: TrainParams | None = None,
    eval: EvalParams | None = None,
    gate: GateParams | None = None,
) -> State:
    """Retrain, gate, register and package a model.

    Args:
        params_file: the settings file (params.yaml).
        overrides: dotted keys to values (`{"train.max_steps": 100}`), applied to the whole run.
        data: the data section; its fields override params.yaml's one by one (the run form).
        train: the training section; its fields override params.yaml's one by one.
        eval: the evaluation section; its fields override params.yaml's one by one.
        gate: the gate's thresholds; they override params.yaml's one by one.

    A section is merged onto params.yaml's, not put in its place: only the fields it sets
    change (a partial section from the API, `-p train='{"max_steps": 50}'`, sets one). The
    run form fills a section from params.yaml's values as `ftllm deploy` read them
    (flows/deploy.py), so a field left as the form shows it keeps the project's value.
    Optional fields with the project's value as a placeholder would avoid that copy, but
    the UI shows an empty field where the user expects the setting in force.

    Returns:
        The run's final state: Completed (promoted), Completed named "Rejected" (the gate
        refused the candidate) or "Unchanged" (nothing new to register), or Failed with the
        one-line reason; its data is the run's `RunResult` (with `error` set when it failed).
    """
    result = RunResult()
    try:
        _retrain(params_file, overrides, {"data": data, "train": train, "eval": eval, "gate": gate}, result)
    except FtllmError as exc:  # one clear message; anything else is a bug and keeps its traceback
        get_run_logger().error(str(exc))
        result.status, result.error = "failed", str(exc)
        result.exit_code = EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED  # settings: exit 2
    send_notification(result)
    state = _final_state(result.status, result.changed, outcome_line(result.model_dump(mode="json")), result)
    details = result.model_dump(mode="json", include={"version", "champion_version", "gate", "error", "mlflow_run_id"})
    announce_outcome(state.name, result.status if result.changed else "unchanged", result.model_name, details)
    return state


def _retrain(params_file: str, overrides: dict | None, sections: dict, result: RunResult) -> None:
    logger = get_run_logger()
    root = Path(params_file).resolve().parent
    apply_defaults(root)  # a worker starts the flow without the CLI: same embedded defaults
    overrides = {**(overrides or {}), **section_overrides(sections)}
    params = load_params(params_file, overrides)
    result.model_name = params.registry.model_name
    check_fit(params, root=root)  # the base model loads and fits the settings, the data is there: before any wait
    # Held feedback is approved first (flows/approval.py), before the run takes the workspace.
    if params.data.reads_feedback():
        result.approval = review_held_feedback(default_db_path(root), params.feedback, params.registry.model_name)
    # The workspace is this run's until it has registered what its stages wrote: a second run waits.
    with workspace_lock(root, log=logger.info):
        _retrain_in_workspace(root, params_file, params, overrides, result)


def _retrain_in_workspace(root: Path, params_file: str, params: Params, overrides: dict, result: RunResult) -> None:
    logger = get_run_logger()
    durations = result.durations
    data_path = Path(params.data.path) if Path(params.data.path).is_absolute() else root / params.data.path
    result.champion_version = champion_version(params.registry.model_name)
    result.data = DataSummary(path=str(data_path))

    t = time.perf_counter()
    params, overrides, exported = _take_in_feedback(root, params_file, params, overrides)
    sources = params.data.source_list()
    paths = [Path(s.file) if Path(s.file).is_absolute() else root / s.file for s in sources]
    others = train_rows(sources, paths)
    exported.update({i: export_feedback_snapshot(root, s, paths[i], params, others)
                     for i, s in enumerate(sources) if s.feedback and i not in exported})
    preference = export_preference_snapshot(root, params) if exported else None
    result.feedback = next(({**{k: v for k, v in e.items() if k != "tags"}, "preference": preference_counts(preference)}
                            for e in exported.values()), None)  # what the ratings became, beside the export
    feedback_read = max((e["last_feedback_id"] for e in exported.values()), default=None)
    result.data.feedback_id = feedback_read
    # An empty feedback export (nothing rated or corrected yet) is no data error: it adds nothing.
    source_reports = [
        None if i in exported and exported[i]["examples"] == 0
        else validate_data(params, path, root / "artifacts/reports", s.format or params.data.format)
        for i, (s, path) in enumerate(zip(sources, paths))
    ]
    durations["validate"] = round(time.perf_counter() - t, 2)
    described = [{"path": s.file, "md5": file_md5(path), "feedback": s.feedback, "invalid_rows": s.invalid_rows}
                 for s, path in zip(sources, paths)]  # paths as prepare's stats.json names them: one md5 on every checkout
    result.data = summarise_sources(str(data_path), described, source_reports)
    result.data.feedback_id = feedback_read
    reports: list[Path] = []
    for i, (source, path, report) in enumerate(zip(sources, paths, source_reports)):
        if report is None:
            continue
        written = write_reports(report, root / "artifacts/reports" / ("" if i == 0 else f"sources/{i}"))
        reports += written
        if not accept_report(source_label(i, params.data), source, report):  # beyond a drop's share: raises
            result.validation = combine_reports(source_reports, accepted=False)
            _publish_validation(path, report, written, None)
            rows = ", ".join(f"line {r['line']}: {r['category']}" for r in report["error_rows"][:10])
            raise RunFailed(f"{path}: invalid data ({rows}); run `ftllm validate {path}` for the full report")
    result.validation = combine_reports(source_reports, accepted=True)
    report = next((r for r in source_reports if r is not None), None) or {
        "valid": True, "examples": 0, "errors": {}, "warnings": {}, "error_rows": []}

    lineage = {"data_md5": result.data.md5, "git_commit": git_commit(root), "params_digest": params.digest(),
               "data_sources": json.dumps([{"path": s.path, "md5": s.md5} for s in result.data.sources])}
    if feedback_read is not None:
        lineage["feedback_id"] = str(feedback_read)  # the monitor's cursor moves to it once the stages trained
    origin = flow_run_origin()
    inputs = [(Path(s.path), s.md5, "feedback" if s.feedback else "training") for s in result.data.sources]
    inputs += [(Path(preference["path"]), preference["md5"], "preference")] if preference and preference["examples"] else []
    params, overrides = warm_start(root, params, overrides, result.champion_version)  # train.init_from: champion
    run_id = start_tracking_run(root, params, overrides, data_path, lineage["data_md5"], lineage, origin, inputs)
    result.mlflow_run_id = run_id
    log_files(run_id, reports[:2], "reports")
    for i in range(1, len(sources)):
        log_files(run_id, [r for r in reports[2:] if f"sources/{i}/" in r.as_posix()], f"reports/source-{i}")
    # the feedback (and preferences) the run trained on, as exported
    log_files(run_id, [paths[i] for i in exported if i >= 0]
              + ([Path(preference["path"])] if preference and preference["md5"] else []), "data")
    for e in [*exported.values(), *([preference] if preference else [])]:  # who sent it, what was held, capped, redacted
        set_run_tags(run_id, e["tags"])
    _publish_validation(data_path, report, tuple(reports[:2]) or (None, None), run_id)
    lineage.update(link_tags(origin, run_id))  # the model version links back to both runs
    try:
        t = time.perf_counter()
        # Every setting of the run, not only the overrides: `resolve` reads params.yaml, the run may have --params
        stages = run_dvc_stages(root, as_overrides(params), run_id, params.workers)
        if "error" in stages:
            raise StageError(stages["error"])
        durations["stages"] = round(time.perf_counter() - t, 2)
        result.stages = StagesSummary.model_validate(stages)
        if feedback_read is not None:  # trained on it: whatever the gate says, this feedback was read
            advance_monitor_cursor(params.registry.model_name, feedback_read, max(e["last_decision"] for e in exported.values()),
                                   default_db_path(root), next((e["log_id"] for e in exported.values() if e["log_id"]), ""))
        t = time.perf_counter()
        result.dvc_push = push_dvc_outputs(root)
        durations["dvc_push"] = round(time.perf_counter() - t, 2)
        _record_prepared(root, run_id, result, lineage)
        metrics = json.loads((root / "artifacts/metrics.json").read_text())
        tuned = stage_out_md5(root, "preference", "artifacts/preference")
        fingerprint = f"{stage_out_md5(root, 'finetune', 'artifacts/model')}:{tuned}:{params.model_digest()}"
        lineage.update(dvc_lock_md5=lock_digest(root), fingerprint=fingerprint)
        existing = find_version(params.registry.model_name, "fingerprint", fingerprint)
        if existing is not None:
            logger.info(f"nothing changed since version {existing}: no new version registered")
            create_markdown_artifact(f"## Nothing changed\n\nSame model and settings as version {existing}.", key="retrain-unchanged")
            end_tracking_run(run_id, "FINISHED")
            _unchanged(result, params, existing)
            return

        t = time.perf_counter()
        champion = result.champion_version
        per_example_path = root / "artifacts/per_example.json"
        per_example = json.loads(per_example_path.read_text()) if per_example_path.exists() else {}
        champion_samples: dict[str, list] = {}  # its predictions beside the candidate's, on the dashboard
        # the test split; the cases users corrected, held out of training; the held-out preference split
        for split, candidate, role in (("test", "candidate", "champion"), ("feedback", "candidate_feedback", "champion_feedback"),
                                       ("preference_heldout", "candidate_preference", "champion_preference")):
            if champion is not None and candidate in metrics:
                scored = evaluate_champion(root, params, champion, split)
                metrics[role], per_example[role], champion_samples[role] = scored["metrics"], scored["per_example"], scored["samples"]
        durations["evaluate_champion"] = round(time.perf_counter() - t, 2)
        verdict = apply_gate(metrics, params.gate, per_example).to_dict()
        result.gate = GateResult.model_validate(verdict)
        result.metrics = RunMetrics.model_validate(metrics)
        docs = Path(report["data_docs"]).parent if report.get("data_docs") else None
        files = [root / "dvc.lock", root / "artifacts/predictions.json", root / "artifacts/per_example.json",
                 root / "artifacts/params.yaml"]
        log_results(run_id, metrics, verdict, files, docs)

        # The fingerprint is tagged last: a run that fails after registering leaves a version
        # that the next identical run does not mistake for a finished one.
        t = time.perf_counter()
        tags = {k: v for k, v in lineage.items() if k != "fingerprint"}
        version = register(root, params, run_id, verdict, metrics, {**tags, "parent_champion": champion or "none"})
        result.version = version
        durations["register"] = round(time.perf_counter() - t, 2)

        # Package before promoting: a failed build must leave the champion where it was.
        t = time.perf_counter()
        promoted = verdict["passed"] and params.registry.auto_promote
        bento = package(root, params.registry.model_name, version, build=promoted)
        result.bento, result.bento_model = bento["bento"], bento["model"]
        durations["package"] = round(time.perf_counter() - t, 2)
        if promoted:
            promote(params.registry.model_name, version)
            result.champion_version = version
        tag_version(params.registry.model_name, version, "fingerprint", fingerprint)
        result.status = "promoted" if promoted else "rejected"
        if not verdict["passed"]:
            logger.warning(f"gate rejected version {version}: failed {[c['name'] for c in verdict['checks'] if not c['passed']]}")
        _publish(root, verdict, metrics, result, champion_samples, source_reports, lineage)
        end_tracking_run(run_id, "FINISHED")
    except BaseException:
        end_tracking_run(run_id, "FAILED")
        raise


def _unchanged(result: RunResult, params: Params, version: str) -> None:
    """Fill in `result` for a run that found its model registered already as `version`."""
    from tasks.registry.versions import list_versions

    row = next(r for r in list_versions(params.registry.model_name) if r["version"] == version)
    result.version, result.changed = version, False
    result.champion_version = champion_version(params.registry.model_name)
    result.status = "promoted" if result.champion_version == version else "rejected"
    result.metrics = RunMetrics(candidate=row["metrics"])
    result.gate = GateResult(passed=row["gate_passed"])


if __name__ == "__main__":
    apply_defaults()
    print(retrain(return_state=True).result(raise_on_failure=False).model_dump_json())
