"""Per-example scores of `evaluate_model` agree with its aggregate metrics (tiny base model)."""

from __future__ import annotations

import math

import pytest

from tasks.config import EvalParams, ModelParams
from tasks.evaluate.metrics import text_metrics, text_scores
from tasks.evaluate.score import evaluate_model, example_id

EXAMPLES = [
    {"messages": [{"role": "system", "content": "Rewrite the ISO date in words."},
                  {"role": "user", "content": f"Convert this ISO date: 20{i:02d}-0{i % 9 + 1}-1{i}"},
                  {"role": "assistant", "content": f"{['January', 'March', 'May'][i % 3]} 1{i}, 20{i:02d}"}]}
    for i in range(6)
]


def test_text_scores_average_to_the_text_metrics():
    predictions, references = ["March 18, 2016", "May 1, 2000", "x"], ["March 18, 2016", "May 2, 2000", "June 3, 1999"]
    scores, metrics = text_scores(predictions, references), text_metrics(predictions, references)
    assert scores["exact_match"] == [1.0, 0.0, 0.0]
    assert sum(scores["rouge_l"]) / 3 == pytest.approx(metrics["rouge_l"])
    assert scores["bleu"][0] == pytest.approx(100.0) and scores["bleu"][2] == 0.0


def test_evaluate_model_keeps_every_score_per_example():
    from tasks.model.loading import load_causal_lm, load_tokenizer, resolve_base

    path = resolve_base(ModelParams())
    model, tokenizer = load_causal_lm(path).eval(), load_tokenizer(path)
    result = evaluate_model(model, tokenizer, EXAMPLES, EvalParams(max_new_tokens=4, batch_size=4))
    scores, metrics = result["per_example"], result["metrics"]
    assert scores["ids"] == [example_id(e) for e in EXAMPLES] and len(set(scores["ids"])) == 6
    assert all(len(scores[k]) == 6 for k in ("exact_match", "bleu", "rouge_l", "nll", "tokens"))
    # Batched in 4 + 2: the token-weighted mean NLL of the examples is the aggregate perplexity.
    assert math.exp(sum(scores["nll"]) / sum(scores["tokens"])) == pytest.approx(metrics["perplexity"], rel=1e-4)
    assert sum(scores["exact_match"]) / 6 == pytest.approx(metrics["exact_match"])
    assert all(t > 0 for t in scores["tokens"])


def test_only_the_last_answer_is_scored_not_the_shots_or_past_turns():
    """Perplexity is over the answer being scored: a few-shot prompt's shots and a multi-turn
    example's earlier answers are context, as in the prompt that generation completes."""
    from tasks.evaluate.generation import assistant_nll, last_answer, with_shots
    from tasks.model.loading import load_causal_lm, load_tokenizer, resolve_base

    assert last_answer([0, 1, 1, 0, 0, 1, 1, 1, 0]) == [False] * 5 + [True] * 3 + [False]
    assert last_answer([0, 0]) == [False, False]

    path = resolve_base(ModelParams())
    model, tokenizer = load_causal_lm(path).eval(), load_tokenizer(path)
    plain = [EXAMPLES[0]["messages"], EXAMPLES[1]["messages"]]
    shot = with_shots(EXAMPLES[0]["messages"][:-1], [EXAMPLES[2], EXAMPLES[3]]) + [EXAMPLES[0]["messages"][-1]]
    two_turns = EXAMPLES[4]["messages"] + [{"role": "user", "content": "And 2001-02-03?"},
                                            {"role": "assistant", "content": "February 3, 2001"}]
    _, counts = assistant_nll(model, tokenizer, [*plain, shot, two_turns], batch_size=4)
    _, alone = assistant_nll(model, tokenizer, [[*EXAMPLES[4]["messages"][:1], *two_turns[-2:]]], batch_size=1)
    assert counts[2] == counts[0]  # the shots' two answers are not counted
    assert counts[3] == alone[0]  # the last answer (and its end of turn) only, not the first turn's answer


@pytest.mark.parametrize("family", ["llama3.1", "mistral", "qwen3"])
def test_an_answer_is_scored_without_its_trace_under_any_template(family_models, family: str):
    """Perplexity and preference scores are of the answer: its reasoning trace is context where the
    template writes it. A template that drops traces (trained with `train.train_reasoning: false`)
    failed the evaluate stage, which scored as if traces were trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.evaluate.generation import assistant_nll
    from tasks.model.scoring import encode_sequences

    path = family_models(family)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    question = {"role": "user", "content": "Is 17 prime?"}
    traced = [question, {"role": "assistant", "content": "Yes, it is.", "reasoning_content": "No divisor up to 4."}]
    _, [tokens] = assistant_nll(model, tokenizer, [traced], batch_size=1)
    [seq] = encode_sequences(tokenizer, [traced])
    scored = tokenizer.decode([t for t, m in zip(seq.ids, seq.mask) if m])
    assert tokens == sum(seq.mask) and "Yes, it is." in scored and "divisor" not in scored
