"""Validators of tool `parameters` schemas, which come from data files and from requests.

One function builds them for every place that checks calls: validation of a data set
(`tasks.data.checks`), the service's request schema (`serving.schemas`), and the reading of
a generated call (`tasks.model.responses.check_calls`).

A schema is untrusted input, so its `$ref`s are resolved inside it only: jsonschema would
fetch a URL a `$ref` names, which would let any client make the service open an address of
its choosing. The validators' registry fetches nothing (a `$ref` to a URL fails as
unresolvable), and a schema whose `$ref` does not resolve inside it is refused when it is
checked, with the reference named, rather than at the first call that reaches it.
"""

from __future__ import annotations

import functools
import json
from typing import Any
from urllib.parse import urldefrag


def schema_validator(parameters: dict) -> tuple[Any, str | None]:
    """(validator, None) for a tool's `parameters` schema, or (None, why it is refused).

    Built once per distinct schema: data sets repeat the same few tools on every line,
    evaluation and serving on every call, and checking a schema against its metaschema
    costs milliseconds each time.
    """
    return _schema_validator(json.dumps(parameters, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _schema_validator(schema_json: str) -> tuple[Any, str | None]:
    from jsonschema import SchemaError, validators

    schema = json.loads(schema_json)
    if not isinstance(schema, dict):
        return None, "a schema is a JSON object"
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        return None, f"$schema must be the URI of a JSON-schema dialect, not {json.dumps(schema['$schema'])[:40]}"
    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        return None, exc.message
    registry = _registry()
    unresolved = _unresolved_reference(schema, cls, registry)
    if unresolved is not None:
        return None, (f"the $ref {unresolved!r} does not resolve inside the schema (point it at a definition "
                      "of the schema, e.g. #/$defs/NAME; nothing is fetched)")
    return cls(schema, registry=registry), None


@functools.cache
def _registry() -> Any:
    """The standard metaschemas (a `$ref` may name one, as jsonschema allows), and nothing fetched."""
    from jsonschema_specifications import REGISTRY as SPECIFICATIONS
    from referencing import Registry

    return Registry(retrieve=_refuse_retrieval).combine(SPECIFICATIONS)


def _refuse_retrieval(uri: str):
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


# The keywords whose values are schemas (drafts 4 to 2020-12): maps of them, lists of them, one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_KEYWORDS = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
                    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")


def _unresolved_reference(schema: dict, cls: Any, registry: Any) -> str | None:
    """The first `$ref` of `schema` that does not resolve inside it, or None (also where a nested
    `$id`, or a draft-04 `id`, changes the base of its references: those are left to validation,
    which fetches nothing)."""
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    refs, rebased = [], False

    def walk(node: Any) -> None:
        """Every subschema, by the keywords that hold schemas: a property named `x-api` or
        `example` is a schema like any other, and an `example` keyword's value is none."""
        nonlocal rebased
        if not isinstance(node, dict):
            return
        if isinstance(node.get("$ref"), str):
            refs.append(node["$ref"])
        rebased = rebased or (node is not schema and any(isinstance(node.get(k), str) for k in ("$id", "id")))
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    walk(sub)
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                for sub in value:
                    walk(sub)
            elif key in _SCHEMA_KEYWORDS:
                walk(value)

    walk(schema)
    if not refs or rebased:
        return None
    specification = specification_with(cls.META_SCHEMA.get("$schema", ""), default=DRAFT202012)
    root_id = schema.get("$id", schema.get("id"))
    base = urldefrag(root_id)[0] if isinstance(root_id, str) else ""  # draft 7 allows `https://x/t.json#`
    resolver = registry.with_resource(base, specification.create_resource(schema)).resolver(base_uri=base)
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            return ref
    return None
