"""The `promote` and `rollback` flows: move the `champion` alias, with who/why/when recorded.

Both are thin flows over `tasks.registry` so that they can run from the CLI, from a
Prefect deployment, or from the Prefect UI; a refusal (unknown version, failed gate without
--force) fails the flow run with the reason.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.registry import versions as registry


@flow(name="promote")
def promote_flow(model_name: str, version: str, force: bool = False, reason: str = "") -> dict:
    """Point `champion` at `version`; refused for a failed gate unless `force` with a reason."""
    move = registry.promote(model_name, version, force=force, reason=reason)
    get_run_logger().info(f"champion of {model_name}: {move.previous} -> {move.champion}")
    create_markdown_artifact(f"champion of `{model_name}`: {move.previous} → **{move.champion}**", key="promote")
    return move.to_dict()


@flow(name="rollback")
def rollback_flow(model_name: str, to: str | None = None, reason: str = "") -> dict:
    """Move `champion` back to the previous champion, or to version `to`."""
    move = registry.rollback(model_name, to=to, reason=reason)
    get_run_logger().info(f"champion of {model_name}: {move.previous} -> {move.champion}")
    create_markdown_artifact(f"champion of `{model_name}` rolled back: {move.previous} → **{move.champion}**", key="rollback")
    return move.to_dict()
