"""Validating a training data file before anything downstream runs.

Every example is converted to canonical chat messages (`tasks.data.formats`), checked,
normalised and deduplicated (`tasks.data.checks`), and counted in tokens with the run's
tokenizer, chat template and `data.system_message` (`tasks.data.tokens`, through the
encoder training uses, so the trained tokens reported are the ones training gets; an
example with none is a `no_trained_tokens` error). Each problem belongs to a named
category with a count and the offending line numbers; the per-example checks also run as
one Great Expectations suite (`tasks.data.gx`), whose checkpoint builds the HTML Data Docs.

Over-long examples (more than `data.max_tokens` tokens) are handled by prepare's
`data.length_policy`: dropped, or truncated (the last answer cut to fit; an example whose
prompt alone reaches the limit cannot be truncated and is dropped). They are a *warning*
while the share of examples prepare would drop stays within `data.max_drop_fraction`, and
an *error* (the same category, every over-long line listed) once it exceeds it. The
train/test overlap check needs the split, so `tasks.data.prepare` runs it.

`ftllm validate PATH` is the command-line front end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import DataParams
from tasks.data.checks import (
    CheckedExample,
    Deduplicator,
    check_messages,
    check_warnings,
    iter_checked,
    normalise_example,
    resolve_format,
)
from tasks.data.formats import FORMATS
from tasks.data.gx import run_gx_suite
from tasks.data.tokens import (
    TOKEN_CHUNK,
    TrainingBudget,
    count_chat_tokens,
    estimate_training,
    length_decision,
    summarize,
    untrainable,
)
from tasks.errors import DataFileError
from tasks.files import open_atomic
from tasks.model.chat import system_handling

__all__ = [
    "DataFileError",
    "TrainingBudget",
    "ValidationReport",
    "validate_dataset",
    "count_chat_tokens",
    "check_messages",
    "render_report",
    "write_fixed",
]


MAX_ROWS = 100


@dataclass
class ValidationReport:
    """The outcome of validating one data file; `to_dict()` is the `validate --json` contract."""

    valid: bool
    format: str
    path: str
    md5: str
    examples: int
    invalid_examples: int
    errors: dict[str, int]
    error_rows: list[dict[str, Any]]
    error_lines: dict[str, list[int]]
    warnings: dict[str, int]
    warning_rows: list[dict[str, Any]]
    token_stats: dict[str, Any] | None
    length_policy: str
    dropped: int
    truncated: int
    dropped_fraction: float
    max_drop_fraction: float
    system_message: dict[str, Any] | None = None
    # Examples that cannot be trained on at all (a structural error, or no trained token):
    # what a source's `invalid_rows: drop` leaves out, up to its `max_invalid_share`.
    unusable_examples: int = 0
    data_docs: str | None = None
    gx: dict[str, Any] | None = None
    # Ordinals (0-based, in reading order) of the examples `--fix` leaves out; not serialised.
    bad_examples: set[int] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data (without the internal `bad_examples`)."""
        return {
            "valid": self.valid,
            "format": self.format,
            "path": self.path,
            "md5": self.md5,
            "examples": self.examples,
            "invalid_examples": self.invalid_examples,
            "errors": self.errors,
            "error_rows": self.error_rows,
            "error_lines": self.error_lines,
            "warnings": self.warnings,
            "warning_rows": self.warning_rows,
            "token_stats": self.token_stats,
            "length_policy": self.length_policy,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "dropped_fraction": self.dropped_fraction,
            "max_drop_fraction": self.max_drop_fraction,
            "system_message": self.system_message,
            "unusable_examples": self.unusable_examples,
            "data_docs": self.data_docs,
            "gx": self.gx,
        }


class _Tally:
    """Counts, first rows and first lines per category, gathered while reading."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def add(self, category: str, line: int, message: str) -> None:
        self.counts[category] = self.counts.get(category, 0) + 1
        rows = self.rows.setdefault(category, [])
        if len(rows) < MAX_ROWS:
            rows.append({"line": line, "category": category, "message": message})

    def first_rows(self) -> list[dict[str, Any]]:
        rows = [r for cat in self.rows.values() for r in cat]
        return sorted(rows, key=lambda r: r["line"])[:MAX_ROWS]

    def lines(self) -> dict[str, list[int]]:
        return {cat: [r["line"] for r in rows] for cat, rows in self.rows.items()}




def _row(c: CheckedExample) -> dict[str, Any]:
    p = c.problems
    if c.example is None:
        return {"line": c.line, "parsed": False}
    messages = c.example.get("messages")
    n = len(messages) if isinstance(messages, list) else 0
    roles = [m.get("role") for m in messages if isinstance(m, dict)] if n else []
    return {
        "line": c.line,
        "parsed": True,
        "n_messages": n,
        "fields_ok": "message_missing_field" not in p if n else None,
        "keys_ok": "unrecognised_keys" not in p,
        "roles_ok": "unknown_role" not in p if n else None,
        "content_ok": "bad_content" not in p if n else None,
        "has_assistant": "assistant" in roles if n else None,
        "last_role": (str(roles[-1]) if roles else None) if "no_assistant" not in p else None,
        "alternating": "consecutive_same_role" not in p if n else None,
        "system_first": "system_not_first" not in p if n else None,
        "is_duplicate": False if c.structurally_ok else None,
        "is_near_duplicate": False if c.structurally_ok else None,
    }


def validate_dataset(
    path: Path,
    data: DataParams | None = None,
    *,
    fmt: str | None = None,
    tokenizer=None,
    budget: TrainingBudget | None = None,
    data_docs_dir: Path | None = None,
    show_progress: bool = False,
) -> ValidationReport:
    """Validate a data file: categories of errors and warnings, token statistics, GX Data Docs.

    Args:
        path: a JSONL file or JSON array in a supported format.
        data: the `data:` settings (format, max_tokens, length_policy, max_drop_fraction,
            min_answer_chars, system_message); defaults when None.
        fmt: "auto", "openai", "alpaca" or "sharegpt", overriding `data.format` (`--format`).
        tokenizer: the run's tokenizer; None skips token counts and the token checks.
        budget: training settings for the epoch and step estimate (defaults when None).
        data_docs_dir: project root of the Great Expectations context (e.g. `artifacts/gx`);
            the suite runs and Data Docs are built there. None skips Great Expectations.
        show_progress: show a progress bar (on stderr) while reading.

    Returns:
        The report; `report.valid` is False when any error category is non-zero.

    Raises:
        DataFileError: the file is missing, a directory or cannot be opened.
        FormatError: `fmt` is not a supported format name.
        ConfigError: the chat template cannot be masked, or keeps no system message under
            `data.system_message: keep`.
    """
    from tasks.files import file_md5

    path = Path(path)
    data = data or DataParams()
    budget = budget or TrainingBudget()
    max_tokens = data.max_tokens if tokenizer is not None else None
    reported_fmt, conv_fmt = resolve_format(path, fmt or data.format)
    errors, warns = _Tally(), _Tally()
    rows: list[dict[str, Any]] = []
    bad: set[int] = set()
    unusable: set[int] = set()
    dedup = Deduplicator()
    pending: list[CheckedExample] = []
    n_messages: list[int] = []
    with_system = 0

    def flush() -> None:
        counts = count_chat_tokens(tokenizer, [c.example for c in pending], data.system_message, budget)
        for c, n in zip(pending, counts):
            rows[c.ordinal].update(total_tokens=n.total, assistant_tokens=n.trained, _count=n)
            problem = untrainable(n, c.example)
            if problem:
                errors.add(problem[0], c.line, problem[1])
                bad.add(c.ordinal)
                unusable.add(c.ordinal)  # prepare leaves it out (`tasks.data.sources`)
        pending.clear()

    with _progress(path, show_progress) as on_bytes:
        for c in iter_checked(path, conv_fmt, on_bytes):
            row = _row(c)
            rows.append(row)
            if not c.structurally_ok:
                unusable.add(c.ordinal)
            else:
                c.example = normalise_example(c.example)
                messages = c.example["messages"]
                repeat = dedup.check(messages, c.line, c.example.get("tools"))
                if repeat:
                    c.problems[repeat[0]] = repeat[1]
                    row["is_duplicate" if repeat[0] == "duplicate" else "is_near_duplicate"] = True
                else:
                    n_messages.append(len(messages))
                    with_system += messages[0]["role"] == "system"
                for cat, msg in check_warnings(messages, data.min_answer_chars).items():
                    warns.add(cat, c.line, msg)
                if tokenizer is not None and not repeat:
                    pending.append(c)
                    if len(pending) >= TOKEN_CHUNK:
                        flush()
            for cat, msg in c.problems.items():
                errors.add(cat, c.line, msg)
            if c.problems:
                bad.add(c.ordinal)
        if pending:
            flush()
    if not rows:
        errors.add("no_examples", 0, "the file holds no examples")

    length = _apply_length_rules(rows, max_tokens, data.length_policy)
    dropped_fraction = length["dropped"] / len(rows) if rows else 0.0
    over_is_error = dropped_fraction > data.max_drop_fraction
    for r in rows:
        if r.get("over_limit"):
            what = "drop" if not r["kept_by_length_policy"] else "truncate"
            msg = f"{r['total_tokens']} tokens > data.max_tokens {max_tokens}; prepare will {what} it"
            if over_is_error:
                errors.add("over_token_limit", r["line"], msg + f" (too many: over data.max_drop_fraction {data.max_drop_fraction})")
            else:
                warns.add("over_token_limit", r["line"], msg)
    if over_is_error:
        bad |= {i for i, r in enumerate(rows) if r.get("over_limit")}

    token_stats = _token_stats(rows, n_messages, tokenizer, max_tokens, length, budget) if tokenizer is not None else None
    system = _system_report(tokenizer, data.system_message, with_system) if tokenizer is not None else None
    for r in rows:
        r.pop("_count", None)
    gx_summary, docs = None, None
    if data_docs_dir is not None and rows:
        gx_summary, docs = run_gx_suite(rows, Path(data_docs_dir), max_tokens, data.max_drop_fraction, data.length_policy)
    valid = not errors.counts and (gx_summary is None or gx_summary["success"])
    return ValidationReport(
        valid=valid,
        format=reported_fmt,
        path=str(path),
        md5=file_md5(path),
        examples=len(rows),
        invalid_examples=len(bad),
        errors=errors.counts,
        error_rows=errors.first_rows(),
        error_lines=errors.lines(),
        warnings=warns.counts,
        warning_rows=warns.first_rows(),
        token_stats=token_stats,
        length_policy=data.length_policy,
        dropped=length["dropped"],
        truncated=length["truncated"],
        dropped_fraction=round(dropped_fraction, 6),
        max_drop_fraction=data.max_drop_fraction,
        system_message=system,
        unusable_examples=len(unusable),
        data_docs=docs,
        gx=gx_summary,
        bad_examples=bad,
    )


def _system_report(tokenizer, policy: str, with_system: int) -> dict[str, Any]:
    """What `data.system_message` does under this template, and to how many examples."""
    handling = system_handling(tokenizer, policy)
    return {"policy": policy, "action": handling.action, "reason": handling.reason, "examples": with_system}


def _apply_length_rules(rows: list[dict], max_tokens: int | None, policy: str) -> dict[str, int]:
    """Mark over-long rows and whether the length policy keeps them; count dropped/truncated."""
    dropped = truncated = 0
    for r in rows:
        count = r.get("_count")
        if count is None:
            continue
        decision = length_decision(count, max_tokens, policy)
        r["over_limit"] = decision != "keep"
        r["kept_by_length_policy"] = decision != "drop"
        dropped += decision == "drop"
        truncated += decision == "truncate"
    return {"dropped": dropped, "truncated": truncated}


def _token_stats(rows, n_messages, tokenizer, max_tokens, length, budget: TrainingBudget) -> dict[str, Any]:
    counted = [r for r in rows if r.get("total_tokens") is not None]
    kept = [r for r in counted if r["kept_by_length_policy"]]
    cap = max_tokens or 0
    total_kept = sum(min(r["total_tokens"], cap) if r["over_limit"] else r["total_tokens"] for r in kept)
    trained_kept = sum(r["assistant_tokens"] for r in kept)  # an upper bound for truncated ones
    over = sum(1 for r in counted if r["over_limit"])
    stats: dict[str, Any] = {
        "examples": len(n_messages),
        "messages_per_example": summarize(n_messages),
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "total_tokens": summarize([r["total_tokens"] for r in counted]),
        "assistant_tokens": summarize([r["assistant_tokens"] for r in counted]),
        "max_tokens": max_tokens,
        "over_limit": over,
        "over_limit_fraction": round(over / len(rows), 6) if rows else 0.0,
        "dropped": length["dropped"],
        "truncated": length["truncated"],
        "assistant_tokens_method": "the tokens training trains on: answers and their end-of-turn tokens "
        "under the chat template (tasks.model.chat.encode_chats)",
    }
    stats.update(estimate_training(total_kept, trained_kept, budget))
    return stats


class _progress:
    """Context manager giving an `on_bytes` callback that drives a rich progress bar (or None)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled, self.bar, self.pending = path, enabled, None, 0

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("validating"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self.bar.start()
        self.task = self.bar.add_task("read", total=self.path.stat().st_size)
        return self._advance

    def _advance(self, n: int) -> None:
        self.pending += n
        if self.pending >= 1 << 20:  # a rich update per line would cost more than the parsing
            self.bar.advance(self.task, self.pending)
            self.pending = 0

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_fixed(path: Path, report: ValidationReport, out: Path) -> tuple[int, int]:
    """Write the examples of `path` without the bad ones, as canonical messages JSONL, atomically.

    Nothing is edited: an example with an error (structural, duplicate after its first
    occurrence, or over-long when that is an error) is left out whole.

    Returns:
        (examples kept, examples dropped).
    """
    conv_fmt = report.format if report.format in FORMATS else "openai"  # as validate_dataset read it
    kept = dropped = 0
    with open_atomic(Path(out)) as f:
        for c in iter_checked(Path(path), conv_fmt):
            if c.ordinal in report.bad_examples or c.example is None:
                dropped += 1
                continue
            f.write(json.dumps(c.example, ensure_ascii=False) + "\n")
            kept += 1
    return kept, dropped


def render_report(report: ValidationReport, console=None) -> None:
    """Print a human summary of the report with rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    verdict = "[bold green]VALID[/]" if report.valid else "[bold red]INVALID[/]"
    # Messages quote the data and patterns (`^[a-zA-Z0-9_-]{1,64}$`): escaped, or rich reads them as markup.
    console.print(f"{verdict}  {escape(str(report.path))}  format={report.format}  examples={report.examples}  md5={report.md5}")
    if report.errors or report.warnings:
        table = Table(title="Problems")
        for col in ("kind", "category", "count", "first lines"):
            table.add_column(col)
        lines = {**{c: [r["line"] for r in report.warning_rows if r["category"] == c] for c in report.warnings}}
        for cat, n in sorted(report.errors.items()):
            table.add_row("[red]error[/]", cat, str(n), _first(report.error_lines.get(cat, [])))
        for cat, n in sorted(report.warnings.items()):
            table.add_row("[yellow]warning[/]", cat, str(n), _first(lines.get(cat, [])))
        console.print(table)
    for r in report.error_rows[:10]:
        console.print(f"  line {r['line']}: [red]{r['category']}[/] {escape(r['message'])}")
    stats = report.token_stats or {}
    if stats.get("total_tokens"):
        table = Table(title=f"Tokens ({stats.get('tokenizer')})")
        table.add_column("per example")
        for key in ("min", "p5", "median", "mean", "p95", "max"):
            table.add_column(key, justify="right")
        for name in ("messages_per_example", "total_tokens", "assistant_tokens"):
            s = stats[name]
            table.add_row(name, *(f"{s[k]:g}" for k in ("min", "p5", "median", "mean", "p95", "max")))
        console.print(table)
        console.print(
            f"tokens per epoch {stats['tokens_per_epoch']} (trained on {stats['trained_tokens_per_epoch']}); "
            f"{stats['steps_per_epoch']} steps per epoch at batch {stats['batch_size']} x seq_len {stats['seq_len']}"
            + (f"; max_steps {stats['max_steps']} = {stats['epochs']} epochs" if stats.get("epochs") else "")
        )
        console.print(
            f"over max_tokens {stats['max_tokens']}: {stats['over_limit']} ({stats['over_limit_fraction']:.2%}); "
            f"length policy {report.length_policy}: {report.dropped} dropped, {report.truncated} truncated "
            f"(limit {report.max_drop_fraction:.0%} dropped)"
        )
    system = report.system_message
    if system:
        why = f" ({system['reason']})" if system["reason"] else ""
        console.print(escape(f"system messages: data.system_message={system['policy']}: {system['action']} "
                             f"in {system['examples']} examples{why}"))
    if report.data_docs:
        console.print(f"Data Docs: {escape(str(report.data_docs))}")


def _first(lines: list[int], n: int = 8) -> str:
    text = ", ".join(map(str, lines[:n]))
    return text + (", ..." if len(lines) > n else "")
