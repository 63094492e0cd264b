"""Does the gate tell a regression from noise? Seed-only retrains against sabotaged ones.

Prepares the default data once, fine-tunes the default tiny model once per seed (only
`train.seed` changes), and takes one sabotaged candidate per seed: by default the same run
stopped at half its steps (its checkpoint, so no extra training), or with `--sabotage
corrupt` a run on train answers swapped between examples, or `lr0` (learning rate 0).
It scores every model on the test split with `tasks.evaluate.score.evaluate_model`, and gates each candidate against
the champion (seed 0's model) with `tasks.evaluate.gate.apply_gate`:

- the paired gate (per-example scores, the gate as it is) and
- the fixed-margin gate (aggregate metrics only: the gate before paired checks),

both on the `no_regression_*` checks (the champion comparison; the floors and ceilings do
not depend on it) and on the whole verdict. A seed-only retrain should be rejected in under
5% of repeats, a sabotaged one in at least 95%. Every ordered pair of seed-only models
(i as champion, j as candidate) is gated too, for a larger count of the same rate.

    PYTHONPATH=. python benchmarks/bench_gate.py [--seeds 12] [--steps 300] \
        [--sabotage half-steps|corrupt|lr0] [--corrupt-fraction 0.3] [--work /tmp/bench-gate] \
        [--json benchmarks/results/gate.json]

Each model's scores are kept under `--work` (`<kind>-seed<N>.json`), so a second run
reuses what an interrupted one scored, and `--shard I/N` splits the training between N
processes. `--steps` applies to every model alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corrupt_answers(src: Path, dst: Path, fraction: float, seed: int) -> int:
    """Copy the prepared splits to `dst`, swapping the answers of `fraction` of the train examples."""
    from tasks.files import read_jsonl

    shutil.copytree(src, dst, dirs_exist_ok=True)
    rows = read_jsonl(src / "train.jsonl")
    rng = random.Random(seed)
    picked = rng.sample(range(len(rows)), int(len(rows) * fraction))
    answers = [rows[i]["messages"][-1]["content"] for i in picked]
    rng.shuffle(answers)
    for i, answer in zip(picked, answers):
        rows[i]["messages"][-1]["content"] = answer
    (dst / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(picked)


def train_and_score(params, data_dir: Path, test: list, work: Path, name: str, halfway: bool = False) -> dict:
    """Fine-tune with `params` on `data_dir`, score on `test`; cached as `work/<name>.json`.

    With `halfway`, the checkpoint written at half the steps is scored too (`work/<name>-half.json`):
    the same run stopped halfway, a candidate trained for half the steps at no extra training cost.
    """
    from tasks.evaluate.score import evaluate_model, evaluate_model_dir
    from tasks.model.loading import load_trained
    from tasks.train.checkpoints import checkpoints_dir
    from tasks.train.finetune import finetune

    cached = work / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    out = work / f"model-{name}"
    t0 = time.perf_counter()
    finetune(params, data_dir, out, log=lambda _msg: None)
    trained = time.perf_counter() - t0
    scored = evaluate_model_dir(out, test, params.eval)
    result = {"metrics": scored["metrics"], "per_example": scored["per_example"],
              "train_seconds": round(trained, 1), "eval_seconds": round(time.perf_counter() - t0 - trained, 1)}
    if halfway:
        import torch

        step = checkpoints_dir(out) / f"step-{params.train.max_steps // 2:08d}"
        model, tokenizer, _ = load_trained(out)
        missing = set(torch.load(step / "trainable.pt")) - {n for n, _ in model.named_parameters()}
        assert not missing, f"checkpoint weights the model lacks: {sorted(missing)[:3]}"
        model.load_state_dict(torch.load(step / "trainable.pt"), strict=False)
        half = evaluate_model(model.eval(), tokenizer, test, params.eval)
        (work / f"{name}-half.json").write_text(json.dumps({"metrics": half["metrics"], "per_example": half["per_example"]}))
    cached.write_text(json.dumps(result))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(checkpoints_dir(out), ignore_errors=True)
    return result


def decide(candidate: dict, champion: dict, gate) -> dict:
    """The paired and the fixed-margin verdicts of one candidate against one champion."""
    from tasks.evaluate.gate import apply_gate

    metrics = {"candidate": candidate["metrics"], "champion": champion["metrics"]}
    per_example = {"candidate": candidate["per_example"], "champion": champion["per_example"]}
    paired = apply_gate(metrics, gate, per_example)
    fixed = apply_gate(metrics, gate)

    def champion_failed(verdict) -> list[str]:
        return [c.name for c in verdict.checks if c.name.startswith("no_regression_") and not c.passed]

    em = next(c for c in paired.checks if c.name == "no_regression_exact_match")
    return {
        "paired_rejected": bool(champion_failed(paired)), "paired_failed": champion_failed(paired),
        "fixed_rejected": bool(champion_failed(fixed)), "fixed_failed": champion_failed(fixed),
        "paired_gate_passed": paired.passed, "fixed_gate_passed": fixed.passed,
        "exact_match_diff": em.estimate, "exact_match_interval": [em.low, em.high], "p_value": em.p_value,
        "examples_needed": em.examples_needed,
    }


def sweep(seeded: dict, broken: dict, gate, margins: list[float]) -> list[dict]:
    """Rejection rates (paired, fixed) of the champion checks for other values of gate.max_regression."""
    rows = []
    for margin in margins:
        g = gate.model_copy(update={"max_regression": margin})
        seed_only = [decide(seeded[s], seeded[0], g) for s in sorted(seeded) if s]
        pairs = [decide(seeded[j], seeded[i], g) for i, j in itertools.permutations(sorted(seeded), 2)]
        sabotaged = [decide(broken[s], seeded[0], g) for s in sorted(broken)]
        rows.append({"max_regression": margin, **{
            name: [rate(r, "paired_rejected"), rate(r, "fixed_rejected")]
            for name, r in (("seed_only", seed_only), ("all_pairs", pairs), ("sabotaged", sabotaged))}})
    return rows


def rate(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, default=12, help="seed-only models (seed 0 is the champion)")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps of every model (default: params.yaml)")
    ap.add_argument("--sabotage", choices=["half-steps", "corrupt", "lr0"], default="half-steps")
    ap.add_argument("--corrupt-fraction", type=float, default=0.3, help="share of train answers swapped")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-gate"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/gate.json"))
    ap.add_argument("--margins", default="0.02,0.03,0.05",
                    help="gate.max_regression values of the sweep printed after the summary (no training)")
    ap.add_argument("--summarize", action="store_true",
                    help="train nothing: summarize the models scored so far under --work (marked partial if any is missing)")
    ap.add_argument("--shard", default="0/1",
                    help="I/N: train only every N-th model from the I-th (N processes share the work); "
                         "the summary is written by a run with 0/1 once every model is scored")
    args = ap.parse_args()
    if args.seeds < 3:
        ap.error("--seeds must be at least 3 (one champion, two candidates)")

    from tasks.config import load_params
    from tasks.data.prepare import prepare_dataset
    from tasks.environment import apply_defaults
    from tasks.evaluate.score import load_split

    apply_defaults()
    started = time.perf_counter()
    base = {"train.save_steps": 0}
    if args.steps:
        base["train.max_steps"] = args.steps
    params = load_params(args.params, base)
    args.work.mkdir(parents=True, exist_ok=True)
    prepared = args.work / "prepared"
    if not (prepared / "test.jsonl").exists():
        prepare_dataset(Path(params.data.path), prepared, params)
    test = load_split(prepared, "test", params.eval.max_examples)
    sabotaged_data = prepared
    if args.sabotage == "corrupt":
        sabotaged_data = args.work / "prepared-corrupt"
        if not (sabotaged_data / "train.jsonl").exists():
            corrupt_answers(prepared, sabotaged_data, args.corrupt_fraction, seed=99)
    sabotage = {"corrupt": {}, "lr0": {"train.learning_rate": 0.0}}.get(args.sabotage)
    halfway = args.sabotage == "half-steps"
    if halfway:  # a checkpoint at half the steps, kept until it is scored
        base.update({"train.save_steps": max(1, params.train.max_steps // 2), "train.keep_checkpoints": 2})

    shard, shards = (int(x) for x in args.shard.split("/"))
    jobs = [("seed", s) for s in range(args.seeds)]
    if not halfway:
        jobs += [(args.sabotage, s) for s in range(1, args.seeds)]
    scored: dict[tuple[str, int], dict] = {}
    for index, (kind, seed) in enumerate(jobs):
        if index % shards != shard or args.summarize:
            continue
        overrides = {**base, "train.seed": seed, **(sabotage if kind != "seed" else {})}
        data_dir = prepared if kind == "seed" else sabotaged_data
        scored[kind, seed] = train_and_score(load_params(args.params, overrides), data_dir, test, args.work,
                                             f"{kind}{seed}", halfway=halfway)
        print(f"{kind} {seed}: exact_match {scored[kind, seed]['metrics']['exact_match']:.3f} "
              f"({scored[kind, seed]['train_seconds']} s training, {scored[kind, seed]['eval_seconds']} s scoring)", flush=True)
    if shards > 1:
        print(f"shard {args.shard} scored; run again with --shard 0/1 for the summary")
        return 0
    def load(name: str) -> dict | None:
        path = args.work / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    seeded = {seed: r for seed in range(args.seeds) if (r := load(f"seed{seed}"))}
    broken_name = "seed{}-half" if halfway else args.sabotage + "{}"
    broken = {seed: r for seed in range(1, args.seeds) if (r := load(broken_name.format(seed)))}
    if 0 not in seeded or len(seeded) < 2:
        print("error: seed 0 (the champion) and at least one other seed must be scored first", file=sys.stderr)
        return 1
    partial = len(seeded) < args.seeds or len(broken) < args.seeds - 1
    candidates = sorted(s for s in seeded if s)

    gate = params.gate
    vs_champion = [decide(seeded[s], seeded[0], gate) for s in candidates]
    all_pairs = [decide(seeded[j], seeded[i], gate) for i, j in itertools.permutations(sorted(seeded), 2)]
    sabotaged = [decide(broken[s], seeded[0], gate) for s in sorted(broken)]
    needed = [r["examples_needed"] for r in vs_champion if r["examples_needed"]]
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load average {os.getloadavg()[0]:.1f} at the end",
        "command": " ".join(sys.argv),
        "seeds": args.seeds, "seeds_scored": sorted(seeded), "sabotaged_scored": sorted(broken), "partial": partial,
        "steps": params.train.max_steps, "sabotage": args.sabotage,
        "corrupt_fraction": args.corrupt_fraction if args.sabotage == "corrupt" else None,
        "test_examples": len(test), "max_regression": gate.max_regression, "confidence": gate.confidence,
        "exact_match": {"seed_only": [round(seeded[s]["metrics"]["exact_match"], 4) for s in sorted(seeded)],
                        "sabotaged": [round(broken[s]["metrics"]["exact_match"], 4) for s in sorted(broken)]},
        "seed_only_rejected": {"paired": rate(vs_champion, "paired_rejected"), "fixed": rate(vs_champion, "fixed_rejected"),
                               "repeats": len(vs_champion)},
        "seed_only_rejected_all_pairs": {"paired": rate(all_pairs, "paired_rejected"),
                                         "fixed": rate(all_pairs, "fixed_rejected"), "repeats": len(all_pairs)},
        "sabotaged_rejected": {"paired": rate(sabotaged, "paired_rejected"), "fixed": rate(sabotaged, "fixed_rejected"),
                               "repeats": len(sabotaged)},
        "whole_gate_rejected": {"seed_only_paired": 1 - rate(vs_champion, "paired_gate_passed"),
                                "seed_only_fixed": 1 - rate(vs_champion, "fixed_gate_passed"),
                                "sabotaged_paired": 1 - rate(sabotaged, "paired_gate_passed"),
                                "sabotaged_fixed": 1 - rate(sabotaged, "fixed_gate_passed")},
        "examples_needed_for_max_regression": max(needed) if needed else None,
        "examples_needed_median": sorted(needed)[len(needed) // 2] if needed else None,
        "per_candidate": {"seed_only": vs_champion, "sabotaged": sabotaged},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if partial:
        print(f"PARTIAL: seeds scored {sorted(seeded)}, sabotaged {sorted(broken)} of {args.seeds} seeds")
    print(f"\n{len(test)} test examples, {params.train.max_steps} steps, champion = seed 0, "
          f"gate.max_regression {gate.max_regression}, gate.confidence {gate.confidence}")
    print(f"{'candidates':34s} {'paired gate':>12s} {'fixed margin':>13s}")
    for label, key in (("seed only, vs seed 0", "seed_only_rejected"), ("seed only, every ordered pair", "seed_only_rejected_all_pairs"),
                       (f"sabotaged ({args.sabotage}), vs seed 0", "sabotaged_rejected")):
        row = summary[key]
        print(f"{label:34s} {row['paired']:11.0%} {row['fixed']:12.0%}   rejected of {row['repeats']}")
    print(f"test examples needed for a ±{gate.max_regression} interval on exact match: "
          f"median {summary['examples_needed_median']}, most {summary['examples_needed_for_max_regression']}")
    summary["margin_sweep"] = sweep(seeded, broken, gate, [float(m) for m in args.margins.split(",") if m])
    print(f"{'gate.max_regression':>20s} {'seed only (paired / fixed)':>28s} {'all pairs (paired / fixed)':>28s} "
          f"{'sabotaged (paired / fixed)':>28s}")
    for row in summary["margin_sweep"]:
        print(f"{row['max_regression']:20.3f} {row['seed_only'][0]:13.0%} / {row['seed_only'][1]:<12.0%} "
              f"{row['all_pairs'][0]:13.0%} / {row['all_pairs'][1]:<12.0%} {row['sabotaged'][0]:13.0%} / {row['sabotaged'][1]:<12.0%}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.json} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
