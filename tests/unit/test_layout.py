"""The code's layout keeps its promises: DVC stages depend on all the code they run, modules stay small."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.support.imports import import_closure
from tests.support.project import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
MAX_LINES = 500


def _stage_module(stage: dict) -> str:
    match = re.search(r"python -m ([\w.]+)", stage["cmd"])
    assert match, f"stage command does not run a project module: {stage['cmd']}"
    return match.group(1)


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_imports_is_among_its_deps(name):
    stage = STAGES[name]
    deps = _deps(stage)
    files = import_closure(REPO, _stage_module(stage))
    assert len(files) > 1
    missing = sorted(
        str(f.relative_to(REPO)) for f in files
        if not any(f.relative_to(REPO).as_posix() == d or f.relative_to(REPO).as_posix().startswith(d.rstrip("/") + "/")
                   for d in deps)
    )
    assert not missing, f"dvc.yaml stage {name!r} runs these modules but does not depend on them: {missing}"


def test_the_finetune_stage_reaches_the_training_code():
    files = {f.relative_to(REPO).as_posix() for f in import_closure(REPO, _stage_module(STAGES["finetune"]))}
    for module in ("tasks/train/loss.py", "tasks/train/attention.py", "tasks/config.py", "tasks/model/chat.py"):
        assert module in files


def test_modules_stay_small_or_say_why_they_are_not():
    long = []
    for folder in ("tasks", "flows", "serving", "ftllm"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if text.count("\n") > MAX_LINES and "cohesive" not in text.split('"""')[1]:
                long.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over {MAX_LINES} lines whose docstring does not give the reason: {long}"
