"""Benchmark of `validate_dataset`: examples per second, seconds and peak memory per data size.

Generates chat JSONL files of 10k and 100k examples (1M with `--full`; about 400 bytes
each, so 100k is about 40 MB) in a temporary folder and validates each in a fresh
process with the run's tokenizer (the tiny base model) and the Great Expectations
checkpoint, so that peak RSS is per size and the growth with size can be read off.
"seconds" is wall time; "CPU s" the process's CPU time (user + system), which is what to
compare when other work shares the machine.

    python benchmarks/bench_validate.py [--full] [--no-gx] [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is you that it he was for on are as with his they at be this have from date month year".split()


def make_file(path: Path, count: int, seed: int = 0) -> Path:
    """Write `count` distinct chat examples of about 400 bytes each."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            user = f"Question {i}: " + " ".join(rng.choices(WORDS, k=30))
            answer = " ".join(rng.choices(WORDS, k=35)) + "."
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": user},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_one(path: Path, gx_dir: Path | None) -> dict:
    """Validate `path` in this process and return seconds, examples and peak RSS."""
    import resource

    from tasks.config import DataParams, ModelParams
    from tasks.data.validate import validate_dataset
    from tasks.model.loading import load_tokenizer, resolve_base

    tokenizer = load_tokenizer(resolve_base(ModelParams()))
    start, cpu_start = time.perf_counter(), time.process_time()
    report = validate_dataset(path, DataParams(max_tokens=256), tokenizer=tokenizer, data_docs_dir=gx_dir)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"examples": report.examples, "seconds": seconds, "cpu_seconds": cpu, "valid": report.valid, "peak_rss_mb": peak_mb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also 1,000,000 examples")
    ap.add_argument("--no-gx", action="store_true", help="skip the Great Expectations checkpoint")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # child process: validate one file
    ap.add_argument("--gx-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.gx_dir)))
        return 0
    sizes = args.sizes or ([10_000, 100_000, 1_000_000] if args.full else [10_000, 100_000])
    from rich.console import Console
    from rich.table import Table

    table = Table(title="validate_dataset (tiny tokenizer" + (")" if args.no_gx else ", GX checkpoint)"))
    for col in ("examples", "MB", "seconds", "CPU s", "examples/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = make_file(Path(tmp) / f"chat_{n}.jsonl", n)
            cmd = [sys.executable, __file__, "--one", str(path)]
            if not args.no_gx:
                cmd += ["--gx-dir", str(Path(tmp) / "gx")]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            table.add_row(
                f"{n:,}", f"{path.stat().st_size / 1e6:.1f}", f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
                f"{r['examples'] / r['seconds']:,.0f}", f"{r['peak_rss_mb']:.0f}",
            )  # fmt: skip
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
