"""`ftllm bench serve`: load-test the service through its OpenAI API, alone or beside
`transformers serve --continuous-batching` on the same model.

For each concurrency level, that many clients send greedy chat completions back to back
until `--requests` have been sent; the report has requests/s, completion tokens/s,
p50/p95/p99 latency and errors per level. Before each level, one unmeasured wave of
`concurrency` requests at once warms the server at that level's batch shapes. With
`--repeats R` the levels run R times in turn: on a machine shared with other work single
runs scatter, so ratios are taken per repeat and their median is printed.

Alone (`--url`, default http://127.0.0.1:3000): the service already running there; prints
the throughput ratio of each level to the lowest.

With `--peer`: the same client against the service and against `transformers serve
--continuous-batching` (the transformers library's own continuous batching, paged
attention) serving the same weights, both on loopback, in one run. Without `--url` the
command starts the service itself (this checkout's `serving/`, which serves the registry's
champion); with `--url` it measures the service there. The peer serves the folder of the
version the service reports at `/v1/models` (or `--model-dir`), with the LoRA weights
merged as the engine merges them. The two alternate within every level and repeat (the
order flips each repeat), so both see the same load; per level the report gives each
side's medians, every repeat's ratio of requests/s and their median, and the machine's
load average. Then the same greedy prompts go to both, and their answers are compared
prompt by prompt. `--out FILE` also writes everything as JSON.

    ftllm bench serve --url http://127.0.0.1:3000 --requests 200 --concurrency 1 --concurrency 16 --repeats 3
    ftllm bench serve --peer --requests 400 --concurrency 1 --concurrency 16 --repeats 3 --out result.json
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from tasks.errors import EXIT_FAILED, EXIT_OK, UsageError

SYSTEM = "Rewrite the ISO date in words."
DEFAULT_URL = "http://127.0.0.1:3000"
# Prompts whose greedy answers are compared between the two servers.
CHECK_PROMPTS = 64


@dataclass
class Server:
    """A server under test: its base URL and what its requests send as `model` (None: no
    `model`, which `ftllm serve` reads as its one served model; it refuses other names)."""

    name: str
    url: str
    model: str | None = None
    api_key: str | None = None


@dataclass
class LevelResult:
    """What one concurrency level measured on one server."""

    concurrency: int
    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)

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

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "rps": round(self.rps, 2),
                "tokens_per_s": round(self.tokens_per_s, 1),
                **{f"p{q}_ms": round(self.percentile(q) * 1000, 1) for q in (50, 95, 99)}}


def prompt_dates(rng: random.Random, n: int) -> list[str]:
    """`n` ISO dates, the user messages of the benchmark's requests."""
    return [f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" for _ in range(n)]


def _payload(user: str, max_tokens: int, model: str | None) -> dict:
    return {**({"model": model} if model is not None else {}), "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}


def _answer(resp) -> tuple[str, int]:
    """The answer's text and completion tokens; raises on a failed request."""
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
    body = resp.json()
    return body["choices"][0]["message"]["content"] or "", body["usage"]["completion_tokens"]


async def run_level(server: Server, requests: int, concurrency: int, max_tokens: int) -> LevelResult:
    """Send `requests` chat completions from `concurrency` concurrent clients to `server`.

    The prompts depend only on `concurrency`, so every server gets the same ones.
    """
    import httpx

    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    endpoint = server.url.rstrip("/") + "/v1/chat/completions"
    result = LevelResult(concurrency, requests, 0.0)
    rng = random.Random(concurrency)
    warm, users = prompt_dates(rng, concurrency), iter(prompt_dates(rng, requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:
        # Warm-up, not measured: one wave at this level's concurrency, so the first batches of
        # this shape (new padding lengths, new kernel sizes) are not in the figures.
        await asyncio.gather(*(client.post(endpoint, json=_payload(u, max_tokens, server.model)) for u in warm))

        async def worker() -> None:
            for user in users:
                started = time.perf_counter()
                try:
                    text, tokens = _answer(await client.post(endpoint, json=_payload(user, max_tokens, server.model)))
                    result.tokens += tokens
                    result.latencies.append(time.perf_counter() - started)
                    result.answers[user] = text
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    result.errors += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
    return result


async def greedy_answers(server: Server, users: list[str], concurrency: int, max_tokens: int) -> dict[str, str]:
    """`server`'s greedy answers to `users`, sent `concurrency` at a time (so in batches)."""
    import httpx

    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    endpoint = server.url.rstrip("/") + "/v1/chat/completions"
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        async def ask(user: str) -> str:
            async with gate:
                return _answer(await client.post(endpoint, json=_payload(user, max_tokens, server.model)))[0]

        return dict(zip(users, await asyncio.gather(*(ask(u) for u in users))))


def compare_answers(ours: dict[str, str], theirs: dict[str, str]) -> dict:
    """Prompt by prompt: how many prompts both answered, how many alike, the first that differ."""
    common = [p for p in ours if p in theirs]
    differ = [{"prompt": p, "ours": ours[p], "peer": theirs[p]} for p in common if ours[p] != theirs[p]]
    return {"compared": len(common), "identical": len(common) - len(differ), "differ": differ[:5]}


def _console():
    import sys

    from rich.console import Console

    # Piped into a file, rich would wrap the tables at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 160)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _check_options(requests: int, concurrency: list[int], max_tokens: int, repeats: int) -> None:
    if requests < 1 or not concurrency or min(concurrency) < 1 or max_tokens < 1 or repeats < 1:
        raise UsageError("--requests, --concurrency, --max-tokens and --repeats must be positive")


def _no_service(url: str, exc: Exception) -> UsageError:
    return UsageError(f"{url}: {type(exc).__name__}: {exc or 'no answer'}; is the service running there (ftllm serve)?")


def bench_serve_command(url: str | None, requests: int, concurrency: list[int], max_tokens: int, api_key: str | None,
                        repeats: int = 1, peer: bool = False, model_dir: Path | None = None,
                        out: Path | None = None) -> int:
    """Benchmark the service (and with `peer`, `transformers serve` beside it); 0 when no
    request failed (and with `peer`, every compared answer was identical), else 1.

    Raises:
        UsageError: an option is not positive, or no service answers at `url`.
        PeerError: with `peer`, a server could not start.
    """
    _check_options(requests, concurrency, max_tokens, repeats)
    if peer:
        return _bench_with_peer(url, requests, concurrency, max_tokens, api_key, repeats, model_dir, out)
    if model_dir is not None:
        raise UsageError("--model-dir names the peer's model folder: use it with --peer")
    return _bench_alone(url or DEFAULT_URL, requests, concurrency, max_tokens, api_key, repeats, out)


def _bench_alone(url: str, requests: int, concurrency: list[int], max_tokens: int, api_key: str | None,
                 repeats: int, out: Path | None) -> int:
    import httpx
    from rich.table import Table

    console = _console()
    server = Server("ftllm serve", url, api_key=api_key)
    runs: list[list[LevelResult]] = []
    for repeat in range(repeats):
        runs.append([])
        for level in concurrency:
            console.print(f"repeat {repeat + 1}/{repeats}, concurrency {level}: {requests} requests to {url} ...")
            try:
                runs[-1].append(asyncio.run(run_level(server, requests, level, max_tokens)))
            except httpx.HTTPError as exc:  # in the warm-up wave: nothing to measure
                raise _no_service(url, exc) from None
    table = Table(title=f"chat completions, max_tokens={max_tokens}")
    for col in ("repeat", "concurrency", "requests", "errors", "req/s", "tokens/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for repeat, results in enumerate(runs, 1):
        for r in results:
            table.add_row(str(repeat), str(r.concurrency), str(r.requests), str(r.errors), f"{r.rps:.1f}",
                          f"{r.tokens_per_s:.0f}", *(f"{r.percentile(q) * 1000:.0f}" for q in (50, 95, 99)))
    console.print(table)
    _print_errors(console, [r for results in runs for r in results])
    for level in sorted(set(concurrency))[1:]:
        ratios = [_ratio(results, level) for results in runs]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        median = f"; median {statistics.median(ratios):.2f}x" if repeats > 1 else ""
        console.print(f"throughput ratio c{level}/c{min(concurrency)}: {each}x{median}")
    console.print(f"load average (1, 5, 15 min): {load_average()}")
    if out is not None:
        _write_json(out, {"url": url, "max_tokens": max_tokens, "load_average": load_average(),
                          "repeats": [[r.summary() for r in results] for results in runs]})
    return EXIT_FAILED if any(r.errors for results in runs for r in results) else EXIT_OK


def _bench_with_peer(url: str | None, requests: int, concurrency: list[int], max_tokens: int, api_key: str | None,
                     repeats: int, model_dir: Path | None, out: Path | None) -> int:
    import httpx

    from serving.bench import serve_peer

    console = _console()
    logs = Path(tempfile.mkdtemp(prefix="ftllm-bench-"))
    load_start = load_average()
    with ExitStack() as stack:
        if url is None:
            port = serve_peer.free_port()
            url = f"http://127.0.0.1:{port}"
            console.print(f"starting the service (this checkout's serving/) on {url}; log {logs / 'service.log'}")
            stack.enter_context(serve_peer.running("the service (bentoml serve)", serve_peer.service_command(port),
                                                   f"{url}/readyz", logs / "service.log"))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            served = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10).raise_for_status().json()
        except httpx.HTTPError as exc:
            raise _no_service(url, exc) from None
        info = served["data"][0]
        if model_dir is None:
            model_dir = stack.enter_context(serve_peer.served_model_dir(info["id"], str(info["version"]),
                                                                        str(info["source"])))
        folder = stack.enter_context(serve_peer.merged_folder(Path(model_dir)))
        peer_port = serve_peer.free_port()
        peer_url = f"http://127.0.0.1:{peer_port}"
        console.print(f"starting the peer (transformers serve --continuous-batching) on {peer_url}; "
                      f"log {logs / 'peer.log'}")
        stack.enter_context(serve_peer.running("the peer (transformers serve --continuous-batching)",
                                               serve_peer.peer_command(folder, peer_port), f"{peer_url}/health",
                                               logs / "peer.log", env=serve_peer.peer_env()))
        # The peer takes a request's `model` only when it is its folder's path (or absent).
        ours, theirs = Server("ftllm serve", url, api_key=api_key), Server("transformers serve", peer_url, str(folder))
        runs: dict[int, list[tuple[LevelResult, LevelResult, list[float]]]] = {level: [] for level in concurrency}
        for repeat in range(repeats):
            for level in concurrency:
                pair = {}
                for server in ((ours, theirs) if repeat % 2 == 0 else (theirs, ours)):
                    console.print(f"repeat {repeat + 1}/{repeats}, concurrency {level}, {server.name}: "
                                  f"{requests} requests ...")
                    try:
                        pair[server.name] = asyncio.run(run_level(server, requests, level, max_tokens))
                    except httpx.HTTPError as exc:
                        raise _no_service(server.url, exc) from None
                runs[level].append((pair[ours.name], pair[theirs.name], load_average()))
        users = prompt_dates(random.Random(0), CHECK_PROMPTS)
        check_level = max(concurrency)
        answers = compare_answers(asyncio.run(greedy_answers(ours, users, check_level, max_tokens)),
                                  asyncio.run(greedy_answers(theirs, users, check_level, max_tokens)))
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "service": {"url": url, "model": info["id"], "version": info["version"], "source": info["source"]},
        "peer": "transformers serve --continuous-batching (CPU, "
                f"--cb-num-blocks {serve_peer.PEER_NUM_BLOCKS} --cb-max-batch-tokens {serve_peer.PEER_MAX_BATCH_TOKENS}, "
                f"OMP_NUM_THREADS={serve_peer.peer_env()['OMP_NUM_THREADS']})",
        "requests": requests, "max_tokens": max_tokens, "repeats": repeats,
        "load_average": {"start": load_start, "end": load_average()},
        "levels": [_level_report(level, runs[level]) for level in concurrency],
        "answers": {**answers, "concurrency": check_level},
    }
    _print_peer_report(console, report, runs)
    if out is not None:
        _write_json(out, report)
    failed = any(a.errors or b.errors for pairs in runs.values() for a, b, _ in pairs)
    return EXIT_FAILED if failed or answers["identical"] != answers["compared"] else EXIT_OK


def _level_report(level: int, pairs: list[tuple[LevelResult, LevelResult, list[float]]]) -> dict:
    def medians(results: list[LevelResult]) -> dict:
        return {"rps": round(statistics.median(r.rps for r in results), 2),
                "tokens_per_s": round(statistics.median(r.tokens_per_s for r in results), 1),
                "p50_ms": round(statistics.median(r.percentile(50) for r in results) * 1000, 1),
                "p95_ms": round(statistics.median(r.percentile(95) for r in results) * 1000, 1)}

    ratios = [a.rps / b.rps if b.rps else float("nan") for a, b, _ in pairs]
    return {"concurrency": level, "ours": medians([a for a, _, _ in pairs]), "peer": medians([b for _, b, _ in pairs]),
            "ratios": [round(x, 3) for x in ratios], "median_ratio": round(statistics.median(ratios), 3),
            "repeats": [{"ours": a.summary(), "peer": b.summary(), "load_average": load} for a, b, load in pairs]}


def _print_peer_report(console, report: dict, runs: dict) -> None:
    from rich.table import Table

    table = Table(title=f"every repeat: chat completions, greedy, max_tokens={report['max_tokens']}, "
                        f"{report['requests']} requests per level")
    for col in ("concurrency", "repeat", "server", "errors", "req/s", "tokens/s", "p50 ms", "p95 ms", "load 1 min"):
        table.add_column(col, justify="right")
    for level, pairs in runs.items():
        for repeat, (a, b, load) in enumerate(pairs, 1):
            for name, r in (("ftllm serve", a), ("transformers serve", b)):
                table.add_row(str(level), str(repeat), name, str(r.errors), f"{r.rps:.1f}", f"{r.tokens_per_s:.0f}",
                              f"{r.percentile(50) * 1000:.0f}", f"{r.percentile(95) * 1000:.0f}", f"{load[0]:.2f}")
    console.print(table)
    summary = Table(title="medians over repeats: ftllm serve vs transformers serve --continuous-batching")
    for col in ("concurrency", "req/s ours", "req/s peer", "ratio (median)", "ratio per repeat", "tokens/s ours",
                "tokens/s peer", "p50 ms ours", "p50 ms peer", "p95 ms ours", "p95 ms peer"):
        summary.add_column(col, justify="right")
    for lv in report["levels"]:
        o, p = lv["ours"], lv["peer"]
        summary.add_row(str(lv["concurrency"]), f"{o['rps']:.1f}", f"{p['rps']:.1f}", f"{lv['median_ratio']:.2f}x",
                        ", ".join(f"{x:.2f}" for x in lv["ratios"]), f"{o['tokens_per_s']:.0f}",
                        f"{p['tokens_per_s']:.0f}", f"{o['p50_ms']:.0f}", f"{p['p50_ms']:.0f}", f"{o['p95_ms']:.0f}",
                        f"{p['p95_ms']:.0f}")
    console.print(summary)
    _print_errors(console, [r for pairs in runs.values() for a, b, _ in pairs for r in (a, b)])
    ans = report["answers"]
    console.print(f"greedy answers, {ans['compared']} prompts at concurrency {ans['concurrency']}: "
                  f"{ans['identical']}/{ans['compared']} identical")
    for d in ans["differ"]:
        console.print(f"[red]differs[/] {d['prompt']}: ours {d['ours']!r}, peer {d['peer']!r}")
    load = report["load_average"]
    console.print(f"load average (1, 5, 15 min): {load['start']} at the start, {load['end']} at the end; "
                  f"{report['machine']}")


def _print_errors(console, results: list[LevelResult]) -> None:
    for r in results:
        for sample in r.error_samples:
            console.print(f"[red]c={r.concurrency} error:[/] {sample}")


def _write_json(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def _ratio(results: list[LevelResult], level: int) -> float:
    """Requests/s at `level` over requests/s at the lowest level of the same repeat."""
    low = min(results, key=lambda r: r.concurrency)
    high = next(r for r in results if r.concurrency == level)
    return high.rps / low.rps if low.rps else float("nan")
