"""Chat: messages -> prompt text (template.py, with tool declarations from tools.py), and a model's
answer -> content, reasoning and tool calls (parse.py, reading call blocks with calls.py). notation.py
holds Gemma 4's special-token texts and its value notation."""

from .notation import (CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, RESPONSE_OPEN, TURN_CLOSE,
                       format_tool_value, parse_tool_value)
from .parse import (Gemma4StreamParser, ParsedOutput, PlainParser, StreamEvent, ToolCall, has_tool_format,
                    output_parser, parse_gemma4_output, parse_output)
from .template import (BUILTIN_TEMPLATES, GEMMA3_TEMPLATE, GEMMA4_TEMPLATE, ChatTemplateError, builtin_template,
                       render_chat)
from .tools import tool_declaration

__all__ = [
    "BUILTIN_TEMPLATES", "CALL_CLOSE", "CALL_OPEN", "CHANNEL_CLOSE", "CHANNEL_OPEN", "ChatTemplateError",
    "GEMMA3_TEMPLATE", "GEMMA4_TEMPLATE", "Gemma4StreamParser", "ParsedOutput", "PlainParser", "QUOTE",
    "RESPONSE_OPEN", "StreamEvent", "TURN_CLOSE", "ToolCall", "builtin_template", "format_tool_value",
    "has_tool_format", "output_parser", "parse_gemma4_output", "parse_output", "parse_tool_value",
    "render_chat", "tool_declaration",
]
