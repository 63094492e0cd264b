"""Which model the service serves, and the engine process that holds its weights.

`ModelManager` owns the model's lifecycle, apart from the routes that use it: loading the
registry's `champion` at start-up (from the BentoML store when imported there as
`<name>:v<version>`, else downloaded from MLflow) or, where no registry is reachable (e.g.
in a container), the model packaged in the bento; polling the registry every
`serving.reload_seconds` and hot-swapping a new champion (loaded fully into the engine
before new requests go to it, while requests in flight finish on the old one, which the
engine frees once they have); and starting a new engine process with the served version
when the last one died.

The routes read `current()` (the tokenizer and the engine's key of the served model) and
`engine` (where completions go); both change together under one lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.engine_process import EngineProcess
from tasks.config import ServingParams
from tasks.registry.versions import champion_version

log = logging.getLogger("ftllm.serving")


@dataclass
class ServedModel:
    """The model the service sends new requests to: its tokenizer (for templates and
    lengths) here, its weights in the engine process under `key`."""

    name: str
    version: str
    source: str
    key: str
    tokenizer: Any
    context_length: int
    # How the model was trained to take system messages (`data.system_message`, recorded
    # in its folder), so a served prompt renders exactly as the trained ones did.
    system_message: str = "auto"
    loaded_at: float = field(default_factory=time.time)


# ---------------------------------------------------------------------------------------
# The registry: which version is champion, and where its files are
# ---------------------------------------------------------------------------------------


def _registry_reachable() -> bool:
    """False where the registry URI is a SQLite file that does not exist (MLflow would create it)."""
    uri = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).is_file()
    return bool(uri)


def current_champion(model_name: str) -> str | None:
    """The registry version behind the `champion` alias, or None where there is none.

    The lookup is `tasks.registry.versions.champion_version`'s; this skips it where no
    registry is reachable (`_registry_reachable`), since MLflow would create an empty
    SQLite registry there: a bento started in a container must serve its own model.
    """
    if not _registry_reachable():
        return None
    version = champion_version(model_name)
    if version is None:
        log.info("no champion for %s in the registry", model_name)
    return version


@contextmanager
def version_files(model_name: str, version: str) -> Iterator[tuple[Path, str]]:
    """The folder of a registry version and where it came from: the BentoML store if it was
    imported there, else a download of MLflow's artifacts (removed on exit: once loaded,
    the model is in memory)."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{model_name}:v{version}"
    try:
        yield Path(bentoml.models.get(tag).path), f"bentoml:{tag}"
        return
    except NotFound:
        pass
    import mlflow

    tmp = Path(tempfile.mkdtemp(prefix="ftllm-serve-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(tmp)))
        model_dir = local / "artifacts" / "model_dir"
        if not (model_dir / "ftllm_model.json").is_file():
            found = sorted(local.rglob("ftllm_model.json"))
            if not found:
                raise FileNotFoundError(f"models:/{model_name}/{version} holds no ftllm_model.json under artifacts/model_dir")
            model_dir = found[0].parent
        yield model_dir, f"mlflow:models:/{model_name}/{version}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------


class ModelManager:
    """Loads, polls, hot-swaps and restarts; see the module docstring.

    Args:
        model_name: The registry's model (`registry.model_name`).
        limits: The `serving:` settings (the engine's, and `reload_seconds`).
        packaged: The bento's own model (BentoML's stored model, or None where the store
            has none), served where the registry has no champion.
        packaged_tag: Its tag, for the error when there is neither.
        on_steps: Receives the rows of each decoding step (a metric).
        on_serve: Called with (version now served, version no longer served or None).
    """

    def __init__(self, model_name: str, limits: ServingParams, *, packaged: Callable[[], Any], packaged_tag: str,
                 on_steps: Callable[[list[int]], None] | None = None,
                 on_serve: Callable[[str, str | None], None] | None = None) -> None:
        self.model_name, self.limits = model_name, limits
        self._packaged, self._packaged_tag = packaged, packaged_tag
        self._on_steps, self._on_serve = on_steps, on_serve or (lambda _new, _old: None)
        self._swap_lock = threading.Lock()  # guards the served model and its engine
        self._reload_lock = threading.Lock()  # one load at a time (poller, /admin/reload, engine restart)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.engine = self._start_engine()
        try:
            self._current = self._initial_model()
        except BaseException:
            self.engine.close(timeout=5)
            raise
        self._on_serve(self._current.version, None)

    # -- loading -------------------------------------------------------------------------

    def _start_engine(self) -> EngineProcess:
        return EngineProcess(max_batch=self.limits.max_batch, join_ratio=self.limits.join_ratio,
                             join_after_steps=self.limits.join_after_steps,
                             prefix_min_tokens=self.limits.prefix_min_tokens, engine=self.limits.engine,
                             on_steps=self._on_steps)

    @staticmethod
    def _load(engine: EngineProcess, model_dir: Path, name: str, version: str, source: str) -> ServedModel:
        """Load a model folder into `engine`, and its tokenizer here."""
        from tasks.model.loading import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
        info = json.loads((model_dir / "ftllm_model.json").read_text())
        key, context = engine.load(model_dir)
        return ServedModel(name, version, source, key, tokenizer, context, info.get("system_message", "auto"))

    def _load_version(self, engine: EngineProcess, version: str) -> ServedModel:
        with version_files(self.model_name, version) as (model_dir, source):
            return self._load(engine, model_dir, self.model_name, version, source)

    def _initial_model(self) -> ServedModel:
        version = current_champion(self.model_name)
        if version is not None:
            return self._load_version(self.engine, version)
        stored = self._packaged()
        if stored is None:
            raise RuntimeError(
                f"No model to serve: the registry has no 'champion' for {self.model_name!r} and the BentoML "
                f"store has no {self._packaged_tag!r}. Run `ftllm run` (or `ftllm promote VERSION`) first."
            )
        version = stored.info.labels.get("version") or str(stored.tag.version).removeprefix("v")
        # Seen on a project whose first run the gate rejected: its packaged candidate was served as if promoted.
        log.warning("the registry has no champion of %s: serving the packaged model %s (version %s), which may "
                    "not have passed the gate; `ftllm promote VERSION` makes a champion", self.model_name, stored.tag,
                    version)
        return self._load(self.engine, Path(stored.path), stored.tag.name, version, f"bentoml:{stored.tag}")

    # -- what the routes read ------------------------------------------------------------

    def current(self) -> ServedModel:
        with self._swap_lock:
            return self._current

    def ready(self) -> bool:
        return self._current is not None and self.engine.alive

    # -- changes -------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Load the registry's champion if it differs from the served version, then swap it in."""
        with self._reload_lock:
            previous = self.current()
            version = current_champion(self.model_name)
            if version is None or version == previous.version:
                return {"reloaded": False, "version": previous.version, "previous": previous.version}
            loaded = self._load_version(self.engine, version)  # fully loaded before the swap
            with self._swap_lock:
                self._current = loaded
            self.engine.drop(previous.key)  # freed once its last rows have finished
            self._on_serve(version, previous.version)
            log.info("now serving %s version %s (was %s)", self.model_name, version, previous.version)
            return {"reloaded": True, "version": version, "previous": previous.version}

    def restart_engine(self) -> None:
        """Start a new engine process with the served version, after the last one died.

        The requests it had in flight were answered with an error when it died; until the
        new one has loaded the model, /readyz says not ready and requests get 503.
        """
        import bentoml

        with self._reload_lock:
            served = self.current()
            engine = self._start_engine()
            try:
                if served.source.startswith("mlflow:"):
                    loaded = self._load_version(engine, served.version)
                else:  # the BentoML store: the folder is still there
                    stored = bentoml.models.get(served.source.removeprefix("bentoml:"))
                    loaded = self._load(engine, Path(stored.path), served.name, served.version, served.source)
            except Exception:
                engine.close(timeout=5)  # the next poll tries again
                raise
            dead = self.engine
            with self._swap_lock:
                self.engine, self._current = engine, loaded
            dead.close(timeout=5)
            log.info("generation engine restarted, serving %s version %s", served.name, served.version)

    # -- the poller ----------------------------------------------------------------------

    def start_polling(self) -> None:
        """Poll the registry (and the engine's health) every `serving.reload_seconds`, in a thread."""
        self._poller = threading.Thread(target=self._poll_registry, name="ftllm-registry-poll", daemon=True)
        self._poller.start()

    def _poll_registry(self) -> None:
        while not self._stop.wait(self.limits.reload_seconds):
            try:
                if not self.engine.alive:
                    self.restart_engine()
                self.reload()
            except Exception:  # a broken registry or model must not stop the service
                log.exception("reloading the champion failed; still serving %s", self.current().version)

    def close(self) -> None:
        self._stop.set()
        self.engine.close()
