"""The one runner of every entry point: DVC stage mains and `ftllm` commands.

An expected failure (`tasks.errors.FtllmError`) becomes one line on stderr and the exit
code the error carries; a bug keeps its traceback (exit 1). So every entry point agrees
on where errors go and what they exit with. Stages call `run_stage`; the `ftllm`
commands are wrapped in `exit_with` (a command's parameters stay visible to Typer).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import ParamSpec

from tasks.errors import EXIT_OK, FtllmError

P = ParamSpec("P")

EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def report(exc: FtllmError) -> int:
    """Print an expected failure as one line on stderr; its exit code."""
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return exc.exit_code


def run_entry(main: Callable[[], int | None], as_json: bool = False) -> int:
    """Call `main`; its exit code, with expected failures reported instead of raised.

    `as_json` (a command's `--json`): a failure also ends stdout with one JSON object,
    `{"error": ..., "exit_code": ...}`, so a script reading the last line gets one either way.
    """
    try:
        code = main()
    except FtllmError as exc:
        if as_json and not getattr(exc, "json_emitted", False):  # else the command ended stdout with its own result
            print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}), flush=True)
        return report(exc)
    except KeyboardInterrupt:
        if as_json:
            print(json.dumps({"error": "interrupted", "exit_code": EXIT_INTERRUPTED}), flush=True)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if code is None else code


def run_stage(main: Callable[[list[str]], int | None]) -> None:
    """Run a stage's `main` on the command line's arguments and exit with its code."""
    raise SystemExit(run_entry(lambda: main(sys.argv[1:])))


def exit_with(command: Callable[P, int | None]) -> Callable[P, None]:
    """Wrap a command: it runs through `run_entry`, and a non-zero code ends the process with it.

    `functools.wraps` keeps the command's signature and annotations, which is what Typer
    and Click read to build the command line; `SystemExit` is how both expect a command to
    set the exit status.
    """

    @functools.wraps(command)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> None:
        code = run_entry(lambda: command(*args, **kwargs), as_json=kwargs.get("as_json") is True)
        if code != EXIT_OK:
            raise SystemExit(code)

    return wrapped
