"""The seam between the engine process and its decoding loops.

The engine process (`serving.engine_process`) drives a decoding loop through the
`DecodingLoop` protocol, and two loops implement it: the project's own continuous batcher
(`serving.engine.Engine`) and transformers' continuous batching
(`serving.library_engine.LibraryEngine`, `serving.engine: transformers`). Both take the
same `Row`s and report the same `Event`s, and both turn tokens into text with `Tokens`, so
stop strings, streaming and token counts cannot differ between them. Neither loop imports
the other: each depends only on this module.

A row's events: `("delta", text)` while it streams (a row that does not stream gets its
whole text in one delta), then `("end", finish_reason, completion_tokens)` or
`("error", message)`. The finish reason is "stop" (an end-of-turn token), `STOP_SEQUENCE` (a
stop string the request gave: "stop" to the client, but no call is cut short by the model)
or "length".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from tasks.environment import environment, usable_cpus
from tasks.model.decoding import decode_generation, end_token_ids

STOP_SEQUENCE = "stop_sequence"  # the finish of a row a request's stop string ended

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
    end_ids: frozenset[int] = frozenset()  # the model's other end tokens (`end_token_ids`): a row ends at them


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
    return LoadedModel(model, tokenizer, context_length(model.config), end_ids=end_token_ids(model))


def context_length(config) -> int:
    """The most tokens (prompt and answer) the model takes."""
    return int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_LENGTH)


@dataclass(eq=False)
class Row:
    """One completion in the decoding loop: its prompt, limits, sampling settings and model,
    and what it generated. `done` set from elsewhere (the client left) drops it at the next step.

    A row with a `seed` draws its tokens from a random generator of its own, so its draws
    do not depend on the rows beside it (its logits still may, in their last bits: OpenAI's
    seed is best effort too).
    """

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
    seed: int | None = None
    _generator: Any = field(default=None, repr=False)

    def generator(self, device) -> Any:
        """The row's own `torch.Generator` on `device` (made at its first draw), or None without a seed."""
        if self.seed is None:
            return None
        if self._generator is None:
            import torch

            # torch takes seeds of 64 bits; JSON's integers are unbounded and may be negative.
            self._generator = torch.Generator(device=device).manual_seed(self.seed % 2**64)
        return self._generator



def continuation_logps(loaded: LoadedModel, context: list[int], continuations: list[list[int]]) -> list[float]:
    """The summed log-probability of each continuation's tokens after `context` under `loaded`'s
    model: how likely the model is to write it (`tool_choice: required` ranks the functions by it).

    One forward pass per continuation over the context and it, keeping the logits of the
    continuation's positions only: memory grows with the prompt's length times the hidden
    size, not times the vocabulary (eight names after 250 tokens took 3.4 GiB with every
    position's logits in Qwen's vocabulary, 0.03 GiB so after 8,000: benchmarks/
    bench_choice_scoring.py). No KV cache is kept across passes: beside the library's
    continuous batching a cached pass scored differently. A plain forward pass beside the
    decoding loop, which it does not touch.
    """
    import torch

    device = next(loaded.model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        for ids in continuations:
            tokens = torch.tensor([[*context, *ids[:-1]]], device=device)
            logits = loaded.model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False,
                                  logits_to_keep=len(ids)).logits[0]
            logps = logits.float().log_softmax(-1)
            scores.append(float(logps.gather(1, torch.tensor(ids, device=device)[:, None]).sum()))
    return scores


# What a row reports; see the module docstring.
Delta = tuple[Literal["delta"], str]
End = tuple[Literal["end"], str, int]
Failure = tuple[Literal["error"], str]
Event = Delta | End | Failure
# Receives events, `[(row, event), ...]`, from a decoding loop's thread.
Emit = Callable[[list[tuple[Row, Event]]], None]


class DecodingLoop(Protocol):
    """A decoding loop: rows arrive with `submit` and leave with an "end" or "error" event.

    The loop runs in a thread of its own and reports through the `emit` it was built with;
    each method returns at once.
    """

    def submit(self, row: Row) -> None:
        """Start generating `row`."""

    def cancel(self, row: Row) -> None:
        """The client left: stop generating `row`, without further events."""

    def retire(self, loaded: LoadedModel) -> None:
        """The service dropped `loaded`: free it once the rows generating on it have ended."""

    def close(self) -> None:
        """Stop: every row still generating or waiting gets an "error" event."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the loop's thread to end after `close`."""


class LoopFactory(Protocol):
    """How the engine process builds a loop: the settings of `serving:` it takes.

    `join_ratio` and `join_after_steps` are the own loop's admission settings, which a loop
    that schedules its own prefills ignores; `on_step` receives the rows of each decoding
    step, where the loop knows them.
    """

    def __call__(self, emit: Emit, *, max_batch: int, join_ratio: float, join_after_steps: int,
                 on_step: Callable[[int], None] | None = None, prefix_min_tokens: int = 0) -> DecodingLoop: ...


def cpu_threads() -> int:
    """Intra-op threads for CPU generation: `FTLLM_TORCH_THREADS`, else half the usable CPUs.

    The service's event loop, tokenization and HTTP stack need a core of their own: with
    every core given to torch, its spinning worker threads compete with them, and on two
    cores one step of the tiny model went from 7 ms to 180 ms.
    """
    return environment().torch_threads or max(1, usable_cpus() // 2)


class Tokens:
    """Turns each step's tokens into text and events for the rows (both loops use it, so
    stop strings, held-back text and token counts are the same in either).

    The text is `decode_generation`'s, as evaluation reads it: special tokens dropped but for
    the markers that open calls and reasoning (Mistral v0.3's `[TOOL_CALLS]` is one), so a
    call the model writes unforced is parsed as a call, streamed or not.
    """

    def __init__(self, tokenizer, end_ids: frozenset[int] = frozenset()) -> None:
        self.tok = tokenizer
        self.eos = ({getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None)} - {None}) | end_ids
        self.events: list[tuple[Row, Event]] = []

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
                self.text(row)
            if row.done:
                self.events.append((row, ("end", row.finish, len(row.ids))))

    def text(self, row: Row) -> None:
        """The row's new text as a delta event (all of it once the row ends), cut at a stop string."""
        text = decode_generation(self.tok, row.ids)
        cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
        if cut >= 0:
            row.done, row.finish, text = True, STOP_SEQUENCE, text[:cut]
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

    def end(self, row: Row, finish: str) -> None:
        """End `row` from outside the token stream (the library stopped it): its last text and its end."""
        row.done, row.finish = True, finish
        self.text(row)
        self.events.append((row, ("end", row.finish, len(row.ids))))

    def fail(self, rows: list[Row], message: str) -> None:
        for row in rows:
            row.done = True
            self.events.append((row, ("error", message)))
