"""Every field of every deployment's run form has a description (the Prefect UI shows it under the field)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema_from_entrypoint

from tests.support.project import REPO

# What flows/deploy.py registers, read from its source, so a new deployment cannot be missed.
ENTRYPOINTS = sorted(set(re.findall(r'"(flows/\w+\.py:\w+)"', (REPO / "flows/deploy.py").read_text())))


def _schema(entrypoint: str) -> dict:
    # The same reading of signature and docstring that `flow.from_source(...).deploy()` does.
    return parameter_schema_from_entrypoint(str(REPO / entrypoint)).model_dump_for_openapi()


def test_the_list_is_what_deploy_registers():
    assert {"flows/retrain.py:retrain", "flows/registry.py:promote_flow", "flows/registry.py:rollback_flow",
            "flows/train_step.py:finetune", "flows/monitor.py:monitor"} <= set(ENTRYPOINTS)


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_every_parameter_has_a_description(entrypoint):
    schema = _schema(entrypoint)
    missing = [name for name, prop in schema["properties"].items() if not prop.get("description")]
    assert not missing, f"{entrypoint}: no description for {missing} (add them to the flow's docstring Args section)"


@pytest.mark.parametrize("entrypoint", ENTRYPOINTS)
def test_every_field_of_a_settings_section_has_a_description(entrypoint):
    schema = _schema(entrypoint)
    missing = [f"{model}.{name}" for model, spec in schema.get("definitions", {}).items()
               for name, prop in spec.get("properties", {}).items() if not prop.get("description")]
    assert not missing, f"{entrypoint}: no description for {missing} (Field(description=...) in tasks/config.py)"


def test_refusal_speaks_the_words_of_its_caller(tmp_path):
    """The CLI says `--force --reason TEXT`; the run form has fields named force and reason."""
    from tasks.errors import RegistryRefusal
    from tasks.registry import versions as registry
    from tests.support.registry import new_version

    name = f"words-{Path(tmp_path).name[-8:]}"
    version = new_version(tmp_path, name, passed=False)
    with pytest.raises(RegistryRefusal) as refused:
        registry.promote(name, version)
    assert "--force --reason TEXT" in str(refused.value)
    assert refused.value.form_message.endswith("set force and give a reason") and "--" not in refused.value.form_message
    with pytest.raises(RegistryRefusal) as no_reason:
        registry.promote(name, version, force=True)
    assert "--reason" in str(no_reason.value) and "--" not in no_reason.value.form_message
