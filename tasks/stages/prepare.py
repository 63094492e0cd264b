"""DVC stage `prepare`: the sources merged into canonical, deduplicated, length-limited train/val/test splits.

Run alone (after `resolve`):

    python -m tasks.stages.prepare --params artifacts/params.yaml --out artifacts/prepared
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.config import load_params
from tasks.data.prepare import prepare_dataset
from tasks.runner import run_stage


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Prepare train/val/test splits (the DVC stage).")
    ap.add_argument("--params", type=Path, default=Path("artifacts/params.yaml"))
    ap.add_argument("--out", type=Path, default=Path("artifacts/prepared"))
    args = ap.parse_args(argv)
    params = load_params(args.params)
    stats = prepare_dataset(None, args.out, params)
    counts = stats["counts"]
    feedback = f", feedback {counts['feedback']}" if "feedback" in counts else ""
    print(
        f"prepared {stats['examples']} examples from {len(stats['sources'])} source(s) into {args.out}: "
        f"train {counts['train']}, val {counts['val']}, test {counts['test']}{feedback}; invalid rows dropped "
        f"{stats['invalid_dropped']}, replaced by corrections {stats['corrections']['replaced']}, deduplicated "
        f"{sum(stats['deduplicated'].values())}, dropped {stats['dropped']}, truncated {stats['truncated']}"
    )
    return 0


if __name__ == "__main__":
    run_stage(main)
