"""The tiny base model as built: random weights at the fan-in scale, and the same seed builds the same model."""

from __future__ import annotations

import pytest
import torch

from tasks.config import ModelParams
from tasks.model.loading import load_causal_lm, resolve_base
from tasks.model.tiny import build_tiny, init_std


def test_the_embeddings_are_random_at_the_fan_in_scale() -> None:
    embeddings = load_causal_lm(resolve_base(ModelParams())).get_input_embeddings().weight.detach()
    width = embeddings.shape[1]
    assert embeddings.std().item() == pytest.approx(init_std(width), rel=0.05)
    unit = torch.nn.functional.normalize(embeddings[:200], dim=1)
    assert ((unit @ unit.T).sum() - 200).abs().item() / (200 * 199) < 0.02  # near-orthogonal rows


def test_the_same_seed_builds_the_same_weights_and_another_seed_other_ones(tmp_path) -> None:
    weights = [load_causal_lm(str(build_tiny(tmp_path / name, seed))).get_input_embeddings().weight.detach()
               for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
