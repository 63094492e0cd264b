"""Refusals in OpenAI's shape: `{"error": {message, type, param, code}}`.

The routes raise `APIError`; `validation_error` turns a pydantic error into one whose `param`
is the field's path in the request, as OpenAI names it (not the union member pydantic tried);
`openai_error_from` rewrites the error bodies that BentoML and Starlette write themselves
(`serving.guards` applies it to every answer).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


class APIError(Exception):
    """A request the service refuses, rendered as `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The error as a JSON response (with `WWW-Authenticate` on a 401)."""
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers={**self.headers, **({"WWW-Authenticate": "Bearer"} if self.status == 401 else {})})


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_from(status: int, body: bytes, route: str = "") -> dict | None:
    """`body` of an error response in the OpenAI shape; None when it already is in it.

    For the answers the service's own routes do not write: BentoML's for `/generate`
    (`{"error": "1 validation error for Input", "detail": [pydantic errors]}`, or
    `[{"error": ...}]` for an exception it maps to a 4xx), and Starlette's plain-text 404
    and 405 for unknown paths and methods, which name `route` (the request's method and
    path) and the chat routes: a client pointed at another OpenAI API (`/v1/responses`,
    `/v1/completions`) learns which one to use.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = body.decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    param, code = None, {404: "not_found", 405: "method_not_allowed"}.get(status)
    if isinstance(data, dict):
        details = data.get("detail")
        message = str(data.get("error") or details or HTTPStatus(status).phrase)
        if isinstance(details, list) and details and isinstance(details[0], dict):
            first = details[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_value"
            message = f"Invalid value for '{param}': {first.get('msg')}." if param else f"{first.get('msg')}."
    else:
        message = str(data) or HTTPStatus(status).phrase
    if status in (404, 405) and route and message == HTTPStatus(status).phrase:
        message = (f"{message}: {route}. This service answers OpenAI's chat API: POST /v1/chat/completions "
                   "and GET /v1/models (docs/guides/serving.md).")
    return error_body(message, error_type(status), param, code)


# Errors that say only that the input is not of a union member's type: beside an error from
# inside another member, they are not what the client got wrong.
_TYPE_MISMATCHES = frozenset({"string_type", "list_type", "dict_type", "model_type", "model_attributes_type",
                              "int_type", "float_type", "bool_type", "is_instance_of"})


def validation_error(err: ValidationError, model: type[BaseModel]) -> APIError:
    """A 400 that names the first invalid field of a `model` body by its path in the request.

    Pydantic reports an error in a union field once per member and names the member in the
    error's location as if it were a field (`stop.str`, `tool_choice.NamedToolChoice.function`).
    OpenAI's `param` is the field's path in the request, so the member names are dropped, and
    of the members' errors the one from deepest inside the input is reported: for an object
    sent to `tool_choice`, what is wrong in the object rather than "should be 'auto', ...".
    Where every member only refuses the input's type (`stop: 5`), all of them are said.
    """
    errors = err.errors()
    first = errors[0]
    _, union_at = _field_path(model, first["loc"])
    chosen = [first]
    if union_at is not None:
        rivals = [e for e in errors if len(e["loc"]) > union_at and e["loc"][:union_at] == first["loc"][:union_at]]
        deepest = max(len(e["loc"]) for e in rivals)
        rivals = [e for e in rivals if len(e["loc"]) == deepest]
        chosen = [e for e in rivals if e["type"] not in _TYPE_MISMATCHES][:1] or rivals
    path, _ = _field_path(model, chosen[0]["loc"])
    param = ".".join(str(p) for p in path) or None
    if chosen[0]["type"] == "extra_forbidden":  # a field inside a message, a tool, ... that the API has not
        return APIError(400, f"'{param}' is not a field of this API; leave it out (see docs/guides/serving-tools.md "
                             "for the fields the service honours).", param=param, code="invalid_value")
    said = [chosen[0]["msg"], *(e["msg"].removeprefix("Input should be ") for e in chosen[1:])]
    return APIError(400, f"Invalid value for '{param}': {' or '.join(dict.fromkeys(said))}.", param=param,
                    code="invalid_value")


def _field_path(model: type[BaseModel], loc: tuple) -> tuple[list[str | int], int | None]:
    """`loc` without the union members pydantic names in it, and the index in `loc` of the first such name."""
    path: list[str | int] = []
    union_at = None
    annotation: Any = model
    for i, part in enumerate(loc):
        members = _members(annotation)
        if len(members) > 1:  # `part` names the member of a union, not a field
            union_at = i if union_at is None else union_at
            annotation = next((m for m in members if _is_member_named(m, part)), None)
            continue
        path.append(part)
        annotation, origin = members[0], get_origin(members[0])
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
        elif origin in (list, tuple, dict):
            annotation = get_args(annotation)[-1] if get_args(annotation) else None
        else:
            annotation = None
    return path, union_at


def _members(annotation: Any) -> list:
    """The types a value of `annotation` may have, null left out (one for a type that is not a union)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        return [m for m in get_args(annotation) if m is not type(None)]
    return [annotation]


def _is_member_named(member: Any, name: Any) -> bool:
    """Whether `name` is how pydantic names `member` of a union in an error's location."""
    if isinstance(member, type) and issubclass(member, BaseModel):
        return name == member.__name__
    origin = get_origin(member)
    return origin is not None and isinstance(name, str) and name.startswith(f"{origin.__name__}[")
