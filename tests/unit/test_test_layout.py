"""The suite's own layout: shared helpers come from tests/support/, never from another test
module or from a conftest (pytest loads those itself; imported again they run twice)."""

from __future__ import annotations

import ast

from tests.support.project import REPO

TESTS = REPO / "tests"


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_test_modules_import_helpers_only_from_the_support_package():
    wrong = {}
    for path in sorted(TESTS.rglob("*.py")):
        if path.is_relative_to(TESTS / "support"):
            continue
        bad = sorted(name for name in imported_modules(path)
                     if name.startswith("tests.") and not name.startswith("tests.support"))
        if bad:
            wrong[str(path.relative_to(REPO))] = bad
    assert wrong == {}, f"move these helpers into tests/support/ and import them from there: {wrong}"


def test_the_check_sees_an_import_from_a_test_module(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text("from tests.unit.registry.test_registry import new_version\nfrom tests.conftest import REPO\n")
    assert imported_modules(module) == {"tests.unit.registry.test_registry", "tests.conftest"}
