"""Preference tuning after supervised tuning (library side of the `preference` stage): KTO and sigmoid DPO.

The supervised model's LoRA adapter keeps training on the preference train split, and the
reference model is the supervised model itself, as in the DPO paper and TRL's trainers: the
same adapter is loaded a second time, frozen, under the name `reference` (TRL's "load the
adapter twice"), and the reference pass runs with that adapter active. The base weights
are in memory once; only the adapter (and the modules it trains in full) has a second copy.
The base model would be a poor reference: the supervised adapter learnt the task's format,
so every answer, right or wrong, already has a large log-ratio against the base, and for
the project's `tiny` base (random weights) the log-ratios and KTO's KL term would be
measured against noise. A QLoRA run needs nothing more: nothing is merged. The saved model
folder is the supervised folder's layout with the tuned adapter (rank and targets of the
supervised one) over the original base, so everything that loads a model folder loads it
as before, and a warm start (`train.init_from: champion`) continues it.

The evaluation's reward accuracy (`tasks.evaluate.preference`) uses another reference on
purpose: the base model (the candidate's adapter disabled), the same for a candidate and
its champion, whose supervised models differ, so their scores compare on one scale.

Every conversation renders through `tasks.model.chat.encode_chats`, as in supervised
tuning: multi-turn and tool-calling prompts are masked the same way, and only the last
answer's tokens count.

- `loss: kto`: KTO on desirable and undesirable answers (a pair counts as one of each);
  the KL estimate is the batch's mismatched prompt/answer combinations under the policy
  against the reference, detached; desirable and undesirable weights are balanced
  automatically (`balanced_weights`) unless set.
- `loss: sigmoid`: DPO on the pairs.

The decision to keep this loop rather than TRL's `KTOTrainer`/`DPOTrainer` rests on
`benchmarks/bench_preference.py` (figures in benchmarks/results/).

When the split holds fewer than `preference.min_examples` usable examples the stage does
nothing and writes only `preference.json` saying why: a run without ratings is the
supervised run of before. After tuning, `held_the_task` scores the tuned and the supervised
model on the val split: a tuned model that fails the gate's no-regression check against the
supervised one there is left out, and the supervised model is the run's candidate.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tasks.config import Params, PreferenceParams
from tasks.environment import ThreadShare
from tasks.errors import ConfigError
from tasks.files import read_jsonl
from tasks.model.scoring import Sequence, encode_sequences, sequence_logps
from tasks.train.checkpoints import Log

SUMMARY = "preference.json"
MODEL = "model"
REFERENCE = "reference"  # the frozen copy of the supervised adapter: the reference model


@dataclass(frozen=True)
class KTOItem:
    prompt: int  # index of the prompt, for the KL estimate's mismatched pairs
    seq: Sequence
    desirable: bool


@dataclass(frozen=True)
class PairItem:
    chosen: Sequence
    rejected: Sequence


def kto_items(tokenizer, rows: list[dict], system_message: str = "auto", train_reasoning: bool = True) -> list[KTOItem]:
    """KTO rows as they are, and each pair as its chosen (desirable) and rejected (undesirable) answer
    (`train_reasoning`: `train.train_reasoning`, an answer's trace is part of what is tuned)."""
    convs, labels, prompts = [], [], []
    for i, row in enumerate(rows):
        if "completion" in row:
            convs.append(_example(row, row["completion"]))
            labels.append(row["label"])
            prompts.append(i)
        else:
            convs += [_example(row, row["chosen"]), _example(row, row["rejected"])]
            labels += [True, False]
            prompts += [i, i]
    seqs = encode_sequences(tokenizer, convs, system_message, train_reasoning)
    return [KTOItem(p, s, d) for p, s, d in zip(prompts, seqs, labels) if any(s.mask)]


def _example(row: dict, answer: list[dict]) -> dict:
    """The row's prompt and one answer as a canonical example, with the tools the prompt was asked with."""
    return {"messages": row["prompt"] + answer, "tools": row.get("tools")}


def pair_items(tokenizer, rows: list[dict], system_message: str = "auto", train_reasoning: bool = True) -> list[PairItem]:
    """The DPO pairs among the rows (`train_reasoning` as for `kto_items`)."""
    pairs = [r for r in rows if "chosen" in r]
    seqs = encode_sequences(tokenizer, [_example(r, a) for r in pairs for a in (r["chosen"], r["rejected"])],
                            system_message, train_reasoning)
    items = [PairItem(seqs[2 * i], seqs[2 * i + 1]) for i in range(len(pairs))]
    return [p for p in items if any(p.chosen.mask) and any(p.rejected.mask)]


def balanced_weights(prefs: PreferenceParams, desirable: int, undesirable: int) -> tuple[float, float]:
    """KTO's (desirable, undesirable) weights: as set, else balanced so both kinds weigh the same in all."""
    if prefs.desirable_weight is not None or prefs.undesirable_weight is not None:
        return prefs.desirable_weight or 1.0, prefs.undesirable_weight or 1.0
    if not desirable or not undesirable:
        return 1.0, 1.0
    return (1.0, desirable / undesirable) if desirable >= undesirable else (undesirable / desirable, 1.0)


@contextmanager
def as_reference(model):
    """Within: `model` is its reference for forward passes, in eval mode (no dropout).

    The reference is the frozen `reference` adapter where the model has one (`load_policy`:
    the supervised model), else the model with its adapter disabled (a fresh adapter, whose
    starting point is the base). The trainable adapter, its trainability and the mode are
    restored on the way out.
    """
    training = model.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    try:
        if REFERENCE in model.peft_config:
            active = model.active_adapter
            model.set_adapter(REFERENCE, inference_mode=True)
            try:
                yield model
            finally:
                model.set_adapter(active, inference_mode=True)
                for p in trainable:
                    p.requires_grad_(True)
        else:
            with model.disable_adapter():
                yield model
    finally:
        model.train(training)


def policy_and_reference(model, seqs: list[Sequence], pad_id: int, device: str):
    """(policy log-probs, reference log-probs); the reference is `as_reference(model)`, without gradients."""
    import torch

    policy = sequence_logps(model, seqs, pad_id, device)
    with torch.no_grad(), as_reference(model):
        reference = sequence_logps(model, seqs, pad_id, device)
    return policy, reference


# ------------------------------------------------------------------------------ losses


def dpo_loss(model, batch: list[PairItem], beta: float, pad_id: int, device: str):
    """Sigmoid DPO: -log σ(β · (chosen log-ratio − rejected log-ratio)), averaged over the pairs."""
    import torch.nn.functional as F

    n = len(batch)
    policy, reference = policy_and_reference(model, [p.chosen for p in batch] + [p.rejected for p in batch], pad_id, device)
    ratios = policy - reference
    return -F.logsigmoid(beta * (ratios[:n] - ratios[n:])).mean()


def kto_loss(model, batch: list[KTOItem], beta: float, weights: tuple[float, float], pad_id: int, device: str):
    """KTO: desirable answers pushed above, undesirable ones below, the batch's KL estimate (detached)."""
    import torch

    # Mismatched answers for the KL estimate: each prompt with the next item's answer (another prompt's).
    shifted = [_mismatch(batch[i], batch[(i + 1) % len(batch)]) for i in range(len(batch))]
    policy, reference = policy_and_reference(model, [b.seq for b in batch] + shifted, pad_id, device)
    n = len(batch)
    ratios = policy[:n] - reference[:n]
    kl = (policy[n:] - reference[n:]).mean().clamp(min=0).detach()
    desirable = torch.tensor([b.desirable for b in batch], device=ratios.device)
    losses = torch.where(desirable, weights[0] * (1 - torch.sigmoid(beta * (ratios - kl))),
                         weights[1] * (1 - torch.sigmoid(beta * (kl - ratios))))
    return losses.mean()


def _mismatch(item: KTOItem, other: KTOItem) -> Sequence:
    """`item`'s prompt followed by `other`'s answer (its own when both share the prompt)."""
    prompt_len = item.seq.mask.index(1)
    start = other.seq.mask.index(1)
    answer = [t for t, m in zip(other.seq.ids[start:], other.seq.mask[start:]) if m]
    return Sequence(item.seq.ids[:prompt_len] + answer, [0] * prompt_len + [1] * len(answer))


# ------------------------------------------------------------------------------ the loop


@dataclass
class PreferenceSummary:
    ran: bool
    reason: str
    loss: str
    examples: int = 0
    steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    kept: bool = False  # the tuned model is the candidate (it held the supervised model's exact match on val)
    val_exact_match_supervised: float | None = None
    val_exact_match_tuned: float | None = None


def train_preference(model, items: list, prefs: PreferenceParams, pad_id: int, device: str, seed: int,
                     weights: tuple[float, float] = (1.0, 1.0), log: Log = print) -> list[dict]:
    """Tune `model` (a peft model, adapter trainable) on `items` against `as_reference(model)`; the loss history per step."""
    import torch

    from tasks.train.loop import lr_schedule

    rng = random.Random(seed)
    torch.manual_seed(seed)
    schedule = lr_schedule(_as_train(prefs))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=prefs.learning_rate, weight_decay=0.0)
    model.train()
    order: list[int] = []
    history = []
    threads = ThreadShare()
    for step in range(prefs.max_steps):
        threads.adjust()
        if len(order) < prefs.batch_size:
            order += rng.sample(range(len(items)), len(items))
        batch, order = [items[i] for i in order[: prefs.batch_size]], order[prefs.batch_size:]
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        if prefs.loss == "kto":
            loss = kto_loss(model, batch, prefs.beta, weights, pad_id, device)
        else:
            loss = dpo_loss(model, batch, prefs.beta, pad_id, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": float(loss.detach())})
        if (step + 1) % 10 == 0 or step == 0:
            log(f"preference step {step + 1}/{prefs.max_steps}: loss {history[-1]['loss']:.4f}")
    model.eval()
    return history


def _as_train(prefs: PreferenceParams):
    from tasks.config import TrainParams

    return TrainParams(learning_rate=prefs.learning_rate, max_steps=prefs.max_steps, warmup_steps=0.1)


def load_policy(model_dir: Path, device: str):
    """The supervised model folder's base with its adapter, trainable, and the same adapter frozen as `reference`.

    Returns:
        (model, tokenizer, info): the peft model (the trainable adapter active), the folder's
        tokenizer and its `ftllm_model.json`.
    """
    from peft import PeftModel

    from tasks.config import ModelParams
    from tasks.model.loading import grow_embeddings, load_causal_lm, load_tokenizer, resolve_base

    info = json.loads((model_dir / "ftllm_model.json").read_text())
    if info["kind"] != "adapter":
        raise ConfigError(f"preference tuning trains a LoRA adapter; train.method={info['method']} wrote full weights "
                          f"to {model_dir}; set train.method=lora (or qlora), or leave the preference file empty")
    tokenizer = load_tokenizer(str(model_dir))
    base_path = info["base_path"] if Path(info["base_path"]).exists() else resolve_base(ModelParams(**info["model_params"]))
    base = load_causal_lm(base_path, device=device)
    grow_embeddings(base, tokenizer, info.get("added_token_ids", []))
    model = PeftModel.from_pretrained(base, str(model_dir / "adapter"), is_trainable=True)
    model.load_adapter(str(model_dir / "adapter"), REFERENCE, is_trainable=False, torch_device=device)
    return model, tokenizer, info


@dataclass
class TunedPolicy:
    """A preference-tuned model in memory: the peft model (tuned adapter active, `reference` beside it) and its origin."""

    model: object
    sft_dir: Path
    info: dict
    history: list[dict]


def preference_tune(params: Params, data_dir: Path, sft_dir: Path, out: Path, log: Log = print) -> PreferenceSummary:
    """Tune the supervised model on `data_dir/preference_train.jsonl`; write `out` (a no-op record without data).

    `out/preference.json` always says what happened; `out/model/` is the tuned model folder
    (the supervised folder's layout, with the tuned adapter) when it ran.
    """
    summary, tuned = tune_policy(params, data_dir, sft_dir, log)
    return write_preference(out, summary, tuned)


def tune_policy(params: Params, data_dir: Path, sft_dir: Path, log: Log = print) -> tuple[PreferenceSummary, TunedPolicy | None]:
    """`preference_tune` without the writing: the summary, and the tuned model in memory when it ran."""
    prefs = params.preference
    rows = read_jsonl(data_dir / "preference_train.jsonl") if (data_dir / "preference_train.jsonl").is_file() else []
    usable = rows if prefs.loss == "kto" else [r for r in rows if "chosen" in r]
    if len(usable) < prefs.min_examples:
        reason = (f"{len(usable)} preference training examples for loss {prefs.loss} (preference.min_examples "
                  f"{prefs.min_examples}): the supervised model is the candidate")
        return PreferenceSummary(False, reason, prefs.loss, len(usable)), None
    from tasks.train.finetune import seed_everything

    seed_everything(params.train.seed)
    device = "cuda" if _cuda() else "cpu"
    model, tokenizer, info = load_policy(sft_dir, device)
    policy = params.data.system_message
    encode = kto_items if prefs.loss == "kto" else pair_items
    items = encode(tokenizer, usable, policy, params.train.train_reasoning)
    desirable = sum(getattr(i, "desirable", False) for i in items)
    weights = balanced_weights(prefs, desirable, len(items) - desirable) if prefs.loss == "kto" else (1.0, 1.0)
    log(f"preference tuning ({prefs.loss}, beta {prefs.beta}) on {len(items)} examples, weights {weights}, "
        f"{prefs.max_steps} steps on {device}, against the supervised model")
    start = time.perf_counter()
    history = train_preference(model, items, prefs, tokenizer.pad_token_id, device, params.train.seed, weights, log)
    from tasks.train.loop import peak_memory_mb

    summary = PreferenceSummary(True, "tuned", prefs.loss, len(items), len(history), history[0]["loss"],
                                history[-1]["loss"], *weights, round(time.perf_counter() - start, 2), peak_memory_mb(device))
    summary = held_the_task(model, tokenizer, params, data_dir, summary, log)
    return summary, TunedPolicy(model, Path(sft_dir), info, history) if summary.kept else None


def held_the_task(model, tokenizer, params: Params, data_dir: Path, summary: PreferenceSummary,
                  log: Log = print) -> PreferenceSummary:
    """`summary` with the exact match of the tuned and the supervised model (the `reference`
    adapter) on the val split, and whether the tuned one is kept: unless it fails one of the
    gate's own no-regression checks against the supervised one, as the gate runs them against
    the champion (`no_regression_checks`: paired over the same rows, exact match, accuracy,
    ROUGE-L, BLEU and perplexity, macro-F1 by a fixed margin, and on a split with tool calls the
    function names, the arguments and the valid calls; a drop past `gate.max_regression`, and
    significant). Preference tuning that costs the task is left out of the run and the
    supervised model is its candidate, which the gate would otherwise never see (it compares
    with the champion)."""
    from tasks.evaluate.gate import no_regression_checks
    from tasks.evaluate.score import evaluate_model, load_split

    val = load_split(data_dir, "val", params.eval.max_examples) if (data_dir / "val.jsonl").is_file() else []
    if not val:
        return replace(summary, kept=True, reason="tuned (no val split to check it against)")
    system_message = params.data.system_message
    tuned = evaluate_model(model, tokenizer, val, params.eval, system_message=system_message)
    with as_reference(model):
        supervised = evaluate_model(model, tokenizer, val, params.eval, system_message=system_message)
    failed = [check for check in no_regression_checks(tuned, supervised, params.gate) if not check.passed]
    ems = tuned["metrics"]["exact_match"], supervised["metrics"]["exact_match"]
    said = ", ".join(f"{c.name} ({c.value:+.3f}, {c.method}" + ("" if c.p_value is None else f", p {c.p_value}") + ")"
                     for c in failed)
    reason = ("tuned" if not failed else
              f"tuned, and left out: against the supervised model on the val split it fails {said}: worse by "
              f"more than gate.max_regression {params.gate.max_regression} (and significantly so, where paired) (exact match "
              f"{ems[0]:.3f} against {ems[1]:.3f}); the supervised model is the candidate")
    log(f"preference tuning: val exact match {ems[0]:.3f} (supervised {ems[1]:.3f}): "
        + ("kept" if not failed else f"left out ({', '.join(c.name for c in failed)}), the supervised model is the candidate"))
    return replace(summary, kept=not failed, reason=reason, val_exact_match_tuned=ems[0],
                   val_exact_match_supervised=ems[1])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def write_preference(out: Path, summary: PreferenceSummary, tuned: TunedPolicy | None) -> PreferenceSummary:
    """Write `out` atomically: the summary, and the tuned model folder beside it when there is one.

    The folder is the supervised one with the tuned adapter in place of its own: the
    trainable adapter only, over the original base (the `reference` copy is not saved).
    """
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tuned is not None:
        model = tuned.model
        shutil.copytree(tuned.sft_dir, tmp / MODEL, ignore=shutil.ignore_patterns("adapter", "merged"))
        model.save_pretrained(tmp / MODEL / "adapter", safe_serialization=True, selected_adapters=[model.active_adapter],
                              save_embedding_layers=False if tuned.info.get("added_token_ids") else "auto")
        (tmp / MODEL / "preference_history.json").write_text(json.dumps(tuned.history))
        (tmp / MODEL / SUMMARY).write_text(json.dumps(asdict(summary), indent=2))
    (tmp / SUMMARY).write_text(json.dumps(asdict(summary), indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return summary


def tuned_model(preference_dir: Path) -> Path | None:
    """The preference-tuned model folder of a run, or None when the stage had nothing to do."""
    model = Path(preference_dir) / MODEL
    return model if (model / "ftllm_model.json").is_file() else None
