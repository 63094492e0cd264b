"""Continuous batching in a process of its own: one decoding loop that completions join
and leave at any step.

The module is long but cohesive: the batch's KV cache, the rows' admission and removal
and sampling change together, and splitting them would put one data structure's
invariants in several files. What the loop shares with the library's loop (rows, loaded
models, text and events) is in `serving.decoding`; the process around it in
`serving.engine_process`.

A request's row is admitted at the next step after it arrives: its prompt is prefilled
(with the other rows admitted at that step, left-padded), its KV cache is appended to the
running batch's (left-padded to the longer of the two), and from then on each step feeds
every row's last token at once. A row leaves as soon as it ends (end of sequence, a stop
string, `max_tokens`, or its client gone), so a short answer never waits for a long one,
and a request arriving while others generate does not wait for them to finish.

This is what makes concurrent clients cheaper than sequential ones: one forward pass of
many rows costs little more than one of a single row. For the same reason rows join a
running batch in groups (once the waiting rows number `join_ratio` of the running ones,
by default half, or once the first has waited `join_after_steps` steps): each prefill is a
forward pass of its own. Both, and `max_batch`, the most rows decoded at once, are
settings of `serving:` in params.yaml; the service passes their values to `EngineProcess`.
With a batcher that formed a batch, ran it to the end, then formed the next, concurrent
clients fell into alternating part-full batches (4 and 12 rows of 16), each waiting for
the other.

Prompts that start alike (the same system message, the same instructions) share their
start's KV cache: the engine remembers, per model, the longest token prefix that the prompts
of its last uncached group shared (at least `prefix_min_tokens`, a setting of `serving:`),
and a later group whose prompts all start with it is prefilled from a copy of that cache,
computing only the rest of each prompt. On the benchmark's prompts (a 38-token chat of
which 26 tokens are the template and the system message) that is a third of the tokens a
prefill computes. One prefix per model, the latest: traffic that alternates between system
messages re-learns it, and a group that does not match is prefilled whole, as before.

Decoding steps hand the attention a prepared mask (padding columns only: one new token per
row sees everything before it) where the model attends with SDPA over full-attention
layers, instead of letting the model rebuild one from the padding mask at every step.

Rows carry their own sampling settings (greedy at temperature 0, else temperature, top_p
and, where the request gave one, a seeded random generator per row), so requests with
different settings share steps. A row's events are ("delta", text) while it streams (a row
that does not stream gets its whole text in one delta), then ("end", finish_reason,
completion_tokens) or ("error", message); each step's events go out together.

`serving.engine_process.EngineProcess` runs the loop in a spawned process and talks to it
over a pipe, so the service's event loop (HTTP, validation, templating) and the decoding
loop do not share a GIL: in one process each stalled the other, and concurrent clients got
a fraction of what the loop alone served.

Why a loop of its own beside transformers' continuous batching (`model.init_continuous_batching()`,
paged attention): on this project's CPU machines the library sized its KV cache from memory
(gigabytes for a model of megabytes), and with a bounded cache it served fewer completions
than this loop to the same closed loop of clients; it also has no hook for stop strings or
per-row streaming decisions. The project keeps its own code beside a library's only while
a side-by-side benchmark shows it ahead by a set margin: `ftllm bench serve --peer` (the
service against `transformers serve --continuous-batching`) and `benchmarks/bench_engines.py`
(this loop against the library's, inside the service) measure it, and the figures, dated,
with the decision, are in `benchmarks/results/`. `serving.engine: transformers` runs the
library's loop in the engine process instead (`serving.library_engine`; both implement
`serving.decoding.DecodingLoop`), with a bounded cache and the same `serving.decoding.Tokens`
for stop strings, so the two can be measured on the machine that serves.

Each row names the model it runs on. Rows of one model share steps; when rows for a newer
model arrive (a hot swap), they wait until the running batch has drained (at most
`max_tokens` steps) and then start on it, so nothing in flight is dropped.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from typing import Any, Callable

from serving.decoding import Emit, LoadedModel, Prefix, Row, Tokens, cpu_threads

log = logging.getLogger("ftllm.serving")


def sample(logits, temperature, top_p, generators=None):
    """Next token per row: greedy where `temperature` is 0, else sampled from the
    temperature-scaled distribution cut to its `top_p` nucleus (row-wise tensors).

    `generators`, one per row or None, are the seeded rows' own random generators: such a
    row is drawn alone from its generator (one more small draw per seeded row and step), so
    its tokens depend on its seed and its logits only, not on its place in the batch.
    """
    import torch

    greedy = logits.argmax(-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-5).unsqueeze(1), dim=-1)
    ranked, order = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens until their mass reaches top_p, and always the first one:
    # a top_p below float32's smallest value (5e-324 is valid JSON) becomes 0 in the tensor.
    cut = ranked.cumsum(-1) - ranked >= top_p.unsqueeze(1)
    cut[:, 0] = False
    ranked = ranked.masked_fill(cut, 0.0)
    drawn = order.gather(-1, torch.multinomial(ranked, 1)).squeeze(1)
    for i, generator in enumerate(generators or ()):
        if generator is not None:
            drawn[i] = order[i, torch.multinomial(ranked[i], 1, generator=generator)[0]]
    return torch.where(hot, drawn, greedy)



class _Batch:
    """The rows generating on one model, with their shared (left-padded) KV cache.

    Invariant between steps: the cache holds each row's prompt and all its tokens but the
    last, which is in `pending`; `mask` marks each row's real (not padding) cache columns.
    """

    def __init__(self, loaded: LoadedModel, prefix_min_tokens: int = 0) -> None:
        self.loaded = loaded
        self.prefix_min_tokens = prefix_min_tokens  # 0: no prefix cache
        # A prepared 4D mask is right only for SDPA over full-attention layers (eager
        # attention adds a float mask; sliding-window layers need masks of their own).
        self.mask_4d = getattr(loaded.model.config, "_attn_implementation", None) == "sdpa"
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None
        self.pending = None
        self.mergeable = True  # False: the model's cache cannot be merged; admit only when empty
        self.joining: list[Row] = []  # the rows being admitted in this step

    def can_admit(self) -> bool:
        return not self.rows or self.mergeable

    def prefill(self, rows: list[Row]) -> Any:
        """Run the prompts of `rows` and append them to the batch; the first token's logits.

        Where every prompt starts with the model's cached prefix, only the rest of each is
        run, after a copy of the prefix's cache (the padding then lies between the two).
        """
        import torch
        from transformers import DynamicCache

        tok, model = self.loaded.tokenizer, self.loaded.model
        device = model.device
        prefix = self._cached_prefix(rows)
        start = len(prefix.ids) if prefix else 0
        feeds = [r.prompt_ids[start:] for r in rows]
        width = max(len(f) for f in feeds)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(f)) + f for f in feeds])
        mask = torch.tensor([[1] * start + [0] * (width - len(f)) + [1] * len(f) for f in feeds])
        cache = DynamicCache(config=model.config)
        if prefix:
            for i, (keys, values) in enumerate(prefix.layers):
                cache.update(keys.expand(len(rows), -1, -1, -1).contiguous(),
                             values.expand(len(rows), -1, -1, -1).contiguous(), i)
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, start:].to(device),
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, mask = out.past_key_values, mask.to(device)
        if not prefix:
            self._learn_prefix(rows, cache, width)
        if self.rows:
            self._merge(cache, mask)
        else:
            self.cache, self.mask = cache, mask
            self.mergeable = _mergeable(cache)
            self.mask_4d = self.mask_4d and self.mergeable
        self.rows += rows
        return out.logits[:, -1, :]

    def _cached_prefix(self, rows: list[Row]) -> Prefix | None:
        """The model's prefix, if every prompt starts with it and has a token after it."""
        prefix = self.loaded.prefix
        if not self.prefix_min_tokens or prefix is None:
            return None
        n = len(prefix.ids)
        if all(len(r.prompt_ids) > n and r.prompt_ids[:n] == prefix.ids for r in rows):
            return prefix
        return None

    def _learn_prefix(self, rows: list[Row], cache, width: int) -> None:
        """Remember the start the prompts of `rows` share (at least `prefix_min_tokens`
        tokens, and short of the shortest prompt), with its cache from the first row."""
        if not self.prefix_min_tokens or len(rows) < 2 or not _mergeable(cache):
            return
        first = rows[0].prompt_ids
        shared = min(len(r.prompt_ids) for r in rows) - 1
        for r in rows[1:]:
            shared = next((i for i, (a, b) in enumerate(zip(first[:shared], r.prompt_ids)) if a != b), shared)
        if shared < self.prefix_min_tokens:
            return
        begin = width - len(first)  # the first row's padding comes before its prompt
        self.loaded.prefix = Prefix(first[:shared], [
            (layer.keys[:1, :, begin:begin + shared].clone(), layer.values[:1, :, begin:begin + shared].clone())
            for layer in cache.layers])

    def _merge(self, cache, mask) -> None:
        import torch
        import torch.nn.functional as F

        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([F.pad(mine.keys, (0, 0, width - old, 0)), F.pad(theirs.keys, (0, 0, width - new, 0))])
            mine.values = torch.cat([F.pad(mine.values, (0, 0, width - old, 0)),
                                     F.pad(theirs.values, (0, 0, width - new, 0))])
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))])

    def decode(self) -> Any:
        """Feed every row's pending token; the next token's logits."""
        import torch

        positions = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        # One new token per row attends to every real column before it: the padding mask,
        # as [rows, 1, 1, columns], is the whole 4D mask.
        mask = self.mask[:, None, None, :].bool() if self.mask_4d else self.mask
        out = self.loaded.model(input_ids=self.pending.unsqueeze(1), attention_mask=mask,
                                position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1, :]

    def add_pending(self, tokens) -> None:
        """Append the first tokens of the rows just prefilled (the last rows)."""
        import torch

        self.pending = tokens if self.pending is None else torch.cat([self.pending, tokens])

    def drop_ended(self) -> None:
        """Drop the rows that ended, and the cache columns that are padding in every row left."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pending = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.pending, self.mask = self.pending[index], self.mask[index]
        first = int(self.mask.any(0).nonzero()[0])
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]


def _mergeable(cache) -> bool:
    """Whether rows can join a running batch: every layer a plain growing KV cache (not a
    sliding window or a static buffer, which padding and merging would break)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return isinstance(cache, DynamicCache) and all(type(layer) is DynamicLayer for layer in cache.layers)


class Engine:
    """The decoding loop, in a thread of its own, and the rows waiting to join it.

    `emit` is called from that thread with each step's events, `[(row, event), ...]`;
    `on_step` with the number of rows in each decoding step. Rows are admitted first come,
    first served, up to `max_batch` generating at once.

    Args:
        emit: Receives each step's events.
        max_batch: The most rows generating at once (`serving.max_batch`).
        join_ratio: Rows waiting beside a running batch join it once they number this
            share of its rows (`serving.join_ratio`)...
        join_after_steps: ...or once the first of them has waited this many decoding
            steps (`serving.join_after_steps`).
        on_step: Receives the number of rows of each decoding step.
        prefix_min_tokens: The shortest shared prompt start worth caching
            (`serving.prefix_min_tokens`); 0 caches none.
    """

    def __init__(self, emit: Emit, *, max_batch: int, join_ratio: float,
                 join_after_steps: int, on_step: Callable[[int], None] | None = None,
                 prefix_min_tokens: int = 0) -> None:
        self.emit, self.max_batch, self.on_step = emit, max_batch, on_step
        self.join_ratio, self.join_after_steps = join_ratio, join_after_steps
        self.prefix_min_tokens = prefix_min_tokens
        self.inbox: queue.SimpleQueue[tuple[Row, ...] | None] = queue.SimpleQueue()
        self.waiting: deque[Row] = deque()
        self.waited = 0  # decoding steps the first waiting row has waited
        self.thread = threading.Thread(target=self._run, name="ftllm-generate", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> None:
        self.inbox.put((row,))

    def submit_together(self, rows: list[Row]) -> None:
        """Queue `rows` as one arrival: the loop takes all of them in one step."""
        self.inbox.put(tuple(rows))

    def cancel(self, row: Row) -> None:
        """The client left: the row is dropped at the next step."""
        row.done = True

    def retire(self, loaded: LoadedModel) -> None:
        """The service dropped `loaded`: nothing to do, its rows hold it until they end."""

    def close(self) -> None:
        self.inbox.put(None)

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _take(self, block: bool) -> bool:
        """Move rows from the inbox to `waiting`; False once closed."""
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self.waiting.extend(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _run(self) -> None:
        import torch

        torch.set_num_threads(cpu_threads())
        batch: _Batch | None = None
        with torch.inference_mode():
            while self._take(block=batch is None and not self.waiting):
                if batch is None:
                    while self.waiting and self.waiting[0].done:  # clients that left while waiting
                        self.waiting.popleft()
                    if not self.waiting:
                        continue
                    batch = _Batch(self.waiting[0].model, self.prefix_min_tokens)
                tokens = Tokens(batch.loaded.tokenizer, batch.loaded.end_ids)
                try:
                    self._step(batch, tokens)
                except Exception as exc:  # a failed step must answer its clients, not hang them
                    log.exception("generation failed")
                    failed = batch.rows + [row for row in batch.joining if row not in batch.rows]
                    tokens.fail(failed, f"generation failed: {type(exc).__name__}: {exc}")
                    batch.rows = []
                self._emit(tokens.events)
                if not batch.rows:
                    batch = None
        tokens = Tokens(None)
        tokens.fail([*self.waiting, *(batch.rows if batch else [])], "the service is shutting down")
        self._emit(tokens.events)

    def _emit(self, events) -> None:
        if not events:
            return
        try:
            self.emit(events)
        except Exception as exc:  # nobody to deliver to (the service is gone): generation goes on
            log.warning("could not deliver %d events: %s: %s", len(events), type(exc).__name__, exc)

    def _admit(self, batch: _Batch) -> list[Row]:
        """Rows from `waiting` that join `batch` now, in order: those of the batch's model
        (a row for another model waits for the batch to drain), and only into an empty
        batch where the model's cache cannot take rows mid-way."""
        if not batch.can_admit():
            return []
        # A prefill is a forward pass of its own, about as costly as a decoding step of the
        # whole batch: rows join in groups, but none waits more than join_after_steps steps.
        enough = math.ceil(len(batch.rows) * self.join_ratio)
        if batch.rows and len(self.waiting) < enough and self.waited < self.join_after_steps:
            self.waited += bool(self.waiting)
            return []
        self.waited = 0
        admitted = []
        while self.waiting and len(batch.rows) + len(admitted) < self.max_batch:
            row = self.waiting[0]
            if not row.done and row.model is not batch.loaded:
                break
            self.waiting.popleft()
            if not row.done:  # else its client left while it waited
                admitted.append(row)
        return admitted

    def _step(self, batch: _Batch, tokens: Tokens) -> None:
        """Admit the rows that can join (prefill), then one decoding step for every row."""
        admitted = batch.joining = self._admit(batch)
        if admitted:
            first = _sample(batch.prefill(admitted), admitted)
            tokens.add(admitted, first.tolist())
            batch.add_pending(first)
            batch.drop_ended()
        if batch.rows:
            if self.on_step is not None:
                self.on_step(len(batch.rows))
            batch.pending = _sample(batch.decode(), batch.rows)
            tokens.add(batch.rows, batch.pending.tolist())
            batch.drop_ended()


def _sample(logits, rows: list[Row]):
    import torch

    if all(row.temperature == 0 for row in rows):  # the common case: no tensors of settings to build
        return logits.argmax(-1)
    temperature = torch.tensor([row.temperature for row in rows], device=logits.device)
    top_p = torch.tensor([row.top_p for row in rows], device=logits.device)
    generators = [row.generator(logits.device) if row.temperature > 0 else None for row in rows]
    return sample(logits, temperature, top_p, generators if any(g is not None for g in generators) else None)
