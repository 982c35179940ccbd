"""Chat: messages -> prompt text through a sandboxed Jinja chat template, and Gemma 4 output -> content,
reasoning and tool calls.

A model's own template (tokenizer_config.json, chat_template.jinja, GGUF `tokenizer.chat_template`) is
rendered the way transformers' apply_chat_template renders it. A model that ships none gets its family's
turn format, kept below as our own Jinja text and rendered by the same path.

Gemma 4 writes structured values in its own notation: bare keys, strings between `<|"|>` tokens,
e.g. `call:get_weather{city:<|"|>Paris<|"|>,days:3}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

QUOTE = '<|"|>'
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
TURN_CLOSE, RESPONSE_OPEN = "<turn|>", "<|tool_response>"


class ChatTemplateError(ValueError):
    """A chat template that does not compile, reaches for Python internals, or fails while rendering."""


# ---- the Gemma 4 value notation ----------------------------------------------------------------

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


class _Malformed(Exception):
    pass


_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_BARE_KEY = re.compile(r"[^:{}\[\],<]+")
_LITERALS = {"true": True, "false": False, "null": None}


class _Reader:
    """Recursive descent over one value in the notation; raises _Malformed on anything else."""

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

    def value(self) -> Any:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        if self.take("{"):
            return self.members()
        if self.take("["):
            return self.elements()
        number = _NUMBER.match(self.text, self.pos)
        if number:
            self.pos = number.end()
            return float(number[0]) if number[1] or number[2] else int(number[0])
        for word, literal in _LITERALS.items():
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return literal
        raise _Malformed

    def string(self) -> str:
        start = self.pos + len(QUOTE)
        end = self.text.find(QUOTE, start)
        if end < 0:
            raise _Malformed
        self.pos = end + len(QUOTE)
        return self.text[start:end]

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(QUOTE, self.pos):
            return self.string()
        match = _BARE_KEY.match(self.text, self.pos)
        if not match or not match[0].strip():
            raise _Malformed
        self.pos = match.end()
        return match[0].strip()

    def members(self) -> dict:  # after "{"
        out: dict = {}
        if self.take("}"):
            return out
        while True:
            key = self.key()
            if not self.take(":"):
                raise _Malformed
            out[key] = self.value()
            if self.take("}"):
                return out
            if not self.take(","):
                raise _Malformed

    def elements(self) -> list:  # after "["
        out: list = []
        if self.take("]"):
            return out
        while True:
            out.append(self.value())
            if self.take("]"):
                return out
            if not self.take(","):
                raise _Malformed


def parse_tool_value(text: str) -> Any:
    """The inverse of format_tool_value; ValueError if `text` is not exactly one value."""
    reader = _Reader(text)
    try:
        value = reader.value()
        reader.skip_space()
        if reader.pos == len(text):
            return value
    except (_Malformed, RecursionError):
        pass
    raise ValueError(f"not a value in Gemma 4 notation: {text[:60]!r}")


# ---- output parsing ----------------------------------------------------------------------------

@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)


@dataclass
class ParsedOutput:
    content: str
    reasoning: str | None
    tool_calls: list[ToolCall]


@dataclass
class StreamEvent:
    kind: str  # "content", "reasoning" or "tool_call"
    text: str = ""
    tool_call: ToolCall | None = None


_CALL_HEAD = re.compile(r"\s*call:([^\s{]+)\s*\{")


def _parse_call(body: str) -> ToolCall | None:
    """`call:NAME{…}` (the text between the tool-call tokens), or None if it is anything else."""
    head = _CALL_HEAD.match(body)
    if not head:
        return None
    reader = _Reader(body, head.end())
    try:
        arguments = reader.members()
    except (_Malformed, RecursionError):  # absurdly deep nesting is malformed too
        return None
    reader.skip_space()
    return ToolCall(head[1], arguments) if reader.pos == len(body) else None


_TEXT_MARKERS = (CHANNEL_OPEN, CALL_OPEN, CHANNEL_CLOSE, TURN_CLOSE, RESPONSE_OPEN)
_TEXT_MARKER_RE = re.compile("|".join(re.escape(m) for m in _TEXT_MARKERS))
_THOUGHT_HEADER = "thought\n"


def _held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a marker."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class Gemma4StreamParser:
    """Splits Gemma 4 output, fed in pieces, into content, reasoning and tool-call events.

    `<|channel>thought\\n…<channel|>` is reasoning; `<|tool_call>call:NAME{…}<tool_call|>` is a tool call,
    or stays content verbatim when it does not parse; end-of-turn tokens and a stray `<channel|>` are
    dropped. Text that may be the start of a marker is held back until the next piece settles it."""

    def __init__(self) -> None:
        self._mode = "content"  # or "reasoning", "call"
        self._buf = ""
        self._header = False  # a channel was just opened and its name line is not read yet

    def feed(self, text: str) -> list[StreamEvent]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[StreamEvent]:
        events: list[StreamEvent] = []

        def emit(kind: str, text: str) -> None:
            if text:
                events.append(StreamEvent(kind, text))

        while True:
            buf = self._buf
            if self._mode == "content":
                match = _TEXT_MARKER_RE.search(buf)
                if match is None:
                    cut = len(buf) - (0 if final else _held_back(buf, _TEXT_MARKERS))
                    emit("content", buf[:cut])
                    self._buf = buf[cut:]
                    return events
                emit("content", buf[:match.start()])
                self._buf = buf[match.end():]
                if match[0] == CHANNEL_OPEN:
                    self._mode, self._header = "reasoning", True
                elif match[0] == CALL_OPEN:
                    self._mode = "call"
            elif self._mode == "reasoning":
                if self._header:
                    if not final and len(buf) < len(_THOUGHT_HEADER) and _THOUGHT_HEADER.startswith(buf):
                        return events
                    if buf.startswith("thought"):
                        buf = buf[len("thought"):]
                        buf = buf[1:] if buf.startswith("\n") else buf
                    self._buf, self._header = buf, False
                end = buf.find(CHANNEL_CLOSE)
                if end < 0:
                    cut = len(buf) - (0 if final else _held_back(buf, (CHANNEL_CLOSE,)))
                    emit("reasoning", buf[:cut])
                    self._buf = buf[cut:]
                    return events
                emit("reasoning", buf[:end])
                self._buf, self._mode = buf[end + len(CHANNEL_CLOSE):], "content"
            else:  # inside a tool call: nothing comes out until it closes
                end = buf.find(CALL_CLOSE)
                if end < 0:
                    if final:
                        emit("content", CALL_OPEN + buf)
                        self._buf = ""
                    return events
                call = _parse_call(buf[:end])
                if call is None:
                    emit("content", CALL_OPEN + buf[:end + len(CALL_CLOSE)])
                else:
                    events.append(StreamEvent("tool_call", tool_call=call))
                self._buf, self._mode = buf[end + len(CALL_CLOSE):], "content"


class PlainParser:
    """Output of a family without thought channels or tool calls: all of it is content."""

    def feed(self, text: str) -> list[StreamEvent]:
        return [StreamEvent("content", text)] if text else []

    def finish(self) -> list[StreamEvent]:
        return []


def output_parser(family: str) -> "Gemma4StreamParser | PlainParser":
    """A fresh streaming parser for one answer of a model of `family`."""
    return Gemma4StreamParser() if family == "gemma4" else PlainParser()


def has_tool_format(family: str) -> bool:
    """Whether answers of this family can carry tool calls that output_parser() recognises."""
    return family == "gemma4"


def parse_output(text: str, family: str) -> ParsedOutput:
    """A whole answer split into content, reasoning (None when there was none) and tool calls. Never
    raises: what does not parse stays content."""
    parser = output_parser(family)
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    return ParsedOutput(content="".join(e.text for e in events if e.kind == "content"),
                        reasoning=reasoning or None,
                        tool_calls=[e.tool_call for e in events if e.kind == "tool_call"])


def parse_gemma4_output(text: str) -> ParsedOutput:
    """A whole Gemma 4 answer (decoded with its special tokens) split into content, reasoning (None when
    there was none) and tool calls. Never raises: what does not parse stays content."""
    return parse_output(text, "gemma4")


# ---- template helpers (filters) ----------------------------------------------------------------

_SCHEMA_KEYS = ("description", "enum", "items", "nullable", "properties", "required", "type")


def _declaration_schema(schema: Any) -> Any:
    """A JSON schema reduced to the keys a Gemma 4 declaration carries, types upper-case."""
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key in _SCHEMA_KEYS:
        value = schema.get(key)
        if value in (None, "", [], {}, False):
            continue
        if key == "type":
            value = [str(t).upper() for t in value] if isinstance(value, list) else str(value).upper()
        elif key == "items":
            value = _declaration_schema(value)
        elif key == "properties" and isinstance(value, Mapping):
            value = {name: _declaration_schema(sub) for name, sub in value.items()}
        out[key] = value
    return out


def _tool_declaration(tool: Mapping) -> str:
    """`declaration:NAME{description:…,parameters:{…}}` for an OpenAI tool (or its bare function)."""
    function = tool.get("function", tool)
    body = {}
    if function.get("description"):
        body["description"] = function["description"]
    if function.get("parameters"):
        body["parameters"] = _declaration_schema(function["parameters"])
    # the schema keys are kept in alphabetical order already, so sorting only orders property names
    return f"declaration:{function.get('name', '')}{format_tool_value(body, sort_keys=True)}"


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


def _tool_result(content: Any) -> str:
    """A tool message's content as the `{…}` of a response: a mapping keeps its keys, anything else,
    JSON text included, becomes `{value:…}`."""
    if not isinstance(content, Mapping):
        content = {"value": content if isinstance(content, (int, float, bool)) else _text_of(content)}
    return format_tool_value(content, sort_keys=True)


def _strip_thoughts(text: Any) -> str:
    return re.sub(r"<\|channel>.*?(<channel\|>|$)", "", str(text), flags=re.S)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # like transformers': no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---- the sandbox -------------------------------------------------------------------------------

class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox answers an unsafe attribute with an Undefined that prints as ''; this one fails at
    once, and on any dunder name, whether or not the object has it."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        if attribute.startswith("__"):
            self.unsafe_undefined(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        dunder = isinstance(argument, str) and argument.startswith("__")
        if dunder and not (isinstance(obj, Mapping) and argument in obj):
            self.unsafe_undefined(obj, argument)
        return super().getitem(obj, argument)


_ENV = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
_ENV.filters.update(tojson=_tojson, tool_value=format_tool_value, tool_declaration=_tool_declaration,
                    tool_result=_tool_result, strip_thoughts=_strip_thoughts)
_ENV.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error on line {e.lineno}: {_one_line(e.message)}") from None


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types only, so the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _prepare(messages: list) -> list[dict]:
    out = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise ValueError(f"messages: each message must be a dict, got {type(message).__name__}")
        # Templates read the thoughts under different names; give them all.
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {**message, **{k: reasoning for k in _REASONING_KEYS if message.get(k) is None}}
        # OpenAI clients send arguments as a JSON string; templates expect the object.
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    arguments = json.loads(function["arguments"])
                except ValueError:
                    continue
                if isinstance(arguments, dict):
                    function["arguments"] = arguments
        out.append(message)
    return out


# ---- the built-in turn formats -----------------------------------------------------------------

# System text goes before the first user message's text, separated by a blank line.
GEMMA3_TEMPLATE = """\
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
  {%- set text = message.content if message.content is string else
        (message.content or []) | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
  {%- if message.role in ('system', 'developer') -%}
    {%- set ns.system = ns.system + text + '\\n\\n' -%}
  {%- else -%}
    {{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\\n' -}}
    {%- if message.role == 'user' -%}
      {{- ns.system -}}
      {%- set ns.system = '' -%}
    {%- endif -%}
    {{- text | trim + '<end_of_turn>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

GEMMA4_TEMPLATE = """\
{%- macro text_of(content, is_model) -%}
  {%- if content is string -%}
    {{- (content | strip_thoughts if is_model else content) | trim -}}
  {%- elif content is iterable and content is not mapping -%}
    {%- for part in content -%}
      {%- if part.type == 'text' -%}
        {{- (part.text | strip_thoughts if is_model else part.text) | trim -}}
      {%- elif part.type in ('image', 'image_url') -%}
        {{- '<|image|>' -}}
      {%- elif part.type in ('audio', 'input_audio') -%}
        {{- '<|audio|>' -}}
      {%- elif part.type == 'video' -%}
        {{- '<|video|>' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}

{%- macro response_name(result, calls, position) -%}
  {%- set found = namespace(name=result.name or (calls[position].function.name
                                                 if position < calls | length else 'unknown')) -%}
  {%- for call in calls if result.tool_call_id and call.id == result.tool_call_id -%}
    {%- set found.name = call.function.name -%}
  {%- endfor -%}
  {{- found.name -}}
{%- endmacro -%}

{{- bos_token -}}
{%- set rest = messages -%}
{%- set has_system = messages and messages[0].role in ('system', 'developer') -%}
{%- if enable_thinking or tools or has_system -%}
  {{- '<|turn>system\\n' -}}
  {%- if enable_thinking -%}
    {{- '<|think|>\\n' -}}
  {%- endif -%}
  {%- if has_system -%}
    {{- text_of(messages[0].content, false) -}}
    {%- set rest = messages[1:] -%}
  {%- endif -%}
  {%- for tool in tools or [] -%}
    {{- '<|tool>' + tool | tool_declaration + '<tool|>' -}}
  {%- endfor -%}
  {{- '<turn|>\\n' -}}
{%- endif -%}

{%- set ns = namespace(last_user=-1, open=false) -%}
{%- for message in rest -%}
  {%- if message.role == 'user' -%}
    {%- set ns.last_user = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in rest -%}
  {%- set i = loop.index0 -%}
  {%- if message.role == 'assistant' -%}
    {#- after tool results the model goes on in the same turn -#}
    {%- if not ns.open -%}
      {{- '<|turn>model\\n' -}}
    {%- endif -%}
    {%- set calls = message.tool_calls or [] -%}
    {#- earlier thoughts are dropped, except those that led to tool calls in the current exchange -#}
    {%- if calls and message.reasoning_content and i > ns.last_user -%}
      {{- '<|channel>thought\\n' + message.reasoning_content + '\\n<channel|>' -}}
    {%- endif -%}
    {%- for call in calls -%}
      {%- set args = call.function.arguments -%}
      {{- '<|tool_call>call:' + call.function.name
          + (args | tool_value(sort_keys=true) if args is mapping else '{' ~ (args or '') ~ '}') + '<tool_call|>' -}}
    {%- endfor -%}
    {%- set results = namespace(count=0) -%}
    {%- if calls -%}
      {%- for result in rest[i + 1:] -%}
        {%- if result.role != 'tool' -%}
          {%- break -%}
        {%- endif -%}
        {{- '<|tool_response>response:' + response_name(result, calls, results.count)
            + result.content | tool_result + '<tool_response|>' -}}
        {%- set results.count = results.count + 1 -%}
      {%- endfor -%}
    {%- endif -%}
    {%- set text = text_of(message.content, true) -%}
    {{- text -}}
    {%- if calls and not results.count and loop.last -%}
      {{- '<|tool_response>' -}}
      {%- set ns.open = true -%}
    {%- elif results.count and not text -%}
      {%- set ns.open = true -%}
    {%- else -%}
      {{- '<turn|>\\n' -}}
      {%- set ns.open = false -%}
    {%- endif -%}
  {%- elif message.role != 'tool' -%}
    {%- if ns.open -%}
      {{- '<turn|>\\n' -}}
      {%- set ns.open = false -%}
    {%- endif -%}
    {{- '<|turn>' + ('system' if message.role == 'developer' else message.role) + '\\n'
        + text_of(message.content, false) + '<turn|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and not ns.open -%}
  {{- '<|turn>model\\n' -}}
  {%- if not enable_thinking -%}
    {{- '<|channel>thought\\n<channel|>' -}}
  {%- endif -%}
{%- endif -%}
"""

BUILTIN_TEMPLATES = {"gemma3": GEMMA3_TEMPLATE, "gemma4": GEMMA4_TEMPLATE}


def builtin_template(family: str) -> str:
    """The turn format used for a model of `family` that ships no chat template."""
    template = BUILTIN_TEMPLATES.get(family.removesuffix("_text"))
    if template is None:
        raise ValueError(f"chat: no built-in turn format for model family {family!r} "
                         f"(known: {', '.join(BUILTIN_TEMPLATES)})")
    return template


# ---- rendering ---------------------------------------------------------------------------------

def render_chat(messages: list, *, template: str | None, family: str, bos_token: str, eos_token: str = "",
                add_generation_prompt: bool = True, tools: list | None = None, enable_thinking: bool = False,
                **extra: Any) -> str:
    """The prompt text for OpenAI-style `messages`, through the model's own chat template, or through
    the built-in turn format of `family` when `template` is None."""
    compiled = _compile(builtin_template(family) if template is None else template)
    context = _plain(extra)
    context.setdefault("documents", None)
    context.update(messages=_prepare(messages), tools=_plain(tools), add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token, enable_thinking=enable_thinking)
    try:
        return compiled.render(**context)
    except SecurityError as e:
        raise ChatTemplateError(f"chat template: refused: {_one_line(e)}") from None
    except jinja2.TemplateError as e:  # raise_exception() in the template, or an undefined value misused
        raise ChatTemplateError(f"chat template: {_one_line(e.message or type(e).__name__)}") from None
    except Exception as e:  # a template can fail in plain Python ways too ('a' + 1, a missing key …)
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {_one_line(e)}") from None
