"""Warm start from the champion's adapter, and the steps budget scaled to the data (train.epochs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tasks.config import TrainParams
from tasks.errors import ConfigError
from tasks.files import read_jsonl
from tasks.model.loading import load_base_tokenizer, resolve_base
from tasks.train.finetune import build_model, finetune
from tasks.train.packing import prepare_batches
from tasks.train.warm_start import load_init_adapter, scaled_steps
from tests.support.training import small_params, write_data


def quiet(_message: str) -> None:
    pass


def adapter_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> tuple[Path, Path]:
    """A trained model folder (the champion) and the prepared data it was trained on."""
    folder = tmp_path_factory.mktemp("warm")
    data = write_data(folder)
    finetune(small_params(), data, folder / "champion", log=quiet)
    return folder / "champion", data


def test_scaled_steps_are_epochs_over_optimizer_steps_and_max_steps_without_epochs():
    assert scaled_steps(TrainParams(max_steps=300), 37) == 300  # today's behaviour, whatever the data
    assert scaled_steps(TrainParams(epochs=2), 10) == 20
    assert scaled_steps(TrainParams(epochs=2, grad_accum=2), 10, world=2) == 5
    assert scaled_steps(TrainParams(epochs=0.5), 7) == 4 and scaled_steps(TrainParams(epochs=0.01), 7) == 1


def test_finetune_with_epochs_trains_the_scaled_number_of_steps(champion, tmp_path):
    _, data = champion
    params = small_params(epochs=1.5, max_steps=1000)
    tok = load_base_tokenizer(params.model, resolve_base(params.model))
    batches = prepare_batches(tok, read_jsonl(data / "train.jsonl"), params.train, params.data.system_message)
    summary = finetune(params, data, tmp_path / "m", log=quiet)
    assert summary.steps == math.ceil(1.5 * len(batches)) < 1000
    assert [h["step"] for h in json.loads((tmp_path / "m" / "history.json").read_text())][-1] == summary.steps


def test_warm_start_loads_every_adapter_tensor_of_the_champion(champion, tmp_path):
    import torch

    folder, data = champion
    saved = adapter_tensors(folder)
    # Loaded into a fresh model: every saved tensor (LoRA matrices, embeddings trained in full) is the champion's.
    params = small_params()
    base = resolve_base(params.model)
    model = build_model(base, params.train, "cpu", torch.float32, load_base_tokenizer(params.model, base))
    assert load_init_adapter(model, folder) == len(saved)
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    # Through the stage: with a learning rate of 0 the warm-started model is the champion, a cold one is not.
    warm = finetune(small_params(learning_rate=0.0, init_path=str(folder)), data, tmp_path / "warm", log=quiet)
    cold = finetune(small_params(learning_rate=0.0), data, tmp_path / "cold", log=quiet)
    assert warm.steps == cold.steps == 6
    assert all(torch.equal(v, saved[k]) for k, v in adapter_tensors(tmp_path / "warm").items())
    assert not all(torch.equal(v, saved[k]) for k, v in adapter_tensors(tmp_path / "cold").items())
    # Trained on, the warm start starts at the champion's loss, below a fresh adapter's.
    logged: list[str] = []
    finetune(small_params(max_steps=1, log_every=1, init_path=str(folder)), data, tmp_path / "w1", log=logged.append)
    first_warm = json.loads((tmp_path / "w1" / "history.json").read_text())[0]["loss"]
    finetune(small_params(max_steps=1, log_every=1), data, tmp_path / "c1", log=quiet)
    first_cold = json.loads((tmp_path / "c1" / "history.json").read_text())[0]["loss"]
    assert first_warm < first_cold
    assert any(m.startswith("warm start: ") for m in logged)


def test_warm_start_from_an_adapter_of_another_shape_or_no_adapter_fails_naming_the_setting(champion, tmp_path):
    folder, data = champion
    with pytest.raises(ConfigError, match=r"train.init_from=champion: .*does not fit.*train.init_from=base"):
        finetune(small_params(lora_r=4, init_path=str(folder)), data, tmp_path / "r4", log=quiet)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "ftllm_model.json").write_text(json.dumps({"kind": "full"}))
    with pytest.raises(ConfigError, match=r"holds no LoRA adapter"):
        finetune(small_params(init_path=str(empty)), data, tmp_path / "x", log=quiet)
