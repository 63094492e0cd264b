"""A run whose chat template writes today's date carries the day in its resolved settings, so
DVC evaluates the candidate again on another day, as the flow scores the champion again."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from tasks.config import Params, load_params, write_resolved
from tasks.evaluate import baselines
from tasks.stages import resolve
from tests.support.dates import DATED_TEMPLATE, Day

REPO = Path(__file__).resolve().parents[3]


def resolved_eval(tmp_path: Path, base: Path) -> dict:
    """The `eval` section the resolve stage writes for a run on `base`."""
    (params := tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"base": str(base)}}))
    assert resolve.main(["--params", str(params), "--out", str(tmp_path / "resolved.yaml")]) == 0
    load_params(tmp_path / "resolved.yaml")  # what the stages read back validates
    return yaml.safe_load((tmp_path / "resolved.yaml").read_text())["eval"]


def test_the_resolved_settings_of_a_dated_template_change_with_the_day_and_others_never(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(baselines, "date", Day)
    (dated := tmp_path / "dated").mkdir()
    (dated / "chat_template.jinja").write_text(DATED_TEMPLATE)
    (plain := tmp_path / "plain").mkdir()
    (plain / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")

    Day.current = dt.date(2026, 12, 6)
    first, plain_first = resolved_eval(tmp_path, dated), resolved_eval(tmp_path, plain)
    Day.current = dt.date(2026, 12, 7)
    second, plain_second = resolved_eval(tmp_path, dated), resolved_eval(tmp_path, plain)

    assert (first["prompt_date"], second["prompt_date"]) == ("2026-12-06", "2026-12-07")
    assert plain_first == plain_second and plain_first["prompt_date"] is None
    # A chat_template file that writes the date dates the run whatever the base.
    (params := tmp_path / "p.yaml").write_text(yaml.safe_dump({"model": {"chat_template": str(dated / "chat_template.jinja")}}))
    assert baselines.prompt_date(load_params(params)) == "2026-12-07"


def test_the_evaluate_stage_reruns_on_the_day_and_the_champions_stored_scores_are_not_renamed_by_it(
    tmp_path: Path,
) -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "eval" in stages["evaluate"]["params"][0]["artifacts/params.yaml"]
    resolved = load_params(write_resolved(Params(), tmp_path / "r.yaml", "2026-12-06"))
    assert resolved.eval.prompt_date == "2026-12-06"
    assert baselines.scoring_digest(resolved) == baselines.scoring_digest(Params())


def test_the_resolve_stage_writes_the_day_over_one_a_settings_file_names(tmp_path: Path) -> None:
    (params := tmp_path / "params.yaml").write_text(yaml.safe_dump({"eval": {"prompt_date": "2020-01-01"}}))
    assert resolve.main(["--params", str(params), "--out", str(tmp_path / "resolved.yaml")]) == 0
    assert load_params(tmp_path / "resolved.yaml").eval.prompt_date is None  # the tiny base's template writes no date


def test_the_mlflow_run_logs_the_day_the_stages_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's MLflow params are its settings as the stages read them: the day a dated template
    writes in included, not the null of the settings before the resolve stage."""
    from mlflow import MlflowClient

    from tasks.registry.tracking import start_tracking_run

    monkeypatch.setattr(baselines, "date", Day)
    Day.current = dt.date(2026, 12, 7)
    (dated := tmp_path / "dated").mkdir()
    (dated / "chat_template.jinja").write_text(DATED_TEMPLATE)
    (params := tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"base": str(dated)}}))
    (data := tmp_path / "d.jsonl").write_text('{"messages": []}\n')
    run_id = start_tracking_run(tmp_path, load_params(params), {}, data, "0" * 32, {}, None, [])
    MlflowClient().set_terminated(run_id)
    assert MlflowClient().get_run(run_id).data.params["eval.prompt_date"] == "2026-12-07"
