"""Chat: messages -> prompt text (template.py, with tool declarations from tools.py), and a model's
answer -> content, reasoning and tool calls (parse.py, reading call blocks with calls.py). notation.py
holds Gemma 4's special-token texts and its value notation.

The names below are imported from their modules on first use (PEP 562): a raw completion reads none of
them, and the template's jinja2 is loaded only by a prompt that is rendered.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "notation": ["CALL_CLOSE", "CALL_OPEN", "CHANNEL_CLOSE", "CHANNEL_OPEN", "QUOTE", "RESPONSE_OPEN", "TURN_CLOSE",
                 "format_tool_value", "parse_tool_value"],
    "parse": ["Gemma4StreamParser", "ParsedOutput", "PlainParser", "StreamEvent", "ToolCall", "has_tool_format",
              "output_parser", "parse_gemma4_output", "parse_output"],
    "template": ["BUILTIN_TEMPLATES", "GEMMA3_TEMPLATE", "GEMMA4_TEMPLATE", "ChatTemplateError", "builtin_template",
                 "render_chat"],
    "tools": ["tool_declaration"],
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)

if TYPE_CHECKING:
    from .notation import (CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, RESPONSE_OPEN, TURN_CLOSE,
                           format_tool_value, parse_tool_value)
    from .parse import (Gemma4StreamParser, ParsedOutput, PlainParser, StreamEvent, ToolCall, has_tool_format,
                        output_parser, parse_gemma4_output, parse_output)
    from .template import (BUILTIN_TEMPLATES, GEMMA3_TEMPLATE, GEMMA4_TEMPLATE, ChatTemplateError,
                           builtin_template, render_chat)
    from .tools import tool_declaration


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'gemma4.chat' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
