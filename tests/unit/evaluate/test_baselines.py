"""The prompted base model's scores are reused between runs only while nothing they depend on changed."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import pytest

from scripts.make_data import make_examples
from tasks.config import EvalParams, ModelParams, Params
from tasks.evaluate import baselines, score
from tasks.evaluate.baselines import BaselineStore, scoring_digest
from tasks.model.loading import resolve_base
from tasks.train.finetune import finetune
from tests.support.training import small_params, write_data, write_params


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def candidate(tmp_path_factory) -> tuple[Path, Path]:
    """A prepared folder with a test split, and a model trained on it for two steps."""
    folder = tmp_path_factory.mktemp("run")
    data = write_data(folder)
    write_jsonl(data / "test.jsonl", make_examples(66, seed=3)[60:])
    finetune(small_params(max_steps=2), data, folder / "model", log=lambda m: None)
    return data, folder / "model"


@pytest.fixture
def spied(monkeypatch, tmp_path):
    """The entries go to a folder of the test; records each base model load and each model scored."""
    monkeypatch.setattr(baselines, "cache_dir", lambda: tmp_path / "cache")
    calls = {"loads": 0, "scored": []}
    load, evaluate = score.load_base_model, score.evaluate_model

    def counted_load(*args, **kwargs):
        calls["loads"] += 1
        return load(*args, **kwargs)

    def recorded_evaluate(model, tokenizer, examples, params, shots=(), system_message="auto"):
        calls["scored"].append(len(shots))
        return evaluate(model, tokenizer, examples, params, shots, system_message)

    monkeypatch.setattr(score, "load_base_model", counted_load)
    monkeypatch.setattr(score, "evaluate_model", recorded_evaluate)
    return calls


def run(tmp_path: Path, data: Path, model: Path, seed: int = 42, **eval_settings) -> dict:
    params = small_params(seed=seed).model_copy(
        update={"eval": EvalParams(max_new_tokens=4, batch_size=8, **eval_settings)})
    return score.evaluate_all(str(write_params(tmp_path / "params.yaml", params)), data, model)


def test_a_second_run_reuses_the_base_scores_and_a_changed_input_scores_again(candidate, spied, tmp_path):
    data, model = candidate
    first = run(tmp_path, data, model)
    assert spied == {"loads": 1, "scored": [0, 0, 3]}  # candidate, base zero-shot, base few-shot
    again = run(tmp_path, data, model)
    assert spied == {"loads": 1, "scored": [0, 0, 3, 0]}  # the candidate only: the base is not even loaded
    for arm in ("base_zero_shot", "base_few_shot"):
        assert again[arm] == json.loads(json.dumps(first[arm]))
    # Another training seed: the shots are drawn with evaluation's own seed, so both are reused.
    run(tmp_path, data, model, seed=7)
    assert spied == {"loads": 1, "scored": [0, 0, 3, 0, 0]}

    # Other shots (the train split changed): the few-shot arm is scored again, the zero-shot arm is not.
    train = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(reversed(train)) + "\n")
    run(tmp_path, data, model)
    assert spied["loads"] == 2 and spied["scored"][5:] == [0, 3]
    # Other settings of the base's scoring: both again.
    run(tmp_path, data, model, max_examples=4)
    assert spied["loads"] == 3 and spied["scored"][7:] == [0, 0, 3]
    # Turned off: scored every run.
    run(tmp_path, data, model, max_examples=4, reuse_baselines=False)
    assert spied["loads"] == 4 and spied["scored"][10:] == [0, 0, 3]


class FixedDay(date):
    day = 6

    @classmethod
    def today(cls) -> date:
        return date(2026, 12, cls.day)


def test_the_key_follows_the_base_files_the_template_and_the_settings(tmp_path, monkeypatch):
    base = resolve_base(ModelParams())
    examples, shots = make_examples(3, seed=1), make_examples(1, seed=2)
    store = BaselineStore(Params(), base, tmp_path)
    key = store.key(examples, shots)
    assert key == BaselineStore(Params(), base, tmp_path).key(examples, shots)
    assert key != store.key(examples[:2], shots) and key != store.key(examples, [])
    assert key != BaselineStore(Params(eval=EvalParams(max_new_tokens=5)), base, tmp_path).key(examples, shots)
    assert key == BaselineStore(Params(eval=EvalParams(reuse_baselines=False)), base, tmp_path).key(examples, shots)
    # The champion's stored scores are named by the same scoring settings.
    assert scoring_digest(Params()) == scoring_digest(Params(eval=EvalParams(reuse_baselines=False)))
    assert scoring_digest(Params()) != scoring_digest(Params(eval=EvalParams(max_new_tokens=5)))

    # A template file is keyed by its text; a base folder by its files.
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    with_file = Params(model=ModelParams(chat_template=str(template)))
    before = BaselineStore(with_file, base, tmp_path).key(examples, shots)
    template.write_text("{{ messages | length }}")
    assert BaselineStore(with_file, base, tmp_path).key(examples, shots) != before
    copy = tmp_path / "base"
    copy.mkdir()
    for f in Path(base).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = BaselineStore(Params(), str(copy), tmp_path).key(examples, shots)
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert BaselineStore(Params(), str(copy), tmp_path).key(examples, shots) != before

    # A template that writes today's date is keyed by the day too; one that does not, never.
    monkeypatch.setattr(baselines, "date", FixedDay)
    assert BaselineStore(Params(), base, tmp_path).key(examples, shots) == key
    (template := tmp_path / "dated.jinja").write_text("{{ strftime_now('%d %B %Y') }}{{ messages }}")
    dated = Params(model=ModelParams(chat_template=str(template)))
    today = BaselineStore(dated, base, tmp_path).key(examples, shots)
    FixedDay.day += 1
    assert BaselineStore(dated, base, tmp_path).key(examples, shots) != today

    # A model id that is not in the Hugging Face cache has no key: it is scored every run.
    nowhere = BaselineStore(Params(), "example-org/not-cached-model", tmp_path)
    assert nowhere.key(examples, shots) is None and nowhere.get(None) is None


def test_entries_are_read_back_and_the_oldest_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "KEEP", 2)
    store = BaselineStore(Params(), resolve_base(ModelParams()), tmp_path)
    keys = [store.key(make_examples(1, seed=s), []) for s in range(3)]
    for i, key in enumerate(keys):
        store.put(key, {"metrics": {"exact_match": i / 10}})
        os.utime(tmp_path / f"{key}.json", ns=(i, i))  # written in this order, whatever the clock's resolution
    assert store.get(keys[0]) is None  # dropped at the third entry
    assert [store.get(k)["metrics"]["exact_match"] for k in keys[1:]] == [0.1, 0.2]
    (tmp_path / f"{keys[2]}.json").write_text("{half")
    assert store.get(keys[2]) is None  # unreadable: scored again, not a failed run
    # A folder that cannot be written (here under a file) leaves the scores unstored, the run unharmed.
    (tmp_path / "file").write_text("")
    blocked = BaselineStore(Params(), resolve_base(ModelParams()), tmp_path / "file" / "cache")
    blocked.put(keys[1], {"metrics": {}})
    assert blocked.get(keys[1]) is None
