"""One answer of the engine as the Responses and Messages APIs see it: the output parser's content,
reasoning and tool-call events as they come, with the counts and the reason it ended."""

from __future__ import annotations

from ..chat import CHANNEL_CLOSE, CHANNEL_OPEN, StreamEvent, output_parser
from ..engine import RequestOutput


class Answer:
    def __init__(self, model, prepared, index: int = 0):
        job = prepared.jobs[index]
        self.tokenizer = model.tokenizer
        self.stops = list(job.params.stop)
        self.prompt_tokens = len(job.prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.parser = output_parser(prepared.family, tools=prepared.tool_names)  # undeclared calls stay text
        self.events: list[StreamEvent] = []
        self.started = False  # whether an output has come (the prompt is prefilled)
        self._token_ids: list[int] = []
        self._shown: list[str] = []
        self._raw = ""  # the text while the thoughts may still be open, to count their tokens
        self._thought_from: int | None = None
        self._thought_done = False

    def push(self, out: RequestOutput) -> list[StreamEvent]:
        """The events this output adds."""
        before = self.completion_tokens
        self.started = True
        self.completion_tokens, self.cached_tokens = out.completion_tokens, out.cached_tokens
        if out.token_id is not None:
            self._token_ids.append(out.token_id)
        self._shown.append(out.text)
        self._count_thoughts(out.text, before)
        events = self.parser.feed(out.text)
        if out.finished:
            self.finish_reason = out.finish_reason
            events += self.parser.finish()
        self.events += events
        return events

    def _count_thoughts(self, text: str, before: int) -> None:
        """Tokens from the one that opens the thought channel to the one that closes it."""
        if self._thought_done:
            return
        self._raw += text
        start = self._raw.find(CHANNEL_OPEN)
        if start < 0:
            self._raw = self._raw[-len(CHANNEL_OPEN):]
            return
        if self._thought_from is None:
            self._thought_from = before
        self.reasoning_tokens = self.completion_tokens - self._thought_from
        self._thought_done = CHANNEL_CLOSE in self._raw[start:]

    # ---- the whole answer -------------------------------------------------------------------
    @property
    def content(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "content")

    @property
    def reasoning(self) -> str:
        return "".join(e.text for e in self.events if e.kind == "reasoning")

    @property
    def tool_calls(self) -> list:
        return [e.tool_call for e in self.events if e.kind == "tool_call"]

    def stop_sequence(self) -> str | None:
        """The stop string that ended the answer, if one did (the engine cuts it from the text)."""
        if self.finish_reason != "stop" or not self.stops:
            return None
        shown = len("".join(self._shown))
        full = self.tokenizer.decode(self._token_ids)
        hits = [(at, s) for s in self.stops if (at := full.find(s, max(0, shown - len(s) + 1))) >= 0]
        return min(hits)[1] if hits else None
