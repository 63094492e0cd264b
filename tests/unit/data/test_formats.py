"""Reading data files and converting openai / alpaca / sharegpt examples to canonical messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.data.formats import RecordError, detect_format, read_records, to_canonical
from tasks.errors import DataFileError, FormatError
from tests.support.project import REPO

SEED_TASKS = REPO.parent / "shared/data/alpaca_seed_tasks.jsonl"

CANONICAL = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]},
]
OPENAI = CANONICAL
ALPACA = [
    {"system": "Be brief.", "instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"system": "Be brief.", "instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"system": "Be brief.", "instruction": "Name a colour.", "output": "Blue"},
]
SHAREGPT = [
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Translate to French.\n\ncat"}, {"from": "assistant", "value": "chat"}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue"}]},
]
SOURCES = {"openai": OPENAI, "alpaca": ALPACA, "sharegpt": SHAREGPT}


def write_jsonl(path: Path, objs: list) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


def convert_file(path: Path) -> list[dict]:
    records = list(read_records(path))
    fmt = detect_format(records[0][1])
    return [ex for _, obj in records for ex in to_canonical(obj, fmt)]


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_each_format_converts_to_the_same_canonical_examples(tmp_path: Path, fmt: str) -> None:
    assert detect_format(SOURCES[fmt][0]) == fmt
    assert convert_file(write_jsonl(tmp_path / "d.jsonl", SOURCES[fmt])) == CANONICAL


@pytest.mark.parametrize("fmt", list(SOURCES))
def test_json_array_reads_like_jsonl_with_index_as_line(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(SOURCES[fmt], indent=2), encoding="utf-8")
    assert [line for line, _ in read_records(path)] == [1, 2, 3]
    assert convert_file(path) == CANONICAL


def test_alpaca_instances_yield_one_example_each_with_label_for_classification() -> None:
    task = {
        "id": "t1", "name": "sentiment", "instruction": "Classify the sentiment.", "is_classification": True,
        "instances": [{"input": "I love it", "output": "positive"}, {"input": "Awful", "output": "negative"}],
    }  # fmt: skip
    examples = to_canonical(task, detect_format(task))
    assert [e["label"] for e in examples] == ["positive", "negative"]
    assert examples[0]["messages"] == [
        {"role": "user", "content": "Classify the sentiment.\n\nI love it"},
        {"role": "assistant", "content": "positive"},
    ]


def test_openai_optional_message_keys_are_kept() -> None:
    obj = {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": "yo", "weight": 0}]}
    assert to_canonical(obj, "openai")[0]["messages"][1] == {"role": "assistant", "content": "yo", "weight": 0}


def test_sharegpt_unknown_sender_is_kept_for_validation_to_report() -> None:
    obj = {"conversations": [{"from": "robot", "value": "x"}]}
    assert to_canonical(obj, "sharegpt")[0]["messages"] == [{"role": "robot", "content": "x"}]


def test_detect_format_refuses_unknown_keys() -> None:
    with pytest.raises(FormatError, match="cannot tell the format"):
        detect_format({"prompt": "a", "completion": "b"})


def test_read_records_reports_bad_lines_and_skips_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n\nnot json\n{"a": "\xff"}\n')
    records = list(read_records(path))
    assert [line for line, _ in records] == [1, 3, 4]
    assert records[1][1] == RecordError("invalid_json", records[1][1].message)
    assert records[2][1].category == "invalid_utf8"
    # Where the line goes wrong: a cut line stops short at its end (it was said of column 1, the next line's)
    path.write_text('{"messages": [\n{"messages": [}\n')
    cut, bad = (error.message for _, error in read_records(path))
    assert cut == "not valid JSON: Expecting value (at the end of the line: it stops short)"
    assert bad == "not valid JSON: Expecting value (column 15)"


@pytest.mark.parametrize("make", [lambda p: p / "missing.jsonl", lambda p: p])
def test_unreadable_paths_raise_data_file_error(tmp_path: Path, make) -> None:
    with pytest.raises(DataFileError, match=str(make(tmp_path))):
        list(read_records(make(tmp_path)))


def test_seed_tasks_convert_one_example_per_instance() -> None:
    if not SEED_TASKS.is_file():
        pytest.skip(f"{SEED_TASKS} is absent (CI puts ../shared beside the repository)")
    records = list(read_records(SEED_TASKS))
    assert detect_format(records[0][1]) == "alpaca"
    examples = [ex for _, obj in records for ex in to_canonical(obj, "alpaca")]
    assert len(examples) == sum(len(obj["instances"]) for _, obj in records)
    labelled = [obj for _, obj in records if obj["is_classification"]]
    assert sum("label" in e for e in examples) == sum(len(o["instances"]) for o in labelled) > 0


def test_openai_text_parts_are_joined_and_developer_is_the_system_role() -> None:
    parts = {"messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Add 2"}, {"type": "text", "text": " and 3."}], "name": "bob"},
        {"role": "assistant", "content": [{"type": "text", "text": "5"}]},
    ]}
    assert to_canonical(parts, "openai")[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3.", "name": "bob"},
        {"role": "assistant", "content": "5"},
    ]
    image = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    kept = to_canonical({"messages": [{"role": "user", "content": image}]}, "openai")[0]
    assert kept["messages"][0]["content"] == image  # not text: kept for validation to name
