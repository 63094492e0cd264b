"""Eight real model families through the project: loading, base-model set-up, training, serving.

Each family is a small random-weight model with its own tokenizer and published chat
template (`tests/support/families.py`). For each: the run's tokenizer (`load_base_tokenizer`)
gets a template, an eos that ends the assistant's turn and a pad token that is not it; a
base model gets ChatML with trainable rows for the new tokens; `finetune` trains a few
steps and writes a folder that `load_trained` loads; and the serving engine answers what
`model.generate` answers from that folder.
"""

from __future__ import annotations

import json
import math
import queue
from pathlib import Path

import pytest
import torch

from scripts.make_data import make_examples
from tasks.config import ModelParams, Params, ServingParams, TrainParams, load_params
from tasks.errors import ConfigError
from tasks.model.loading import (
    CHATML_TEMPLATE,
    added_token_ids,
    check_base,
    check_fit,
    end_of_turn_token,
    grow_embeddings,
    load_base_model,
    load_base_tokenizer,
    load_causal_lm,
    load_trained,
    resolve_attention,
)
from tasks.train.finetune import build_model, decoder_layers, finetune
from tests.support.families import FAMILIES
from tests.support.project import REPO

ROOT = REPO
NAMES = list(FAMILIES)

# What the run's tokenizer must end up with, written out per family (not computed by the
# code under test): the token the template ends the assistant's turn with becomes eos, and
# pad is the family's own, its unk token, or an added <|pad|>; never the end of turn.
EXPECTED = {
    "llama3": ("<|eot_id|>", "<|pad|>"),
    "llama3.1": ("<|eot_id|>", "<|pad|>"),
    "qwen2.5": ("<|im_end|>", "<|endoftext|>"),
    "qwen3": ("<|im_end|>", "<|endoftext|>"),
    "mistral": ("</s>", "<unk>"),
    "gemma2": ("<end_of_turn>", "<pad>"),
    "phi3": ("<|end|>", "<|endoftext|>"),
    "gpt2": ("<|im_end|>", "<|endoftext|>"),
    "neox": ("<|im_end|>", "<|endoftext|>"),
}




def conversations(name: str, count: int, seed: int, system: bool = True) -> list[dict]:
    """Date examples, with a system message unless `system` is False (Gemma 2's template refuses
    the system role and Mistral v0.3's moves it: `data.system_message: auto` merges it into the
    first user turn for both, the way training, evaluation and serving all render)."""
    examples = make_examples(count, seed=seed)
    if not system:
        examples = [{"messages": [m for m in e["messages"] if m["role"] != "system"]} for e in examples]
    return examples


def small_params(path: Path, **train) -> Params:
    # train.attention is left at auto: the mask for Gemma 2 (soft-capped logits), packed for the others.
    settings = dict(max_steps=8, batch_size=4, seq_len=128, save_steps=0, log_every=1, learning_rate=0.01)
    settings.update(train)
    return Params(model=ModelParams(base=str(path)), train=TrainParams(**settings))


@pytest.mark.parametrize("name", NAMES)
def test_the_run_tokenizer_ends_turns_with_eos_and_pads_with_another_token(name, family_models):
    path = family_models(name)
    family = FAMILIES[name]
    tok = load_base_tokenizer(ModelParams(base=str(path)))
    eos, pad = EXPECTED[name]
    assert (tok.eos_token, tok.pad_token) == (eos, pad)
    assert tok.pad_token_id != tok.eos_token_id
    assert end_of_turn_token(tok) == eos
    added = [tok.convert_ids_to_tokens(i) for i in added_token_ids(tok, str(path))]
    if family.is_base:
        assert tok.chat_template == CHATML_TEMPLATE
        assert added == ["<|im_start|>", "<|im_end|>"]
    else:
        assert tok.chat_template == family.chat_template  # its own, untouched
        assert added == (["<|pad|>"] if pad == "<|pad|>" else [])


@pytest.mark.parametrize("name", ["gpt2", "neox", "llama3"])
def test_added_tokens_get_rows_and_only_they_are_trained_beside_the_adapter(name, family_models):
    """Base models train the rows of <|im_start|>/<|im_end|> (input and, untied, output
    embedding), nothing else of the embeddings; an added pad token is never trained."""
    path = str(family_models(name))
    tok = load_base_tokenizer(ModelParams(base=path))
    new_ids = added_token_ids(tok, path)
    model = build_model(path, TrainParams(), "cpu", torch.float32, tok, new_ids)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    embedding = [n for n in trainable if "lora_" not in n]
    assert not any("modules_to_save" in n for n in trainable)
    if FAMILIES[name].is_base:
        deltas = [n for n in embedding if "trainable_tokens_delta" in n]
        tied = FAMILIES[name].tied
        assert len(deltas) == (1 if tied else 2), embedding
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                assert p.shape[0] == 2  # the two ChatML tokens, not the whole vocabulary
    else:
        assert embedding == []  # the pad row is not trained; the real embedding stays frozen


def test_the_tiny_model_still_trains_its_whole_embedding(tmp_path):
    from tasks.model.loading import resolve_base

    params = Params()
    path = resolve_base(params.model)
    tok = load_base_tokenizer(params.model, path)
    model = build_model(path, params.train, "cpu", torch.float32, tok, added_token_ids(tok, path))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)


def test_an_explicit_modules_list_is_used_as_it_is(family_models):
    path = str(family_models("qwen2.5"))
    tok = load_base_tokenizer(ModelParams(base=path))
    model = build_model(path, TrainParams(lora_modules_to_save="embed_tokens"), "cpu", torch.float32, tok, [])
    assert any("embed_tokens.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)


def test_chat_template_chatml_and_a_jinja_file(family_models, tmp_path):
    path = str(family_models("llama3"))
    tok = load_base_tokenizer(ModelParams(base=path, chat_template="chatml"))
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    # No unk token, and the end of turn is now <|im_end|>: a dedicated pad token is added too.
    added = [tok.convert_ids_to_tokens(i) for i in added_token_ids(tok, path)]
    assert added == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    jinja = tmp_path / "plain.jinja"
    jinja.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = load_base_tokenizer(ModelParams(base=path, chat_template=str(jinja)))
    assert tok.chat_template == jinja.read_text() and tok.eos_token == "<|eot_id|>"
    with pytest.raises(ConfigError, match="model.chat_template=.*missing.jinja: cannot read"):
        load_base_tokenizer(ModelParams(base=path, chat_template=str(tmp_path / "missing.jinja")))


def test_a_chat_template_that_is_no_jinja_file_is_refused_by_key(tmp_path):
    (tmp_path / "p.yaml").write_text("model:\n  chat_template: llama\n")
    with pytest.raises(ConfigError, match="model.chat_template"):
        load_params(tmp_path / "p.yaml")


def test_a_model_neither_local_nor_cached_fails_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        check_base("meta-llama/Llama-3.2-1B-Instruct")
    message = str(err.value)
    assert "\n" not in message
    assert "neither a local folder nor in the Hugging Face cache" in message
    assert "hf download meta-llama/Llama-3.2-1B-Instruct" in message and "HF_HOME" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        check_base(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no such folder"):
        check_base(str(tmp_path / "nowhere"))


def test_settings_the_model_cannot_run_fail_before_any_work(family_models):
    gpt2 = family_models("gpt2")  # 1024 positions
    with pytest.raises(ConfigError, match="train.seq_len=2048"):
        check_fit(small_params(gpt2, seq_len=2048))
    from tasks.config import DataParams, EvalParams

    params = small_params(gpt2, seq_len=1000).model_copy(update={"data": DataParams(max_tokens=1000),
                                                                 "eval": EvalParams(max_new_tokens=100)})
    with pytest.raises(ConfigError, match="data.max_tokens=1000 plus eval.max_new_tokens=100"):
        check_fit(params)
    gemma = family_models("gemma2")
    with pytest.raises(ConfigError, match="train.attention=packed .*attn_logit_softcapping"):
        check_fit(small_params(gemma, attention="packed"))
    check_fit(small_params(gemma, attention="mask"))
    check_fit(small_params(gemma))  # auto: the mask, where packed attention would not be exact


def test_a_base_transformers_cannot_read_a_missing_template_qlora_without_cuda_and_missing_data_fail_first(tmp_path):
    """Found inside the flow's tasks, these were tracebacks (Prefect logs a task's exception whole),
    some with exit 1 for a setting, qlora only after validation and preparation."""
    from tasks.errors import DataFileError

    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"model.base=.*noconfig: transformers cannot read its config.json \(Unrecognized"):
        check_fit(load_params(None, {"model.base": str(tmp_path / "noconfig")}))
    with pytest.raises(ConfigError, match=r"model.chat_template=/nowhere.jinja: no such file"):
        check_fit(load_params(None, {"model.chat_template": "/nowhere.jinja"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.method=qlora needs a CUDA GPU"):
            check_fit(load_params(None, {"train.method": "qlora"}))
        check_fit(load_params(None, {"train.method": "qlora", "workers.train_deployment": "finetune/gpu"}))  # a GPU worker trains
    with pytest.raises(DataFileError, match=r"nope.jsonl: data file not found; check data.path"):
        check_fit(load_params(None, {"data.path": "data/nope.jsonl"}), root=tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    sources = [{"path": "data/a.jsonl"}, {"path": "data/b.jsonl"}, {"feedback": True}]
    with pytest.raises(DataFileError, match=r"b.jsonl: data file not found; check data.sources\[1\].path"):
        check_fit(load_params(None, {"data.sources": sources}), root=tmp_path)
    check_fit(load_params(None, {"data.sources": [sources[0], sources[2]]}), root=tmp_path)  # the export comes later


@pytest.mark.parametrize("name", ["gpt2", "qwen2.5", "gemma2"])
def test_lora_target_modules_are_checked_against_the_model_as_peft_matches_them(name, family_models):
    """A misspelt or unfit target failed in the finetune stage with peft's traceback, or, beside a
    right one, was skipped unsaid (peft adapts what matches); now check_fit refuses it up front."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = family_models(name)
    model = AutoModelForCausalLM.from_pretrained(path)
    good = {"gpt2": "c_attn, c_proj", "qwen2.5": "self_attn.q_proj,v_proj", "gemma2": "o_proj,down_proj"}[name]
    bad = {"gpt2": ("q_proj", "no module of this model is called q_proj; name some of .*c_attn"),
           "qwen2.5": ("q_proj,vproj", "no module of this model is called vproj; name some of .*v_proj"),
           "gemma2": ("mlp", "mlp: Gemma2MLP, not a layer LoRA adapts")}[name]
    check_fit(small_params(path, lora_target_modules=good))
    get_peft_model(model, LoraConfig(target_modules=[t.strip() for t in good.split(",")]))
    with pytest.raises(ConfigError, match=rf"train.lora_target_modules={bad[0]}: {bad[1]}"):
        check_fit(small_params(path, lora_target_modules=bad[0]))
    if name == "qwen2.5":  # peft adapts q_proj and says nothing of vproj
        adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(target_modules=["q_proj", "vproj"]))
        assert {n.rsplit(".", 1)[-1] for n, _ in adapted.named_modules() if n.endswith("_proj")} >= {"q_proj", "v_proj"}
        assert adapted.peft_config["default"].target_modules == {"q_proj", "vproj"}
        assert not any("v_proj.lora_A" in n for n, _ in adapted.named_parameters())
    else:
        with pytest.raises(ValueError):
            get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(target_modules=bad[0].split(",")))
    check_fit(small_params(path, method="full", lora_target_modules=bad[0]))  # a full fine-tune has no LoRA


def test_a_subclass_of_a_linear_layer_is_a_lora_target_as_peft_takes_it():
    """Falcon's FalconLinear was refused by name ("not a layer LoRA adapts") though peft adapts it."""
    from transformers import FalconConfig

    from tasks.model.loading import check_lora_targets

    falcon = FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    check_lora_targets(falcon, "query_key_value,dense_h_to_4h")
    with pytest.raises(ConfigError, match="mlp: FalconMLP, not a layer LoRA adapts"):
        check_lora_targets(falcon, "query_key_value,mlp")


def test_auto_attention_packs_where_it_is_exact_and_masks_otherwise():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    assert resolve_attention("auto", LlamaConfig(), 256) == "packed"
    assert resolve_attention("auto", MistralConfig(sliding_window=32), 256) == "mask"  # the window is shorter than a row
    assert resolve_attention("auto", MistralConfig(sliding_window=32), 32) == "packed"  # a row fits in the window
    assert resolve_attention("auto", Gemma2Config(), 128) == "mask"  # soft-capped attention logits
    assert resolve_attention("packed", Gemma2Config(), 128) == "packed"  # as set (check_fit refuses it)
    assert resolve_attention("mask", LlamaConfig(), 256) == "mask"


@pytest.fixture(scope="module")
def trained(family_models, tmp_path_factory):
    """(name, system) -> (folder, summary, history): a family fine-tuned for a few steps, once per module."""
    done: dict[tuple, tuple] = {}

    def get(name: str, system: bool = True):
        if (name, system) not in done:
            root = tmp_path_factory.mktemp(f"trained-{name}")
            data = root / "prepared"
            data.mkdir()
            examples = conversations(name, 40, seed=5, system=system)
            (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:32]))
            (data / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[32:]))
            out = root / "model"
            summary = finetune(small_params(family_models(name)), data, out, log=lambda _m: None)
            done[name, system] = (out, summary, json.loads((out / "history.json").read_text()))
        return done[name, system]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_finetune_trains_each_family_and_writes_a_folder_that_loads(name, trained, family_models):
    out, summary, history = trained(name)
    losses = [h["loss"] for h in history]
    assert summary.trained_tokens > 0 and summary.steps == 8
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0], losses  # learning: the last steps beat the first
    model, tok, info = load_trained(out)
    family = FAMILIES[name]
    assert tok.chat_template == (CHATML_TEMPLATE if family.is_base else family.chat_template)
    assert (tok.eos_token, tok.pad_token) == EXPECTED[name]
    if family.is_base:
        # The ChatML rows were trained: they no longer hold the mean the base got them at.
        base_tok = load_base_tokenizer(ModelParams(base=str(family_models(name))))
        base = load_base_model(ModelParams(base=str(family_models(name))), base_tok)
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        trained_row = model.get_input_embeddings()(torch.tensor([im_end]))
        base_row = base.get_input_embeddings()(torch.tensor([im_end]))
        assert not torch.allclose(trained_row, base_row)
        assert info["added_token_ids"] == added_token_ids(base_tok, str(family_models(name)))
    # The grown rows (an untrained added pad row among them) are the same on every load.
    again, _, _ = load_trained(out)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(again.get_output_embeddings().weight, model.get_output_embeddings().weight)


@pytest.mark.parametrize("name", NAMES)
def test_the_evaluate_stage_scores_each_family_and_its_base_prompted(name, trained, family_models, tmp_path, monkeypatch):
    """The evaluate stage's work per family: the fine-tuned folder, and the base model zero-shot
    and few-shot, each rendered with the family's template and scored example by example."""
    import yaml

    from tasks.config import EvalParams
    from tasks.evaluate import baselines
    from tasks.evaluate.score import evaluate_all

    monkeypatch.setattr(baselines, "cache_dir", lambda: tmp_path / "kept")  # scored here, not read from the project's

    out, _, _ = trained(name)
    data = tmp_path / "prepared"
    data.mkdir()
    examples = conversations(name, 10, seed=9)
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:6]))
    (data / "test.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[6:]))
    params = small_params(family_models(name)).model_copy(
        update={"eval": EvalParams(max_examples=4, few_shot_k=1, max_new_tokens=6, batch_size=4)})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    results = evaluate_all(str(tmp_path / "params.yaml"), data, out)
    assert sorted(results) == ["base_few_shot", "base_zero_shot", "candidate"]
    for key, result in results.items():
        metrics, per_example = result["metrics"], result["per_example"]
        assert metrics["examples"] == 4 and metrics["scored_tokens"] > 0, key
        assert math.isfinite(metrics["perplexity"]) and 0 <= metrics["exact_match"] <= 1, (key, metrics)
        assert {len(v) for v in per_example.values()} == {4}, key
        assert all(t > 0 for t in per_example["tokens"]), key  # every reference answer was scored
    # Only the answer is scored: a few-shot prompt's shots are context, as for generation.
    assert results["base_few_shot"]["per_example"]["tokens"] == results["base_zero_shot"]["per_example"]["tokens"]


@pytest.mark.parametrize("kind", ["own", "transformers"])
@pytest.mark.parametrize("name", NAMES)
def test_the_serving_engine_answers_what_generate_answers(name, kind, trained):
    """Both decoding loops of `serving.engine` (own, and transformers' continuous batching)."""
    from serving.decoding import Row, load_model_dir
    from serving.engine import Engine
    from serving.library_engine import LibraryEngine
    from tasks.model.chat import render_prompt

    out, _, _ = trained(name)
    loaded = load_model_dir(out)
    tok = loaded.tokenizer
    events: queue.SimpleQueue = queue.SimpleQueue()
    limits = ServingParams()
    engine = {"own": Engine, "transformers": LibraryEngine}[kind](
        lambda batch: [events.put(e) for e in batch], max_batch=limits.max_batch,
        join_ratio=limits.join_ratio, join_after_steps=limits.join_after_steps)
    # generate() first: the library's loop switches the model to its paged attention in place.
    prompts = [tok.encode(render_prompt(tok, e["messages"][:-1]), add_special_tokens=False)
               for e in conversations(name, 3, seed=11)]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            full = loaded.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=12, do_sample=False,
                eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id,
            )[0, len(ids):].tolist()
        expected.append([t for t in full if t not in (tok.eos_token_id, tok.pad_token_id)])
    try:
        for i, (ids, want) in enumerate(zip(prompts, expected, strict=True)):
            row = Row(i, ids, 12, 0.0, 1.0, [], False, loaded)
            engine.submit(row)
            while True:
                got, event = events.get(timeout=60)
                if got is row and event[0] in ("end", "error"):
                    break
            assert event[0] == "end", event
            assert row.ids == want, (tok.decode(row.ids), tok.decode(want))
    finally:
        engine.close()


def test_a_stage_with_a_model_neither_local_nor_cached_ends_in_one_line(tmp_path, capsys, monkeypatch):
    from tasks.runner import run_entry
    from tasks.stages.prepare import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "params.yaml").write_text("model:\n  base: meta-llama/Llama-3.2-1B-Instruct\n")
    code = run_entry(lambda: main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "prepared")]))
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "neither a local folder nor in the Hugging Face cache" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "prepared").exists()


def test_new_rows_take_the_mean_of_the_own_rows_even_where_the_model_has_spare_rows(family_models):
    """Qwen and Phi-3 checkpoints have more embedding rows than tokens: added tokens land on
    spare rows, which are overwritten, and left out of the mean."""
    path = str(family_models("gpt2"))
    tok = load_base_tokenizer(ModelParams(base=path))
    new_ids = added_token_ids(tok, path)
    own = min(new_ids)
    model = load_causal_lm(path)
    model.resize_token_embeddings(len(tok) + 16)  # spare rows beyond every token
    with torch.no_grad():
        model.get_input_embeddings().weight[own:] = 100.0  # spare rows hold something else
    grow_embeddings(model, tok, new_ids)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok) + 16  # no rows added: the spare ones were used
    expected = weight[:own].mean(0)
    for i in new_ids:
        assert torch.allclose(weight[i], expected)


@pytest.mark.parametrize("name", NAMES)
def test_train_compile_finds_every_decoder_layer_of_each_family(name, family_models):
    """`train.compile` compiles the decoder layers one by one; each family keeps them under its own name."""
    model = load_causal_lm(str(family_models(name)))
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    kinds = {type(layer).__name__ for layer in layers}
    assert len(kinds) == 1 and kinds.pop().endswith(("Layer", "Block")), kinds
