"""Reading and writing the pipeline's files: atomic writes, content digests, JSONL."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO


@contextlib.contextmanager
def open_atomic(path: Path) -> Iterator[TextIO]:
    """A text file to write `path` through: a temporary sibling, renamed to `path` when the block
    ends without an error and removed otherwise, so no reader sees half a file.

    Raises:
        DataFileError: `path` is a folder or cannot be written.
    """
    from tasks.errors import DataFileError

    path = Path(path)
    if path.is_dir():
        raise DataFileError(f"{path}: a folder; give the path of a file to write")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                yield f
            os.replace(tmp, path)
        except OSError as exc:
            raise DataFileError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):  # none was made where the folder could not be
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` (`open_atomic`); raises `DataFileError` where it cannot."""
    with open_atomic(path) as f:
        f.write(text)
    return Path(path)


def publish_folder(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill` in a temporary sibling, then rename it to `out_dir`.

    Readers never see a half-written folder. Where another process published `out_dir`
    first (two builds of the same cache entry at once), its folder is kept and this one
    dropped.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """The md5 of a file's bytes (the same digest DVC records)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file written by the pipeline (one per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
