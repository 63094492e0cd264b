"""`ftllm bench serve`: load-test a running service through its OpenAI API.

For each concurrency level, that many clients send chat completions back to back until
`--requests` have been sent; prints requests/s, completion tokens/s, p50/p95/p99 latency
and errors per level, then the throughput ratio of each level to the lowest.

Before each level, one unmeasured wave of `concurrency` requests at once warms the
service at that level's batch shapes. With `--repeats R` the levels run R times in
turn (1, 16, 1, 16, ...), each repeat gets its own ratio, and the median ratio is printed:
on a machine shared with other work, single runs scatter.

    ftllm serve &                      # in another terminal
    ftllm bench serve --url http://127.0.0.1:3000 --requests 200 --concurrency 1 --concurrency 16 --repeats 3
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

from tasks.errors import EXIT_FAILED, EXIT_OK, UsageError

SYSTEM = "Rewrite the ISO date in words."


@dataclass
class LevelResult:
    """What one concurrency level measured."""

    concurrency: int
    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def _payload(rng: random.Random, max_tokens: int) -> dict:
    date = f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return {"model": "ftllm", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": date}]}


async def run_level(url: str, requests: int, concurrency: int, max_tokens: int, api_key: str | None) -> LevelResult:
    """Send `requests` chat completions from `concurrency` concurrent clients."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    result = LevelResult(concurrency, requests, 0.0)
    counter = iter(range(requests))
    rng = random.Random(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        # Warm-up, not measured: one wave at this level's concurrency, so the first batches of
        # this shape (new padding lengths, new kernel sizes) are not in the figures.
        await asyncio.gather(*(client.post(endpoint, json=_payload(rng, max_tokens)) for _ in range(concurrency)))

        async def worker() -> None:
            for _ in counter:
                started = time.perf_counter()
                try:
                    resp = await client.post(endpoint, json=_payload(rng, max_tokens))
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    result.tokens += resp.json()["usage"]["completion_tokens"]
                    result.latencies.append(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    result.errors += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


def bench_serve_command(url: str, requests: int, concurrency: list[int], max_tokens: int, api_key: str | None,
                        repeats: int = 1) -> int:
    """Benchmark the service at `url` at each concurrency level; 0 when no request failed, else 1.

    Raises:
        UsageError: an option is not positive, or no service answers at `url`.
    """
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if requests < 1 or not concurrency or min(concurrency) < 1 or max_tokens < 1 or repeats < 1:
        raise UsageError("--requests, --concurrency, --max-tokens and --repeats must be positive")
    import httpx

    runs: list[list[LevelResult]] = []
    for repeat in range(repeats):
        runs.append([])
        for level in concurrency:
            console.print(f"repeat {repeat + 1}/{repeats}, concurrency {level}: {requests} requests to {url} ...")
            try:
                runs[-1].append(asyncio.run(run_level(url, requests, level, max_tokens, api_key)))
            except httpx.HTTPError as exc:  # in the warm-up wave: nothing to measure
                raise UsageError(f"{url}: {type(exc).__name__}: {exc or 'no answer'}; "
                                 "is the service running there (ftllm serve)?") from None
    table = Table(title=f"chat completions, max_tokens={max_tokens}")
    for col in ("repeat", "concurrency", "requests", "errors", "req/s", "tokens/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for repeat, results in enumerate(runs, 1):
        for r in results:
            table.add_row(str(repeat), str(r.concurrency), str(r.requests), str(r.errors), f"{r.rps:.1f}",
                          f"{r.tokens_per_s:.0f}", *(f"{r.percentile(q) * 1000:.0f}" for q in (50, 95, 99)))
    console.print(table)
    for r in (r for results in runs for r in results):
        for sample in r.error_samples:
            console.print(f"[red]c={r.concurrency} error:[/] {sample}")
    for level in sorted(set(concurrency))[1:]:
        ratios = [_ratio(results, level) for results in runs]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        median = f"; median {statistics.median(ratios):.2f}x" if repeats > 1 else ""
        console.print(f"throughput ratio c{level}/c{min(concurrency)}: {each}x{median}")
    return EXIT_FAILED if any(r.errors for results in runs for r in results) else EXIT_OK


def _ratio(results: list[LevelResult], level: int) -> float:
    """Requests/s at `level` over requests/s at the lowest level of the same repeat."""
    low = min(results, key=lambda r: r.concurrency)
    high = next(r for r in results if r.concurrency == level)
    return high.rps / low.rps if low.rps else float("nan")
