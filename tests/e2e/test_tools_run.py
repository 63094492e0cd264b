"""The function-calling task end to end: one `ftllm run` with the settings of params.tools.yaml.

Issue 21 asks that, on the built-in task (data/tools.jsonl) and in the dates task's budget
(the default 300 steps), the candidate call the right function in at least 0.9 of the test
split's calls and with the right arguments in at least 0.8. The first is reached, the
second not yet (benchmarks/results/tools_tiny.md: at 300 steps the candidate names the
function in 0.93-1.0 of the calls over the seeds measured and gets the arguments right in
0.31-0.55; the currency amount is the argument it does not copy). What the test holds the
run to is what that budget reliably gives: the run evaluates every test example's call
turn, reports the three tool metrics for the candidate and the base model prompted zero-
and few-shot, the candidate names the function in at least NAME_FLOOR of the calls and
gets the arguments right in at least ARGS_FLOOR, and it calls better than the prompted
base, which writes no valid call. The gate decides on the text metrics of the final
answers as for any run; its verdict is the run's exit code.

The run is the retrain flow on params.tools.yaml, as `ftllm run --params params.tools.yaml`
starts it (`params_file`), in this process under the session's Prefect harness; the command
line's own exits are tested in test_cli_run.py.
"""

from __future__ import annotations

import json

import pytest

from tests.support.project import FAMILY_RUN

pytestmark = pytest.mark.slow

TOOL_METRICS = ("tool_calls", "tool_name_accuracy", "tool_arguments_match", "tool_invalid_rate")
# Below the lowest of the runs measured at 300 steps (train.seed 42, 1 and 2: names 0.927-1.0,
# arguments 0.314-0.550 on the 191 call turns), with room for the 60 call turns scored here.
NAME_FLOOR = 0.85
ARGS_FLOOR = 0.2


@pytest.fixture(scope="module")
def tools_run(project, prefect_harness) -> dict:
    from flows.retrain import retrain

    # 60 of the test split's examples, not 200: less evaluation time, for every model alike.
    state = retrain(params_file=str(project / "params.tools.yaml"), overrides={"eval.max_examples": 60},
                    return_state=True)
    result = state.result(raise_on_failure=False)
    assert not isinstance(result, BaseException), result
    assert result.status in ("promoted", "rejected"), result.error  # decided by the gate, not failed
    return json.loads(result.model_dump_json())


def test_the_candidate_names_the_function_and_calls_better_than_the_prompted_base(tools_run, project):
    assert tools_run["data"]["path"].endswith("data/tools.jsonl") and tools_run["version"] is not None
    summary = json.loads((project / "artifacts/model/train_summary.json").read_text())
    assert summary["steps"] == 300  # the dates task's budget: the default run's steps
    metrics = tools_run["metrics"]
    cand, zero, few = metrics["candidate"], metrics["base_zero_shot"], metrics["base_few_shot"]
    for scored in (cand, zero, few):
        assert set(TOOL_METRICS) <= set(scored), scored
    # Every test example calls a tool before it answers: each call turn is scored, for every model alike.
    assert cand["tool_calls"] == zero["tool_calls"] == few["tool_calls"] == cand["examples"] > 0
    assert cand["tool_name_accuracy"] >= NAME_FLOOR, cand
    assert cand["tool_arguments_match"] >= ARGS_FLOOR, cand
    best_base = max(zero["tool_name_accuracy"], few["tool_name_accuracy"])
    assert cand["tool_name_accuracy"] > best_base, (cand, zero, few)
    assert cand["tool_arguments_match"] >= max(zero["tool_arguments_match"], few["tool_arguments_match"])
    assert cand["tool_arguments_match"] <= cand["tool_name_accuracy"]  # right arguments need the right function

    # The per-example scores behind the aggregates, paired by the conversation up to each call.
    per_example = json.loads((project / "artifacts/per_example.json").read_text())["candidate"]
    n = cand["tool_calls"]
    assert len(per_example["tool_ids"]) == len(set(per_example["tool_ids"])) == n
    assert sum(per_example["tool_name_match"]) / n == pytest.approx(cand["tool_name_accuracy"])
    assert sum(per_example["tool_arguments_match"]) / n == pytest.approx(cand["tool_arguments_match"])
    assert 1 - sum(per_example["tool_valid_call"]) / n == pytest.approx(cand["tool_invalid_rate"])


# The families whose published templates render tools (tests/families.py): a few steps each,
# through the retrain flow with model.base a family folder. What is checked is that the
# tools reach the trained tokens and the evaluation, not how well the model learns.
FAMILY_TOOLS_RUN = {**FAMILY_RUN, "train.max_steps": 3, "train.batch_size": 2, "eval.max_examples": 6}


def _called(example: dict) -> str:
    return example["messages"][1]["tool_calls"][0]["function"]["name"]


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1"])
def test_a_family_tools_run_trains_and_scores_the_calls(name, project, prefect_harness, family_models, tmp_path):
    from flows.retrain import retrain
    from scripts.make_tools_data import make_tool_examples
    from tasks.model.chat import encode_chats
    from tasks.model.loading import load_tokenizer

    # Each example declares only the tool it calls: the family test tokenizers are small, and
    # Llama 3.1's template, with three schemas, is longer than the test models' 2048 positions.
    examples = [{**e, "tools": [t for t in e["tools"] if t["function"]["name"] == _called(e)]}
                for e in make_tool_examples(60, seed=3)]
    # A third of the final answers carry a reasoning trace, which both templates drop: trained
    # and scored with `train.train_reasoning: false`, the setting the refusal names.
    for e in examples[::3]:
        e["messages"][-1] = {**e["messages"][-1], "reasoning_content": "The tool answered; say it back."}
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    overrides = {**FAMILY_TOOLS_RUN, "model.base": str(family_models(name)), "data.path": str(data),
                 "data.max_tokens": 1536, "train.seq_len": 1536, "registry.model_name": f"tools-{name}",
                 "train.train_reasoning": False}
    state = retrain(params_file=str(project / "params.yaml"), overrides=overrides, return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_completed(), getattr(result, "error", result)

    # The prepared rows keep their tools; under the family's template the call turn is trained.
    train = [json.loads(line) for line in (project / "artifacts/prepared/train.jsonl").read_text().splitlines()]
    assert train and all([t["function"]["name"] for t in row["tools"]] == [_called(row)] for row in train)
    tokenizer = load_tokenizer(str(project / "artifacts/model"))
    for row, encoded in zip(train[:4], encode_chats(tokenizer, train[:4], train_reasoning=False)):
        trained = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.loss_mask) if m])
        call = row["messages"][1]["tool_calls"][0]["function"]
        assert call["name"] in trained and all(str(v) in trained for v in json.loads(call["arguments"]).values())
        assert row["tools"][0]["function"]["description"] not in trained  # the schemas are context, never trained

    # Every model's every test call turn is scored.
    test = (project / "artifacts/prepared/test.jsonl").read_text().splitlines()
    for model in ("candidate", "base_zero_shot", "base_few_shot"):
        assert getattr(result.metrics, model)["tool_calls"] == min(len(test), 6), model
