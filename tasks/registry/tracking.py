"""MLflow tracking of a retraining run: the run itself, its settings, data inputs and results.

The retrain flow opens one MLflow run per retraining run and hands its id to the DVC
stages (MLFLOW_RUN_ID), so training curves, evaluation metrics, the gate verdict and the
registered model all hang off the same run.

The MLflow run carries the Prefect flow run that opened it: it is named after the flow run,
tagged with its id and UI address, and its description links there; the Prefect run's
artifacts and the model version link back (`run_link`, `version_link`, `link_tags`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params, resolved_settings
from tasks.errors import UsageError
from tasks.registry.versions import ensure_experiment

EXPERIMENT = "retrain"
# Where `mlflow ui` listens by default; a tracking server's own address replaces it.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
# MLflow 3.17's UI picks its view from this query parameter (else from the browser's last
# choice, GenAI by default, where these runs do not show): links open the training view.
ML_VIEW = "?workflowType=machine_learning"
# What the flow-run address tag says when the run went through Prefect's ephemeral API,
# which keeps no UI: an operator must not look for a page that never existed.
NO_PREFECT_UI = "none: ephemeral Prefect API (start `prefect server start` and set PREFECT_API_URL to keep runs in a UI)"
SOURCE = "flows/retrain.py:retrain"


@dataclass(frozen=True)
class FlowRunOrigin:
    """The Prefect flow run a tracking run belongs to; `url` is None on the ephemeral API."""

    id: str | None
    name: str | None
    url: str | None

    def tags(self) -> dict[str, str]:
        """Tags that lead from an MLflow run or model version back to the flow run."""
        if self.id is None:
            return {}
        return {"prefect.flow_run_id": self.id, "prefect.flow_run_name": self.name or "",
                "prefect.flow_run_url": self.url or NO_PREFECT_UI}


def flow_run_origin() -> FlowRunOrigin:
    """The flow run this code runs in (all None outside one).

    Its UI address comes from PREFECT_UI_URL, which Prefect derives from PREFECT_API_URL;
    with no API URL set the run went through the ephemeral API, and there is no page to link.
    """
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.urls import url_for

    run_id = flow_run.get_id()
    if run_id is None:
        return FlowRunOrigin(None, None, None)
    # url_for gives the page the UI serves (`/runs/flow-run/<id>`), the one Prefect's own "View at" log line names.
    url = url_for("flow-run", obj_id=run_id) if PREFECT_API_URL.value() else None
    return FlowRunOrigin(str(run_id), flow_run.get_name(), url)


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def dataset_name(paths: list[Path]) -> str:
    """The name of a run's dataset in MLflow: its files' names, joined ("dates.jsonl + feedback.jsonl")."""
    return " + ".join(Path(p).name for p in paths)


def start_tracking_run(
    root: Path,
    params: Params,
    overrides: dict,
    data_path: Path,
    data_md5: str,
    tags: dict[str, str],
    origin: FlowRunOrigin | None = None,
    inputs: list[tuple[Path, str, str]] = (),
) -> str:
    """Open the run (left open for the stages), log every setting and the data as dataset inputs.

    With one source the dataset is that file. With several, the dataset the run trained on
    is all of them: it is named after every file (`dataset_name`) and has their combined md5
    (`data_md5`, as prepare's stats.json computes it), and each source is logged beside it
    with its own md5, in its own context ("source" or "feedback").

    Args:
        data_path, data_md5: the data file (the first source's) and the data's md5 (every
            source's combined, when there are several).
        origin: the Prefect flow run; the MLflow run takes its name, and its tags and
            description (shown on the run's page) lead back to it.
        inputs: every input of the run, each (path, md5, context): the sources of
            `data.sources` in their order ("training" or "feedback"), then the preference
            export ("preference"). Empty: `data_path` alone.
    """
    import mlflow

    exp_id = ensure_experiment(EXPERIMENT, root / "mlartifacts")
    origin = origin or FlowRunOrigin(None, None, None)
    run_tags = {**tags, **origin.tags(), "overrides": json.dumps(overrides), "mlflow.source.name": SOURCE,
                "mlflow.source.type": "LOCAL", "mlflow.note.content": _description(origin)}
    # A client-created run stays RUNNING with no active-run state in this process; the
    # stages attach to it with mlflow.start_run(run_id=...).
    client = mlflow.MlflowClient()
    run_id = client.create_run(exp_id, run_name=origin.name, tags=run_tags).info.run_id
    sources = [(Path(path), md5, context) for path, md5, context in inputs if context != "preference"]
    with mlflow.start_run(run_id=run_id):
        # As the stages read them (artifacts/params.yaml): with the md5 of every file they name.
        from tasks.evaluate.baselines import prompt_date  # the day the resolve stage writes in

        mlflow.log_params(_flatten("", resolved_settings(params, prompt_date(params), root), {}))
        if len(sources) > 1:
            paths = [path for path, _, _ in sources]
            common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
            _log_dataset(common, dataset_name(paths), data_md5, "training")
            for path, md5, context in sources:
                _log_dataset(path, path.name, md5, "feedback" if context == "feedback" else "source")
        else:
            _log_dataset(Path(data_path), Path(data_path).name, data_md5, "training")
        for path, md5, context in inputs:
            if context == "preference":
                _log_dataset(Path(path), Path(path).name, md5, context)
    return run_id


def _log_dataset(path: Path, name: str, md5: str, context: str) -> None:
    """One dataset input of the active run: a file or folder by its path, name and md5."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two equivalent source kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
        mlflow.log_input(MetaDataset(source, name=name, digest=md5), context=context)


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


def _description(origin: FlowRunOrigin) -> str:
    """The run's description (markdown on its MLflow page): where it was started from."""
    if origin.id is None:
        return f"Started by `{SOURCE}` outside a Prefect flow run."
    where = f"[{origin.name}]({origin.url})" if origin.url else f"`{origin.name}` ({NO_PREFECT_UI})"
    return f"Prefect flow run {where}, id `{origin.id}`."


def mlflow_ui_base() -> str:
    """The MLflow UI's address: the tracking server's, or where `mlflow ui` listens by default."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith("http") else LOCAL_MLFLOW_UI


def run_link(run_id: str) -> str:
    """Where to look at a run: its page in the MLflow UI (`mlflow ui`, or the tracking server)."""

    return f"{_run_page(run_id)}{ML_VIEW}"


def _run_page(run_id: str) -> str:
    import mlflow

    run = mlflow.MlflowClient().get_run(run_id)
    return f"{mlflow_ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def artifact_link(run_id: str, path: str) -> str:
    """The page of one of a run's artifacts in the MLflow UI (its preview shows HTML)."""
    return f"{_run_page(run_id)}/artifacts/{path}{ML_VIEW}"


def log_prepared(run_id: str, artifacts: Path) -> str:
    """Log prepare's stats.json and tag the run with every source's md5 and counts, the preference file's
    among them (`"preference": true`); the tag's value (JSON). Also what the preference stage did
    (`log_preference_stage`), whether it ran in this run or DVC kept its output."""
    from mlflow import MlflowClient

    stats_path = Path(artifacts) / "prepared/stats.json"
    stats = json.loads(stats_path.read_text())
    listed = [{"path": s["path"], "md5": s["md5"], "kept": s["kept"], "invalid_dropped": s["invalid"],
               "length_dropped": s.get("length_dropped", 0)} for s in stats["sources"]]
    preference = stats.get("preference")
    if preference:
        kept = sum(split["examples"] for split in preference["counts"].values())
        listed.append({"path": preference["path"], "md5": preference["md5"], "kept": kept,
                       "invalid_dropped": preference["invalid"], "preference": True})
    sources = json.dumps(listed)
    client = MlflowClient()
    client.set_tag(run_id, "data_sources", sources)
    client.log_artifact(run_id, str(stats_path), "prepared")
    log_preference_stage(run_id, Path(artifacts) / "preference/preference.json")
    return sources


def log_preference_stage(run_id: str, summary_path: Path) -> None:
    """Tag the run with the preference stage's outcome when it tuned: `preference.kept` (the tuned
    model is the candidate) and the reason, and log the val exact match of both models and the losses."""
    from mlflow import MlflowClient

    if not summary_path.is_file():
        return
    summary = json.loads(summary_path.read_text())
    if not summary.get("ran"):
        return
    client = MlflowClient()
    client.set_tag(run_id, "preference.kept", str(summary.get("kept", False)).lower())
    client.set_tag(run_id, "preference.outcome", str(summary.get("reason", ""))[:5000])
    for key in ("val_exact_match_supervised", "val_exact_match_tuned", "first_loss", "final_loss"):
        if summary.get(key) is not None:
            client.log_metric(run_id, f"preference_{key}", float(summary[key]))


def set_run_tags(run_id: str, tags: dict[str, str]) -> None:
    """Tag a run (e.g. the provenance of its feedback, `feedback.keys`)."""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_files(run_id: str, files: list[Path], artifact_path: str) -> None:
    """Log files that exist to the run under `artifact_path`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for f in files:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), artifact_path)


def version_link(model_name: str, version: str) -> str:
    """The page of a model version in the MLflow UI."""
    return f"{mlflow_ui_base()}/#/models/{model_name}/versions/{version}{ML_VIEW}"


def link_tags(origin: FlowRunOrigin, run_id: str) -> dict[str, str]:
    """Tags of a model version that lead back to its flow run and its MLflow run."""
    return {**origin.tags(), "mlflow_run_url": run_link(run_id)}


def end_tracking_run(run_id: str, status: str) -> None:
    """Close the run as FINISHED or FAILED."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


def runs_for_data(data_md5: str) -> list[dict]:
    """Retraining runs whose data had this md5, or an md5 that begins with it (`ftllm models`
    shows its first 12 digits): lineage from data to runs.

    Raises:
        UsageError: `data_md5` is not hexadecimal digits.
    """
    import mlflow

    if not re.fullmatch(r"[0-9a-fA-F]{1,32}", data_md5):
        raise UsageError(f"--data-md5 {data_md5!r}: expected the md5's hexadecimal digits (all 32, or the first few)")
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.data_md5 LIKE '{data_md5.lower()}%'",
                              output_format="list")
    return [{"run_id": r.info.run_id, "status": r.info.status, "version": r.data.tags.get("model_version")} for r in runs]
