"""Messages -> prompt text through a sandboxed Jinja chat template.

A model's own template (tokenizer_config.json, chat_template.jinja, GGUF `tokenizer.chat_template`) is
rendered the way transformers' apply_chat_template renders it. A model that ships none gets its family's
turn format, kept below as our own Jinja text and rendered by the same path.

What clients send is made to work with every template: text given as a list of parts becomes the
same text as a string, and for Gemma 4 the tool declarations are written by tools.py (the official
template drops parts of the schemas agents write) and a turn left closed after tool results is reopened.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .notation import CHANNEL_CLOSE, CHANNEL_OPEN, TOOL_CLOSE, TOOL_OPEN, TURN_CLOSE, TURN_OPEN, format_tool_value
from .tools import tool_declaration


class ChatTemplateError(ValueError):
    """A chat template that does not compile, reaches for Python internals, or fails while rendering."""


# ---- template helpers (filters) ----------------------------------------------------------------

def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _text_of(content: Any) -> str:
    """Content as one text: the text parts of a list joined by newlines (as llama.cpp and vLLM join them)."""
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if _is_text_part(p))
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
_ENV.filters.update(tojson=_tojson, tool_value=format_tool_value, tool_declaration=tool_declaration,
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
        # Text given as parts is the same text as a string: templates that read only strings (the official
        # Gemma 4 one prints a system list as its Python repr) then see what a string would give them.
        content = message.get("content")
        if isinstance(content, list) and content and all(_is_text_part(p) for p in content):
            message = {**message, "content": _text_of(content)}
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
    tools = _plain(tools)
    context.update(messages=_prepare(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                   bos_token=bos_token, eos_token=eos_token, enable_thinking=enable_thinking)
    try:
        if family.removesuffix("_text") != "gemma4":
            return compiled.render(**context)
        text = _with_own_declarations(compiled, context) if template is not None and tools else None
        text = compiled.render(**context) if text is None else text
        if add_generation_prompt and text.endswith(TURN_CLOSE + "\n"):
            # content and tool calls, then the results: the template closes the turn and opens no new one,
            # leaving the model to write outside any turn
            text += TURN_OPEN + "model\n" + ("" if enable_thinking else CHANNEL_OPEN + "thought\n" + CHANNEL_CLOSE)
        return text
    except SecurityError as e:
        raise ChatTemplateError(f"chat template: refused: {_one_line(e)}") from None
    except jinja2.TemplateError as e:  # raise_exception() in the template, or an undefined value misused
        raise ChatTemplateError(f"chat template: {_one_line(e.message or type(e).__name__)}") from None
    except Exception as e:  # a template can fail in plain Python ways too ('a' + 1, a missing key …)
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {_one_line(e)}") from None


def _with_own_declarations(compiled: jinja2.Template, context: dict) -> str | None:
    """The prompt with each `<|tool>…<tool|>` the template writes replaced by tools.py's declaration of the
    same tool, or None when the template does not write them so. The template renders stand-ins
    (placeholder names), found afterwards, so that it never sees — or drops — the real schemas."""
    tools = context["tools"]
    names = [f"gemma4_tool_placeholder_{i}_" for i in range(len(tools))]
    stand_ins = [{"type": "function", "function": {"name": name, "description": ""}} for name in names]
    text = compiled.render(**{**context, "tools": stand_ins})
    spans = []
    for name in names:
        at = text.find(name)
        start, end = text.rfind(TOOL_OPEN, 0, at), text.find(TOOL_CLOSE, at)
        if at < 0 or text.count(name) != 1 or start < 0 or end < 0:
            return None
        spans.append((start, end + len(TOOL_CLOSE)))
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None
    for (start, end), tool in reversed(list(zip(spans, tools))):
        text = text[:start] + TOOL_OPEN + tool_declaration(tool) + TOOL_CLOSE + text[end:]
    return text
