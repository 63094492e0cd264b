"""Training throughput: this project's packed loop against TRL's SFTTrainer and a plain `transformers.Trainer`.

All three train the same base model with the same LoRA settings (built by the project's
`build_model`, so the same adapter initialisation), learning-rate schedule, seed and
gradient clipping, on the same variable-length instruction data (by default the Alpaca seed
tasks, one chat example per instance; any file in a format `ftllm validate` reads with
`--data`), every example cut to `--seq-len` tokens, with the loss on the assistant tokens only.

- ours (`tasks.train.loop.train_loop`): examples packed best-fit decreasing into `--seq-len`
  rows, `--rows` rows per optimizer step in micro-batches of `--ours-micro-batch` rows
  (`train.batch_size`, `train.grad_accum`), attention per example (`train.attention`),
  the LM head only on the trained tokens.
- trl (the baseline): `SFTTrainer` with `packing=True, packing_strategy="bfd"` (padding-free:
  each micro-batch is flattened into one row with restarting position ids), the same
  `--rows` packed rows per optimizer step in micro-batches of `--trl-micro-batch` rows.
  On CPU transformers' SDPA then builds a block-diagonal mask over the whole flattened
  micro-batch, so its fastest set-up is one row per micro-batch with gradient accumulation;
  on CUDA it uses flash-attention varlen (`flash_attention_2` when flash-attn is installed,
  torch's varlen kernel otherwise).
- trainer (a second reference): `transformers.Trainer` with per-batch padding
  (`DataCollatorForSeq2Seq`), `--batch-size` examples per step.

Reported per trainer, as the run with the median speed of `--repeats` alternating runs:
trained tokens/s (tokens with a label), trained tokens per step, padding, peak memory (max
RSS; on CUDA also max allocated), the train loss at equal trained tokens (at the smaller
total of ours and TRL), and the loss of the trained model on the whole data set. Each run is
its own process, so peak memory is its own; the machine's load average is recorded with
every run.

    python benchmarks/bench_train.py                     # tiny model, 40 steps, 3 alternating repeats
    python benchmarks/bench_train.py --base /path/to/model --steps 50 --json bench.json
    OMP_NUM_THREADS=1 python benchmarks/bench_train.py ...   # steadier on a machine shared with other jobs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def setup(args, micro_batch: int = 1, grad_accum: int = 1, attention: str = "mask"):
    from tasks.config import ModelParams, TrainParams
    from tasks.model.chat import encode_chat
    from tasks.model.loading import load_tokenizer, resolve_base

    base = resolve_base(ModelParams(base=args.base))
    tok = load_tokenizer(base)
    train = TrainParams(
        max_steps=args.steps, batch_size=micro_batch, grad_accum=grad_accum, seq_len=args.seq_len,
        learning_rate=args.lr, warmup_steps=0.05, seed=args.seed, save_steps=0, log_every=10**6,
        attention=attention,
    )
    encoded = [encode_chat(tok, ex["messages"]) for ex in load_chat_examples(args.data)]
    return base, tok, train, encoded


def device_and_dtype():
    import torch

    from tasks.train.finetune import pick_precision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, pick_precision("auto", device)


def memory(device: str) -> dict:
    """Peak RSS of this process, and on CUDA the peak of allocated GPU memory, in MB."""
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def holdout_loss(model, encoded, args, tok, device: str, dtype) -> float:
    """Token-weighted loss of the trained model on every example (one per row), the same measure for all."""
    from tasks.train.loop import evaluate_loss
    from tasks.train.loss import CausalLMLoss
    from tasks.train.packing import make_batches, pad_sequences

    model.eval()
    batches = make_batches(pad_sequences(encoded, args.seq_len), 8, tok.pad_token_id)
    return evaluate_loss(CausalLMLoss(model), batches, device, dtype)


def split_rows(rows: int, micro: int, flag: str) -> int:
    if micro < 1 or rows % micro:
        raise SystemExit(f"error: {flag} {micro} must divide --rows {rows}")
    return rows // micro


def run_ours(args) -> dict:
    from tasks.train.finetune import build_model, seed_everything
    from tasks.train.loop import train_loop
    from tasks.train.packing import make_batches, pack_sequences, padding_fraction

    micro = args.ours_micro_batch
    accum = split_rows(args.rows, micro, "--ours-micro-batch")
    base, tok, train, encoded = setup(args, micro, accum, args.attention)
    device, dtype = device_and_dtype()
    seed_everything(args.seed)
    batches = make_batches(pack_sequences(encoded, args.seq_len, args.seed), micro, tok.pad_token_id, args.seed)
    model = build_model(base, train, device, dtype)
    state = train_loop(model, batches, train, device, log=lambda m: None, dtype=dtype, progress=False)
    return {
        "trained_tokens": state.trained_tokens,
        "seconds": state.seconds,
        "tokens_per_second": state.trained_tokens / state.seconds,
        "padding_fraction": padding_fraction(batches),
        **memory(device),
        "holdout_loss": holdout_loss(model, encoded, args, tok, device, dtype),
        "curve": [(h["tokens"], h["loss"]) for h in state.history],
    }


class _Counter:
    """Counts the trained tokens of every micro-batch a collator hands out (labels are shifted by the model)."""

    def __init__(self, collator, ignore: int):
        self.collator, self.ignore = collator, ignore
        self.trained = self.real = self.total = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.trained += int((batch["labels"][:, 1:] != self.ignore).sum())
        if "attention_mask" in batch:
            self.real += int(batch["attention_mask"].sum())
            self.total += batch["attention_mask"].numel()
        else:  # padding-free: one flattened row, no padding
            self.real += batch["input_ids"].numel()
            self.total += batch["input_ids"].numel()
        return batch


def _hf_callbacks(counter: _Counter):
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Training time without data preparation, and the trained tokens of every optimizer step."""

        def __init__(self):
            self.steps: list[int] = []

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(counter.trained - sum(self.steps))

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.start

    return Clock()


def hf_schedule(args, device: str, dtype) -> dict:
    """The TrainingArguments both transformers-based trainers share: this trainer's schedule and clipping."""
    import torch

    return dict(
        max_steps=args.steps, learning_rate=args.lr, warmup_steps=0.05, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=device == "cpu", bf16=dtype == torch.bfloat16,
        disable_tqdm=True, dataloader_num_workers=0,
    )


def hf_result(trainer, counter: _Counter, clock, model, encoded, args, tok, device, dtype) -> dict:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "trained_tokens": counter.trained,
        "seconds": clock.seconds,
        "tokens_per_second": counter.trained / clock.seconds,
        "padding_fraction": 1 - counter.real / max(1, counter.total),
        **memory(device),
        "holdout_loss": holdout_loss(model, encoded, args, tok, device, dtype),
        "curve": list(zip(clock.steps, losses)),
    }


def trl_attention(args, device: str) -> str:
    """TRL's attention: SDPA on CPU; on CUDA flash varlen (flash-attn's, else torch's through `ftllm_packed`)."""
    if args.trl_attention != "auto":
        return args.trl_attention
    if not device.startswith("cuda"):
        return "sdpa"
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "varlen"


def run_trl(args) -> dict:
    import tempfile

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tasks.train.finetune import build_model, seed_everything
    from tasks.train.packing import IGNORE

    micro = args.trl_micro_batch
    accum = split_rows(args.rows, micro, "--trl-micro-batch")
    device, dtype = device_and_dtype()
    attention = trl_attention(args, device)
    # "varlen" reuses this project's registration of torch's flash varlen kernel: the same
    # kernel flash-attn's varlen call runs, fed TRL's own flattened rows and position ids.
    base, tok, train, encoded = setup(args, attention="packed" if attention == "varlen" else "mask")
    seed_everything(args.seed)
    data = Dataset.from_list([
        {"input_ids": e.input_ids[: args.seq_len], "assistant_masks": list(e.loss_mask[: args.seq_len])}
        for e in encoded
    ])
    model = build_model(base, train, device, dtype)
    if attention not in ("varlen", "sdpa"):
        model.get_base_model().set_attn_implementation(attention)
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
            packing=True, packing_strategy="bfd", max_length=args.seq_len, **hf_schedule(args, device, dtype),
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok)
        counter = _Counter(trainer.data_collator, IGNORE)
        trainer.data_collator = counter
        clock = _hf_callbacks(counter)
        trainer.add_callback(clock)
        trainer.train()
    return hf_result(trainer, counter, clock, model, encoded, args, tok, device, dtype) | {"attention": attention}


def run_trainer(args) -> dict:
    import tempfile

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tasks.train.finetune import build_model, seed_everything
    from tasks.train.packing import IGNORE

    base, tok, train, encoded = setup(args)
    device, dtype = device_and_dtype()
    seed_everything(args.seed)
    rows = [
        {
            "input_ids": e.input_ids[: args.seq_len],
            "attention_mask": [1] * len(e.input_ids[: args.seq_len]),
            "labels": [t if m else IGNORE for t, m in zip(e.input_ids[: args.seq_len], e.loss_mask)],
        }
        for e in encoded
    ]
    counter = _Counter(DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE), IGNORE)
    clock = _hf_callbacks(counter)
    model = build_model(base, train, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  **hf_schedule(args, device, dtype))
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counter,
                          processing_class=tok, callbacks=[clock])
        trainer.train()
    return hf_result(trainer, counter, clock, model, encoded, args, tok, device, dtype)


RUNNERS = {"ours": run_ours, "trl": run_trl, "trainer": run_trainer}
TITLES = {"ours": "ours (packed)", "trl": "TRL SFTTrainer", "trainer": "Trainer (padded)"}


def loss_at_tokens(curve: list[tuple[int, float]], tokens: int) -> float | None:
    """The train loss (mean of the steps around it) once `tokens` trained tokens had been seen."""
    seen = 0
    for i, (n, _) in enumerate(curve):
        seen += n
        if seen >= tokens:
            window = curve[max(0, i - 1) : i + 2]
            return sum(loss for _, loss in window) / len(window)
    return None


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def run_one(name: str, argv: list[str]) -> dict | None:
    cmd = [sys.executable, __file__, "--only", name, *argv]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line.removeprefix("RESULT ")) | {"load_before": load_before, "load_after": os.getloadavg()[0]}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """The run with the median speed stands for each trainer; ratios are per alternating pair."""
    rep = {}
    for name, rs in runs.items():
        mid = median([r["tokens_per_second"] for r in rs])
        rep[name] = dict(min(rs, key=lambda r: abs(r["tokens_per_second"] - mid)))
        rep[name]["median_tokens_per_second"] = mid
        rep[name]["all_tokens_per_second"] = [r["tokens_per_second"] for r in rs]
        curve = rep[name]["curve"]
        rep[name]["tokens_per_step"] = rep[name]["trained_tokens"] / max(1, len(curve))
        rep[name]["final_train_loss"] = sum(loss for _, loss in curve[-5:]) / len(curve[-5:])
    equal = min(rep[n]["trained_tokens"] for n in ("ours", "trl") if n in rep)
    smallest = min(r["trained_tokens"] for r in rep.values())
    for r in rep.values():
        r["loss_at_equal_tokens"] = loss_at_tokens(r["curve"], equal) if r["trained_tokens"] >= equal else None
        r["loss_at_smallest_tokens"] = loss_at_tokens(r["curve"], smallest)
    out = {"trainers": rep, "equal_tokens": equal, "smallest_tokens": smallest, "speedup": {}, "ratios": {}}
    for name in runs:
        if name == "ours":
            continue
        ratios = [o["tokens_per_second"] / b["tokens_per_second"] for o, b in zip(runs["ours"], runs[name])]
        out["ratios"][name] = ratios
        out["speedup"][name] = median(ratios)
        out.setdefault("memory_ratio", {})[name] = rep["ours"]["peak_rss_mb"] / rep[name]["peak_rss_mb"]
    return out


def print_table(summary: dict, args, loads: list[float]) -> None:
    rep = summary["trainers"]
    names = list(rep)
    print(f"{args.steps} steps; ours {args.rows} packed rows of {args.seq_len} per step in micro-batches of "
          f"{args.ours_micro_batch} (attention {args.attention}); TRL {args.rows} rows in micro-batches of "
          f"{args.trl_micro_batch} (attention {rep.get('trl', {}).get('attention', '-')}); Trainer {args.batch_size} "
          f"padded examples per step; base {args.base}, data {args.data.name}, {args.repeats} alternating run(s) each; "
          f"{rep['ours']['threads']} torch thread(s); load average {min(loads):.2f}-{max(loads):.2f} (median {median(loads):.2f})")
    print(f"{'':30}" + "".join(f"{TITLES[n]:>20}" for n in names))
    rows = [
        ("trained tokens/s (median)", "median_tokens_per_second", "{:.0f}"),
        ("trained tokens", "trained_tokens", "{:d}"),
        ("trained tokens per step", "tokens_per_step", "{:.0f}"),
        ("seconds (median run)", "seconds", "{:.1f}"),
        ("padding", "padding_fraction", "{:.1%}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("peak CUDA MB", "peak_cuda_mb", "{:.0f}"),
        ("train loss, last 5 steps", "final_train_loss", "{:.4f}"),
        (f"loss at {summary['equal_tokens']} tokens", "loss_at_equal_tokens", "{:.4f}"),
        (f"loss at {summary['smallest_tokens']} tokens", "loss_at_smallest_tokens", "{:.4f}"),
        ("loss on the whole data set", "holdout_loss", "{:.4f}"),
    ]
    if summary["smallest_tokens"] == summary["equal_tokens"]:
        rows = [r for r in rows if r[1] != "loss_at_smallest_tokens"]
    for label, key, fmt in rows:
        if all(rep[n].get(key) is None for n in names):
            continue
        cells = [fmt.format(rep[n][key]) if rep[n].get(key) is not None else "-" for n in names]
        print(f"{label:30}" + "".join(f"{c:>20}" for c in cells))
    print(f"{'all runs, tokens/s':30}" + "".join(
        f"{', '.join(f'{x:.0f}' for x in rep[n]['all_tokens_per_second']):>20}" for n in names))
    for name, speedup in summary["speedup"].items():
        print(f"speed-up over {TITLES[name]} (trained tokens/s): {speedup:.2f}x (median of {len(summary['ratios'][name])} "
              f"pairs; all: {', '.join(f'{r:.2f}' for r in summary['ratios'][name])}); peak RSS "
              f"{summary['memory_ratio'][name]:.2f}x its")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=8, help="packed rows of --seq-len per optimizer step (ours and TRL)")
    ap.add_argument("--ours-micro-batch", type=int, default=2,
                    help="rows per micro-batch of this trainer (train.batch_size; train.grad_accum = rows / this); "
                         "2 is its fastest at a peak memory below TRL's")
    ap.add_argument("--trl-micro-batch", type=int, default=1,
                    help="rows per micro-batch of TRL (per_device_train_batch_size; gradient_accumulation_steps = "
                         "rows / this); 1 is its fastest on CPU")
    ap.add_argument("--trl-attention", default="auto",
                    help="TRL's attn_implementation: auto (sdpa on CPU; flash varlen on CUDA), sdpa, eager, "
                         "flash_attention_2, flex_attention, varlen (torch's flash varlen kernel)")
    ap.add_argument("--batch-size", type=int, default=8, help="padded examples per step of transformers.Trainer")
    ap.add_argument("--attention", choices=["packed", "mask"], default="packed", help="train.attention of this trainer")
    ap.add_argument("--baselines", default="trl,trainer", help="comma-separated, of: trl, trainer")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each trainer; medians are reported")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--only", choices=list(RUNNERS), help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.only:
        print("RESULT " + json.dumps(RUNNERS[args.only](args)))
        return 0
    if not args.data.is_file():
        print(f"error: {args.data}: data file not found; pass --data PATH", file=sys.stderr)
        return 2
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not baselines or set(baselines) - {"trl", "trainer"}:
        print(f"error: --baselines {args.baselines!r}: expected a comma-separated list of trl, trainer", file=sys.stderr)
        return 2
    names = ["ours", *baselines]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    # Alternate (ours, trl, trainer, ours, ...): a change in the machine's load then hits
    # every trainer, and each repeat gives one ratio per baseline.
    for _ in range(args.repeats):
        for name in names:
            result = run_one(name, argv)
            if result is None:
                return 1
            runs[name].append(result)
            print(f"  {name}: {result['tokens_per_second']:.0f} trained tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB, "
                  f"load {result['load_before']:.2f}", file=sys.stderr)
    summary = summarize(runs)
    loads = [r[k] for rs in runs.values() for r in rs for k in ("load_before", "load_after")]
    print_table(summary, args, loads)
    if args.json:
        for r in summary["trainers"].values():
            r.pop("curve")
        args.json.write_text(json.dumps({
            **summary, "runs": {n: [{k: v for k, v in r.items() if k != "curve"} for r in rs] for n, rs in runs.items()},
            "load_average": {"min": min(loads), "median": median(loads), "max": max(loads)},
            "args": {k: str(v) for k, v in vars(args).items() if k != "only"},
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
