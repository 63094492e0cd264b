"""The `promote` and `rollback` flows: move the `champion` alias, with who/why/when recorded.

Both are thin flows over `tasks.registry` so that they can run from the CLI, from a
Prefect deployment, or from the Prefect UI's run form. A refusal (unknown version, a failed
gate without `force` and a `reason`) is an expected outcome, not a bug: the flow run ends
Failed with the one-line reason in the form's words and no traceback, in its log or the
worker's (`tasks.pipeline.states`). The state's result is the same reason in the command
line's words, which `ftllm promote` (running the flow in-process against a server) reports.

Versions are MLflow's integers; the form and `prefect deployment run -p version=2` give a
number, the CLI a string: both are taken.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import State

from tasks.errors import RegistryRefusal
from tasks.pipeline.states import failed_on_purpose
from tasks.registry import versions as registry


def _refused(exc: RegistryRefusal) -> State:
    """A Failed state that says why in the form's words; its result says it in the CLI's."""
    message = f"refused: {exc.form_message}"
    get_run_logger().error(message)
    return failed_on_purpose(message, data=str(exc))


@flow(name="promote")
def promote_flow(model_name: str, version: int | str, force: bool = False, reason: str = "") -> dict | State:
    """Point `champion` at `version`; refused for a failed gate unless `force` with a reason.

    Args:
        model_name: the registered model in MLflow (registry.model_name).
        version: the model version to make champion, e.g. 7 (see `ftllm models`).
        force: promote although the version failed its gate; needs a reason.
        reason: why; recorded on the version (required with force).
    """
    try:
        move = registry.promote(model_name, str(version), force=force, reason=reason)
    except RegistryRefusal as exc:
        return _refused(exc)
    get_run_logger().info(f"champion of {model_name}: {move.previous} -> {move.champion}")
    create_markdown_artifact(f"champion of `{model_name}`: {move.previous} → **{move.champion}**", key="promote")
    return move.to_dict()


@flow(name="rollback")
def rollback_flow(model_name: str, to: int | str | None = None, reason: str = "", force: bool = False) -> dict | State:
    """Move `champion` back to the previous champion, or to version `to`.

    Args:
        model_name: the registered model in MLflow (registry.model_name).
        to: the version to make champion again; empty: the champion before the current one.
        reason: why; recorded on the version (required with force).
        force: with `to`, a version that never was champion although it failed its gate.
    """
    try:
        move = registry.rollback(model_name, to=None if to in (None, "") else str(to), reason=reason, force=force)
    except RegistryRefusal as exc:
        return _refused(exc)
    get_run_logger().info(f"champion of {model_name}: {move.previous} -> {move.champion}")
    create_markdown_artifact(f"champion of `{model_name}` rolled back: {move.previous} → **{move.champion}**", key="rollback")
    return move.to_dict()
