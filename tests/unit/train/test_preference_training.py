"""Preference tuning: the loss goes down on a tiny fixture, the reference is the policy with its adapter off."""

from __future__ import annotations

import json

import pytest

from tasks.config import Params, PreferenceParams
from tasks.model.scoring import sequence_logps
from tasks.train.finetune import finetune
from tasks.train.preference import (
    dpo_loss,
    kto_items,
    kto_loss,
    load_policy,
    pair_items,
    preference_tune,
    tuned_model,
)
from tests.support.training import small_params, write_data


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A supervised model folder of the tiny model (a few steps) and its prepared data."""
    folder = tmp_path_factory.mktemp("sft")
    data = write_data(folder)
    out = folder / "model"
    finetune(small_params(max_steps=4), data, out, log=lambda _m: None)
    return out, data


def preference_rows(data) -> list[dict]:
    """Pairs and KTO rows from the fixture: the right answer preferred to another example's answer."""
    rows = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()][:16]
    out = []
    for i, row in enumerate(rows):
        prompt, right = row["messages"][:-1], row["messages"][-1:]
        wrong = rows[(i + 1) % len(rows)]["messages"][-1:]
        out.append({"prompt": prompt, "chosen": right, "rejected": wrong})
        out.append({"prompt": prompt, "completion": wrong if i % 3 else right, "label": not i % 3})
    return out


def write_preference(data, rows):
    (data / "preference_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_preference_tuning_lowers_its_loss_on_a_tiny_fixture(sft, tmp_path, loss):
    model_dir, data = sft
    rows = preference_rows(data)
    write_preference(data, rows)
    prefs = PreferenceParams(loss=loss, max_steps=24, batch_size=8, learning_rate=5e-3, beta=0.5)
    params = Params(train=small_params().train, preference=prefs)

    def loss_of(folder):
        model, tok, _ = load_policy(folder, "cpu")
        model.eval()
        import torch

        with torch.no_grad():
            if loss == "sigmoid":
                return float(dpo_loss(model, pair_items(tok, rows), prefs.beta, tok.pad_token_id, "cpu"))
            items = kto_items(tok, rows)
            return float(kto_loss(model, items, prefs.beta, (1.0, 1.0), tok.pad_token_id, "cpu"))

    summary = preference_tune(params, data, model_dir, tmp_path / "preference", log=lambda _m: None)
    assert summary.ran and summary.steps == 24
    tuned = tuned_model(tmp_path / "preference")
    assert tuned is not None and (tuned / "adapter" / "adapter_model.safetensors").is_file()
    before, after = loss_of(model_dir), loss_of(tuned)
    assert after < before - 0.01, (before, after)


def test_without_enough_preference_data_the_stage_records_a_no_op(sft, tmp_path):
    model_dir, data = sft
    (data / "preference_train.jsonl").unlink(missing_ok=True)
    summary = preference_tune(Params(), data, model_dir, tmp_path / "preference")
    assert not summary.ran and "preference.min_examples 8" in summary.reason
    assert tuned_model(tmp_path / "preference") is None
    assert json.loads((tmp_path / "preference" / "preference.json").read_text())["ran"] is False


def test_kto_weights_balance_desirable_and_undesirable():
    from tasks.train.preference import balanced_weights

    assert balanced_weights(PreferenceParams(), 30, 10) == (1.0, 3.0)
    assert balanced_weights(PreferenceParams(), 5, 20) == (4.0, 1.0)
    assert balanced_weights(PreferenceParams(desirable_weight=1.5), 30, 10) == (1.5, 1.0)


def test_the_reference_is_the_policy_with_its_adapter_off_and_no_second_copy(sft):
    import torch

    from tasks.model.loading import grow_embeddings, load_causal_lm, load_tokenizer

    model_dir, data = sft
    policy, tok, info = load_policy(model_dir, "cpu")
    policy.eval()
    seqs = [i.seq for i in kto_items(tok, preference_rows(data)[:6])]
    storages = {p.data_ptr() for p in policy.parameters()}
    with torch.no_grad():
        adapted = sequence_logps(policy, seqs, tok.pad_token_id, "cpu")
        with policy.disable_adapter():
            reference = sequence_logps(policy, seqs, tok.pad_token_id, "cpu")
            assert {p.data_ptr() for p in policy.parameters()} == storages  # nothing loaded or copied
        base = load_causal_lm(info["base_path"])
        grow_embeddings(base, load_tokenizer(str(model_dir)), info.get("added_token_ids", []))
        base.eval()
        expected = sequence_logps(base, seqs, tok.pad_token_id, "cpu")
    assert torch.allclose(reference, expected, atol=1e-4)
    assert not torch.allclose(adapted, reference, atol=1e-3)  # the adapter does change the answers' scores
