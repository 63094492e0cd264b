"""The docs site's generated pages: written from the code at every `mkdocs build`, never committed.

A MkDocs hook (`hooks:` in mkdocs.yml). At each build it adds to the site:

- `reference/cli.md`: every `ftllm` command with its usage, options, defaults and help,
  read from the Typer app (`ftllm.cli.app`);
- `reference/settings.md`: every key of params.yaml with its type, default, bounds and
  description, read from the pydantic models of `tasks/config.py`;
- `reference/api/<package>.md`: one `:::` mkdocstrings block per module of tasks/, flows/,
  serving/ and ftllm/, so a new module appears without a page being written for it;
- `benchmarks/`: the benchmark guide and dated results (`benchmarks/**/*.md`) with the JSON
  and logs they link to, so figures live in one place, beside the scripts.

Since the pages are built from the code, they cannot go stale; `mkdocs build --strict`
(`make docs`, part of `make test`) fails on a link to a page or anchor that does not exist.

    PYTHONPATH=. python -m scripts.docs_reference settings   # print one page
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
API_PACKAGES = ("tasks", "flows", "serving", "ftllm")
BENCHMARK_FILES = ("*.md", "*.json", "*.log")


def _cell(text: Any) -> str:
    """Text for a markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    return f"`{_cell(json.dumps(value, default=str))}`"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    for noise in ("tasks.config.", "NoneType"):
        text = text.replace(noise, "None" if noise == "NoneType" else "")
    return text


def _bounds(field: Any) -> str:
    """A field's constraints (ge, le, gt, lt, min_length, pattern) as `>= 1, <= 10`."""
    signs = {"ge": ">=", "le": "<=", "gt": ">", "lt": "<", "min_length": "length >=", "pattern": "matches"}
    parts = []
    for item in field.metadata:
        for name, sign in signs.items():
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{sign} `{value}`" if name == "pattern" else f"{sign} {value}")
    return ", ".join(parts)


def settings_page() -> str:
    """The settings reference: every section of params.yaml, one table row per key."""
    from tasks.config import RESOLVED_ONLY, Params

    lines = [
        "# Settings reference",
        "",
        "Generated from the pydantic models of `tasks/config.py` at every build of this site. "
        "Every key below can be set in `params.yaml` or for one command with `--set section.key=value`; "
        "[the settings guide](../guides/settings.md) says how they are read and checked.",
        "",
    ]
    for section, info in Params.model_fields.items():
        model = info.annotation
        lines += [f"## `{section}`", ""]
        lines += ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for key, field in model.model_fields.items():
            if (section, key) in RESOLVED_ONLY:
                continue
            default = field.default if not callable(field.default_factory) else field.default_factory()
            if hasattr(default, "model_dump"):
                default = default.model_dump(mode="json")
            lines.append(f"| `{section}.{key}` | `{_cell(_type_name(field.annotation))}` | {_code(default)} | "
                         f"{_cell(_bounds(field))} | {_cell(field.description or '')} |")
        lines.append("")
    lines += ["## `data.sources[]`", "", "Each entry of `data.sources`:", "",
              "| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    from tasks.config import SourceParams

    for key, field in SourceParams.model_fields.items():
        if key == "md5":
            continue
        lines.append(f"| `{key}` | `{_cell(_type_name(field.annotation))}` | {_code(field.default)} | "
                     f"{_cell(_bounds(field))} | {_cell(field.description or '')} |")
    lines += ["", "Keys filled in by the `resolve` stage for a run, not written by hand: "
              + ", ".join(f"`{s}.{k}`" for s, k in sorted(RESOLVED_ONLY)) + ".", ""]
    return "\n".join(lines + environment_rows()) + "\n"


def environment_rows() -> list[str]:
    """The environment variables the project reads (`tasks.environment.Environment`), as a section."""
    from tasks.environment import Environment

    lines = ["## Environment variables", "",
             "Read through `tasks.environment.environment()` at call time; secrets are never logged.", "",
             "| variable | meaning |", "| --- | --- |"]
    for field in Environment.model_fields.values():
        name, _, meaning = (field.description or "").partition(": ")
        lines.append(f"| `{_cell(name)}` | {_cell(meaning)} |")
    return [*lines, ""]


def _command_section(name: str, command: Any, context: Any) -> list[str]:
    usage = " ".join(command.collect_usage_pieces(context))
    lines = [f"## `ftllm {name}`", "", _cell(command.help or ""), "", "```", f"ftllm {name} {usage}".rstrip(), "```", ""]
    rows = []
    for param in command.params:
        if param.param_type_name == "argument":
            kind = "argument" + (" (required)" if param.required else ", repeatable" if param.multiple else "")
            rows.append(f"| `{param.name.upper()}` | {kind} | | {_cell(param.help or '')} |")
            continue
        names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        default = "" if param.default is None or param.is_flag and not param.default else _code(param.default)
        kind = "flag" if param.is_flag else ("repeatable" if param.multiple else f"`{_cell(param.display_type(context))}`")
        rows.append(f"| {names} | {kind} | {default} | {_cell(getattr(param, 'help', '') or '')} |")
    if rows:
        lines += ["| parameter | kind | default | help |", "| --- | --- | --- | --- |", *rows, ""]
    return lines


def cli_page() -> str:
    """The command-line reference: every `ftllm` command and subcommand with its options."""
    import typer

    from ftllm.cli import app

    group = typer.main.get_command(app)  # Typer carries its own click: its Context, duck-typed groups
    root = typer.Context(group, info_name="ftllm")
    lines = ["# Command-line reference", "",
             "Generated from the Typer app (`ftllm/cli.py`) at every build of this site. "
             "Exit codes and the `--json` contract are in [the commands guide](../guides/commands.md).", ""]
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):  # a group: `ftllm feedback export`, `ftllm bench serve`
            parent = typer.Context(command, info_name=name, parent=root)
            for sub, subcommand in sorted(command.commands.items()):
                context = typer.Context(subcommand, info_name=sub, parent=parent)
                lines += _command_section(f"{name} {sub}", subcommand, context)
        else:
            lines += _command_section(name, command, typer.Context(command, info_name=name, parent=root))
    return "\n".join(lines) + "\n"


def api_modules(package: str) -> list[str]:
    """Dotted names of the modules of a package, `__init__` as the package itself, sorted."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names))


def api_page(package: str) -> str:
    """One API page: every module of `package`, documented from its docstrings by mkdocstrings."""
    lines = [f"# `{package}`", "", f"Generated from the docstrings of `{package}/` at every build of this site.", ""]
    for module in api_modules(package):
        lines += [f"::: {module}", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """Every generated page: its path in the site's docs folder, and its markdown."""
    out = {"reference/cli.md": cli_page(), "reference/settings.md": settings_page()}
    for package in API_PACKAGES:
        out[f"reference/api/{package}.md"] = api_page(package)
    return out


def on_files(files, config):
    """MkDocs hook: add the generated pages and the benchmark folder to the site's files."""
    from mkdocs.structure.files import File

    sys.path.insert(0, str(ROOT))  # the checkout's code, whatever the environment's editable install points at
    for uri, text in pages().items():
        files.append(File.generated(config, uri, content=text))
    for pattern in BENCHMARK_FILES:
        for path in sorted((ROOT / "benchmarks").rglob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    wanted = sys.argv[1] if len(sys.argv) > 1 else "settings"
    print({"settings": settings_page, "cli": cli_page}.get(wanted, lambda: api_page(wanted))(), end="")
