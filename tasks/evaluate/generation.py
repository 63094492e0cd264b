"""Prompting and generation for evaluation: few-shot prompts, batched greedy generation, perplexity.
"""

from __future__ import annotations

import math
import random
import time

from tasks.environment import ThreadShare
from tasks.errors import RunFailed
from tasks.model.chat import encode_chats
from tasks.model.decoding import decode_generation, end_token_ids

Example = dict  # one canonical example: {"messages": [...], ...}

SHOT_SEED = 0


def pick_few_shot(train: list[Example], k: int, seed: int = SHOT_SEED) -> list[Example]:
    """`k` train examples drawn deterministically (same train split and seed, same shots).

    Evaluation draws with `SHOT_SEED`, not `train.seed`: retrains that differ only in their
    training seed are compared with the same few-shot prompt (and reuse its scores).
    """
    if k == 0 or not train:
        return []
    return random.Random(seed).sample(train, min(k, len(train)))


def with_shots(messages: list[dict], shots: list[Example]) -> list[dict]:
    """Put the shots' question/answer turns (tool calls and their results too) after the system message and before the question."""
    if not shots:
        return messages
    head = [m for m in messages[:1] if m["role"] == "system"]
    turns = [m for s in shots for m in s["messages"] if m["role"] in ("user", "assistant", "tool")]
    return head + turns + messages[len(head):]


def assistant_nll(
    model, tokenizer, conversations: list[list[dict]], batch_size: int, system_message: str = "auto"
) -> tuple[list[float], list[int]]:
    """Per conversation, the summed cross-entropy (nats) over its last answer's tokens and their count.

    The answer's tokens are those training marks (`encode_chats`: the assistant's text and
    its end-of-turn token) in the conversation's last assistant turn: the answer being
    scored, without its reasoning trace (context, where the template writes it, as
    evaluation scores every answer without its trace; so a template that drops traces,
    trained with `train.train_reasoning: false`, is scored too). Earlier assistant turns (a few-shot prompt's shots, a multi-turn example's past
    answers) are context, as in the prompt that generation completes. Kept per example so
    that the gate can resample examples to put a confidence interval on perplexity: the
    token-weighted mean NLL of any resample is sum(nll) / sum(tokens) of its examples.
    """
    import torch
    import torch.nn.functional as F

    sums: list[float] = []
    counts: list[int] = []
    device = next(model.parameters()).device
    for start in range(0, len(conversations), batch_size):
        encoded = encode_chats(tokenizer, conversations[start : start + batch_size], system_message=system_message,
                               train_reasoning=False)
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        labels = torch.full((len(encoded), width), -100)
        attn = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            scored = last_answer(e.loss_mask)
            labels[i, :n] = torch.tensor([t if m else -100 for t, m in zip(e.input_ids, scored)])
            attn[i, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        target = labels[:, 1:].to(device)
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
        sums += loss.sum(dim=1).tolist()
        counts += (target != -100).sum(dim=1).tolist()
    return sums, counts


def last_answer(mask: list[int] | list[bool]) -> list[bool]:
    """`mask` (training's loss mask) kept on its last run of marked tokens only: the last answer."""
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


def perplexity(nll: list[float], tokens: list[int], tokenizer=None) -> float:
    """exp of the mean cross-entropy over assistant tokens, token-weighted across examples.

    Raises:
        RunFailed: no assistant token was scored (a perplexity of 1.0 over nothing would pass any gate).
    """
    count = sum(tokens)
    if not count:
        raise RunFailed(
            f"evaluation scored 0 assistant tokens over {len(tokens)} examples: the chat template of "
            f"{getattr(tokenizer, 'name_or_path', 'the model')} marks none (check the data with `ftllm validate`)"
        )
    return math.exp(sum(nll) / count)


def generate_batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int):
    """Greedy completions of `prompts`, with per-example latency (ms) and generated token counts.

    The completions are decoded as the service decodes them (`decode_generation`): special
    tokens dropped but for the markers of calls and reasoning, so the same calls are parsed.
    """
    import torch

    device = next(model.parameters()).device
    # The tokenizer's end and the model's own (Llama 3.1 ends a call at <|eom_id|>): where the service stops.
    ends = sorted(({tokenizer.eos_token_id} | end_token_ids(model)) - {None}) or None
    tokenizer.padding_side = "left"
    outputs, latencies, lengths = [], [], []
    threads = ThreadShare()
    for start in range(0, len(prompts), batch_size):
        threads.adjust()
        chunk = prompts[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=ends, pad_token_id=tokenizer.pad_token_id,
            )
        elapsed_ms = (time.perf_counter() - t0) * 1000
        new = out[:, enc["input_ids"].shape[1]:]
        outputs += [decode_generation(tokenizer, row.tolist()) for row in new]
        lengths += [int((row != tokenizer.pad_token_id).sum()) for row in new]
        # Examples in one batch finish together: each waited the whole batch.
        latencies += [elapsed_ms] * len(chunk)
    return [o.strip() for o in outputs], latencies, lengths
