"""MLflow model versions, aliases, promotion and rollback.

Every evaluated candidate becomes a version of `registry.model_name`, tagged with its
lineage (git commit, DVC data md5, dvc.lock hash, params hash, metrics, gate verdict,
parent champion). Aliases replace the deprecated stages: `challenger` is the latest
candidate, `champion` is production. The registered model's tag `champion_history` keeps
the former champions in order, so rollback never has to guess.

Promotion of a version whose gate failed is refused unless forced with a reason; both
promotion and rollback record who, when and why as tags, and are idempotent when the
target is already champion.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tasks.config import Params
from tasks.errors import RegistryRefusal
from tasks.pins import requirements
from tasks.registry.chat_schema import INPUT_EXAMPLE

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
# The experiment type MLflow 3's UI reads to pick its view: "custom_model_development" is
# its "Machine learning" type (runs, metrics, models), the other being GenAI (traces).
# MLflow 3.17's UI reads it only with its GenAI/training switch off; with the switch, the
# view comes from the link (`?workflowType=machine_learning`, see tracking.ML_VIEW).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

# What a logged model needs to load in a fresh process (MLflow's default probing imports
# torchvision, which this project does not install). The versions are pyproject.toml's.
PYFUNC_PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "mlflow", "sacrebleu", "rouge-score", "scikit-learn",
    "pydantic", "pyyaml",
)


def pip_requirements() -> list[str]:
    """The logged model's requirements: `PYFUNC_PACKAGES` at the project's pins (`tasks.pins`)."""
    return requirements(PYFUNC_PACKAGES)


def get_client():
    from mlflow import MlflowClient

    return MlflowClient()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def ensure_experiment(name: str, artifact_root: Path) -> str:
    """The id of experiment `name`, created with its artifacts under `artifact_root`, of MLflow's machine-learning kind.

    A tracking server (an http(s) tracking URI) keeps its own artifact store (S3, a proxied
    folder): there the server chooses, since a local path would leave the artifacts on the
    machine that happened to start the run.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        server = urlparse(mlflow.get_tracking_uri()).scheme in ("http", "https")
        exp_id = mlflow.create_experiment(name, artifact_location=None if server else artifact_root.resolve().as_uri())
    else:
        exp_id = exp.experiment_id
    # Set on older experiments too: without it, MLflow 3's UI opens them in its GenAI view
    # (traces), where these runs do not show.
    if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) is None:
        mlflow.MlflowClient().set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def _staged_model_dir(model_dir: Path, tmp: Path) -> Path:
    """A copy of the model folder that also carries the tiny base, so the version is self-contained."""
    staged = tmp / "model_dir"
    shutil.copytree(model_dir, staged)
    info = json.loads((model_dir / "ftllm_model.json").read_text())
    if info["kind"] == "adapter" and info.get("base") == "tiny" and Path(info["base_path"]).is_dir():
        shutil.copytree(info["base_path"], staged / "base")
    return staged


# The pyfunc model, logged as code rather than pickled (see tasks/registry/pyfunc.py).
PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc.py")


# The candidate's metrics a version carries as tags (`metric.<name>`), each split's under its prefix.
METRIC_TAG_PREFIXES = (("candidate", ""), ("candidate_feedback", "feedback."), ("candidate_preference", "preference."))


def metric_tags(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    """The candidate's metrics as version tags: the test split's, and those of the feedback split
    and the held-out preference split where the run had them (`ftllm models` reads them back)."""
    return {f"metric.{prefix}{k}": f"{v:.6g}" for role, prefix in METRIC_TAG_PREFIXES for k, v in metrics.get(role, {}).items()}


def register_candidate(run_id: str, model_dir: Path, model_name: str, tags: dict[str, str]) -> str:
    """Log the model folder to `run_id` as a pyfunc model and register it as a new version.

    The model is logged from code (`PYFUNC_MODEL_CODE`), with the `tasks` package as its
    code and the model folder as its one artifact, so loading the version unpickles nothing.
    Its signature comes from the type hints of the model's `predict`, with an input example
    (`tasks.registry.chat_schema.INPUT_EXAMPLE`); to check that example, MLflow loads the model
    and answers it while logging.

    Returns:
        The new version number, as a string; alias `challenger` points at it.
    """
    import mlflow

    code_dir = Path(__file__).parents[1]  # the whole tasks package
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_MODEL_CODE),
            artifacts={"model_dir": str(_staged_model_dir(model_dir, Path(tmp)))},
            code_paths=[str(code_dir)],
            input_example=INPUT_EXAMPLE,
            pip_requirements=pip_requirements(),
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    client = get_client()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    client.set_tag(run_id, "model_version", version)
    return version


def tag_version(model_name: str, version: str, key: str, value: str) -> None:
    """Set one tag on a model version."""
    get_client().set_model_version_tag(model_name, str(version), key, str(value))


def champion_version(model_name: str) -> str | None:
    """The version the `champion` alias points at, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(get_client().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def _history(model_name: str) -> list[str]:
    model = get_client().get_registered_model(model_name)
    return json.loads(model.tags.get(HISTORY_TAG, "[]"))


def _get_version(model_name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return get_client().get_model_version(model_name, str(version))
    except MlflowException:
        known = ", ".join(v["version"] for v in list_versions(model_name)) or "none"
        unknown = f"model {model_name!r} has no version {str(version)!r} (known versions: {known})"
        raise RegistryRefusal(f"{unknown}; see `ftllm models`", form_message=unknown) from None


def _move_champion(model_name: str, version: str, history: list[str], tags: dict[str, str]) -> None:
    client = get_client()
    client.set_registered_model_alias(model_name, CHAMPION, version)
    client.set_registered_model_tag(model_name, HISTORY_TAG, json.dumps(history))
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


@dataclass(frozen=True)
class AliasMove:
    model_name: str
    previous: str | None
    champion: str
    changed: bool

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "previous": self.previous, "champion": self.champion, "changed": self.changed}


def _check_forced(force: bool, reason: str) -> None:
    """Refuse `force` without a reason, whatever the version: the reason is recorded on it."""
    if force and not reason.strip():
        raise RegistryRefusal("--force needs --reason TEXT: the reason is recorded on the version",
                              form_message="force needs a reason: give one, it is recorded on the version")


def _check_gate(mv, force: bool, reason: str, action: str) -> None:
    """Refuse a version whose gate failed, unless `force` with a reason."""
    _check_forced(force, reason)
    if mv.tags.get("gate_passed") == "true":
        return
    if not force:
        failed = f"version {mv.version} failed its gate ({mv.tags.get('gate_failed_checks', 'unknown')})"
        raise RegistryRefusal(f"{failed}; {action} it anyway with --force --reason TEXT",
                              form_message=f"{failed}; to {action} it anyway, set force and give a reason")


def promote(model_name: str, version: str, force: bool = False, reason: str = "") -> AliasMove:
    """Point `champion` at `version`.

    Raises:
        RegistryRefusal: unknown version, or a version whose gate failed without `force`
            and a reason.
    """
    _check_forced(force, reason)
    mv = _get_version(model_name, version)
    version = str(mv.version)  # as the registry numbers it: `01` is version 1
    current = champion_version(model_name)
    if current == version:
        return AliasMove(model_name, current, current, changed=False)
    _check_gate(mv, force, reason, "promote")
    history = champion_history(model_name) + [str(version)]
    tags = {"promoted_at": _now(), "promoted_by": _actor(), "promote_reason": reason or "gate passed"}
    if force and mv.tags.get("gate_passed") != "true":  # a passed gate needed no overriding
        tags["promote_forced"] = "true"
    _move_champion(model_name, str(version), history, tags)
    return AliasMove(model_name, current, str(version), changed=True)


def rollback(model_name: str, to: str | None = None, reason: str = "", force: bool = False) -> AliasMove:
    """Move `champion` back to the previous champion, or to version `to`.

    A version that was champion before may be restored whatever its gate said (it served
    already); one that never was is a promotion, refused as `promote` refuses it.

    Raises:
        RegistryRefusal: no champion yet, no former champion to go back to, an unknown `to`, or
            a `to` that was never champion and failed its gate, without `force` and a reason.
    """
    _check_forced(force, reason)
    current = champion_version(model_name)
    history = champion_history(model_name)
    if to is not None:
        mv = _get_version(model_name, to)
        target = str(mv.version)  # as the registry numbers it: `01` is version 1
        if target == current:
            return AliasMove(model_name, current, current, changed=False)
        if target not in history and not {"promoted_at", "rolled_back_at"} & mv.tags.keys():  # never served
            _check_gate(mv, force, reason, "restore")
        # History keeps its order: everything after the target's last reign is forgotten.
        history = history[: len(history) - history[::-1].index(target)] if target in history else history + [target]
    else:
        if current is None:
            raise RegistryRefusal(f"model {model_name!r} has no champion to roll back from")
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryRefusal(f"version {current} is the first champion of {model_name!r}: nothing to roll back to")
        target = history[-1]
    tags = {"rolled_back_at": _now(), "rolled_back_by": _actor(), "rollback_reason": reason or "rollback"}
    _move_champion(model_name, target, history, tags)
    if current is not None:
        get_client().set_model_version_tag(model_name, current, "demoted_at", _now())
    return AliasMove(model_name, current, target, changed=True)


def list_versions(model_name: str) -> list[dict]:
    """Every version with its aliases, lineage tags, key metrics and flow run, newest first."""
    from mlflow.exceptions import MlflowException

    client = get_client()
    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return []
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{model_name}'"):
        tags = dict(mv.tags)
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc).isoformat(
                    timespec="seconds"
                ),
                "gate_passed": tags.get("gate_passed") == "true",
                "metrics": {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")},
                "lineage": {k: tags[k] for k in ("data_md5", "data_sources", "git_commit", "dvc_lock_md5", "params_digest",
                                                "parent_champion") if k in tags},
                # The Prefect flow run that trained it (url: its UI page, or why there is none).
                "flow_run": {k: tags.get(f"prefect.flow_run_{k}") for k in ("id", "name", "url")}
                if "prefect.flow_run_id" in tags else None,
                "tags": {k: v for k, v in tags.items() if not k.startswith("metric.")},
            }
        )
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def find_version(model_name: str, tag: str, value: str) -> str | None:
    """The newest version whose tag `tag` equals `value`, if any."""
    for row in list_versions(model_name):
        if row["tags"].get(tag) == value:
            return row["version"]
    return None


def champion_history(model_name: str) -> list[str]:
    """Versions that have been champion, oldest first (the current one last)."""
    from mlflow.exceptions import MlflowException

    try:
        return _history(model_name)
    except MlflowException:
        return []


def download_version(model_name: str, version: str, dst: Path) -> Path:
    """Fetch a version's model folder (what `register_candidate` logged) into `dst`."""
    import mlflow

    root = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    matches = list(root.rglob("ftllm_model.json"))
    if not matches:
        raise RegistryRefusal(f"version {version} of {model_name!r} holds no model folder")
    return matches[0].parent


def version_folder(root: Path, model_name: str, version: str) -> Path:
    """Where a registered version is downloaded: `root/artifacts/champion/<model name>-v<N>-<run>`.

    Named by the model, the version and the run that logged it, so that another registered
    model's version N, or a registry started again (its versions count from 1 again), never
    finds this version's files or the scores stored beside them.
    """
    entry = _get_version(model_name, version)
    run = entry.run_id or hashlib.sha256(str(entry.source).encode()).hexdigest()
    return Path(root) / "artifacts/champion" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_name)}-v{version}-{run[:12]}"


def champion_folder(root: Path, model_name: str, version: str) -> str:
    """A version's model folder downloaded into its `version_folder`, as a path relative to `root`.

    What a warm start (`train.init_from: champion`) names in `train.init_path`: the DVC stages
    run in `root`, and a relative path keeps the resolved settings the same on another checkout.
    """
    folder = download_version(model_name, version, version_folder(root, model_name, version))
    return folder.resolve().relative_to(Path(root).resolve()).as_posix()


def warm_start(root: Path, params: Params, overrides: dict, champion: str | None) -> tuple[Params, dict]:
    """With `train.init_from: champion` and a champion: the run's settings and overrides naming its folder.

    The override reaches the DVC stages (`train.init_path`); the settings are what the run
    records in MLflow. Otherwise both are returned as they are (a first run trains from the base).
    """
    if params.train.init_from != "champion" or champion is None:
        return params, overrides
    path = champion_folder(root, params.registry.model_name, champion)
    train = params.train.model_copy(update={"init_path": path})
    return params.model_copy(update={"train": train}), {**overrides, "train.init_path": path}
