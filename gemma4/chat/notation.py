"""Gemma 4's special-token texts and its value notation: bare keys, strings between `<|"|>` tokens, e.g.
`{city:<|"|>Paris<|"|>,days:3}`.

format_tool_value writes the notation. read_value reads it, and also what the model writes when it drifts
into JSON or Python (`"x"`, `'x'`, `{"k": 1}`, `k=v`, True/None), wherever that reading is unambiguous.
What it reads is always plain JSON data: a number JSON cannot carry (beyond float range, or an integer
too long for Python to print) keeps its text, as a string.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

QUOTE = '<|"|>'
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"
THINK = "<|think|>"


def format_tool_value(value: Any, sort_keys: bool = False) -> str:
    """A Python value in Gemma 4's notation: `{key:value,…}`, `[…]`, `<|"|>text<|"|>`, numbers,
    true/false/null. With sort_keys, keys are ordered case-insensitively, as the model's own template does."""
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: str(kv[0]).lower()) if sort_keys else value.items()
        return "{" + ",".join(f"{key}:{format_tool_value(item, sort_keys)}" for key, item in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_tool_value(item, sort_keys) for item in value) + "]"
    return format_tool_value(str(value), sort_keys)


class Malformed(Exception):
    """Text that is not one reading of a value (raised inside the reader only)."""


MAX_DEPTH = 64  # deeper nesting is taken as malformed: JSON encoders and clients recurse on it too
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?(?![\w.])")
_WORD = re.compile(r"[A-Za-z_]\w*")
_LITERALS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
_BARE_KEY = re.compile(r"[^:=,{}\[\]()<>\"'\s][^:=,{}\[\]()<>\"']*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "0": "\0", "\\": "\\", "'": "'", '"': '"',
            "/": "/", "\n": ""}


def number(text: str) -> Any:
    """A number's text as int or float, or the text itself when JSON cannot carry the value."""
    if "." in text or "e" in text or "E" in text:
        value = float(text)
        return value if math.isfinite(value) else text
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        return text


class Reader:
    """Recursive descent over text in the notation and its JSON/Python drifts; raises Malformed."""

    def __init__(self, text: str, pos: int = 0):
        self.text, self.pos = text, pos

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, literal: str) -> bool:
        self.skip_space()
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos == len(self.text)

    def value(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise Malformed
        self.skip_space()
        text, pos = self.text, self.pos
        if text.startswith(QUOTE, pos) or text.startswith(('"', "'"), pos):
            return self.string()
        if self.take("{"):
            return self.members("}", depth + 1)
        if self.take("["):
            return self.elements(depth + 1)
        literal = _NUMBER.match(text, pos)
        if literal:
            self.pos = literal.end()
            return number(literal[0])
        word = _WORD.match(text, pos)
        if word and word[0] in _LITERALS:
            self.pos = word.end()
            return _LITERALS[word[0]]
        raise Malformed

    def string(self) -> str:
        text, pos = self.text, self.pos
        if text.startswith(QUOTE, pos):
            end = text.find(QUOTE, pos + len(QUOTE))
            if end < 0:
                raise Malformed
            self.pos = end + len(QUOTE)
            return text[pos + len(QUOTE):end]
        quote, out, i = text[pos], [], pos + 1
        while i < len(text):
            c = text[i]
            if c == quote:
                self.pos = i + 1
                return "".join(out)
            if c == "\\" and i + 1 < len(text):
                i, piece = self._escape(i + 1)
                out.append(piece)
                continue
            out.append(c)
            i += 1
        raise Malformed

    def _escape(self, i: int) -> tuple[int, str]:
        """The character a backslash escape stands for, and where the text goes on."""
        c = self.text[i]
        if c in "ux":
            width = 4 if c == "u" else 2
            digits = self.text[i + 1:i + 1 + width]
            if len(digits) == width and all(d in "0123456789abcdefABCDEF" for d in digits):
                code = int(digits, 16)
                low = self.text[i + 5:i + 11]  # a JSON surrogate pair: \ud83d\ude00
                if c == "u" and 0xD800 <= code < 0xDC00 and re.fullmatch(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}", low):
                    code = 0x10000 + ((code - 0xD800) << 10) + (int(low[2:], 16) - 0xDC00)
                    return i + 11, chr(code)
                if 0xD800 <= code < 0xE000:
                    raise Malformed  # a lone surrogate cannot be encoded as UTF-8
                return i + 1 + width, chr(code)
            raise Malformed
        return i + 1, _ESCAPES.get(c, "\\" + c)

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith((QUOTE, '"', "'"), self.pos):
            return self.string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match or not match[0].strip():
            raise Malformed
        self.pos = match.end()
        return match[0].strip()

    def members(self, close: str, depth: int) -> dict:
        """`key:value` (or `key=value`) pairs up to `close`, after its opening bracket; a trailing comma is
        allowed, a repeated key is not (it has no one reading)."""
        out: dict = {}
        while not self.take(close):
            key = self.key()
            if not (self.take(":") or self.take("=")) or key in out:
                raise Malformed
            out[key] = self.value(depth)
            if not self.take(","):
                if self.take(close):
                    break
                raise Malformed
        return out

    def elements(self, depth: int) -> list:
        out: list = []
        while not self.take("]"):
            out.append(self.value(depth))
            if not self.take(","):
                if self.take("]"):
                    break
                raise Malformed
        return out


def read_value(text: str) -> Any:
    """Exactly one value; Malformed otherwise."""
    reader = Reader(text)
    value = reader.value()
    if not reader.at_end():
        raise Malformed
    return value


def parse_tool_value(text: str) -> Any:
    """The inverse of format_tool_value (lenient as read_value); ValueError if `text` is not exactly one value."""
    try:
        return read_value(text)
    except Malformed:
        raise ValueError(f"not a value in Gemma 4 notation: {text[:60]!r}") from None
