"""The project's version pins, read from the one place they are written: `pyproject.toml`.

`[project].dependencies` (and its extras) pin every package the code imports;
`requirements.lock` is the full `pip freeze` of that environment (a test checks that the
two agree); `[tool.finetuningllm].setup-pins` pins the installer itself. Everything else
that needs a version asks here: the Makefile (torch, pip), the MLflow model's
requirements (`tasks.registry.versions.pip_requirements`) and the bento's packages
(`tasks.registry.bento`). Standard library only, so the Makefile can run it in a fresh venv:

    python -m tasks.pins torch      # prints torch==2.13.0
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DISTRIBUTION = "finetuningllm"
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;,]+)\s*$")


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them: `PyYAML`, `rouge_score` -> `pyyaml`, `rouge-score`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pin(line: str) -> tuple[str, str]:
    """(normalised name, version) of an exact pin such as `moto[server]==5.2.5`.

    Raises:
        ValueError: the line is not an exact `name==version` pin.
    """
    match = _PIN.match(line)
    if match is None:
        raise ValueError(f"{line!r}: not an exact pin; write name==version")
    return normalise(match.group(1)), match.group(3)


def _installed_requirements() -> list[str]:
    """The installed project's requirements (its metadata, from pyproject.toml at install time)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [line.split(";")[0] for line in requires(DISTRIBUTION) or []]
    except PackageNotFoundError:
        raise FileNotFoundError(f"{PYPROJECT}: not found, and the {DISTRIBUTION} distribution is not installed; "
                                "run from a checkout of the project") from None


def project_pins(pyproject: Path = PYPROJECT, extras: bool = True) -> dict[str, str]:
    """Every pin of `pyproject.toml`: normalised name -> version.

    Outside a checkout (the project installed from a wheel), the installed distribution's
    metadata holds the same pins, extras included.

    Args:
        pyproject: the project file.
        extras: include the optional dependencies (test, scaleout) and the setup pins.
    """
    if not Path(pyproject).is_file():
        return dict(parse_pin(line) for line in _installed_requirements())
    doc = tomllib.loads(Path(pyproject).read_text(encoding="utf-8"))
    lines = list(doc["project"]["dependencies"])
    if extras:
        lines += [line for group in doc["project"].get("optional-dependencies", {}).values() for line in group]
        lines += doc.get("tool", {}).get("finetuningllm", {}).get("setup-pins", [])
    return dict(parse_pin(line) for line in lines)


def requirements(names: Iterable[str], pyproject: Path = PYPROJECT) -> list[str]:
    """`name==version` lines for `names`, at the project's pins.

    Raises:
        LookupError: a name that pyproject.toml does not pin (add it to its dependencies).
    """
    pins = project_pins(pyproject)
    missing = [name for name in names if normalise(name) not in pins]
    if missing:
        raise LookupError(f"{pyproject}: no pin for {', '.join(missing)}; add name==version to [project].dependencies")
    return [f"{name}=={pins[normalise(name)]}" for name in names]


if __name__ == "__main__":
    print(" ".join(requirements(sys.argv[1:])))
