"""Named keys with roles against the real service over HTTP: a key without a route's role gets
403, an unknown key 401, a rewritten key file takes effect without a restart; every
interaction and feedback row records its key and end user, which the export carries; a key
is rate-limited on /feedback and may correct a completion once."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tasks.feedback.export import pseudonym

KEYS = {"web": "web-infer-secret", "teach": "teach-feedback-secret", "ops": "ops-admin-secret",
        "front": "front-end-secret"}
MESSAGES = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]


def write_keys(path, rotated: str | None = None) -> None:
    path.write_text(f"# test keys\nweb:infer={rotated or KEYS['web']}\nteach:infer+feedback={KEYS['teach']}\n"
                    f"ops:infer+feedback+admin+trusted={KEYS['ops']}\nfront:infer+feedback+trusted={KEYS['front']}\n")


PER_MINUTE = 4


@pytest.fixture(scope="module")
def keyed(http_server, serving_dir):
    import os

    import yaml

    keys = serving_dir / "keys.txt"
    write_keys(keys)
    settings = yaml.safe_load(Path(os.environ["FTLLM_PARAMS"]).read_text())
    settings["feedback"] = {**settings.get("feedback", {}), "per_key_per_minute": PER_MINUTE}
    (serving_dir / "keys-params.yaml").write_text(yaml.safe_dump(settings))
    env = {"FTLLM_API_KEYS_FILE": str(keys), "FTLLM_FEEDBACK_DB": str(serving_dir / "keys-feedback.db"),
           "FTLLM_PARAMS": str(serving_dir / "keys-params.yaml")}
    with http_server(serving_dir / "keys-serve.log", env) as url:  # a log of its own: other tests count theirs
        yield url, keys


def call(url: str, method: str, path: str, key: str | None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{url}{path}", headers=headers, timeout=60, **kwargs)


def error_code(resp: httpx.Response) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]["code"]


@pytest.mark.slow
def test_each_route_needs_its_role(keyed):
    url, _ = keyed
    answer = call(url, "POST", "/v1/chat/completions", KEYS["web"], json={"messages": MESSAGES, "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    rating = {"id": answer.json()["id"], "rating": 2, "correction": "February 3, 2001"}
    assert error_code(call(url, "POST", "/feedback", KEYS["web"], json=rating)) == (403, "insufficient_role")
    assert "lacks the 'feedback' role" in call(url, "POST", "/feedback", KEYS["web"], json=rating).json()["error"]["message"]
    assert error_code(call(url, "POST", "/admin/reload", KEYS["web"])) == (403, "insufficient_role")
    assert call(url, "POST", "/feedback", KEYS["teach"], json=rating).status_code == 200
    assert error_code(call(url, "POST", "/admin/reload", KEYS["teach"])) == (403, "insufficient_role")
    assert call(url, "POST", "/admin/reload", KEYS["ops"]).status_code == 200
    assert error_code(call(url, "GET", "/v1/models", None)) == (401, "invalid_api_key")
    assert error_code(call(url, "GET", "/v1/models", "not-a-key")) == (401, "invalid_api_key")
    assert call(url, "GET", "/livez", None).status_code == 200


@pytest.mark.slow
def test_a_rotated_key_works_at_once_and_the_old_one_stops(keyed):
    url, keys = keyed
    write_keys(keys, rotated="web-infer-secret-rotated")
    assert error_code(call(url, "GET", "/v1/models", KEYS["web"])) == (401, "invalid_api_key")
    assert call(url, "GET", "/v1/models", "web-infer-secret-rotated").status_code == 200
    keys.write_text("web:infer=x\n")  # a broken rotation: refused, the keys read before still work
    assert call(url, "GET", "/v1/models", "web-infer-secret-rotated").status_code == 200
    # ... but none of them is trusted until it is fixed: the broken file may have been meant to
    # take a key's trust away, and front's feedback waits for a person meanwhile.
    answer = call(url, "POST", "/v1/chat/completions", KEYS["front"], json={"messages": MESSAGES, "max_tokens": 4})
    rated = call(url, "POST", "/feedback", KEYS["front"], json={"id": answer.json()["id"], "rating": 5})
    assert rated.status_code == 200 and rated.json()["held"] is True, rated.text
    write_keys(keys)
    answer = call(url, "POST", "/v1/chat/completions", KEYS["front"], json={"messages": MESSAGES, "max_tokens": 4})
    again = {"id": answer.json()["id"], "rating": 5, "user": "u-9"}
    assert call(url, "POST", "/feedback", KEYS["front"], json=again).json()["held"] is False
    keys.unlink()  # deleting the file revokes its keys (a leaked one among them), and opens nothing
    assert error_code(call(url, "GET", "/v1/models", KEYS["front"])) == (401, "invalid_api_key")
    assert error_code(call(url, "GET", "/v1/models", None)) == (401, "invalid_api_key")
    write_keys(keys)
    assert call(url, "GET", "/v1/models", KEYS["front"]).status_code == 200


@pytest.mark.slow
def test_provenance_is_logged_and_exported(keyed, serving_dir):
    from tasks.feedback import FeedbackReader, export_feedback
    from tasks.feedback.export import ExportPolicy

    url, _ = keyed
    body = {"messages": [{"role": "user", "content": "1999-12-31"}], "max_tokens": 4, "user": "ann-42"}
    answer = call(url, "POST", "/v1/chat/completions", KEYS["teach"], json=body).json()
    fix = {"id": answer["id"], "rating": 1, "correction": "December 31, 1999", "user": "ann-42"}
    stored = call(url, "POST", "/feedback", KEYS["teach"], json=fix).json()
    assert stored["stored"] and stored["held"]  # teach is not trusted: held for approval
    assert error_code(call(url, "POST", "/feedback", KEYS["teach"], json=fix)) == (409, "duplicate_correction")
    db = serving_dir / "keys-feedback.db"
    with FeedbackReader(db) as reader:
        rated, _, _ = reader.rated_completions()
    interaction, row = next((i, r) for i, r in rated if r.completion_id == answer["id"])
    assert (interaction.key_name, interaction.end_user, row.key_name, row.end_user, row.trusted) == (
        "teach", "ann-42", "teach", "ann-42", False)
    out = serving_dir / "keys-export.jsonl"
    export_feedback(db, out, 4)
    assert "December 31, 1999" not in out.read_text()  # held under the default settings
    export_feedback(db, out, 4, policy=ExportPolicy(auto_approve="all"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"key": "teach", "user": pseudonym("ann-42"), "feedback_id": row.id} in [r["provenance"] for r in rows]
    assert "ann-42" not in json.dumps(rows)  # the end user's id is not written to the training data


@pytest.mark.slow
def test_feedback_is_rate_limited_per_key(keyed):
    url, _ = keyed
    missing = {"id": "chatcmpl-none", "rating": 3}
    statuses = [call(url, "POST", "/feedback", KEYS["ops"], json=missing).status_code for _ in range(PER_MINUTE)]
    assert statuses == [404] * PER_MINUTE
    limited = call(url, "POST", "/feedback", KEYS["ops"], json=missing)
    assert error_code(limited) == (429, "rate_limit_exceeded") and 1 <= int(limited.headers["retry-after"]) <= 60
    assert call(url, "POST", "/feedback", KEYS["teach"], json=missing).status_code == 404  # another key is not
    # A trusted key's limit is per end user it names (a front end relaying its users)...
    assert call(url, "POST", "/feedback", KEYS["ops"], json={**missing, "user": "u-1"}).status_code == 404
    # ...an untrusted key's user ids are not believed: naming other users does not lift its limit.
    statuses = [call(url, "POST", "/feedback", KEYS["teach"], json={**missing, "user": f"u-{n}"}).status_code
                for n in range(PER_MINUTE)]
    assert statuses[-1] == 429  # teach's calls above count too: with a bucket per named user, all would be 404


@pytest.mark.slow
def test_feedback_after_the_log_was_deleted_is_stored_where_it_can_be_read(keyed, serving_dir):
    """A feedback.db deleted under the running service took every later answer and rating into
    the deleted file, each answered `"stored": true`, and none reached a run."""
    from tasks.feedback import FeedbackReader

    url, _ = keyed
    db = serving_dir / "keys-feedback.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    answer = call(url, "POST", "/v1/chat/completions", KEYS["front"], json={"messages": MESSAGES, "max_tokens": 4}).json()
    stored = call(url, "POST", "/feedback", KEYS["front"], json={"id": answer["id"], "rating": 4, "user": "u-del"})
    assert stored.status_code == 200 and stored.json()["stored"] is True, stored.text
    with FeedbackReader(db) as reader:
        assert [(r.completion_id, r.rating) for r in reader.feedback_since(0)] == [(answer["id"], 4)]
