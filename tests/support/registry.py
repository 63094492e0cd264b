"""Model versions in the test session's registry."""

from __future__ import annotations

import json
import uuid

from tasks.registry import versions as registry


def new_version(tmp_path, name: str, passed: bool, files: dict[str, str] | None = None) -> str:
    """Register a minimal full-weights version of model `name` with a gate verdict (and `files`, name -> text,
    in its model folder); its number."""
    import mlflow

    folder = tmp_path / uuid.uuid4().hex
    folder.mkdir()
    (folder / "ftllm_model.json").write_text(json.dumps({"kind": "full", "base": "none"}))
    for file_name, text in (files or {}).items():
        (folder / file_name).write_text(text)
    exp = registry.ensure_experiment("registry-tests", tmp_path / "artifacts")
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    tags = {"gate_passed": str(passed).lower(), "gate_failed_checks": "none" if passed else "min_exact_match", "data_md5": "abc"}
    return registry.register_candidate(run_id, folder, name, tags)
