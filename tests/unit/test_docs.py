"""The docs site's generated references cover the code, every page the nav names exists, and the
README's links resolve. `make docs` (mkdocs build --strict, part of `make test`) checks the links
inside the site; these checks fail faster and name what is missing."""

from __future__ import annotations

import re

import typer
import yaml

from ftllm.cli import app
from scripts.docs_reference import api_modules, cli_page, pages, settings_page
from tasks.config import setting_fields
from tasks.environment import Environment
from tests.support.project import REPO


def test_the_settings_reference_names_every_key_with_its_description():
    page = settings_page()
    for section, key, field in setting_fields():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{section}.{key}` |")), None)
        assert row, f"{section}.{key} is missing from the settings reference"
        assert " ".join((field.description or "").split()).replace("|", "\\|") in row, f"{section}.{key}"
    for field in Environment.model_fields.values():
        assert f"`{field.description.split(':')[0]}`" in page


def test_the_cli_reference_names_every_command_and_option():
    page = cli_page()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", {name: command})
        for sub, leaf in subcommands.items():
            title = name if leaf is command else f"{name} {sub}"
            assert f"## `ftllm {title}`" in page, title
            section = page.split(f"## `ftllm {title}`", 1)[1].split("\n## ", 1)[0]
            for param in leaf.params:
                if param.param_type_name == "option":
                    assert f"`{param.opts[0]}`" in section, f"ftllm {title} {param.opts[0]}"


def test_every_module_has_an_api_page():
    generated = pages()
    for package in ("tasks", "flows", "serving", "ftllm"):
        for path in (REPO / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            assert module in api_modules(package)
            assert f"::: {module}\n" in generated[f"reference/api/{package}.md"]


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    return [page for value in node.values() for page in _nav_pages(value)]


def test_every_page_in_the_nav_exists():
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    generated = set(pages())
    for page in _nav_pages(config["nav"]):
        exists = (REPO / "docs" / page).is_file() or page in generated or (REPO / page).is_file()
        assert exists, f"mkdocs.yml's nav names {page}, which is neither in docs/ nor generated"


def test_the_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "the README links into the docs"
    missing = [link for link in links if "://" not in link and not (REPO / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert len(text.splitlines()) <= 200, "the README is a five-minute read; move the rest into docs/"
