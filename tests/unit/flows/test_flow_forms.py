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


def _project_params(tmp_path: Path) -> Path:
    """params.yaml with two settings the project changed from the code's defaults."""
    text, steps = re.subn(r"\n  max_steps: \d+", "\n  max_steps: 77", (REPO / "params.yaml").read_text(), count=1)
    text, rate = re.subn(r"\n  learning_rate: [^\n#]+", "\n  learning_rate: 0.0123 ", text, count=1)
    assert steps == rate == 1
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_the_run_form_starts_from_params_yaml(tmp_path):
    from flows.deploy import form_defaults
    from tasks.config import load_params

    params = load_params(_project_params(tmp_path))
    schema = form_defaults(_schema("flows/retrain.py:retrain"), params)
    train = schema["definitions"]["TrainParams"]["properties"]
    assert (train["max_steps"]["default"], train["learning_rate"]["default"]) == (77, 0.0123)
    gate = schema["definitions"]["GateParams"]["properties"]
    assert gate["min_exact_match"]["default"] == params.gate.min_exact_match
    assert schema["properties"]["train"]["default"] is None  # a run that sets nothing reads params.yaml when it runs


def test_a_section_from_the_form_changes_only_the_fields_it_sets(tmp_path):
    from flows.retrain import retrain
    from tasks.config import load_params, section_overrides

    path = _project_params(tmp_path)
    given = retrain.validate_parameters({"train": {"max_steps": 50}, "gate": {"min_exact_match": 0.2}})
    overrides = section_overrides({name: given.get(name) for name in ("data", "train", "eval", "gate")})
    assert overrides == {"train.max_steps": 50, "gate.min_exact_match": 0.2}
    params = load_params(path, overrides)
    assert (params.train.max_steps, params.train.learning_rate, params.gate.min_exact_match) == (50, 0.0123, 0.2)
    # The form sends a whole section, filled from params.yaml: only the edited field moves.
    whole = load_params(path).train.model_dump(mode="json") | {"seed": 9}
    sent = retrain.validate_parameters({"train": whole})["train"]
    changed = load_params(path, section_overrides({"train": sent}))
    assert changed.train == load_params(path).train.model_copy(update={"seed": 9})
