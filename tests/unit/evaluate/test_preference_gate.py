"""The preference checks: reward accuracy and rated-down repeats against the champion, only with a preference split."""

from __future__ import annotations

import json

import pytest

from tasks.config import EvalParams, GateParams
from tasks.evaluate.gate import apply_gate
from tasks.evaluate.preference import preference_result, score_preferences

GOOD = {"exact_match": 0.9, "perplexity": 1.2, "latency_p95_ms": 100.0, "rouge_l": 0.95}


def preference(correct: list[float], avoids: list[float]) -> tuple[dict, dict]:
    metrics = {"reward_accuracy": sum(correct) / len(correct), "rated_down_repeat_rate": 1 - sum(avoids) / len(avoids)}
    per = {"ids": [str(i) for i in range(len(correct))], "reward_accuracy": correct,
           "rated_down_ids": [str(i) for i in range(len(avoids))], "avoids_rated_down": avoids}
    return metrics, per


def gate(candidate, champion):
    metrics = {"candidate": GOOD, "candidate_preference": candidate[0], "champion_preference": champion[0]}
    per_example = {"candidate_preference": candidate[1], "champion_preference": champion[1]}
    return apply_gate(metrics, GateParams(), per_example)


def test_no_preference_split_no_preference_checks():
    names = {c.name for c in apply_gate({"candidate": GOOD}, GateParams()).checks}
    assert not any("reward" in n or "rated_down" in n for n in names)


def test_a_candidate_that_prefers_what_users_preferred_passes_paired_against_the_champion():
    verdict = gate(preference([1.0] * 36 + [0.0] * 4, [1.0] * 20), preference([1.0] * 20 + [0.0] * 20, [1.0] * 15 + [0.0] * 5))
    checks = {c.name: c for c in verdict.checks}
    assert checks["no_regression_reward_accuracy"].passed and checks["no_regression_avoids_rated_down"].passed
    assert checks["no_regression_reward_accuracy"].method == "paired bootstrap + McNemar"
    assert checks["no_regression_reward_accuracy"].n == 40


def test_a_candidate_that_repeats_rated_down_answers_more_often_fails():
    verdict = gate(preference([1.0] * 40, [0.0] * 30 + [1.0] * 10), preference([1.0] * 40, [1.0] * 40))
    assert "no_regression_avoids_rated_down" in verdict.failed
    assert "no_regression_reward_accuracy" not in verdict.failed


def test_scores_on_held_out_rows_with_a_real_model(tmp_path):
    """Reward accuracy, margin and rated-down repeats of the tiny model with a fresh (zero) LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from tasks.config import ModelParams
    from tasks.model.loading import load_base_model, load_base_tokenizer

    tok = load_base_tokenizer(ModelParams())
    model = get_peft_model(load_base_model(ModelParams(), tok), LoraConfig(r=4, target_modules=["q_proj"]))
    model.eval()
    prompt = [{"role": "user", "content": "Rewrite 2024-01-05 as a US date."}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "01/05/2024"}],
             "rejected": [{"role": "assistant", "content": "05/01/2024"}]},
            {"prompt": prompt, "completion": [{"role": "assistant", "content": "no idea"}], "label": False}]
    result = preference_result(score_preferences(model, tok, rows, EvalParams(max_new_tokens=8)))
    # A zero adapter is the reference itself: every log-ratio is 0, so nothing is preferred yet.
    assert result["metrics"]["reward_accuracy"] == 0.0 and result["metrics"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert result["metrics"]["rated_down_examples"] == 2.0
    assert len(result["per_example"]["avoids_rated_down"]) == 2
    # One thumbs-down alone has no thumbs-up to be placed against: only the pair is judged.
    assert len(result["per_example"]["ids"]) == 1 and result["metrics"]["reward_examples"] == 1.0
    json.dumps(result)  # written to metrics.json and per_example.json


class _Adapted:
    """Stands for a LoRA model: score_preferences reads its log-ratios and generations through the stubs below."""

    def disable_adapter(self):  # pragma: no cover - the stubs never call it
        raise AssertionError


def _kto(i: int, label: bool, answer: str = "x") -> dict:
    return {"prompt": [{"role": "user", "content": f"Question {i}?"}],
            "completion": [{"role": "assistant", "content": answer}], "label": label}


@pytest.mark.parametrize("ups", [4, 7])
def test_kto_rows_are_judged_against_the_models_reference_point_not_zero(monkeypatch, ups):
    """A model that learnt the task's format gives every answer, right or wrong, a large log-ratio
    against the base: judged against 0 every thumbs-down row was wrong for every model, and the
    accuracy was the share of thumbs-up rows. Against the midpoint of the model's mean log-ratio
    on thumbs up and on thumbs down it tells the model that ranks thumbs-up answers higher from
    the one that ranks them lower, also when most rows are thumbs up."""
    import tasks.evaluate.preference as preference

    rows = [_kto(i, i < ups) for i in range(8)]
    monkeypatch.setattr(preference, "generate_batched", lambda model, tok, prompts, *a: (["other"] * len(prompts), [], []))
    monkeypatch.setattr(preference, "render_prompt", lambda tok, messages, *a: messages[0]["content"])
    params = EvalParams(max_new_tokens=8)
    tok = _Tokens()
    for up, down, accuracy in ((50.0, 45.0, 1.0), (45.0, 50.0, 0.0)):
        ratios = [up if r["label"] else down for r in rows]
        monkeypatch.setattr(preference, "log_ratios", lambda *a, ratios=ratios: ratios)
        metrics = score_preferences(_Adapted(), tok, rows, params)["metrics"]
        assert metrics["reward_accuracy"] == accuracy
        assert metrics["reward_margin"] == pytest.approx(2.5 if accuracy else -2.5)


def test_thumbs_of_one_kind_only_are_not_judged(monkeypatch):
    """With every row a thumbs up there is nothing to place them against: any reference point
    drawn from the rows themselves made a good and a bad model score alike."""
    import tasks.evaluate.preference as preference

    rows = [_kto(i, True) for i in range(3)]
    monkeypatch.setattr(preference, "generate_batched", lambda model, tok, prompts, *a: (["other"] * len(prompts), [], []))
    monkeypatch.setattr(preference, "render_prompt", lambda tok, messages, *a: messages[0]["content"])
    monkeypatch.setattr(preference, "log_ratios", lambda *a: [9.0, 10.0, 11.0])
    scored = score_preferences(_Adapted(), _Tokens(), rows, EvalParams(max_new_tokens=8))
    assert "reward_accuracy" not in scored["metrics"] and scored["metrics"]["reward_examples"] == 0.0
    assert scored["per_example"]["preference"]["ids"] == []


class _Tokens:
    """A tokenizer of one token per word, enough for the room a regenerated answer gets."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def test_a_long_rated_down_answer_the_model_repeats_counts_as_a_repeat(monkeypatch):
    """The answer is regenerated with room for the rated-down one and a token more: cut at
    eval.max_new_tokens, a repeat of a longer answer never equalled it and counted as avoided."""
    import tasks.evaluate.preference as preference

    long = " ".join(f"word{i}" for i in range(40))
    rows = [_kto(0, False, long), _kto(1, True, "fine")]
    asked = []

    def repeats(model, tok, prompts, max_new, batch_size):  # a model that writes the rated-down answer again
        asked.append(max_new)
        return [" ".join(long.split()[:max_new])] * len(prompts), [], []

    monkeypatch.setattr(preference, "generate_batched", repeats)
    monkeypatch.setattr(preference, "log_ratios", lambda *a: [1.0, 2.0])
    monkeypatch.setattr(preference, "render_prompt", lambda tok, messages, *a: messages[0]["content"])
    metrics = score_preferences(_Adapted(), _Tokens(), rows, EvalParams(max_new_tokens=8))["metrics"]
    assert asked == [41] and metrics["rated_down_repeat_rate"] == 1.0
