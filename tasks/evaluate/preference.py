"""Scores on the held-out preference split: does a model prefer what users preferred, and avoid what they rated down?

- Reward accuracy: for a pair, the model's log-ratio against the reference (the same model
  with its adapter disabled, i.e. the base model for every candidate and champion alike)
  is higher for the chosen answer than for the rejected one; for a KTO row, the log-ratio
  is above the model's reference point for a desirable answer and below it for an
  undesirable one. The reference point is the midpoint of the model's mean log-ratio on the
  split's desirable rows and on its undesirable ones, so that a lopsided split (mostly thumbs
  up) does not move it. Against 0 instead, every answer of a model that learnt the task's
  format (right or wrong) has a large positive log-ratio against the base, and the accuracy
  was the share of desirable rows whatever the model preferred. A split whose KTO rows all
  carry one label has no such point: its KTO rows are not judged (`reward_examples` counts
  the rows that are). The margin is the difference of log-ratios (pairs) or the log-ratio
  less the reference point, signed by the label (KTO rows), in nats. Training's reference is another one (`tasks.train.preference`: the run's
  supervised model); here the base is used because a candidate and its champion come from
  different supervised runs, and only a shared reference scores them on one scale.
- Rated-down repeats: the model, greedy, answers each prompt whose answer users rated down
  (undesirable KTO rows, rejected answers of pairs), given room for the longest of those
  answers and one token more (at least `eval.max_new_tokens`, at most
  `MAX_REPEAT_TOKENS`), and the answer is compared, up to case and whitespace, with the
  rated-down one. `avoids_rated_down` is 1 where it differs.

Per-example scores come with `ids` (a hash of the row), so the gate pairs the candidate's
with the champion's as it does on the test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.config import EvalParams
from tasks.evaluate.generation import generate_batched
from tasks.files import read_jsonl
from tasks.model.chat import render_prompt
from tasks.model.scoring import encode_sequences, sequence_logps

HELDOUT = "preference_heldout.jsonl"
# The most tokens a rated-down answer is regenerated with: the service's answers can be long.
MAX_REPEAT_TOKENS = 1024


def _row_id(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _fold(text: str) -> str:
    return " ".join(text.split()).lower()


def load_heldout(data_dir: Path, limit: int) -> list[dict]:
    """The held-out preference rows (at most `limit`); [] when the run has none."""
    path = Path(data_dir) / HELDOUT
    return read_jsonl(path)[:limit] if path.is_file() else []


def log_ratios(model, tokenizer, conversations: list, system_message: str, batch_size: int) -> list[float]:
    """log π(answer) − log π_ref(answer) of each conversation's last answer; the reference is the adapter disabled."""
    import torch

    seqs = encode_sequences(tokenizer, conversations, system_message)
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            policy = sequence_logps(model, chunk, tokenizer.pad_token_id, device)
            with model.disable_adapter():
                reference = sequence_logps(model, chunk, tokenizer.pad_token_id, device)
            out += (policy - reference).tolist()
    return out


def score_preferences(model, tokenizer, rows: list[dict], params: EvalParams, system_message: str = "auto") -> dict:
    """The reward accuracy, margin and rated-down repeats of `model` on `rows`: aggregate and per example.

    Returns:
        {"metrics": {...}, "per_example": {"preference": {ids, reward_accuracy, margin},
        "rated_down": {ids, avoids_rated_down}}}; empty when the model has no adapter to
        disable (full fine-tuning: no reference without a second copy).
    """
    if not rows or not hasattr(model, "disable_adapter"):
        return {}
    convs = [{"messages": r["prompt"] + a, "tools": r.get("tools")}
             for r in rows for a in ([r["completion"]] if "completion" in r else [r["chosen"], r["rejected"]])]
    ratios = log_ratios(model, tokenizer, convs, system_message, params.batch_size)
    left = iter(ratios)
    per_row = [next(left) if "completion" in r else next(left) - next(left) for r in rows]
    z0 = _reference_point([(ratio, r["label"]) for ratio, r in zip(per_row, rows) if "completion" in r])
    judged, correct, margins = [], [], []
    for r, ratio in zip(rows, per_row):
        if "completion" in r:
            if z0 is None:
                continue  # thumbs of one kind only: nothing to place them against
            margin = ratio - z0 if r["label"] else z0 - ratio
        else:
            margin = ratio
        judged.append(r)
        margins.append(margin)
        correct.append(float(margin > 0))
    down = [(r, (r["completion"] if "completion" in r else r["rejected"])[0]["content"]) for r in rows
            if r.get("label") is False or "rejected" in r]
    prompts = [render_prompt(tokenizer, r["prompt"], system_message, r.get("tools")) for r, _ in down]
    # Room to write the longest rated-down answer and a token more: a repeat cut short is no repeat.
    room = max([params.max_new_tokens, *(len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
                                         for _, text in down)])
    answers, _, _ = (generate_batched(model, tokenizer, prompts, min(room, MAX_REPEAT_TOKENS), params.batch_size)
                     if down else ([], [], []))
    avoids = [float(_fold(a) != _fold(text)) for a, (_, text) in zip(answers, down)]
    metrics = {"examples": float(len(rows)), "reward_examples": float(len(judged)), "rated_down_examples": float(len(down))}
    if judged:
        metrics.update(reward_accuracy=sum(correct) / len(correct), reward_margin=sum(margins) / len(margins))
    if down:
        metrics["rated_down_repeat_rate"] = (len(avoids) - sum(avoids)) / len(avoids)  # 1/9, not 1 - 8/9's 0.11111111111111116
    return {"metrics": metrics, "per_example": {
        "preference": {"ids": [_row_id(r) for r in judged], "reward_accuracy": correct, "margin": margins},
        "rated_down": {"ids": [_row_id(r) for r, _ in down], "avoids_rated_down": avoids},
    }}


def _reference_point(kto: list[tuple[float, bool]]) -> float | None:
    """The midpoint of the mean log-ratio of the desirable and of the undesirable rows; None without both."""
    up = [ratio for ratio, label in kto if label]
    down = [ratio for ratio, label in kto if not label]
    if not up or not down:
        return None
    return (sum(up) / len(up) + sum(down) / len(down)) / 2


def candidate_dir(model_dir: Path, preference_dir: Path | None) -> Path:
    """The run's candidate: the preference-tuned model when the `preference` stage tuned one, else the supervised one."""
    tuned = Path(preference_dir) / "model" if preference_dir is not None else None
    return tuned if tuned is not None and (tuned / "ftllm_model.json").is_file() else Path(model_dir)


def preference_result(scored: dict) -> dict | None:
    """`score_preferences`' output as one entry of the evaluation's results (metrics, per example, no samples)."""
    if not scored:
        return None
    pe = scored["per_example"]
    per_example = {**pe["preference"], "rated_down_ids": pe["rated_down"]["ids"],
                   "avoids_rated_down": pe["rated_down"]["avoids_rated_down"]}
    return {"metrics": scored["metrics"], "per_example": per_example, "samples": []}


def score_preference_dir(model_dir: Path, data_dir: Path, params: EvalParams) -> dict:
    """Load a model folder (the champion) and score it on the held-out preference split: metrics and per example."""
    from tasks.model.loading import load_trained

    model, tokenizer, info = load_trained(model_dir)
    scored = score_preferences(model, tokenizer, load_heldout(data_dir, params.max_examples), params,
                               info.get("system_message", "auto"))
    return preference_result(scored) or {"metrics": {}, "per_example": {}}
