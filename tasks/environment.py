"""The process environment: the embedded defaults, and the one object every FTLLM_* variable is read through.

Embedded defaults: every service the pipeline talks to lives inside the project folder.

Prefect runs on its ephemeral API with its state under `.prefect/`, MLflow tracks into
`mlflow.db`, BentoML keeps its store under `.bentoml/`, and nothing reaches a model hub.
Each value is only a default: a variable already set in the environment (for example
`MLFLOW_TRACKING_URI=http://mlflow:5000` or `PREFECT_API_URL=...`) wins, which is how the
same code scales out to real servers.

`apply_defaults` must run before prefect, mlflow or bentoml are imported, since they read
some of these variables when first imported.

`thread_defaults` and `ThreadShare` are the thread policy of the compute processes
(training, evaluation); see docs/guides/cpu-sharing.md. A fixed thread count is part of the
defaults because OpenMP reads its variables once, when torch loads it: they must be in a
process's environment before it imports torch, which is where `apply_defaults` puts them
for the processes that `ftllm` and the flows start.

`environment()` reads the project's own variables (secrets among them) into a frozen
`Environment`, at call time rather than import time, so a rotated API key or a test's
monkeypatched variable takes effect without a restart. Secrets are `SecretStr`: they never
show in a repr or a log line.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr


def find_root(start: Path | None = None) -> Path:
    """The project root: FTLLM_ROOT if set, else the nearest folder above `start` with a params.yaml."""
    if os.environ.get("FTLLM_ROOT"):
        return Path(os.environ["FTLLM_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return here


def defaults_for(root: Path) -> dict[str, str]:
    """The environment of the embedded defaults for the project at `root`."""
    return {
        "FTLLM_ROOT": str(root),
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / '.prefect' / 'prefect.db'}",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        # The first start migrates a new database; on a busy 2-core machine that takes over 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # No MLFLOW_REGISTRY_URI: MLflow keeps the registry where the tracking URI points, so
        # a tracking server set in the environment also gets the model versions (a registry
        # default here would split runs on the server from their versions in mlflow.db).
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "BENTOML_HOME": str(root / ".bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "MPLBACKEND": "Agg",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        **thread_defaults(),
    }


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset, cpusets and
    container runtimes narrow), not every CPU of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_defaults() -> dict[str, str]:
    """OpenMP variables for the compute processes: only a thread count the user named.

    FTLLM_TORCH_THREADS=N fixes torch's compute threads at N (as OMP_NUM_THREADS, which
    OpenMP reads when torch loads it). Without it a compute process starts with one thread
    per usable CPU and `ThreadShare` adapts the count to what other processes leave free.
    OpenMP's wait policy stays its default: its workers spin briefly before they sleep,
    which keeps the hand-offs between many small operations fast when a job runs alone.
    """
    threads = os.environ.get(_VARIABLES["torch_threads"], "").strip()
    return {"OMP_NUM_THREADS": threads} if threads else {}


def _runnable_threads() -> tuple[int, int]:
    """(runnable threads on the machine, runnable threads of this process), right now (Linux /proc)."""
    machine = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    own = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended while we looked
            continue
        own += text[text.rindex(")") + 2] == "R"
    return machine, own


class ThreadShare:
    """Torch's compute threads, set to the CPUs that other processes leave free.

    Two CPU jobs on one machine that each run one thread per CPU make every parallel
    operation wait for a thread the other job holds, and both crawl (seven times slower on
    two cores, benchmarks/bench_cpu_sharing.py). `adjust()`, called once per unit of work
    (a training step, a generation batch), looks at most every `every` seconds at how many
    threads of other processes are runnable and gives torch the usable CPUs less those, at
    least one. A job alone keeps every CPU; two jobs settle at a fair share each.

    A count the user fixed (FTLLM_TORCH_THREADS or OMP_NUM_THREADS in the environment) is
    left alone, as on a machine without /proc.
    """

    def __init__(self, every: float = 2.0, samples: int = 5) -> None:
        self.every, self.samples = every, samples
        fixed = any(os.environ.get(v, "").strip() for v in (_VARIABLES["torch_threads"], "OMP_NUM_THREADS"))
        self.enabled = not fixed and Path("/proc/loadavg").is_file()
        self.cpus = usable_cpus()
        self.threads: int | None = None
        self._last = float("-inf")

    def others(self) -> int:
        """Runnable threads of other processes: the median of a few looks, a moment apart."""
        import time

        seen = []
        for i in range(self.samples):
            machine, own = _runnable_threads()
            seen.append(max(0, machine - own))
            if i + 1 < self.samples:
                time.sleep(0.002)
        return sorted(seen)[len(seen) // 2]

    def adjust(self) -> int | None:
        """Set torch's thread count if it is time to look again; return the count in use (None: not managed)."""
        import time

        if not self.enabled or self.cpus < 2:
            return None
        now = time.monotonic()
        if now - self._last < self.every:
            return self.threads
        self._last = now
        import torch

        threads = max(1, self.cpus - self.others())
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads


def apply_defaults(root: Path | None = None) -> Path:
    """Set the embedded defaults in `os.environ` where not already set; return the root."""
    root = root or find_root()
    defaults = defaults_for(root)
    if "PREFECT_HOME" in os.environ:
        # Prefect keeps its database in its home: one set elsewhere takes the database along.
        defaults.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return root


class Environment(BaseModel):
    """The project's FTLLM_* variables (and the few of other tools it reads), validated."""

    model_config = ConfigDict(frozen=True)

    root: Path | None = Field(None, description="FTLLM_ROOT: the project folder (set by `ftllm` and the flows).")
    overrides: str = Field("", description="FTLLM_OVERRIDES: a run's --set overrides as JSON, for the DVC stages.")
    params_file: Path | None = Field(None, description="FTLLM_PARAMS: the settings file the service reads.")
    api_key: SecretStr | None = Field(None, description="FTLLM_API_KEY: one bearer key with every role (named 'default').")
    api_keys: SecretStr | None = Field(None, description="FTLLM_API_KEYS: named keys with roles (see serving/keys.py).")
    api_keys_file: Path | None = Field(None, description="FTLLM_API_KEYS_FILE: a file of named keys, never committed.")
    feedback_db: Path | None = Field(None, description="FTLLM_FEEDBACK_DB: the service's interaction and feedback log.")
    bento_model: str | None = Field(None, description="FTLLM_BENTO_MODEL: the BentoML model tag a bento is built with.")
    notify_webhook: SecretStr | None = Field(None, description="FTLLM_NOTIFY_WEBHOOK: URL that hears rejected and failed runs.")
    notify_block: str | None = Field(None, description="FTLLM_NOTIFY_BLOCK: a saved Prefect notification block's name.")
    torch_threads: int | None = Field(None, ge=1, description=(
        "FTLLM_TORCH_THREADS: CPU compute threads of training, evaluation and the serving engine "
        "(default: one per usable CPU; the engine takes half)."))
    mlflow_run_id: str | None = Field(None, description="MLFLOW_RUN_ID: the run a DVC stage logs into (set by the flow).")
    prefect_api_url: str | None = Field(None, description="PREFECT_API_URL: a Prefect server; unset, the ephemeral API.")


_VARIABLES = {
    "root": "FTLLM_ROOT", "overrides": "FTLLM_OVERRIDES", "params_file": "FTLLM_PARAMS", "api_key": "FTLLM_API_KEY",
    "api_keys": "FTLLM_API_KEYS", "api_keys_file": "FTLLM_API_KEYS_FILE",
    "feedback_db": "FTLLM_FEEDBACK_DB", "bento_model": "FTLLM_BENTO_MODEL", "notify_webhook": "FTLLM_NOTIFY_WEBHOOK",
    "notify_block": "FTLLM_NOTIFY_BLOCK", "torch_threads": "FTLLM_TORCH_THREADS", "mlflow_run_id": "MLFLOW_RUN_ID",
    "prefect_api_url": "PREFECT_API_URL",
}


def environment() -> Environment:
    """The project's variables as set now; an empty variable counts as unset."""
    return Environment(**{field: os.environ[name] for field, name in _VARIABLES.items() if os.environ.get(name, "").strip()})
