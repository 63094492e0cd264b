"""The training loss: cross-entropy on the trained (assistant) tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class CausalLMLoss(torch.nn.Module):
    """Summed next-token cross-entropy over the labelled positions of a batch.

    The language-model head runs only on the positions that carry a label (assistant
    tokens by default), not on every position: with a 32k vocabulary the head and its
    fp32 softmax over prompt and padding tokens cost as much as several decoder layers.
    Labels arrive already shifted (position i holds the id of token i+1), so packing can
    mask the boundary between two examples.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
        self._head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels != IGNORE
        if self._decoder is None or self._head is None:  # an architecture without the usual layout
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[keep]
        else:
            # No attention mask: transformers then derives a block-diagonal causal mask from
            # the restarting position ids, so packed examples never attend to each other.
            hidden = self._decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
            logits = self._head(hidden[keep])
        return F.cross_entropy(logits.float(), labels[keep], reduction="sum")
