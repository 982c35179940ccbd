"""OpenAI's chat completions and (legacy) completions: POST /v1/chat/completions and /v1/completions."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .backend import Backend, Outputs
from .prepare import prepare_chat, prepare_completion
from .schema import ChatCompletionRequest, CompletionRequest
from .stream import ChatChoiceState, CompletionChoiceState


def router(backend: Backend, dependencies: list) -> APIRouter:
    api = APIRouter(dependencies=dependencies)
    model = backend.model

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        backend.check_model(body.model)
        prepared = await run_in_threadpool(prepare_chat, model, body, backend.allow_remote_images)
        states = [ChatChoiceState(i, model, prepared) for i in range(body.n)]
        return await _respond(request, prepared, states, body.stream, "chat.completion", body)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        backend.check_model(body.model)
        prepared = await run_in_threadpool(prepare_completion, model, body)
        states = [CompletionChoiceState(i, model, prepared) for i in range(len(prepared.jobs))]
        return await _respond(request, prepared, states, body.stream, "text_completion", body)

    async def _respond(request: Request, prepared, states: list, stream: bool, kind: str, body):
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        outputs = backend.submit(prepared)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if stream:
            return backend.stream(request.url.path, _sse(rid, kind, states, outputs, include_usage), outputs)
        if not await backend.collect(request, outputs, lambda index, out: states[index].push(out)):
            return Response(status_code=499)
        backend.answered(request.url.path)
        return {"id": rid, "object": kind, "created": int(time.time()), "model": backend.model_name,
                "choices": [s.final_choice() for s in states], "usage": _usage(states)}

    async def _sse(rid: str, kind: str, states: list, outputs: Outputs, include_usage: bool) -> AsyncIterator[bytes]:
        now = int(time.time())
        name = backend.model_name
        for state in states:
            for chunk in state.opening_chunks():
                yield _event(_chunk(rid, kind, now, name, [chunk]))
        async for batch in outputs.batches():  # what one engine step produced: one write
            events = [_event(_chunk(rid, kind, now, name, [chunk])) for index, out in batch
                      for chunk in states[index].push(out)]
            if events:
                yield b"".join(events)
        if include_usage:
            yield _event({**_chunk(rid, kind, now, name, []), "usage": _usage(states)})
        yield b"data: [DONE]\n\n"

    return api


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _chunk(rid: str, kind: str, created: int, model_name: str, choices: list) -> dict:
    obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices}


def _usage(states: list) -> dict:
    prompt = sum(s.prompt_tokens for s in states if s.counts_prompt)
    completion = sum(s.completion_tokens for s in states)
    cached = sum(s.cached_tokens for s in states if s.counts_prompt)  # prefix reuse, as OpenAI and vLLM report it
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
