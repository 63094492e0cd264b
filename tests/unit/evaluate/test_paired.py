"""Paired statistics of the gate, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate.paired import (
    bootstrap_difference,
    bootstrap_mean,
    discordant_pairs,
    examples_needed,
    mcnemar_p_value,
)


def test_mcnemar_exact_p_values_by_hand():
    # 1 vs 6 discordant pairs: P(X <= 1 | Binomial(7, 1/2)) = (1 + 7) / 128, doubled.
    assert mcnemar_p_value(1, 6) == pytest.approx(16 / 128)
    assert mcnemar_p_value(6, 1) == pytest.approx(16 / 128)  # symmetric
    # 0 vs 5: 2 * (1/32).
    assert mcnemar_p_value(0, 5) == pytest.approx(2 / 32)
    # 6 vs 14 (the seed-only retrain of the README: 0.905 vs 0.945 on 199 examples):
    # 2 * (1 + 20 + 190 + 1140 + 4845 + 15504 + 38760) / 2**20.
    assert mcnemar_p_value(6, 14) == pytest.approx(2 * 60460 / 2**20)
    assert mcnemar_p_value(3, 3) == 1.0  # capped at 1
    assert mcnemar_p_value(0, 0) == 1.0  # no discordant pair: no evidence either way
    assert 0.0 <= mcnemar_p_value(0, 3000) < 1e-300  # large n stays exact, no overflow


def test_discordant_pairs_counts_each_direction():
    candidate = [1, 1, 0, 0, 1, 0]
    champion = [1, 0, 1, 1, 0, 0]
    assert discordant_pairs(candidate, champion) == (2, 2)
    assert discordant_pairs([1, 1, 1], [0, 0, 1]) == (2, 0)


def test_bootstrap_is_deterministic_with_the_seed_and_moves_without_it():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 0.2, 150), rng.normal(0.45, 0.2, 150)
    first = bootstrap_difference(a, b, 0.95, 2000, seed=7)
    assert bootstrap_difference(a, b, 0.95, 2000, seed=7) == first
    assert bootstrap_difference(a, b, 0.95, 2000, seed=8) != first
    assert first.estimate == pytest.approx(a.mean() - b.mean())
    assert first.low < first.estimate < first.high and first.n == 150


def test_bootstrap_interval_covers_a_known_difference_about_as_often_as_it_claims():
    rng = np.random.default_rng(2026)
    true_diff, covered, trials = 0.05, 0, 200
    for trial in range(trials):
        shared = rng.normal(0.6, 0.3, 120)  # the example's difficulty, common to both models
        a = shared + true_diff + rng.normal(0, 0.1, 120)
        b = shared + rng.normal(0, 0.1, 120)
        ci = bootstrap_difference(a, b, 0.95, 1000, seed=trial)
        covered += ci.low <= true_diff <= ci.high
    assert 0.90 <= covered / trials <= 0.99, covered


def test_pairing_gives_a_narrower_interval_than_the_spread_of_either_model():
    rng = np.random.default_rng(3)
    shared = rng.normal(0.5, 0.3, 200)
    a, b = shared + rng.normal(0, 0.05, 200), shared + rng.normal(0, 0.05, 200)
    paired = bootstrap_difference(a, b, 0.95, 2000)
    unpaired_half_width = 1.96 * math.sqrt(a.var() / 200 + b.var() / 200)
    assert paired.half_width < unpaired_half_width / 3


def test_weighted_means_are_ratios_of_sums():
    # Two examples: 2 nats over 1 token and 6 nats over 3 tokens -> 8 / 4 = 2 nats per token.
    ci = bootstrap_mean([2.0, 6.0], 0.95, 500, weights=[1, 3])
    assert ci.estimate == pytest.approx(2.0)
    diff = bootstrap_difference([2.0, 6.0], [1.0, 3.0], 0.95, 500, candidate_weights=[1, 3], champion_weights=[1, 3])
    assert diff.estimate == pytest.approx(1.0)
    assert diff.low == pytest.approx(1.0) and diff.high == pytest.approx(1.0)  # every resample: ratio 2 vs 1


def test_examples_needed_scales_with_the_square_of_the_width():
    # Half-width 0.045 on 199 examples, margin 0.02: 199 * (0.045 / 0.02) ** 2 = 1007.4 -> 1008.
    assert examples_needed(199, 0.045, 0.02) == 1008
    assert examples_needed(199, 0.01, 0.02) == 199  # already narrow enough
    assert examples_needed(199, 0.01, 0.0) is None


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="same examples"):
        bootstrap_difference([1, 0, 1], [1, 0], 0.95, 100)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([], 0.95, 100)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0, 0.0], 1.5, 100)
