"""Cross-links between a Prefect flow run, its MLflow run and the model version; the experiment's kind."""

from __future__ import annotations

import json
import uuid

import mlflow

from tasks.config import Params
from tasks.registry import versions as registry
from tasks.registry.tracking import (
    NO_PREFECT_UI,
    FlowRunOrigin,
    flow_run_origin,
    link_tags,
    run_link,
    start_tracking_run,
    version_link,
)

ORIGIN = FlowRunOrigin("0b1c-run", "classy-flow-42", "http://127.0.0.1:4200/runs/flow-run/0b1c-run")


def test_new_experiment_opens_in_the_model_training_view(tmp_path):
    name = f"kind-{uuid.uuid4().hex[:8]}"
    exp_id = registry.ensure_experiment(name, tmp_path)
    assert mlflow.get_experiment(exp_id).tags[registry.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_existing_experiment_without_a_kind_gets_one(tmp_path):
    name = f"kind-{uuid.uuid4().hex[:8]}"
    exp_id = mlflow.create_experiment(name, artifact_location=tmp_path.as_uri())
    assert registry.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(exp_id).tags
    assert registry.ensure_experiment(name, tmp_path) == exp_id
    assert mlflow.get_experiment(exp_id).tags[registry.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_mlflow_run_is_named_and_tagged_after_its_flow_run(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": []}) + "\n")
    run_id = start_tracking_run(tmp_path, Params(), {}, data, "md5x", {"data_md5": "md5x"}, ORIGIN)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.run_name == "classy-flow-42"
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == "0b1c-run" and tags["prefect.flow_run_url"] == ORIGIN.url
    assert tags["mlflow.source.name"] == "flows/retrain.py:retrain"
    assert f"[classy-flow-42]({ORIGIN.url})" in tags["mlflow.note.content"]  # the run page's description
    back = link_tags(ORIGIN, run_id)
    assert back["mlflow_run_url"] == run_link(run_id) and run_id in back["mlflow_run_url"]
    assert back["prefect.flow_run_id"] == "0b1c-run"


def test_a_run_on_the_ephemeral_api_says_there_is_no_page(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    ephemeral = FlowRunOrigin("id-1", "quiet-run", None)
    tags = mlflow.MlflowClient().get_run(start_tracking_run(tmp_path, Params(), {}, data, "m", {}, ephemeral)).data.tags
    assert tags["prefect.flow_run_url"] == NO_PREFECT_UI
    assert "ephemeral" in tags["mlflow.note.content"]


def test_outside_a_flow_run_there_is_no_origin():
    assert flow_run_origin() == FlowRunOrigin(None, None, None)
    assert FlowRunOrigin(None, None, None).tags() == {}


def test_versions_list_their_flow_run(tmp_path):
    from tests.support.registry import new_version

    name = f"links-{uuid.uuid4().hex[:8]}"
    version = new_version(tmp_path, name, True)
    assert registry.list_versions(name)[0]["flow_run"] is None
    for key, value in ORIGIN.tags().items():
        registry.tag_version(name, version, key, value)
    assert registry.list_versions(name)[0]["flow_run"] == {"id": ORIGIN.id, "name": ORIGIN.name, "url": ORIGIN.url}
    assert version_link(name, version).endswith(f"/#/models/{name}/versions/{version}?workflowType=machine_learning")


def test_links_open_mlflows_training_view(tmp_path):
    """MLflow 3.17 opens the GenAI view unless the link asks for the training one."""
    from tasks.registry.tracking import artifact_link

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    run_id = start_tracking_run(tmp_path, Params(), {}, data, "m", {}, ORIGIN)
    assert run_link(run_id).endswith(f"/runs/{run_id}?workflowType=machine_learning")
    assert artifact_link(run_id, "reports/x.html").endswith(f"/runs/{run_id}/artifacts/reports/x.html?workflowType=machine_learning")


def test_a_multi_source_runs_dataset_is_named_after_every_source(tmp_path):
    """The dataset the run trained on is all its sources, with their combined md5; each source is logged beside it."""
    data, feedback = tmp_path / "dates.jsonl", tmp_path / "feedback" / "feedback.jsonl"
    feedback.parent.mkdir()
    data.write_text("{}\n")
    feedback.write_text("{}\n")
    inputs = [(data, "md5-data", "training"), (feedback, "md5-fb", "feedback"), (tmp_path / "p.jsonl", "md5-p", "preference")]
    run_id = start_tracking_run(tmp_path, Params(), {}, data, "md5-both", {}, ORIGIN, inputs)
    logged = {(d.dataset.name, d.dataset.digest, d.tags[0].value)
              for d in mlflow.MlflowClient().get_run(run_id).inputs.dataset_inputs}
    assert logged == {("dates.jsonl + feedback.jsonl", "md5-both", "training"), ("dates.jsonl", "md5-data", "source"),
                      ("feedback.jsonl", "md5-fb", "feedback"), ("p.jsonl", "md5-p", "preference")}
    one = start_tracking_run(tmp_path, Params(), {}, data, "md5-data", {}, ORIGIN, inputs[:1])
    assert [(d.dataset.name, d.dataset.digest) for d in mlflow.MlflowClient().get_run(one).inputs.dataset_inputs] == [
        ("dates.jsonl", "md5-data")]
