"""Named keys with roles against the real service over HTTP: a key without a route's role gets
403, an unknown key 401, and a rewritten key file takes effect without a restart."""

from __future__ import annotations

import httpx
import pytest

KEYS = {"web": "web-infer-secret", "teach": "teach-feedback-secret", "ops": "ops-admin-secret"}
MESSAGES = [{"role": "system", "content": "Rewrite the ISO date in words."}, {"role": "user", "content": "2001-02-03"}]


def write_keys(path, rotated: str | None = None) -> None:
    path.write_text(f"# test keys\nweb:infer={rotated or KEYS['web']}\nteach:infer+feedback={KEYS['teach']}\n"
                    f"ops:infer+feedback+admin+trusted={KEYS['ops']}\n")


@pytest.fixture(scope="module")
def keyed(http_server, serving_dir):
    keys = serving_dir / "keys.txt"
    write_keys(keys)
    env = {"FTLLM_API_KEYS_FILE": str(keys), "FTLLM_FEEDBACK_DB": str(serving_dir / "keys-feedback.db")}
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
    write_keys(keys)
