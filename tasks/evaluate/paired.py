"""Paired statistics: is the candidate really worse than the champion, or is it noise?

The candidate and the champion are scored on the same test examples, so the gate compares
them example by example. A paired comparison removes the variation between examples (easy
and hard questions are easy or hard for both models) and leaves only the variation of the
disagreements, which is far smaller than the spread of either score alone.

- `bootstrap_difference`: percentile confidence interval of the mean difference
  (candidate - champion), resampling examples in pairs with a fixed seed, so the same
  scores always give the same interval. Weights turn the mean into a ratio of sums
  (e.g. NLL summed over an example's tokens, weighted by its token count: the
  token-weighted mean NLL behind perplexity).
- `bootstrap_mean`: the same interval for one model's mean (threshold checks).
- `mcnemar_p_value`: McNemar's exact test for 0/1 scores (exact match, accuracy): under
  "no difference" each discordant pair (one model right, the other wrong) is a fair coin.
- `examples_needed`: how many examples bring an interval's half-width down to a margin
  (the half-width shrinks as 1/sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEED = 20261130
# Resampled rows per chunk of the bootstrap: bounds memory to ~16 MB of indices whatever n is.
_CHUNK_CELLS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval, over `n` examples."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _weighted_means(values: np.ndarray, weights: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    if weights is None:
        return values[idx].mean(axis=1)
    return values[idx].sum(axis=1) / np.maximum(weights[idx].sum(axis=1), 1e-12)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty list of per-example scores")
    return array


def _bootstrap(
    statistic_of, n: int, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of `statistic_of(idx)` over `resamples` resamplings of range(n)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // n)
    stats = []
    for start in range(0, resamples, rows):
        idx = rng.integers(0, n, size=(min(rows, resamples - start), n))
        stats.append(statistic_of(idx))
    alpha = 1.0 - confidence
    low, high = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_difference(
    candidate: Sequence[float],
    champion: Sequence[float],
    confidence: float,
    resamples: int,
    seed: int = SEED,
    candidate_weights: Sequence[float] | None = None,
    champion_weights: Sequence[float] | None = None,
) -> Interval:
    """Confidence interval of mean(candidate) - mean(champion), resampling examples in pairs.

    Args:
        candidate: the candidate's score on each example.
        champion: the champion's score on the same examples, in the same order.
        confidence: coverage of the two-sided interval (e.g. 0.95).
        resamples: bootstrap resamples.
        seed: seed of the resampling; the same inputs and seed give the same interval.
        candidate_weights, champion_weights: with weights, each mean is sum(values) / sum(weights)
            over the resampled examples.

    Raises:
        ValueError: empty or unequal lists, or a confidence outside (0, 1).
    """
    a, b = _as_array(candidate, "candidate"), _as_array(champion, "champion")
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.size} candidate scores, {b.size} champion scores")
    wa = None if candidate_weights is None else _as_array(candidate_weights, "candidate_weights")
    wb = None if champion_weights is None else _as_array(champion_weights, "champion_weights")
    everything = np.arange(a.size)[None, :]
    estimate = float(_weighted_means(a, wa, everything)[0] - _weighted_means(b, wb, everything)[0])
    low, high = _bootstrap(
        lambda idx: _weighted_means(a, wa, idx) - _weighted_means(b, wb, idx), a.size, confidence, resamples, seed
    )
    return Interval(estimate, low, high, a.size)


def bootstrap_mean(
    values: Sequence[float], confidence: float, resamples: int, seed: int = SEED,
    weights: Sequence[float] | None = None,
) -> Interval:
    """Confidence interval of one model's mean score (sum(values) / sum(weights) with weights)."""
    a = _as_array(values, "values")
    w = None if weights is None else _as_array(weights, "weights")
    estimate = float(_weighted_means(a, w, np.arange(a.size)[None, :])[0])
    low, high = _bootstrap(lambda idx: _weighted_means(a, w, idx), a.size, confidence, resamples, seed)
    return Interval(estimate, low, high, a.size)


def discordant_pairs(candidate: Sequence[float], champion: Sequence[float]) -> tuple[int, int]:
    """(candidate right and champion wrong, candidate wrong and champion right) for 0/1 scores."""
    a = _as_array(candidate, "candidate") > 0.5
    b = _as_array(champion, "champion") > 0.5
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.size} candidate scores, {b.size} champion scores")
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_p_value(gains: int, losses: int) -> float:
    """Two-sided exact McNemar p-value of `gains` vs `losses` discordant pairs.

    Under the null hypothesis each discordant pair goes either way with probability 1/2, so
    the smaller count is Binomial(gains + losses, 1/2); the p-value doubles its lower tail.
    """
    if gains < 0 or losses < 0:
        raise ValueError(f"discordant counts must be non-negative, got {gains} and {losses}")
    n = gains + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gains, losses) + 1))
    # Integer true division stays exact for any n, where 0.5 ** n would underflow first.
    return min(1.0, 2 * tail / 2**n)


def examples_needed(n: int, half_width: float, margin: float) -> int | None:
    """Examples that would shrink an interval of `half_width` on `n` examples to `margin`.

    None when `margin` is 0 (no finite test split makes an interval that narrow).
    """
    if margin <= 0:
        return None
    return max(n, math.ceil(n * (half_width / margin) ** 2))
