"""The OpenAI-compatible HTTP API: requests in, engine requests out, JSON or server-sent events back.

The routes know the OpenAI schema and nothing of tensors: a request becomes prompt ids and sampling
parameters (prepare.py), goes to the engine, and its outputs come back on an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..kv import PrefixStore
from ..speculative import PromptLookup
from ..engine import Engine, QueueFull, Request as EngineRequest, RequestOutput, TooLarge
from .errors import APIError, error_body, validation_message
from .metrics import Metrics
from .prepare import Prepared, prepare_chat, prepare_completion
from .schema import ChatCompletionRequest, CompletionRequest
from .stream import ChatChoiceState, CompletionChoiceState

RETRY_AFTER_S = 2


def create_app(model, *, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, engine: Engine | None = None, allow_remote_images: bool = False,
               kv_budget: int | None = None, kv_cache: str = "float", prefix_cache_bytes: int = 0,
               speculative: int = 0, drafter=None) -> FastAPI:
    """kv_budget: bytes of KV shared by running requests (None: unbounded); kv_cache: "float" or
    "int8"; prefix_cache_bytes: memory for automatic prefix reuse (0: off); speculative: tokens drafted
    per step at most (0: off), by `drafter` (default: prompt lookup)."""
    if engine is None:
        store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes else None
        if speculative and drafter is None:
            drafter = PromptLookup()
        engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefix_store=store, kv_budget=kv_budget,
                        kv_dtype=kv_cache, speculative=speculative, drafter=drafter)
    metrics = Metrics(engine)
    created = int(time.time())

    async def lifespan(app):
        from ..structured import vocabulary_of

        # The grammar engine's view of the vocabulary takes a second or two to build: not on a request.
        await run_in_threadpool(vocabulary_of, model.tokenizer)
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gemma4", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    # ---- errors: always the OpenAI error object --------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics.requests.labels(request.url.path, "400").inc()
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    # ---- auth and model name ---------------------------------------------------------------
    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           "not_found_error", "model", "model_not_found")

    # ---- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created, model)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model_card(name: str):
        check_model(name)
        return _model_card(model_name, created, model)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        prepared = await run_in_threadpool(prepare_chat, model, body, allow_remote_images)
        states = [ChatChoiceState(i, model, prepared) for i in range(body.n)]
        return await _respond(request, prepared, states, body.stream, "chat.completion", body)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prepared = await run_in_threadpool(prepare_completion, model, body)
        states = [CompletionChoiceState(i, model, prepared) for i in range(len(prepared.jobs))]
        return await _respond(request, prepared, states, body.stream, "text_completion", body)

    # ---- running requests ------------------------------------------------------------------
    async def _respond(request: Request, prepared: Prepared, states: list, stream: bool, kind: str, body):
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        outputs = _submit(prepared)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if stream:
            return StreamingResponse(_sse(rid, kind, states, outputs, include_usage, request.url.path),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            collect = asyncio.ensure_future(_drain(states, outputs))
            while not collect.done():
                await asyncio.wait({collect}, timeout=0.5)
                if not collect.done() and await request.is_disconnected():
                    collect.cancel()
                    return Response(status_code=499)
            collect.result()
        finally:
            outputs.cancel()
        metrics.requests.labels(request.url.path, "200").inc()
        return _final_body(rid, kind, states, created=int(time.time()))

    def _submit(prepared: Prepared) -> "_Outputs":
        """Hands the jobs to the engine. An APIError raised here is counted in the metrics by its handler."""
        if engine.error is not None:
            raise APIError(503, "the engine failed; restart the server", "server_error")
        if engine.queue_depth + len(prepared.jobs) > engine.max_queue:
            raise _busy()
        outputs = _Outputs(engine, metrics)
        for i, job in enumerate(prepared.jobs):
            req = EngineRequest(job.prompt_ids, job.params, outputs.emitter(i), logprobs=job.logprobs,
                                constraint=job.constraint, soft=job.soft)
            try:
                engine.submit(req)
            except TooLarge as e:
                outputs.cancel()
                raise APIError(400, str(e), code="context_length_exceeded") from None
            except QueueFull:
                outputs.cancel()
                raise _busy() from None
            outputs.requests.append(req)
            metrics.prompt_tokens.inc(len(job.prompt_ids))
        return outputs

    async def _drain(states: list, outputs: "_Outputs") -> None:
        async for index, out in outputs:
            states[index].push(out)

    async def _sse(rid: str, kind: str, states: list, outputs: "_Outputs", include_usage: bool,
                   path: str) -> AsyncIterator[bytes]:
        now = int(time.time())
        try:
            for state in states:
                for chunk in state.opening_chunks():
                    yield _event(_chunk(rid, kind, now, model_name, [chunk]))
            async for index, out in outputs:
                for chunk in states[index].push(out):
                    yield _event(_chunk(rid, kind, now, model_name, [chunk]))
            if include_usage:
                yield _event({**_chunk(rid, kind, now, model_name, []), "usage": _usage(states)})
            yield b"data: [DONE]\n\n"
            metrics.requests.labels(path, "200").inc()
        finally:
            outputs.cancel()  # a client that went away frees its rows

    def _final_body(rid: str, kind: str, states: list, created: int) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": model_name,
                "choices": [s.final_choice() for s in states], "usage": _usage(states)}

    return app


class _Outputs:
    """The outputs of one HTTP request's engine requests, as an async iterator of (index, output)."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[EngineRequest] = []
        self.started = time.monotonic()
        self.first_seen: set[int] = set()
        self.open = 0

    def emitter(self, index: int):
        self.open += 1

        def emit(out: RequestOutput) -> None:  # on the engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        return emit

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while self.open:
            index, out = await self.queue.get()
            if index not in self.first_seen:
                self.first_seen.add(index)
                self.metrics.ttft.observe(time.monotonic() - self.started)
            if out.token_id is not None:
                self.metrics.generated_tokens.inc()
            if out.finished:
                self.open -= 1
            if out.finish_reason == "error":
                raise APIError(500, "the engine failed while generating", "server_error")
            yield index, out

    def cancel(self) -> None:
        for r in self.requests:
            self.engine.cancel(r)


def _busy() -> APIError:
    return APIError(503, "the server is busy: too many requests waiting; retry later", "server_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


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


def _model_card(name: str, created: int, model) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "gemma4",
            "max_model_len": model.config.max_position_embeddings}
