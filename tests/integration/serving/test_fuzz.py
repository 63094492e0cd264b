"""Schema fuzzing of the service over real HTTP, from the OpenAPI description it serves.

Schemathesis reads `/docs.json` from `bentoml serve` and, for every operation, sends
Hypothesis-generated requests that follow the schema (positive) and requests that break it
(negative). Each answer must be: no 5xx, a documented status code and content type, a body
that matches the documented schema, and a 4xx for every request the schema forbids. The
hand-written cases at the end cover what a generator working from the schema does not send.

Bounded: a derandomized Hypothesis run of `EXAMPLES` requests per operation and mode, no
shrinking, and a server whose serving.max_tokens is 4, so every completion is short. Alone:

    .venv/bin/python -m pytest tests/integration/serving/test_fuzz.py -q

Not `@schema.parametrize()`: it needs the schema when pytest collects, before the server
runs, and its lazy form (`schemathesis.pytest.from_fixture`) fails on pytest 9.2, whose
nodes no longer have `_nodeid`. So the schema comes from a fixture, and each operation's
cases from `APIOperation.as_strategy`.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode, checks, openapi

KEY = "fuzz-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25
OPERATIONS = [
    "GET /healthz", "GET /livez", "GET /readyz", "GET /metrics", "GET /v1/models", "GET /v1/models/{model}",
    "POST /v1/chat/completions",
    "POST /generate", "POST /feedback", "POST /admin/reload",
]
# The operations with a body or parameters: only those have anything to make invalid
# (test_every_served_operation_is_fuzzed checks this list against the description).
WITH_INPUT = ["GET /v1/models/{model}", "POST /v1/chat/completions", "POST /generate", "POST /feedback"]
# Any string names a model (the served one or a 404), so /v1/models/{model} has no invalid input to make.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE) for label in WITH_INPUT if label != "GET /v1/models/{model}"]
MESSAGES = [{"role": "user", "content": "2001-02-03"}]


# Not `positive_data_acceptance`: a request valid by the schema may still be over a limit
# that lives in params.yaml (max_tokens, messages, the model's context) or name a completion
# that was never logged; those are documented 400s and 404s, not schema violations.
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.negative_data_rejection, checks.response_schema_conformance]


@pytest.fixture(scope="module")
def server(http_server, serving_dir):
    """The service with an API key and serving.max_tokens=4, on loopback."""
    import yaml

    from tasks.config import load_params

    params = load_params(Path(os.environ["FTLLM_PARAMS"]), {"serving.max_tokens": 4})
    params_path = serving_dir / "fuzz-params.yaml"
    params_path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    with http_server(serving_dir / "fuzz-serve.log", {"FTLLM_API_KEY": KEY, "FTLLM_PARAMS": str(params_path)}) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(server):
    """The OpenAPI description the server serves, read as OpenAPI 3.1.

    BentoML labels /docs.json 3.0.2, but the routes' schemas in it come from FastAPI and
    pydantic, which write OpenAPI 3.1's JSON Schema (`const`, `type: null`), which 3.0 does
    not have.
    """
    document = httpx.get(f"{server}/docs.json", headers=AUTH).raise_for_status().json()
    assert document["openapi"] == "3.0.2", "BentoML changed the version it writes: drop the relabelling"
    schema = openapi.from_dict({**document, "openapi": "3.1.0"})
    schema.config.update(base_url=server)
    # An invalid body over serving.max_request_bytes is refused with the documented 413
    # before it is read: a rejection, which schemathesis's default list leaves out.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def test_every_served_operation_is_fuzzed(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert sorted(op.label for op in operations) == sorted(OPERATIONS)
    with_input = [op.label for op in operations if op.body or any(op.iter_parameters())]
    assert sorted(with_input) == sorted(WITH_INPUT)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode}" for label, mode in CASES])
def test_fuzzed_requests_get_documented_answers(api_schema, label, mode):
    operation = api_schema.find_operation_by_label(label)

    # derandomize: the same requests on every run; no shrinking: a failure is reported as
    # found (with its curl command) instead of being replayed against the server many times.
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        case.call_and_validate(session=session, headers=AUTH, checks=CHECKS, timeout=30)

    with requests.Session() as session:
        fuzz()


# Hand-written cases. Already covered elsewhere, so not repeated here: a truncated JSON body,
# bodies over serving.max_request_bytes with and without Content-Length, max_tokens=10**9
# and a missing or wrong key (test_service.py, in-process); a wrong key over HTTP (test_http.py).


def assert_openai_error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


@pytest.mark.parametrize(("body", "name"), [
    (b"[" * 5000, "nested deeper than the JSON parser recurses"),
    (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "an integer of over 4,300 digits"),
    (b'{"messages": "\xff"}', "not UTF-8"),
    # JSON reads the escape as a lone surrogate, which is no character (a 500 before)
    (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "a lone surrogate in a string"),
    (b'{"k\\udfff": 1, "messages": []}', "a lone surrogate in a key the error would name"),
    (b'{"id": "chatcmpl-x", "rating": 1, "correction": "fix \\ud83d"}', "a pair's first half alone"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/feedback"])
def test_bodies_json_cannot_read_are_invalid_json(server, path, body, name):
    resp = httpx.post(f"{server}{path}", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(resp, 400, "invalid_json")


def test_an_escaped_surrogate_pair_is_one_character_and_is_accepted(server):
    body = b'{"messages": [{"role": "user", "content": "Oslo \\ud83d\\ude00"}], "max_tokens": 2}'
    resp = httpx.post(f"{server}/v1/chat/completions", content=body,
                      headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("max_tokens", [-1, 0, "abc", 2.5, None])
def test_absurd_max_tokens_are_refused(server, max_tokens):
    body = {"messages": MESSAGES, "max_tokens": max_tokens} if max_tokens is not None else {
        "messages": MESSAGES, "max_completion_tokens": 10**30}
    resp = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH)
    assert assert_openai_error(resp, 400, "invalid_value")["param"] in ("max_tokens", "max_completion_tokens")


@pytest.mark.parametrize("temperature", [5e-324, 1e-308, 1e-30])
def test_tiny_temperatures_decode_greedily(server, temperature):
    # Sampling at 1e-308 divided the logits into inf: the generation failed (a 503).
    body = {"messages": MESSAGES, "max_tokens": 4}
    resp = httpx.post(f"{server}/v1/chat/completions", json={**body, "temperature": temperature}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    greedy = httpx.post(f"{server}/v1/chat/completions", json={**body, "temperature": 0}, headers=AUTH).json()
    assert resp.json()["choices"][0]["message"] == greedy["choices"][0]["message"]


@pytest.mark.parametrize("correction", [" ", "\n\t", "\x1c"])  # \x1c: whitespace to str.strip, not to regexes
def test_blank_corrections_are_refused(server, correction):
    # The feedback store refuses them with a ValueError, which used to be a 500.
    resp = httpx.post(f"{server}/feedback", json={"id": "chatcmpl-x", "rating": 2, "correction": correction},
                      headers=AUTH)
    assert assert_openai_error(resp, 400, "invalid_value")["param"] == "correction"
