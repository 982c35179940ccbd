"""A Responses-API response built from one answer: its output items (reasoning, message, function_call)
as they come, the server-sent events that announce them, and the response object at the end.

The events follow the sequence the openai SDK's `client.responses.stream()` consumes: response.created,
response.in_progress, then per item output_item.added, its parts and deltas, output_item.done, and
response.completed (response.incomplete when max_output_tokens cut the answer).
"""

from __future__ import annotations

import json
import time
import uuid

from ..chat import StreamEvent
from ..engine import RequestOutput
from .answer import Answer


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    def __init__(self, rid: str, echo: dict, answer: Answer, summary: bool):
        """echo: the request's settings that the response object repeats; summary: whether the
        reasoning item also carries the thoughts as its summary (reasoning.summary was asked for)."""
        self.id, self.echo, self.answer, self.summary = rid, echo, answer, summary
        self.created = int(time.time())
        self.seq = 0
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written: the last of self.items
        self.status = "in_progress"
        self.error: dict | None = None

    # ---- events -----------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    def opening(self) -> list[bytes]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def push(self, out: RequestOutput) -> list[bytes]:
        """The events one engine output adds; the closing ones with the last."""
        sent = []
        for event in self.answer.push(out):
            sent += self._add(event)
        if out.finished:
            sent += self._close_item()
            incomplete = self.answer.finish_reason == "length"
            self.status = "incomplete" if incomplete else "completed"
            sent.append(self._event("response.incomplete" if incomplete else "response.completed",
                                    response=self.response()))
        return sent

    def failed(self, message: str) -> list[bytes]:
        self.status = "failed"
        self.error = {"code": "server_error", "message": message}
        return [self._event("response.failed", response=self.response())]

    # ---- items ------------------------------------------------------------------------------
    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    def _open_item(self, item: dict) -> list[bytes]:
        sent = self._close_item()
        self.items.append(item)
        self.open = item
        return sent + [self._event("response.output_item.added", output_index=len(self.items) - 1,
                                   item={**item, "content": []} if "content" in item else item)]

    def _add(self, event: StreamEvent) -> list[bytes]:
        sent = []
        if event.kind == "tool_call":
            arguments = json.dumps(event.tool_call.arguments, ensure_ascii=False)
            sent += self._open_item({"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                                     "call_id": new_id("call"), "name": event.tool_call.name, "arguments": ""})
            self.open["arguments"] = arguments
            sent.append(self._event("response.function_call_arguments.delta", **self._where(), delta=arguments))
            return sent + self._close_item()
        if event.kind == "reasoning":
            if self.open is None or self.open["type"] != "reasoning":
                sent += self._open_item({"id": new_id("rs"), "type": "reasoning", "status": "in_progress",
                                         "summary": [], "content": [{"type": "reasoning_text", "text": ""}]})
                sent.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                        part={"type": "reasoning_text", "text": ""}))
                if self.summary:
                    self.open["summary"] = [{"type": "summary_text", "text": ""}]
                    sent.append(self._event("response.reasoning_summary_part.added", **self._where(),
                                            summary_index=0, part={"type": "summary_text", "text": ""}))
            self.open["content"][0]["text"] += event.text
            sent.append(self._event("response.reasoning_text.delta", **self._where(), content_index=0,
                                    delta=event.text))
            if self.summary:
                self.open["summary"][0]["text"] += event.text
                sent.append(self._event("response.reasoning_summary_text.delta", **self._where(), summary_index=0,
                                        delta=event.text))
            return sent
        if self.open is None or self.open["type"] != "message":
            sent += self._open_item({"id": new_id("msg"), "type": "message", "status": "in_progress",
                                     "role": "assistant",
                                     "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
            sent.append(self._event("response.content_part.added", **self._where(), content_index=0,
                                    part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        self.open["content"][0]["text"] += event.text
        sent.append(self._event("response.output_text.delta", **self._where(), content_index=0, delta=event.text,
                                logprobs=[]))
        return sent

    def _close_item(self) -> list[bytes]:
        item, sent = self.open, []
        if item is None:
            return sent
        where = self._where()
        # the item the answer was still writing when max_output_tokens cut it is incomplete
        last = self.answer.finish_reason == "length" and item is self.items[-1] and item["type"] != "function_call"
        item["status"] = "incomplete" if last else "completed"
        if item["type"] == "function_call":
            sent.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                    arguments=item["arguments"]))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            sent.append(self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            sent.append(self._event("response.content_part.done", **where, content_index=0, part=part))
            if self.summary:
                summary = item["summary"][0]
                sent.append(self._event("response.reasoning_summary_text.done", **where, summary_index=0,
                                        text=summary["text"]))
                sent.append(self._event("response.reasoning_summary_part.done", **where, summary_index=0,
                                        part=summary))
        else:
            part = item["content"][0]
            sent.append(self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                    logprobs=[]))
            sent.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        sent.append(self._event("response.output_item.done", output_index=where["output_index"], item=item))
        self.open = None
        return sent

    # ---- the response object ------------------------------------------------------------------
    def response(self) -> dict:
        answer = self.answer
        done = self.status in ("completed", "incomplete")
        usage = None
        if done:
            usage = {"input_tokens": answer.prompt_tokens,
                     "input_tokens_details": {"cached_tokens": answer.cached_tokens},
                     "output_tokens": answer.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
                     "total_tokens": answer.prompt_tokens + answer.completion_tokens}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": self.status,
                "completed_at": int(time.time()) if done else None, "error": self.error,
                "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
                "output": self.items if done or self.status == "failed" else [], "usage": usage, **self.echo}

    def history(self) -> dict:
        """The answer as one chat assistant message, for a later request's previous_response_id."""
        message: dict = {"role": "assistant", "content": None}
        text = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "message")
        reasoning = "".join(i["content"][0]["text"] for i in self.items if i["type"] == "reasoning")
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.items if i["type"] == "function_call"]
        if text or not calls:
            message["content"] = text
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return message
