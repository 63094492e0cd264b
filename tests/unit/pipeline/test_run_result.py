"""The `ftllm run --json` contract: `RunResult`'s schema holds every key the docs promise (docs/guides/commands.md)."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest

from tasks.pipeline.result import GateCheck, GateResult, RunMetrics, RunResult
from tests.support.project import REPO

# The keys every consumer of `ftllm run --json` relies on (the project's contract); the
# commands guide's paragraph on the run's result (docs/guides/commands.md) must name each of them.
CONTRACT = [
    "status", "model_name", "version", "champion_version",
    "gate.passed", "gate.checks[].name", "gate.checks[].value", "gate.checks[].threshold", "gate.checks[].passed",
    "metrics.candidate", "metrics.base_zero_shot", "metrics.base_few_shot", "metrics.champion",
    "data.path", "data.md5", "data.examples", "mlflow_run_id", "bento", "durations",
]


def readme_result_keys() -> list[str]:
    """The keys the commands guide's sentence on `ftllm run --json` names ("Its keys: ..."), in backticks."""
    text = (REPO / "docs" / "guides" / "commands.md").read_text(encoding="utf-8")
    paragraph = text[text.index("`ftllm run --json` prints a `RunResult`"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    keys_sentence = paragraph.split("Its keys:", 1)[1].split(". ", 1)[0]
    return re.findall(r"`([a-z_0-9]+(?:(?:\[\])?\.[a-z_0-9]+)*(?:\[\])?)`", keys_sentence)


def resolve(schema: dict, path: str) -> dict:
    """The sub-schema at a dotted path (`gate.checks[].name`), following $refs and Optional."""
    defs = schema.get("$defs", {})

    def deref(node: dict) -> dict:
        if "$ref" in node:
            return deref(defs[node["$ref"].rsplit("/", 1)[1]])
        options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
        return deref(options[0]) if len(options) == 1 else node

    node = deref(schema)
    for part in path.split("."):
        is_list = part.endswith("[]")
        properties = node.get("properties", {})
        name = part.removesuffix("[]")
        assert name in properties, f"{path}: no key {name!r} in the RunResult schema"
        node = deref(properties[name])
        if is_list:
            assert node.get("type") == "array", f"{path}: {name} is not a list"
            node = deref(node["items"])
    return node


def test_readme_names_the_whole_contract():
    named = readme_result_keys()
    assert set(CONTRACT) <= set(named), f"docs/guides/commands.md's run result paragraph misses {sorted(set(CONTRACT) - set(named))}"


@pytest.mark.parametrize("key", sorted(set(CONTRACT) | set(readme_result_keys())))
def test_every_documented_key_is_in_the_schema(key):
    resolve(RunResult.model_json_schema(mode="serialization"), key)


def test_status_is_one_of_three():
    status = resolve(RunResult.model_json_schema(mode="serialization"), "status")
    assert sorted(status["enum"]) == ["failed", "promoted", "rejected"]


def test_a_misspelt_attribute_fails_where_it_is_set():
    result = RunResult()
    with pytest.raises(ValueError):
        result.status = "accepted"
    with pytest.raises(ValueError):
        RunResult.model_validate({"statu": "failed"})


def complete_result() -> RunResult:
    return RunResult(
        status="rejected", model_name="m", version="2", champion_version="1",
        gate=GateResult(passed=False, checks=[GateCheck(name="min_exact_match", value=0.5, threshold=0.7, passed=False)]),
        metrics=RunMetrics(candidate={"exact_match": 0.5}, base_zero_shot={"exact_match": 0.0, "perplexity": float("inf")}),
        durations={"validate": 1.5},
    )


def test_it_round_trips_through_json_schema_and_prefects_serializers():
    """Prefect stores a flow's result with its pickle or JSON serializer; both give it back equal."""
    from prefect.serializers import JSONSerializer, PickleSerializer

    result = complete_result()
    jsonschema.validate(json.loads(result.model_dump_json()), RunResult.model_json_schema(mode="serialization"))
    assert RunResult.model_validate_json(result.model_dump_json()) == result
    for serializer in (JSONSerializer(), PickleSerializer()):
        assert serializer.loads(serializer.dumps(result)) == result
    assert pickle.loads(pickle.dumps(result)) == result
    assert result.failed_checks == ["min_exact_match"]
    assert list(result.metrics.by_model()) == ["candidate", "base_zero_shot"]
