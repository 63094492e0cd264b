"""One GPU run: this project's packed LoRA loop against the HF Trainer, on a ~1B Llama.

Self-contained: no hub, no network, no project data. The model is a Llama built from a
config with random weights (hidden 2048, 16 layers, 32 heads, MLP 5632, vocab 32000:
~0.95B parameters), the data random tokens of variable lengths (log-normal around 500,
cut to --seq-len), the first 30% of each example being "prompt" (no loss). Both trainers
run in bf16 with the same LoRA (r 16, all linear layers) and AdamW:

  (a) ours: `tasks.finetune` packing (best-fit decreasing), batches of --batch-size rows
      of --seq-len tokens, `train_loop` (LM head only on trained tokens);
  (b) baseline: `transformers.Trainer`, --batch-size examples padded per batch
      (`DataCollatorForSeq2Seq`).

Each runs --warmup steps, then --steps timed steps. Reported: trained tokens/s (tokens
with a label), all real tokens/s, MFU, peak memory; then one QLoRA step when
bitsandbytes imports.

MFU is useful model FLOPs per second over the peak (989e12 bf16 dense on an H100 SXM):
per real (non-padding) token 4*N_lin (forward 2N plus backward activation gradients 2N;
frozen weights get no weight gradients, and the LoRA matrices are left out), where
N_lin counts the decoder's linear weights; plus the LM head, 4*V*d per trained token
(the only place ours runs it; the baseline's head on other tokens is not useful work);
plus attention, 12*L*d per attended (query, key) pair (QK^T and AV forward, twice that
backward), with n(n+1)/2 pairs per example of n tokens. Padding and cross-example pairs
count as no work, so both trainers are measured by the same useful work.

    PYTHONPATH=. python benchmarks/gpu_bench.py                   # on the GPU machine (< 4 min on an H100)
    PYTHONPATH=. python benchmarks/gpu_bench.py --device cpu --tiny    # smoke test anywhere

Writes $OUT/gpu_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16 = 989e12
IGNORE = -100


def make_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False)


def build_base(config, device: str, dtype):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def make_examples(n: int, seq_len: int, vocab: int, seed: int):
    from tasks.modeling import Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(min(seq_len, max(32, rng.lognormvariate(math.log(500), 0.8))))
        prompt = int(length * 0.3)
        out.append(Encoded([rng.randrange(10, vocab) for _ in range(length)], [0] * prompt + [1] * (length - prompt)))
    return out


def flops(config, real_tokens: int, trained_tokens: int, pairs: int) -> float:
    """Useful training FLOPs of LoRA fine-tuning (see the module docstring)."""
    d, layers, inter, v = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    n_lin = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    return 4 * n_lin * real_tokens + 4 * v * d * trained_tokens + 12 * layers * d * pairs


def pairs_of(lengths) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def lora_params(args):
    from tasks.config import TrainParams

    # No modules_to_save: with a 32k vocabulary, training embeddings and head in full
    # would dominate a LoRA benchmark.
    return TrainParams(max_steps=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=1e-4,
                       warmup_steps=0, save_steps=0, log_every=10**6, lora_modules_to_save="", seed=0)


def run_ours(args, config, examples, device, dtype) -> dict:
    from tasks.finetune import make_batches, pack_sequences, padding_fraction, train_loop, wrap_for_training

    train = lora_params(args)
    reset_memory(device)
    model = wrap_for_training(build_base(config, device, dtype), train)
    batches = make_batches(pack_sequences(examples, args.seq_len, seed=0), args.batch_size, 0, seed=0)
    pairs = [sum(p + 1 for row in b.position_ids for p in row if p >= 0) for b in batches]
    quiet = lambda m: None  # noqa: E731
    state = train_loop(model, batches, train, device, quiet, dtype=dtype, progress=False)  # warm-up
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    sync(device)
    state = train_loop(model, batches, train.model_copy(update={"max_steps": args.warmup + args.steps}), device, quiet,
                       dtype=dtype, state=state, optimizer=opt, progress=False)
    timed = state.history[args.warmup :]
    seconds = sum(h["step_seconds"] for h in timed)
    trained = sum(h["tokens"] for h in timed)
    real = sum(h["real_tokens"] for h in timed)
    pair_count = sum(pairs[i] for h in timed for i in h["batches"])
    result = summarize("ours (packed)", config, seconds, trained, real, pair_count, device)
    result.update(padding_fraction=padding_fraction(batches), final_loss=timed[-1]["loss"])
    del model, opt
    return result


def run_trainer(args, config, examples, device, dtype) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

    from tasks.finetune import wrap_for_training

    train = lora_params(args)
    reset_memory(device)
    model = wrap_for_training(build_base(config, device, dtype), train)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
         "labels": [t if m else IGNORE for t, m in zip(e.input_ids, e.loss_mask)]}
        for e in examples
    ]
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                  pad_token="<pad>")
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    per_step: list[dict] = []

    def counting(features):
        batch = collator(features)
        lengths = batch["attention_mask"].sum(1).tolist()
        per_step.append({"trained": int((batch["labels"][:, 1:] != IGNORE).sum()), "real": int(sum(lengths)),
                         "pairs": pairs_of(lengths), "total": batch["attention_mask"].numel()})
        return batch

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
            save_strategy="no", report_to=[], seed=0, use_cpu=device == "cpu", bf16=dtype == torch.bfloat16,
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting, callbacks=[clock])
        trainer.train()
    seconds = clock.marks[-1] - clock.marks[args.warmup - 1]
    timed = per_step[args.warmup : args.warmup + args.steps]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = summarize("HF Trainer (padded)", config, seconds, sum(t["trained"] for t in timed),
                       sum(t["real"] for t in timed), sum(t["pairs"] for t in timed), device)
    result.update(padding_fraction=1 - sum(t["real"] for t in timed) / sum(t["total"] for t in timed),
                  final_loss=losses[-1] if losses else None)
    del trainer, model
    return result


def summarize(name, config, seconds, trained, real, pairs, device) -> dict:
    useful = flops(config, real, trained, pairs)
    return {
        "trainer": name,
        "seconds": seconds,
        "trained_tokens_per_s": trained / seconds,
        "real_tokens_per_s": real / seconds,
        "tflops_per_s": useful / seconds / 1e12,
        "mfu": useful / seconds / PEAK_BF16 if device == "cuda" else None,
        "peak_memory_gib": peak_gib(device),
    }


def qlora_step(args, config, examples, device) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return {"qlora": "skipped: bitsandbytes is not installed"}
    if device != "cuda":
        return {"qlora": "skipped: needs CUDA"}
    import torch

    from tasks.config import TrainParams
    from tasks.finetune import build_model, make_batches, pack_sequences, train_loop

    with tempfile.TemporaryDirectory() as tmp:
        build_base(config, device, torch.bfloat16).save_pretrained(tmp)
        reset_memory(device)
        train = TrainParams(method="qlora", max_steps=2, batch_size=args.batch_size, seq_len=args.seq_len,
                            save_steps=0, log_every=10**6, lora_modules_to_save="", warmup_steps=0)
        model = build_model(tmp, train, device, torch.bfloat16)
        batches = make_batches(pack_sequences(examples, args.seq_len), args.batch_size, 0)
        state = train_loop(model, batches, train, device, lambda m: None, dtype=torch.bfloat16, progress=False)
    last = state.history[-1]
    return {"qlora": "ok", "qlora_step_seconds": last["step_seconds"], "qlora_tokens_per_s": last["tokens"] / last["step_seconds"],
            "qlora_peak_memory_gib": peak_gib(device), "qlora_loss": last["loss"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small config (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, tiny 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8, tiny 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 2048, tiny 512)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.batch_size = args.batch_size or (4 if args.tiny else 8)
    args.seq_len = args.seq_len or (512 if args.tiny else 2048)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = make_config(args.tiny)
    n_params = sum(p.numel() for p in build_base(config, "meta", dtype).parameters())
    # Enough examples for every step of both trainers without repeats.
    examples = make_examples(args.batch_size * (args.warmup + args.steps) * 3, args.seq_len, config.vocab_size, seed=0)
    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "params": n_params, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup}
    import transformers

    info["transformers"] = transformers.__version__
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    ours = run_ours(args, config, examples, args.device, dtype)
    print(json.dumps(ours), flush=True)
    base = run_trainer(args, config, examples, args.device, dtype)
    print(json.dumps(base), flush=True)
    qlora = qlora_step(args, config, examples, args.device)
    print(json.dumps(qlora), flush=True)
    speedup = ours["trained_tokens_per_s"] / base["trained_tokens_per_s"]
    print(f"\n{n_params / 1e9:.2f}B-parameter Llama, LoRA r16 all-linear, {info['device']}, "
          f"batch {args.batch_size} x seq_len {args.seq_len}, {args.steps} timed steps")
    head = f"{'trainer':22}{'trained tok/s':>14}{'real tok/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'padding':>9}"
    print(head)
    for r in (ours, base):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['trainer']:22}{r['trained_tokens_per_s']:>14.0f}{r['real_tokens_per_s']:>12.0f}"
              f"{r['tflops_per_s']:>9.1f}{mfu:>7}{mem:>10}{r['padding_fraction']:>9.1%}")
    print(f"speed-up (trained tokens/s): {speedup:.2f}x; qlora: {qlora['qlora']}; total {time.perf_counter() - t0:.0f}s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_bench.json"
        out.write_text(json.dumps({"info": info, "ours": ours, "trainer": base, "qlora": qlora, "speedup": speedup}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
