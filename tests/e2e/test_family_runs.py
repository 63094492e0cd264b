"""The retrain flow end to end on model families: validate, prepare, finetune, evaluate,
gate, register and package a small model (`tests/support/families.py`).

Every family's own work (its tokenizer set-up, template, training, the evaluate stage's
scoring of the candidate and the prompted base, loading the folder, both serving loops) is
tested for all eight in `tests/unit/model/test_families.py`; registering and packaging
take the model folder as it is. These whole runs take the families whose folders differ
most: GPT-2 (a base model: ChatML tokens added and trained, Conv1D layers, tied
embeddings) and Gemma 2 (no system role, `train.attention: mask`). The Llama family (an
instruct template, a pad token added) runs whole as Llama 3.1, whose tokenizer set-up is Llama
3's with tools, in test_tools_run.py, beside Qwen 2.5.

The budget is tiny (5 steps, 8 test examples) and the gate lenient: these runs check that
every step works with each family's tokenizer, template and architecture, not how well it
learns (the tiny model's runs in test_retrain.py do that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.make_data import make_examples
from tests.support.project import FAMILY_RUN

pytestmark = pytest.mark.slow

LENIENT = {**FAMILY_RUN, "train.max_steps": 5, "train.batch_size": 4, "train.seq_len": 128,
           "train.learning_rate": 0.01, "eval.max_examples": 8}


def run_flow(project: Path, **overrides):
    from flows.retrain import retrain

    state = retrain(params_file=str(project / "params.yaml"), overrides=overrides, return_state=True)
    return state, state.result(raise_on_failure=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "dates.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in make_examples(120, seed=21)))
    return path


@pytest.mark.parametrize("name", ["gpt2", "gemma2"])
def test_a_retrain_run_registers_a_version_of_the_family(name, project, prefect_harness, family_models, small_data):
    from mlflow import MlflowClient

    overrides = {**LENIENT, "model.base": str(family_models(name)), "data.path": str(small_data),
                 "registry.model_name": f"family-{name}"}
    if name == "gemma2":
        overrides["train.attention"] = "mask"  # packed attention does not soft-cap Gemma 2's logits
    state, result = run_flow(project, **overrides)
    assert state.is_completed(), getattr(result, "error", result)
    assert result.version is not None and result.bento
    version = MlflowClient().get_model_version(f"family-{name}", result.version)
    assert version.tags["gate_passed"] == "true"
    summary = json.loads((project / "artifacts/model/train_summary.json").read_text())
    assert summary["trained_tokens"] > 0 and summary["steps"] == 5
    info = json.loads((project / "artifacts/model/ftllm_model.json").read_text())
    assert info["base_path"] == str(family_models(name))


def test_a_model_neither_local_nor_cached_fails_before_validation(project, prefect_harness):
    state, result = run_flow(project, **{"model.base": "meta-llama/Llama-3.2-1B-Instruct"})
    assert state.is_failed()
    assert "neither a local folder nor in the Hugging Face cache" in result.error
    assert "\n" not in result.error.strip()
    assert result.validation is None and result.version is None
