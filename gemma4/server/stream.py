"""One choice of a response, built from the engine's outputs: stream chunks as they come, and the whole
choice at the end. Chat choices split the text into content, reasoning and tool calls with the
model family's output parser."""

from __future__ import annotations

import json
import uuid

from ..chat import output_parser
from ..engine import RequestOutput, TokenLogprob


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class _Choice:
    def __init__(self, index: int, model, prepared):
        self.index = index
        self.tokenizer = model.tokenizer
        self.job = prepared.jobs[index]
        self.prompt_tokens = len(self.job.prompt_ids)
        self.counts_prompt = index % prepared.n == 0  # n answers to one prompt count it once
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _record(self, out: RequestOutput) -> None:
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason


class ChatChoiceState(_Choice):
    def __init__(self, index: int, model, prepared):
        super().__init__(index, model, prepared)
        self.parser = output_parser(prepared.family, tools=prepared.tool_names)
        self.tool_names = prepared.tool_names
        self.want_logprobs = prepared.logprobs
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.logprobs: list[dict] = []

    def opening_chunks(self) -> list[dict]:
        return [{"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def _logprob_entry(self, lp: TokenLogprob) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            text = self._token(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, p) for t, p in lp.top]}

    def push(self, out: RequestOutput) -> list[dict]:
        """The stream chunks (choice objects) this output adds."""
        self._record(out)
        events = self.parser.feed(out.text)
        if out.finished:
            events += self.parser.finish()
        deltas = []
        for e in events:
            if e.kind == "tool_call":
                call = {"id": _call_id(), "type": "function",
                        "function": {"name": e.tool_call.name,
                                     "arguments": json.dumps(e.tool_call.arguments, ensure_ascii=False)}}
                deltas.append({"tool_calls": [{"index": len(self.tool_calls), **call}]})
                self.tool_calls.append(call)
            elif e.kind == "reasoning":
                self.reasoning.append(e.text)
                deltas.append({"reasoning_content": e.text})
            else:
                self.content.append(e.text)
                deltas.append({"content": e.text})
        lp = None
        if self.want_logprobs and out.logprob is not None:
            entry = self._logprob_entry(out.logprob)
            self.logprobs.append(entry)
            lp = {"content": [entry]}
        chunks = [{"index": self.index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        if lp is not None:
            if chunks:
                chunks[0]["logprobs"] = lp
            else:
                chunks.append({"index": self.index, "delta": {}, "logprobs": lp, "finish_reason": None})
        if out.finished:
            chunks.append({"index": self.index, "delta": {}, "logprobs": None, "finish_reason": self.reason})
        return chunks

    @property
    def reason(self) -> str | None:
        called = any(c["function"]["name"] in self.tool_names for c in self.tool_calls)
        if called and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason

    def final_choice(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.content) if self.content or not self.tool_calls else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return {"index": self.index, "message": message,
                "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
                "finish_reason": self.reason}


class CompletionChoiceState(_Choice):
    def __init__(self, index: int, model, prepared):
        super().__init__(index, model, prepared)
        self.echo = prepared.echo
        self.want_logprobs = prepared.logprobs
        self.text: list[str] = [self.job.prompt_text] if self.echo else []
        self.offset = sum(map(len, self.text))
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def opening_chunks(self) -> list[dict]:
        if not self.echo:
            return []
        return [{"index": self.index, "text": self.job.prompt_text, "logprobs": None, "finish_reason": None}]

    def _add_logprob(self, lp: TokenLogprob) -> dict:
        token = self._token(lp.token_id)
        part = {"tokens": [token], "token_logprobs": [lp.logprob],
                "top_logprobs": [{self._token(t): p for t, p in lp.top}], "text_offset": [self.offset]}
        for key, value in part.items():
            self.lp[key].extend(value)
        return part

    def push(self, out: RequestOutput) -> list[dict]:
        self._record(out)
        lp = self._add_logprob(out.logprob) if self.want_logprobs and out.logprob is not None else None
        self.text.append(out.text)
        self.offset += len(out.text)
        if not out.text and lp is None and not out.finished:
            return []
        return [{"index": self.index, "text": out.text, "logprobs": lp,
                 "finish_reason": self.finish_reason if out.finished else None}]

    def final_choice(self) -> dict:
        return {"index": self.index, "text": "".join(self.text),
                "logprobs": self.lp if self.want_logprobs else None, "finish_reason": self.finish_reason}
