"""Packing tokenized examples into fixed-length rows and batches.

Examples are packed by best-fit decreasing into `train.seq_len` rows, then rows of similar
length are batched together, so almost no compute goes to padding. Position ids restart at
every example, so attention can be kept inside each example (`tasks.train.attention`).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

from tasks.config import TrainParams
from tasks.model.chat import Encoded, encode_chats

IGNORE = -100


Row = tuple[list[int], list[int], list[int]]  # input ids, labels (unshifted), position ids


@dataclass(frozen=True)
class Batch:
    """Token ids, shifted labels and position ids of shape (batch, width), as lists.

    Padding has position -1 and label IGNORE; labels are already shifted for next-token
    prediction and never cross from one packed example into the next.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]

    @property
    def real_tokens(self) -> int:
        return sum(1 for row in self.position_ids for p in row if p >= 0)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for row in self.labels for t in row if t != IGNORE)


def _row_of(ex: Encoded, seq_len: int) -> Row:
    ids = ex.input_ids[:seq_len]
    labels = [t if m else IGNORE for t, m in zip(ids, ex.loss_mask[:seq_len])]
    return ids, labels, list(range(len(ids)))


def pack_sequences(examples: list[Encoded], seq_len: int, seed: int = 0) -> list[Row]:
    """Pack examples into rows of at most `seq_len` tokens by best-fit decreasing.

    Longest examples first, each into the row with the least room that still fits it (a
    new row when none does); ties are broken by a seeded shuffle. Best-fit decreasing
    needs at most 11/9 of the optimal number of rows, against 2x for greedy in-order
    packing. Examples longer than `seq_len` are cut to it (prepare's length policy has
    already dealt with over-long examples). Position ids restart at 0 for every example.
    """
    items = [_row_of(ex, seq_len) for ex in examples]
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(items[i][0]))
    rows: list[Row] = []
    # Sorted (room left, row index) pairs: bisect finds the tightest row that fits.
    room: list[tuple[int, int]] = []
    for i in order:
        ids, labels, pos = items[i]
        k = bisect.bisect_left(room, (len(ids), -1))
        if k == len(room):
            rows.append(([], [], []))
            r, left = len(rows) - 1, seq_len
        else:
            left, r = room.pop(k)
        rows[r][0].extend(ids)
        rows[r][1].extend(labels)
        rows[r][2].extend(pos)
        bisect.insort(room, (left - len(ids), r))
    return rows


def pad_sequences(examples: list[Encoded], seq_len: int) -> list[Row]:
    """One example per row (packing off), cut to `seq_len`; rows are padded per batch later."""
    return [_row_of(ex, seq_len) for ex in examples]


def make_batches(rows: list[Row], batch_size: int, pad_id: int, seed: int = 0, width: int | None = None) -> list[Batch]:
    """Group rows of similar length into batches, each padded to its longest row, or to `width`.

    Grouping by length keeps the padding per batch small; the training loop shuffles the
    order of the batches every epoch. A fixed `width` (at least the longest row) gives every
    batch the same width, so compiled layers (`train.compile`) are not recompiled for every width.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: len(rows[i][0]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        longest = max(len(r[0]) for r in chunk)
        if width is not None and width < longest:
            raise ValueError(f"width {width} is shorter than a row of {longest} tokens")
        cols = longest if width is None else width
        ids, labels, pos = [], [], []
        for x, y, p in chunk:
            n = cols - len(x)
            ids.append(x + [pad_id] * n)
            p_full = p + [-1] * n
            y_full = y + [IGNORE] * n
            # Token i predicts token i+1, unless i+1 starts the next example or is padding.
            labels.append([y_full[i + 1] if i + 1 < cols and p_full[i + 1] > 0 else IGNORE for i in range(cols)])
            pos.append(p_full)
        batches.append(Batch(ids, labels, pos))
    return batches


def padding_fraction(batches: list[Batch]) -> float:
    """Share of batch positions that hold padding rather than an example's token."""
    total = sum(len(b.input_ids) * len(b.input_ids[0]) for b in batches)
    real = sum(b.real_tokens for b in batches)
    return 1.0 - real / total if total else 0.0


def to_tensors(batch: Batch, device: str):
    """(input_ids, position_ids, labels) tensors.

    The padding at the end of a row gets positions 0, 1, 2, ...: one more example, which no
    real token can attend to (it comes last) and whose outputs carry no label.
    """
    import torch

    ids = torch.tensor(batch.input_ids, device=device)
    pos = torch.tensor(batch.position_ids, device=device)
    real = (pos >= 0).sum(dim=1, keepdim=True)
    pos = torch.where(pos >= 0, pos, torch.arange(pos.shape[1], device=device) - real)
    labels = torch.tensor(batch.labels, device=device)
    return ids, pos, labels


def prepare_batches(tokenizer, rows: list[dict], train: TrainParams, system_message: str = "auto") -> list[Batch]:
    """Encode chat examples (assistant-only labels unless train_on_prompt), pack and batch them.

    Each row is a canonical example: its `tools` reach the template, and `train.train_turns`
    and `train.train_reasoning` choose the trained turns and traces.

    `system_message` is `data.system_message`, the policy the model is trained (and served) with.
    """
    encoded = encode_chats(
        tokenizer, rows, train.train_on_prompt, system_message,
        train_turns=train.train_turns, train_reasoning=train.train_reasoning,
    )  # fmt: skip
    if train.packing:
        packed = pack_sequences(encoded, train.seq_len, train.seed)
    else:
        packed = pad_sequences(encoded, train.seq_len)
    width = train.seq_len if train.compile else None  # one width for the compiled layers
    return make_batches(packed, train.batch_size, tokenizer.pad_token_id, train.seed, width) if packed else []
