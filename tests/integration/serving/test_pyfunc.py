"""A registered version is an MLflow pyfunc model logged from code: it loads in a fresh
process from its own files, unpickles nothing, and answers as the model folder does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

MODEL_NAME = "ftllm-chat-test"  # as in conftest.py
MESSAGES = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]
# Formats that torch.load, joblib or pickle read, all of which can run code when loaded.
PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib", ".bin", ".pt", ".pth", ".ckpt"}

LOAD_AND_PREDICT = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
import tasks
answers = model.predict(pd.DataFrame({"messages": [json.loads(sys.argv[2])]}))
print(json.dumps({"answers": list(answers), "tasks": tasks.__file__}))
"""


def test_a_version_holds_code_safetensors_and_no_pickle(registry, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/2", dst_path=str(tmp_path)))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if Path(f).suffix in PICKLE_SUFFIXES], files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # the key of a cloudpickled model
    assert (local / Path(flavor["model_code_path"]).name).is_file()
    assert f"{flavor['code']}/tasks/registry/versions.py" in files  # the tasks package travels with it
    weights = [f for f in files if f.endswith(".safetensors")]
    assert "artifacts/model_dir/adapter/adapter_model.safetensors" in weights
    assert any(f.startswith("artifacts/model_dir/base/") for f in weights)  # the tiny base travels too
    requirements = (local / "requirements.txt").read_text().split()
    assert "mlflow==3.17.2" in requirements and not any(r.startswith("cloudpickle") for r in requirements)


def test_a_version_loads_in_a_fresh_process_and_answers_as_the_model_folder(registry, model_dir, tmp_path):
    from tasks.evaluate.generation import generate_batched
    from tasks.model.chat import render_prompt
    from tasks.model.loading import load_trained

    # Another working directory and no PYTHONPATH: the project's folder is not importable
    # from there, so `tasks` must come from the version's own code. MLflow refuses to
    # unpickle a model under MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{MODEL_NAME}/2", json.dumps(MESSAGES)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["tasks"]).parts[-3:-1] == ("code", "tasks")  # imported from the version

    model, tokenizer, _ = load_trained(model_dir)
    expected, _, _ = generate_batched(model, tokenizer, [render_prompt(tokenizer, MESSAGES)], 64, 1)
    assert result["answers"] == expected
