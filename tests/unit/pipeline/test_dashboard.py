"""The run dashboard: built from plain data, every section present, rendered offline by headless Chromium."""

from __future__ import annotations

from tasks.pipeline.dashboard import RunView, load_run_files, render_dashboard
from tests.support.browser import external_urls


def test_sections_hold_the_run(view):
    html = render_dashboard(view)
    for section in ("metrics", "gate", "samples", "loss", "data", "lineage"):
        assert f'id="{section}"' in html
    for role in view.metrics:
        assert f'data-role="{role}"' in html
    assert html.count("<svg") == 2 and "<polyline" in html  # bar chart and loss curve
    assert "gate REJECTED" in html and html.count(">FAIL<") == 2 and html.count(">pass<") == 2
    assert "6 at step 1" in html and "0.3 at step 20" in html
    for value in view.lineage.values():
        assert value in html
    assert '<a href="http://127.0.0.1:5000/#/experiments/1/runs/r1">' in html
    assert external_urls(html) == []  # links to follow, nothing to load
    assert "<th>over data.max_tokens</th><th>kept</th>" in html and '<td class="num">7</td><td class="num">48</td>' in html


def test_a_failed_run_before_evaluation_says_what_is_missing():
    html = render_dashboard(RunView("m", None, "failed", None, metrics={}, verdict=None))
    assert "the run ended before evaluation" in html and "the gate did not run" in html
    assert "no training history" in html and "no sample predictions" in html
    assert "no per-source counts" in html


def test_run_files_are_read_when_present(tmp_path):
    assert load_run_files(tmp_path) == {"history": [], "prepared": None}
    (tmp_path / "artifacts/model").mkdir(parents=True)
    (tmp_path / "artifacts/model/history.json").write_text('[{"step": 1, "loss": 2.0}]')
    assert load_run_files(tmp_path)["history"] == [{"step": 1, "loss": 2.0}]




def test_the_held_out_preference_scores_have_their_own_section():
    metrics = {"candidate": {"exact_match": 0.8}, "candidate_preference": {"reward_accuracy": 0.75, "reward_margin": 1.5,
               "rated_down_repeat_rate": 0.1, "examples": 20.0}, "champion_preference": {"reward_accuracy": 0.5}}
    html = render_dashboard(RunView("m", "2", "promoted", "1", metrics=metrics, verdict=None))
    section = html.split('id="preference"')[1].split('id="gate"')[0]
    assert 'data-role="candidate_preference"' in section and 'data-role="champion_preference"' in section
    assert "0.75" in section and "rated_down_repeat_rate ↓" in section
    assert "no held-out preference split" in render_dashboard(RunView("m", "2", "promoted", "1", metrics=metrics | {
        "candidate_preference": {}, "champion_preference": {}}, verdict=None))


def test_the_feedback_section_shows_keys_and_what_was_redacted(view):  # noqa: F811
    import dataclasses

    feedback = {"examples": 7, "held": 3, "capped": 1, "users": 2, "by_key": {"ops": 5, "web": 2},
                "redacted": {"secret": 0, "email": 4, "card": 1, "ip": 0, "phone": 2,
                             "examples_changed": 5, "examples_dropped": 0}}
    html = render_dashboard(dataclasses.replace(view, feedback=feedback))
    assert 'id="feedback"' in html and "held for approval" in html
    for name, count in (("ops", 5), ("web", 2), ("email", 4), ("card", 1), ("phone", 2)):
        assert f'<tr><td>{name}</td><td class="num">{count}</td></tr>' in html, name
    assert "<td>secret</td>" in html  # every category, found or not
    assert "no feedback source in this run" in render_dashboard(view)
    assert "preference rows capped" not in html  # no preference export in this run
    preference = {"examples": 30, "desirable": 31, "undesirable": 18, "middle": 4, "pairs_from_corrections": 25,
                  "pairs_from_ratings": 0, "capped": 44, "not_a_chat": 0, "redacted": {}}
    html = render_dashboard(dataclasses.replace(view, feedback={**feedback, "preference": preference}))
    assert '<div class="n">44</div><div class="l">preference rows capped</div>' in html
    assert '<div class="n">25</div><div class="l">pairs</div>' in html


def test_without_a_champion_the_candidates_samples_stand_alone(view):
    import dataclasses

    html = render_dashboard(dataclasses.replace(view, samples={"candidate": view.samples["candidate"]}))
    section = html.split('id="samples"')[1].split('id="loss"')[0]
    assert "no champion predictions to compare with" in section and "31 Dec" in section and "differs" not in section


def test_samples_of_other_examples_are_not_paired():
    """The champion's samples from another split order are shown as missing, not compared."""
    from tasks.pipeline.dashboard import _pair_samples

    mine = [{"prompt": "a", "reference": "1", "prediction": "1"}, {"prompt": "b", "reference": "2", "prediction": "x"}]
    theirs = [{"prompt": "b", "reference": "2", "prediction": "2"}, {"prompt": "a", "reference": "1", "prediction": "0"}]
    assert _pair_samples(mine, theirs) == [(mine[0], None), (mine[1], None)]
    assert _pair_samples(mine, [theirs[1]]) == [(mine[0], theirs[1]), (mine[1], None)]  # differs first


def test_the_validation_counts_of_every_source_add_up():
    from tasks.pipeline.dashboard import merge_validation

    first = {"examples": 2000, "errors": {"not_json": 1}, "warnings": {"short_answer": 4}, "dropped": 2}
    second = {"examples": 55, "errors": {}, "warnings": {"short_answer": 1, "long": 2}, "dropped": 0}
    assert merge_validation([first, None, second]) == {
        "examples": 2055, "errors": {"not_json": 1}, "warnings": {"short_answer": 5, "long": 2}, "dropped": 2}
    assert merge_validation([None]) is None


def test_a_source_without_a_report_says_so(view):
    import dataclasses

    html = render_dashboard(dataclasses.replace(view, source_reports=[view.source_reports[0], None]))
    assert "none: not validated (nothing to read)" in html and "source-1/validation.html" not in html


def test_the_legend_wraps_onto_rows_within_the_chart():
    import re

    from tasks.pipeline.html import bar_chart

    names = ["candidate", "champion", "base_few_shot", "base_zero_shot", "candidate_feedback", "champion_feedback"]
    svg = bar_chart(["exact_match"], {n: [0.5] for n in names}, "t", width=640)
    rows = {int(y) for y in re.findall(r'<rect x="\d+" y="(\d+)" width="10"', svg)}
    assert len(rows) == 2
    starts = [int(x) for x in re.findall(r'<text x="(\d+)" y="(?:\d+)" font-size="12">(?:' + "|".join(names) + ")<", svg)]
    assert len(starts) == len(names) and max(starts) < 640


def test_corrections_are_mentioned_only_when_there_are_some(view):
    import dataclasses

    assert "55 corrected answers" in render_dashboard(view)
    none = {**view.prepared, "corrections": {"examples": 0, "replaced": 0}}
    assert "corrected answers" not in render_dashboard(dataclasses.replace(view, prepared=none))
