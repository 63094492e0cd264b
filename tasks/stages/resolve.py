"""DVC stage `resolve`: write the run's settings (params.yaml plus the run's overrides).

Overrides come from FTLLM_OVERRIDES (set by the retrain flow), so `dvc repro` sees a run's
`--set` values without params.yaml being edited. Run alone:

    python -m tasks.stages.resolve --params params.yaml --out artifacts/params.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.config import load_params, overrides_from_env, write_resolved
from tasks.evaluate.baselines import prompt_date
from tasks.runner import run_stage


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="Write the resolved settings of a run.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, default=Path("artifacts/params.yaml"))
    args = ap.parse_args(argv)
    params = load_params(args.params, overrides_from_env())
    write_resolved(params, args.out, prompt_date(params))
    return 0


if __name__ == "__main__":
    run_stage(main)
