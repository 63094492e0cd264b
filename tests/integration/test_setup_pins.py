"""The Makefile's set-up reads torch's and pip's pins from pyproject.toml before any venv exists."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.pins import project_pins
from tests.support.project import REPO


def test_the_makefile_gets_torch_and_pip_from_pyproject():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "tasks.pins", "torch", "pip"], cwd=REPO, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == [f"torch=={project_pins()['torch']}", f"pip=={project_pins()['pip']}"]
    assert Path(REPO / "Makefile").read_text().count("-m tasks.pins") == 2

