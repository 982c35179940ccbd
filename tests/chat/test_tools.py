"""Tool declarations: the same text as the official Gemma 4 template wherever it renders a schema whole
(transformers rendering the official file is the oracle), and whole where it does not — read back
through the value notation and compared with what the schema says, written out by hand."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemma4.chat import parse_tool_value, tool_declaration

Q = '<|"|>'


def tool(parameters, name="f", description="Does f", **function):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters,
                                             **function}}


def obj(required=None, **properties):
    return {"type": "object", "properties": properties, **({"required": required} if required else {})}


STRING, INTEGER, NUMBER, BOOLEAN = ({"type": t} for t in ("string", "integer", "number", "boolean"))

# schemas the official template renders whole
WHOLE = {
    "no parameters": {"type": "function", "function": {"name": "now"}},
    "empty object": tool({"type": "object", "properties": {}}),
    "scalars": tool(obj(["city"], city={"type": "string", "description": "City name"}, days=INTEGER,
                        ratio=NUMBER, metric=BOOLEAN)),
    "string enum": tool(obj(unit={"type": "string", "enum": ["c", "f"], "description": "Unit"})),
    "keys sorted without case": tool(obj(b=STRING, A=STRING, a_=STRING, Z=STRING)),
    "nullable": tool(obj(note={"type": "string", "nullable": True})),
    "property keys the format has no place for": tool(obj(url={"type": "string", "format": "uri", "default": "x",
                                                               "minLength": 1, "title": "Url"})),
    "nested object": tool(obj(opts={"type": "object", "description": "Options", "required": ["fast"],
                                    "properties": {"fast": BOOLEAN, "level": INTEGER}})),
    "object without properties": tool(obj(meta={"type": "object"})),
    "array of strings": tool(obj(tags={"type": "array", "items": STRING, "description": "Tags"})),
    "array items keep all their keys": tool(obj(ids={"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                "title": "Id"}})),
    "array of objects": tool(obj(rows={"type": "array", "items": {
        "type": "object", "required": ["a"], "additionalProperties": False,
        "properties": {"a": STRING, "B": {"type": "number", "description": "b"}}}})),
    "nested arrays of objects": tool(obj(rows={"type": "array", "items": {"type": "object", "properties": {
        "cells": {"type": "array", "items": {"type": "object", "properties": {"v": STRING}}}}}})),
    "response": tool(obj(), response={"type": "object", "description": "The answer"}),
}


@pytest.mark.parametrize("name", WHOLE)
def test_declarations_match_the_official_template(official_template, hf_render, name):
    prompt = hf_render(official_template, [{"role": "user", "content": "x"}], tools=[WHOLE[name]])
    theirs = prompt[prompt.index("<|tool>") + len("<|tool>"):prompt.index("<tool|>")]
    assert tool_declaration(WHOLE[name]) == theirs


def read_back(declaration: str, name: str = "f") -> dict:
    head = f"declaration:{name}"
    assert declaration.startswith(head)
    return parse_tool_value(declaration[len(head):])


def S(kind, **keys):  # a schema as the declaration writes it
    return {**keys, "type": kind}


# agent schemas the official template drops parts of -> the parameters they must be declared with
AGENT = {
    "parameters named description and type": (
        obj(["description"], description={"type": "string", "description": "Why"},
            type={"type": "string", "enum": ["a", "b"]}),
        {"properties": {"description": S("STRING", description="Why"), "type": S("STRING", enum=["a", "b"])},
         "required": ["description"], "type": "OBJECT"}),
    "anyOf": (
        obj(key={"anyOf": [STRING, INTEGER], "description": "Id or name"}),
        {"properties": {"key": {"anyOf": [S("STRING"), S("INTEGER")], "description": "Id or name"}},
         "type": "OBJECT"}),
    "oneOf and an optional (anyOf with null), as pydantic writes it": (
        obj(pick={"oneOf": [STRING, {"type": "array", "items": STRING}]},
            limit={"anyOf": [INTEGER, {"type": "null"}], "default": None, "title": "Limit"}),
        {"properties": {"limit": S("INTEGER", nullable=True),
                        "pick": {"anyOf": [S("STRING"), S("ARRAY", items=S("STRING"))]}}, "type": "OBJECT"}),
    "$ref into $defs": (
        {**obj(where={"$ref": "#/$defs/Place", "description": "Where"}),
         "$defs": {"Place": obj(["city"], city=STRING, geo={"$ref": "#/definitions/Geo"})},
         "definitions": {"Geo": obj(lat=NUMBER, lon=NUMBER)}},
        {"properties": {"where": S("OBJECT", description="Where", required=["city"], properties={
            "city": S("STRING"), "geo": S("OBJECT", properties={"lat": S("NUMBER"), "lon": S("NUMBER")})})},
         "type": "OBJECT"}),
    "a $ref cycle is cut to its type": (
        {**obj(tree={"$ref": "#/$defs/Node"}),
         "$defs": {"Node": obj(name=STRING, children={"type": "array", "items": {"$ref": "#/$defs/Node"}})}},
        {"properties": {"tree": S("OBJECT", properties={
            "children": S("ARRAY", items=S("OBJECT")), "name": S("STRING")})},
         "type": "OBJECT"}),
    "allOf merged": (
        obj(both={"allOf": [obj(["a"], a=STRING), obj(b=INTEGER)], "description": "AB"}),
        {"properties": {"both": S("OBJECT", description="AB", required=["a"],
                                  properties={"a": S("STRING"), "b": S("INTEGER")})}, "type": "OBJECT"}),
    "nullable type lists": (
        obj(note={"type": ["string", "null"]}, either={"type": ["string", "number"]}),
        {"properties": {"either": {"anyOf": [S("STRING"), S("NUMBER")]}, "note": S("STRING", nullable=True)},
         "type": "OBJECT"}),
    "enums without a type, and const": (
        obj(mode={"enum": ["fast", "exact", None]}, level={"enum": [1, 2, 3]}, kind={"const": "x"}),
        {"properties": {"kind": S("STRING", enum=["x"]), "level": S("INTEGER", enum=[1, 2, 3]),
                        "mode": S("STRING", enum=["fast", "exact"], nullable=True)}, "type": "OBJECT"}),
    "arrays of arrays": (
        obj(grid={"type": "array", "items": {"type": "array", "items": NUMBER}}),
        {"properties": {"grid": S("ARRAY", items=S("ARRAY", items=S("NUMBER")))}, "type": "OBJECT"}),
    "parameters without a type": (
        {"properties": {"q": STRING}},
        {"properties": {"q": S("STRING")}, "type": "OBJECT"}),
}


@pytest.mark.parametrize("name", AGENT)
def test_agent_schemas_are_declared_whole(official_template, hf_render, name):
    schema, parameters = AGENT[name]
    declared = tool_declaration(tool(schema))
    assert read_back(declared) == {"description": "Does f", "parameters": parameters}
    prompt = hf_render(official_template, [{"role": "user", "content": "x"}], tools=[tool(schema)])
    assert declared not in prompt  # the template's own text loses or garbles a part of it


def test_odd_input_gives_a_declaration_not_an_error():
    deep = STRING
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    fanned = {"$defs": {f"D{i}": obj(a={"$ref": f"#/$defs/D{i + 1}"}, b={"$ref": f"#/$defs/D{i + 1}"})
                        for i in range(40)}, **obj(root={"$ref": "#/$defs/D0"})}
    for schema in (obj(x=deep), fanned, obj(x={"$ref": "#/$defs/Missing"}), obj(x=None), obj(x=[1]),
                   {"type": "object", "properties": "nope"}):
        declared = tool_declaration(tool(schema))
        assert declared.startswith("declaration:f{") and len(declared) < 2_000_000
        read_back(declared)
    assert tool_declaration({"name": "bare", "parameters": obj(a=STRING)}).startswith(
        f"declaration:bare{{description:{Q}{Q},parameters:{{properties:{{a:")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
                    | st.sampled_from(["object", "array", "string", "#/$defs/a", "$ref", "anyOf", "items"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["type", "properties", "items", "required", "enum", "anyOf", "oneOf",
                                         "allOf", "$ref", "$defs", "const", "nullable", "description", "a"]),
                        inner, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_schema_gives_a_declaration(schema):
    assert tool_declaration(tool(schema)).startswith("declaration:f{")
