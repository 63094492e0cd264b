"""What every request passes before a route runs, and what every error answer passes after.

`GuardMiddleware` is the chat service's ASGI middleware: it identifies the caller by its API
key and checks that the key has the route's role (`serving.keys`: the keys are read per
request, so a rotated key needs no restart; 401 for a missing or unknown key, 403 for a
known key without the role), hands the caller to the routes in the ASGI scope
(`scope["ftllm.caller"]`, a `serving.keys.Caller`), caps request bodies at `serving.max_request_bytes` and requests in
flight at `serving.max_concurrency`, rewrites the error bodies that BentoML and Starlette
write themselves into OpenAI's shape, and patches BentoML's `/docs.json` to say so. Health
probes (`/livez`, `/readyz`) pass untouched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from serving.errors import error_body, openai_error_from
from serving.keys import ANONYMOUS, Caller, Role, load_keyring
from tasks.config import ServingParams
from tasks.errors import ConfigError

HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
CALLER_SCOPE_KEY = "ftllm.caller"
log = logging.getLogger("ftllm.serving")


def route_role(path: str) -> Role:
    """The role a route needs: `feedback` for /feedback, `admin` for /admin/..., else `infer`."""
    if path == "/feedback":
        return Role.FEEDBACK
    if path == "/admin" or path.startswith("/admin/"):
        return Role.ADMIN
    return Role.INFER


def request_caller(scope: dict) -> Caller:
    """The caller `GuardMiddleware` identified (anonymous where no key is configured)."""
    return scope.get(CALLER_SCOPE_KEY, ANONYMOUS)

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Answer with `body` as JSON, from ASGI middleware (before or instead of the app)."""
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class _RewritingSend:
    """An ASGI `send` that holds an answer whose status `wanted` picks until its body is
    complete, then sends `rewrite(status, body)` as JSON instead (or the answer as it was,
    when that is None)."""

    def __init__(self, send: Send, wanted: Callable[[int], bool],
                 rewrite: Callable[[int, bytes], dict | None]) -> None:
        self.send, self.wanted, self.rewrite, self.start, self.chunks = send, wanted, rewrite, None, []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.wanted(message["status"]):
            self.start = message
            return None
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return None
        status, body = self.start["status"], b"".join(self.chunks)
        rewritten = self.rewrite(status, body)
        if rewritten is None:
            await self.send(self.start)
            return await self.send({"type": "http.response.body", "body": body})
        kept = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        return await send_json(self.send, status, rewritten, kept)


BENTOML_ERRORS = {"#/components/schemas/InvalidArgument", "#/components/schemas/NotFound",
                  "#/components/schemas/InternalServerError"}


def patch_openapi(document: dict) -> dict:
    """BentoML's /docs.json, saying what the service really answers with.

    Every route but the health probes answers errors in the OpenAI shape (`GuardMiddleware`
    rewrites BentoML's), may answer 401, 403 and 429 (`GuardMiddleware`), and 413 and 415 for a POST.
    """
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in document.get("paths", {}).items():
        if path in HEALTH_PATHS:
            continue
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for answer in responses.values():
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") in BENTOML_ERRORS:
                    answer["content"] = error
            for status in (401, 403, 429, 413, 415) if method == "post" else (401, 403, 429):
                responses.setdefault(str(status), {"description": HTTPStatus(status).phrase, "content": error})
    return document


class GuardMiddleware:
    """Authentication, body size and concurrency caps, before any route runs; OpenAI-style
    errors after it.

    Health probes pass untouched. Bodies are read here (they are small: at most
    `serving.max_request_bytes`) so that an oversized one gets a 413 even when it comes
    without a Content-Length. Error answers written by BentoML (`/generate`'s validation)
    or Starlette (unknown paths) are rewritten into the OpenAI shape, and /docs.json says so.

    Args:
        app: The ASGI app it guards.
        load_limits: Returns the `serving:` settings; called once, when BentoML builds the
            ASGI app (not when the service module is imported).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], load_limits: Callable[[], ServingParams]) -> None:
        limits = load_limits()
        self.keys = load_keyring()  # a bad key setting stops the start-up, with the variable named
        self.app = app
        self.max_bytes = limits.max_request_bytes
        self.max_concurrency = limits.max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        caller = self._caller(headers)
        if caller is None:
            return await send_json(send, 401, error_body(
                "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                "authentication_error", None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])
        role = route_role(scope["path"])
        if not caller.may(role):
            return await send_json(send, 403, error_body(
                f"The key {caller.name!r} lacks the {role.value!r} role that {scope['path']} needs.",
                "permission_error", None, "insufficient_role"))
        scope[CALLER_SCOPE_KEY] = caller
        if self.in_flight >= self.max_concurrency:
            return await send_json(send, 429, error_body(
                f"Too many requests at once (serving.max_concurrency={self.max_concurrency}); retry shortly.",
                "rate_limit_error", None, "rate_limit_exceeded"), [(b"retry-after", b"1")])
        if scope["path"] == "/docs.json":
            send = _RewritingSend(send, lambda status: status == 200, lambda _, body: patch_openapi(json.loads(body)))
        elif scope["method"] != "HEAD":
            route = f"{scope['method']} {scope['path']}"
            send = _RewritingSend(send, lambda status: status >= 400,
                                  lambda status, body: openai_error_from(status, body, route))
        self.in_flight += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffered(headers, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _caller(self, headers: dict[bytes, bytes]) -> Caller | None:
        """The caller the request's bearer key names (ANONYMOUS when no key is configured);
        None for a missing or unknown key."""
        try:
            self.keys = load_keyring(gone=log.error)  # per request, so a rotated key needs no restart
        except ConfigError as err:
            # A mistyped rotation: the keys that worked still answer, but none is trusted until
            # the setting reads again; it may have been written to take a key's trust away.
            if self.keys is not None and any(caller.trusted for _, caller in self.keys.keys):
                self.keys = self.keys.untrusted()
            log.error("%s Still using the keys read before, none of them trusted until it is fixed.", err)
        if self.keys is None:
            return ANONYMOUS
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return self.keys.identify(token.strip()) if scheme.lower() == "bearer" and token.strip() else None

    async def _buffered(self, headers: dict[bytes, bytes], receive: Receive, send: Send) -> Receive | None:
        """A `receive` that replays the whole body, read here; None when it was refused (413, or
        415 for a body that is not declared JSON) or the client left."""
        too_big = error_body(f"Request body over serving.max_request_bytes ({self.max_bytes} bytes).",
                             "invalid_request_error", None, "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_json(send, 413, too_big)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await send_json(send, 413, too_big)
                return None
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if body and media != b"application/json":
            # A web page may post text/plain or a form to 127.0.0.1 with no preflight; JSON it cannot.
            await send_json(send, 415, error_body(
                f"Content-Type {media.decode('latin-1') or 'missing'}: the body must be sent as application/json.",
                "invalid_request_error", None, "unsupported_media_type"))
            return None

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect

        return replay
