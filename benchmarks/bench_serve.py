"""A load test of ``clipforge serve`` on 127.0.0.1, then hostile requests against the same server.

    python benchmarks/bench_serve.py                    # 2,000 requests at concurrency 8; a few minutes
    python benchmarks/bench_serve.py --requests 200     # a smoke run

Prints two tables and writes benchmarks/results/bench_serve.json.

The index: 2,000 ``shapes://`` images (64×64, written as PNG files) embedded by the ``tiny``
preset with random weights, saved as a checkpoint with a BPE trained on the captions (random
weights cost the same time as trained ones; ranking quality is not measured here).  The
server is the real thing: ``clipforge serve`` in its own process (uvicorn, one worker).

Load: 8 clients each send requests back to back until 2,000 are done, in a fixed shuffled mix:
60 % text searches (k = 24, 400 distinct texts), 20 % searches by an indexed image, 15 %
thumbnails, 5 % uploads of a PNG; latency is from sending the request to reading the whole
response.  Any status other than 200 or a transport error counts as an error.  Then 200 text
searches from one client alone, for the latency without queueing.

Hostile: path traversal written raw on the socket (no client-side normalisation), a query string
of 100 kB and one over the page's limit, a query text over 500 characters, k out of range or not a
number, an unknown id, a non-image upload, a 20 MB upload, a truncated PNG; each must get a 4xx,
and ``/health`` must still answer 200 after all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _timing import cpu_record  # benchmarks/_timing.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
TEMPLATES = ("a {c} {s}", "a picture of a {c} {s}", "there is a {c} {s}", "a small {c} {s} in the corner",
             "a big {c} {s}", "an image showing a {c} {s}", "{c}", "a {s}", "something {c}", "the {s} is {c}")


def make_index(root: Path, n: int) -> Path:
    """``n`` shapes images, the random-weight tiny preset saved with a caption BPE, and their index."""
    import torch

    from clipforge.checkpoints import save
    from clipforge.data.shapes import ShapesDataset
    from clipforge.model import CLIP, get_config
    from clipforge.search.build import build_index
    from clipforge.tokenizer import train_bpe

    data = ShapesDataset(split="val", size=64, n=n)
    images = root / "images"
    images.mkdir()
    captions = []
    for i in range(n):
        image, caption = data[i]
        image.save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(caption)
        captions.append(caption)
    config = get_config("tiny")
    tokenizer = train_bpe(captions, 1024, context_length=config.text.context_length)
    config = config.__class__.from_dict({**config.to_dict(), "text": {**config.to_dict()["text"],
                                                                      "vocab_size": tokenizer.vocab_size}})
    torch.manual_seed(0)
    save(CLIP(config), root / "model", tokenizer=tokenizer)
    build_index(f"pairs:{images}", root / "index", model=root / "model", progress=False, workers=0)
    return root / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(index), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"the server did not start: {process.stdout.read() if process.stdout else ''}")


def request_mix(n: int, images: int, png: bytes, seed: int = 0) -> list[tuple[str, dict]]:
    from clipforge.data.shapes import COLOURS, SHAPES

    rng = random.Random(seed)
    texts = sorted({t.format(c=c, s=s) for t in TEMPLATES for c in COLOURS for s in SHAPES})
    texts = rng.sample(texts, min(400, len(texts)))
    kinds = ["text"] * 60 + ["similar"] * 20 + ["thumb"] * 15 + ["upload"] * 5
    mix = []
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "text":
            mix.append(("text", {"method": "GET", "url": "/search", "params": {"q": rng.choice(texts), "k": 24}}))
        elif kind == "similar":
            mix.append(("similar", {"method": "GET", "url": "/search/similar",
                                    "params": {"id": rng.randrange(images), "k": 24}}))
        elif kind == "thumb":
            mix.append(("thumb", {"method": "GET", "url": f"/thumb/{rng.randrange(images)}"}))
        else:
            mix.append(("upload", {"method": "POST", "url": "/search/image", "params": {"k": 24},
                                   "files": {"file": ("q.png", png, "image/png")}}))
    return mix


async def load(base: str, mix: list[tuple[str, dict]], concurrency: int) -> list[tuple[str, float, int]]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for item in mix:
        queue.put_nowait(item)
    results: list[tuple[str, float, int]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            kind, request = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await client.request(**request)
                await response.aread()
                status = response.status_code
            except httpx.HTTPError:
                status = -1
            results.append((kind, (time.perf_counter() - start) * 1e3, status))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results


def raw_get(port: int, target: str) -> int:
    """Status of ``GET target`` written as-is on the socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else -1


def hostile(port: int, png: bytes) -> list[dict]:
    import httpx

    base = f"http://127.0.0.1:{port}"
    cases: list[tuple[str, object]] = [
        ("traversal /thumb/../../etc/passwd (raw)", lambda: raw_get(port, "/thumb/../../../../etc/passwd")),
        ("traversal /thumb/..%2F..%2Fetc%2Fpasswd (raw)", lambda: raw_get(port, "/thumb/..%2F..%2Fetc%2Fpasswd")),
        ("traversal /../../etc/passwd (raw)", lambda: raw_get(port, "/../../etc/passwd")),
        ("traversal /style.css/../../pyproject.toml (raw)", lambda: raw_get(port, "/style.css/../../pyproject.toml")),
        ("query string of 100 kB (raw)", lambda: raw_get(port, "/search?q=" + "a" * 100_000)),
        ("query string of 5 kB", lambda: httpx.get(f"{base}/search", params={"q": "a" * 5_000}).status_code),
        ("query text of 501 characters", lambda: httpx.get(f"{base}/search", params={"q": "a" * 501}).status_code),
        ("empty query", lambda: httpx.get(f"{base}/search", params={"q": ""}).status_code),
        ("k=0", lambda: httpx.get(f"{base}/search", params={"q": "red", "k": 0}).status_code),
        ("k=10**30", lambda: httpx.get(f"{base}/search", params={"q": "red", "k": 10**30}).status_code),
        ("k=abc", lambda: httpx.get(f"{base}/search", params={"q": "red", "k": "abc"}).status_code),
        ("id=-1", lambda: httpx.get(f"{base}/search/similar", params={"id": -1}).status_code),
        ("unknown id", lambda: httpx.get(f"{base}/thumb/123456789").status_code),
        (
            "upload: a shell script",
            lambda: (
                httpx.post(f"{base}/search/image", files={"file": ("x.sh", b"#!/bin/sh\n", "image/png")}).status_code
            ),
        ),
        (
            "upload: truncated PNG",
            lambda: httpx.post(f"{base}/search/image", files={"file": ("x.png", png[:200], "image/png")}).status_code,
        ),
        (
            "upload: 20 MB",
            lambda: (
                httpx.post(
                    f"{base}/search/image", files={"file": ("x.png", b"\0" * (20 << 20), "image/png")}
                ).status_code
            ),
        ),
        ("upload: no file field", lambda: httpx.post(f"{base}/search/image", data={"x": "1"}).status_code),
    ]
    rows = []
    for name, call in cases:
        try:
            status = call()  # type: ignore[operator]
        except (httpx.HTTPError, OSError) as err:
            status = f"transport error: {type(err).__name__}"
        rows.append({"case": name, "status": status, "ok": isinstance(status, int) and 400 <= status < 500})
    health = httpx.get(f"{base}/health").status_code
    rows.append({"case": "/health after all of the above", "status": health, "ok": health == 200})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=2_000, help="images in the index (default: 2,000)")
    parser.add_argument("--out", default=str(RESULTS / "bench_serve.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = make_index(Path(tmp), args.images)
        print(f"indexed {args.images} images in {time.perf_counter() - start:.1f}s", flush=True)
        png = (Path(tmp) / "images" / "00007.png").read_bytes()
        port = free_port()
        server = start_server(index, port)
        try:
            mix = request_mix(args.requests, args.images, png)
            asyncio.run(load(f"http://127.0.0.1:{port}", mix[: 8 * args.concurrency], args.concurrency))  # warm-up
            start = time.perf_counter()
            results = asyncio.run(load(f"http://127.0.0.1:{port}", mix, args.concurrency))
            wall = time.perf_counter() - start
            # One client, one request at a time: latency without queueing behind the others.
            serial = asyncio.run(load(f"http://127.0.0.1:{port}", [m for m in mix if m[0] == "text"][:200], 1))
            attacks = hostile(port, png)
        finally:
            server.terminate()
            server.wait(timeout=30)

    rows = []
    for kind in ("all", "text", "similar", "thumb", "upload"):
        chosen = [r for r in results if kind == "all" or r[0] == kind]
        times = np.array([t for _, t, _ in chosen])
        errors = sum(1 for _, _, status in chosen if status != 200)
        rows.append(
            {
                "requests": kind,
                "count": len(chosen),
                "errors": errors,
                "p50_ms": round(float(np.percentile(times, 50)), 2),
                "p99_ms": round(float(np.percentile(times, 99)), 2),
                "max_ms": round(float(times.max()), 2),
            }
        )
    serial_times = np.array([t for _, t, _ in serial])
    rows.append(
        {
            "requests": "text, one client alone",
            "count": len(serial),
            "errors": sum(1 for _, _, status in serial if status != 200),
            "p50_ms": round(float(np.percentile(serial_times, 50)), 2),
            "p99_ms": round(float(np.percentile(serial_times, 99)), 2),
            "max_ms": round(float(serial_times.max()), 2),
        }
    )
    print(
        f"\n{args.requests} requests at concurrency {args.concurrency} in {wall:.1f}s "
        f"({args.requests / wall:.0f} requests/s)"
    )
    print("| requests | count | errors | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['requests']} | {r['count']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['max_ms']:.1f} |"
        )
    print("\n| hostile request | status | 4xx (or 200 for health) |")
    print("|---|---|---|")
    for a in attacks:
        print(f"| {a['case']} | {a['status']} | {'yes' if a['ok'] else 'NO'} |")

    result = {
        "benchmark": "serve",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": cpu_record()},
        "setup": {
            "images": args.images,
            "model": "tiny preset, random weights",
            "requests": args.requests,
            "concurrency": args.concurrency,
            "wall_s": round(wall, 2),
            "requests_per_s": round(args.requests / wall, 1),
        },
        "latency": rows,
        "hostile": attacks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
