"""`make docs` fails on a broken link: its own command, run on a copy of the docs with one added.

(`mkdocs build --strict --quiet` would not: with --quiet the warnings that --strict counts are
never emitted, so the build passes.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import yaml

from tests.support.project import REPO


def make_docs_command() -> str:
    """The recipe of the Makefile's `docs` target, with its variables filled in for this checkout."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^docs: .*\n\t(.+)$", makefile, re.MULTILINE).group(1)
    return recipe.replace("$(CURDIR)", str(REPO)).replace("$(VENV)", str(REPO / ".venv"))


def test_make_docs_fails_on_a_broken_link_and_a_missing_anchor(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    with (tmp_path / "docs" / "guides" / "tests.md").open("a") as page:
        page.write("\nSee [a page that is not there](no-such-page.md) and [a heading](data.md#no-such-heading).\n")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config.update(docs_dir=str(tmp_path / "docs"), site_dir=str(tmp_path / "site"),
                  hooks=[str(REPO / "scripts" / "docs_reference.py")])
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(REPO)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    command = f"{make_docs_command()} --config-file {tmp_path / 'mkdocs.yml'}"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # as the Makefile exports it
    out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no-such-page.md" in out.stderr and "no-such-heading" in out.stderr
