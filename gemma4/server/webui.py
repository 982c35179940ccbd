"""The chat page at / : static files shipped in the package, no build step. It holds no secret, so it is
served without the API key; the page asks for the key when the API refuses it."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Only the page's own files and the server's own API: a model's answer can carry no script or remote fetch in.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
