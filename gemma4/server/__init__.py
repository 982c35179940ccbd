"""The OpenAI-compatible HTTP server (FastAPI on uvicorn)."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(model, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, max_queue: int = 64, allow_remote_images: bool = False, log_level: str = "info",
          **engine) -> None:
    """engine: create_app's kv_budget, kv_cache, prefix_cache_bytes, speculative, drafter."""
    import uvicorn

    from .malloc import cap_arenas

    cap_arenas()
    app = create_app(model, model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     allow_remote_images=allow_remote_images, **engine)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
