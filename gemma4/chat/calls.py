"""The text of one tool-call block (what the model writes between `<|tool_call>` and `<tool_call|>`) read
as calls: `call:NAME{key:value,…}`, several in a row, and the drifts whose reading is unambiguous —
`NAME{…}` without `call:`, `NAME(key=value, …)` or `NAME(key: value)`, and JSON objects
`{"name": …, "arguments": {…}}`. Anything else is not a call: the caller keeps the text as it was."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .notation import Malformed, Reader, number

_CALL_PREFIX = re.compile(r"\s*call\s*:\s*")
# OpenAI allows [A-Za-z0-9_-]; MCP servers and agents add dots, slashes and colons-free namespaces
NAME = r"[A-Za-z_][\w.\-/]*"
_NAME = re.compile(NAME)
_JSON_CALL_KEYS = {"name", "arguments", "parameters", "args", "id", "type"}


@dataclass
class Call:
    name: str
    arguments: dict
    text: str  # the entry as the model wrote it


def _arguments(value: Any) -> dict:
    if isinstance(value, str):  # OpenAI style: the arguments as a JSON string
        try:
            value = json.loads(value, parse_float=number, parse_int=number, parse_constant=_refuse)
        except (ValueError, RecursionError):
            raise Malformed from None
    if not isinstance(value, dict):
        raise Malformed
    return value


def _refuse(constant: str) -> None:
    raise ValueError(constant)  # NaN and Infinity are not JSON


def _json_call(value: Any) -> tuple[str, dict]:
    """{"name": …, "arguments": {…}} (or "parameters"/"args") as a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or set(value) - _JSON_CALL_KEYS:
        raise Malformed
    given = [k for k in ("arguments", "parameters", "args") if k in value]
    if len(given) > 1:
        raise Malformed
    return value["name"], _arguments(value[given[0]]) if given else {}


def _entry(reader: Reader, bare_name: bool) -> tuple[str, dict]:
    text = reader.text
    prefix = _CALL_PREFIX.match(text, reader.pos)
    if prefix:
        reader.pos = prefix.end()
    reader.skip_space()
    if text.startswith("{", reader.pos):  # a JSON call object
        return _json_call(reader.value())
    name = _NAME.match(text, reader.pos)
    if not name:
        raise Malformed
    reader.pos = name.end()
    if reader.take("{"):
        return name[0], reader.members("}", 1)
    if reader.take("("):
        return name[0], reader.members(")", 1)
    if bare_name:  # a name alone: a call without arguments
        reader.pos = name.end()
        return name[0], {}
    raise Malformed


def read_calls(body: str, bare_name: bool = True) -> list[Call] | None:
    """The calls in a block's text, or None when it is not a sequence of calls (separated by commas,
    semicolons, white space or nothing). bare_name: a name with no arguments, alone in the block, is a call."""
    reader = Reader(body)
    try:
        reader.skip_space()
        if body.startswith("[", reader.pos):  # a JSON list of call objects
            items = reader.value()
            if not isinstance(items, list) or not items or not reader.at_end():
                return None
            return [Call(*_json_call(item), json.dumps(item, ensure_ascii=False)) for item in items]
        calls: list[Call] = []
        while not reader.at_end():
            start = reader.pos
            name, arguments = _entry(reader, bare_name)
            calls.append(Call(name, arguments, body[start:reader.pos]))
            reader.take(",") or reader.take(";")
    except (Malformed, RecursionError):
        return None
    if len(calls) > 1 and any(c.text[-1] not in "})" for c in calls):
        return None  # a name alone is a call only when it is all the block holds
    return calls or None
