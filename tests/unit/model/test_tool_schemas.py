"""Tool `parameters` schemas: every valid one accepted, a `$ref` resolved inside the schema only, nothing fetched."""

from __future__ import annotations

import pytest

from tasks.model.tool_schemas import SCHEMA_TOO_DEEP, finite, schema_validator, strict_json

DRAFT7 = "http://json-schema.org/draft-07/schema#"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    import socket
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("a $ref was fetched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(("schema", "good", "bad"), [
    ({"type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "$defs": {"City": {"type": "string"}}},
     {"city": "Oslo"}, {"city": 7}),
    ({"$schema": DRAFT7, "properties": {"city": {"$ref": "#/definitions/City"}}, "definitions": {"City": {"type": "string"}}},
     {"city": "Oslo"}, {"city": 7}),
    # draft 7 allows an empty fragment on the root's $id
    ({"$schema": DRAFT7, "$id": "https://example.com/t.json#", "definitions": {"a": {"type": "string"}},
      "properties": {"x": {"$ref": "#/definitions/a"}}}, {"x": "y"}, {"x": 1}),
    ({"type": "object", "properties": {"child": {"$ref": "#"}}, "required": []}, {"child": {"child": {}}}, {"child": 3}),
    ({"type": "object", "properties": {"x": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}},
      "$defs": {"n": {"type": "integer"}}}, {"x": None}, {"x": "1"}),
    # a standard metaschema, which jsonschema knows without fetching it
    ({"type": "object", "properties": {"schema": {"$ref": "https://json-schema.org/draft/2020-12/schema"}}},
     {"schema": {"type": "string"}}, {"schema": {"type": 5}}),
])
def test_valid_schemas_with_references_are_accepted_and_check_arguments(schema, good, bad):
    validator, complaint = schema_validator(schema)
    assert complaint is None
    assert not list(validator.iter_errors(good)) and list(validator.iter_errors(bad))


@pytest.mark.parametrize(("ref", "said"), [("#/$defs/missing", "#/$defs/missing"),
                                           ("http://127.0.0.1:9/city.json", "nothing is fetched"),
                                           ("city.json", "city.json")])
def test_a_reference_that_leads_outside_the_schema_is_refused_by_name(ref, said):
    validator, complaint = schema_validator({"type": "object", "properties": {"id": {"type": "string"},
                                                                              "city": {"$ref": ref}}})
    assert validator is None and said in complaint


def test_under_a_nested_id_references_are_left_to_validation_which_fetches_nothing():
    """A nested `$id` (or draft 4's `id`) changes the base of the references under it: they are
    not checked up front, and one that leads out of the schema fails when a call reaches it."""
    from referencing.exceptions import Unresolvable

    nested = {"type": "object", "properties": {"x": {"$id": "https://example.com/x.json", "$ref": "other.json"}}}
    validator, complaint = schema_validator(nested)
    assert complaint is None
    with pytest.raises(Unresolvable):
        list(validator.iter_errors({"x": 1}))


@pytest.mark.parametrize("dialect", [5, [], {}, None])
def test_a_schema_whose_dialect_is_no_string_is_refused_not_crashed(dialect):
    validator, complaint = schema_validator({"$schema": dialect, "type": "object"})
    assert validator is None and "$schema" in complaint


def test_a_ref_inside_an_example_or_an_extension_is_a_value_not_a_reference():
    schema = {"type": "object", "properties": {"city": {"type": "string", "example": {"$ref": "#/nowhere"},
                                                        "x-source": {"$ref": "http://127.0.0.1:9/x"}}}}
    validator, complaint = schema_validator(schema)
    assert complaint is None and not list(validator.iter_errors({"city": "Oslo"}))


@pytest.mark.parametrize("name", ["x-api-version", "example", "default", "enum"])
def test_a_property_is_checked_whatever_its_name(name):
    validator, complaint = schema_validator({"type": "object", "properties": {name: {"$ref": "#/$defs/Missing"}}})
    assert validator is None and "#/$defs/Missing" in complaint


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"city": {"$ref": "#/$defs/a"}},
     "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
    {"type": "object", "properties": {"city": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}},
    {"$ref": "#"},
    {"type": "object", "not": {"anyOf": [{"$ref": "#"}]}},
])
def test_references_that_loop_without_reading_into_the_value_are_refused(schema):
    """No value can be checked against them: jsonschema recursed until Python stopped it."""
    validator, complaint = schema_validator(schema)
    assert validator is None and "leads back to itself" in complaint


def test_a_schema_nested_past_the_checkers_recursion_is_refused_not_crashed():
    deep = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"x": deep}}
    validator, complaint = schema_validator(deep)
    assert validator is None and complaint == SCHEMA_TOO_DEEP


def test_arguments_are_json_as_defined_without_nan_or_infinity():
    assert strict_json('{"value": 1.5, "n": 10000000000000000000000}') == {"value": 1.5, "n": 10**22}
    for text in ('{"value": NaN}', '{"value": Infinity}', '{"value": -Infinity}', '{"value": 1e999}'):
        with pytest.raises(ValueError, match="JSON number"):
            strict_json(text)
    assert finite({"a": [1, 2.5, {"b": "NaN"}]}) and not finite({"a": [1, {"b": float("nan")}]})


@pytest.mark.parametrize("kind", ["string", "array", ["string", "null"]])
def test_parameters_that_describe_no_object_are_refused(kind):
    """Arguments are a JSON object: a tool whose parameters are `{"type": "string"}` could never be called."""
    validator, complaint = schema_validator({"type": kind})
    assert validator is None and 'type is "object"' in complaint
    assert schema_validator({"type": ["object", "null"], "properties": {}})[1] is None
