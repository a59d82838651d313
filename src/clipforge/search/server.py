"""The search service: a JSON API and one web page over an `Index` (FastAPI; run by uvicorn).

    app = create_app(Index.load("photos.index"))        # clipforge serve photos.index
    uvicorn.run(app, host="127.0.0.1", port=8000)

| route | what |
|---|---|
| ``GET /`` | the page: a search box, a grid of thumbnails with scores; click one to search by it |
| ``GET /search?q=TEXT&k=K`` | images closest to a text |
| ``POST /search/image?k=K`` | images closest to an uploaded image (multipart field ``file``) |
| ``GET /search/similar?id=ID&k=K`` | images closest to indexed image ``ID`` |
| ``GET /thumb/{id}`` | a JPEG thumbnail of indexed image ``id`` |
| ``GET /health`` | ``{"status": "ok", "images": N, ...}`` |
| ``GET /openapi.json`` | the OpenAPI schema |

Limits: a file is served only as ``/thumb/{id}`` of an indexed image — a path never comes from
the client, so there is nothing to traverse; request bodies over ``max_upload_bytes`` get 413
before they are read (by Content-Length) or as soon as they pass it (chunked); query strings
over `MAX_QUERY_STRING` bytes get 414; a query text over `MAX_QUERY_CHARS` characters, k outside
1..`MAX_K`, a malformed parameter or an unknown id get 4xx with a JSON ``detail``; an upload
that is not an image, or over `MAX_PIXELS` pixels, gets 400 or 413 without being decoded.
"""

from __future__ import annotations

import io
import json
import time
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipforge import __version__
from clipforge.data.images import READ_ERRORS
from clipforge.search.index import Hit, Index

__all__ = ["MAX_K", "MAX_PIXELS", "MAX_QUERY_CHARS", "MAX_QUERY_STRING", "create_app"]

MAX_K = 100
MAX_QUERY_CHARS = 500
MAX_QUERY_STRING = 4096
MAX_PIXELS = 40_000_000  # decoded RGB at this size is 120 MB; Pillow's own bomb limit is 89 M
THUMB_SIDE = 256
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
PAGE_CSP = "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"


class _Limits:
    """ASGI middleware: 414 for long query strings, 413 for large bodies, security headers on every response."""

    def __init__(self, app: Any, *, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def _reject(self, send: Any, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *SECURITY_HEADERS]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope.get("query_string", b"")) > MAX_QUERY_STRING:
            await self._reject(send, 414, f"query string over {MAX_QUERY_STRING} bytes")
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._reject(send, 413, f"request body over {self.max_body} bytes")
            return
        received = 0

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # a chunked body without Content-Length
                    raise StarletteHTTPException(413, f"request body over {self.max_body} bytes")
            return message

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


class _TooManyPixels(Exception):
    """An image whose header says it is over `MAX_PIXELS` pixels."""


def _read_rgb_capped(source: Any) -> Image.Image:
    """The image at ``source`` (a path or a file object) decoded in RGB, unless its header says
    it is over `MAX_PIXELS` pixels (_TooManyPixels, raised before decoding)."""
    with Image.open(source) as image:
        if image.width * image.height > MAX_PIXELS:
            raise _TooManyPixels(f"the image has {image.width}×{image.height} pixels, over {MAX_PIXELS}")
        return image.convert("RGB")


def _static(name: str) -> bytes:
    return resources.files("clipforge.search").joinpath("static", name).read_bytes()


def _hit_json(hit: Hit) -> dict[str, Any]:
    return {**hit.to_dict(), "score": round(hit.score, 6), "thumbnail": f"/thumb/{hit.id}"}


def create_app(index: Index, *, max_upload_bytes: int = 10 << 20) -> FastAPI:
    """The FastAPI application serving ``index`` (routes and limits in the module notes)."""
    app = FastAPI(title="clipforge search", version=__version__,
                  description=f"Search {len(index)} indexed images by text or by image.")
    app.add_middleware(_Limits, max_body=max_upload_bytes)
    K = Query(10, ge=1, le=MAX_K, description=f"number of results, 1..{MAX_K}")

    def results(query: dict[str, Any], k: int, search: Any) -> dict[str, Any]:
        start = time.perf_counter()
        hits = search()
        took = (time.perf_counter() - start) * 1e3
        return {"query": query, "k": k, "took_ms": round(took, 3), "results": [_hit_json(h) for h in hits]}

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": PAGE_CSP})

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response(_static("app.js"), media_type="text/javascript; charset=utf-8")

    @app.get("/style.css", include_in_schema=False)
    def style() -> Response:
        return Response(_static("style.css"), media_type="text/css; charset=utf-8")

    @app.get("/health", summary="Service status")
    def health() -> dict[str, Any]:
        info = index.info()
        return {"status": "ok", "images": info["images"], "dim": info["dim"],
                "index": info["index"]["spec"]["factory"], "version": __version__}

    @app.get("/search", summary="Images closest to a text")
    def search_text(q: str = Query(..., min_length=1, max_length=MAX_QUERY_CHARS, description="the text"),
                    k: int = K) -> dict[str, Any]:
        if not q.strip():
            raise HTTPException(400, "the query text is blank")
        return results({"text": q}, k, lambda: index.search_text(q, k))

    @app.get("/search/similar", summary="Images closest to an indexed image")
    def search_similar(id: int = Query(..., ge=0, description="an indexed image's id"), k: int = K) -> dict[str, Any]:
        if id >= len(index):
            raise HTTPException(404, f"no image {id}: the index holds ids 0..{len(index) - 1}")
        return results({"id": id}, k, lambda: index.search_similar(id, k))

    @app.post("/search/image", summary="Images closest to an uploaded image")
    def search_image(file: UploadFile = File(..., description=f"an image, at most {max_upload_bytes} bytes"),
                     k: int = K) -> dict[str, Any]:
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"the image is over {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, "the uploaded file is empty")
        try:
            picture = _read_rgb_capped(io.BytesIO(data))
        except _TooManyPixels as err:
            raise HTTPException(413, str(err)) from None
        except UnidentifiedImageError:
            raise HTTPException(400, "the uploaded file is not an image Pillow can read") from None
        except READ_ERRORS as err:
            raise HTTPException(400, f"the uploaded image is damaged: {err}") from None
        return results({"image": file.filename or "upload"}, k, lambda: index.search_image(picture, k))

    @lru_cache(maxsize=4096)
    def thumbnail(id: int) -> bytes | None:
        path = index.item(id)["path"]
        if path is None:
            return None
        try:
            picture = _read_rgb_capped(path)
        except (_TooManyPixels, *READ_ERRORS):
            return None
        picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        return out.getvalue()

    @app.get("/thumb/{id}", summary="Thumbnail of an indexed image", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such image or no file"}})
    def thumb(id: int) -> Response:
        if not 0 <= id < len(index):
            raise HTTPException(404, f"no image {id}: the index holds ids 0..{len(index) - 1}")
        data = thumbnail(id)
        if data is None:
            raise HTTPException(404, f"image {id} has no readable file")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    @app.exception_handler(ValueError)
    def bad_value(_: Any, err: ValueError) -> JSONResponse:  # a query the index refused
        return JSONResponse({"detail": str(err)}, status_code=400)

    return app
