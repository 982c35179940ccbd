"""Tool declarations in Gemma 4's format: `declaration:NAME{description:…,parameters:{properties:{…},
required:[…],type:<|"|>OBJECT<|"|>}}`, written from the JSON schemas agents send.

Where the model's own template renders a schema whole, the text here is the same, character for
character (tested against the official template): keys in alphabetical order, types upper-case, a
property carrying description/enum/items/nullable/properties/required/type, array items carrying all
their keys. What the template drops or garbles is kept: parameters named `description` or `type`,
`anyOf`/`oneOf`, `$ref` into `$defs`, nullable type lists (`["string", "null"]`), enums without a type,
arrays of arrays.
"""

from __future__ import annotations

from typing import Any, Mapping

from .notation import QUOTE

_MAX_EXPANSIONS = 1000
_MAX_DEPTH = 32  # levels and $refs on one path: schemas nest far less; a $ref met again is cut to its type


def _q(text: Any) -> str:
    return QUOTE + str(text) + QUOTE


def _argument(value: Any) -> str:
    """A value the way the template's format_argument writes it: quoted keys, Python's spelling of
    numbers (and of None)."""
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]).lower())
        return "{" + ",".join(_q(k) + ":" + _argument(v) for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_argument(v) for v in value) + "]"
    return str(value)


def _upper(kind: Any) -> str:
    return str(kind).upper() if kind is not None else ""


class _Schemas:
    """Normalises schema nodes against one root (for its $defs)."""

    def __init__(self, root: Mapping):
        self.defs = {name: schema for key in ("definitions", "$defs") if isinstance(root.get(key), Mapping)
                     for name, schema in root[key].items()}
        self.expansions = _MAX_EXPANSIONS  # $refs reused many times over could multiply the text without end

    def resolve(self, node: Any, seen: list) -> dict:
        """`node` with $ref, allOf, anyOf/oneOf, const and type lists folded into the declaration keys.
        `seen`: the $refs expanded on the way here, added to; a ref met again is cut to its type."""
        if not isinstance(node, Mapping):
            return {}
        node = dict(node)
        ref = node.pop("$ref", None)
        if isinstance(ref, str):
            target = self.defs.get(ref.rsplit("/", 1)[-1])
            if isinstance(target, Mapping) and ref not in seen and self.expansions > 0:
                self.expansions -= 1
                seen.append(ref)
                node = {**self.resolve(target, seen), **node}  # keys beside the $ref win
            elif isinstance(target, Mapping):
                node.setdefault("type", target.get("type", "object"))
        for key in ("$defs", "definitions", "$schema"):
            node.pop(key, None)
        parts = node.pop("allOf", None)
        for part in parts if isinstance(parts, list) else []:
            part = self.resolve(part, seen)
            for key, value in part.items():
                if key == "properties" and isinstance(node.get(key), Mapping) and isinstance(value, Mapping):
                    node[key] = {**node[key], **value}
                elif key == "required" and isinstance(node.get(key), list) and isinstance(value, list):
                    node[key] = node[key] + [r for r in value if r not in node[key]]
                else:
                    node.setdefault(key, value)
        options = node.pop("anyOf", None) or node.pop("oneOf", None)
        if isinstance(options, list):
            options = [self.resolve(o, list(seen)) for o in options]
            if any(o.get("type") == "null" for o in options):
                node["nullable"] = True
            options = [o for o in options if o.get("type") != "null"]
            if len(options) == 1:
                node = {**options[0], **node}
            elif options:
                node["anyOf"] = options
        kind = node.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            if len(kinds) < len(kind):
                node["nullable"] = True
            node.pop("type")
            if len(kinds) == 1:
                node["type"] = kinds[0]
            elif kinds:
                node.setdefault("anyOf", [{"type": k} for k in kinds])
        if "const" in node and "enum" not in node:
            node["enum"] = [node.pop("const")]
        if isinstance(node.get("enum"), list):
            values = node["enum"]
            if None in values:
                node["enum"], node["nullable"] = [v for v in values if v is not None], True
            if "type" not in node and "anyOf" not in node:
                node["type"] = _enum_type(node["enum"])
        if "type" not in node and "anyOf" not in node and isinstance(node.get("properties"), Mapping):
            node["type"] = "object"
        return {k: v for k, v in node.items() if v is not None}

    # ---- writing ------------------------------------------------------------------------------
    def properties(self, properties: Any, seen: list) -> str:
        if not isinstance(properties, Mapping) or len(seen) > _MAX_DEPTH:
            return ""
        items = sorted(properties.items(), key=lambda kv: str(kv[0]).lower())
        return ",".join(f"{name}:{self.prop(schema, list(seen))}" for name, schema in items)

    def prop(self, schema: Any, seen: list) -> str:
        """A property's schema: its declaration keys, in the template's order."""
        seen.append(None)  # one level deeper
        node = self.resolve(schema, seen)
        kind = _upper(node.get("type"))
        fields = []
        if isinstance(node.get("anyOf"), list) and len(seen) < _MAX_DEPTH:
            fields.append("anyOf:[" + ",".join(self.prop(o, list(seen)) for o in node["anyOf"]) + "]")
        if node.get("description"):
            fields.append("description:" + _q(node["description"]))
        if node.get("enum"):
            fields.append("enum:" + _argument(node["enum"]))
        if kind == "ARRAY" and isinstance(node.get("items"), Mapping) and node["items"] and len(seen) < _MAX_DEPTH:
            fields.append("items:{" + self.items(node["items"], list(seen)) + "}")
        if node.get("nullable"):
            fields.append("nullable:true")
        if kind == "OBJECT":
            fields.append("properties:{" + self.properties(node.get("properties"), seen) + "}")
            if node.get("required") and isinstance(node["required"], list):
                fields.append("required:" + _argument(node["required"]))
        if "type" in node or "anyOf" not in node:
            fields.append("type:" + _q(kind))
        return "{" + ",".join(fields) + "}"

    def items(self, schema: Any, seen: list) -> str:
        """An array's items: every key, in alphabetical order, as the template writes them."""
        seen.append(None)
        node = self.resolve(schema, seen)
        fields = []
        for key, value in sorted(node.items(), key=lambda kv: str(kv[0]).lower()):
            if key in ("items", "anyOf", "properties") and len(seen) >= _MAX_DEPTH:
                continue  # cut: deeper than any real schema
            if key == "properties":
                fields.append("properties:{" + self.properties(value, seen) + "}")
            elif key == "required" and isinstance(value, list):
                fields.append("required:" + _argument(value))
            elif key == "type":
                fields.append("type:" + _argument(_upper(value)))
            elif key == "items" and isinstance(value, Mapping):
                fields.append("items:{" + self.items(value, list(seen)) + "}")
            elif key == "anyOf" and isinstance(value, list):
                fields.append("anyOf:[" + ",".join("{" + self.items(o, list(seen)) + "}" for o in value) + "]")
            else:
                fields.append(f"{key}:{_argument(value)}")
        return ",".join(fields)

    def top(self, schema: Any) -> str:
        """The `{properties:…,required:…,type:…}` of a function's parameters or response."""
        seen: list = []
        node = self.resolve(schema, seen)
        fields = []
        if node.get("properties"):
            fields.append("properties:{" + self.properties(node["properties"], seen) + "}")
        if node.get("required") and isinstance(node["required"], list):
            fields.append("required:" + _argument(node["required"]))
        fields.append("type:" + _q(_upper(node.get("type") or "object")))
        return ",".join(fields)


def _enum_type(values: list) -> str | None:
    if values and all(isinstance(v, str) for v in values):
        return "string"
    if values and all(isinstance(v, bool) for v in values):
        return "boolean"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "integer"
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    return None


def tool_declaration(tool: Mapping) -> str:
    """`declaration:NAME{description:…,parameters:{…}}` for an OpenAI tool (or its bare function)."""
    function = tool.get("function", tool) if isinstance(tool, Mapping) else {}
    if not isinstance(function, Mapping):
        function = {}
    body = ["description:" + _q(function.get("description") or "")]
    parameters = function.get("parameters")
    if isinstance(parameters, Mapping) and parameters:
        body.append("parameters:{" + _Schemas(parameters).top(parameters) + "}")
    response = function.get("response")
    if isinstance(response, Mapping):
        described = ["description:" + _q(response["description"])] if response.get("description") else []
        body.append("response:{" + ",".join(described + [_Schemas(response).top(response)]) + "}")
    return f"declaration:{function.get('name', '')}{{{','.join(body)}}}"
