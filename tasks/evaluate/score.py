"""Score models on the test split, and on the feedback split when there is one (library side of the `evaluate` stage).

One function, `evaluate_model`, scores every model the same way on the same examples:
the candidate, the base model prompted zero-shot and few-shot (`eval.few_shot_k` train
examples shown before each question), and, from the retrain flow, the current champion.

Metrics: perplexity on the answer's tokens (the tokens training trains on, in the last
assistant turn: shots and earlier turns are context; counted in `scored_tokens`;
evaluation fails rather than report a perplexity over none); exact match, BLEU
(sacrebleu) and ROUGE-L (rouge-score) of greedy generations; accuracy / precision / recall / macro-F1 when
`eval.task` is classification; per-example latency (p50, p95) and generated tokens/s.

Where test examples have assistant turns that call a tool (the reference turn or an
earlier one), the model is asked the conversation before each such turn, and its
generation is parsed into calls and scored by `tasks.evaluate.tools` (`tool_name_accuracy`,
`tool_arguments_match`, `tool_invalid_rate`, over `tool_calls` call turns); text metrics
score the reference turn, a call as its canonical JSON. A reasoning trace (`<think>`) is never scored: the
answer after it is.

Beside the aggregate metrics, every score is kept per example (`per_example`: exact match,
sentence BLEU, ROUGE-L, summed NLL and token count of the answer, accuracy, and the tool
scores with their own `tool_ids`, a hash of the conversation up to each call), keyed by a hash of the example, so that the gate can compare two models example by example
(`tasks/evaluate/paired.py`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import EvalParams, load_params
from tasks.errors import ConfigError
from tasks.evaluate.baselines import BaselineStore
from tasks.evaluate.generation import (
    Example,
    assistant_nll,
    generate_batched,
    perplexity,
    pick_few_shot,
    with_shots,
)
from tasks.evaluate.metrics import classification_metrics, percentile, text_metrics, text_scores
from tasks.evaluate.preference import candidate_dir, load_heldout, preference_result, score_preferences
from tasks.evaluate.tools import (
    answer_text,
    call_turns,
    calls_text,
    reference_calls,
    reference_turn,
    tool_metrics,
    tool_scores,
)
from tasks.files import read_jsonl
from tasks.model.chat import prompt_messages, reference_index, render_prompt
from tasks.model.loading import (
    load_base_model,
    load_base_tokenizer,
    load_trained,
    resolve_base,
)
from tasks.model.responses import needs_parsing, parse_generation


def evaluate_model(
    model, tokenizer, examples: list[Example], params: EvalParams, shots: list[Example] = (),
    system_message: str = "auto",
) -> dict:
    """Score one model on `examples`; `shots` turns it into a few-shot prompted model.

    Args:
        system_message: the `data.system_message` policy prompts are rendered with (the
            model's own, for a trained model folder).

    Returns:
        metrics (a flat dict of floats, with `scored_tokens`: the assistant tokens behind
        the perplexity), `samples` (the first predictions beside references) and
        `per_example` (lists aligned with `examples`, see `per_example_scores`).

    Raises:
        RunFailed: no assistant token could be scored.
    """
    questions = [with_shots(prompt_messages(e["messages"]), list(shots)) for e in examples]
    turns = [reference_turn(e["messages"]) for e in examples]
    calls = [reference_calls(t) for t in turns]
    references = [calls_text(c) if c else t["content"] for t, c in zip(turns, calls)]
    conversations = [q + [t if c else {"role": "assistant", "content": t["content"]}]
                     for q, t, c in zip(questions, turns, calls)]
    tools = [e.get("tools") or None for e in examples]
    prompts = [render_prompt(tokenizer, q, system_message, tools=t) for q, t in zip(questions, tools)]
    earlier = earlier_calls(examples, shots)
    prompts += [render_prompt(tokenizer, c.question, system_message, tools=tools[c.example]) for c in earlier]
    nll, tokens = assistant_nll(model, tokenizer, conversations, params.batch_size, system_message)
    ppl = perplexity(nll, tokens, tokenizer)  # refuses before generating when no token was scored
    t0 = time.perf_counter()
    generations, latencies, lengths = generate_batched(model, tokenizer, prompts, params.max_new_tokens,
                                                       params.batch_size)
    gen_seconds = time.perf_counter() - t0
    # Scored without the reasoning trace; a call as its canonical JSON (tasks.evaluate.tools).
    all_tools = tools + [tools[c.example] for c in earlier]
    parsed = [parse_generation(tokenizer, g, p, t) if needs_parsing(tokenizer, t) else None
              for g, p, t in zip(generations, prompts, all_tools)]
    answers = [g if r is None else answer_text(r) for g, r in zip(generations, parsed)]
    predictions = answers[: len(examples)]
    # Call turns: the reference turns that are calls, then the earlier calls (their own prompts).
    called = [i for i, c in enumerate(calls) if c] + [len(examples) + j for j in range(len(earlier))]
    wanted = [c for c in calls if c] + [c.calls for c in earlier]
    tool = tool_scores([parsed[i] for i in called], wanted)
    metrics = {
        "perplexity": ppl,
        "scored_tokens": sum(tokens),
        **text_metrics(predictions, references),
        **tool_metrics(tool),
        "latency_p50_ms": percentile(latencies, 0.5),
        "latency_p95_ms": percentile(latencies, 0.95),
        "tokens_per_second": sum(lengths) / gen_seconds if gen_seconds else 0.0,
        "examples": len(examples),
    }
    if params.task == "classification":
        labels = [e.get("label", r) for e, r in zip(examples, references)]
        metrics.update(classification_metrics(predictions, labels))
    samples = [
        {"prompt": q[-1]["content"] or "", "reference": r, "prediction": p}
        for q, r, p in list(zip(questions, references, predictions))[:10]
    ]
    samples += [
        {"prompt": c.question[-1]["content"] or "", "reference": calls_text(c.calls), "prediction": p}
        for c, p in list(zip(earlier, answers[len(examples):]))[:10]
    ]
    per_example = per_example_scores(examples, predictions, references, nll, tokens, params)
    if called:
        per_example["tool_ids"] = [per_example["ids"][i] for i, c in enumerate(calls) if c] + [c.id for c in earlier]
        per_example.update(tool)
    return {"metrics": metrics, "samples": samples, "per_example": per_example}


@dataclass(frozen=True)
class EarlierCall:
    """An assistant turn that calls a tool before an example's reference turn, scored as a call of its own.

    Attributes:
        example: index of its example.
        question: the messages before it (with the few-shot turns, if any): the prompt.
        calls: its reference calls, (name, decoded arguments).
        id: a hash of the conversation up to and including the call (pairs it across models).
    """

    example: int
    question: list[dict]
    calls: list[tuple[str, Any]]
    id: str


def earlier_calls(examples: list[Example], shots: list[Example] = ()) -> list[EarlierCall]:
    """The tool-call turns of `examples` before their reference turn (a call, its result, then an answer)."""
    out = []
    for i, example in enumerate(examples):
        messages = example["messages"]
        last = reference_index(messages)
        for k in call_turns(messages):
            if k < last:
                out.append(EarlierCall(i, with_shots(messages[:k], list(shots)), reference_calls(messages[k]),
                                       example_id({"messages": messages[: k + 1]})))
    return out


def example_id(example: Example) -> str:
    """A short hash of an example's prompt and reference: pairs the scores of two models."""
    text = json.dumps(example["messages"], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def per_example_scores(
    examples: list[Example], predictions: list[str], references: list[str], nll: list[float], tokens: list[int],
    params: EvalParams,
) -> dict[str, list]:
    """Each example's scores, in the order of `examples`.

    Returns:
        `ids` (`example_id`), `exact_match` (0/1), `bleu` (sentence BLEU, 0-100), `rouge_l`,
        `nll` (cross-entropy summed over the answer's tokens, nats) and `tokens` (their count),
        plus `accuracy` (0/1 against the label) when `eval.task` is classification.
    """
    scores: dict[str, list] = {"ids": [example_id(e) for e in examples], **text_scores(predictions, references),
                               "nll": nll, "tokens": tokens}
    if params.task == "classification":
        labels = [e.get("label", r) for e, r in zip(examples, references)]
        scores["accuracy"] = [float(p == label) for p, label in zip(predictions, labels)]
    return scores


def load_split(data_dir: Path, name: str, limit: int | None = None) -> list[Example]:
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise ConfigError(f"{path}: split not found; run the prepare stage first")
    rows = read_jsonl(path)
    return rows[:limit] if limit else rows


def evaluate_model_dir(model_dir: Path, examples: list[Example], params: EvalParams) -> dict:
    """Load a fine-tuned model folder (candidate or champion) and score it, rendered as it was trained."""
    model, tokenizer, info = load_trained(model_dir)
    return evaluate_model(model, tokenizer, examples, params, system_message=info.get("system_message", "auto"))


def evaluate_all(params_path: str, data_dir: Path, model_dir: Path, preference_dir: Path | None = None) -> dict:
    """The DVC stage: the candidate and the base model zero-shot and few-shot, on the test split.

    When prepare held corrected answers out as a feedback split, the candidate is scored on
    it too (`candidate_feedback`); the flow scores the champion there, and the gate checks
    that the candidate does not regress on what users corrected.

    The candidate is the preference-tuned model when the `preference` stage tuned one
    (`preference_dir`); when prepare held preference rows out, the candidate is scored on
    them too (`candidate_preference`: reward accuracy, margin, rated-down repeats).
    """
    params = load_params(params_path)
    test = load_split(data_dir, "test", params.eval.max_examples)
    if not test:
        raise ConfigError(f"{data_dir / 'test.jsonl'}: the test split is empty; add data or raise data.test_fraction")
    feedback = load_split(data_dir, "feedback", params.eval.max_examples) if (data_dir / "feedback.jsonl").is_file() else []
    shots = pick_few_shot(load_split(data_dir, "train"), params.eval.few_shot_k)
    model, tokenizer, info = load_trained(candidate_dir(model_dir, preference_dir))
    trained_policy = info.get("system_message", "auto")
    results = {"candidate": evaluate_model(model, tokenizer, test, params.eval, system_message=trained_policy)}
    if feedback:
        results["candidate_feedback"] = evaluate_model(model, tokenizer, feedback, params.eval, system_message=trained_policy)
    heldout = load_heldout(data_dir, params.eval.max_examples)
    scored = preference_result(score_preferences(model, tokenizer, heldout, params.eval, trained_policy))
    if scored:
        results["candidate_preference"] = scored
    del model
    base_path = resolve_base(params.model)
    store = BaselineStore(params, base_path) if params.eval.reuse_baselines else None
    arms = {"base_zero_shot": [], **({"base_few_shot": shots} if shots else {})}
    base = base_tok = None
    for name, arm_shots in arms.items():
        key = store.key(test, arm_shots) if store else None
        kept = store.get(key) if store else None
        if kept is not None:
            print(f"{name}: scores of an earlier run reused (the same base model, examples, shots and settings)")
            results[name] = kept
            continue
        if base is None:
            base_tok = load_base_tokenizer(params.model, base_path)
            base = load_base_model(params.model, base_tok, base_path)
        results[name] = evaluate_model(base, base_tok, test, params.eval, arm_shots, params.data.system_message)
        if store:
            store.put(key, results[name])
    return results
