"""A model's answer split into content, reasoning and tool calls, whole or as it streams.

Gemma 4 thinks in `<|channel>thought\\n…<channel|>` and calls tools as `<|tool_call>call:NAME{…}<tool_call|>`
(calls.py reads a block). The stream parser takes text in pieces of any size, cut anywhere, and gives the
same events as for the whole text: what may still turn out to be a marker, a channel's name or a call is
held back until the next piece settles it, and nothing is decided that later text could change.

Calls are recovered wherever the model makes one: opened inside a thought that was never closed, written
right after `<channel|>` without `<|tool_call>`, several in one block, a block left unclosed at the end of
the turn. Only the tools a request declared become calls: a block naming another tool, or one that does
not read as calls, stays content as the model wrote it (its call markers included). Other markers (the
thought channel's, the turn's) never reach content or reasoning, stray or doubled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Collection, Iterable

from .calls import NAME, read_calls
from .notation import (CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE, RESPONSE_CLOSE, RESPONSE_OPEN,
                       THINK, TOOL_CLOSE, TOOL_OPEN, TURN_CLOSE, TURN_OPEN)


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        """The arguments as strict JSON text (what OpenAI-style APIs send as `arguments`)."""
        return json.dumps(self.arguments, ensure_ascii=False, allow_nan=False)


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


_MARKERS = (CHANNEL_OPEN, CHANNEL_CLOSE, CALL_OPEN, CALL_CLOSE, TURN_OPEN, TURN_CLOSE, RESPONSE_OPEN,
            RESPONSE_CLOSE, TOOL_OPEN, TOOL_CLOSE, THINK)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS))
# what ends a call block, outside its <|"|> strings: its closer, or a marker that can only come after it
_BLOCK_ENDS = (CALL_CLOSE, CALL_OPEN, CHANNEL_OPEN, CHANNEL_CLOSE, TURN_OPEN, TURN_CLOSE, RESPONSE_OPEN)
_BLOCK_RE = re.compile("|".join(re.escape(m) for m in (QUOTE, *_BLOCK_ENDS)))
_BLOCK_END_RE = re.compile("|".join(re.escape(m) for m in _BLOCK_ENDS))
_CHANNEL_RE = re.compile(re.escape(CHANNEL_OPEN) + "|" + re.escape(CHANNEL_CLOSE))
_HEADERS = {CHANNEL_OPEN: "thought", TURN_OPEN: "model"}  # the name line after an opening marker
_LONGEST = max(map(len, (*_MARKERS, QUOTE)))
# a call written without its <|tool_call> opener, where a call may start (after <channel|>)
_HEADLESS = re.compile(r"\s*call:\s*" + NAME + r"\s*[{(]")
_HEADLESS_MAX = 256  # longer than any call head: past this it is not one


def _partial_marker(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of `text` that is the start of one of `markers`."""
    for k in range(min(len(text), _LONGEST - 1), 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


def _could_be_headless(text: str) -> bool:
    """Whether `text` may still grow into the head of a call written without its opener."""
    stripped = text.lstrip()
    if len(stripped) <= 5:
        return "call:".startswith(stripped)
    return len(text) < _HEADLESS_MAX and re.fullmatch(r"call:\s*(" + NAME + r"\s*)?", stripped) is not None


class Gemma4StreamParser:
    """Splits Gemma 4 output, fed in pieces, into content, reasoning and tool-call events.

    tools: the names a call may have (None: any name); a call to another stays content."""

    def __init__(self, tools: Collection[str] | None = None) -> None:
        self._tools = None if tools is None else frozenset(tools)
        self._mode = "content"  # or "reasoning", "call" (after <|tool_call>), "headless" (a call without it)
        self._buf = ""
        self._header = ""  # a name line (e.g. "thought") that may still follow an opening marker
        self._may_call = True  # a call may start here without its opener: the answer's start, after <channel|>
        self._scan, self._in_quote = 0, False  # how far a call block is read, and whether inside <|"|>…<|"|>
        self._events: list[StreamEvent] = []

    def feed(self, text: str) -> list[StreamEvent]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[StreamEvent]:
        return self._drain(final=True)

    # ---- the states ---------------------------------------------------------------------------
    def _emit(self, kind: str, text: str) -> None:
        if text:
            self._events.append(StreamEvent(kind, text))

    def _drain(self, final: bool) -> list[StreamEvent]:
        step = {"content": self._content, "reasoning": self._reasoning, "call": self._block,
                "headless": self._block}
        while self._strip_header(final) and step[self._mode](final):
            pass
        events, self._events = self._events, []
        return events

    def _strip_header(self, final: bool) -> bool:
        """Drops the name line after an opening marker (`thought\\n`); False while it is undecided."""
        if not self._header:
            return True
        header, buf = self._header, self._buf
        if not final and len(buf) <= len(header) and (header + "\n").startswith(buf):
            return False
        if buf.startswith(header):
            buf = buf[len(header):]
            buf = buf[1:] if buf.startswith("\n") else buf
        self._buf, self._header = buf, ""
        return True

    def _content(self, final: bool) -> bool:
        buf = self._buf
        if self._may_call:
            if _HEADLESS.match(buf):
                self._mode, self._scan, self._in_quote = "headless", 0, False
                return True
            if not final and _could_be_headless(buf):
                return False
            self._may_call = False
        match = _MARKER_RE.search(buf)
        if match is None:
            cut = len(buf) if final else len(buf) - _partial_marker(buf, _MARKERS)
            self._emit("content", buf[:cut])
            self._buf = buf[cut:]
            return False
        self._emit("content", buf[:match.start()])
        self._buf = buf[match.end():]
        self._marker(match[0])
        return True

    def _marker(self, marker: str) -> None:
        """A marker met in content or reasoning (it is dropped either way)."""
        if marker == CALL_OPEN:
            self._mode, self._scan, self._in_quote = "call", 0, False
        elif marker == CHANNEL_OPEN:
            self._mode = "reasoning"
        elif marker in (CHANNEL_CLOSE, TURN_CLOSE, RESPONSE_OPEN) and self._mode == "reasoning":
            self._mode = "content"  # the thought ends, as it does at the end of the turn
        self._header = _HEADERS.get(marker, "")
        if marker in (CHANNEL_CLOSE, TURN_OPEN):
            self._may_call = True

    def _reasoning(self, final: bool) -> bool:
        buf = self._buf
        match = _MARKER_RE.search(buf)
        if match is None:
            cut = len(buf) if final else len(buf) - _partial_marker(buf, _MARKERS)
            self._emit("reasoning", buf[:cut])
            self._buf = buf[cut:]
            return False
        self._emit("reasoning", buf[:match.start()])
        self._buf = buf[match.end():]
        self._marker(match[0])
        return True

    def _block(self, final: bool) -> bool:
        """A call block: read to its end (outside strings), then turned into calls or kept as text."""
        buf, pos, quoted = self._buf, self._scan, self._in_quote
        while True:
            if quoted:
                end = buf.find(QUOTE, pos)
                if end < 0:
                    break
                pos, quoted = end + len(QUOTE), False
                continue
            match = _BLOCK_RE.search(buf, pos)
            if match is None:
                break
            if match[0] == QUOTE:
                pos, quoted = match.end(), True
                continue
            self._end_block(buf[:match.start()], closed=match[0] == CALL_CLOSE)
            self._buf = buf[match.end():] if match[0] == CALL_CLOSE else buf[match.start():]
            return True
        if not final:  # wait; no end starts before this point, and an end that may be a marker's start is read again
            keep = len(QUOTE) - 1 if quoted else _LONGEST - 1
            self._scan, self._in_quote = max(pos, len(buf) - keep), quoted
            return False
        if quoted:  # a string never closed: the block ends at the first end marker, strings or not
            match = _BLOCK_END_RE.search(buf)
            if match is not None:
                self._end_block(buf[:match.start()], closed=match[0] == CALL_CLOSE)
                self._buf = buf[match.end():] if match[0] == CALL_CLOSE else buf[match.start():]
                return True
        self._end_block(buf, closed=False)
        self._buf = ""
        return False

    def _end_block(self, body: str, closed: bool) -> None:
        headless = self._mode == "headless"
        # kept as written, but for channel markers inside its strings: those never reach content
        raw = _CHANNEL_RE.sub("", ("" if headless else CALL_OPEN) + body + (CALL_CLOSE if closed else ""))
        self._mode, self._may_call, self._header = "content", True, ""
        calls = read_calls(body, bare_name=not headless)
        if calls is None:
            self._emit("content", raw)
            return
        declared = [self._tools is None or c.name in self._tools for c in calls]
        if not any(declared):
            self._emit("content", raw)
            return
        for call, ok in zip(calls, declared):
            if ok:
                self._events.append(StreamEvent("tool_call", tool_call=ToolCall(call.name, call.arguments)))
            else:
                self._emit("content", _CHANNEL_RE.sub("", call.text))


class PlainParser:
    """Output of a family without thought channels or tool calls: all of it is content."""

    def __init__(self, tools: Collection[str] | None = None) -> None:
        pass

    def feed(self, text: str) -> list[StreamEvent]:
        return [StreamEvent("content", text)] if text else []

    def finish(self) -> list[StreamEvent]:
        return []


def has_tool_format(family: str) -> bool:
    """Whether answers of this family can carry tool calls that output_parser() recognises."""
    return family == "gemma4"


def output_parser(family: str, *, tools: Collection[str] | None = None) -> Gemma4StreamParser | PlainParser:
    """A fresh streaming parser for one answer of a model of `family`. tools: the names of the tools the
    request declared (an empty collection: none, so every call stays text); None accepts any name."""
    return Gemma4StreamParser(tools) if has_tool_format(family) else PlainParser()


def collect(events: Iterable[StreamEvent]) -> ParsedOutput:
    """Events joined into one output: reasoning None when there was none."""
    events = list(events)
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    return ParsedOutput(content="".join(e.text for e in events if e.kind == "content"),
                        reasoning=reasoning or None,
                        tool_calls=[e.tool_call for e in events if e.kind == "tool_call"])


def parse_output(text: str, family: str, *, tools: Collection[str] | None = None) -> ParsedOutput:
    """A whole answer split into content, reasoning (None when there was none) and tool calls. Never
    raises: what does not parse stays content."""
    parser = output_parser(family, tools=tools)
    return collect(parser.feed(text) + parser.finish())


def parse_gemma4_output(text: str, *, tools: Collection[str] | None = None) -> ParsedOutput:
    """A whole Gemma 4 answer (decoded with its special tokens) split as parse_output does."""
    return parse_output(text, "gemma4", tools=tools)
