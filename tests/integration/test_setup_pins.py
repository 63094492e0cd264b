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



def test_the_makefile_refuses_another_python_in_one_line_before_creating_the_venv(tmp_path):
    import subprocess

    other = tmp_path / "python3"  # a python3 that says it is 3.12
    other.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.12.1" && exit 0\nexit 1\n')
    other.chmod(0o755)
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-s", "-C", str(REPO), "setup", f"VENV={venv}", f"PYTHON={other}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    error = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert error == [f"error: Python 3.11 is required, and '{other}' is Python 3.12.1; install python3.11 "
                     "or run make PYTHON=/path/to/python3.11"]
    assert not venv.exists()
