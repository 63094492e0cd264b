"""The embedded defaults: every service the pipeline talks to lives inside the project folder.

Prefect runs on its ephemeral API with its state under `.prefect/`, MLflow tracks into
`mlflow.db`, BentoML keeps its store under `.bentoml/`, and nothing reaches a model hub.
Each value is only a default: a variable already set in the environment (for example
`MLFLOW_TRACKING_URI=http://mlflow:5000` or `PREFECT_API_URL=...`) wins, which is how the
same code scales out to real servers.

`apply_defaults` must run before prefect, mlflow or bentoml are imported, since they read
some of these variables when first imported.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    }


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
