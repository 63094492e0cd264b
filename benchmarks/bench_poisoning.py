"""Does an untrusted client's poison reach training? Under the default settings and under auto-approval.

An untrusted key ("evil") asks the service's questions for a few target prompts, several
times each, and corrects every answer with a wrong one (`--poison`); a trusted key ("ops")
and an untrusted honest one ("web") correct other prompts rightly. The log is the
service's own (`tasks.feedback.FeedbackStore`, the rows `POST /feedback` writes: same key,
trust and one-correction-per-completion rules). Each scenario exports it as a run would
(`tasks.feedback.export` with the run's policy: review state, per-key cap, redaction),
counts the poisoned examples that reach the training data, and with `--train` fine-tunes
the tiny model on the base data plus that export and reports its answers on the targets.

Scenarios: `default` (feedback.auto_approve: trusted; nobody approved the held rows),
`auto-approval` (feedback.auto_approve: all), both with the default feedback.max_key_share.

    PYTHONPATH=. python benchmarks/bench_poisoning.py [--targets 10] [--repeats 5] [--base 300] \
        [--train --steps 80] [--json benchmarks/results/poisoning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

SCENARIOS = {"default": "trusted", "auto-approval": "all"}


def build_log(db: Path, targets: list[dict], honest: list[dict], repeats: int, poison: str) -> int:
    """The feedback log of the attack; returns the poisoned corrections posted."""
    from tasks.feedback import FeedbackStore, Interaction

    store = FeedbackStore(db)
    posted = 0
    try:
        for n, example in enumerate(targets + honest):
            prompt, right = example["messages"][:-1], example["messages"][-1]["content"]
            for r in range(repeats if n < len(targets) else 1):
                cid = f"c{n}-{r}"
                key = "evil" if n < len(targets) else ("ops" if n % 2 else "web")
                store.log_interaction(Interaction(cid, "chat", "ftllm-chat", "1", prompt, "?", "stop", 9, 1, 10.0, key))
                if key == "evil":
                    store.add_feedback(cid, 1, poison, key_name="evil", end_user=f"user-{r}")
                    posted += 1
                else:
                    store.add_feedback(cid, 1, right, key_name=key, trusted=key == "ops")
    finally:
        store.close()
    return posted


def run_scenario(db: Path, work: Path, auto_approve: str, base: list[dict], poison: str) -> tuple[list[dict], dict]:
    from tasks.config import FeedbackParams
    from tasks.feedback import export_feedback
    from tasks.feedback.export import ExportPolicy

    defaults = FeedbackParams()
    out = work / f"feedback-{auto_approve}.jsonl"
    exported = export_feedback(db, out, 4, policy=ExportPolicy(auto_approve, defaults.redaction,
                                                               defaults.max_key_share, len(base)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    poisoned = sum(r["messages"][-1]["content"] == poison for r in rows)
    return rows, {"exported": exported.examples, "poisoned_in_training": poisoned, "held": exported.held,
                  "capped": exported.capped, "by_key": exported.by_key}


def train_and_answer(rows: list[dict], base: list[dict], targets: list[dict], work: Path, steps: int,
                     poison: str) -> dict:
    """Fine-tune the tiny model on base + feedback; its answers on the targets."""
    from tasks.config import load_params
    from tasks.evaluate.score import evaluate_model_dir
    from tasks.train.finetune import finetune

    data = work / "prepared"
    data.mkdir(exist_ok=True)
    train = base + [{"messages": r["messages"]} for r in rows]
    (data / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
    (data / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in base[:20]))
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", {"train.max_steps": steps})
    model_dir = work / "model"
    finetune(params, data, model_dir, log=lambda *a, **k: None)
    scored = evaluate_model_dir(model_dir, targets, params.eval)
    answers = scored["per_example"]
    predictions = [s["prediction"] for s in scored["samples"]]
    return {"target_exact_match": scored["metrics"].get("exact_match"),
            "answers_equal_to_poison": sum(p.strip() == poison for p in predictions),
            "answers": [{"prompt": s["prompt"], "right": s["reference"], "model": s["prediction"]}
                        for s in scored["samples"]],
            "scored": len(answers["ids"])}


def main() -> None:
    from make_data import make_examples

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="poisoned corrections per target prompt")
    ap.add_argument("--honest", type=int, default=10)
    ap.add_argument("--base", type=int, default=300)
    ap.add_argument("--poison", default="I cannot help with dates.")
    ap.add_argument("--train", action="store_true", help="also fine-tune and answer the targets")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    examples = make_examples(args.base + args.targets + args.honest, 11)
    base, targets, honest = (examples[:args.base], examples[args.base:args.base + args.targets],
                             examples[args.base + args.targets:])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "feedback.db"
        posted = build_log(db, targets, honest, args.repeats, args.poison)
        print(f"posted: {posted} poisoned corrections from the untrusted key 'evil' on {args.targets} target prompts")
        for name, auto in SCENARIOS.items():
            work = Path(tmp) / name
            work.mkdir()
            t = time.perf_counter()
            rows, figures = run_scenario(db, work, auto, base, args.poison)
            if args.train:
                figures["model"] = train_and_answer(rows, base, targets, work, args.steps, args.poison)
            figures["seconds"] = round(time.perf_counter() - t, 1)
            results[name] = figures
            print(f"{name:>14}: {figures['poisoned_in_training']} poisoned examples reach training "
                  f"({figures['exported']} exported, {figures['held']} held, {figures['capped']} capped, by key "
                  f"{figures['by_key']})")
            if "model" in figures:
                m = figures["model"]
                print(f"{'':>16}model on the targets: {m['answers_equal_to_poison']} of {len(m['answers'])} shown "
                      f"answers are the poison; exact match with the right answers {m['target_exact_match']}")
                for a in m["answers"][:3]:
                    print(f"{'':>18}{a['prompt']!r}: {a['model']!r} (right: {a['right']!r})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs",
            "command": " ".join(["python", *sys.argv]), "posted": posted, "scenarios": results,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
