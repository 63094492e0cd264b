"""The fine-tuning engine on the tiny model: packing, labels, schedule, errors, checkpoints, merge, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.make_data import make_examples
from tasks.config import Params, TrainParams
from tasks.errors import ConfigError
from tasks.model.chat import encode_chat
from tasks.model.loading import (
    load_causal_lm,
    load_tokenizer,
    load_trained,
    resolve_base,
)
from tasks.train import finetune as finetune_module
from tasks.train.checkpoints import checkpoints_dir
from tasks.train.finetune import build_model, check_config, finetune
from tasks.train.loop import lr_schedule, train_loop
from tasks.train.packing import (
    IGNORE,
    make_batches,
    pack_sequences,
    padding_fraction,
    prepare_batches,
    to_tensors,
)
from tests.support.training import small_params, write_data

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def base_path() -> str:
    return resolve_base(Params().model)


@pytest.fixture(scope="module")
def tokenizer(base_path):
    return load_tokenizer(base_path)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    return write_data(tmp_path)


def test_packing_keeps_padding_under_5_percent_on_default_data(tokenizer):
    train = TrainParams()
    rows = make_examples(1600, seed=7)
    batches = prepare_batches(tokenizer, rows, train)
    assert padding_fraction(batches) < 0.05
    # Every token of every example is in exactly one row, and no row is longer than seq_len.
    encoded = [encode_chat(tokenizer, r["messages"]) for r in rows]
    assert sum(b.real_tokens for b in batches) == sum(len(e.input_ids) for e in encoded)
    assert max(len(b.input_ids[0]) for b in batches) <= train.seq_len


def test_best_fit_needs_fewer_rows_than_greedy(tokenizer):
    # Lengths that vary, as real data's do: every third example has a second turn. (The tiny
    # tokenizer encodes every dates example in 35-43 tokens, which greedy packs as well.)
    examples = make_examples(400, seed=1)
    conversations = [r["messages"] + (examples[i - 1]["messages"][-2:] if i % 3 == 0 else [])
                     for i, r in enumerate(examples)]
    encoded = [encode_chat(tokenizer, m) for m in conversations]
    rows = pack_sequences(encoded, 256)
    greedy, used = 1, 0
    for e in encoded:
        if used + len(e.input_ids) > 256:
            greedy, used = greedy + 1, 0
        used += len(e.input_ids)
    assert len(rows) < greedy
    assert all(len(r[0]) <= 256 for r in rows)


@pytest.mark.parametrize("attention", ["mask", "packed"])
def test_packed_logits_equal_each_example_alone(tokenizer, base_path, attention):
    import torch

    from tasks.train.attention import use_packed_attention
    from tasks.train.loss import CausalLMLoss

    model = load_causal_lm(base_path).eval()
    if attention == "packed":
        use_packed_attention(model)
        assert model.config._attn_implementation == "ftllm_packed"
    reference = load_causal_lm(base_path).eval()  # the same weights, transformers' own attention
    encoded = [encode_chat(tokenizer, r["messages"]) for r in make_examples(3, seed=5)]
    rows = pack_sequences(encoded, 256)
    assert len(rows) == 1  # all three share one row
    batch = make_batches(rows + [([5, 6, 7], [IGNORE] * 3, [0, 1, 2])], 2, tokenizer.pad_token_id)[0]
    ids, pos, shifted = to_tensors(batch, "cpu")
    row = next(i for i, p in enumerate(batch.position_ids) if p.count(0) == 3)
    starts = [i for i, p in enumerate(batch.position_ids[row]) if p == 0] + [len(batch.position_ids[row])]
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers skips the packed-sequence mask.
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        alone_loss = 0.0
        for start, end in zip(starts, starts[1:]):
            segment = batch.input_ids[row][start:end]
            alone = reference(input_ids=torch.tensor([segment])).logits[0]
            torch.testing.assert_close(packed[row, start:end], alone, atol=1e-4, rtol=1e-4)
            enc = next(e for e in encoded if e.input_ids == segment)
            labels = torch.tensor([t if m else IGNORE for t, m in zip(enc.input_ids, enc.loss_mask)][1:] + [IGNORE])
            alone_loss += float(torch.nn.functional.cross_entropy(alone, labels, reduction="sum", ignore_index=IGNORE))
        # The training loss of the packed batch is the sum of the examples' losses.
        trained = CausalLMLoss(model)(ids, pos, shifted)
        assert float(trained) == pytest.approx(alone_loss, rel=1e-4)


def test_labels_are_the_next_assistant_tokens_only(tokenizer):
    example = make_examples(1, seed=9)[0]
    enc = encode_chat(tokenizer, example["messages"])
    batch = make_batches(pack_sequences([enc, enc], 128), 1, tokenizer.pad_token_id)[0]
    labels = [t for t in batch.labels[0] if t != IGNORE]
    answer = example["messages"][-1]["content"]
    assert tokenizer.decode(labels[: len(labels) // 2]).startswith(answer)
    # Only assistant tokens, never the first token of the next example.
    n_assistant = sum(enc.loss_mask)
    assert len(labels) == 2 * n_assistant
    on_prompt = make_batches(pack_sequences([encode_chat(tokenizer, example["messages"], True)], 128), 1, 0)[0]
    assert sum(t != IGNORE for t in on_prompt.labels[0]) == len(enc.input_ids) - 1


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lr_at = lr_schedule(TrainParams(max_steps=100, warmup_steps=0.1, learning_rate=1.0))
    assert lr_at(0) == pytest.approx(0.0)
    assert lr_at(5) == pytest.approx(0.5)
    assert lr_at(10) == pytest.approx(1.0)
    assert lr_at(55) < lr_at(20)
    assert lr_at(100) == pytest.approx(0.1)
    assert lr_schedule(TrainParams(max_steps=100, warmup_steps=10, learning_rate=0.5, min_lr_ratio=0.0))(100) == pytest.approx(0.0)


def test_every_epoch_takes_the_batches_in_a_shuffled_order_the_first_too(data_dir, base_path, tokenizer):
    # make_batches orders the batches by length; an epoch in that order trains the short
    # examples first and the long ones last (on the tools task, one tool after the other).
    import torch

    train = small_params(batch_size=1).train
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    batches = prepare_batches(tokenizer, rows, train)
    n = len(batches)
    assert n >= 8
    train = train.model_copy(update={"max_steps": 2 * n})
    model = build_model(base_path, train, "cpu", torch.float32, tokenizer)
    state = train_loop(model, batches, train, "cpu", log=lambda m: None, progress=False)
    taken = [b for h in state.history for b in h["batches"]]
    first, second = taken[:n], taken[n:]
    assert sorted(first) == sorted(second) == list(range(n))  # each batch once an epoch
    assert first != list(range(n)) and second != first


def test_qlora_without_cuda_names_the_requirement(base_path):
    with pytest.raises(ConfigError, match="train.method=qlora needs a CUDA GPU"):
        check_config(TrainParams(method="qlora"), base_path, "cpu")


def test_seq_len_beyond_the_model_context_fails_before_training(data_dir, tmp_path):
    logged = []
    with pytest.raises(ConfigError, match="train.seq_len=4096"):
        finetune(small_params(seq_len=4096), data_dir, tmp_path / "model", log=logged.append)
    assert not (tmp_path / "model").exists() and not any("step" in m for m in logged)


class Stop(Exception):
    pass


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(data_dir, tmp_path):
    params = small_params(save_steps=2, lora_dropout=0.1)
    whole = finetune(params, data_dir, tmp_path / "a", log=lambda m: None)

    def stop_at_step_5(message: str) -> None:
        if message.startswith("step 5/"):
            raise Stop

    with pytest.raises(Stop):
        finetune(params, data_dir, tmp_path / "b", log=stop_at_step_5)
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in checkpoints_dir(tmp_path / "b").iterdir()) == ["step-00000002", "step-00000004"]
    logged: list[str] = []
    resumed = finetune(params, data_dir, tmp_path / "b", log=logged.append)
    assert any(m.startswith("resuming from step 4") for m in logged)
    assert resumed.resumed_from_step == 4 and resumed.steps == 6
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5)
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]

    # The same settings again: resumes at the end (nothing to train); other settings: starts over.
    logged.clear()
    assert finetune(params, data_dir, tmp_path / "b", log=logged.append).resumed_from_step == 6
    logged.clear()
    changed = finetune(small_params(save_steps=2, learning_rate=0.002), data_dir, tmp_path / "b", log=logged.append)
    assert changed.resumed_from_step == 0 and any(m.startswith("not resuming") for m in logged)


def test_merged_model_gives_the_logits_of_base_plus_adapter(data_dir, tmp_path, tokenizer):
    import torch

    out = tmp_path / "model"
    finetune(small_params(max_steps=3, merge_adapter=True, learning_rate=0.01), data_dir, out, log=lambda m: None)
    info = json.loads((out / "ftllm_model.json").read_text())
    assert info["kind"] == "adapter" and (out / "adapter").is_dir() and (out / "history.json").is_file()
    adapted, _, _ = load_trained(out)
    merged = load_causal_lm(str(out / "merged")).eval()
    base = load_causal_lm(info["base_path"]).eval()
    ids = torch.tensor([encode_chat(tokenizer, make_examples(1, seed=11)[0]["messages"]).input_ids])
    with torch.no_grad():
        a, m, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    assert (a - b).abs().max() > 1e-3  # the adapter did change the model


def test_bf16_trainables_train_in_bf16_and_the_folder_loads(data_dir, tmp_path, base_path, tokenizer, monkeypatch):
    """train.trainable_precision=bf16: the adapter and the modules to save are bf16 (no fp32 copy,
    no autocast), the loss falls, and the saved adapter loads for evaluation and serving."""
    import torch
    from safetensors import safe_open

    train = TrainParams(precision="bf16", trainable_precision="bf16")
    model = build_model(base_path, train, "cpu", torch.bfloat16, tokenizer)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert finetune_module.loop_dtype(train, torch.bfloat16) is None  # no autocast over bf16 weights

    loop_dtypes = []

    def recording_loop(*args, **kwargs):
        loop_dtypes.append(kwargs["dtype"])
        return train_loop(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "train_loop", recording_loop)
    out = tmp_path / "model"
    summary = finetune(small_params(precision="bf16", trainable_precision="bf16", max_steps=8), data_dir, out,
                       log=lambda m: None)
    assert loop_dtypes == [None]  # the loop ran without autocast
    history = json.loads((out / "history.json").read_text())
    assert summary.precision == "bfloat16"
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as f:
        saved = {f.get_tensor(k).dtype for k in f.keys()}
    assert saved == {torch.bfloat16}
    model, tok, _ = load_trained(out)
    ids = torch.tensor([encode_chat(tok, make_examples(1, seed=11)[0]["messages"]).input_ids])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_bf16_trainables_need_a_bf16_run_on_this_device(base_path):
    with pytest.raises(ConfigError, match="train.trainable_precision=bf16 needs a bf16 run"):
        check_config(TrainParams(trainable_precision="bf16", precision="auto"), base_path, "cpu")


def test_compiled_layers_train_as_the_eager_ones_on_one_shape(data_dir, tmp_path, monkeypatch):
    """train.compile: every decoder layer is compiled, batches are padded to seq_len (one shape),
    and the losses are those of the eager run. The aot_eager backend traces forward and backward
    as inductor does but skips its C++ code generation, which takes minutes on two cores."""
    import torch._dynamo

    monkeypatch.setitem(finetune_module.COMPILE_OPTIONS, "backend", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = finetune(small_params(max_steps=3), data_dir, tmp_path / "eager", log=lambda m: None)
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = finetune(small_params(max_steps=3, compile=True), data_dir, tmp_path / "compiled", log=lambda m: None)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert compiled.padding_fraction > eager.padding_fraction  # every batch is seq_len wide now
    a = json.loads((tmp_path / "eager" / "history.json").read_text())
    b = json.loads((tmp_path / "compiled" / "history.json").read_text())
    assert [h["loss"] for h in b] == pytest.approx([h["loss"] for h in a], rel=1e-4)
    torch._dynamo.reset()


def test_fixed_width_batches_hold_the_same_rows_and_labels(tokenizer):
    rows = pack_sequences([encode_chat(tokenizer, e["messages"]) for e in make_examples(40, seed=5)], 128)
    loose, fixed = make_batches(rows, 4, 0), make_batches(rows, 4, 0, width=128)
    assert {len(r) for b in fixed for r in b.input_ids} == {128}
    for a, b in zip(loose, fixed, strict=True):
        n = len(a.input_ids[0])
        assert [r[:n] for r in b.input_ids] == a.input_ids and [r[:n] for r in b.labels] == a.labels
        assert all(t == IGNORE for r in b.labels for t in r[n:])
    with pytest.raises(ValueError, match="width 8 is shorter"):
        make_batches(rows, 4, 0, width=8)
