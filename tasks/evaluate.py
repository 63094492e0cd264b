"""Score models on the test split (DVC stage `evaluate`).

One function, `evaluate_model`, scores every model the same way on the same examples:
the candidate, the base model prompted zero-shot and few-shot (`eval.few_shot_k` train
examples shown before each question), and, from the retrain flow, the current champion.

Metrics: perplexity on the assistant tokens; exact match, BLEU (sacrebleu) and ROUGE-L
(rouge-score) of greedy generations; accuracy / precision / recall / macro-F1 when
`eval.task` is classification; per-example latency (p50, p95) and generated tokens/s.

Run alone (after `tasks.finetune`):

    python -m tasks.evaluate --params artifacts/params.yaml --data artifacts/prepared \
        --model artifacts/model --out artifacts/metrics.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from tasks.config import ConfigError, EvalParams, load_params, write_atomic
from tasks.finetune import read_jsonl
from tasks.modeling import (
    encode_chat,
    load_causal_lm,
    load_tokenizer,
    load_trained,
    prompt_messages,
    reference_answer,
    render_prompt,
    resolve_base,
)

Example = dict


def pick_few_shot(train: list[Example], k: int, seed: int) -> list[Example]:
    """`k` train examples drawn deterministically (same seed, same shots)."""
    if k == 0 or not train:
        return []
    return random.Random(seed).sample(train, min(k, len(train)))


def with_shots(messages: list[dict], shots: list[Example]) -> list[dict]:
    """Put the shots' question/answer turns after the system message and before the question."""
    if not shots:
        return messages
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = [m for s in shots for m in s["messages"] if m["role"] in ("user", "assistant")]
    return head + turns + messages[len(head):]


def assistant_perplexity(model, tokenizer, conversations: list[list[dict]], batch_size: int) -> float:
    """exp of the mean cross-entropy over assistant tokens, token-weighted across examples."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(conversations), batch_size):
        encoded = [encode_chat(tokenizer, c) for c in conversations[start : start + batch_size]]
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        attn = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)])
            attn[i, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device),
            ignore_index=-100, reduction="sum",
        )
        total += float(loss)
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(total / max(1, count))


def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """Greedy completions of `prompts`, with per-example latency (ms) and generated token counts."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    outputs, latencies, lengths = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        elapsed_ms = (time.perf_counter() - t0) * 1000
        new = out[:, enc["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
        lengths += [int((row != tokenizer.pad_token_id).sum()) for row in new]
        # Examples in one batch finish together: each waited the whole batch.
        latencies += [elapsed_ms] * len(chunk)
    return [o.strip() for o in outputs], latencies, lengths


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {
        "exact_match": sum(p == r.strip() for p, r in zip(predictions, references)) / max(1, len(references)),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": sum(rouge) / max(1, len(rouge)),
    }


def classification_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 over the label set."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    p, r, f, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(labels, predictions), "precision": p, "recall": r, "f1": f}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def evaluate_model(model, tokenizer, examples: list[Example], params: EvalParams, shots: list[Example] = ()) -> dict:
    """Score one model on `examples`; `shots` turns it into a few-shot prompted model.

    Returns:
        metrics (a flat dict of floats) and `samples`, the first predictions beside references.
    """
    questions = [with_shots(prompt_messages(e["messages"]), list(shots)) for e in examples]
    references = [reference_answer(e["messages"]) for e in examples]
    conversations = [q + [{"role": "assistant", "content": r}] for q, r in zip(questions, references)]
    prompts = [render_prompt(tokenizer, q) for q in questions]
    t0 = time.perf_counter()
    predictions, latencies, lengths = generate_batched(model, tokenizer, prompts, params.max_new_tokens, params.batch_size)
    gen_seconds = time.perf_counter() - t0
    metrics = {
        "perplexity": assistant_perplexity(model, tokenizer, conversations, params.batch_size),
        **text_metrics(predictions, references),
        "latency_p50_ms": percentile(latencies, 0.5),
        "latency_p95_ms": percentile(latencies, 0.95),
        "tokens_per_second": sum(lengths) / gen_seconds if gen_seconds else 0.0,
        "examples": len(examples),
    }
    if params.task == "classification":
        labels = [e.get("label", r) for e, r in zip(examples, references)]
        metrics.update(classification_metrics(predictions, labels))
    samples = [
        {"prompt": q[-1]["content"], "reference": r, "prediction": p}
        for q, r, p in list(zip(questions, references, predictions))[:10]
    ]
    return {"metrics": metrics, "samples": samples}


def load_split(data_dir: Path, name: str, limit: int | None = None) -> list[Example]:
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise ConfigError(f"{path}: split not found; run the prepare stage first")
    rows = read_jsonl(path)
    return rows[:limit] if limit else rows


def evaluate_model_dir(model_dir: Path, examples: list[Example], params: EvalParams) -> dict:
    """Load a fine-tuned model folder (candidate or champion) and score it."""
    model, tokenizer, _ = load_trained(model_dir)
    return evaluate_model(model, tokenizer, examples, params)


def evaluate_all(params_path: str, data_dir: Path, model_dir: Path) -> dict:
    """The DVC stage: the candidate and the base model zero-shot and few-shot, on the test split."""
    params = load_params(params_path)
    test = load_split(data_dir, "test", params.eval.max_examples)
    if not test:
        raise ConfigError(f"{data_dir / 'test.jsonl'}: the test split is empty; add data or raise data.test_fraction")
    shots = pick_few_shot(load_split(data_dir, "train"), params.eval.few_shot_k, params.train.seed)
    base_path = resolve_base(params.model)
    base = load_causal_lm(base_path)
    base.eval()
    base_tok = load_tokenizer(base_path)
    results = {
        "candidate": evaluate_model_dir(model_dir, test, params.eval),
        "base_zero_shot": evaluate_model(base, base_tok, test, params.eval),
    }
    if shots:
        results["base_few_shot"] = evaluate_model(base, base_tok, test, params.eval, shots)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Evaluate the candidate against prompting baselines (DVC stage).")
    ap.add_argument("--params", default="artifacts/params.yaml")
    ap.add_argument("--data", type=Path, default=Path("artifacts/prepared"))
    ap.add_argument("--model", type=Path, default=Path("artifacts/model"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/metrics.json"))
    ap.add_argument("--samples", type=Path, default=Path("artifacts/predictions.json"))
    args = ap.parse_args(argv)
    try:
        results = evaluate_all(args.params, args.data, args.model)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_atomic(args.samples, json.dumps({k: v["samples"] for k, v in results.items()}, indent=2))
    write_atomic(args.out, json.dumps({k: v["metrics"] for k, v in results.items()}, indent=2))
    for name, r in results.items():
        m = r["metrics"]
        print(f"{name:15s} exact_match={m['exact_match']:.3f} bleu={m['bleu']:.1f} perplexity={m['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
