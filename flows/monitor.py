"""The `monitor` flow: what production feedback says, as a Prefect event that can start `retrain`.

On its schedule (`monitor.cron`), the flow reads the service's feedback log
(`feedback.db`, see tasks/feedback/) and the prompts it served, measures

- new ratings and new corrections since the last retraining that read them,
- the mean of the latest `monitor.window` new ratings of the champion's answers (late ratings
  of an earlier version's answers count as ratings, not against the champion),
- drift of the latest prompts against the train split (prompt length, unknown-token rate),

publishes them as Prefect artifacts, and emits one event, `ftllm.monitor.checked`, about the
resource `ftllm.model.<registry.model_name>`, with the figures in its payload and the label
`ftllm.retrain-recommended` ("true" / "false"). The decision is the monitor's
(`tasks.monitor.signals.recommend_retrain`, thresholds under `monitor:` in params.yaml); the
reaction is Prefect's: `retrain_trigger` is a deployment trigger on the `retrain`
deployment that matches that label, registered by `ftllm deploy` (flows/deploy.py), so
the automation runs on the Prefect server and no loop of ours waits for anything.

What is "new" is what comes after the cursor (`tasks/monitor/cursor.py`): the highest
feedback id a retraining run has read into its data, and held feedback a person approved
after that run read the log. The monitor only reads it; the run
that trains on the feedback moves it, so corrections add up across checks until a run has
read them, a run that never read them (no feedback source, or a failure before its stages
trained) leaves them counted as new, and a rejected run's feedback does not start the same
retraining again. Settings under which a run would not read the feedback
(`data.feedback: false` and no `{feedback: true}` source) make the monitor recommend no
retraining, and its verdict says why.

Run it once against the embedded defaults:

    python -m flows.monitor
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from tasks.config import MonitorParams, Params, load_params
from tasks.environment import apply_defaults
from tasks.errors import EXIT_FAILED, FtllmError
from tasks.feedback import FeedbackReader, default_db_path
from tasks.monitor.cursor import Cursor, cursor_variable, read_cursor
from tasks.monitor.signals import (
    Drift,
    FeedbackFigures,
    measure_drift,
    read_feedback,
    recent_prompts,
    recommend_retrain,
)

EVENT = "ftllm.monitor.checked"
RECOMMENDED_LABEL = "ftllm.retrain-recommended"


def model_resource(model_name: str) -> str:
    """The id of the resource the monitor's events are about."""
    return f"ftllm.model.{model_name}"


def retrain_trigger(model_name: str, monitor: MonitorParams):
    """The deployment trigger that starts `retrain` on a monitor event recommending it."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"retrain {model_name} when production feedback says so",
        description="Started by flows/monitor.py's event when monitor.* thresholds in params.yaml are crossed.",
        enabled=monitor.retrain,
        expect={EVENT},
        match={"prefect.resource.id": model_resource(model_name), RECOMMENDED_LABEL: "true"},
        posture="Reactive",
        threshold=1,
        within=0,
    )


@task(name="read-monitor-cursor")
def read_monitor_cursor(model_name: str) -> Cursor:
    """The highest feedback id and the last review decision a retraining run has read (zeros before the first)."""
    return read_cursor(model_name)


@task(name="read-feedback")
def collect_feedback(db: Path, since: Cursor, window: int, low_rating: int = 2, auto_approve: str = "trusted",
                     champion: str | None = None, model_name: str | None = None) -> FeedbackFigures:
    """New ratings, low ratings and corrections of `model_name`'s answers since `since`, the mean
    rating of `champion`'s answers; zeros (and a warning) when the service has logged nothing yet."""
    if not db.is_file():
        get_run_logger().warning(f"{db}: no feedback log yet (FTLLM_FEEDBACK_DB, or feedback.db beside params.yaml)")
        return FeedbackFigures(since.feedback_id, since.feedback_id, 0, 0, 0, None, 0, champion=champion)
    figures = read_feedback(db, since.feedback_id, window, low_rating, since.decision, auto_approve, champion, since.log,
                            model_name)
    if figures.new_log:
        get_run_logger().warning(f"{db}: the cursor (feedback id {since.feedback_id}) was read in another log: "
                                 "a new or replaced log; all of its feedback counts as new")
    return figures


@task(name="read-champion")
def serving_version(model_name: str) -> str | None:
    """The champion's version, whose answers the mean rating is of; None (every answer, and a
    warning) where the registry cannot be read."""
    from mlflow.exceptions import MlflowException

    from tasks.registry.versions import champion_version

    try:
        return champion_version(model_name)
    except (MlflowException, OSError) as exc:
        get_run_logger().warning(f"the registry could not be read ({str(exc).splitlines()[0]}): the mean rating "
                                 "is of every version's answers")
        return None


@task(name="measure-drift")
def drift_of_prompts(root: Path, params: Params, db: Path) -> Drift | None:
    """Prompt drift of the latest served prompts against the train split, with the run's tokenizer."""
    from tasks.model.loading import load_tokenizer, resolve_base

    train = root / "artifacts/prepared/train.jsonl"
    if not db.is_file() or not train.is_file():
        get_run_logger().warning(f"no drift measured: {db if not db.is_file() else train} is missing")
        return None
    # The trained model folder holds the run's tokenizer; before the first run, the base's.
    model_dir = root / "artifacts/model"
    tokenizer = load_tokenizer(str(model_dir) if (model_dir / "tokenizer_config.json").is_file() else resolve_base(params.model))
    return measure_drift(tokenizer, train, recent_prompts(db, params.monitor.window, params.registry.model_name))


def _publish(model_name: str, figures: FeedbackFigures, drift: Drift | None, recommended: bool, reasons: list[str],
             alerts: list[str]) -> None:
    rows = [{"figure": k, "value": v} for k, v in asdict(figures).items()]
    rows += [{"figure": f"drift.{k}", "value": v} for k, v in (asdict(drift) if drift else {}).items()]
    create_table_artifact(rows, key="monitor-figures", description=f"Production feedback of {model_name}")
    verdict = "retraining recommended" if recommended else "no retraining recommended"
    lines = [f"## {model_name}: {verdict}", ""]
    lines += [f"- {r}" for r in reasons] or ["- below every monitor.* threshold"]
    if alerts:
        lines += ["", "### Drift", "", *[f"- {a}" for a in alerts]]
    create_markdown_artifact("\n".join(lines), key="monitor-verdict", description="Monitor verdict")


@flow(name="monitor", log_prints=True)
def monitor(params_file: str = "params.yaml", feedback_db: str | None = None,
            overrides: dict[str, Any] | None = None) -> dict | State:
    """Read production feedback, publish the figures, and emit the event that may start `retrain`.

    Args:
        params_file: the settings file (params.yaml); thresholds under `monitor:`.
        feedback_db: the service's log; default FTLLM_FEEDBACK_DB, else feedback.db beside params.yaml.
        overrides: dotted keys to values on top of the file (`ftllm deploy --set` puts them in the
            deployment's parameters, so scheduled checks read what was deployed).

    Returns:
        The event's payload with the model name and event id; or a Failed state whose
        message is the reason, when the settings or the log cannot be read (no event then).
    """
    from prefect.events import emit_event

    logger = get_run_logger()
    root = Path(params_file).resolve().parent
    apply_defaults(root)
    try:
        params = load_params(params_file, overrides, sections=("data", "model", "registry", "monitor", "feedback"))
        db = Path(feedback_db) if feedback_db else default_db_path(root)
        if db.is_file():
            with FeedbackReader(db):  # a file that is no log: one clear line, not a failed task's traceback
                pass
    except FtllmError as exc:
        logger.error(str(exc))
        return Failed(message=str(exc))
    model_name = params.registry.model_name

    since = read_monitor_cursor(model_name)
    figures = collect_feedback(db, since, params.monitor.window, params.monitor.low_rating, params.feedback.auto_approve,
                               serving_version(model_name), model_name)
    drift = drift_of_prompts(root, params, db)
    recommended, reasons, alerts = recommend_retrain(figures, drift, params.monitor, params.data.reads_feedback())
    payload = {
        "feedback": asdict(figures), "drift": asdict(drift) if drift else None,
        "retrain_recommended": recommended, "reasons": reasons, "drift_alerts": alerts,
        "thresholds": params.monitor.model_dump(include={"window", "min_ratings", "min_mean_rating", "min_new_corrections",
                                                         "low_rating", "min_new_low_ratings"}),
    }
    event = emit_event(
        EVENT,
        resource={"prefect.resource.id": model_resource(model_name), "prefect.resource.name": model_name,
                  RECOMMENDED_LABEL: str(recommended).lower()},
        payload=payload,
    )
    _publish(model_name, figures, drift, recommended, reasons, alerts)
    if recommended:
        logger.info(f"retraining recommended for {model_name}: {'; '.join(reasons)}")
    else:
        logger.info(f"no retraining recommended for {model_name}: {'; '.join(reasons) or 'below every threshold'} "
                    f"({figures.new_ratings} new ratings, {figures.new_corrections} new corrections; "
                    f"cursor {cursor_variable(model_name)} at feedback id {since.feedback_id}, decision {since.decision})")
    return {**payload, "model_name": model_name, "event_id": str(event.id) if event else None}


if __name__ == "__main__":
    apply_defaults()
    final = monitor(return_state=True)
    if final.is_failed():
        print(f"error: {final.message}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED)
    print(json.dumps(final.result(), default=str))
