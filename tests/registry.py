"""Helpers of the registry tests: a model version registered from a stub folder, with a gate verdict."""

from __future__ import annotations

import json
import uuid
from pathlib import Path


def new_version(tmp_path: Path, name: str, passed: bool) -> str:
    """Register a version of `name` whose gate `passed` or failed (min_exact_match); returns its number."""
    import mlflow

    from tasks.registry import versions as registry

    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    (folder / "ftllm_model.json").write_text(json.dumps({"kind": "full", "base": "none"}))
    exp = registry.ensure_experiment("registry-tests", tmp_path / "artifacts")
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    tags = {"gate_passed": str(passed).lower(), "gate_failed_checks": "none" if passed else "min_exact_match", "data_md5": "abc"}
    return registry.register_candidate(run_id, folder, name, tags)
