"""`ftllm`: the command line of the pipeline.

Each command sets the embedded defaults (project-local Prefect, MLflow and BentoML state)
before importing anything that reads them, prints a human summary, and with `--json`
ends stdout with one JSON object (for `run`, a `tasks.pipeline.result.RunResult`).

Every command runs through `tasks.runner.exit_with`: an expected failure
(`tasks.errors.FtllmError`) is one line on stderr and its exit code, never a traceback (on
stdout too with `--json`). Exit codes: docs/guides/commands.md (`run`: 0 promoted, 3
rejected, 1 failed, 2 usage error).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from tasks.environment import apply_defaults, environment
from tasks.errors import EXIT_FAILED, EXIT_OK, EXIT_REJECTED, ConfigError, FtllmError, RunFailed, UsageError
from tasks.runner import exit_with

if TYPE_CHECKING:
    from tasks.pipeline.result import RunResult

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune, gate, register and serve LLMs.")
feedback_app = typer.Typer(no_args_is_help=True, help="Feedback collected by the service.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks.")
app.add_typer(feedback_app, name="feedback")
app.add_typer(bench_app, name="bench")

SHOWN_METRICS = ("exact_match", "bleu", "rouge_l", "perplexity", "latency_p95_ms")
# The two options of every command that reads settings: the file, and overrides on top of it.
ParamsFile = Annotated[Path, typer.Option("--params", help="Settings file; its folder is the project's (data paths, "
                                                             "artifacts/ and dvc.yaml are relative to it).")]
SetOverrides = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a setting for this command: section.key=value (repeatable).")]


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: the flow stops its stage and the temporary Prefect server it started
    (killed by SIGTERM's default, that server outlived the run, holding its port)."""
    raise KeyboardInterrupt


def _start_temporary_prefect_server() -> None:
    """Start the temporary Prefect server `ftllm run` uses (no PREFECT_API_URL) in a session of
    its own, before the flow would start it in this one.

    Ctrl-C in a terminal signals the whole foreground process group: the server stopped with the
    run, and the flow, reporting its stop to a server that was gone, retried for minutes and
    ended with tracebacks and exit 1. Out of the group, the server outlives the keypress, the
    flow records its stop, and the server is stopped on exit as before (Prefect's atexit hook).
    Prefect gives no option for this: its module's `subprocess` is swapped for the one call.
    """
    import subprocess
    import types

    from prefect.server.api import server as prefect_server

    from ftllm.commands.serve import _stop_with_parent

    def own_session(*args: Any, **kwargs: Any) -> subprocess.Popen:
        # and it stops once this process is gone, even killed with SIGKILL (ftllm serve's way)
        return subprocess.Popen(*args, start_new_session=True, preexec_fn=_stop_with_parent(os.getpid()), **kwargs)

    module = prefect_server.subprocess
    prefect_server.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": own_session})
    try:
        prefect_server.SubprocessASGIServer().start()
    finally:
        prefect_server.subprocess = module


def _emit(obj: Any, as_json: bool) -> None:
    """With --json, print `obj` (a pydantic model or plain data) as the last line of stdout."""
    if not as_json:
        return
    from pydantic import BaseModel

    print(obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj, default=str), flush=True)


@app.command()
@exit_with
def run(
    params: ParamsFile = Path("params.yaml"),
    set_: SetOverrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="End stdout with the run's result as JSON.")] = False,
) -> int:
    """Run the whole retraining flow: validate, prepare, finetune, evaluate, gate, register, package."""
    signal.signal(signal.SIGTERM, _interrupt)  # a supervisor's stop ends the run as Ctrl-C does
    signal.signal(signal.SIGHUP, _interrupt)  # and so does a closed terminal: the Prefect server is out of its reach
    apply_defaults(params.resolve().parent)
    from tasks.config import load_params, parse_overrides
    from tasks.pipeline.result import RunResult

    try:  # bad settings stop the run before Prefect starts (exit 2)
        overrides = parse_overrides(set_ or [])
        load_params(params, overrides)
        if not (params.resolve().parent / "dvc.yaml").is_file():  # its folder is the project the run works in
            raise UsageError(f"--params {params}: its folder has no dvc.yaml, so it is not this project's; keep a "
                             "settings file beside params.yaml (data paths and artifacts/ are relative to its folder)")
    except FtllmError as exc:
        _emit(RunResult(error=str(exc), exit_code=exc.exit_code), as_json)
        exc.json_emitted = True
        raise
    from prefect.settings import PREFECT_API_URL

    from flows.retrain import retrain

    if not PREFECT_API_URL.value():  # no server, from the environment or a Prefect profile: the temporary one
        _start_temporary_prefect_server()
    result = retrain(params_file=str(params.resolve()), overrides=overrides, return_state=True).result(
        raise_on_failure=False
    )
    if isinstance(result, BaseException):  # a bug in the flow: Prefect hands back the exception
        _emit(RunResult(error=f"{type(result).__name__}: {result}", exit_code=EXIT_FAILED), as_json)
        raise result
    if result.status == "failed":
        _emit(result, as_json)
        failure = RunFailed(result.error or "the run failed")
        failure.exit_code, failure.json_emitted = result.exit_code or failure.exit_code, True
        raise failure
    result.exit_code = EXIT_OK if result.status == "promoted" else EXIT_REJECTED
    _print_run(result)
    _emit(result, as_json)
    return result.exit_code


def _console(stderr: bool = False):
    """A rich console; piped, as wide as its tables need (rich took 80 columns and cut values short)."""
    from rich.console import Console

    return Console(stderr=stderr, width=None if (sys.stderr if stderr else sys.stdout).isatty() else 1000)


def _print_run(result: RunResult) -> None:
    """The run's metrics, gate checks and durations, as tables on stderr (stdout is for --json)."""
    from rich.table import Table

    console = _console(stderr=True)
    table = Table(title=f"{result.model_name} v{result.version}: {result.status}")
    table.add_column("model")
    for key in SHOWN_METRICS:
        table.add_column(key, justify="right")
    for role, m in result.metrics.by_model().items():
        table.add_row(role, *(f"{m[k]:.3f}" if k in m else "-" for k in SHOWN_METRICS))
    console.print(table)
    for check in result.gate.checks if result.gate else []:
        mark = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        console.print(f"  {mark} {check.name}: {check.value} (threshold {check.threshold})")
    if not result.changed:
        console.print(f"nothing changed: version {result.version} already holds this model")
    console.print(f"durations (s): {result.durations}")


@app.command("params")
@exit_with
def params_(
    check: Annotated[Optional[Path], typer.Option(
        "--check", help="Validate this settings file: unknown keys, bad values and contradictions (exit 2), "
                        "each with its line; list what differs from the defaults.")] = None,
    write: Annotated[Optional[Path], typer.Option(
        "--write", help="Write this settings file: every key with its description as a comment, keeping the "
                        "values it has and adding the keys it lacks at their defaults.")] = None,
) -> int:
    """Check or write a params.yaml against the settings models; with neither option, print the defaults."""
    from tasks.config import check_params, render_params, write_params

    if check is not None:
        found = check_params(check)
        for line in found.differences:
            print(f"differs from the default: {line}", file=sys.stderr)
        if found.missing:
            print(f"not in the file, so at the default (`ftllm params --write {check}` adds them): "
                  f"{', '.join(found.missing)}", file=sys.stderr)
        if found.errors:
            raise ConfigError("\n".join(found.errors))
        n, s = len(found.differences), "value differs" if len(found.differences) == 1 else "values differ"
        print(f"{check}: valid ({n} {s} from the defaults)", file=sys.stderr)
    if write is not None:
        print(f"wrote {write_params(write)}", file=sys.stderr)
        if errors := check_params(write).errors:  # its values are kept as they were: say which are wrong
            raise ConfigError("\n".join([f"{write}: written with its values kept, but they do not validate:", *errors]))
    if check is None and write is None:
        print(render_params(), end="")
    return EXIT_OK


@app.command()
@exit_with
def validate(
    path: Path,
    format: Annotated[str, typer.Option("--format", help="auto | openai | alpaca | sharegpt")] = "auto",
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the JSON report here, and an offline HTML report beside it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="End stdout with the JSON report.")] = False,
    fix: Annotated[Optional[Path], typer.Option("--fix", help="Write the valid examples here.")] = None,
    params: Annotated[Path, typer.Option("--params", help="Settings file (tokenizer, limits).")] = Path("params.yaml"),
    set_: SetOverrides = None,
) -> int:
    """Validate a data file: format, chat structure, duplicates, token limits (GX Data Docs)."""
    apply_defaults()
    from ftllm.commands.validate import validate_command
    from tasks.config import parse_overrides

    return validate_command(path, format=format, report=report, json_out=as_json, fix=fix, params=params,
                            overrides=parse_overrides(set_ or []))


def _settings(params: Path, set_: list[str] | None):
    """The settings a command reads: the file with its `--set` overrides, validated (exit 2 when bad)."""
    from tasks.config import load_params, parse_overrides

    return load_params(params, parse_overrides(set_ or []))


@app.command()
@exit_with
def models(
    params: ParamsFile = Path("params.yaml"),
    set_: SetOverrides = None,
    data_md5: Annotated[Optional[str], typer.Option("--data-md5", help="List the runs that used this data.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Model versions with aliases, key metrics, gate verdicts and lineage."""
    apply_defaults(params.resolve().parent)
    name = _settings(params, set_).registry.model_name
    from tasks.registry.versions import (
        champion_history,
        champion_version,
        list_versions,
    )

    versions = list_versions(name)
    if as_json:  # lineage: the settings each version was trained and evaluated with
        from tasks.registry.versions import get_client

        client = get_client()
        for v in versions:
            v["params"] = client.get_run(v["run_id"]).data.params if v["run_id"] else {}
    out = {"model_name": name, "champion": champion_version(name), "champion_history": champion_history(name), "versions": versions}
    if data_md5:
        from tasks.registry.tracking import runs_for_data

        out["runs_for_data"] = runs_for_data(data_md5)
    if not as_json:
        from rich.table import Table

        table = Table(title=f"{name} (champion: {out['champion']})")
        for col in ("version", "aliases", "gate", "exact_match", "perplexity", "data_md5", "created", "flow run"):
            table.add_column(col)
        for v in versions:
            m = v["metrics"]
            table.add_row(
                v["version"], ",".join(v["aliases"]), "pass" if v["gate_passed"] else "fail",
                f"{m.get('exact_match', float('nan')):.3f}", f"{m.get('perplexity', float('nan')):.3f}",
                v["lineage"].get("data_md5", "")[:12], v["created"], (v.get("flow_run") or {}).get("name") or "",
            )
        _console().print(table)
        if not versions:  # a name mistyped, or nothing run yet: an empty table says neither
            print(f"{name}: no registered versions (registry.model_name; `ftllm run` registers one)", file=sys.stderr)
        if data_md5:
            runs = Table(title=f"runs that used data {data_md5}")
            for col in ("run", "status", "version"):
                runs.add_column(col)
            for r in out["runs_for_data"]:
                runs.add_row(*(str(r.get(k) or "") for k in ("run_id", "status", "version")))
            _console().print(runs if out["runs_for_data"] else f"no run used data {data_md5}")
    _emit(out, as_json)


def _move_alias(action: str, as_json: bool, **kwargs) -> None:
    """Promote or roll back and report the move; a refusal (exit 1) still ends stdout with JSON.

    With a Prefect server configured (PREFECT_API_URL) the move runs as the `promote` /
    `rollback` flow, so it shows in the server's UI; on the embedded defaults it runs
    directly, since starting the ephemeral API alone takes longer than a rollback may.
    """

    from tasks.registry import versions as registry

    try:
        if environment().prefect_api_url:
            from flows.registry import promote_flow, rollback_flow

            state = (promote_flow if action == "promote" else rollback_flow)(**kwargs, return_state=True)
            move = state.result(raise_on_failure=False)
            if isinstance(move, BaseException):  # a bug in the flow keeps its traceback
                raise move
            if state.is_failed():  # refused: the state's result is the reason in the command line's words
                raise registry.RegistryRefusal(str(move))
        else:
            move = getattr(registry, action)(**kwargs).to_dict()
    except registry.RegistryRefusal as exc:
        _emit({"done": False, "error": str(exc)}, as_json)
        exc.json_emitted = True
        raise
    note = "" if move["changed"] else " (already champion)"
    print(f"champion: {move['previous']} -> {move['champion']}{note}", file=sys.stderr)
    _emit({"done": True, **move}, as_json)


@app.command()
@exit_with
def promote(
    version: str,
    force: Annotated[bool, typer.Option("--force", help="Promote although the gate failed.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (required with --force).")] = "",
    params: ParamsFile = Path("params.yaml"),
    set_: SetOverrides = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Point the champion alias at VERSION."""
    apply_defaults(params.resolve().parent)
    _move_alias("promote", as_json, model_name=_settings(params, set_).registry.model_name, version=version, force=force, reason=reason)


@app.command()
@exit_with
def rollback(
    to: Annotated[Optional[str], typer.Option("--to", help="Version to restore (default: the previous champion).")] = None,
    force: Annotated[bool, typer.Option("--force", help="With --to: a version that never was champion although "
                                                         "its gate failed.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (required with --force).")] = "",
    params: ParamsFile = Path("params.yaml"),
    set_: SetOverrides = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Move the champion alias back to the previous champion (or to --to VERSION)."""
    if force and to is None:
        raise UsageError("--force applies to --to VERSION (a version whose gate failed); the previous champion "
                         "needs no force: leave it out")
    apply_defaults(params.resolve().parent)
    _move_alias("rollback", as_json, model_name=_settings(params, set_).registry.model_name, to=to, force=force,
                reason=reason)


@app.command()
@exit_with
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind; loopback unless told otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 3000,
    bento: Annotated[Optional[str], typer.Option("--bento", help="Bento tag (default: the latest ftllm_chat bento).")] = None,
    params: Annotated[Optional[Path], typer.Option(
        "--params", help="Settings file (default: FTLLM_PARAMS, else params.yaml); params.tools.yaml serves the tools "
                         "task's model.")] = None,
    set_: SetOverrides = None,
) -> int:
    """Serve the champion with an OpenAI-compatible API (BentoML); settings from --params, FTLLM_PARAMS or params.yaml."""
    apply_defaults()
    from ftllm.commands.serve import serve_command
    from tasks.config import parse_overrides

    return serve_command(host=host, port=port, bento=bento, overrides=parse_overrides(set_ or []), params=params)


@feedback_app.command("export")
@exit_with
def feedback_export(
    out: Path,
    min_rating: Annotated[int, typer.Option("--min-rating", help="Lowest rating (1-5) of answers kept.")] = 4,
) -> int:
    """Write accepted and corrected answers as chat training examples (JSONL)."""
    apply_defaults()
    from ftllm.commands.feedback import export_command

    return export_command(out, min_rating)


@feedback_app.command("pending")
@exit_with
def feedback_pending() -> int:
    """Show the feedback that waits for approval: per key, largest contributors, samples, redaction."""
    apply_defaults()
    from ftllm.commands.feedback import pending_command

    return pending_command()


@feedback_app.command("approve")
@exit_with
def feedback_approve(
    all_: Annotated[bool, typer.Option("--all", help="Approve every held row.")] = False,
    key: Annotated[Optional[list[str]], typer.Option("--key", help="Approve this key's held rows (repeatable).")] = None,
    reject: Annotated[bool, typer.Option("--reject", help="Reject every undecided row of the --key keys instead, held or "
                                                          "admitted because the key was trusted (left out of later runs).")] = False,
    reviewer: Annotated[str, typer.Option("--reviewer", help="Recorded with the decision.")] = "cli",
    up_to: Annotated[Optional[int], typer.Option("--up-to", help="Approve only rows with an id up to this (the 'ids "
                                                                   "up to' that `ftllm feedback pending` showed); "
                                                                   "rows posted since stay held.")] = None,
) -> int:
    """Approve (or reject) held feedback, for runs without the Prefect UI."""
    apply_defaults()
    from ftllm.commands.feedback import approve_command

    return approve_command(all_, key or [], reject, reviewer, up_to)


@feedback_app.command("forget")
@exit_with
def feedback_forget(
    user: Annotated[Optional[str], typer.Option("--user", help="Erase this end user's interactions (with --key: "
                                                "the user of that key only).")] = None,
    key: Annotated[Optional[str], typer.Option("--key", help="Erase everything sent with this key.")] = None,
    before: Annotated[Optional[str], typer.Option("--before", help="Erase interactions before this date or ISO time (UTC unless it gives an offset).")] = None,
    expired: Annotated[bool, typer.Option("--expired", help="Erase what is past feedback.retention_days.")] = False,
) -> int:
    """Erase interactions and their feedback; no later export or run includes them."""
    apply_defaults()
    from ftllm.commands.feedback import forget_command

    return forget_command(user, key, before, expired)


@bench_app.command("serve")
@exit_with
def bench_serve(
    url: Annotated[Optional[str], typer.Option("--url", help="The service to measure (default "
                                                "http://127.0.0.1:3000; with --peer, started here).")] = None,
    requests: Annotated[int, typer.Option("--requests", help="Requests per concurrency level.")] = 200,
    concurrency: Annotated[Optional[list[int]], typer.Option("--concurrency", help="Repeatable.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 16,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="FTLLM_API_KEY")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Run the levels this many times in turn; "
                                                           "prints each ratio and their median.")] = 1,
    peer: Annotated[bool, typer.Option("--peer", help="Also measure transformers serve --continuous-batching "
                                                      "on the same model, alternating with the service.")] = False,
    model_dir: Annotated[Optional[Path], typer.Option("--model-dir", help="With --peer: the model folder the "
                                                      "peer serves (default: the one the service reports).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the results as JSON here.")] = None,
) -> int:
    """Load-test the service: requests/s, tokens/s, p50/p95/p99 latency, errors; with --peer,
    side by side with transformers serve --continuous-batching and its answers compared."""
    apply_defaults()
    from serving.bench.bench_serve import bench_serve_command

    return bench_serve_command(url, requests, concurrency or [1, 16], max_tokens, api_key, repeats, peer,
                               model_dir, out)


@bench_app.command("train")
@exit_with
def bench_train(
    args: Annotated[Optional[list[str]], typer.Argument(help="Options of benchmarks/bench_train.py.")] = None,
) -> None:
    """This trainer against TRL's SFTTrainer (packing, padding-free) and transformers.Trainer (padding): trained tokens/s, loss, memory."""
    import runpy

    root = apply_defaults()
    sys.argv = ["bench_train.py", *(args or [])]
    runpy.run_path(str(root / "benchmarks" / "bench_train.py"), run_name="__main__")


@app.command()
@exit_with
def deploy(
    params: ParamsFile = Path("params.yaml"),
    set_: SetOverrides = None,
    work_pool: Annotated[str, typer.Option("--pool", help="Prefect work pool (type process).")] = "ftllm-process",
    train_pool: Annotated[Optional[str], typer.Option(
        "--train-pool", help="Register only the training step, as finetune/POOL, run from this checkout "
                             "(on a GPU machine); runs with workers.train_deployment=finetune/POOL train there.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register the Prefect deployments (retrain on its schedule, promote, rollback) on a Prefect server."""
    if not environment().prefect_api_url:
        raise UsageError("set PREFECT_API_URL to a Prefect server (e.g. `prefect server start`, then "
                         "export PREFECT_API_URL=http://127.0.0.1:4200/api); deployments need a server")
    root = apply_defaults(params.resolve().parent)
    settings = _settings(params, set_)
    if train_pool:
        from flows.deploy import deploy_training

        deployment_id, name = deploy_training(root, train_pool)
        print(f"deployment: {name} (the training step, run from {root})", file=sys.stderr)
        _emit({"deployments": [deployment_id], "work_pool": train_pool, "train_deployment": name}, as_json)
        return
    from flows.deploy import deploy_all
    from tasks.config import parse_overrides

    ids = deploy_all(root, settings, work_pool, parse_overrides(set_ or []))
    monitor = "on" if settings.monitor.active else "off: monitor.active"
    print(f"deployments: retrain/scheduled, promote/manual, rollback/manual, monitor/scheduled (schedule {monitor}) "
          f"on pool {work_pool}; start a worker: prefect worker start --pool {work_pool}", file=sys.stderr)
    _emit({"deployments": ids, "work_pool": work_pool, "schedule": settings.schedule.model_dump()}, as_json)


def main() -> None:
    """The `ftllm` console script."""
    app()


if __name__ == "__main__":
    main()
