"""Packaging: the BentoML model (self-contained) and a real bento build; requirement pins agree."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from tasks.config import render_params
from tests.support.project import REPO

MODEL_NAME = "ftllm-chat-test"  # as in conftest.py


def test_import_model_is_self_contained_and_idempotent(model_dir):
    import bentoml

    from tasks.registry.bento import import_model

    tag = import_model(model_dir, MODEL_NAME, "7", {"mlflow_run_id": "abc"})
    assert tag == f"{MODEL_NAME}:v7"
    stored = bentoml.models.get(tag)
    path = Path(stored.path)
    assert (path / "ftllm_model.json").is_file() and (path / "adapter").is_dir()
    assert (path / "base" / "config.json").is_file()  # the tiny base travels with the adapter
    assert stored.info.labels["version"] == "7" and stored.info.labels["mlflow_run_id"] == "abc"
    assert import_model(model_dir, MODEL_NAME, "7", {}) == tag


def test_import_model_refuses_a_folder_that_is_not_a_model(tmp_path):
    from tasks.errors import PackageError
    from tasks.registry.bento import import_model

    with pytest.raises(PackageError, match="ftllm_model.json"):
        import_model(tmp_path, MODEL_NAME, "1", {})


@pytest.mark.slow
def test_build_bento_carries_service_model_and_pins(registry):
    import bentoml

    from tasks.registry.bento import build_bento

    tag = build_bento(f"{MODEL_NAME}:v1", "1", root=REPO)
    bento = bentoml.get(tag)
    info = yaml.safe_load((Path(bento.path) / "bento.yaml").read_text())
    assert [m["tag"] for s in info["services"] for m in s["models"]] == [f"{MODEL_NAME}:v1"]
    assert (Path(bento.path) / "src" / "serving" / "service.py").is_file()
    reqs = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
    assert "transformers==5.23.0" in reqs and "bentoml==1.4.40" in reqs


def test_bentofile_pins_match_the_project(tmp_path):
    from tasks.registry.bento import pinned_bentofile

    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(.+)", p).groups()
                for p in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    bentofile = yaml.safe_load(pinned_bentofile(REPO, tmp_path).read_text())
    assert bentofile["python"]["lock_packages"] is False  # no resolver, no network at build time
    for line in bentofile["python"]["packages"]:
        name, pinned = line.split("==")
        expected = pins.get(name) or version(name)
        assert pinned == expected, f"serving/bentofile.yaml pins {name}=={pinned}; the project uses {expected}"


def test_export_without_database_is_a_clear_error(tmp_path, monkeypatch):
    from ftllm.commands.feedback import export_command

    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "missing.db"))
    assert export_command(tmp_path / "out.jsonl", 4) == 2
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_bento_holds_only_the_service_code(registry, tmp_path, monkeypatch):
    """On the embedded defaults the BentoML home and MLflow artifacts (with copies of tasks/)
    live inside the project folder: none of it may be swept into the bento, or each build
    nests the previous ones."""
    import os
    import shutil

    from tasks.registry.bento import build_bento

    for part in ("serving", "tasks", "ftllm"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "params.yaml").write_text(render_params())
    (tmp_path / "mlartifacts/1/code/tasks").mkdir(parents=True)
    (tmp_path / "mlartifacts/1/code/tasks/y.py").write_text("# decoy\n")
    home = tmp_path / ".bentoml"
    shutil.copytree(Path(os.environ["BENTOML_HOME"]) / "models", home / "models")
    monkeypatch.setenv("BENTOML_HOME", str(home))  # the build runs in a subprocess
    for bento_version in ("a", "b"):
        build_bento(f"{MODEL_NAME}:v1", bento_version, root=tmp_path)
    src = home / "bentos" / "ftllm_chat" / f"{MODEL_NAME}-vb" / "src"
    assert {p.name for p in src.iterdir()} == {"serving", "tasks", "ftllm", "params.yaml", "bentofile.yaml"}
    assert not list(src.rglob("y.py"))
