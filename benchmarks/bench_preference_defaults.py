"""Preference and feedback-weight settings measured directly: supervised, then preference tuning, in one process.

The loop benchmark (bench_feedback_loop.py) goes through the service, the flows and the
gate, which costs minutes per arm and round; this one calls the library the stages call
(`prepare_dataset`, `finetune`, `preference_tune`, `evaluate_model`, `score_preferences`)
on the same simulated users, so that many settings can be compared on the same data:

1. a weak champion: the default data, `--weak-steps` steps;
2. `--users` simulated users ask it in the held-out phrasings (bench_feedback_loop's), rate
   each answer against the hidden reference (5 right, 1 wrong, uniform 1-5 for `--noise`
   of them) and correct `--correct` of the wrong ones; the accepted answers and the
   corrections make the feedback source, the ratings the preference file (through the
   project's own `preference_examples`);
3. per `--weights` value, supervised tuning from the base on the default data plus the
   feedback source at that `data.feedback_weight` (`--steps` steps); scored on the test
   split (prepare's, `eval.max_examples` rows), the feedback split (the corrections held
   out) and `--test-size` fixed held-out prompts;
4. per preference setting (`--configs`, names of `CONFIGS`), preference tuning of the
   supervised model of the first weight, scored the same way plus the held-out preference
   split (reward accuracy, rated-down repeat rate).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_preference_defaults.py --seeds 2 \\
        --workdir /tmp/bench-pref --json benchmarks/results/bench_preference_defaults_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_feedback_loop import held_out_prompts, seed_interval, training_dates, unused_dates  # noqa: E402

# Preference settings tried (overrides of the `preference` section); "defaults" is the section's own.
CONFIGS: dict[str, dict] = {
    "defaults": {},
    "lr5e-4": {"learning_rate": 5e-4},  # the default before these measurements
    "lr1.5e-4": {"learning_rate": 1.5e-4},
    "lr1e-4_s80": {"learning_rate": 1e-4, "max_steps": 80},
    "lr1e-4": {"learning_rate": 1e-4},
    "lr5e-5": {"learning_rate": 5e-5},
    "lr2e-5": {"learning_rate": 2e-5},
    "lr1e-4_s20": {"learning_rate": 1e-4, "max_steps": 20},
    "beta0.5_lr1e-4": {"beta": 0.5, "learning_rate": 1e-4},
    "beta1_lr5e-4": {"beta": 1.0},
    "undes0.3_lr1e-4": {"learning_rate": 1e-4, "desirable_weight": 1.0, "undesirable_weight": 0.3},
    "dpo_lr1e-4": {"loss": "sigmoid", "learning_rate": 1e-4},
    "beta1_lr1e-3": {"beta": 1.0, "learning_rate": 1e-3},
    "beta1_s80": {"beta": 1.0, "max_steps": 80},
    "beta2": {"beta": 2.0},
    "beta2_lr1e-3": {"beta": 2.0, "learning_rate": 1e-3},
    "beta5_lr1e-3": {"beta": 5.0, "learning_rate": 1e-3},
    "beta0.3_lr2e-4": {"beta": 0.3, "learning_rate": 2e-4},
    "lr2e-4": {"learning_rate": 2e-4},
    "dpo_beta1": {"loss": "sigmoid", "beta": 1.0},
    "dpo": {"loss": "sigmoid"},
}


def params_for(seed: int, args: argparse.Namespace, workdir: Path, overrides: dict | None = None):
    from tasks.config import load_params

    base = {"train.seed": seed, "train.max_steps": args.steps, "eval.max_examples": args.eval_examples,
            "preference.path": str(workdir / "preference.jsonl")}
    return load_params(ROOT / "params.yaml", {**base, **(overrides or {})})


def answer_all(model_dir: Path, rows: list[dict]) -> list[str]:
    """Greedy answers of a trained model folder to the rows' prompts, as the service gives them."""
    from tasks.evaluate.generation import generate_batched
    from tasks.model.chat import render_prompt
    from tasks.model.loading import load_trained

    model, tokenizer, info = load_trained(model_dir)
    prompts = [render_prompt(tokenizer, r["messages"][:-1], info.get("system_message", "auto")) for r in rows]
    answers, _, _ = generate_batched(model, tokenizer, prompts, 16, 16)
    return [a.strip() for a in answers]


def simulate_users(weak: Path, users: list[dict], rng: random.Random, args: argparse.Namespace, workdir: Path) -> dict:
    """Rate the weak champion's answers; write the feedback source and the preference file; the counts."""
    from tasks.config import PreferenceParams
    from tasks.feedback.preference import Rated, preference_examples

    rated, feedback = [], []
    for user, answer in zip(users, answer_all(weak, users)):
        reference = user["messages"][-1]["content"]
        right, noisy = answer == reference, rng.random() < args.noise
        rating = rng.randint(1, 5) if noisy else (5 if right else 1)
        fix = reference if (not right and not noisy and rng.random() < args.correct) else None
        rated.append(Rated(user["messages"][:-1], answer, rating, fix))
        if fix is not None:
            feedback.append({"messages": user["messages"][:-1] + [{"role": "assistant", "content": fix}], "correction": True})
        elif rating >= 4 and answer:  # as the feedback export, which keeps no empty answer
            feedback.append({"messages": user["messages"][:-1] + [{"role": "assistant", "content": answer}]})
    rows, counts = preference_examples(rated, PreferenceParams())
    (workdir / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in feedback))
    (workdir / "preference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"right": sum(r.answer == u["messages"][-1]["content"] for r, u in zip(rated, users)),
            "corrections": sum(r.correction is not None for r in rated), **counts}


def scores(model_dir: Path, data_dir: Path, held_out: list[dict], params) -> dict:
    """Exact match on the test split, the feedback split and the held-out prompts; the preference scores."""
    from tasks.evaluate.preference import load_heldout, score_preferences
    from tasks.evaluate.score import evaluate_model, load_split
    from tasks.model.loading import load_trained

    model, tokenizer, info = load_trained(model_dir)
    policy = info.get("system_message", "auto")
    out = {}
    for name, rows in (("test", load_split(data_dir, "test", params.eval.max_examples)),
                       ("feedback", load_split(data_dir, "feedback") if (data_dir / "feedback.jsonl").is_file() else []),
                       ("held_out", held_out)):
        if rows:
            out[f"{name}_em"] = evaluate_model(model, tokenizer, rows, params.eval, system_message=policy)["metrics"]["exact_match"]
            out[f"{name}_n"] = len(rows)
    pref = score_preferences(model, tokenizer, load_heldout(data_dir, 10_000), params.eval, policy)
    out.update({k: pref["metrics"][k] for k in ("reward_accuracy", "reward_margin", "rated_down_repeat_rate")
                if pref and k in pref["metrics"]})
    return out


def run_seed(seed: int, args: argparse.Namespace, held_out: list[dict], rows: list[dict], save) -> None:
    from tasks.data.prepare import prepare_dataset
    from tasks.train.finetune import finetune

    wd = args.workdir / f"seed{seed}"
    if args.reuse and (wd / f"sft-w{args.weights[0]:g}" / "ftllm_model.json").is_file():
        data_dir, model_dir = wd / f"prepared-w{args.weights[0]:g}", wd / f"sft-w{args.weights[0]:g}"
        return tune_preferences(seed, args, held_out, rows, save, wd, data_dir, model_dir)
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    params = params_for(seed, args, wd, {"train.max_steps": args.weak_steps})
    prepare_dataset(ROOT / "data/dates.jsonl", wd / "prepared-weak", params)
    t = time.perf_counter()
    finetune(params, wd / "prepared-weak", wd / "weak", log=_quiet)
    rng = random.Random(seed)
    users = held_out_prompts(unused_dates(args.users, rng, training_dates() | _dates(held_out)), rng)
    counts = simulate_users(wd / "weak", users, rng, args, wd)
    rows.append({"seed": seed, "arm": "weak", "users": counts, "seconds": round(time.perf_counter() - t, 1),
                 **scores(wd / "weak", wd / "prepared-weak", held_out, params)})
    print(json.dumps(rows[-1]), flush=True)
    save()
    sft = {}
    for weight in args.weights:
        t = time.perf_counter()
        params = params_for(seed, args, wd, {"data.sources": [{"path": "data/dates.jsonl"},
                                                              {"path": str(wd / "feedback.jsonl"), "weight": weight}]})
        data_dir, model_dir = wd / f"prepared-w{weight:g}", wd / f"sft-w{weight:g}"
        stats = prepare_dataset(None, data_dir, params)
        finetune(params, data_dir, model_dir, log=_quiet)
        sft[weight] = (data_dir, model_dir)
        rows.append({"seed": seed, "arm": f"sft_w{weight:g}", "weight": weight, "splits": stats["counts"],
                     "seconds": round(time.perf_counter() - t, 1), **scores(model_dir, data_dir, held_out, params)})
        print(json.dumps(rows[-1]), flush=True)
        save()
    tune_preferences(seed, args, held_out, rows, save, wd, *sft[args.weights[0]])


def tune_preferences(seed: int, args: argparse.Namespace, held_out: list[dict], rows: list[dict], save, wd: Path,
                     data_dir: Path, model_dir: Path) -> None:
    """Each preference setting of `--configs` on the supervised model of the first weight."""
    from tasks.train.preference import preference_tune

    for name in args.configs:
        t = time.perf_counter()
        params = params_for(seed, args, wd, {**{"data.sources": [{"path": "data/dates.jsonl"},
                                                                  {"path": str(wd / "feedback.jsonl"),
                                                                   "weight": args.weights[0]}]},
                                             **{f"preference.{k}": v for k, v in CONFIGS[name].items()}})
        out = wd / f"pref-{name}"
        summary = preference_tune(params, data_dir, model_dir, out, log=_quiet)
        rows.append({"seed": seed, "arm": f"pref_{name}", "config": CONFIGS[name], "ran": summary.ran,
                     "examples": summary.examples, "weights": [summary.desirable_weight, summary.undesirable_weight],
                     "first_loss": summary.first_loss, "final_loss": summary.final_loss,
                     "seconds": round(time.perf_counter() - t, 1),
                     **scores(out / "model" if summary.ran else model_dir, data_dir, held_out, params)})
        print(json.dumps(rows[-1]), flush=True)
        save()


def _quiet(_message: str) -> None:
    """The stages' progress lines, left out of the benchmark's output."""


def _dates(rows: list[dict]) -> set[str]:
    from bench_feedback_loop import iso_dates

    return iso_dates(rows)


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        cell = [r for r in rows if r["arm"] == arm]
        entry = {"arm": arm, "seeds": len(cell)}
        for key in ("test_em", "feedback_em", "held_out_em", "reward_accuracy", "rated_down_repeat_rate"):
            values = [r[key] for r in cell if r.get(key) is not None]
            if values:
                entry[key] = round(statistics.mean(values), 4)
                interval = seed_interval(values)
                if interval:
                    entry[f"{key}_ci95"] = [round(v, 4) for v in interval]
        table.append(entry)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--correct", type=float, default=0.3)
    ap.add_argument("--weak-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=300, help="train.max_steps of the supervised runs")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0],
                    help="data.feedback_weight values; preference tuning starts from the first one's model")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--test-size", type=int, default=200)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true",
                    help="keep a seed's supervised models from an earlier run in --workdir; tune and score --configs only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the settings' relative paths (data/dates.jsonl) are the project's
    test_rng = random.Random(10_000)  # bench_feedback_loop's fixed held-out test
    held_out = held_out_prompts(unused_dates(args.test_size, test_rng, training_dates()), test_rng)
    rows: list[dict] = []
    started, load_before = time.time(), os.getloadavg()

    def save() -> list[dict]:
        summary = summarise(rows)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "date": dt.date.today().isoformat(), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
                "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
                "load_average_start": load_before, "load_average_now": os.getloadavg(),
                "minutes": round((time.time() - started) / 60, 1), "summary": summary, "rows": rows}, indent=2) + "\n")
        return summary

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_seed(seed, args, held_out, rows, save)
    for e in save():
        print(json.dumps(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
