"""The retrain flow's Prefect artifacts (validation, metrics, predictions, gate, run dashboard) and notification.

Each links to the MLflow run, the model version and the offline pages, so an operator
goes from the Prefect UI to the evidence in one click. Called by flows/retrain.py only.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.evaluate.gate import gate_table
from tasks.pipeline.dashboard import RunView, load_run_files, merge_validation, write_dashboard
from tasks.pipeline.notify import notify_run
from tasks.pipeline.result import RunResult
from tasks.registry.tracking import (
    artifact_link,
    dataset_name,
    flow_run_origin,
    log_files,
    run_link,
    version_link,
)

DATA_REPORT = "reports/validation.html"


def _publish_validation(data_path: Path, report: dict, reports: tuple[Path, Path], run_id: str | None) -> None:
    """The validation artifact: the verdict and counts, linking to the offline data report."""
    html = f"[{DATA_REPORT}]({artifact_link(run_id, DATA_REPORT)}) (MLflow run)" if run_id else f"`{reports[1]}`"
    create_markdown_artifact(
        f"## Validation of `{data_path}`: {'valid' if report['valid'] else 'INVALID'}\n\n"
        f"examples: {report['examples']}, errors: {report['errors']}, warnings: {report['warnings']}\n\n"
        f"Data report (offline HTML): {html}; on disk: `{reports[1]}`\n\n"
        f"Data Docs (Great Expectations, need network): {report.get('data_docs')}",
        key="retrain-validation",
        description="Data validation of the run's data: verdict, counts and the offline data report",
    )


def _metrics_table(metrics: dict[str, dict]) -> list[dict]:
    keys = ["exact_match", "bleu", "rouge_l", "perplexity", "latency_p95_ms", "tokens_per_second"]
    return [{"model": role, **{k: round(m[k], 4) for k in keys if k in m}} for role, m in metrics.items()]


def _source_report_links(run_id: str, reports: list[dict | None]) -> list[str | None]:
    """Each source's validation report in the MLflow run (reports/, then reports/source-<i>/); None where none was written."""
    return [None if report is None else artifact_link(run_id, DATA_REPORT if i == 0 else f"reports/source-{i}/validation.html")
            for i, report in enumerate(reports)]


def _publish(root: Path, verdict: dict, metrics: dict, result: RunResult, champion_samples: dict,
             source_reports: list[dict | None], lineage: dict) -> None:
    """Prefect artifacts of a gated run, linking to the MLflow run, the model version and the run dashboard.

    Args:
        champion_samples: the champion's first predictions per role (champion, champion_feedback),
            beside the candidate's in predictions.json.
        source_reports: each source's validation report (None for an empty feedback export).
    """
    run_id, name, version = result.mlflow_run_id, result.model_name, result.version
    create_table_artifact(_metrics_table(metrics), key="retrain-metrics", description="Candidate vs baselines vs champion")
    predictions = root / "artifacts/predictions.json"
    samples = {**(json.loads(predictions.read_text()) if predictions.exists() else {}), **champion_samples}
    rows = [{"model": role, **sample} for role, items in samples.items() for sample in items[:5]]
    create_table_artifact(rows, key="retrain-predictions", description="Predictions next to references (test split)")
    links = {"MLflow run": run_link(run_id), "model version": version_link(name, version),
             "Prefect flow run": lineage.get("prefect.flow_run_url"), "data report": artifact_link(run_id, DATA_REPORT)}
    paths = [Path(s.path) for s in result.data.sources] if result.data else []
    view = RunView(name, version, result.status, result.champion_version, metrics, verdict,
                   validation=merge_validation(source_reports),
                   lineage={k: v for k, v in lineage.items() if not k.startswith("prefect.")},
                   links=links, feedback=result.feedback, samples=samples,
                   source_reports=_source_report_links(run_id, source_reports), dataset=dataset_name(paths) or None,
                   **load_run_files(root))
    log_files(run_id, [write_dashboard(view, root / "artifacts/reports/dashboard.html")], "reports")
    dashboard = artifact_link(run_id, "reports/dashboard.html")
    create_link_artifact(dashboard, link_text=f"{name} v{version}: run dashboard", key="retrain-dashboard",
                         description="Metrics, gate, sample predictions, loss curve, data per source and lineage on "
                                     "one offline page (MLflow artifact)")
    lines = [f"## Gate: {'PASSED' if verdict['passed'] else 'REJECTED'}", "", *gate_table(verdict["checks"])]
    lines += [f"- {note}" for note in verdict.get("notes", [])]
    lines += [
        "", f"model version [{version}]({links['model version']}), champion {result.champion_version}",
        "", f"MLflow run: [{run_id}]({links['MLflow run']}) · [run dashboard]({dashboard}) · [data report]({links['data report']})",
        "", f"Data Docs (Great Expectations, need network): {result.validation.data_docs if result.validation else None}",
    ]
    create_markdown_artifact("\n".join(lines), key="retrain-gate", description="Gate verdict")


@task(name="notify")
def send_notification(result: RunResult) -> str | None:
    """Tell the configured webhook or Prefect block about a rejected or failed run."""
    import httpx

    origin = flow_run_origin()
    links = {"Prefect flow run": origin.url or origin.tags().get("prefect.flow_run_url")}
    if result.mlflow_run_id:
        links["MLflow run"] = run_link(result.mlflow_run_id)
    try:
        return notify_run(result.model_dump(mode="json"), {k: v for k, v in links.items() if v})
    except (httpx.HTTPError, ValueError) as exc:  # a lost notification must not fail the run
        get_run_logger().warning(f"notification not sent: {exc}")
        return None
