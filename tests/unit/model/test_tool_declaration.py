"""The tiny model's tool declaration: compact, and complete.

The ChatML template of `tasks.model.tiny` declares tools as a TypeScript namespace (the
form of OpenAI's harmony format): a comment with the description, then the function's
argument object, one property a line, `?` on the optional ones, enums as unions of
literals, property descriptions as comments. Read back, the declaration must give the
very schema the user wrote; a tool it cannot express (nested objects, arrays, anyOf,
keywords such as `default` or `minimum`, ...) is declared as its JSON instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.config import ModelParams
from tasks.model.chat import render_prompt
from tasks.model.loading import load_base_tokenizer, resolve_base


@pytest.fixture(scope="module")
def tiny():
    model = ModelParams()
    return load_base_tokenizer(model, resolve_base(model))


def _tool(name, parameters=None, description=None) -> dict:
    function = {"name": name}
    if description is not None:
        function["description"] = description
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def declared(tiny, tools) -> list[str]:
    """The declaration lines of `tools` in the rendered prompt, between the namespace's braces."""
    prompt = render_prompt(tiny, [{"role": "user", "content": "Hi."}], tools=tools)
    head, body = prompt.split("namespace functions {\n", 1)
    assert head == "<|im_start|>system\n# Tools\n"
    return body.split("\n}\n", 1)[0].split("\n")


def read_back(lines: list[str]) -> list[dict]:
    """Parse a namespace declaration back into OpenAI tools (a JSON line is read as JSON)."""
    tools, comment, function, props = [], [], None, None
    for line in lines:
        if line.startswith("// "):
            comment.append(line[3:])
        elif line.startswith("{"):
            tools.append(json.loads(line))
        elif line.startswith("type "):
            name, rest = line[5:].split(" = (", 1)
            function = {"name": name, **({"description": "\n".join(comment)} if comment else {})}
            comment = []
            tools.append({"type": "function", "function": function})
            if rest == ") => any;":
                continue
            assert rest == "_: {"
            props, required = {}, []
            function["parameters"] = {"type": "object", "properties": props, "required": required}
        elif line == "}) => any;":
            function = props = None
        else:
            key, kind = line.rstrip(",").split(": ", 1)
            name = key.rstrip("?")
            if name == key:
                function["parameters"]["required"].append(name)
            prop = {"type": kind} if not kind.startswith(('"', "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "-")) else {}
            if not prop:
                values = [json.loads(v) for v in kind.split(" | ")]
                prop = {"type": "string", "enum": values} if all(isinstance(v, str) for v in values) else {"enum": values}
            if comment:
                prop["description"] = "\n".join(comment)
                comment = []
            props[name] = prop
    return tools


STRING_ENUM = {"type": "string", "enum": ["celsius", "fahrenheit"]}
COMPACT = [
    _tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}, "unit": STRING_ENUM},
                          "required": ["city", "unit"]}, "Current weather in a city."),
    _tool("search_flights", {"type": "object", "properties": {
        "origin": {"type": "string", "description": "IATA code of the departure airport."},
        "passengers": {"type": "integer", "description": "Travellers,\nchildren included."},
        "max_price": {"type": "number"},
        "direct": {"type": "boolean"},
        "note": {"type": "null"},
        "cabin": {"type": "string", "enum": ["economy", "business"], "description": "Class."},
        "stops": {"enum": [0, 1, "any"]},
    }, "required": ["origin", "passengers"]}, "Find flights.\nCheapest first."),
    _tool("get_time", {"type": "object", "properties": {}, "required": []}, "Local time."),
    _tool("ping"),
]


def test_the_compact_declaration_reads_back_to_every_field_of_each_schema(tiny) -> None:
    assert read_back(declared(tiny, COMPACT)) == [
        COMPACT[0], COMPACT[1],
        _tool("get_time", description="Local time."),  # no properties: `() => any`, as harmony writes it
        COMPACT[3],
    ]
    lines = declared(tiny, COMPACT[:1])
    assert lines == ["// Current weather in a city.", "type get_weather = (_: {", "city: string,",
                     'unit: "celsius" | "fahrenheit",', "}) => any;"]


# Tools the compact form cannot hold whole: each is declared as its JSON, beside compact ones.
UNEXPRESSED = [
    _tool("nested", {"type": "object", "properties": {"where": {"type": "object", "properties": {"x": {"type": "number"}}}}}),
    _tool("listed", {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}),
    _tool("either", {"type": "object", "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}}),
    _tool("bounded", {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "default": 3}}}),
    _tool("closed", {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}),
    _tool("nullable", {"type": "object", "properties": {"a": {"type": ["string", "null"]}}}),
    _tool("odd_name", {"type": "object", "properties": {"two words": {"type": "string"}, "a:b": {"type": "string"}}}),
    # Names that are no identifiers would break the declaration: `my-key?: string`, or code in a name.
    _tool("dashed", {"type": "object", "properties": {"my-key": {"type": "string"}}}),
    _tool("injected", {"type": "object", "properties": {"x})=>any;type_y=(_:{z": {"type": "string"}}}),
    _tool("digit_first", {"type": "object", "properties": {"1st": {"type": "string"}}}),
    _tool("get-time", {"type": "object", "properties": {"city": {"type": "string"}}}),
    _tool("typed_enum", {"type": "object", "properties": {"n": {"type": "integer", "enum": [1, 2]}}}),
    _tool("ghost", {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}),
    _tool("untyped", {"type": "object", "properties": {"a": {"description": "anything"}}}),
    {"type": "function", "function": {**_tool("strict")["function"], "strict": True}},
    {"name": "bare", "parameters": {"type": "object", "properties": {}}},
]


@pytest.mark.parametrize("tool", UNEXPRESSED, ids=lambda t: t.get("function", t)["name"])
def test_a_schema_the_compact_form_cannot_hold_is_declared_as_its_json(tiny, tool) -> None:
    lines = declared(tiny, [COMPACT[0], tool])
    assert lines[-1] == json.dumps(tool, ensure_ascii=False)
    assert read_back(lines) == [COMPACT[0], tool]


def test_the_declaration_is_shorter_than_the_tools_json(tiny) -> None:
    data = [json.loads(line) for line in open(Path(__file__).parents[3] / "data" / "tools.jsonl", encoding="utf-8")][:1]
    tools = data[0]["tools"]
    question = data[0]["messages"][:1]
    compact = len(tiny(render_prompt(tiny, question, tools=tools), add_special_tokens=False).input_ids)
    as_json = len(tiny(json.dumps(tools), add_special_tokens=False).input_ids)
    assert compact < as_json * 0.75
