"""`ftllm bench serve --peer`: the service and `transformers serve --continuous-batching`
side by side on the same model, over HTTP."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from ftllm.cli import app
from serving.bench import serve_peer
from serving.bench.bench_serve import compare_answers


@pytest.fixture(scope="module")
def server(http_server, serving_dir):
    with http_server(serving_dir / "bentoml-serve-peer.log", {}) as url:
        yield url


def test_answers_are_compared_prompt_by_prompt():
    ours = {"2001-02-03": "February third", "1999-12-31": "December", "2020-01-01": "January"}
    theirs = {"2001-02-03": "February third", "1999-12-31": "Dec", "1900-01-01": "unseen by ours"}
    assert compare_answers(ours, theirs) == {
        "compared": 2, "identical": 1, "differ": [{"prompt": "1999-12-31", "ours": "December", "peer": "Dec"}]}


@pytest.mark.slow
def test_the_peer_serves_the_services_model_and_both_are_reported(server, tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "serve", "--peer", "--url", server, "--requests", "6", "--concurrency", "1",
            "--concurrency", "3", "--repeats", "2", "--max-tokens", "4", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3], result.stdout
    for level in report["levels"]:
        assert len(level["ratios"]) == 2 and level["median_ratio"] > 0
        for side in ("ours", "peer"):
            assert level[side]["rps"] > 0 and level[side]["p95_ms"] >= level[side]["p50_ms"] > 0
        assert all(r["ours"]["errors"] == r["peer"]["errors"] == 0 for r in level["repeats"])
    # The peer got the folder of the version the service reports (from the BentoML store),
    # with the LoRA weights merged as the engine merges them: greedy answers match.
    assert report["service"]["source"] == "bentoml:ftllm-chat-test:v1"
    assert report["answers"]["compared"] == 64
    assert report["answers"]["identical"] == 64, report["answers"]["differ"]
    assert result.exit_code == 0, result.stdout
    text = " ".join(result.stdout.split())
    assert "64/64 identical" in text and "load average" in text


@pytest.mark.slow
def test_a_peer_that_cannot_start_is_one_clear_error(server, monkeypatch):
    def broken(model_dir, port):
        return [sys.executable, "-c", "import sys; print('Missing dependencies for serving'); sys.exit(3)"]

    monkeypatch.setattr(serve_peer, "peer_command", broken)
    result = CliRunner().invoke(app, ["bench", "serve", "--peer", "--url", server, "--requests", "2"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: the peer (transformers serve --continuous-batching) exited with code 3")
    assert "Missing dependencies for serving" in result.stderr and "Traceback" not in result.stderr
