"""The OpenAI-compatible HTTP server (FastAPI on uvicorn)."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(model, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, allow_remote_images: bool = False, log_level: str = "info",
          **engine) -> None:
    """engine: create_app's kv_budget, kv_cache, prefix_cache_bytes, speculative, drafter.

    The HTTP server runs on a thread of its own and the engine steps on this one, which loaded the model
    (Engine.run_here says why); SIGINT and SIGTERM shut the server down, which stops the engine."""
    import signal
    import threading

    import uvicorn

    from .malloc import cap_arenas

    cap_arenas()
    app = create_app(model, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     allow_remote_images=allow_remote_images, **engine)
    app.state.engine_thread = False
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def shut_down(*_) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, shut_down)
    def run_http() -> None:
        try:
            server.run()
        finally:  # shut down, or failed to start (a port in use): the engine stops with it
            app.state.engine.stop()

    http = threading.Thread(target=run_http, name="gemma4-http", daemon=True)
    http.start()
    app.state.engine.run_here()  # until the server's shutdown stops it
    http.join()
    if not server.started:
        raise SystemExit(1)  # uvicorn has said why (as uvicorn.run exits 1 then)
