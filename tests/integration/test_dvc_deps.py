"""Editing any module that a DVC stage runs marks the stage changed, so `dvc repro` cannot keep a stale model.

The finetune stage once depended on a hand-kept list of files that missed the loss and the
attention code: editing them left `dvc repro` reporting nothing changed. Here the stages'
outputs are recorded as they are (`dvc commit`), then each module of the finetune stage's
import closure is edited in turn and `dvc status` must name the stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.imports import import_closure


def _dvc(root, *args: str) -> str:
    # The stage commands say `python`: this interpreter's, as the flow runs them (tasks/pipeline/dvc.py).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def committed(project):
    """The project with every stage's deps and outs recorded in dvc.lock, as after a run."""
    (project / "artifacts" / "prepared").mkdir(parents=True)
    (project / "artifacts" / "prepared" / "train.jsonl").write_text("{}\n")
    (project / "artifacts" / "model").mkdir()
    (project / "artifacts" / "model" / "weights.txt").write_text("a model\n")
    (project / "artifacts" / "preference").mkdir()
    (project / "artifacts" / "preference" / "preference.json").write_text('{"ran": false}\n')
    (project / "artifacts" / "metrics.json").write_text("{}")
    (project / "artifacts" / "predictions.json").write_text("{}")
    (project / "artifacts" / "per_example.json").write_text("{}")
    _dvc(project, "repro", "--single-item", "resolve")
    _dvc(project, "commit", "--force", "prepare", "finetune", "preference", "evaluate")
    return project


def _status(root, stage: str) -> dict:
    from dvc.repo import Repo

    # In-process (a fresh interpreter per module would take minutes); DVC resolves targets
    # against the working directory, hence the chdir.
    with contextlib.chdir(root), Repo(str(root)) as repo:
        return repo.status(targets=[stage])


def test_an_unchanged_workspace_reports_finetune_up_to_date(committed):
    assert _dvc(committed, "status", "finetune", "--json").strip() in ("{}", "")


def test_editing_any_module_the_finetune_stage_imports_marks_it_changed(committed):
    modules = sorted(import_closure(committed, "tasks.stages.finetune"))
    assert len(modules) > 15
    unnoticed = []
    for path in modules:
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            changes = json.dumps(_status(committed, "finetune"))
        finally:
            path.write_text(original)
        if str(path.relative_to(committed).parent) not in changes and path.name not in changes:
            unnoticed.append(str(path.relative_to(committed)))
    assert not unnoticed, f"dvc status finetune did not notice edits of {unnoticed}"
    assert _status(committed, "finetune") == {}


def test_editing_the_loss_reruns_finetune_and_not_prepare(committed):
    loss = committed / "tasks" / "train" / "loss.py"
    original = loss.read_text()
    loss.write_text(original + "\n# an edit\n")
    try:
        out = json.loads(_dvc(committed, "status", "--json") or "{}")
    finally:
        loss.write_text(original)
    assert "finetune" in out and "prepare" not in out


def test_another_prompt_date_reruns_evaluate_and_nothing_before_it(committed):
    """A chat template that writes today's date renders other prompts on another day: the
    resolved `eval.prompt_date` changes, and DVC scores the candidate again (the champion is
    scored again that day too), without training it again."""
    import yaml

    resolved = committed / "artifacts" / "params.yaml"
    original = resolved.read_text()
    doc = yaml.safe_load(original)
    doc["eval"]["prompt_date"] = "2026-12-07"
    resolved.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        out = json.loads(_dvc(committed, "status", "--json") or "{}")
    finally:
        resolved.write_text(original)
    assert "evaluate" in out and not {"prepare", "finetune", "preference"} & set(out), out
