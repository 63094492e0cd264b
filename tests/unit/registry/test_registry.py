"""Registry: versions with lineage tags, promotion refusals, rollback through the champion history."""

from __future__ import annotations

import uuid

import pytest

from tasks.registry import versions as registry
from tests.support.registry import new_version


@pytest.fixture()
def model_name():
    return f"reg-{uuid.uuid4().hex[:8]}"


def test_versions_promotion_and_rollback(tmp_path, model_name):
    v1, v2, v3 = (new_version(tmp_path, model_name, passed) for passed in (True, True, False))
    assert registry.champion_version(model_name) is None
    assert registry.list_versions(model_name)[0]["aliases"] == ["challenger"]

    assert registry.promote(model_name, v1).changed
    assert registry.promote(model_name, v2).champion == v2
    assert not registry.promote(model_name, v2).changed  # idempotent

    with pytest.raises(registry.RegistryRefusal, match="failed its gate"):
        registry.promote(model_name, v3)
    with pytest.raises(registry.RegistryRefusal, match="--reason"):
        registry.promote(model_name, v3, force=True)
    with pytest.raises(registry.RegistryRefusal, match="no version '99'"):
        registry.promote(model_name, "99")

    move = registry.rollback(model_name, reason="bad answers")
    assert (move.previous, move.champion) == (v2, v1)
    tags = registry.get_client().get_model_version(model_name, v1).tags
    assert tags["rollback_reason"] == "bad answers" and "rolled_back_by" in tags
    with pytest.raises(registry.RegistryRefusal, match="nothing to roll back to"):
        registry.rollback(model_name)

    # --force without a reason was taken where the gate had passed, though its help says it needs one
    for forced_without_reason in (lambda: registry.promote(model_name, v2, force=True),
                                  lambda: registry.rollback(model_name, to=v2, force=True)):
        with pytest.raises(registry.RegistryRefusal, match="--force needs --reason"):
            forced_without_reason()
    assert registry.champion_version(model_name) == v1
    forward = registry.rollback(model_name, to=v2)
    assert forward.champion == v2 and registry.champion_history(model_name) == [v1, v2]
    assert not registry.rollback(model_name, to=v2).changed

    forced = registry.promote(model_name, v3, force=True, reason="hotfix")
    assert forced.champion == v3
    assert registry.get_client().get_model_version(model_name, v3).tags["promote_forced"] == "true"


def test_a_version_written_with_a_leading_zero_is_that_version(tmp_path, model_name):
    """MLflow reads `01` as version 1: the champion history must say `1`, or a rollback compares
    `1` with `01` and 'rolls back' to the champion it is on."""
    v1, v2 = (new_version(tmp_path, model_name, True) for _ in range(2))
    registry.promote(model_name, v1)
    assert registry.promote(model_name, f"0{v2}").champion == v2 and not registry.promote(model_name, f"00{v2}").changed
    assert registry.champion_history(model_name) == [v1, v2]
    assert registry.rollback(model_name).champion == v1
    assert registry.rollback(model_name, to=f"0{v2}").champion == v2 and registry.champion_history(model_name) == [v1, v2]


def test_rollback_to_a_version_that_never_served_is_refused_as_a_promotion_would_be(tmp_path, model_name):
    v1, v2, failed = (new_version(tmp_path, model_name, passed) for passed in (True, True, False))
    registry.promote(model_name, v1)
    registry.promote(model_name, v2)
    with pytest.raises(registry.RegistryRefusal, match="failed its gate.*--force --reason"):
        registry.rollback(model_name, to=failed)
    with pytest.raises(registry.RegistryRefusal, match="--reason"):
        registry.rollback(model_name, to=failed, force=True)
    assert registry.champion_version(model_name) == v2
    assert registry.rollback(model_name, to=failed, force=True, reason="known fix").champion == failed
    # a version that served before is restored whatever its gate said
    assert registry.rollback(model_name, to=v1).champion == v1
    assert registry.rollback(model_name, to=failed).champion == failed


def test_unknown_model_has_no_versions(model_name):
    assert registry.list_versions(model_name) == []
    assert registry.champion_history(model_name) == []
    with pytest.raises(registry.RegistryRefusal, match="no champion"):
        registry.rollback(model_name)


def test_a_version_carries_the_feedback_and_preference_splits_metrics_beside_the_test_splits():
    """`ftllm models --json` listed the test split's metrics alone: the preference checks' figures
    were only in the MLflow run."""
    from tasks.registry.versions import metric_tags

    tags = metric_tags({"candidate": {"exact_match": 0.9}, "candidate_feedback": {"exact_match": 0.5},
                        "candidate_preference": {"reward_accuracy": 0.75, "examples": 12}, "champion": {"exact_match": 1.0}})
    assert tags == {"metric.exact_match": "0.9", "metric.feedback.exact_match": "0.5",
                    "metric.preference.reward_accuracy": "0.75", "metric.preference.examples": "12"}
