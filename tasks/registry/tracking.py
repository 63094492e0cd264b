"""MLflow tracking of a retraining run: the run itself, its settings, data inputs and results.

The retrain flow opens one MLflow run per retraining run and hands its id to the DVC
stages (MLFLOW_RUN_ID), so training curves, evaluation metrics, the gate verdict and the
registered model all hang off the same run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from tasks.config import Params
from tasks.registry.versions import ensure_experiment

EXPERIMENT = "retrain"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def start_tracking_run(
    root: Path, params: Params, overrides: dict, data_path: Path, data_md5: str, tags: dict[str, str]
) -> str:
    """Open the run (left open for the stages), log every setting and the data as a dataset input."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    exp_id = ensure_experiment(EXPERIMENT, root / "mlartifacts")
    # A client-created run stays RUNNING with no active-run state in this process; the
    # stages attach to it with mlflow.start_run(run_id=...).
    client = mlflow.MlflowClient()
    run_id = client.create_run(exp_id, tags={**tags, "overrides": json.dumps(overrides)}).info.run_id
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params(_flatten("", params.model_dump(mode="json"), {}))
        with warnings.catch_warnings():  # a local path matches two equivalent source kinds
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(data_path.resolve()))
        mlflow.log_input(MetaDataset(source, name=data_path.name, digest=data_md5), context="training")
    return run_id


def log_results(
    run_id: str, metrics: dict[str, dict[str, float]], verdict: dict, files: list[Path], data_docs: Path | None = None
) -> None:
    """Log every model's metrics (prefixed with the model's role), the verdict, result files
    and the Great Expectations Data Docs site of the validation."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        flat = {f"{role}.{k}": float(v) for role, m in metrics.items() for k, v in m.items()}
        mlflow.log_metrics(flat)
        mlflow.log_dict(verdict, "gate_verdict.json")
        mlflow.set_tag("gate_passed", str(verdict["passed"]).lower())
        for f in files:
            if f.exists():
                mlflow.log_artifact(str(f))
        if data_docs is not None and data_docs.is_dir():
            mlflow.log_artifacts(str(data_docs), "data_docs")


def run_link(run_id: str) -> str:
    """Where to look at a run: its page in the MLflow UI (`mlflow ui`, or the tracking server)."""
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    uri = mlflow.get_tracking_uri()
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def end_tracking_run(run_id: str, status: str) -> None:
    """Close the run as FINISHED or FAILED."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


def runs_for_data(data_md5: str) -> list[dict]:
    """Retraining runs whose data had this md5 (lineage from data to runs)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.data_md5 = '{data_md5}'", output_format="list")
    return [{"run_id": r.info.run_id, "status": r.info.status, "version": r.data.tags.get("model_version")} for r in runs]
