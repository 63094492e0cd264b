"""Validators of tool `parameters` schemas, which come from data files and from requests.

One function builds them for every place that checks calls: validation of a data set
(`tasks.data.checks`), the service's request schema (`serving.schemas`), and the reading of
a generated call (`tasks.model.responses.check_calls`).

A schema is untrusted input, so its `$ref`s are resolved inside it only: jsonschema would
fetch a URL a `$ref` names, which would let any client make the service open an address of
its choosing. The validators' registry fetches nothing (a `$ref` to a URL fails as
unresolvable), and a schema whose `$ref` does not resolve inside it is refused when it is
checked, with the reference named, rather than at the first call that reaches it. So is a
schema whose `$ref`s (or `allOf`, `anyOf`, ...) lead back to themselves without reading into
the value, which no value can be checked against, and one nested past what the checker
recurses through (`SCHEMA_TOO_DEEP`).

Arguments are JSON as RFC 8259 defines it (`strict_json`): Python's parser also reads `NaN`,
`Infinity` and `1e999` (as floats), which JavaScript's `JSON.parse` and most clients refuse.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any
from urllib.parse import urldefrag

SCHEMA_TOO_DEEP = "the schema is nested too deeply to check (or refers to itself in a loop)"


def strict_json(text: str) -> Any:
    """`json.loads`, refusing what JSON does not define: `NaN`, `Infinity`, `-Infinity` and numbers
    past a double's range (`1e999`, which Python reads as infinity).

    Raises:
        ValueError: the text is not JSON (json.JSONDecodeError, or one of the above named), or
            nests deeper than the parser recurses.
    """
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("the value nests too deeply to read") from None


def finite(value: Any) -> bool:
    """Whether every number in a decoded JSON value is finite (a value read by another parser may hold NaN).
    Walked without recursion: a value may nest as deep as its parser allowed."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return True


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of a JSON number's range")
    return number


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
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        return None, (f"parameters describe the arguments, a JSON object: their type is \"object\", "
                      f"not {json.dumps(kind)[:40]}")
    if "$schema" in schema and not isinstance(schema["$schema"], str):
        return None, f"$schema must be the URI of a JSON-schema dialect, not {json.dumps(schema['$schema'])[:40]}"
    cls = validators.validator_for(schema)
    registry = _registry()
    try:
        cls.check_schema(schema)
        problem = _reference_problem(schema, cls, registry)
    except SchemaError as exc:
        return None, exc.message
    except RecursionError:
        return None, SCHEMA_TOO_DEEP
    return (None, problem) if problem is not None else (cls(schema, registry=registry), None)


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


def _reference_problem(schema: dict, cls: Any, registry: Any) -> str | None:
    """Why `schema`'s `$ref`s are refused, or None: the first that does not resolve inside it, or
    one that leads back to itself without reading into the value (a loop no check ends). None
    also where a nested `$id`, or a draft-04 `id`, changes the base of its references: those are
    left to validation, which fetches nothing (and whose recursion is caught where it runs)."""
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012, specification_with

    refs, rebased, nodes = [], False, []

    def walk(node: Any) -> None:
        """Every subschema, by the keywords that hold schemas: a property named `x-api` or
        `example` is a schema like any other, and an `example` keyword's value is none."""
        nonlocal rebased
        if not isinstance(node, dict):
            return
        nodes.append(node)
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
            return (f"the $ref {ref!r} does not resolve inside the schema (point it at a definition "
                    "of the schema, e.g. #/$defs/NAME; nothing is fetched)")
    loop = _in_place_loop(nodes, resolver)
    return None if loop is None else (f"the $ref {loop!r} leads back to itself without reading into the value "
                                      "(a loop no value can be checked against)")


# Keywords that apply their schemas to the value itself, not to a part of it: a cycle
# through them (and `$ref`) never ends.
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE = ("not", "if", "then", "else")


def _in_place_loop(nodes: list[dict], resolver: Any) -> str | None:
    """A `$ref` on a cycle of subschemas that apply to the same value (`$ref`, `allOf`, `not`, ...), or None."""
    from referencing.exceptions import Unresolvable

    def edges(node: Any) -> list[tuple[Any, str | None]]:
        if not isinstance(node, dict):
            return []
        out = [(sub, None) for k in _IN_PLACE_LISTS if isinstance(node.get(k), list) for sub in node[k]]
        out += [(node[k], None) for k in _IN_PLACE if k in node]
        if isinstance(node.get("$ref"), str):
            try:
                out.append((resolver.lookup(node["$ref"]).contents, node["$ref"]))
            except Unresolvable:  # a reference inside a metaschema a $ref named: not the schema's own
                pass
        return out

    done: set[int] = set()
    for start in nodes:
        if id(start) in done:
            continue
        stack: list[tuple[Any, list, str | None]] = [(start, edges(start), None)]
        on_path = {id(start)}
        while stack:
            node, todo, _ = stack[-1]
            if not todo:
                stack.pop()
                on_path.discard(id(node))
                done.add(id(node))
                continue
            child, ref = todo.pop()
            if id(child) in on_path:
                return ref or next((r for _, _, r in reversed(stack) if r), "$ref")
            if id(child) not in done and isinstance(child, dict):
                on_path.add(id(child))
                stack.append((child, edges(child), ref))
    return None
