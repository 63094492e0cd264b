"""Package a trained model for serving: the BentoML model store, then a bento.

`import_model` copies a model folder written by `tasks.train.finetune` into the BentoML store as
`<model_name>:v<version>`, with its base model beside it in `base/` where that is small
and local (the tiny base always), so the bento serves without the training machine's
files. `build_bento` builds `serving/` into a bento carrying the service, that model and
the pinned requirements (the packages `serving/bentofile.yaml` names, at pyproject.toml's
versions); `bentoml containerize <tag>` turns it into an OCI image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tasks.config import ModelParams
from tasks.environment import environment
from tasks.errors import PackageError
from tasks.files import write_atomic
from tasks.pins import PYPROJECT, requirements

BENTO_MODEL_ENV = "FTLLM_BENTO_MODEL"  # read by serving/service.py when the bento is built
BENTOFILE = Path("serving") / "bentofile.yaml"
MAX_BUNDLED_BASE_BYTES = 200 * 1024 * 1024



def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _base_to_bundle(model_dir: Path, info: dict) -> Path | None:
    """The local base model folder to copy into the package, or None (full weights, hub id, too big)."""
    if info.get("kind") != "adapter" or (model_dir / "base").is_dir():
        return None
    base_path = Path(info.get("base_path") or "")
    if info.get("base") == "tiny" and not base_path.is_dir():
        from tasks.model.loading import resolve_base

        base_path = Path(resolve_base(ModelParams(**info["model_params"])))
    if base_path.is_dir() and (info.get("base") == "tiny" or _dir_size(base_path) < MAX_BUNDLED_BASE_BYTES):
        return base_path
    return None


def import_model(model_dir: Path, model_name: str, version: str, labels: dict[str, str]) -> str:
    """Copy a trained model folder into the BentoML model store as `<model_name>:v<version>`.

    Idempotent: where the tag exists already it is returned as it is.

    Args:
        model_dir: a folder written by `tasks.train.finetune` (holds `ftllm_model.json`).
        model_name: the registered model name (`registry.model_name`).
        version: the MLflow model version, e.g. "3".
        labels: extra labels of the BentoML model (e.g. the MLflow run id).

    Returns:
        The model tag, e.g. "ftllm-chat:v3".

    Raises:
        PackageError: the folder is not a trained model folder.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    model_dir = Path(model_dir)
    marker = model_dir / "ftllm_model.json"
    if not marker.is_file():
        raise PackageError(f"{model_dir}: no ftllm_model.json; pass the folder written by the finetune stage "
                           "(artifacts/model)")
    info = json.loads(marker.read_text())
    tag = f"{model_name}:v{version}"
    try:
        return str(bentoml.models.get(tag).tag)
    except NotFound:
        pass
    base = _base_to_bundle(model_dir, info)
    all_labels = {**labels, "version": str(version), "kind": str(info.get("kind")), "base": str(info.get("base"))}
    with bentoml.models.create(tag, labels=all_labels, metadata={"ftllm_model": info}) as model:
        shutil.copytree(model_dir, model.path, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.tmp*"))
        if base is not None:
            shutil.copytree(base, Path(model.path) / "base")
    return str(model.tag)


def build_bento(model_tag: str, version: str, root: Path | None = None) -> str:
    """Build `serving/` into a bento carrying `model_tag`; return the bento tag.

    The build runs `bentoml build` in a fresh process with `FTLLM_BENTO_MODEL=model_tag`,
    so the service declares exactly that model, whatever this process imported before.
    Nothing is installed or locked at build time; the bento lists the pinned requirements.

    Args:
        model_tag: a model in the BentoML store, e.g. "ftllm-chat:v3".
        version: the model version; the bento's version is "<model name>-v<version>", so that
            models of two registered names never share a bento tag.
        root: the project root (holds `serving/bentofile.yaml`); default: FTLLM_ROOT or the cwd.

    Raises:
        PackageError: the model is not in the store or the build failed (its output is included).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    root = Path(root or environment().root or Path.cwd()).resolve()
    if not (root / BENTOFILE).is_file():
        raise PackageError(f"{root / BENTOFILE}: not found; run from the project root or set FTLLM_ROOT")
    try:
        bentoml.models.get(model_tag)
    except NotFound:
        raise PackageError(f"{model_tag}: not in the BentoML store ({os.environ.get('BENTOML_HOME', '~/bentoml')}); "
                           "import it first (tasks.registry.bento.import_model)") from None
    bento_version = f"{model_tag.split(':')[0]}-v{version}"
    env = {**os.environ, BENTO_MODEL_ENV: model_tag, "FTLLM_ROOT": str(root)}
    with tempfile.TemporaryDirectory(prefix="ftllm-bentofile-") as tmp:
        bentofile = pinned_bentofile(root, Path(tmp))
        cmd = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--version", bento_version,
               "--output", "tag", str(root)]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("__tag__:"):
            return line.removeprefix("__tag__:").strip()
    output = (proc.stdout + proc.stderr).strip()[-3000:]
    if "already exists" in output:  # the same model was built before: the build is idempotent
        return f"{_bento_name(root)}:{bento_version}"
    raise PackageError(f"bentoml build failed (exit {proc.returncode}):\n{output}")


def pinned_bentofile(root: Path, out_dir: Path) -> Path:
    """`serving/bentofile.yaml` with each package under `python.packages` pinned at pyproject.toml's version.

    The committed bentofile names the packages only, so that their versions live in one
    place; `bentoml build` reads the copy written to `out_dir`.

    Raises:
        PackageError: a package that pyproject.toml does not pin.
    """
    doc = yaml.safe_load((root / BENTOFILE).read_text(encoding="utf-8"))
    pyproject = root / "pyproject.toml" if (root / "pyproject.toml").is_file() else PYPROJECT
    try:
        doc["python"]["packages"] = requirements(doc["python"]["packages"], pyproject)
    except LookupError as exc:
        raise PackageError(f"{root / BENTOFILE}: python.packages: {exc}") from None
    return write_atomic(out_dir / "bentofile.yaml", yaml.safe_dump(doc, sort_keys=False))


def _bento_name(root: Path) -> str:
    doc = yaml.safe_load((root / BENTOFILE).read_text()) or {}
    return doc.get("name") or "ftllm_chat"
