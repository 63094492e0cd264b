"""One GPU run: this project's packed LoRA loop against TRL's SFTTrainer and the HF Trainer, on a ~1B Llama.

Self-contained: no hub, no network, no project data. The model is a Llama built from a
config with random weights (hidden 2048, 16 layers, 32 heads, MLP 5632, vocab 32000:
~0.95B parameters), the data random tokens of variable lengths (log-normal around 500,
cut to --seq-len), the first 30% of each example being "prompt" (no loss). All runs are bf16
with the same LoRA (r 16, all linear layers) and AdamW. --variants lists what runs, in order,
each in its own process (own CUDA context and peak memory, killed at --timeout):

  sdpa     ours as it is: `tasks.train.finetune` packing (best-fit decreasing), --batch-size rows of
           --seq-len tokens, `train_loop`; transformers turns the restarting position ids into a
           materialised 4D block-diagonal mask for SDPA (memory-efficient kernel);
  flex     the same with attn_implementation="flex_attention": transformers builds a BlockMask
           from the document ids it finds in the position ids (no dense mask);
  varlen   the same with `train.attention: packed` (tasks/attention.py): one call of
           torch.nn.attention.varlen.varlen_attn (flash, causal per example) on the flattened
           rows, offsets computed once per forward from the position ids;
  lora-bf16  best checked attention so far with `train.trainable_precision: bf16` (LoRA weights
           bf16, no autocast);
  compile  best so far with `train.compile: true` (each decoder layer compiled by inductor;
           NAME:flex etc. picks the attention);
  batch2x  best so far at twice --batch-size;
  trl      the baseline: TRL's SFTTrainer, bfd packing (padding-free), --batch-size packed rows per
           micro-batch flattened into one row, flash varlen attention (flash-attn's
           `flash_attention_2` if installed, else torch's varlen kernel through `train.attention:
           packed`'s registration); same LoRA, optimizer settings and data;
  trainer  second reference: `transformers.Trainer`, --batch-size examples padded per batch
           (`DataCollatorForSeq2Seq`), sdpa.

flex/varlen/compile rows pad every batch to --seq-len (one shape, no recompiles), as the trainer
does under `train.compile`. Each of our
rows first checks correctness before any update, on one fixed batch: loss, gradient norm and a
hidden-state fingerprint, compared with the sdpa row (loss within 1e-2, hidden within 5e-2
relative); only checked rows can be "best". Each runs --warmup steps, then --steps timed steps.
Reported: trained tokens/s (tokens with a label), all real tokens/s, MFU, peak memory.
One QLoRA step with --qlora (needs bitsandbytes). `trl` needs trl and datasets (the test extra).

MFU is useful model FLOPs per second over the peak (989e12 bf16 dense on an H100 SXM):
per real (non-padding) token 4*N_lin (forward 2N plus backward activation gradients 2N;
frozen weights get no weight gradients, and the LoRA matrices are left out), where
N_lin counts the decoder's linear weights; plus the LM head, 4*V*d per trained token
(the only place ours runs it; the baseline's head on other tokens is not useful work);
plus attention, 12*L*d per attended (query, key) pair (QK^T and AV forward, twice that
backward), with n(n+1)/2 pairs per example of n tokens. Padding and cross-example pairs
count as no work, so both trainers are measured by the same useful work.

    PYTHONPATH=. python benchmarks/gpu_bench.py                   # on the GPU machine (~4.5 min, --budget 250)
    PYTHONPATH=. python benchmarks/gpu_bench.py --device cpu --tiny    # smoke test anywhere (GPU-only rows skipped)

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


def build_base(config, device: str, dtype, attn: str = "sdpa"):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # VARLEN: loaded with sdpa; wrap_for_training then switches it to packed attention.
    config._attn_implementation = "sdpa" if attn == VARLEN else attn
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def make_examples(n: int, seq_len: int, vocab: int, seed: int):
    from tasks.model.chat import Encoded

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
    # would dominate a LoRA benchmark. attention="mask": wrap_for_training then keeps the
    # attention implementation each variant loaded the model with (run_ours sets "packed"
    # for the varlen variant).
    return TrainParams(max_steps=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len, learning_rate=1e-4,
                       warmup_steps=0, save_steps=0, log_every=10**6, lora_modules_to_save="", seed=0,
                       attention="mask")


# The `varlen` variant is the trainer's own `train.attention: packed` (tasks/attention.py).
VARLEN = "ftllm_packed"


# --------------------------------------------------------------------------- variants of our trainer


def variant_label(spec: dict) -> str:
    attn = {"sdpa": "sdpa+4D mask", "flex_attention": "flex", VARLEN: "varlen flash"}[spec["attn"]]
    parts = [f"ours {attn}"]
    if spec.get("lora_bf16"):
        parts.append("LoRA bf16")
    if spec.get("compile"):
        parts.append("compiled")
    parts.append(f"b{spec['batch_size']}")
    return ", ".join(parts)


def run_ours(args, config, examples, device, dtype, spec: dict | None = None) -> dict:
    """Our packed loop under one variant `spec` (attention, compile, LoRA dtype, micro-batch)."""
    import torch

    from tasks.train.finetune import loop_dtype, wrap_for_training
    from tasks.train.loop import train_loop
    from tasks.train.loss import CausalLMLoss
    from tasks.train.packing import (
        make_batches,
        pack_sequences,
        padding_fraction,
        to_tensors,
    )

    spec = spec or {"attn": "sdpa", "batch_size": args.batch_size}
    bs = spec["batch_size"]
    bf16 = dtype == torch.bfloat16
    # The trainer's own settings: train.attention, train.trainable_precision, train.compile.
    train = lora_params(args).model_copy(update={
        "batch_size": bs, "attention": "packed" if spec["attn"] == VARLEN else "mask",
        "precision": "bf16" if bf16 else "fp32",
        "trainable_precision": "bf16" if spec.get("lora_bf16") and bf16 else "fp32",
        "compile": bool(spec.get("compile")),
    })
    reset_memory(device)
    model = wrap_for_training(build_base(config, device, dtype, spec["attn"]), train)
    run_dtype = loop_dtype(train, dtype)
    width = args.seq_len if spec.get("fixed_width") else None
    batches = make_batches(pack_sequences(examples, args.seq_len, seed=0), bs, 0, seed=0, width=width)
    pairs = [sum(p + 1 for row in b.position_ids for p in row if p >= 0) for b in batches]
    quiet = lambda m: None  # noqa: E731

    # Correctness check before any update: loss and gradient norm on one fixed batch of
    # args.batch_size rows (the same batch for every variant, whatever its micro-batch).
    check = make_batches(pack_sequences(examples, args.seq_len, seed=0), args.batch_size, 0, seed=0, width=width)
    check = check[len(check) // 2]
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    loss_model = CausalLMLoss(model)  # its decoder and head, called as its forward does, to keep the hidden states
    ctx = torch.autocast(device_type=device, dtype=run_dtype) if run_dtype not in (None, torch.float32) else _null()
    ids, pos, labels = to_tensors(check, device)
    keep = labels != IGNORE
    with ctx:
        hidden = loss_model._decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        s = torch.nn.functional.cross_entropy(loss_model._head(hidden[keep]).float(), labels[keep], reduction="sum")
    (s / check.trained_tokens).backward()
    check_grad = float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))
    check_loss = float(s.detach()) / check.trained_tokens
    fingerprint = hidden_fingerprint(hidden.detach(), keep)
    model.zero_grad(set_to_none=True)
    del hidden, s
    first_call = time.perf_counter() - t0

    state = train_loop(model, batches, train, device, quiet, dtype=run_dtype, progress=False)  # warm-up
    opt = torch.optim.AdamW(params, lr=train.learning_rate)
    sync(device)
    state = train_loop(model, batches, train.model_copy(update={"max_steps": args.warmup + args.steps}), device, quiet,
                       dtype=run_dtype, state=state, optimizer=opt, progress=False)
    timed = state.history[args.warmup :]
    seconds = sum(h["step_seconds"] for h in timed)
    trained = sum(h["tokens"] for h in timed)
    real = sum(h["real_tokens"] for h in timed)
    pair_count = sum(pairs[i] for h in timed for i in h["batches"])
    result = summarize(variant_label(spec), config, seconds, trained, real, pair_count, device)
    result.update(padding_fraction=padding_fraction(batches), final_loss=timed[-1]["loss"], spec=spec,
                  check_loss=check_loss, check_grad_norm=check_grad, check_fingerprint=fingerprint, first_step_loss=state.history[0]["loss"],
                  first_call_seconds=first_call, warmup_seconds=sum(h["step_seconds"] for h in state.history[: args.warmup]))
    del model, opt
    return result


def hidden_fingerprint(hidden, keep) -> list[float]:
    """The decoder's last hidden state at every 16th labelled token, projected on a fixed random vector.

    The loss of a model with random weights is near log(V) whatever the attention does; its
    hidden states are not (a plain causal mask across packed examples moves them ~9% on the tiny model).
    """
    import torch

    r = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0)).to(hidden.device)
    return [round(float(x), 5) for x in (hidden[keep].float() @ r)[::16].cpu()]


def _null():
    from contextlib import nullcontext

    return nullcontext()


def id_tokenizer(**special):
    """A two-token tokenizer: the examples are token ids already, the trainers only need pad (and eos)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, "<unk>")),
                                   pad_token="<pad>", **special)


def step_clock(device):
    """A callback that records the time at the end of every optimizer step (after a device sync)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, *a, **k):
            sync(device)
            self.marks.append(time.perf_counter())

    return Clock()


def library_args(config_class, args, device, dtype, output_dir: str, **extra):
    """The optimizer and loop settings every library trainer runs with (those of `lora_params`)."""
    import torch

    return config_class(
        output_dir=output_dir, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, use_cpu=device == "cpu", bf16=dtype == torch.bfloat16,
        disable_tqdm=True, dataloader_num_workers=0, **extra,
    )


def library_result(name, trainer, clock, per_step, args, config, device) -> dict:
    """The timed steps' row of a library trainer (after --warmup steps), from its collator's counts."""
    seconds = clock.marks[-1] - clock.marks[args.warmup - 1]
    timed = per_step[args.warmup : args.warmup + args.steps]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = summarize(name, config, seconds, sum(t["trained"] for t in timed), sum(t["real"] for t in timed),
                       sum(t["pairs"] for t in timed), device)
    result.update(padding_fraction=1 - sum(t["real"] for t in timed) / sum(t["total"] for t in timed),
                  final_loss=float(losses[-1]) if losses else None)
    return result


def run_trainer(args, config, examples, device, dtype) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tasks.train.finetune import wrap_for_training

    train = lora_params(args)
    reset_memory(device)
    model = wrap_for_training(build_base(config, device, dtype), train)
    rows = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
         "labels": [t if m else IGNORE for t, m in zip(e.input_ids, e.loss_mask)]}
        for e in examples
    ]
    collator = DataCollatorForSeq2Seq(id_tokenizer(), padding=True, label_pad_token_id=IGNORE)
    per_step: list[dict] = []

    def counting(features):
        batch = collator(features)
        lengths = batch["attention_mask"].sum(1).tolist()
        per_step.append({"trained": int((batch["labels"][:, 1:] != IGNORE).sum()), "real": int(sum(lengths)),
                         "pairs": pairs_of(lengths), "total": batch["attention_mask"].numel()})
        return batch

    clock = step_clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=library_args(TrainingArguments, args, device, dtype, tmp),
                          train_dataset=rows, data_collator=counting, callbacks=[clock])
        trainer.train()
    result = library_result("HF Trainer (padded)", trainer, clock, per_step, args, config, device)
    del trainer, model
    return result


def run_trl(args, config, examples, device, dtype) -> dict:
    """TRL's SFTTrainer: bfd packing, padding-free (each micro-batch one flattened row), same LoRA and data.

    Attention: flash-attn's varlen (`flash_attention_2`) where flash-attn is installed, else
    torch's flash varlen kernel through this project's registration (the same kernel, fed
    TRL's flattened row and restarting position ids); sdpa on CPU.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tasks.train.finetune import wrap_for_training

    attn = "sdpa"
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            attn = VARLEN
    train = lora_params(args).model_copy(update={"attention": "packed" if attn == VARLEN else "mask"})
    reset_memory(device)
    model = wrap_for_training(build_base(config, device, dtype, attn), train)
    data = Dataset.from_list([{"input_ids": e.input_ids, "assistant_masks": list(e.loss_mask)} for e in examples])
    per_step: list[dict] = []
    clock = step_clock(device)
    with tempfile.TemporaryDirectory() as tmp:
        targs = library_args(SFTConfig, args, device, dtype, tmp, packing=True, packing_strategy="bfd",
                             max_length=args.seq_len)
        trainer = SFTTrainer(model=model, args=targs, train_dataset=data, processing_class=id_tokenizer(eos_token="<unk>"),
                             callbacks=[clock])
        collator = trainer.data_collator

        def counting(features):
            batch = collator(features)
            pos = batch["position_ids"][0]
            starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
            per_step.append({"trained": int((batch["labels"][:, 1:] != IGNORE).sum()), "real": pos.numel(),
                             "pairs": pairs_of(lengths), "total": pos.numel()})
            return batch

        trainer.data_collator = counting
        trainer.train()
    result = library_result(f"TRL SFTTrainer (bfd, padding-free, {attn})", trainer, clock, per_step, args, config, device)
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
    from tasks.train.finetune import build_model
    from tasks.train.loop import train_loop
    from tasks.train.packing import make_batches, pack_sequences

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


DEFAULT_VARIANTS = "sdpa,varlen,flex,lora-bf16,batch2x,trl,trainer,compile"
ATTN = {"sdpa": "sdpa", "flex": "flex_attention", "varlen": VARLEN}
GPU_ONLY = {"flex": "flex_attention needs the Triton kernels (CUDA)", "compile": "torch.compile of the layers: GPU run only",
            "lora-bf16": "bf16 weights need a bf16 run (the CPU run is fp32)", "varlen": None}


def resolve_variant(token: str, args, rows: list[dict]) -> dict | None:
    """The spec of one variant token; "best" picks the fastest checked attention/LoRA dtype measured so far."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("spec") and r.get("check_ok") and not r["spec"].get("compile")
          and r["spec"]["batch_size"] == args.batch_size]
    best = max(ok, key=lambda r: r["trained_tokens_per_s"])["spec"] if ok else {"attn": "sdpa"}
    name, _, attn = token.partition(":")
    fixed = lambda a: a != "sdpa"  # noqa: E731  (flex/varlen: one width, no recompiles)
    if name in ATTN:
        a = ATTN[name]
        return {"name": token, "attn": a, "batch_size": args.batch_size, "fixed_width": fixed(a)}
    if name == "lora-bf16":
        a = ATTN.get(attn, best["attn"])
        return {"name": token, "attn": a, "batch_size": args.batch_size, "lora_bf16": True, "fixed_width": fixed(a)}
    if name == "batch2x":
        a = ATTN.get(attn, best["attn"])
        return {"name": token, "attn": a, "batch_size": 2 * args.batch_size, "lora_bf16": bool(best.get("lora_bf16")),
                "fixed_width": fixed(a)}
    if name == "compile":
        a = ATTN.get(attn, best["attn"])
        return {"name": token, "attn": a, "batch_size": args.batch_size, "lora_bf16": bool(best.get("lora_bf16")),
                "compile": True, "fixed_width": True}
    if name in ("trainer", "trl"):
        return {"name": name}
    raise SystemExit(f"unknown variant {token!r}")


def worker(args) -> int:
    """Run one variant in this process and write its result row to args.result."""
    import torch

    spec = json.loads(args.worker)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = make_config(args.tiny)
    examples = make_examples(args.batch_size * 2 * (args.warmup + args.steps) * 3, args.seq_len, config.vocab_size, seed=0)
    if spec["name"] == "trainer":
        row = run_trainer(args, config, examples, args.device, dtype)
    elif spec["name"] == "trl":
        row = run_trl(args, config, examples, args.device, dtype)
    else:
        row = run_ours(args, config, examples, args.device, dtype, spec)
    row["status"] = "ok"
    Path(args.result).write_text(json.dumps(row))
    return 0


def run_in_subprocess(spec: dict, args, timeout: float) -> dict:
    """One variant in a fresh process (own CUDA context, compile caches, peak memory), killed after `timeout` s."""
    import signal
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--worker", json.dumps(spec), "--result", str(result)] + (["--tiny"] if args.tiny else [])
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and its compile workers
            proc.wait()
            return {"status": f"timeout after {timeout:.0f}s", "spec": spec, "wall_seconds": time.perf_counter() - t0}
        if rc != 0 or not result.exists():
            return {"status": f"failed (exit {rc}), see the log above", "spec": spec, "wall_seconds": time.perf_counter() - t0}
        row = json.loads(result.read_text())
        row["wall_seconds"] = time.perf_counter() - t0
        return row


def annotate(rows: list[dict]) -> dict | None:
    """Compare every row's check (loss, grad norm, hidden fingerprint) with the plain sdpa row; returns that row."""
    ref = next((r for r in rows if r.get("status") == "ok" and r.get("spec", {}).get("attn") == "sdpa"
                and not r["spec"].get("lora_bf16") and not r["spec"].get("compile")), None)
    for r in rows:
        if r.get("status") == "ok" and "check_loss" in r and ref:
            r["check_rel_diff"] = abs(r["check_loss"] - ref["check_loss"]) / abs(ref["check_loss"])
            r["check_grad_rel_diff"] = abs(r["check_grad_norm"] - ref["check_grad_norm"]) / max(ref["check_grad_norm"], 1e-12)
            a, b = ref["check_fingerprint"], r["check_fingerprint"]
            r["hidden_rel_diff"] = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)) / max(1e-12, sum(x * x for x in a)))
            r["check_ok"] = r["check_rel_diff"] < 1e-2 and r["hidden_rel_diff"] < 5e-2
    return ref


def print_table(rows: list[dict], ref: dict | None) -> None:
    head = (f"{'variant':40}{'trained tok/s':>14}{'real tok/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>9}{'pad':>6}"
            f"{'check loss':>12}{'rel.diff':>9}{'hid.diff':>9}{'1st-step loss':>14}{'wall s':>8}")
    print(head)
    for r in rows:
        label = r.get("trainer") or r["spec"].get("name")
        if r.get("status") != "ok":
            print(f"{label:40}  {r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        check = f"{r['check_loss']:.5f}" if "check_loss" in r else "-"
        rel = f"{r['check_rel_diff']:.1e}" if r.get("check_rel_diff") is not None else "-"
        hid = f"{r['hidden_rel_diff']:.1e}" if r.get("hidden_rel_diff") is not None else "-"
        first = f"{r['first_step_loss']:.5f}" if "first_step_loss" in r else "-"
        print(f"{label:40}{r['trained_tokens_per_s']:>14.0f}{r['real_tokens_per_s']:>11.0f}{r['tflops_per_s']:>9.1f}"
              f"{mfu:>7}{mem:>9}{r['padding_fraction']:>6.1%}{check:>12}{rel:>9}{hid:>9}{first:>14}{r.get('wall_seconds', 0):>8.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small config (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10, tiny 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8, tiny 4)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default 2048, tiny 512)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list, run in order, each in its own process: sdpa, flex, varlen (attention of our "
                         "loop); lora-bf16, batch2x, compile (on the best checked attention so far, or NAME:ATTN); trainer")
    ap.add_argument("--budget", type=float, default=250, help="seconds for all variants; later ones are skipped")
    ap.add_argument("--timeout", type=float, default=100, help="seconds per variant (compile: 2x)")
    ap.add_argument("--try-all", action="store_true", help="on CPU, also try the GPU-only variants")
    ap.add_argument("--qlora", action="store_true", help="also one QLoRA step (needs bitsandbytes)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.batch_size = args.batch_size or (4 if args.tiny else 8)
    args.seq_len = args.seq_len or (512 if args.tiny else 2048)
    if args.worker:
        return worker(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = make_config(args.tiny)
    n_params = sum(p.numel() for p in build_base(config, "meta", dtype).parameters())
    import transformers

    info = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "params": n_params, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "variants": args.variants}
    print(json.dumps(info), flush=True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for token in [t.strip() for t in args.variants.split(",") if t.strip()]:
        name = token.partition(":")[0]
        spec = resolve_variant(token, args, rows)
        attn_name = next((k for k, v in ATTN.items() if v == spec.get("attn")), None)
        reason = None
        if args.device != "cuda" and not args.try_all:
            reason = GPU_ONLY.get(name) or (GPU_ONLY.get(attn_name) if attn_name in ("flex",) else None)
        left = args.budget - (time.perf_counter() - t0)
        timeout = min(args.timeout * (2 if name == "compile" else 1), left)
        if reason is None and timeout < 20:
            reason = f"out of time budget ({left:.0f}s left of --budget {args.budget:.0f})"
        if reason:
            row = {"status": f"skipped: {reason}", "spec": spec}
        else:
            print(f"--- {token}: {json.dumps(spec)} (timeout {timeout:.0f}s)", flush=True)
            row = run_in_subprocess(spec, args, timeout)
        rows.append(row)
        annotate(rows)
        print(json.dumps({k: v for k, v in row.items() if k != "check_fingerprint"}), flush=True)
    ref = annotate(rows)
    print(f"\n{n_params / 1e9:.2f}B-parameter Llama, LoRA r16 all-linear, {info['device']}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, seq_len {args.seq_len}, {args.warmup}+{args.steps} steps per variant")
    print_table(rows, ref)
    print("check (before any update, one fixed batch, relative to the sdpa row): loss, and hidden-state fingerprint "
          "(must be < 1e-2 and < 5e-2); 1st-step loss: the first optimizer step (same data for equal micro-batch)")
    for r in rows:
        if r.get("check_grad_rel_diff") is not None:
            print(f"  {r.get('trainer') or r['spec']['name']}: grad-norm rel. diff {r['check_grad_rel_diff']:.1e}, "
                  f"check {'ok' if r.get('check_ok') else 'FAILED'}, first call {r['first_call_seconds']:.1f}s, "
                  f"warm-up {r['warmup_seconds']:.1f}s")
    qlora = qlora_step(args, config, make_examples(64, args.seq_len, config.vocab_size, 0), args.device) if args.qlora else None
    if qlora is not None:
        print(json.dumps(qlora))
    print(f"total {time.perf_counter() - t0:.0f}s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu_bench.json"
        out.write_text(json.dumps({"info": info, "rows": rows, "qlora": qlora}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
