"""Training throughput: this project's packed loop against a plain `transformers.Trainer`.

Both train the same base model with the same LoRA settings, learning-rate schedule, seed
and number of optimizer steps of `--batch-size` sequences, on the same variable-length
instruction data (by default the Alpaca seed tasks, one chat example per instance; any
file in a format `ftllm validate` reads with `--data`), cut to `--seq-len` tokens. The baseline pads each batch to its longest example
(`DataCollatorForSeq2Seq`); ours packs examples into `--seq-len` rows (best-fit
decreasing, attention kept per example) and runs the LM head only on trained tokens.

Reported per trainer: trained tokens/s (tokens with a label, i.e. assistant tokens), the
padding fraction, peak memory (max RSS on CPU, max allocated on CUDA), the mean train loss
of the last steps, and the loss of the trained model on the whole data set (the same
measure for both). Each trainer runs in its own process, so peak memory is its own.

    python benchmarks/bench_train.py                     # tiny model, 30 steps
    python benchmarks/bench_train.py --base /path/to/model --steps 50 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"


def load_chat_examples(path: Path) -> list[dict]:
    """The data file as chat examples, through the project's own converters.

    Any format `ftllm validate` reads: OpenAI chat, Alpaca (plain records or seed tasks with
    `instances`, one example per instance) or ShareGPT, as JSONL or a JSON array. Records
    that do not convert, or end without an assistant answer, are left out.
    """
    from tasks.data.formats import (
        RecordError,
        detect_format,
        read_records,
        to_canonical,
    )

    examples, fmt = [], None
    for _line, obj in read_records(path):
        if isinstance(obj, RecordError) or not isinstance(obj, dict):
            continue
        try:
            fmt = fmt or detect_format(obj)
            converted = to_canonical(obj, fmt)
        except (ValueError, KeyError, TypeError):
            continue
        examples += [ex for ex in converted if ex.get("messages") and ex["messages"][-1].get("role") == "assistant"]
    return examples


def setup(args):
    from tasks.config import ModelParams, TrainParams
    from tasks.model.chat import encode_chat
    from tasks.model.loading import load_tokenizer, resolve_base

    base = resolve_base(ModelParams(base=args.base))
    tok = load_tokenizer(base)
    train = TrainParams(
        max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=args.lr,
        warmup_steps=0.05, seed=args.seed, save_steps=0, log_every=10**6,
        # The baseline is a plain model: transformers' SDPA with the padding mask.
        attention=args.attention if args.only == "ours" else "mask",
    )
    encoded = [encode_chat(tok, ex["messages"]) for ex in load_chat_examples(args.data)]
    return base, tok, train, encoded


def holdout_loss(model, batches, device: str, dtype) -> float:
    from tasks.train.loop import evaluate_loss
    from tasks.train.loss import CausalLMLoss

    return evaluate_loss(CausalLMLoss(model), batches, device, dtype)


def run_ours(args) -> dict:
    import torch

    from tasks.train.finetune import build_model, pick_precision, seed_everything
    from tasks.train.loop import peak_memory_mb, train_loop
    from tasks.train.packing import (
        make_batches,
        pack_sequences,
        pad_sequences,
        padding_fraction,
    )

    base, tok, train, encoded = setup(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_precision("auto", device)
    seed_everything(args.seed)
    rows = args.ours_batch_size or args.batch_size  # packed rows per step (equal trained tokens per step)
    batches = make_batches(pack_sequences(encoded, args.seq_len, args.seed), rows, tok.pad_token_id, args.seed)
    model = build_model(base, train, device, dtype)
    state = train_loop(model, batches, train, device, log=lambda m: None, dtype=dtype, progress=False)
    per_example = make_batches(pad_sequences(encoded, args.seq_len), 8, tok.pad_token_id)
    history = state.history
    return {
        "trained_tokens": state.trained_tokens,
        "seconds": state.seconds,
        "tokens_per_second": state.trained_tokens / state.seconds,
        "padding_fraction": padding_fraction(batches),
        "peak_memory_mb": peak_memory_mb(device),
        "final_train_loss": sum(h["loss"] for h in history[-5:]) / len(history[-5:]),
        "holdout_loss": holdout_loss(model, per_example, device, dtype),
        "curve": [(h["tokens"], h["loss"]) for h in history],
    }


def run_trainer(args) -> dict:
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tasks.train.finetune import build_model, pick_precision, seed_everything
    from tasks.train.loop import peak_memory_mb
    from tasks.train.packing import IGNORE, make_batches, pad_sequences

    base, tok, train, encoded = setup(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_precision("auto", device)
    seed_everything(args.seed)
    rows = [
        {
            "input_ids": e.input_ids[: args.seq_len],
            "attention_mask": [1] * len(e.input_ids[: args.seq_len]),
            "labels": [t if m else IGNORE for t, m in zip(e.input_ids[: args.seq_len], e.loss_mask)],
        }
        for e in encoded
    ]
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    counts = {"trained": 0, "real": 0, "total": 0}

    def counting_collator(features):
        batch = collator(features)
        counts["trained"] += int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
        counts["real"] += int(batch["attention_mask"].sum())
        counts["total"] += batch["attention_mask"].numel()
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    model = build_model(base, train, device, dtype)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
            use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=targs, train_dataset=rows, data_collator=counting_collator,
            processing_class=tok, callbacks=[clock],
        )
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model.eval()
    per_example = make_batches(pad_sequences(encoded, args.seq_len), 8, tok.pad_token_id)
    return {
        "trained_tokens": counts["trained"],
        "seconds": clock.seconds,
        "tokens_per_second": counts["trained"] / clock.seconds,
        "padding_fraction": 1 - counts["real"] / max(1, counts["total"]),
        "peak_memory_mb": peak_memory_mb(device),
        "final_train_loss": sum(losses[-5:]) / len(losses[-5:]),
        "holdout_loss": holdout_loss(model, per_example, device, dtype),
    }


def loss_at_tokens(curve: list[tuple[int, float]], tokens: int) -> float | None:
    """Our train loss (mean of 3 steps) once we had trained on `tokens` tokens."""
    seen = 0
    for i, (n, _) in enumerate(curve):
        seen += n
        if seen >= tokens:
            window = curve[max(0, i - 1) : i + 2]
            return sum(loss for _, loss in window) / len(window)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ours-batch-size", type=int, default=None,
                    help="packed rows per step for this trainer (default: --batch-size); a packed row holds "
                         "several examples, so fewer rows give the same trained tokens per optimizer step")
    ap.add_argument("--attention", choices=["packed", "mask"], default="packed",
                    help="train.attention of this trainer (the baseline always uses transformers' SDPA with its mask)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs of each trainer; the median ratio is reported")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only:
        result = run_ours(args) if args.only == "ours" else run_trainer(args)
        print("RESULT " + json.dumps(result))
        return 0
    if not args.data.is_file():
        print(f"error: {args.data}: data file not found; pass --data PATH", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"trainer": [], "ours": []}
    # Alternate the two (trainer, ours, trainer, ...): a change in the machine's load then
    # hits both, and each pair gives one ratio.
    for _ in range(args.repeats):
        for name in ("trainer", "ours"):
            cmd = [sys.executable, __file__, "--only", name, *(argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            runs[name].append(json.loads(line.removeprefix("RESULT ")))
    ratios = sorted(o["tokens_per_second"] / t["tokens_per_second"] for t, o in zip(runs["trainer"], runs["ours"]))
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # The run of each trainer with the median speed stands for it; losses are the same in every repeat.
    ours = min(runs["ours"], key=lambda r: abs(r["tokens_per_second"] - median([x["tokens_per_second"] for x in runs["ours"]])))
    base = min(runs["trainer"], key=lambda r: abs(r["tokens_per_second"] - median([x["tokens_per_second"] for x in runs["trainer"]])))
    ours["loss_at_trainer_tokens"] = loss_at_tokens(ours.pop("curve"), base["trained_tokens"])
    speedup = median(ratios)
    print(f"{args.steps} steps x {args.batch_size} sequences (ours: {args.ours_batch_size or args.batch_size} packed rows, "
          f"attention {args.attention}), seq_len {args.seq_len}, base {args.base}, data {args.data.name}, "
          f"{args.repeats} alternating run(s) each")
    print(f"{'':22}{'trainer (padded)':>18}{'ours (packed)':>16}")
    for key, fmt in [
        ("tokens_per_second", "{:.0f}"), ("trained_tokens", "{:d}"), ("seconds", "{:.1f}"),
        ("padding_fraction", "{:.1%}"), ("peak_memory_mb", "{:.0f}"), ("final_train_loss", "{:.4f}"),
        ("holdout_loss", "{:.4f}"),
    ]:
        print(f"{key:22}{fmt.format(base[key]):>18}{fmt.format(ours[key]):>16}")
    at = ours["loss_at_trainer_tokens"]
    print(f"our train loss after the trainer's {base['trained_tokens']} tokens: {at:.4f}" if at else "")
    print(f"speed-up (trained tokens/s): {speedup:.2f}x" + (f" (median of {args.repeats} pairs; all: "
          + ", ".join(f"{r:.2f}" for r in ratios) + ")" if args.repeats > 1 else ""))
    if args.json:
        args.json.write_text(json.dumps({"trainer": base, "ours": ours, "speedup": speedup, "ratios": ratios,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
