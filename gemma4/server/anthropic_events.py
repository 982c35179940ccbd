"""A Messages-API message built from one answer: its content blocks (thinking, text, tool_use) as they
come, the server-sent events that announce them, and the message object at the end.

The events follow the sequence the anthropic SDK's `client.messages.stream()` consumes: message_start,
then per block content_block_start, its deltas and content_block_stop, then message_delta (stop reason
and usage) and message_stop. Each event is named on its `event:` line, which the SDK reads.
"""

from __future__ import annotations

import json
import uuid

from ..chat import StreamEvent
from ..engine import RequestOutput
from .answer import Answer
from .errors import anthropic_error_body


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _event(kind: str, payload: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n".encode()


class MessageBuilder:
    def __init__(self, mid: str, model_name: str, answer: Answer):
        self.id, self.model_name, self.answer = mid, model_name, answer
        self.blocks: list[dict] = []
        self.open = False  # whether the last block is still being written

    # ---- events -----------------------------------------------------------------------------
    def push(self, out: RequestOutput) -> list[bytes]:
        """The events one engine output adds: message_start with the first (whose usage knows the
        prompt tokens reused from the prefix store), the closing ones with the last."""
        first = not self.answer.started
        sent = []
        for event in self.answer.push(out):
            sent += self._add(event)
        if first:
            start = {"message": {**self._message(), "content": [], "stop_reason": None, "stop_sequence": None}}
            sent = [_event("message_start", start), _event("ping", {})] + sent
        if out.finished:
            sent += self._close_block()
            stop_reason, stop_sequence = self.stop()
            sent.append(_event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                                 "usage": self.usage()}))
            sent.append(_event("message_stop", {}))
        return sent

    @staticmethod
    def failed(message: str) -> list[bytes]:
        body = anthropic_error_body(500, message)
        return [f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode()]

    def _add(self, event: StreamEvent) -> list[bytes]:
        sent = []
        kind = {"content": "text", "reasoning": "thinking", "tool_call": "tool_use"}[event.kind]
        if kind == "tool_use" or not self.open or self.blocks[-1]["type"] != kind:
            sent += self._close_block()
            block = {"text": {"type": "text", "text": ""},
                     "thinking": {"type": "thinking", "thinking": "", "signature": ""},
                     "tool_use": {"type": "tool_use", "id": new_id("toolu"),
                                  "name": event.tool_call.name if event.tool_call else "", "input": {}}}[kind]
            self.blocks.append(block)
            self.open = True
            sent.append(_event("content_block_start", {"index": len(self.blocks) - 1, "content_block": dict(block)}))
        block, index = self.blocks[-1], len(self.blocks) - 1
        if kind == "tool_use":
            block["input"] = event.tool_call.arguments
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        elif kind == "thinking":
            block["thinking"] += event.text
            delta = {"type": "thinking_delta", "thinking": event.text}
        else:
            block["text"] += event.text
            delta = {"type": "text_delta", "text": event.text}
        sent.append(_event("content_block_delta", {"index": index, "delta": delta}))
        if kind == "tool_use":
            sent += self._close_block()
        return sent

    def _close_block(self) -> list[bytes]:
        if not self.open:
            return []
        self.open = False
        return [_event("content_block_stop", {"index": len(self.blocks) - 1})]

    # ---- the message object -------------------------------------------------------------------
    def stop(self) -> tuple[str | None, str | None]:
        answer = self.answer
        if answer.finish_reason == "length":
            return "max_tokens", None
        if any(b["type"] == "tool_use" for b in self.blocks):
            return "tool_use", None
        sequence = answer.stop_sequence()
        return ("stop_sequence", sequence) if sequence is not None else ("end_turn", None)

    def usage(self) -> dict:
        """Anthropic counts prompt tokens read from a cache apart from input_tokens."""
        answer = self.answer
        return {"input_tokens": answer.prompt_tokens - answer.cached_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": answer.cached_tokens, "output_tokens": answer.completion_tokens}

    def _message(self) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name,
                "content": self.blocks, "usage": self.usage()}

    def message(self) -> dict:
        stop_reason, stop_sequence = self.stop()
        return {**self._message(), "stop_reason": stop_reason, "stop_sequence": stop_sequence}
