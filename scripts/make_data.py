"""Generate the default training data: ISO dates rewritten in words, as OpenAI chat JSONL.

The task is small enough for the tiny base model to learn in a minute on two CPU cores,
and its answers are exact, so exact match shows whether fine-tuning worked. The output is
a pure function of the seed and the count; `data.dvc` tracks the result.

    python scripts/make_data.py --out data/dates.jsonl --count 2000 --seed 7
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import random
from pathlib import Path

from tasks.files import write_atomic

SYSTEM = "Rewrite the ISO date in words."
PROMPTS = ["{date}", "Convert this ISO date: {date}", "Date: {date}"]


def make_examples(count: int, seed: int) -> list[dict]:
    """`count` distinct dates between 1900 and 2099, each as a chat example."""
    rng = random.Random(seed)
    start = dt.date(1900, 1, 1).toordinal()
    span = dt.date(2099, 12, 31).toordinal() - start
    days = rng.sample(range(span + 1), count)
    examples = []
    for day in days:
        date = dt.date.fromordinal(start + day)
        answer = f"{calendar.month_name[date.month]} {date.day}, {date.year}"
        prompt = rng.choice(PROMPTS).format(date=date.isoformat())
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/dates.jsonl"))
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in make_examples(args.count, args.seed))
    write_atomic(args.out, lines)
    print(f"wrote {args.count} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
