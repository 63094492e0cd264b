"""The champion's stored scores are reused only for the same registered version, split, scoring
settings and, where its chat template writes the date, the same day."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import pytest

from flows import retrain
from tasks.config import Params, RegistryParams
from tasks.evaluate import baselines
from tests.support.dates import DATED_TEMPLATE, Day
from tests.support.registry import new_version


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Path]]:
    """A project folder with a test split, and a list of the model folders scored (scoring is faked)."""
    root = tmp_path / "project"
    (root / "artifacts/prepared").mkdir(parents=True)
    example = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (root / "artifacts/prepared/test.jsonl").write_text(json.dumps(example) + "\n")
    scored: list[Path] = []

    def evaluate(model_dir: Path, examples: list, params) -> dict:
        scored.append(model_dir)
        return {"metrics": {"exact_match": len(scored) / 10}, "per_example": {"exact_match": [1.0]}, "samples": []}

    monkeypatch.setattr(retrain, "evaluate_model_dir", evaluate)
    monkeypatch.setattr(baselines, "date", Day)
    Day.current = dt.date(2026, 12, 6)
    return root, scored


def champion_scores(root: Path, model_name: str, version: str) -> dict:
    return retrain.evaluate_champion.fn(root, Params(registry=RegistryParams(model_name=model_name)), version)


def test_another_registered_models_version_of_the_same_number_is_scored_not_given_the_first_ones_scores(
    tmp_path: Path, project: tuple[Path, list[Path]]
) -> None:
    root, scored = project
    first, second = f"champ-{uuid.uuid4().hex[:8]}", f"champ-{uuid.uuid4().hex[:8]}"
    assert new_version(tmp_path, first, True) == new_version(tmp_path, second, True) == "1"
    a = champion_scores(root, first, "1")
    assert champion_scores(root, first, "1") == a and len(scored) == 1  # the same version: stored scores
    b = champion_scores(root, second, "1")
    assert len(scored) == 2 and b["metrics"] != a["metrics"]
    assert scored[0] != scored[1] and all(folder.is_relative_to(root / "artifacts/champion") for folder in scored)


def test_scores_of_a_template_that_writes_the_date_are_not_reused_on_another_day(
    tmp_path: Path, project: tuple[Path, list[Path]]
) -> None:
    root, scored = project
    dated, plain = f"champ-{uuid.uuid4().hex[:8]}", f"champ-{uuid.uuid4().hex[:8]}"
    new_version(tmp_path, dated, True, files={"chat_template.jinja": DATED_TEMPLATE})
    new_version(tmp_path, plain, True, files={"chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    for name in (dated, plain):
        champion_scores(root, name, "1")
        champion_scores(root, name, "1")
    assert len(scored) == 2  # one scoring each on the first day
    Day.current = dt.date(2026, 12, 7)
    champion_scores(root, dated, "1")
    champion_scores(root, plain, "1")
    assert len(scored) == 3 and "chat_template.jinja" in {p.name for p in scored[2].iterdir()}


def test_a_stored_file_that_cannot_be_read_is_scored_again(tmp_path: Path, project: tuple[Path, list[Path]]) -> None:
    root, scored = project
    name = f"champ-{uuid.uuid4().hex[:8]}"
    new_version(tmp_path, name, True)
    champion_scores(root, name, "1")
    [stored] = (root / "artifacts/champion").glob("*-scored.json")
    stored.write_text('{"metrics": ')  # half a file
    assert champion_scores(root, name, "1")["metrics"] == {"exact_match": 0.2} and len(scored) == 2


def test_scores_are_kept_for_the_day_their_prompts_carry_when_scoring_crosses_midnight(
    tmp_path: Path, project: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, scored = project
    name = f"champ-{uuid.uuid4().hex[:8]}"
    new_version(tmp_path, name, True, files={"chat_template.jinja": DATED_TEMPLATE})
    score = retrain.evaluate_model_dir

    def past_midnight(model_dir: Path, examples: list, params) -> dict:
        Day.current = dt.date(2026, 12, 7)  # the prompts were rendered on the 6th
        return score(model_dir, examples, params)

    monkeypatch.setattr(retrain, "evaluate_model_dir", past_midnight)
    champion_scores(root, name, "1")
    champion_scores(root, name, "1")
    assert len(scored) == 2  # the 6th's scores are not reused on the 7th
