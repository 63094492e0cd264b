"""transformers' own continuous batching (`ContinuousBatchingManager`, paged attention) behind
the `serving.decoding.DecodingLoop` protocol, chosen with `serving.engine: transformers`.

The engine process (`serving.engine_process.engine_main`) drives either loop the same way:
rows arrive with `submit`, a client that leaves is `cancel`led, a model the service dropped
is `retire`d, and every row ends with the same events: ("delta", text) while it streams,
then ("end", finish_reason, completion_tokens) or ("error", message). The tokens the library
generates go through the same `serving.decoding.Tokens` as the own loop's, so stop strings,
the end-of-turn tokens (end of sequence and padding, as the own engine stops on), held-back
partial stop strings and UTF-8 characters, and the count of completion tokens are the own
engine's.

One manager per model and decoding mode: greedy rows (temperature 0) run in a manager with
`do_sample=False`, sampled rows in one that samples with per-request temperature and top_p
(the library's `do_sample` is per manager, not per request), created at the first sampled
row. Each manager has a paged KV cache of its own, sized for `max_batch` rows of the
model's whole context (on a CPU the library would size it from memory otherwise: 7 GB for
a 3 MB model), and decodes at most `max_batch` rows at once.

What the own engine has and this one does not: `join_ratio` and `join_after_steps` (the
library schedules prefills itself), the prefix cache of `prefix_min_tokens` (the library
shares KV blocks between prompts instead, on when `prefix_min_tokens` is above 0), the
rows per decoding step (`ftllm_batch_size` on /metrics stays empty), and a row's `seed`
(the library samples every request from one random state, with no generator per request).

Every manager delivers its outputs into one queue that a thread of this engine reads (the
library's `get_result` reads one manager's queue); request ids are the rows' ids.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from typing import Any, Callable

from serving.decoding import CLOSE_TIMEOUT_SECONDS, Emit, Event, LoadedModel, Row, Tokens, cpu_threads

log = logging.getLogger("ftllm.serving")

# Tokens of a KV cache page, and the most tokens one forward pass of the library computes
# (longer prompts are prefilled in parts).
PAGE_SIZE = 64
MAX_BATCH_TOKENS = 1024


class LibraryEngine:
    """The `DecodingLoop` protocol over transformers' `ContinuousBatchingManager`.

    Args:
        emit: Receives events, `[(row, event), ...]`, from this engine's thread.
        max_batch: The most rows decoding at once, per manager (`serving.max_batch`).
        prefix_min_tokens: Above 0, the library's KV block sharing is on.
        join_ratio, join_after_steps, on_step: The own engine's; not used here.
    """

    def __init__(self, emit: Emit, *, max_batch: int,
                 join_ratio: float = 0.5, join_after_steps: int = 4,
                 on_step: Callable[[int], None] | None = None, prefix_min_tokens: int = 0) -> None:
        self.emit, self.max_batch = emit, max_batch
        self.block_sharing = prefix_min_tokens > 0
        self.outputs: queue.Queue = queue.Queue()
        self.rows: dict[str, Row] = {}
        self.seen: dict[str, int] = {}  # tokens of each row already handled
        self.managers: dict[tuple[int, bool], tuple[LoadedModel, Any]] = {}  # (id(model), sampled) -> manager
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="ftllm-generate", daemon=True)
        self.thread.start()

    # -- the engine process's side -----------------------------------------------------

    def submit(self, row: Row) -> None:
        rid = str(row.id)
        sampled = row.temperature > 0
        kwargs = {"temperature": float(row.temperature), "top_p": float(row.top_p)} if sampled else {}
        try:
            with self.lock:
                self.rows[rid] = row
                self.seen[rid] = 0
                added = None
                for _attempt in range(2):  # a manager that stopped (it failed) is replaced once
                    manager = self._manager(row.model, sampled)
                    added = manager.add_request(row.prompt_ids, request_id=rid, max_new_tokens=row.max_new,
                                                streaming=row.stream or bool(row.stops),
                                                eos_token_id=_end_tokens(row.model), **kwargs)
                    if added is not None:
                        break
                    self._stop(self.managers.pop((id(row.model), sampled))[1], block=False)
                if added is None:
                    raise RuntimeError("the library's engine does not take requests")
        except Exception as exc:
            log.exception("submitting to transformers' continuous batching failed")
            self._forget(rid)
            self._emit([(row, ("error", f"generation failed: {type(exc).__name__}: {exc}"))])

    def cancel(self, row: Row) -> None:
        """The client left: stop generating for `row`."""
        row.done = True
        rid = str(row.id)
        with self.lock:
            if self._forget(rid) is not None:
                for (key, _sampled), (_model, manager) in self.managers.items():
                    if key == id(row.model):
                        manager.cancel_request(rid)

    def retire(self, loaded: LoadedModel) -> None:
        """The service dropped `loaded`: its managers finish their rows, then stop.

        The library's `stop(block=False)` clears the manager's batch processor at once, while
        its thread is still flushing the rows in flight, which then fail ("Tried to perform a
        generation step before the batch processor was initialized"). So each is stopped
        blocking, on a thread of its own: the rows finish, and this engine's thread goes on.
        """
        with self.lock:
            managers = [self.managers.pop(key)[1] for key in [k for k in self.managers if k[0] == id(loaded)]]
        for manager in managers:
            # No timeout: a row in flight may run to its max_tokens; the service no longer sends any.
            threading.Thread(target=self._stop, args=(manager, True), kwargs={"timeout": None}, name="ftllm-retire",
                             daemon=True).start()

    def close(self) -> None:
        with self.lock:
            managers = [manager for _model, manager in self.managers.values()]
            self.managers.clear()
        for manager in managers:
            self._stop(manager, block=True, hard=True)
        self.outputs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    # -- managers ------------------------------------------------------------------------

    def _manager(self, loaded: LoadedModel, sampled: bool):
        key = (id(loaded), sampled)
        if key not in self.managers:
            self.managers[key] = (loaded, self._start(loaded, sampled))
        return self.managers[key][1]

    def _start(self, loaded: LoadedModel, sampled: bool):
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        torch.set_num_threads(cpu_threads())
        tok = loaded.tokenizer
        # Sampling settings that are neither None nor 1.0 make the library build the
        # temperature and top_p processors; each request then brings its own values.
        generation = (GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5, top_k=None)
                      if sampled else GenerationConfig(do_sample=False))
        generation.eos_token_id = _end_tokens(loaded)
        generation.pad_token_id = tok.pad_token_id
        blocks = math.ceil(self.max_batch * loaded.context_length / PAGE_SIZE)
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE, num_blocks=blocks, max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=self.max_batch, allow_block_sharing=self.block_sharing,
            per_request_processors=sampled, drop_unsupported_processors=False)
        manager = loaded.model.init_continuous_batching(generation_config=generation,
                                                        continuous_batching_config=config)
        manager.output_router.output_queue = self.outputs  # one queue for every manager
        manager.start()
        return manager

    @staticmethod
    def _stop(manager, block: bool, hard: bool = False, timeout: float | None = CLOSE_TIMEOUT_SECONDS) -> None:
        try:
            manager.stop(block=block, timeout=timeout if block else None, hard_stop=hard)
        except Exception as exc:
            log.warning("stopping a continuous batching manager failed: %s: %s", type(exc).__name__, exc)

    # -- outputs ---------------------------------------------------------------------------

    def _forget(self, rid: str) -> Row | None:
        self.seen.pop(rid, None)
        return self.rows.pop(rid, None)

    def _run(self) -> None:
        while True:
            output = self.outputs.get()
            if output is None:
                break
            batch = [output]
            while True:  # everything already delivered goes out together
                try:
                    more = self.outputs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.outputs.put(None)
                    break
                batch.append(more)
            events: list[tuple[Row, Event]] = []
            for output in batch:
                events += self._handle(output)
            self._emit(events)
        with self.lock:
            rows = list(self.rows.values())
            self.rows.clear()
            self.seen.clear()
        self._emit([(row, ("error", "the service is shutting down")) for row in rows])

    def _handle(self, output) -> list[tuple[Row, Event]]:
        """The events of one of the library's outputs (all the tokens of its request so far)."""
        rid = output.request_id
        with self.lock:
            row = self.rows.get(rid)
            if row is None:  # cancelled, or already ended
                return []
            start = self.seen[rid]
            self.seen[rid] = len(output.generated_tokens)
        tokens = Tokens(row.model.tokenizer, row.model.end_ids)
        if output.error is not None:
            tokens.fail([row], f"generation failed: {output.error}")
        else:
            for token in output.generated_tokens[start:]:
                if row.done:
                    break
                tokens.add([row], [token])
            if output.is_finished() and not row.done:  # ended by the library (the context is full)
                tokens.end(row, "length")
        if row.done:
            with self.lock:
                self._forget(rid)
                if not output.is_finished():  # a stop string ended it: the library stops too
                    for (key, _sampled), (_model, manager) in self.managers.items():
                        if key == id(row.model):
                            manager.cancel_request(rid)
        return tokens.events

    def _emit(self, events: list[tuple[Row, Event]]) -> None:
        if not events:
            return
        try:
            self.emit(events)
        except Exception as exc:  # nobody to deliver to (the service is gone)
            log.warning("could not deliver %d events: %s: %s", len(events), type(exc).__name__, exc)


def _end_tokens(loaded: LoadedModel) -> list[int]:
    """The tokens that end a row in `Tokens`: end of sequence, padding and the model's other end tokens."""
    return sorted(Tokens(loaded.tokenizer, loaded.end_ids).eos) or [-1]  # -1: none (the library's own spelling)
