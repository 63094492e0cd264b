"""Never train or gate on nothing: a step, an evaluation or metrics without assistant tokens are refused.

The data: answers that carry their reasoning inline (`<think>…</think>`), which Qwen 3's
published template rewrites, so no answer can be found in the rendered text and nothing
is masked in. Before, such data trained at loss 0.0000 and evaluated at perplexity 1.00.
"""

from __future__ import annotations

import pytest

from tasks.config import EvalParams, ModelParams, TrainParams
from tasks.errors import RunFailed
from tasks.evaluate.score import evaluate_model
from tasks.model.loading import load_causal_lm, load_tokenizer, resolve_base
from tasks.train.loop import train_loop
from tasks.train.packing import prepare_batches
from tests.support.families import QWEN3_TEMPLATE

ROWS = [
    {"messages": [{"role": "user", "content": f"Rewrite 2020-01-0{i}"}, {"role": "assistant", "content": f"<think>day {i}</think>"}]}
    for i in range(1, 5)
]


@pytest.fixture(scope="module")
def base_path() -> str:
    return resolve_base(ModelParams())


@pytest.fixture(scope="module")
def rewriting_tokenizer(base_path):
    tok = load_tokenizer(base_path)
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def test_the_training_loop_refuses_a_step_without_trained_tokens(base_path, rewriting_tokenizer) -> None:
    train = TrainParams(max_steps=3, batch_size=2, seq_len=64, log_every=1)
    batches = prepare_batches(rewriting_tokenizer, ROWS, train)
    assert batches and sum(b.trained_tokens for b in batches) == 0
    logged: list[str] = []
    with pytest.raises(RunFailed, match=r"step 1: .*0 trained tokens.*chat template marks no assistant tokens"):
        train_loop(load_causal_lm(base_path), batches, train, "cpu", logged.append, progress=False)
    assert not logged  # no step was taken, so no loss was ever logged


def test_evaluation_refuses_to_score_no_tokens(base_path, rewriting_tokenizer) -> None:
    model = load_causal_lm(base_path).eval()
    with pytest.raises(RunFailed, match=r"evaluation scored 0 assistant tokens over 4 examples"):
        evaluate_model(model, rewriting_tokenizer, ROWS, EvalParams(max_new_tokens=2))


def test_evaluation_reports_the_tokens_it_scored(base_path) -> None:
    tok = load_tokenizer(base_path)
    rows = [{"messages": [m if m["role"] == "user" else {**m, "content": "January 1, 2020"} for m in r["messages"]]} for r in ROWS]
    metrics = evaluate_model(load_causal_lm(base_path).eval(), tok, rows, EvalParams(max_new_tokens=2))["metrics"]
    answer = len(tok.encode("January 1, 2020<|im_end|>", add_special_tokens=False))
    assert metrics["scored_tokens"] == 4 * answer and metrics["perplexity"] > 1.0
