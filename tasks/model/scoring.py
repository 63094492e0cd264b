"""Log-probabilities of answers: what preference tuning trains on and what its evaluation measures.

A conversation renders through `tasks.model.chat.encode_chats` (multi-turn and tool-calling
prompts as in supervised tuning) with only its last answer marked; `sequence_logps` sums
that answer's token log-probabilities under a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.model.chat import encode_chats


@dataclass(frozen=True)
class Sequence:
    """One rendered conversation: its tokens and the mask of its last answer."""

    ids: list[int]
    mask: list[int]


def _last_answer(mask: list[int]) -> list[int]:
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [int(start <= i < end) for i in range(len(mask))]


def encode_sequences(tokenizer, conversations: list[list[dict]], system_message: str = "auto",
                     train_reasoning: bool = False) -> list[Sequence]:
    """The conversations' tokens, with only their last answer marked (what preference tuning scores).

    `train_reasoning`: the answer's reasoning trace is marked with it (`train.train_reasoning`,
    for training); evaluation scores answers without their traces, the default.
    """
    encoded = encode_chats(tokenizer, conversations, system_message=system_message, train_reasoning=train_reasoning)
    return [Sequence(e.input_ids, _last_answer(e.loss_mask)) for e in encoded]


def sequence_logps(model, seqs: list[Sequence], pad_id: int, device: str):
    """Summed log-probability of each sequence's last answer under `model` (a tensor, one per sequence)."""
    import torch

    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        mask[i, : len(s.ids)] = torch.tensor(s.mask, dtype=torch.float32)
    ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    token_logps = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    return (token_logps * mask[:, 1:]).sum(-1)


