"""The service with each decoding loop of `serving.engine` (own, transformers), side by side.

Starts this checkout's service twice on loopback, identical but for `serving.engine`, each
through a settings file of its own (FTLLM_PARAMS: the project's params.yaml with that one
key changed), both serving the registry's champion. The client of `ftllm bench serve` runs
against both, alternating within every level and flipping the order each repeat, so both
see the same load. Per level: each side's medians, the ratio own / transformers of every
repeat and its median; then the greedy answers of the same 64 prompts are compared.

    PYTHONPATH=. python benchmarks/bench_engines.py --requests 300 --concurrency 1 \
        --concurrency 16 --repeats 5 --out benchmarks/results/serve_engines_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
from contextlib import ExitStack
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINES = ("own", "transformers")


def settings_file(folder: Path, engine: str) -> Path:
    """The project's settings with `serving.engine` set to `engine`."""
    import yaml

    from tasks.config import load_params

    root = Path(os.environ["FTLLM_ROOT"])
    params = load_params(root / "params.yaml", {"serving.engine": engine})
    path = folder / f"params-{engine}.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def main(argv: list[str] | None = None) -> int:
    import httpx

    from serving.bench import serve_peer
    from serving.bench.bench_serve import (
        CHECK_PROMPTS,
        Server,
        _level_report,
        _write_json,
        compare_answers,
        greedy_answers,
        load_average,
        prompt_dates,
        run_level,
    )
    from tasks.environment import apply_defaults, environment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, action="append", help="levels (default 1 and 16)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    apply_defaults()  # the project's MLflow, BentoML store and Prefect home, as `ftllm serve` has them
    levels = args.concurrency or [1, 16]

    logs = Path(tempfile.mkdtemp(prefix="ftllm-bench-engines-"))
    load_start = load_average()
    servers: dict[str, Server] = {}
    key = environment().api_key  # the services require it when it is set
    with ExitStack() as stack:
        for engine in ENGINES:
            port = serve_peer.free_port()
            url = f"http://127.0.0.1:{port}"
            print(f"starting the service with serving.engine={engine} on {url}; log {logs / engine}.log", flush=True)
            stack.enter_context(serve_peer.running(
                f"the service (serving.engine={engine})", serve_peer.service_command(port), f"{url}/readyz",
                logs / f"{engine}.log", env={"FTLLM_PARAMS": str(settings_file(logs, engine))}))
            servers[engine] = Server(f"serving.engine={engine}", url, api_key=key.get_secret_value() if key else None)
        runs: dict[int, list] = {level: [] for level in levels}
        for repeat in range(args.repeats):
            for level in levels:
                got = {}
                for engine in (ENGINES if repeat % 2 == 0 else ENGINES[::-1]):
                    try:
                        got[engine] = asyncio.run(run_level(servers[engine], args.requests, level, args.max_tokens))
                    except httpx.HTTPError as exc:
                        raise SystemExit(f"error: {servers[engine].url}: {type(exc).__name__}: {exc}") from None
                    print(f"repeat {repeat + 1}/{args.repeats}, concurrency {level}, {engine}: "
                          f"{got[engine].rps:.1f} req/s, {got[engine].errors} errors", flush=True)
                runs[level].append((got["own"], got["transformers"], load_average()))
        users = prompt_dates(random.Random(0), CHECK_PROMPTS)
        answers = compare_answers(*(asyncio.run(greedy_answers(servers[e], users, max(levels), args.max_tokens))
                                    for e in ENGINES))
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "ours": "serving.engine=own", "peer": "serving.engine=transformers",
        "requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "load_average": {"start": load_start, "end": load_average()},
        "levels": [_level_report(level, runs[level]) for level in levels],
        "answers": {**answers, "concurrency": max(levels)},
    }
    print(f"\nmedians over {args.repeats} repeats, {args.requests} requests per level, max_tokens {args.max_tokens}")
    print(f"{'concurrency':>11} {'own req/s':>10} {'library req/s':>14} {'own/library':>12}  per repeat")
    for lv in report["levels"]:
        print(f"{lv['concurrency']:>11} {lv['ours']['rps']:>10.1f} {lv['peer']['rps']:>14.1f} "
              f"{lv['median_ratio']:>11.2f}x  {', '.join(f'{x:.2f}' for x in lv['ratios'])}")
    print(f"greedy answers: {answers['identical']}/{answers['compared']} identical; "
          f"load average {report['load_average']['start']} -> {report['load_average']['end']}")
    if args.out:
        _write_json(args.out, report)
    errors = any(a.errors or b.errors for pairs in runs.values() for a, b, _ in pairs)
    return 1 if errors or answers["identical"] != answers["compared"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
