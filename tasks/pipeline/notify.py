"""Notify a webhook when a retraining run is rejected by the gate or fails.

The target comes from the environment, never from a file in the repository:
`FTLLM_NOTIFY_WEBHOOK` (a URL that receives a JSON POST) or `FTLLM_NOTIFY_BLOCK` (the name
of a saved Prefect notification block: Slack, Teams, email, a custom webhook...). The JSON
body holds `subject`, `status`, `model_name`, `version`, `champion_version`, `failed_checks`,
`error`, `mlflow_run_id` and `links` (the Prefect flow run's and MLflow run's pages, where
known); no secret is ever part of it.
"""

from __future__ import annotations

from tasks.environment import environment

NOTIFY_ON = ("rejected", "failed")


def _number(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def outcome_line(result: dict) -> str:
    """One line on what a run did: the flow run's final state message and the notification's first line."""
    version, champion = result.get("version"), result.get("champion_version")
    if result.get("status") == "failed":
        return (result.get("error") or "failed").splitlines()[0]
    if not result.get("changed", True):
        return f"nothing changed: same model and settings as version {version} (champion: {champion})"
    if result.get("status") == "promoted":
        return f"version {version} passed the gate and is champion"
    failed = [f"{c['name']} {_number(c['value'])} (threshold {c['threshold']})"
              for c in (result.get("gate") or {}).get("checks", []) if not c["passed"]]
    if not failed:
        return f"version {version} passed the gate but was not promoted (registry.auto_promote is false); champion stays {champion}"
    return f"version {version} rejected by the gate: {'; '.join(failed)}; champion stays {champion}"


def notification_body(result: dict, links: dict[str, str] | None = None) -> tuple[str, str]:
    """(subject, body) of the notification of a run result; `links` are label to URL."""
    gate = result.get("gate") or {}
    failed = [c["name"] for c in gate.get("checks", []) if not c["passed"]]
    subject = f"ftllm retrain {result.get('status')}: {result.get('model_name')} v{result.get('version')}"
    lines = [
        subject,
        outcome_line(result),
        f"champion: {result.get('champion_version')}",
        f"failed checks: {', '.join(failed) or 'none'}",
        f"error: {result.get('error', '')}",
        f"MLflow run: {result.get('mlflow_run_id')}",
        *(f"{label}: {url}" for label, url in (links or {}).items()),
    ]
    return subject, "\n".join(lines)


def notify_run(result: dict, links: dict[str, str] | None = None) -> str | None:
    """Send the notification when the run was rejected or failed and a target is configured; a run
    that registered nothing new (its model and settings are a version's already) sends none,
    whatever that version's verdict, as every scheduled run would repeat it.

    Args:
        result: the run's result (status, model, version, gate, error...).
        links: label to URL of the pages that show the run (Prefect flow run, MLflow run).

    Returns:
        Where it was sent ("webhook" or the block name), or None when nothing was sent.
    """
    if result.get("status") not in NOTIFY_ON:
        return None
    if result.get("status") != "failed" and not result.get("changed", True):
        return None  # nothing new: the version it found was told of when a run registered it
    subject, body = notification_body(result, links)
    env = environment()
    url = env.notify_webhook.get_secret_value() if env.notify_webhook else None
    block_name = env.notify_block
    if url:
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        gate = result.get("gate") or {}
        payload = {
            "subject": "{{subject}}",
            "body": "{{body}}",
            "status": result.get("status"),
            "model_name": result.get("model_name"),
            "version": result.get("version"),
            "champion_version": result.get("champion_version"),
            "failed_checks": [c["name"] for c in gate.get("checks", []) if not c["passed"]],
            "error": result.get("error"),
            "mlflow_run_id": result.get("mlflow_run_id"),
            "links": links or {},
        }
        block = CustomWebhookNotificationBlock(
            name="ftllm", url=url, method="POST", json_data=payload, allow_private_urls=True, timeout=10
        )
        block.notify(body, subject)
        return "webhook"
    if block_name:
        from prefect.blocks.core import Block

        Block.load(block_name).notify(body, subject)
        return block_name
    return None
