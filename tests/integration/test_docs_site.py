"""`make docs` fails on a broken link: its own command and settings, on a small site before and after one is added.

(`mkdocs build --strict --quiet` would not: with --quiet the warnings that --strict counts are
never emitted, so the build passes.)"""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from tests.support.project import REPO


def make_docs_command() -> str:
    """The recipe of the Makefile's `docs` target, with its variables filled in for this checkout."""
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^docs: .*\n\t(.+)$", makefile, re.MULTILINE).group(1)
    return recipe.replace("$(CURDIR)", str(REPO)).replace("$(VENV)", str(REPO / ".venv"))


def _build(site, pages: dict[str, str]):
    """`make docs`'s command on a site of `pages`, with the project's mkdocs.yml settings
    (strict, link and anchor validation, theme, plugins) but its own nav and no generated
    reference pages, which take most of a full build's time and play no part in link checks."""
    for name, text in pages.items():
        (site / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (site / "docs" / name).write_text(text)
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    config.update(docs_dir=str(site / "docs"), site_dir=str(site / "site"), hooks=[], nav=list(pages))
    (site / "mkdocs.yml").write_text(yaml.safe_dump(config))
    command = f"{make_docs_command()} --config-file {site / 'mkdocs.yml'}"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # as the Makefile exports it
    return subprocess.run(command, shell=True, cwd=site, env=env, capture_output=True, text=True, timeout=600)


def test_make_docs_fails_on_a_broken_link_and_a_missing_anchor(tmp_path):
    pages = {"index.md": "# Home\n\nSee [the data guide](guides/data.md#formats).\n",
             "guides/data.md": "# Data\n\n## Formats\n\nText.\n"}
    sound = _build(tmp_path / "sound", pages)
    assert sound.returncode == 0, sound.stdout[-2000:] + sound.stderr[-2000:]
    pages["index.md"] += "\nSee [a page that is not there](no-such-page.md) and [a heading](guides/data.md#no-such-heading).\n"
    out = _build(tmp_path / "broken", pages)
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no-such-page.md" in out.stderr and "no-such-heading" in out.stderr
