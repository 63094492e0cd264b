"""Pins live in pyproject.toml: the lock agrees, every import is declared, and nothing else writes a version."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import packages_distributions, version

import pytest
import yaml

from tasks.pins import normalise, parse_pin, project_pins, requirements
from tests.support.project import REPO

CODE_FOLDERS = ("tasks", "flows", "serving", "ftllm")
# Installed on its own before the lock (see the Makefile): pip freeze of the CPU wheel would
# otherwise make `pip install -r requirements.lock` fetch a CUDA build.
NOT_IN_LOCK = {"torch", "pip"}
# Imported only where the user opted in, behind a clear error when missing.
OPTIONAL_IMPORTS = {"bitsandbytes": "train.method=qlora on a CUDA machine (tasks/train/finetune.py)"}


def lock_pins() -> dict[str, str]:
    lines = (REPO / "requirements.lock").read_text().splitlines()
    return dict(parse_pin(line) for line in lines if line.strip() and not line.startswith("#"))


def imported_modules() -> dict[str, str]:
    """Top-level third-party modules imported by the project's code, with one file importing each."""
    own = {*CODE_FOLDERS, "__future__"}
    found: dict[str, str] = {}
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in own:
                        found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_pin_is_exact_and_agrees_with_the_lock():
    lock = lock_pins()
    for name, pinned in project_pins().items():
        if name in NOT_IN_LOCK:
            continue
        assert name in lock, f"pyproject.toml pins {name}=={pinned}; requirements.lock lacks it (pip freeze)"
        assert lock[name] == pinned, f"pyproject.toml pins {name}=={pinned}; requirements.lock has {lock[name]}"


def test_the_environment_has_the_pinned_versions():
    for name, pinned in project_pins(extras=False).items():
        assert version(name).split("+")[0] == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_every_imported_package_is_declared():
    declared = set(project_pins(extras=False))
    distributions = packages_distributions()
    undeclared = []
    for module, where in imported_modules().items():
        if module in OPTIONAL_IMPORTS:
            continue
        names = {normalise(d) for d in distributions.get(module, [])}
        if not names & declared:
            undeclared.append(f"{module} ({where}; distribution {sorted(names) or 'not installed'})")
    assert not undeclared, f"imported but not in pyproject.toml's dependencies: {undeclared}"


def test_the_import_scan_sees_what_the_code_imports():
    """The scan itself: it must find imports at the top of a module and inside functions."""
    modules = imported_modules()
    assert {"torch", "prefect", "sklearn", "numpy", "tqdm", "bitsandbytes"} <= set(modules)
    assert "json" not in modules and "tasks" not in modules


def test_nothing_else_writes_a_version(tmp_path):
    from tasks.registry.bento import pinned_bentofile
    from tasks.registry.versions import pip_requirements

    assert "==" not in (REPO / "Makefile").read_text(), "the Makefile reads its pins with `python -m tasks.pins`"
    names = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())["python"]["packages"]
    assert all("=" not in name for name in names), "serving/bentofile.yaml names packages; build_bento pins them"
    pins = project_pins()
    built = yaml.safe_load(pinned_bentofile(REPO, tmp_path).read_text())["python"]["packages"]
    for line in [*built, *pip_requirements()]:
        name, pinned = parse_pin(line)
        assert pins[name] == pinned, line


def test_a_package_without_a_pin_is_named(tmp_path):
    with pytest.raises(LookupError, match="no pin for left-pad"):
        requirements(["torch", "left-pad"])
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=2"]\n')
    with pytest.raises(ValueError, match="torch>=2.*not an exact pin"):
        project_pins(pyproject)
