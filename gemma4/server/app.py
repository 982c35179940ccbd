"""The HTTP server: one engine behind OpenAI's chat completions and Responses APIs and Anthropic's
Messages API.

This module only assembles: the engine and its metrics, authentication, the error shapes, and each
API's routes (openai_chat, openai_responses, anthropic_messages), which all run on the same Backend.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from ..kv import PrefixStore
from ..speculative import PromptLookup
from . import anthropic_messages, openai_chat, openai_responses, tokens, webui
from .backend import Backend
from .errors import APIError, anthropic_error_body, error_body, validation_message
from .metrics import Metrics


def create_app(model, *, model_name: str, api_key: str | None = None, max_batch: int = 8,
               max_queue: int = 64, engine: Engine | None = None, allow_remote_images: bool = False,
               kv_budget: int | None = None, kv_cache: str = "float", prefix_cache_bytes: int = 0,
               speculative: int = 0, drafter=None, responses_kept: int = 256) -> FastAPI:
    """kv_budget: bytes of KV shared by running requests (None: unbounded); kv_cache: "float" or
    "int8"; prefix_cache_bytes: memory for automatic prefix reuse (0: off); speculative: tokens drafted
    per step at most (0: off), by `drafter` (default: prompt lookup); responses_kept: how many stored
    Responses-API responses are kept for previous_response_id (the oldest go first)."""
    if engine is None:
        store = PrefixStore(prefix_cache_bytes) if prefix_cache_bytes else None
        if speculative and drafter is None:
            drafter = PromptLookup()
        engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefix_store=store, kv_budget=kv_budget,
                        kv_dtype=kv_cache, speculative=speculative, drafter=drafter)
    metrics = Metrics(engine)
    backend = Backend(model, model_name, engine, metrics, allow_remote_images)

    async def lifespan(app):
        from ..structured import vocabulary_of

        # The grammar engine's view of the vocabulary takes a second or two to build: not on a request.
        await run_in_threadpool(vocabulary_of, model.tokenizer)
        if app.state.engine_thread:  # else serve() steps the engine on its own thread (Engine.run_here)
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gemma4", lifespan=lifespan)
    app.state.engine = engine
    app.state.engine_thread = True
    app.state.metrics = metrics

    # ---- errors: Anthropic's shape under /v1/messages, OpenAI's everywhere else ------------
    def error(request: Request, status: int, message: str, kind: str, param: str | None = None,
              code: str | None = None, headers: dict | None = None) -> JSONResponse:
        if anthropic_messages.owns(request.url.path):
            body = anthropic_error_body(status, message)
        else:
            body = error_body(message, kind, param, code)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return error(request, e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics.requests.labels(request.url.path, "400").inc()
        message, param = validation_message(e.errors())
        return error(request, 400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error(request, e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.requests.labels(request.url.path, "500").inc()
        return error(request, 500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # ---- auth: the key as OpenAI clients send it (Bearer) or as Anthropic's do (x-api-key) --
    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        bearer = request.headers.get("authorization", "")
        if bearer != f"Bearer {api_key}" and request.headers.get("x-api-key") != api_key:
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                           code="invalid_api_key")

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
        return {"object": "list", "data": [_model_card(backend)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model_card(name: str):
        backend.check_model(name)
        return _model_card(backend)

    guarded = [Depends(authorized)]
    app.include_router(openai_chat.router(backend, guarded))
    app.include_router(openai_responses.router(backend, guarded, responses_kept))
    app.include_router(anthropic_messages.router(backend, guarded))
    app.include_router(tokens.router(backend, guarded))
    webui.mount(app)  # the chat page at /, open without the key (it holds none)
    return app


_model_card = tokens.model_card
