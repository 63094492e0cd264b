"""Several sources: merge with dedup, weight and cap; corrections outrank answers; invalid-row policies; md5s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.config import DataParams, ModelParams, Params, SourceParams, load_params, write_resolved
from tasks.data.prepare import FEEDBACK_SPLIT, assign_split, prepare_dataset
from tasks.data.sources import prompt_key
from tasks.errors import ConfigError, InvalidRowsError, PrepareError
from tasks.files import file_md5
from tasks.model.loading import load_tokenizer, resolve_base
from tasks.runner import run_entry
from tasks.stages.prepare import main


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(resolve_base(ModelParams()))


def example(i: int, answer: str | None = None, **extra) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}?"},
                         {"role": "assistant", "content": answer or f"Answer {i}."}], **extra}


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def params(sources: list[dict], **data) -> Params:
    srcs = [SourceParams(**s) for s in sources]
    return Params(data=DataParams(path=srcs[0].file, sources=srcs,
                                  **{"max_tokens": 256, "val_fraction": 0.2, "test_fraction": 0.2, **data}))


def rows(out: Path, split: str) -> list[dict]:
    path = out / f"{split}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def answers(out: Path, splits=("train", "val", "test", FEEDBACK_SPLIT)) -> list[str]:
    return [r["messages"][-1]["content"] for s in splits for r in rows(out, s)]


def split_of(i: int, corrected: bool = False, feedback_fraction: float = 0.5) -> str:
    key = prompt_key(example(i)["messages"])
    return assign_split(key, 0.2, 0.2, feedback_fraction, corrected)


def test_sources_are_merged_first_one_first_without_duplicates(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(40)])
    # 10 exact repeats of a's rows, 5 up to case, and 20 new ones.
    b = write(tmp_path / "b.jsonl", [example(i) for i in range(10)] + [example(i, f"ANSWER {i}.") for i in range(10, 15)]
              + [example(i) for i in range(100, 120)])
    stats = prepare_dataset(None, tmp_path / "o", params([{"path": str(a)}, {"path": str(b)}]), tok)
    assert stats["examples"] == 60 and sum(stats["counts"].values()) == 60
    first, second = stats["sources"]
    assert (first["key"], first["kept"], first["deduplicated"]) == ("data.sources[0]", 40, {"exact": 0, "near": 0})
    assert (second["key"], second["rows"], second["kept"], second["deduplicated"]) == (
        "data.sources[1]", 35, 20, {"exact": 10, "near": 5})
    assert stats["deduplicated"] == {"exact": 10, "near": 5}
    assert "ANSWER 12." not in answers(tmp_path / "o")  # the first occurrence (source a) stays
    assert [s["md5"] for s in stats["sources"]] == [file_md5(a), file_md5(b)]


def test_cap_keeps_a_deterministic_sample_and_weight_repeats_in_train_only(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(100)])
    b = write(tmp_path / "b.jsonl", [example(i) for i in range(200, 300)])
    capped = params([{"path": str(a), "cap": 30}, {"path": str(b), "weight": 2.5}])
    stats = prepare_dataset(None, tmp_path / "o", capped, tok)
    first, second = stats["sources"]
    assert (first["kept"], first["sampled_out"]) == (30, 70)
    assert second["kept"] == 100 and 200 < second["train_copies"] < 300  # 2 or 3 copies each
    train = [r["messages"][0]["content"] for r in rows(tmp_path / "o", "train")]
    held_out = [r["messages"][0]["content"] for s in ("val", "test") for r in rows(tmp_path / "o", s)]
    from_b = [q for q in train if int(q.split()[1][:-1]) >= 200]
    assert {from_b.count(q) for q in set(from_b)} == {2, 3}
    assert len(held_out) == len(set(held_out))  # val and test hold each example once
    assert sum(1 for q in train if int(q.split()[1][:-1]) < 100) + sum(
        1 for q in held_out if int(q.split()[1][:-1]) < 100) == 30
    # The same rows on a second run, and when the capped source grows, its sample only changes by the new rows.
    again = prepare_dataset(None, tmp_path / "o2", capped, tok)
    assert again["counts"] == stats["counts"] and rows(tmp_path / "o2", "train") == rows(tmp_path / "o", "train")
    half = prepare_dataset(None, tmp_path / "o3", params([{"path": str(b), "weight": 0.5}]), tok)
    assert 30 < half["sources"][0]["kept"] < 70 and half["sources"][0]["sampled_out"] == 100 - half["sources"][0]["kept"]


def test_weight_and_cap_together_are_refused():
    with pytest.raises(ValueError, match="weight or cap"):
        SourceParams(path="a.jsonl", weight=2, cap=3)


def test_data_path_and_sources_set_inconsistently_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "data/dates.jsonl", "sources": [{"path": "data/other.jsonl"}]}}))
    with pytest.raises(ConfigError, match=r"p.yaml:\d+: data.path: data.path 'data/dates.jsonl' and data.sources\[0\].path"):
        load_params(path)
    # The defaults with sources whose first one is data.path: fine.
    ok = load_params(None, {"data.sources": [{"path": "data/dates.jsonl"}, {"feedback": True}]})
    assert [s.file for s in ok.data.source_list()] == ["data/dates.jsonl", "data/feedback.jsonl"]
    assert load_params(None).data.source_list()[0].path == "data/dates.jsonl"  # the shorthand


def test_corrections_outrank_original_answers_and_form_the_feedback_split(tmp_path, tok):
    held = next(i for i in range(1000, 2000) if split_of(i) == "train" and split_of(i, corrected=True) == FEEDBACK_SPLIT)
    trained = next(i for i in range(1000, 2000) if split_of(i, corrected=True) == "train")
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(30)] + [example(held), example(trained)])
    feedback = write(tmp_path / "feedback.jsonl", [
        example(held, "Corrected held."), example(trained, "Old correction.", correction=True),
        example(held, "Corrected held!", correction=True), example(trained, "Corrected trained.", correction=True),
        example(500, "An accepted answer."),
    ])
    stats = prepare_dataset(None, tmp_path / "o", params([{"path": str(a)}, {"path": str(feedback), "feedback": True}]), tok)
    out = tmp_path / "o"
    assert rows(out, FEEDBACK_SPLIT) == [example(held, "Corrected held!")]
    train = answers(out, ("train",))
    assert "Corrected trained." in train and "An accepted answer." in train
    everywhere = answers(out)
    for gone in (f"Answer {held}.", f"Answer {trained}.", "Corrected held.", "Old correction."):
        assert gone not in everywhere
    assert "Corrected held!" not in train  # held out of training
    assert stats["counts"][FEEDBACK_SPLIT] == 1 and stats["train_feedback_overlap"] == 0
    assert stats["corrections"]["examples"] == 2 and stats["corrections"]["replaced"] == 4
    assert [s["replaced_by_corrections"] for s in stats["sources"]] == [2, 2]
    assert stats["sources"][1]["feedback"] is True and stats["sources"][1]["corrections"] == 3


def test_no_feedback_means_no_feedback_split(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(30)])
    empty = write(tmp_path / "feedback.jsonl", [])
    stats = prepare_dataset(None, tmp_path / "o", params([{"path": str(a)}, {"path": str(empty), "feedback": True}]), tok)
    assert FEEDBACK_SPLIT not in stats["counts"] and not (tmp_path / "o" / "feedback.jsonl").exists()
    assert stats["sources"][1]["rows"] == 0


BAD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}  # Alpaca's empty answers


def test_drop_leaves_invalid_rows_out_within_the_share_and_reports_them(tmp_path, tok):
    data = write(tmp_path / "a.jsonl", [example(i) for i in range(98)] + [BAD, BAD])
    sources = [{"path": str(data), "invalid_rows": "drop", "max_invalid_share": 0.02}]
    stats = prepare_dataset(None, tmp_path / "o", params(sources), tok)
    assert stats["examples"] == 98 and stats["invalid_dropped"] == 2
    (source,) = stats["sources"]
    assert (source["invalid"], source["invalid_rows"]) == (2, "drop")
    assert source["invalid_lines"] == [{"line": 99, "category": "bad_content"}, {"line": 100, "category": "bad_content"}]
    # fail (the default) refuses the same file at its first invalid row, saying how to leave them out.
    with pytest.raises(PrepareError, match=r"line 99: bad_content: .*data.sources\[0\].invalid_rows: drop"):
        prepare_dataset(None, tmp_path / "o2", params([{"path": str(data)}]), tok)


def test_drop_beyond_the_share_fails_with_exit_2_naming_the_source_and_key(tmp_path, tok, capsys):
    good = write(tmp_path / "good.jsonl", [example(i) for i in range(30)])
    data = write(tmp_path / "a.jsonl", [example(i) for i in range(100, 197)] + [BAD, BAD, "not an object"])
    p = params([{"path": str(good)}, {"path": str(data), "invalid_rows": "drop", "max_invalid_share": 0.02}])
    with pytest.raises(InvalidRowsError):
        prepare_dataset(None, tmp_path / "o", p, tok)
    resolved = write_resolved(p, tmp_path / "params.yaml")
    assert run_entry(lambda: main(["--params", str(resolved), "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert f"data.sources[1] ({data}): 3 of 100 rows (3.00%) are invalid" in err
    assert "data.sources[1].max_invalid_share 0.02" in err and "line 98: bad_content" in err
    assert not (tmp_path / "o").exists()


def test_resolved_params_carry_every_source_md5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write(tmp_path / "a.jsonl", [example(1)])
    (tmp_path / "data").mkdir()
    fb = write(tmp_path / "data/feedback.jsonl", [example(2, correction=True)])
    p = params([{"path": "a.jsonl"}, {"feedback": True}])
    resolved = load_params(write_resolved(p, tmp_path / "r.yaml"))
    assert [s.md5 for s in resolved.data.sources] == [file_md5(a), file_md5(fb)]
    assert resolved.data.md5 == file_md5(a)
    write(fb, [example(2, "changed", correction=True)])  # a new export: a new md5, so DVC reruns prepare
    again = load_params(write_resolved(p, tmp_path / "r.yaml"))
    assert again.data.sources[1].md5 == file_md5(fb) != resolved.data.sources[1].md5


def test_resolved_settings_find_the_files_under_the_project_from_any_working_directory(tmp_path, monkeypatch):
    """What the MLflow run logs as its params: the settings with every file's md5, found under the
    project's root whatever the process's working directory."""
    from tasks.config import resolved_settings

    (tmp_path / "data").mkdir()
    a = write(tmp_path / "data/a.jsonl", [example(1)])
    fb = write(tmp_path / "data/feedback.jsonl", [example(2, correction=True)])
    (tmp_path / "data/preference.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path / "data")  # not the root
    doc = resolved_settings(params([{"path": "data/a.jsonl"}, {"feedback": True}]), root=tmp_path)
    assert [s["md5"] for s in doc["data"]["sources"]] == [file_md5(a), file_md5(fb)]
    assert doc["data"]["md5"] == file_md5(a)
    assert doc["preference"]["md5"] == file_md5(tmp_path / "data/preference.jsonl")


def test_feedback_sources_weigh_data_feedback_weight_unless_they_set_their_own(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(50)])
    fb = write(tmp_path / "feedback.jsonl", [example(i, f"Fixed {i}.", correction=True) for i in range(100, 140)])
    stats = prepare_dataset(None, tmp_path / "o", params([{"path": str(a)}, {"path": str(fb), "feedback": True}],
                                                          feedback_weight=3.0, feedback_fraction=0.0), tok)
    plain, feedback = stats["sources"]
    assert (plain["weight"], feedback["weight"]) == (None, 3.0)
    train = answers(tmp_path / "o", ("train",))
    fixed = [a for a in train if a.startswith("Fixed")]
    assert {fixed.count(a) for a in fixed} == {3} and feedback["train_copies"] == 3 * feedback["kept"]
    assert {train.count(a) for a in train if not a.startswith("Fixed")} == {1}
    # A weight of the source's own wins over the default.
    own = params([{"path": str(a)}, {"path": str(fb), "feedback": True, "weight": 1.5}], feedback_weight=3.0)
    assert [s.weight for s in own.data.source_list()] == [None, 1.5]


def test_warm_start_trains_on_the_feedback_and_a_stable_replay_sample_and_keeps_every_test_row(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", [example(i) for i in range(200)])
    fb = write(tmp_path / "feedback.jsonl", [example(i, f"Fixed {i}.", correction=True) for i in range(500, 520)])
    srcs = [{"path": str(a)}, {"path": str(fb), "feedback": True}]
    cold = prepare_dataset(None, tmp_path / "cold", params(srcs, feedback_fraction=0.0), tok)
    warm_params = params(srcs, feedback_fraction=0.0).model_copy(
        update={"train": Params().train.model_copy(update={"init_path": "champion", "replay_fraction": 0.25})})
    warm = prepare_dataset(None, tmp_path / "warm", warm_params, tok)
    assert cold["replay"] is None
    replay = warm["replay"]
    assert replay["new"] == 20 and replay["replayed"] + replay["left_out"] == 200 and 25 < replay["replayed"] < 75
    warm_train = answers(tmp_path / "warm", ("train",))
    assert sorted(a for a in warm_train if a.startswith("Fixed")) == sorted(
        a for a in answers(tmp_path / "cold", ("train",)) if a.startswith("Fixed"))  # every feedback row trains
    old_warm = [a for a in warm_train if not a.startswith("Fixed")]
    old_cold = [a for a in answers(tmp_path / "cold", ("train",)) if not a.startswith("Fixed")]
    assert set(old_warm) < set(old_cold) and 0 < len(old_warm) <= replay["replayed"] < len(old_cold)
    for split in ("val", "test"):  # the gate scores the same rows as a run from the base
        assert rows(tmp_path / "warm", split) == rows(tmp_path / "cold", split)
    # Deterministic: the same replay on a second run, and a larger fraction replays a superset.
    again = prepare_dataset(None, tmp_path / "again", warm_params, tok)
    assert again["replay"] == replay and rows(tmp_path / "again", "train") == rows(tmp_path / "warm", "train")
    more = warm_params.model_copy(update={"train": warm_params.train.model_copy(update={"replay_fraction": 0.5})})
    prepare_dataset(None, tmp_path / "more", more, tok)
    assert set(warm_train) < set(answers(tmp_path / "more", ("train",)))


def test_a_feedback_source_leaves_out_what_it_cannot_train_unless_told_to_fail():
    """Served conversations the settings cannot train stay in the log and come back in every
    export: under `fail` one of them would fail every run that reads the feedback."""
    assert (SourceParams(feedback=True).invalid_rows, SourceParams(feedback=True).max_invalid_share) == ("drop", 1.0)
    assert SourceParams(feedback=True, invalid_rows="fail").invalid_rows == "fail"
    assert SourceParams(feedback=True, max_invalid_share=0.1).max_invalid_share == 0.1
    assert (SourceParams(path="a.jsonl").invalid_rows, SourceParams(path="a.jsonl").max_invalid_share) == ("fail", 0.01)


def test_rows_over_the_token_limit_are_invalid_rows_of_a_source_that_drops(tmp_path, tok):
    """Past data.max_drop_fraction of a source its over-long rows are a validation error: a
    source that drops invalid rows leaves them out within its share instead of failing."""
    from tasks.data.sources import accept_report
    from tasks.data.validate import validate_dataset

    longs = [{"messages": [{"role": "user", "content": f"{n}: " + "Rewrite this date for me, please. " * 40},
                           {"role": "assistant", "content": "A date."}]} for n in range(3)]
    data = write(tmp_path / "feedback.jsonl", [example(i) for i in range(7)] + longs)
    report = validate_dataset(data, DataParams(max_tokens=64), tokenizer=tok).to_dict()
    assert report["errors"].get("over_token_limit") == 3 and not report["valid"]
    assert accept_report("data.sources[1]", SourceParams(feedback=True), report)
    assert not accept_report("data.sources[1]", SourceParams(path=str(data)), report)
    from tasks.pipeline.result import summarise_sources  # the run's result counts them invalid, as the policy does

    source = {"path": str(data), "md5": None, "feedback": True, "invalid_rows": "drop"}
    assert summarise_sources(str(data), [source], [report]).sources[0].invalid == 3
    with pytest.raises(InvalidRowsError, match=r"3 of 10 rows \(30.00%\) are invalid.*over_token_limit"):
        accept_report("data.sources[1]", SourceParams(feedback=True, max_invalid_share=0.2), report)


def test_a_feedback_sources_long_rows_are_left_out_by_prepare_too(tmp_path, tok):
    """Validation accepts them as the source's invalid rows: prepare's share of over-long rows
    is then of the other sources, or the run failed there instead (10 of 120 > 0.05)."""
    data = write(tmp_path / "a.jsonl", [example(i) for i in range(100)])
    longs = [{"messages": [{"role": "user", "content": f"{n}: " + "Rewrite this date for me, please. " * 40},
                           {"role": "assistant", "content": "A date."}], "correction": True} for n in range(10)]
    feedback = write(tmp_path / "feedback.jsonl", [example(200 + i, correction=True) for i in range(10)] + longs)
    sources = [{"path": str(data)}, {"path": str(feedback), "feedback": True}]
    stats = prepare_dataset(None, tmp_path / "o", params(sources, max_tokens=64), tok)
    assert stats["examples"] == 110 and stats["dropped"] == 10
    # Said of the source they came from: its `kept` was counted before the length policy (20
    # kept, 10 trained on) and the dropped lines named no file.
    first, second = stats["sources"]
    assert (first["kept"], first["length_dropped"], second["kept"], second["length_dropped"]) == (100, 0, 10, 10)
    assert second["train_copies"] == 40  # the trained ones' copies only (4 each: data.feedback_weight)
    assert stats["dropped_rows"] == [{"source": 1, "line": n} for n in range(11, 21)]
    with pytest.raises(PrepareError, match=r"10 of 120 examples \(8.3%\) are over data.max_tokens"):
        prepare_dataset(None, tmp_path / "o2", params([{"path": str(data)}, {"path": str(feedback)}],
                                                      max_tokens=64), tok)


def test_under_truncate_only_the_rows_that_cannot_be_cut_are_invalid(tmp_path, tok):
    from tasks.data.sources import accept_report
    from tasks.data.validate import validate_dataset

    cut = [{"messages": [{"role": "user", "content": f"{n}: Rewrite it."},
                         {"role": "assistant", "content": "A date, " * 40}]} for n in range(3)]
    uncut = [{"messages": [{"role": "user", "content": "Rewrite this date for me, please. " * 40},
                           {"role": "assistant", "content": "A date."}]}]
    data = write(tmp_path / "feedback.jsonl", [example(i) for i in range(6)] + cut + uncut)
    report = validate_dataset(data, DataParams(max_tokens=64, length_policy="truncate"), tokenizer=tok).to_dict()
    assert (report["dropped"], report["truncated"]) == (1, 3) and "over_token_limit" in report["errors"]
    with pytest.raises(InvalidRowsError, match=r"1 of 10 rows \(10.00%\) are invalid"):
        accept_report("data.sources[1]", SourceParams(feedback=True, max_invalid_share=0.05), report)
