"""The project's error model: one base class that carries its exit code.

An `FtllmError` is a failure the user can act on (a bad setting, an unreadable file, a
failed stage, a refused promotion); its message is one clear sentence naming the file,
line or key and what to do. Entry points (`tasks.runner`) print it to stderr without a
traceback and exit with `exit_code`. Any other exception is a bug and keeps its traceback.

Exit codes (docs/guides/commands.md restates them per command):
    0 success, 1 failed (the run, a stage, a refused action), 2 usage error (bad
    arguments, settings or unreadable input), 3 rejected by the gate.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED = 0, 1, 2, 3


class FtllmError(Exception):
    """A failure the user can act on; `exit_code` is what an entry point exits with."""

    exit_code: int = EXIT_FAILED


class UsageError(FtllmError):
    """Bad arguments or settings: nothing ran."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A settings file or override that cannot be used; the message names the key."""


class FormatError(UsageError, ValueError):
    """An unknown or mismatched data format name (`--format`, `data.format`)."""


class DataFileError(UsageError, ValueError):
    """A data file that cannot be read at all (missing, a folder, not JSON/JSONL)."""


class RunFailed(FtllmError):
    """A step of a run failed in a way the user must fix (bad data, a failed stage)."""


class StageError(RunFailed):
    """A DVC stage failed; the message holds the tail of its output."""


class PrepareError(RunFailed, ValueError):
    """The data cannot be prepared (invalid examples, too many dropped)."""


class InvalidRowsError(UsageError, ValueError):
    """A source with more invalid rows than its `invalid_rows: drop` allows; the message names the source and key."""


class PackageError(RunFailed):
    """A model folder cannot be imported into BentoML, or the bento cannot be built."""


class RegistryRefusal(FtllmError):
    """A promotion or rollback that the registry's state does not allow; the message says why.

    The message speaks the command line's words (`--force --reason TEXT`); `form_message`
    says the same in the words of the Prefect UI's run form (`force`, `reason`).
    """

    def __init__(self, message: str, form_message: str | None = None) -> None:
        super().__init__(message)
        self.form_message = form_message or message
