"""Forced tool calls: `tool_choice` "required" or a named function turns into a grammar that the sampled
answer cannot leave, a call in Gemma 4's syntax whose arguments follow the tool's JSON schema.

    <|tool_call>call:NAME{key:value,...}<tool_call|>

Values are in Gemma 4's notation (chat.format_tool_value): strings between `<|"|>` tokens, numbers,
true/false/null, lists `[...]`, objects `{key:value}` with bare keys. The grammar is llguidance's Lark
syntax; the chat tokens are referenced by id (`<[48]>`), so each is that one token and never its text
spelled out in pieces. With thinking on, a thought channel `<|channel>...<channel|>` may come first.

What the schema says that the grammar enforces: types (and lists of them, `nullable`), `enum` and
`const`, object `properties` (in their declared order; `required` ones always, the others optional;
no undeclared keys when properties are declared), `additionalProperties` of an object without
properties, array `items` with `minItems`/`maxItems`, string `minLength`/`maxLength`, number and
integer bounds (`minimum`, `maximum`, exclusive ones, `multipleOf`), `anyOf`/`oneOf`/`allOf`, and local
`$ref`s (`#/$defs/...`, `#/definitions/...`, recursive ones too). What it cannot express there falls
back to what the rest of the schema allows, as any value where nothing is left: string `pattern` and
`format`, `uniqueItems`, `prefixItems`, `minProperties`/`maxProperties`, `not`, conditionals, and
`oneOf`'s "exactly one" (it is taken as `anyOf`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from .chat import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, format_tool_value
from .structured import GrammarConstraint, constraint_from_grammar

# Text a string value may not contain: the output parser would end the string or the call there.
_STRING_TEXT = r'/(?s:.{%d,%s})/ & ~/(?s:.*)(<\|"\|>|<tool_call\|>)(?s:.*)/'
_THOUGHT_TEXT = r"/(?s:.+)/ & ~/(?s:.*)<channel\|>(?s:.*)/"
# A key written bare: what the output parser reads as one (no separators, no surrounding space).
_BARE_KEY = re.compile(r"[^:{}\[\],<\s]([^:{}\[\],<]*[^:{}\[\],<\s])?")
_TOOL_NAME = re.compile(r"[^\s{}<]+")
_RULE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")


def tool_call_constraint(tools: list[dict], name: str | None, tokenizer, thinking: bool = False) -> GrammarConstraint:
    """The constraint of a forced call (tool_call_grammar) for one sequence. ValueError (one line)
    for a tool that cannot be written as a call, or a vocabulary without Gemma 4's chat tokens."""

    def token_id(text: str) -> int:
        i = tokenizer.token_to_id(text)
        if i is None:
            raise ValueError(f"tool_choice: the model's vocabulary has no {text} token to call a tool with")
        return i

    return constraint_from_grammar(tool_call_grammar(tools, name, token_id, thinking), tokenizer, "tool_choice")


def tool_call_grammar(tools: list[dict], name: str | None, token_id: Callable[[str], int],
                      thinking: bool = False) -> str:
    """The Lark grammar of an answer that calls a tool: any of `tools` (OpenAI tool objects) one or more
    times, or the one named `name` once. token_id(text) gives the id of a chat token. ValueError (one
    line) for a tool that cannot be written as a call."""
    functions = [t.get("function", t) for t in tools]
    if name is not None:
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise ValueError(f"tool_choice: no tool named {name!r}")
    builder = _Builder(token_id(QUOTE))
    calls = []
    for f in functions:
        fname = f.get("name")
        if not isinstance(fname, str) or not _TOOL_NAME.fullmatch(fname):
            raise ValueError(f"tools: the name {fname!r} cannot be written in Gemma 4's call syntax")
        parameters = f.get("parameters")
        # no parameters: a function of no arguments, as OpenAI reads an omitted parameter list
        schema = parameters if isinstance(parameters, dict) else {"type": "object", "additionalProperties": False}
        if "type" not in schema and not any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf")):
            schema = {**schema, "type": "object"}  # the arguments are an object whatever else the schema says
        arguments = builder.value(schema, root=schema, where=f"tools.{fname}.parameters")
        calls.append(f"<[{token_id(CALL_OPEN)}]> {json.dumps('call:' + fname)} {arguments} <[{token_id(CALL_CLOSE)}]>")
    lines = [f"start: {'thought? ' if thinking else ''}{'call' if name is not None else 'call+'}",
             "call: " + " | ".join(calls)]
    if thinking:
        lines += [f"thought: <[{token_id(CHANNEL_OPEN)}]> THOUGHT? <[{token_id(CHANNEL_CLOSE)}]>",
                  f"THOUGHT: {_THOUGHT_TEXT}"]
    return "\n".join(lines + builder.lines()) + "\n"


class _Builder:
    """JSON schema -> Lark rules over Gemma 4 values; each method returns the name of a rule."""

    def __init__(self, quote: int):
        self.quote = f"<[{quote}]>"
        self.rules: dict[str, str] = {}
        self.refs: dict[tuple[int, str], str] = {}

    def lines(self) -> list[str]:
        return [f"{name}: {body}" for name, body in self.rules.items()]

    def _rule(self, body: str) -> str:
        if _RULE_NAME.fullmatch(body):
            return body  # a rule that only names another one
        for existing, b in self.rules.items():  # the same body once: keeps big schemas small
            if b == body:
                return existing
        name = f"v{len(self.rules)}"  # rules are never removed, so the count never names one twice
        self.rules[name] = body
        return name

    def _terminal(self, name: str, body: str) -> str:
        self.rules.setdefault(name, body)
        return name

    # ---- values ---------------------------------------------------------------------------
    def value(self, schema: Any, root: dict, where: str) -> str:
        if not isinstance(schema, dict):
            return self.any_value()  # true, false, or not a schema
        if "$ref" in schema:
            return self._ref(schema, root, where)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged = _merge(merged, part if isinstance(part, dict) else {})
            return self.value(merged, root, where)
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                rest = {k: v for k, v in schema.items() if k != key}
                parts = [self.value(_merge(rest, p if isinstance(p, dict) else {}), root, where) for p in schema[key]]
                return self._rule(" | ".join(dict.fromkeys(parts)))
        if "const" in schema:
            return self._rule(self.literal(schema["const"]))
        if isinstance(schema.get("enum"), list):
            options = [self.literal(v) for v in schema["enum"] if QUOTE not in json.dumps(v)]
            if not options:
                raise ValueError(f"{where}: no enum value can be written in Gemma 4's call syntax")
            return self._rule(" | ".join(dict.fromkeys(options)))
        types = schema.get("type")
        types = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
        types = [t for t in types if t in _TYPES]
        if not types:
            types = ["object"] if "properties" in schema else ["array"] if "items" in schema else []
        if not types:
            return self.any_value()
        if schema.get("nullable") is True and "null" not in types:
            types.append("null")
        return self._rule(" | ".join(self._typed(t, schema, root, where) for t in types))

    def _typed(self, kind: str, schema: dict, root: dict, where: str) -> str:
        if kind == "string":
            return self.string(schema.get("minLength", 0), schema.get("maxLength"))
        if kind in ("integer", "number"):
            bounds = {k: schema[k] for k in _NUMBER_KEYS if isinstance(schema.get(k), (int, float))}
            # a number is written the same in Gemma 4's notation as in JSON: llguidance's JSON numbers
            return self._rule("%json " + json.dumps({"type": kind, **bounds}))
        if kind == "boolean":
            return '"true" | "false"'
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self.array(schema, root, where)
        return self.object_of(schema, root, where)

    def literal(self, value: Any) -> str:
        """The exact text of a value (chat.format_tool_value), its quote tokens by id."""
        parts = format_tool_value(value).split(QUOTE)
        pieces = []
        for i, part in enumerate(parts):
            if i:
                pieces.append(self.quote)
            if part:
                pieces.append(json.dumps(part))
        return "(" + " ".join(pieces) + ")"

    def string(self, min_length: Any = 0, max_length: Any = None) -> str:
        low = min_length if isinstance(min_length, int) and min_length > 0 else 0
        high = max_length if isinstance(max_length, int) and max_length >= low else None
        if high == 0:
            return self._rule(f"{self.quote} {self.quote}")
        name = f"STR_{max(low, 1)}_{'' if high is None else high}"
        self._terminal(name, _STRING_TEXT % (max(low, 1), "" if high is None else high))
        return self._rule(f"{self.quote} {name}{'?' if low == 0 else ''} {self.quote}")

    def array(self, schema: dict, root: dict, where: str) -> str:
        item = self.value(schema.get("items", True), root, where + ".items")
        low = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        if high is not None and high < max(low, 1):  # maxItems 0 (or below minItems: nothing fits; [] is tried)
            return self._rule('"[" "]"')
        least, most = max(low - 1, 0), None if high is None else high - 1  # items after the first
        if most == 0:
            more = ""
        elif most is None and least == 0:
            more = f'("," {item})*'
        else:
            more = f'("," {item}){{{least},{"" if most is None else most}}}'
        return self._rule(f'"[" {item} {more} "]"' if low > 0 else f'"[" ({item} {more})? "]"')

    def object_of(self, schema: dict, root: dict, where: str) -> str:
        properties = dict(schema.get("properties") or {}) if isinstance(schema.get("properties"), dict) else {}
        required = [k for k in schema.get("required", []) if isinstance(k, str)] \
            if isinstance(schema.get("required"), list) else []
        for key in required:
            properties.setdefault(key, True)
        if not properties:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return self._rule('"{" "}"')
            member = self._rule(f'KEY ":" {self.value(extra, root, where + ".additionalProperties")}')
            self._terminal("KEY", r"/[A-Za-z_][A-Za-z0-9_]*/")
            return self._rule(f'"{{" ({member} ("," {member})*)? "}}"')
        members = [(self.key(k, where), self.value(v, root, f"{where}.{k}"), k in required)
                   for k, v in properties.items()]
        # first[i]: the members from i on, none written yet; rest[i]: the same after one was (a comma first)
        first, rest = "", ""
        for key, value, needed in reversed(members):
            member = f'{key} ":" {value}'
            new_first = f"{member} {rest}".strip()
            new_rest = f'"," {member} {rest}'.strip()
            if not needed:
                new_first = self._rule(f"{new_first} | {first}" if first else f"({new_first})?")
                new_rest = self._rule(f"{new_rest} | {rest}" if rest else f"({new_rest})?")
            first, rest = self._rule(new_first), self._rule(new_rest)
        return self._rule(f'"{{" {first} "}}"')

    def key(self, name: str, where: str) -> str:
        if QUOTE in name:
            raise ValueError(f"{where}: the property name {name!r} cannot be written in Gemma 4's call syntax")
        return json.dumps(name) if _BARE_KEY.fullmatch(name) else f"{self.quote} {json.dumps(name)} {self.quote}"

    def _ref(self, schema: dict, root: dict, where: str) -> str:
        ref = schema["$ref"]
        target = _resolve(root, ref) if isinstance(ref, str) else None
        if target is None:
            raise ValueError(f"{where}: cannot resolve $ref {ref!r} (only local #/$defs/... and #/definitions/...)")
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        if siblings:
            return self.value(_merge(target, siblings), root, where)
        key = (id(root), ref)
        if key not in self.refs:  # named before it is built, so that a recursive schema refers to itself
            self.refs[key] = name = f"ref{len(self.refs)}"
            self.rules[name] = ""
            self.rules[name] = self.value(target, root, where)
        return self.refs[key]

    def any_value(self) -> str:
        if "any_value" not in self.rules:
            self.rules["any_value"] = ""
            self._terminal("NUMBER", r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/")
            self._terminal("KEY", r"/[A-Za-z_][A-Za-z0-9_]*/")
            string = self.string()
            self.rules["any_list"] = '"[" (any_value ("," any_value)*)? "]"'
            self.rules["any_member"] = 'KEY ":" any_value'
            self.rules["any_object"] = '"{" (any_member ("," any_member)*)? "}"'
            self.rules["any_value"] = f'{string} | NUMBER | "true" | "false" | "null" | any_list | any_object'
        return "any_value"


def _merge(a: dict, b: dict) -> dict:
    """Two schemas that must both hold, as one (properties and required lists joined; b wins elsewhere)."""
    out = {**a, **b}
    if isinstance(a.get("properties"), dict) and isinstance(b.get("properties"), dict):
        out["properties"] = {**a["properties"], **b["properties"]}
    if isinstance(a.get("required"), list) and isinstance(b.get("required"), list):
        out["required"] = list(dict.fromkeys(a["required"] + b["required"]))
    return out


def _resolve(root: dict, ref: str) -> Any:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) or isinstance(node, bool) else None
