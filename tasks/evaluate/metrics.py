"""Text and classification metrics: exact match, BLEU (sacrebleu), ROUGE-L (rouge-score), accuracy / F1.

`text_scores` gives the same scores per example (sentence BLEU), for the gate's paired
comparison of the candidate and the champion on the same examples.
"""

from __future__ import annotations

import math


def text_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example exact match (0/1), sentence BLEU (sacrebleu, 0-100) and ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return {
        "exact_match": [float(p == r.strip()) for p, r in zip(predictions, references)],
        "bleu": [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(predictions, references)],
        "rouge_l": [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)],
    }


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score)."""
    import sacrebleu

    scores = text_scores(predictions, references)
    return {
        "exact_match": sum(scores["exact_match"]) / max(1, len(references)),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge_l": sum(scores["rouge_l"]) / max(1, len(references)),
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
