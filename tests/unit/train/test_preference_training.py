"""Preference tuning: the loss goes down on a tiny fixture, the reference is the supervised model (its adapter
loaded twice, the base once), and the saved folder is the tuned model over the original base."""

from __future__ import annotations

import json
import math

import pytest

from tasks.config import Params, PreferenceParams
from tasks.model.loading import load_causal_lm, load_trained
from tasks.model.scoring import sequence_logps
from tasks.train.finetune import finetune
from tasks.train.preference import (
    REFERENCE,
    dpo_loss,
    kto_items,
    kto_loss,
    load_policy,
    pair_items,
    policy_and_reference,
    preference_tune,
    train_preference,
    tune_policy,
    tuned_model,
)
from tasks.train.preference import write_preference as write_preference_dir
from tasks.train.warm_start import load_init_adapter
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


@pytest.fixture
def kept_whatever_it_costs(monkeypatch):
    """The tuned model is kept, past the val check: the fixture's learning rate (5e-3, so the loss
    moves in a few steps) costs the task, and the check would leave the model out. The check is
    tested on its own below."""
    from dataclasses import replace

    import tasks.train.preference as stage

    monkeypatch.setattr(stage, "held_the_task", lambda *args: replace(args[4], kept=True))


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_preference_tuning_lowers_its_loss_on_a_tiny_fixture(sft, tmp_path, loss, kept_whatever_it_costs):
    model_dir, data = sft
    rows = preference_rows(data)
    write_preference(data, rows)
    prefs = PreferenceParams(loss=loss, max_steps=24, batch_size=8, learning_rate=5e-3, beta=0.5)
    params = Params(train=small_params().train, preference=prefs)

    def loss_of(folder):
        """The loss of `folder`'s adapter against the supervised model (the reference)."""
        model, tok, _ = load_policy(model_dir, "cpu")
        if folder != model_dir:
            load_init_adapter(model, folder)  # into the trainable adapter; the reference stays the supervised one
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


def sft_logps(model_dir, seqs, pad_id):
    """Log-probs of `seqs` under the supervised model folder, loaded as every consumer loads it."""
    import torch

    model, _, _ = load_trained(model_dir)
    with torch.no_grad():
        return sequence_logps(model, seqs, pad_id, "cpu")


def test_the_reference_is_the_supervised_model_while_the_policy_trains_and_the_base_is_loaded_once(sft):
    import torch

    model_dir, data = sft
    policy, tok, info = load_policy(model_dir, "cpu")
    seqs = [i.seq for i in kto_items(tok, preference_rows(data)[:6])]
    supervised = sft_logps(model_dir, seqs, tok.pad_token_id)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and not any(f".{REFERENCE}." in n for n in trainable)  # the reference copy is frozen
    # Train the policy away from the supervised model: the reference stays it, in train mode as in eval mode.
    prefs = PreferenceParams(loss="sigmoid", max_steps=6, batch_size=4, learning_rate=5e-3, beta=0.5)
    train_preference(policy, pair_items(tok, preference_rows(data)), prefs, tok.pad_token_id, "cpu", 0, log=lambda _m: None)
    for mode in (True, False):
        policy.train(mode)
        with torch.no_grad():
            tuned, reference = policy_and_reference(policy, seqs, tok.pad_token_id, "cpu")
        assert policy.training is mode and policy.active_adapter == "default"
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
        assert torch.allclose(reference, supervised, atol=1e-5), (reference, supervised)
        assert not torch.allclose(tuned, supervised, atol=1e-3)  # the policy did move
    # The reference is not the base model (which the adapter disabled would be) ...
    with torch.no_grad(), policy.disable_adapter():
        base = sequence_logps(policy, seqs, tok.pad_token_id, "cpu")
    assert not torch.allclose(base, supervised, atol=1e-3)
    # ... and the base weights are in memory once: only adapter tensors come on top of them.
    adapters = ("lora_", "modules_to_save.", "trainable_tokens_")
    own = sum(p.numel() for n, p in policy.named_parameters() if not any(a in n for a in adapters))
    assert own == sum(p.numel() for p in load_causal_lm(info["base_path"]).parameters())


def test_the_saved_folder_is_the_tuned_model_over_the_original_base(sft, tmp_path, kept_whatever_it_costs):
    import torch
    from safetensors.torch import load_file

    model_dir, data = sft
    write_preference(data, preference_rows(data))
    prefs = PreferenceParams(loss="kto", max_steps=8, batch_size=8, learning_rate=5e-3, beta=0.5)
    summary, tuned = tune_policy(Params(train=small_params().train, preference=prefs), data, model_dir, log=lambda _m: None)
    assert summary.ran and tuned is not None
    write_preference_dir(tmp_path / "preference", summary, tuned)
    folder = tuned_model(tmp_path / "preference")
    loaded, tok, _ = load_trained(folder)
    ids = [tok(text, return_tensors="pt").input_ids for text in ("2024-02-29", "Convert this ISO date: 1999-12-31", "Date")]
    tuned.model.eval()
    device = next(tuned.model.parameters()).device  # the stage trains on a GPU where there is one
    with torch.no_grad():
        for x in ids:
            assert torch.allclose(loaded(x).logits, tuned.model(x.to(device)).logits.cpu(), atol=1e-4)
        sft_model, _, _ = load_trained(model_dir)
        assert not torch.allclose(sft_model(ids[1]).logits, loaded(ids[1]).logits, atol=1e-3)  # it was tuned
    # The same adapter shape as the supervised one (a warm start continues it), without the reference copy.
    saved, original = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (folder, model_dir))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == sorted(p.name for p in (model_dir / "adapter").iterdir())
    shape = ("r", "lora_alpha", "target_modules", "modules_to_save")
    tuned_config, sft_config = (json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (folder, model_dir))
    # peft writes target_modules from a set, so their order follows the string hash seed: compare as sets.
    assert {k: _unordered(tuned_config[k]) for k in shape} == {k: _unordered(sft_config[k]) for k in shape}


def _unordered(value):
    return set(value) if isinstance(value, list) else value


def _val_scores(right: int, nll: float = 2.0, calls: dict | None = None) -> dict:
    """An `evaluate_model` result on 100 val rows, `right` of them right, as it scores them."""
    ids = [f"row{i}" for i in range(100)]
    metrics = {"exact_match": right / 100, "perplexity": math.exp(nll / 4), "rouge_l": right / 100}
    per_example = {"ids": ids, "exact_match": [1.0] * right + [0.0] * (100 - right),
                   "rouge_l": [1.0] * right + [0.5] * (100 - right), "nll": [nll] * 100, "tokens": [4] * 100}
    if calls:
        metrics.update({"tool_calls": 100, "tool_name_accuracy": sum(calls["tool_name_match"]) / 100,
                        "tool_arguments_match": sum(calls["tool_arguments_match"]) / 100, "tool_invalid_rate": 0.0})
        per_example.update({"tool_ids": ids, **calls})
    return {"metrics": metrics, "per_example": per_example}


@pytest.mark.parametrize(("tuned_right", "kept"), [(50, False), (88, True), (86, True), (95, True)])
def test_tuning_that_costs_the_task_leaves_the_supervised_model_the_candidate(sft, tmp_path, monkeypatch,
                                                                              tuned_right, kept):
    """The gate compares the candidate with the champion only: a preference stage that lowered its
    own supervised model's exact match would be rejected, or promoted worse than it need be. The
    val split decides first, with the gate's own paired check: 90 of 100 right for the supervised
    model; 50 is a significant drop past the margin (0.04), 86 a drop of the margin exactly, 88
    within it."""
    import tasks.evaluate.score as score
    from tasks.evaluate.preference import candidate_dir

    model_dir, data = sft
    write_preference(data, preference_rows(data))
    seen = []

    def exact_match(model, tok, examples, params, **_kw):  # per row, as evaluate_model scores them
        seen.append(model.active_adapter)
        return _val_scores(90 if model.active_adapter == "reference" else tuned_right)

    monkeypatch.setattr(score, "evaluate_model", exact_match)
    prefs = PreferenceParams(loss="kto", max_steps=2, batch_size=8, learning_rate=5e-3, beta=0.5)
    summary = preference_tune(Params(train=small_params().train, preference=prefs), data, model_dir,
                              tmp_path / "preference", log=lambda _m: None)
    assert sorted(seen) == ["default", "reference"]
    assert (summary.ran, summary.kept, summary.val_exact_match_supervised, summary.val_exact_match_tuned) == (
        True, kept, 0.9, tuned_right / 100)
    assert (tuned_model(tmp_path / "preference") is not None) == kept
    expected = tmp_path / "preference" / "model" if kept else model_dir
    assert candidate_dir(model_dir, tmp_path / "preference") == expected
    if not kept:
        assert "worse by more than gate.max_regression 0.04 (and significantly so, where paired)" in summary.reason


def test_without_a_val_split_the_tuned_model_is_kept_unchecked(sft, tmp_path):
    model_dir, data = sft
    write_preference(data, preference_rows(data))
    bare = tmp_path / "data"
    bare.mkdir()
    for name in ("train.jsonl", "preference_train.jsonl"):
        (bare / name).write_text((data / name).read_text())
    prefs = PreferenceParams(loss="kto", max_steps=2, batch_size=8, learning_rate=5e-3, beta=0.5)
    summary = preference_tune(Params(train=small_params().train, preference=prefs), bare, model_dir,
                              tmp_path / "preference", log=lambda _m: None)
    assert summary.kept and "no val split" in summary.reason and tuned_model(tmp_path / "preference") is not None


def test_tuning_that_costs_the_tool_calls_is_left_out_even_where_exact_match_holds(sft, tmp_path, monkeypatch):
    """On a split with tool calls the val check is the gate's tool checks too: a tuned model that
    keeps the answers but loses the calls' function names is no candidate."""
    import tasks.evaluate.score as score

    model_dir, data = sft
    write_preference(data, preference_rows(data))

    def scores(model, tok, examples, params, **_kw):
        names = 95 if model.active_adapter == "reference" else 50
        return _val_scores(90, calls={"tool_name_match": [1.0] * names + [0.0] * (100 - names),
                                      "tool_arguments_match": [1.0] * 40 + [0.0] * 60, "tool_valid_call": [1.0] * 100})

    monkeypatch.setattr(score, "evaluate_model", scores)
    prefs = PreferenceParams(loss="kto", max_steps=2, batch_size=8, learning_rate=5e-3, beta=0.5)
    summary = preference_tune(Params(train=small_params().train, preference=prefs), data, model_dir,
                              tmp_path / "preference", log=lambda _m: None)
    assert not summary.kept and tuned_model(tmp_path / "preference") is None
    assert "fails no_regression_tool_name_match (-0.450" in summary.reason
    assert "arguments" not in summary.reason.split("fails", 1)[1].split(":")[0]  # the checks that held are not named


def test_tuning_that_raises_the_val_perplexity_past_the_margin_is_left_out(sft, tmp_path, monkeypatch):
    """The val check is the gate's whole set of no-regression checks, perplexity among them: a
    tuned model that keeps every answer but puts much less weight on the reference answers
    would fail the gate's perplexity check against the champion, where its supervised model
    might pass."""
    import tasks.evaluate.score as score

    model_dir, data = sft
    write_preference(data, preference_rows(data))
    monkeypatch.setattr(score, "evaluate_model", lambda model, *_a, **_k: _val_scores(
        90, nll=2.0 if model.active_adapter == "reference" else 3.0))  # nats per answer of 4 tokens
    prefs = PreferenceParams(loss="kto", max_steps=2, batch_size=8, learning_rate=5e-3, beta=0.5)
    summary = preference_tune(Params(train=small_params().train, preference=prefs), data, model_dir,
                              tmp_path / "preference", log=lambda _m: None)
    assert not summary.kept and tuned_model(tmp_path / "preference") is None
    failed = summary.reason.split("fails", 1)[1].split(": worse", 1)[0]
    assert "no_regression_perplexity (+0.284, paired bootstrap)" == failed.strip()
