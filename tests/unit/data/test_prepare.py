"""Prepare: canonical splits, deterministic and stable under appended data, dedupe, length policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.config import DataParams, ModelParams, Params, write_resolved
from tasks.data.prepare import prepare_dataset, prompt_key
from tasks.errors import PrepareError
from tasks.model.chat import count_tokens
from tasks.model.loading import load_tokenizer, resolve_base
from tasks.runner import run_entry
from tasks.stages.prepare import main


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(resolve_base(ModelParams()))


def example(i: int, answer: str | None = None) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": answer or f"Answer {i}."},
        ]
    }


def write(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


def params(path: Path, **data) -> Params:
    return Params(data=DataParams(path=str(path), **{"max_tokens": 256, "val_fraction": 0.2, "test_fraction": 0.2, **data}))


def read_split(out: Path, split: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]


def test_splits_are_deterministic_and_complete(tmp_path: Path, tok) -> None:
    data = write(tmp_path / "d.jsonl", [example(i) for i in range(200)])
    stats = prepare_dataset(data, tmp_path / "a", params(data), tok)
    prepare_dataset(data, tmp_path / "b", params(data), tok)
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    counts = stats["counts"]
    assert sum(counts.values()) == 200 and counts["test"] > 10 and counts["val"] > 10
    assert json.loads((tmp_path / "a/stats.json").read_text())["counts"] == counts
    assert stats["train_test_overlap"] == 0 and len(stats["md5"]) == 32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_appending_data_keeps_every_example_in_its_split(tmp_path: Path, tok) -> None:
    first = write(tmp_path / "first.jsonl", [example(i) for i in range(150)])
    more = write(tmp_path / "more.jsonl", [example(i) for i in range(150)] + [example(i) for i in range(1000, 1300)])
    prepare_dataset(first, tmp_path / "a", params(first), tok)
    prepare_dataset(more, tmp_path / "b", params(more), tok)
    for split in ("train", "val", "test"):
        before = read_split(tmp_path / "a", split)
        after = read_split(tmp_path / "b", split)
        assert before and all(e in after for e in before), split


def test_no_prompt_is_in_both_train_and_test(tmp_path: Path, tok) -> None:
    data = write(tmp_path / "d.jsonl", [example(i % 40, answer=f"variant {i}") for i in range(200)])
    prepare_dataset(data, tmp_path / "o", params(data), tok)
    train = {prompt_key(e["messages"]) for e in read_split(tmp_path / "o", "train")}
    test = {prompt_key(e["messages"]) for e in read_split(tmp_path / "o", "test")}
    assert test and not train & test


def test_duplicates_are_dropped_and_counted(tmp_path: Path, tok) -> None:
    near = example(1)
    near["messages"][1]["content"] = "  QUESTION   1? "
    data = write(tmp_path / "d.jsonl", [example(i) for i in range(10)] + [example(3), example(3), near])
    stats = prepare_dataset(data, tmp_path / "o", params(data), tok)
    assert stats["deduplicated"] == {"exact": 2, "near": 1}
    assert stats["examples_read"] == 13 and stats["examples"] == 10


def test_contents_are_stripped(tmp_path: Path, tok) -> None:
    e = example(1)
    e["messages"][2]["content"] = "  Answer 1.\n"
    data = write(tmp_path / "d.jsonl", [e])
    prepare_dataset(data, tmp_path / "o", params(data, test_fraction=0.01, val_fraction=0.0), tok)
    kept = [x for s in ("train", "val", "test") for x in read_split(tmp_path / "o", s)]
    assert kept == [example(1)]


def test_length_policy_drop_counts_and_gates_on_max_drop_fraction(tmp_path: Path, tok) -> None:
    long = [example(100 + i, answer="word " * 100) for i in range(2)]
    data = write(tmp_path / "d.jsonl", [example(i) for i in range(18)] + long)
    stats = prepare_dataset(data, tmp_path / "o", params(data, max_tokens=64, max_drop_fraction=0.1), tok)
    assert (stats["dropped"], stats["truncated"], stats["examples"]) == (2, 0, 18)
    assert stats["dropped_lines"] == [19, 20]
    with pytest.raises(PrepareError, match="data.max_drop_fraction"):
        prepare_dataset(data, tmp_path / "o2", params(data, max_tokens=64, max_drop_fraction=0.05), tok)
    assert not (tmp_path / "o2").exists()


def test_length_policy_truncate_cuts_the_last_answer_to_fit(tmp_path: Path, tok) -> None:
    data = write(tmp_path / "d.jsonl", [example(i) for i in range(5)] + [example(7, answer="word " * 100)])
    p = params(data, max_tokens=64, length_policy="truncate", max_drop_fraction=0.0)
    stats = prepare_dataset(data, tmp_path / "o", p, tok)
    assert (stats["dropped"], stats["truncated"], stats["examples"]) == (0, 1, 6)
    kept = [x for s in ("train", "val", "test") for x in read_split(tmp_path / "o", s)]
    cut = [x for x in kept if x["messages"][1]["content"] == "Question 7?"][0]
    assert cut["messages"][2]["content"].startswith("word word")
    assert all(count_tokens(tok, x["messages"])[0] <= 64 for x in kept)


def test_invalid_data_is_refused_naming_the_line(tmp_path: Path, tok) -> None:
    data = write(tmp_path / "d.jsonl", [example(1), {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(PrepareError, match=r"line 2: no_assistant"):
        prepare_dataset(data, tmp_path / "o", params(data), tok)


def test_examples_without_trained_tokens_are_refused_naming_the_line(tmp_path: Path, tok) -> None:
    from tests.support.families import QWEN3_TEMPLATE

    qwen3 = tok.__class__.from_pretrained(tok.name_or_path)
    qwen3.chat_template = QWEN3_TEMPLATE  # rewrites an answer written with inline reasoning
    data = write(tmp_path / "d.jsonl", [example(1), example(2, answer="<think>plan</think>"), example(3)])
    with pytest.raises(PrepareError, match=r"d.jsonl: line 2: no_trained_tokens"):
        prepare_dataset(data, tmp_path / "o", params(data), qwen3)
    assert not (tmp_path / "o").exists()


def test_alpaca_seed_form_is_prepared_with_labels(tmp_path: Path, tok) -> None:
    task = {"id": "t", "name": "n", "instruction": "Classify.", "is_classification": True,
            "instances": [{"input": f"text {i}", "output": "yes" if i % 2 else "no"} for i in range(30)]}  # fmt: skip
    data = write(tmp_path / "d.jsonl", [task])
    stats = prepare_dataset(data, tmp_path / "o", params(data), tok)
    assert stats["format"] == "alpaca" and stats["examples"] == 30
    assert all("label" in x for s in ("train", "val", "test") for x in read_split(tmp_path / "o", s))


def test_main_runs_the_stage_from_resolved_params(tmp_path: Path, tok, capsys) -> None:
    data = write(tmp_path / "d.jsonl", [example(i) for i in range(30)])
    resolved = write_resolved(params(data), tmp_path / "params.yaml")  # adds data.md5, as the DVC stage does
    assert "md5" in yaml.safe_load(resolved.read_text())["data"]
    assert main(["--params", str(resolved), "--out", str(tmp_path / "prepared")]) == 0
    assert "prepared 30 examples" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "prepared").iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl", "stats.json"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("oops\n")
    write_resolved(params(bad), tmp_path / "bad.yaml")
    assert run_entry(lambda: main(["--params", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "p2")])) == 1
    assert "line 1: invalid_json" in capsys.readouterr().err
