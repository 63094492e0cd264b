"""Feedback erased from the log leaves the data a run versions: the next run empties its
earlier export instead of keeping the erased user's examples in `data/` (and in DVC)."""

from __future__ import annotations

import json

from flows import retrain
from tasks.config import load_params
from tasks.feedback import FeedbackStore, Interaction


def test_a_run_after_forget_empties_the_earlier_feedback_export(project, monkeypatch):
    db = project / "feedback.db"
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(db))
    store = FeedbackStore(db)
    store.log_interaction(Interaction("c0", "/v1/chat/completions", "ftllm-chat", "1",  # the project's model
                                      [{"role": "user", "content": "Convert 2016-03-18"}], "March 18, 2016",
                                      "stop", 3, 2, 1.0, "ops", "ann@example.org"))
    store.add_feedback("c0", 5, key_name="ops", trusted=True, end_user="ann@example.org")
    store.close()
    params = load_params(project / "params.yaml", {"data.feedback": True})
    out = project / "data" / "feedback.jsonl"

    _, overrides, exported = retrain._take_in_feedback(project, str(project / "params.yaml"), params, {})
    assert [json.loads(line)["messages"][-1]["content"] for line in out.read_text().splitlines()] == ["March 18, 2016"]
    assert {"feedback": True} in overrides["data.sources"]

    store = FeedbackStore(db)
    assert store.forget(end_user="ann@example.org", reason="forget --user") == (1, 1)
    store.close()
    _, overrides, exported = retrain._take_in_feedback(project, str(project / "params.yaml"), params, {})
    assert out.read_text() == "" and exported[-1]["examples"] == 0 and "data.sources" not in overrides
    assert exported[-1]["tracked_by"]  # the emptied file is what DVC versions now
