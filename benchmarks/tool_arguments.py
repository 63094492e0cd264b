"""Which arguments a tool-calling model gets right, and where it looks when it writes each one.

For the first `--limit` test examples whose reference turn is a call, per function and argument:

- greedy: the model writes the call from the prompt (as evaluation does); the share of calls
  that name the right function and have this argument JSON-equal to the reference;
- teacher forced: the prompt, then the reference call up to the argument's value, one forward
  pass: the probability of the value's first token and how often it is the top token;
- attention: at that position, the largest share of attention any head (layer.head) puts on
  the question's tokens that spell the value's first token (a value the question does not
  spell, such as an enum written otherwise, has none).

A model that copies an argument from the question has a head on it; one that writes a value
of its own has none (benchmarks/results/tools_tiny.md). The greedy calls are read as
evaluation reads them; the teacher-forced call is written in the Hermes form
(`<tool_call>\n{"name": ..., "arguments": ...}`) of the tiny model's template.

    PYTHONPATH=. .venv/bin/python benchmarks/tool_arguments.py artifacts/model artifacts/prepared/test.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def call_rows(split: Path, limit: int) -> list[tuple[list[dict], list | None, dict]]:
    """(messages before the call, tools, the reference call's function) of the first `limit` call turns."""
    rows = []
    for line in split.read_text(encoding="utf-8").splitlines():
        example = json.loads(line)
        messages = example["messages"]
        k = next((i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("tool_calls")), None)
        if k is not None:
            rows.append((messages[:k], example.get("tools"), messages[k]["tool_calls"][0]["function"]))
        if len(rows) == limit:
            break
    return rows


def greedy_calls(model, tok, prompts: list[str], tools: list[list | None], max_new_tokens: int) -> list[dict | None]:
    """The first call each prompt's greedy continuation writes, as `{name, arguments}`, or None (no valid call),
    read by the parser evaluation and the service use (`tasks.model.responses.parse_generation`)."""
    from tasks.model.decoding import decode_generation
    from tasks.model.responses import parse_generation

    tok.padding_side = "left"
    calls = []
    for i in range(0, len(prompts), 16):
        enc = tok(prompts[i:i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for prompt, declared, row in zip(prompts[i:i + 16], tools[i:i + 16], out):
            parsed = parse_generation(tok, decode_generation(tok, row[enc["input_ids"].shape[1]:].tolist()), prompt, declared)
            calls.append({"name": parsed.tool_calls[0].name, "arguments": parsed.tool_calls[0].arguments}
                         if parsed.tool_calls else None)
    return calls


def forced(model, tok, prompt: str, question: str, function: dict, argument: str) -> tuple[float, bool, dict[str, float]]:
    """Teacher forced up to the argument's value: p(first token), whether it is the top token, attention per head on it."""
    arguments = json.loads(function["arguments"])
    text = json.dumps(arguments)
    cut = text.index(f'"{argument}":') + len(f'"{argument}":') + (2 if isinstance(arguments[argument], str) else 0)
    head = prompt + '<tool_call>\n{"name": "' + function["name"] + '", "arguments": '
    ids = tok(head + text[:cut], add_special_tokens=False)["input_ids"]
    full = tok(head + text, add_special_tokens=False)["input_ids"]
    if full[:len(ids)] != ids:  # the value's first token merges with what precedes it
        return float("nan"), False, {}
    target = full[len(ids)]
    start = len(tok(prompt[:prompt.rindex(question)], add_special_tokens=False)["input_ids"])
    end = start + len(tok(question, add_special_tokens=False)["input_ids"])
    spelled = tok.decode([target]).strip()
    where = [i for i in range(start, min(end, len(ids))) if tok.decode([ids[i]]).strip() == spelled]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    probs = out.logits[0, -1].softmax(-1)
    heads = {f"{layer}.{h}": float(att[0, h, -1, where].sum()) if where else 0.0
             for layer, att in enumerate(out.attentions) for h in range(att.shape[1])}
    return float(probs[target]), int(probs.argmax()) == target, heads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="a trained model folder (artifacts/model, or a registered version's)")
    ap.add_argument("split", type=Path, help="prepared JSONL split (artifacts/prepared/test.jsonl)")
    ap.add_argument("--limit", type=int, default=90, help="call turns read")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tasks.model.chat import render_prompt
    from tasks.model.loading import load_trained

    model, tok, info = load_trained(args.model_dir)
    model.eval()
    model.config._attn_implementation = "eager"  # attention weights are returned by the eager path only
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    rows = call_rows(args.split, args.limit)
    prompts = [render_prompt(tok, messages, info.get("system_message", "auto"), tools) for messages, tools, _ in rows]
    calls = greedy_calls(model, tok, prompts, [tools for _, tools, _ in rows], args.max_new_tokens)
    table: dict[str, dict] = collections.defaultdict(lambda: {"calls": 0, "right": 0, "p": [], "top1": 0, "heads": collections.Counter()})
    for (messages, _, function), prompt, call in zip(rows, prompts, calls):
        wanted = json.loads(function["arguments"])
        named = isinstance(call, dict) and call.get("name") == function["name"] and isinstance(call.get("arguments"), dict)
        for argument, value in wanted.items():
            cell = table[f"{function['name']}.{argument}"]
            cell["calls"] += 1
            cell["right"] += named and call["arguments"].get(argument) == value
            p, top1, heads = forced(model, tok, prompt, messages[-1]["content"], function, argument)
            cell["p"].append(p)
            cell["top1"] += top1
            cell["heads"].update(heads)
    report = {}
    for name, cell in sorted(table.items()):
        n = cell["calls"]
        best = max(cell["heads"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        report[name] = {"calls": n, "greedy_right": round(cell["right"] / n, 3), "p_first_token": round(sum(cell["p"]) / n, 3),
                        "first_token_top1": round(cell["top1"] / n, 3), "best_head": best[0],
                        "best_head_attention": round(best[1] / n, 3)}
    print(f"{'argument':28s} {'calls':>5s} {'greedy right':>12s} {'p(1st tok)':>10s} {'top-1':>6s} {'head':>5s} {'attention on it':>15s}")
    for name, r in report.items():
        print(f"{name:28s} {r['calls']:5d} {r['greedy_right']:12.3f} {r['p_first_token']:10.3f} {r['first_token_top1']:6.3f} "
              f"{r['best_head']:>5s} {r['best_head_attention']:15.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
