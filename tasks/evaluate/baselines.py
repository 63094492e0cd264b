"""The prompted base model's scores, kept between runs (`eval.reuse_baselines`).

Every run scores the base model zero-shot and few-shot beside the candidate. The base
model does not change from one retrain to the next and greedy generation is
deterministic, so where the test examples and the few-shot prompt are also unchanged
(a scheduled retrain whose feedback went to train, a rerun with other training settings)
the scores would come out the same: that run reuses them instead of loading the base
model and generating again.

An entry's key is a digest of everything its scores depend on:
- the base model's files (path, size and modification time of each: what
  `from_pretrained` loads) and the run's `model` settings (chat template included, a
  template file by its content) and `data.system_message` policy;
- the examples scored and the shots shown, as JSON;
- the `eval` settings, the device, the versions of the libraries that tokenize, render,
  generate and score (torch, transformers, tokenizers, jinja2, sacrebleu, rouge-score), and the source
  of the code that renders, generates and scores (`tasks/evaluate`, `tasks/model`):
  `scoring_context`, which also names the champion's stored scores in the retrain flow;
- today's date, where the chat template writes it into the prompt (`strftime_now`).

A base model that is neither a folder nor in the Hugging Face cache has no key: it is
scored every run. Entries live in `artifacts/cache/baselines/`, newest `KEEP` kept.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.environment import environment
from tasks.errors import DataFileError
from tasks.files import write_atomic

KEEP = 32
# The libraries that tokenize, render, generate and score.
_LIBRARIES = ("torch", "transformers", "tokenizers", "jinja2", "sacrebleu", "rouge-score")
_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "model")


def cache_dir() -> Path:
    """Where the entries live: artifacts/cache/baselines of the project (git-ignored)."""
    return (environment().root or Path(".")) / "artifacts" / "cache" / "baselines"


class BaselineStore:
    """Scores of one run's base model, read and written by the examples and shots they were scored on."""

    def __init__(self, params: Params, base_path: str, folder: Path | None = None) -> None:
        self.folder = folder or cache_dir()
        base = base_folder(base_path)
        files = base_files(base) if base else None
        template = _template_text(params.model.chat_template)
        self._context = None if files is None else {
            "base": files,
            "model": params.model.model_dump(mode="json"),
            "template": template,
            "system_message": params.data.system_message,
            "scoring": scoring_context(params),
            # A template that writes today's date (`strftime_now`, as Llama 3.2's does) renders
            # another prompt on another day.
            "date": date.today().isoformat() if writes_date(template, base) else None,
        }

    def key(self, examples: list[dict], shots: list[dict]) -> str | None:
        """The entry's name for `examples` scored with `shots`; None where the base model has no key."""
        if self._context is None:
            return None
        text = json.dumps({**self._context, "examples": examples, "shots": shots}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str | None) -> dict | None:
        """The scores stored under `key`, or None (no key, no entry, or an entry that cannot be read)."""
        return None if key is None else read_scores(self.folder / f"{key}.json")

    def put(self, key: str | None, result: dict) -> None:
        """Store `result` under `key` (atomically), then drop the oldest entries beyond `KEEP`.

        Best effort: a folder that cannot be written (read-only, full) leaves the scores
        unstored, and the next run scores the base again.
        """
        if key is None:
            return
        try:
            write_atomic(self.folder / f"{key}.json", json.dumps(result))
            entries = sorted(((p.stat().st_mtime_ns, p) for p in self.folder.glob("*.json")), reverse=True)
            for _, old in entries[KEEP:]:
                old.unlink(missing_ok=True)
        except (OSError, DataFileError):  # a cache it cannot write: the next run scores the base again
            return


def read_scores(path: Path) -> dict | None:
    """Scores stored at `path`, or None where there are none to reuse: no file, a file that
    cannot be read, or scores taken on a prompt that carried another day's date (`dated_today`)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("date") in (None, date.today().isoformat()) else None


def dated_today(model_folder: Path) -> str | None:
    """Today's date where the chat template saved in `model_folder` writes it into the prompt, else None:
    stored beside a model's scores as their `date`, so that `read_scores` keeps them for that day only."""
    return date.today().isoformat() if writes_date("", model_folder) else None


def prompt_date(params: Params) -> str | None:
    """Today's date where the run's chat template (`model.chat_template`, or the base model's) writes it
    into the prompt, else None. The resolve stage writes it into the run's settings (`eval.prompt_date`),
    so that DVC evaluates the candidate again on another day, as the flow scores the champion again."""
    dated = writes_date(_template_text(params.model.chat_template), base_folder(params.model.base))
    return date.today().isoformat() if dated else None


def scoring_context(params: Params) -> dict[str, Any]:
    """What any model's scores depend on beside the model and the examples: the `eval`
    settings, the device, the versions of the libraries that render and score, and the scoring code."""
    return {"eval": params.eval.model_dump(mode="json", exclude={"reuse_baselines", "prompt_date"}), "runtime": _runtime(),
            "code": _code_digest()}


def scoring_digest(params: Params) -> str:
    """A short digest of `scoring_context`: the flow's stored champion scores carry it in their name."""
    return hashlib.sha256(json.dumps(scoring_context(params), sort_keys=True).encode()).hexdigest()[:12]


def base_folder(base_path: str) -> Path | None:
    """The folder `from_pretrained` reads the base model from: `base_path` itself, or for a
    model id its snapshot in the Hugging Face cache (files linked to blobs named by content);
    None where there is none here."""
    folder = Path(base_path).expanduser()
    try:
        if folder.is_dir():
            return folder
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(base_path, "config.json")
        return Path(config).parent if isinstance(config, str) else None
    except (OSError, ValueError):  # an id the hub's cache cannot name
        return None


def base_files(folder: Path) -> list[tuple[str, int, int]] | None:
    """Path, size and modification time of every file of the base model's folder, or None where it cannot be read."""
    try:
        out = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            out.append((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
        return out
    except OSError:
        return None


def writes_date(template: str, folder: Path | None) -> bool:
    """Whether the chat template (`template`'s text, or the one saved in a model or tokenizer `folder`)
    writes today's date into the prompt (`strftime_now`), so that another day renders another prompt."""
    texts = [template]
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        try:
            texts.append((folder / name).read_text(encoding="utf-8", errors="replace") if folder else "")
        except OSError:
            continue
    return any("strftime_now" in text for text in texts)


def _template_text(chat_template: str) -> str:
    path = Path(chat_template)
    return path.read_text(encoding="utf-8") if chat_template not in ("auto", "chatml") and path.is_file() else chat_template


@functools.cache
def _runtime() -> dict[str, Any]:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, **{name: _version(name) for name in _LIBRARIES}}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _code_digest() -> str:
    digest = hashlib.sha256()
    for folder in _CODE:
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
