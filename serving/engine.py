"""Continuous batching in a process of its own: one decoding loop that completions join
and leave at any step.

The module is long but cohesive: the batch's KV cache, the rows' admission and removal,
sampling and the process protocol change together, and splitting them would put one data
structure's invariants in several files.

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

Rows carry their own sampling settings (greedy at temperature 0, else temperature and
top_p per row), so requests with different settings share steps. A row's events are
("delta", text) while it streams (a row that does not stream gets its whole text in one
delta), then ("end", finish_reason, completion_tokens) or ("error", message); each step's
events go out together.

`EngineProcess` runs the loop in a spawned process and talks to it over a pipe, so the
service's event loop (HTTP, validation, templating) and the decoding loop do not share a
GIL: in one process each stalled the other, and concurrent clients got a fraction of what
the loop alone served.

Why a loop of its own beside transformers' continuous batching (`model.init_continuous_batching()`,
paged attention): on this project's CPU machines the library sized its KV cache from memory
(gigabytes for a model of megabytes), and with a bounded cache it served fewer completions
than this loop to the same closed loop of clients; it also has no hook for stop strings or
per-row streaming decisions. The project keeps its own code beside a library's only while
a side-by-side benchmark shows it ahead by a set margin: `ftllm bench serve --peer` (the
service against `transformers serve --continuous-batching`) and `benchmarks/bench_engines.py`
(this loop against the library's, inside the service) measure it, and the figures, dated,
with the decision, are in `benchmarks/results/`. `serving.engine: transformers` runs the library's
loop in this engine process instead (`serving.library_engine`, same interface: `submit`,
`cancel`, `retire`, `close`), with a bounded cache and this module's `_Tokens` for stop
strings, so the two can be measured on the machine that serves.

Each row names the model it runs on. Rows of one model share steps; when rows for a newer
model arrive (a hot swap), they wait until the running batch has drained (at most
`max_tokens` steps) and then start on it, so nothing in flight is dropped.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import multiprocessing
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tasks.environment import environment

log = logging.getLogger("ftllm.serving")

# The context of a model whose config does not say (no `max_position_embeddings`): what
# most small decoder models of the transformers library are built with.
DEFAULT_CONTEXT_LENGTH = 2048
# How long closing waits for the decoding loop to answer its rows and stop: longer than one
# step of any model this serves takes, so rows in flight get their shutdown error.
CLOSE_TIMEOUT_SECONDS = 30


@dataclass
class Prefix:
    """The start shared by recent prompts, and its KV cache: per layer (keys, values), each
    of shape [1, heads, len(ids), head_dim]."""

    ids: list[int]
    layers: list[tuple[Any, Any]]


@dataclass(eq=False)
class LoadedModel:
    """A model and its tokenizer, ready to generate; `prefix` is the engine's (see `Prefix`)."""

    model: Any
    tokenizer: Any
    context_length: int
    prefix: Prefix | None = None


def load_model_dir(model_dir: Path) -> LoadedModel:
    """Load a model folder written by `tasks.train.finetune` (safetensors only, no remote code),
    on the GPU in bfloat16 when there is one."""
    import torch

    from tasks.model.loading import load_trained

    cuda = torch.cuda.is_available()
    model, tokenizer, _info = load_trained(Path(model_dir), dtype=torch.bfloat16 if cuda else None,
                                           device="cuda" if cuda else None)
    if hasattr(model, "merge_and_unload"):
        # Serving never trains: folding the LoRA weights into the base saves the adapter's
        # extra matmuls on every token (about half the time of a small model's step).
        model = model.merge_and_unload()
        model.eval()
    return LoadedModel(model, tokenizer, context_length(model.config))


def context_length(config) -> int:
    """The most tokens (prompt and answer) the model takes."""
    return int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_LENGTH)


@dataclass(eq=False)
class Row:
    """One completion in the decoding loop: its prompt, limits, sampling settings and model,
    and what it generated. `done` set from elsewhere (the client left) drops it at the next step."""

    id: int
    prompt_ids: list[int]
    max_new: int
    temperature: float  # 0: greedy
    top_p: float
    stops: list[str]
    stream: bool
    model: LoadedModel
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    done: bool = False
    finish: str = "length"


def cpu_threads() -> int:
    """Intra-op threads for CPU generation: `FTLLM_TORCH_THREADS`, else half the cores.

    The service's event loop, tokenization and HTTP stack need a core of their own: with
    every core given to torch, its spinning worker threads compete with them, and on two
    cores one step of the tiny model went from 7 ms to 180 ms.
    """
    return environment().torch_threads or max(1, (os.cpu_count() or 2) // 2)


def sample(logits, temperature, top_p):
    """Next token per row: greedy where `temperature` is 0, else sampled from the
    temperature-scaled distribution cut to its `top_p` nucleus (row-wise tensors)."""
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


class _Tokens:
    """Turns each step's tokens into text and events for the rows."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.eos = {getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)} - {None}
        self.events: list[tuple[Row, tuple]] = []

    def add(self, rows: list[Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if row.done:  # the client left: no more events
                continue
            if token in self.eos:
                row.done, row.finish = True, "stop"
            else:
                row.ids.append(token)
                if len(row.ids) >= row.max_new:
                    row.done, row.finish = True, "length"
            if row.done or row.stream or row.stops:
                self._text(row)
            if row.done:
                self.events.append((row, ("end", row.finish, len(row.ids))))

    def _text(self, row: Row) -> None:
        text = self.tok.decode(row.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
        if cut >= 0:
            row.done, row.finish, text = True, "stop", text[:cut]
        end = len(text)
        if not row.done:
            if not row.stream:
                return
            # Hold back what could be the start of a stop string or half a UTF-8 character.
            end -= max((len(s) - 1 for s in row.stops), default=0)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
        if end > row.emitted:
            self.events.append((row, ("delta", text[row.emitted:end])))
            row.emitted = end

    def fail(self, rows: list[Row], message: str) -> None:
        for row in rows:
            row.done = True
            self.events.append((row, ("error", message)))


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

    def __init__(self, emit: Callable[[list[tuple[Row, tuple]]], None], *, max_batch: int, join_ratio: float,
                 join_after_steps: int, on_step: Callable[[int], None] | None = None,
                 prefix_min_tokens: int = 0) -> None:
        self.emit, self.max_batch, self.on_step = emit, max_batch, on_step
        self.join_ratio, self.join_after_steps = join_ratio, join_after_steps
        self.prefix_min_tokens = prefix_min_tokens
        self.inbox: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self.waiting: deque[Row] = deque()
        self.waited = 0  # decoding steps the first waiting row has waited
        self.thread = threading.Thread(target=self._run, name="ftllm-generate", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> None:
        self.inbox.put(row)

    def cancel(self, row: Row) -> None:
        """The client left: the row is dropped at the next step."""
        row.done = True

    def retire(self, loaded: LoadedModel) -> None:
        """The service dropped `loaded`: nothing to do, its rows hold it until they end."""

    def close(self) -> None:
        self.inbox.put(None)

    def _take(self, block: bool) -> bool:
        """Move rows from the inbox to `waiting`; False once closed."""
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self.waiting.append(item)
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
                tokens = _Tokens(batch.loaded.tokenizer)
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
        tokens = _Tokens(None)
        tokens.fail([*self.waiting, *(batch.rows if batch else [])], "the service is shutting down")
        self._emit(tokens.events)

    def _emit(self, events: list[tuple[Row, tuple]]) -> None:
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

    def _step(self, batch: _Batch, tokens: _Tokens) -> None:
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
    return sample(logits, temperature, top_p)


# ---------------------------------------------------------------------------------------
# The engine process and the service's end of its pipe
# ---------------------------------------------------------------------------------------


def _engine_main(conn, max_batch: int, join_ratio: float, join_after_steps: int, prefix_min_tokens: int = 0,
                 kind: str = "own") -> None:
    """The engine process: load models and take rows from `conn`; send their events back.

    `max_batch`, `join_ratio`, `join_after_steps` and `prefix_min_tokens` are `Engine`'s;
    `kind` is `serving.engine`: "own" (`Engine`) or "transformers"
    (`serving.library_engine.LibraryEngine`, the same interface).

    Messages in: ("load", key, model_dir), ("drop", key), ("row", id, key, prompt_ids,
    max_new, temperature, top_p, stops, stream), ("cancel", id), ("close",). Messages out:
    ("loaded", key, context_length, error), ("events", [(id, event), ...], step_sizes).
    A model dropped stays in memory while rows of it still generate (they hold it).
    """
    send_lock = threading.Lock()
    models: dict[str, LoadedModel] = {}
    rows: dict[int, Row] = {}
    steps: list[int] = []

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def emit(events: list[tuple[Row, tuple]]) -> None:
        for row, event in events:
            if event[0] != "delta":
                rows.pop(row.id, None)
        sizes = steps[:]
        del steps[: len(sizes)]
        send(("events", [(row.id, event) for row, event in events], sizes))

    def load(key: str, model_dir: str) -> None:
        try:
            models[key] = load_model_dir(Path(model_dir))
            # The libraries and the weights stay: kept out of the collector's sight, a full
            # collection does not stall every row's decoding for hundreds of milliseconds.
            gc.freeze()
            send(("loaded", key, models[key].context_length, None))
        except Exception as exc:
            log.exception("loading %s failed", model_dir)
            send(("loaded", key, 0, f"{type(exc).__name__}: {exc}"))

    loop: type = Engine
    if kind == "transformers":
        from serving.library_engine import LibraryEngine

        loop = LibraryEngine
    engine = loop(emit, max_batch=max_batch, join_ratio=join_ratio, join_after_steps=join_after_steps,
                  on_step=steps.append, prefix_min_tokens=prefix_min_tokens)
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the service is gone
                break
            what = message[0]
            if what == "row":
                _, rid, key, prompt_ids, max_new, temperature, top_p, stops, stream = message
                if key not in models:
                    send(("events", [(rid, ("error", f"model {key} is not loaded in the engine"))], []))
                    continue
                rows[rid] = Row(rid, prompt_ids, max_new, temperature, top_p, stops, stream, models[key])
                engine.submit(rows[rid])
            elif what == "cancel":
                if message[1] in rows:
                    engine.cancel(rows[message[1]])
            elif what == "load":  # in a thread: rows keep flowing while a model loads
                threading.Thread(target=load, args=message[1:], name="ftllm-load", daemon=True).start()
            elif what == "drop":
                dropped = models.pop(message[1], None)
                if dropped is not None:
                    engine.retire(dropped)
            elif what == "close":
                break
    finally:
        engine.close()
        engine.thread.join(CLOSE_TIMEOUT_SECONDS)


@dataclass(eq=False)
class Completion:
    """The service's side of one row: what to send to the engine, and where its events go."""

    prompt: str
    prompt_ids: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: list[str]
    stream: bool
    model_key: str
    version: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    id: int = -1
    finish: str = "length"
    completion_tokens: int = 0
    ended: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class EngineError(RuntimeError):
    """The engine could not load a model, or is not running."""


class EngineProcess:
    """Starts the engine process and is the service's end of its pipe.

    `load` blocks until the model is in the engine (call it from a thread); `submit`
    sends a completion, whose events then arrive on its own event loop's queue. If the
    process dies, every completion in flight gets an ("error", ...) event and `alive`
    turns False.

    `max_batch`, `join_ratio`, `join_after_steps` and `prefix_min_tokens` are `Engine`'s
    (plain values: they travel to a spawned process); `engine` is `serving.engine`, the
    decoding loop the process runs ("own" or "transformers"); `on_steps` receives the rows of each decoding step, a
    list per message from the engine.
    """

    def __init__(self, *, max_batch: int, join_ratio: float, join_after_steps: int,
                 on_steps: Callable[[list[int]], None] | None = None, prefix_min_tokens: int = 0,
                 engine: str = "own") -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the service has threads
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_engine_main,
                                       args=(child, max_batch, join_ratio, join_after_steps, prefix_min_tokens, engine),
                                       name="ftllm-engine", daemon=True)
        self.process.start()
        child.close()
        self.on_steps = on_steps
        self.alive = True
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._keys = itertools.count(1)
        self._in_flight: dict[int, Completion] = {}
        self._loads: dict[str, Future] = {}
        self._reader = threading.Thread(target=self._read, name="ftllm-engine-reader", daemon=True)
        self._reader.start()

    def _send(self, message: tuple) -> None:
        if not self.alive:
            raise EngineError("the generation engine is not running")
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise EngineError(f"the generation engine is not running ({exc})") from None

    def load(self, model_dir: Path, timeout: float | None = None) -> tuple[str, int]:
        """Load a model folder into the engine: (key for completions, context length)."""
        key = f"m{next(self._keys)}"
        future: Future = Future()
        self._loads[key] = future
        self._send(("load", key, str(model_dir)))
        context, error = future.result(timeout)
        if error:
            raise EngineError(f"the engine could not load {model_dir}: {error}")
        return key, context

    def drop(self, key: str) -> None:
        if self.alive:
            self._send(("drop", key))

    async def submit(self, completion: Completion) -> None:
        completion.id = next(self._ids)
        self._in_flight[completion.id] = completion
        try:
            self._send(("row", completion.id, completion.model_key, completion.prompt_ids, completion.max_new,
                        completion.temperature, completion.top_p, completion.stops, completion.stream))
        except EngineError:
            self._in_flight.pop(completion.id, None)
            raise

    def cancel(self, completion: Completion) -> None:
        """The client went away: stop generating for it."""
        if self._in_flight.pop(completion.id, None) is not None and self.alive:
            try:
                self._send(("cancel", completion.id))
            except EngineError:
                pass

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "events":
                self._deliver(message[1])
                if self.on_steps is not None and message[2]:
                    self.on_steps(message[2])
            elif message[0] == "loaded":
                future = self._loads.pop(message[1], None)
                if future is not None:
                    future.set_result((message[2], message[3]))
        self.alive = False
        code = self.process.exitcode
        log.error("the generation engine stopped (exit code %s)", code)
        for future in list(self._loads.values()):
            future.set_result((0, "the engine stopped"))
        self._deliver([(cid, ("error", "the generation engine stopped")) for cid in list(self._in_flight)])

    def _deliver(self, events: list[tuple[int, tuple]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Completion, tuple]]] = {}
        for cid, event in events:
            completion = self._in_flight.get(cid)
            if completion is None:  # cancelled
                continue
            if event[0] != "delta":
                del self._in_flight[cid]
            by_loop.setdefault(completion.loop, []).append((completion, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_events, items)
            except RuntimeError:  # that loop is closed: nobody is waiting
                pass

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        try:
            self._send(("close",))
        except EngineError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()


def _put_events(items: list[tuple[Completion, tuple]]) -> None:
    for completion, event in items:
        completion.queue.put_nowait(event)
