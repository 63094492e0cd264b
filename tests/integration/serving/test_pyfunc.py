"""A registered version is an MLflow pyfunc model logged from code: it loads in a fresh
process from its own files, unpickles nothing, and answers as the model folder does; it
carries a signature and an input example from its type hints, registers without a warning,
and `mlflow models serve` answers both a chat request and rows over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.support.project import free_port, wait_until_up

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


def test_a_version_has_a_signature_and_an_input_example_from_its_type_hints(registered, tmp_path):
    import mlflow

    assert registered.warnings == []  # neither "add type hints" nor any other
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/2")
    assert info.signature._is_signature_from_type_hint
    fields = {p.name: p.required for p in info.signature.inputs.inputs[0].type.properties}
    assert fields == {"messages": False, "prompt": False}  # one or the other, checked by the request model
    assert [(p.name, p.default) for p in info.signature.params.params] == [("max_new_tokens", 64)]
    assert info.signature.outputs.to_dict() == [{"type": "string", "required": True}]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/2", dst_path=str(tmp_path)))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["inputs"][0]["messages"][-1] == {"role": "user", "content": "2001-02-03"}
    assert example["params"] == {"max_new_tokens": 64}


def test_mlflow_models_serve_answers_a_chat_request_and_rows_over_http(registry, model_dir, tmp_path):
    """`mlflow models serve --env-manager local` of a registered version: `{"messages": [...]}`
    (MLflow's chat shape) and `{"inputs": [rows]}`, as the model folder answers them."""
    from tasks.evaluate.generation import generate_batched
    from tasks.model.chat import render_prompt
    from tasks.model.loading import load_trained

    other = [{"role": "user", "content": "1999-12-31"}]
    model, tokenizer, _ = load_trained(model_dir)
    prompts = [render_prompt(tokenizer, m) for m in (MESSAGES, other)]
    alone, _, _ = generate_batched(model, tokenizer, prompts[:1], 8, 1)
    together, _, _ = generate_batched(model, tokenizer, prompts, 8, 2)  # one batch, as the model batches rows
    port, log_path = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # its uvicorn
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}/2",
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", proc, 120, log_path)
        chat = httpx.post(f"{url}/invocations", json={"messages": MESSAGES, "max_new_tokens": 8}, timeout=60)
        assert chat.status_code == 200, chat.text
        assert chat.json() == alone
        rows = httpx.post(f"{url}/invocations", timeout=60, json={
            "inputs": [{"messages": MESSAGES}, {"messages": other}], "params": {"max_new_tokens": 8}})
        assert rows.status_code == 200, rows.text
        assert rows.json() == {"predictions": together}
        bad = httpx.post(f"{url}/invocations", json={"messages": [{"role": "user"}]}, timeout=60)
        assert bad.status_code == 400 and "messages.0.content" in bad.json()["message"]
        assert "stack_trace" not in bad.json() and "Traceback" not in bad.text
    finally:
        os.killpg(proc.pid, 15)  # the CLI and the uvicorn it started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


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
