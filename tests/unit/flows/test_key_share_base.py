"""The base of feedback.max_key_share is the train rows of the run's other sources, as they are trained."""

from __future__ import annotations

from flows.approval import train_rows
from tasks.config import SourceParams


def test_other_sources_count_as_trained_under_their_weight_and_cap(tmp_path):
    paths = []
    for name, lines in (("a.jsonl", 10), ("b.jsonl", 10), ("c.jsonl", 10), ("feedback.jsonl", 50)):
        (path := tmp_path / name).write_text("{}\n" * lines + "\n")
        paths.append(path)
    sources = [SourceParams(path=str(paths[0])), SourceParams(path=str(paths[1]), weight=2.0),
               SourceParams(path=str(paths[2]), cap=4), SourceParams(feedback=True)]
    assert train_rows(sources, paths) == 10 + 20 + 4  # the feedback source is what is capped, not its base
    assert train_rows([SourceParams(path=str(tmp_path / "missing.jsonl"))], [tmp_path / "missing.jsonl"]) == 0


def test_a_json_array_source_counts_its_elements(tmp_path):
    (path := tmp_path / "chats.json").write_text("[\n" + ",\n".join(['{"messages": [\n  {"role": "user"}\n]}'] * 6) + "\n]\n")
    assert train_rows([SourceParams(path=str(path))], [path]) == 6  # not its 20 lines
