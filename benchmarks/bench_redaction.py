"""Recall and precision of `tasks.feedback.sensitive` per category, on the labelled set of
`tests/support/redaction.py` (chat sentences with e-mail addresses, phone numbers, Luhn-valid card
numbers, IBANs, US social security and UK National Insurance numbers, IPv4/IPv6 addresses
and API keys/tokens, plus hard negatives: dates, ISO dates,
versions, order ids, prices, hashes, and every message of the project's data/dates.jsonl),
and how fast it runs.

    PYTHONPATH=. python benchmarks/bench_redaction.py [--per-category 200] [--negatives 1000] \
        [--seed 24] [--json benchmarks/results/redaction.json]

Targets (asserted by tests/unit/feedback/test_redact.py): recall >= 0.99 on e-mails, cards,
IBANs and secrets, >= 0.95 on phones, IPs and identity numbers, precision >= 0.95 on each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from tests.support.redaction import labelled_cases, score

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=200)
    ap.add_argument("--negatives", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    cases = labelled_cases(args.per_category, args.negatives, args.seed)
    started = time.perf_counter()
    scores = score(cases)
    seconds = time.perf_counter() - started
    table = scores.table()
    print(f"{len(cases)} texts ({sum(not c.items for c in cases)} negatives), "
          f"{len(cases) / seconds:,.0f} texts/s")
    print(f"{'category':<8} {'items':>6} {'found':>6} {'missed':>6} {'false+':>6} {'recall':>7} {'precision':>9}")
    for row in table:
        print(f"{row['category']:<8} {row['items']:>6} {row['found']:>6} {row['missed']:>6} "
              f"{row['false_positives']:>6} {row['recall']:>7.3f} {row['precision']:>9.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "command": " ".join(["python", *sys.argv]),
            "texts": len(cases), "texts_per_second": round(len(cases) / seconds), "categories": table,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
