"""Helpers of the training tests: small settings, a small prepared data folder, the stage as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from scripts.make_data import make_examples
from tasks.config import Params, TrainParams
from tests.support.project import REPO


def write_data(folder: Path) -> Path:
    examples = make_examples(60, seed=3)
    d = folder / "prepared"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:48]))
    (d / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[48:]))
    return d


def small_params(**train) -> Params:
    settings = dict(max_steps=6, batch_size=4, seq_len=128, save_steps=0, log_every=1, learning_rate=0.004)
    settings.update(train)
    return Params(train=TrainParams(**settings))


def write_params(path: Path, params: Params) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def start_stage(params_file: Path, data_dir: Path, out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.stages.finetune", "--params", str(params_file), "--data", str(data_dir), "--out", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw,
    )


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


# ------------------------------------------------------------------------------ tool calling

TOOLS_MODEL_NAME = "ftllm-tools-test"
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _tool_conversations() -> list[tuple[list[dict], dict]]:
    """(conversation so far, the assistant turn to learn) pairs: call when asked about weather,
    answer from the tool's result once it is there, plain text otherwise."""
    def call(city: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call{city[:5]:0>5}", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": city}}}]}

    pairs = []
    for city, weather in (("Oslo", "12 degrees and rain"), ("Paris", "20 degrees and sun")):
        ask = [{"role": "user", "content": f"What is the weather in {city}?"}]
        pairs.append((ask, call(city)))
        result = {"role": "tool", "tool_call_id": f"call{city[:5]:0>5}", "content": weather}
        pairs.append(([*ask, call(city), result], {"role": "assistant", "content": f"In {city} it is {weather}.",
                                                    "reasoning_content": f"The tool says {weather}."}))
    pairs.append(([{"role": "user", "content": "Hello there"}], {"role": "assistant", "content": "Hello! Ask me about the weather."}))
    return pairs


def train_tool_caller(out: Path, steps: int = 160) -> Path:
    """A tiny model that calls `get_weather` when asked about the weather, written as a full-weights model folder.

    A random-weight model never writes a call, so the served path could not be tested
    honestly with one. This one is the project's tiny base given Qwen 3's published chat
    template (a real tool and reasoning template: it shows the tools in the system turn,
    writes calls as `<tool_call>` blocks, renders the tool's results, and writes a turn's
    `reasoning_content` in a `<think>` block), trained on the text that template renders
    for each turn to learn, after exactly the prompt the service renders (`render_prompt`
    with the tools). The model therefore writes the call and the trace tokens itself, and
    the service has to render, parse, check and return them: the answer from a tool's
    result comes with the trace "The tool says <result>.".
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.config import ModelParams
    from tasks.model.chat import render_prompt
    from tasks.model.loading import resolve_base
    from tests.support.families import QWEN3_TEMPLATE

    if (out / "ftllm_model.json").is_file():
        return out
    base = resolve_base(ModelParams())
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = QWEN3_TEMPLATE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    prompts, answers = [], []
    for before, turn in _tool_conversations():
        prompt = render_prompt(tokenizer, before, tools=WEATHER_TOOLS)
        whole = tokenizer.apply_chat_template([*before, turn], tools=WEATHER_TOOLS, tokenize=False)
        assert whole.startswith(prompt), "the template must render a prefix of the conversation as its prompt"
        end = whole.index("<|im_end|>", len(prompt)) + len("<|im_end|>")
        prompts.append(tokenizer.encode(prompt, add_special_tokens=False))
        answers.append(tokenizer.encode(whole[len(prompt):end], add_special_tokens=False))
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), width), -100)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
        mask[i, :len(p) + len(a)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp / "weights", safe_serialization=True)
    for folder in (tmp / "weights", tmp):
        tokenizer.save_pretrained(folder)
    (tmp / "ftllm_model.json").write_text(json.dumps(
        {"kind": "full", "base": "tiny", "base_path": str(base), "model_params": {}, "added_token_ids": [],
         "method": "full", "system_message": "auto"}))
    tmp.rename(out)
    return out
