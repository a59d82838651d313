"""The search service through FastAPI's TestClient: the JSON API, the page, thumbnails, the
OpenAPI schema, and hostile input — path traversal, huge queries, non-image and oversized
uploads, malformed parameters — each answered with a 4xx while the service keeps serving.

A real server in a real browser is tested in tests/test_search_browser.py (``make test-slow``).
"""

from __future__ import annotations

import io

import pytest

from _search_helpers import collection

pytest.importorskip("fastapi")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from clipforge.search.build import build_index  # noqa: E402
from clipforge.search.index import Index  # noqa: E402
from clipforge.search.server import MAX_QUERY_CHARS, MAX_QUERY_STRING, create_app  # noqa: E402

MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    c = collection(tmp_path_factory)
    out = tmp_path_factory.mktemp("served") / "index"
    build_index(f"pairs:{c.images}", out, model=c.model, progress=False)
    index = Index.load(out)
    with TestClient(create_app(index, max_upload_bytes=MAX_UPLOAD)) as client:
        yield {"client": client, "index": index, "c": c}


def png_bytes(path) -> bytes:
    return path.read_bytes()


def test_health_and_schema(service):
    client = service["client"]
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["images"] == len(service["index"])
    schema = client.get("/openapi.json").json()
    assert {"/search", "/search/image", "/search/similar", "/thumb/{id}", "/health"} <= set(schema["paths"])
    assert schema["paths"]["/search"]["get"]["parameters"][0]["schema"]["maxLength"] == MAX_QUERY_CHARS


def test_text_search_ranks_the_colour_first(service):
    response = service["client"].get("/search", params={"q": "a green circle", "k": 6})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == {"text": "a green circle"} and body["k"] == 6 and body["took_ms"] >= 0
    assert [r["caption"].split()[1] for r in body["results"]] == ["green"] * 6
    first = body["results"][0]
    assert first["thumbnail"] == f"/thumb/{first['id']}" and set(first) >= {"id", "score", "path", "caption", "key"}
    assert response.headers["x-content-type-options"] == "nosniff"


def test_search_by_upload_and_by_id_find_the_image_itself(service):
    client, c = service["client"], service["c"]
    path = c.images / "00077.png"
    response = client.post("/search/image", params={"k": 3}, files={"file": ("q.png", png_bytes(path), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"] == {"image": "q.png"} and body["results"][0]["path"] == str(path)
    first = body["results"][0]["id"]
    similar = client.get("/search/similar", params={"id": first, "k": 2}).json()
    assert similar["results"][0]["id"] == first


def test_thumbnails_and_page(service):
    client = service["client"]
    thumb = client.get("/thumb/0")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)  # never larger than the image
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/app.js").status_code == 200 and client.get("/style.css").status_code == 200


def big_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, "PNG")
    return out.getvalue()


HOSTILE_GETS = [
    ("/thumb/../../../../etc/passwd", 404),
    ("/thumb/..%2F..%2F..%2Fetc%2Fpasswd", 404),
    ("/thumb/%2e%2e", 422),
    ("/thumb//etc/passwd", 404),
    ("/thumb/-1", 404),
    ("/thumb/99999999", 404),
    ("/thumb/1e3", 422),
    ("/thumb/0x10", 422),
    ("/static/../../pyproject.toml", 404),
    ("/../pyproject.toml", 404),
    ("/search", 422),
    ("/search?q=", 422),
    ("/search?q=%20%20", 400),
    ("/search?q=" + "a" * (MAX_QUERY_CHARS + 1), 422),
    ("/search?q=" + "a" * (MAX_QUERY_STRING + 10), 414),
    ("/search?q=red&k=0", 422),
    ("/search?q=red&k=101", 422),
    ("/search?q=red&k=ten", 422),
    ("/search?q=red&k=1.5", 422),
    ("/search?q=red&k=99999999999999999999999", 422),
    ("/search?q=%00%ff%fe", 200),
    ("/search?q=<script>alert(1)</script>", 200),
    ("/search/similar?id=-3", 422),
    ("/search/similar?id=720000", 404),
    ("/search/similar?id=abc", 422),
    ("/nope", 404),
]


@pytest.mark.parametrize("url,status", HOSTILE_GETS, ids=[u[:40] for u, _ in HOSTILE_GETS])
def test_hostile_requests_get_4xx(service, url, status):
    client = service["client"]
    response = client.get(url)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    if status >= 400:
        assert response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_hostile_uploads_get_4xx(service):
    client = service["client"]

    def upload(data: bytes, **kwargs):
        return client.post("/search/image", files={"file": ("x", data, "application/octet-stream")}, **kwargs)

    assert upload(b"GIF89a definitely not").status_code == 400
    assert "not an image" in upload(b"#!/bin/sh\nrm -rf /\n").json()["detail"]
    assert upload(b"").status_code == 400
    png = big_png(8)
    assert upload(png[: len(png) // 2]).status_code == 400  # truncated
    assert upload(b"\0" * (MAX_UPLOAD + 1)).status_code == 413
    assert client.post("/search/image").status_code == 422  # no file field
    assert client.post("/search/image", content=b"x", headers={"content-type": "text/plain"}).status_code == 422
    assert client.post("/search/image", content=b"x", headers={"content-length": "x1"}).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"\0" * 8192

    chunked = client.post("/search/image", content=chunks(),
                          headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413
    assert client.get("/search", params={"q": "still serving"}).status_code == 200


def test_decompression_bombs_are_refused_before_decoding(service, monkeypatch):
    import clipforge.search.server as server

    monkeypatch.setattr(server, "MAX_PIXELS", 100)
    response = service["client"].post("/search/image", files={"file": ("big.png", big_png(11), "image/png")})
    assert response.status_code == 413 and "pixels" in response.json()["detail"]
