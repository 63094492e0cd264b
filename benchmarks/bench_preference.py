"""Preference tuning side by side: this project's loop (tasks/train/preference.py) against TRL's DPOTrainer.

Same tiny model, fresh LoRA adapter (r 16, all linear layers), same pairs (the right answer
of a dates example chosen, another example's answer rejected), batch, learning rate, beta and
steps; the reference is the adapter disabled in both. A third arm, supervised tuning on the
chosen answers with the same model, batch and code path, is the memory baseline: the issue's
target is preference peak memory <= 1.3x supervised.

Each arm runs in a process of its own (peak RSS is per process), the arms alternate, and
the figures are medians over the repeats: seconds per step, and peak RSS growth over the
process's RSS once the model and data are loaded.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_preference.py --steps 20 --repeats 3 \\
        --json benchmarks/results/bench_preference_cpu.json

`--stage` measures the memory of the stage as it runs instead (`load_policy`: a supervised
model folder's adapter trainable, and the same adapter loaded again, frozen, as the
reference): the `preference` arm against `supervised` tuning of the same folder without the
reference copy, same batch of pairs and steps (the supervised loss on the chosen answers).
The folder is a tiny model tuned 8 steps on the dates data, made once under artifacts/.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("own", "trl", "sft")
STAGE_ARMS = ("preference", "supervised")
STAGE_MODEL = ROOT / "artifacts/bench_preference_stage/model"


def pairs(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (ROOT / "data/dates.jsonl").read_text().splitlines()[:n]]
    return [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:], "rejected": rows[(i + 7) % n]["messages"][-1:]}
            for i, r in enumerate(rows)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def supervised_folder() -> Path:
    """The stage arms' supervised model folder: the tiny model, 8 LoRA steps on 64 dates examples."""
    if not (STAGE_MODEL / "ftllm_model.json").is_file():
        from tasks.config import load_params
        from tasks.train.finetune import finetune

        data = STAGE_MODEL.parent / "prepared"
        data.mkdir(parents=True, exist_ok=True)
        rows = (ROOT / "data/dates.jsonl").read_text().splitlines(keepends=True)
        (data / "train.jsonl").write_text("".join(rows[:64]))
        (data / "val.jsonl").write_text("".join(rows[64:72]))
        finetune(load_params(None, {"train.max_steps": 8}), data, STAGE_MODEL, log=lambda _m: None)
    return STAGE_MODEL


def stage_policy(reference: bool):
    """(model, tokenizer) as the stage loads the supervised folder; without `reference`, its adapter alone."""
    from peft import PeftModel

    from tasks.model.loading import grow_embeddings, load_causal_lm, load_tokenizer
    from tasks.train.preference import load_policy

    if reference:
        model, tok, _info = load_policy(STAGE_MODEL, "cpu")
        return model, tok
    info = json.loads((STAGE_MODEL / "ftllm_model.json").read_text())
    tok = load_tokenizer(str(STAGE_MODEL))
    base = load_causal_lm(info["base_path"], device="cpu")
    grow_embeddings(base, tok, info.get("added_token_ids", []))
    return PeftModel.from_pretrained(base, str(STAGE_MODEL / "adapter"), is_trainable=True), tok


def run_arm(arm: str, steps: int, batch: int, n: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from tasks.config import ModelParams, PreferenceParams
    from tasks.model.loading import load_base_model, load_base_tokenizer

    torch.manual_seed(0)
    if arm in STAGE_ARMS:
        model, tok = stage_policy(reference=arm == "preference")
    else:
        tok = load_base_tokenizer(ModelParams())
        model = get_peft_model(load_base_model(ModelParams(), tok),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = pairs(n)
    prefs = PreferenceParams(loss="sigmoid", beta=0.1, learning_rate=5e-4, max_steps=steps, batch_size=batch)
    if arm == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(ROOT / "artifacts/bench_preference_trl"), per_device_train_batch_size=batch,
                         max_steps=steps, learning_rate=prefs.learning_rate, beta=prefs.beta, use_cpu=True, bf16=False,
                         report_to=[], logging_steps=10_000, save_strategy="no", max_length=256, seed=0,
                         lr_scheduler_type="cosine", warmup_steps=0.1, disable_tqdm=True, dataloader_num_workers=0,
                         gradient_checkpointing=False)  # as the other arms (TRL turns it on by default)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
        base = current_rss_mb()
        start = time.perf_counter()
        out = trainer.train()
        seconds, loss = time.perf_counter() - start, float(out.training_loss)
    else:
        from tasks.train.preference import pair_items, train_preference

        items = pair_items(tok, data)
        if arm in ("sft", "supervised"):  # the same loop and batches, with the supervised loss on the chosen answers
            import tasks.train.preference as lib
            from tasks.model.scoring import sequence_logps

            lib.dpo_loss = lambda m, b, beta, pad, dev: -sequence_logps(m, [p.chosen for p in b], pad, dev).mean()
        base = current_rss_mb()
        start = time.perf_counter()
        history = train_preference(model, items, prefs, tok.pad_token_id, "cpu", 0, log=lambda _m: None)
        seconds, loss = time.perf_counter() - start, sum(h["loss"] for h in history) / len(history)
    return {"arm": arm, "seconds_per_step": seconds / steps, "peak_rss_mb": rss_mb(), "rss_before_mb": base,
            "peak_growth_mb": rss_mb() - base, "mean_loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--stage", action="store_true", help="the stage's memory: preference against supervised")
    ap.add_argument("--arm", choices=ARMS + STAGE_ARMS, help=argparse.SUPPRESS)  # one arm, in this process
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.steps, args.batch, args.examples)))
        return
    if args.stage:
        stage_memory(args)
        return
    runs = run_arms(ARMS, args)
    median = medians(runs, ARMS, ("seconds_per_step", "peak_rss_mb", "peak_growth_mb", "mean_loss"))
    ratios = [next(r for r in runs if r["arm"] == "trl" and r["repeat"] == i)["seconds_per_step"]
              / next(r for r in runs if r["arm"] == "own" and r["repeat"] == i)["seconds_per_step"] for i in range(args.repeats)]
    summary = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, CPU only",
        "command": " ".join(sys.argv), "steps": args.steps, "batch": args.batch, "examples": args.examples,
        "median": median, "own_speedup_over_trl_per_repeat": ratios, "own_speedup_over_trl": statistics.median(ratios),
        "peak_growth_preference_over_sft": median["own"]["peak_growth_mb"] / max(median["sft"]["peak_growth_mb"], 1e-9),
        "peak_rss_preference_over_sft": median["own"]["peak_rss_mb"] / median["sft"]["peak_rss_mb"],
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def run_arms(arms: tuple[str, ...], args) -> list[dict]:
    """Each arm in a process of its own, `args.repeats` times, the order reversed every other repeat."""
    runs = []
    for repeat in range(args.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            cmd = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--examples", str(args.examples)]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs.append({**json.loads(out), "repeat": repeat})
            print(runs[-1], flush=True)
    return runs


def medians(runs: list[dict], arms: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {arm: {k: statistics.median(r[k] for r in runs if r["arm"] == arm) for k in keys} for arm in arms}


def stage_memory(args) -> None:
    """The `--stage` runs: each arm in its own process, alternating; medians of peak RSS and its growth."""
    supervised_folder()
    runs = run_arms(STAGE_ARMS, args)
    median = medians(runs, STAGE_ARMS, ("seconds_per_step", "peak_rss_mb", "peak_growth_mb", "rss_before_mb"))
    summary = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, CPU only",
        "command": " ".join(sys.argv), "steps": args.steps, "batch": args.batch, "examples": args.examples,
        "median": median, "peak_rss_preference_over_supervised": median["preference"]["peak_rss_mb"]
        / median["supervised"]["peak_rss_mb"], "runs": runs,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
