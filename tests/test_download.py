"""Tests for clipforge.checkpoints.download and loading by name, without the internet.

Plain addresses are served by an HTTP server on 127.0.0.1 that each test starts (good, corrupt
and truncated files, and a port nothing listens on).  Hub names are read from a Hugging Face
cache that the tests lay out in tmp_path as huggingface_hub writes it (``models--ORG--NAME/``
with ``blobs/``, ``snapshots/COMMIT/`` and ``refs/BRANCH``), with ``HF_HUB_OFFLINE`` set; the
Hub's error answers come from a loopback server that answers as the Hub does (``X-Error-Code``).
Nothing here reaches beyond this machine.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipforge.checkpoints import CheckpointError, convert, load, load_model, registry, save
from clipforge.checkpoints import download as dl
from clipforge.checkpoints.download import DownloadError, download_url, fetch_repo
from clipforge.checkpoints.names import to_openclip
from clipforge.checkpoints.registry import Preprocessing, Pretrained
from clipforge.model import CLIP, get_config
from clipforge.tokenizer import train_bpe

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


# ----------------------------------------------------------------------------- a loopback server


class Server:
    """An HTTP server on 127.0.0.1 serving ``routes``: path -> (status, headers, body, declared
    length or None); ``requests`` records each method and path asked for."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes, int | None]] = {}
        self.requests: list[tuple[str, str]] = []
        self.slow = False  # each body sent in pieces, with pauses: downloads that overlap
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body_wanted: bool) -> None:
                server.requests.append((self.command, self.path))
                status, headers, body, declared = server.routes.get(self.path, (404, {}, b"not found", None))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(declared if declared is not None else len(body)))
                self.end_headers()
                if body_wanted:
                    pieces = 8 if server.slow else 1
                    for i in range(pieces):
                        if server.slow:
                            time.sleep(0.02)
                        self.wfile.write(body[i * len(body) // pieces:(i + 1) * len(body) // pieces])
                self.close_connection = True  # a declared length above the body: the client sees the end

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer(False)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    running = Server()
    yield running
    running.close()


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """huggingface_hub's endpoint (HF_ENDPOINT, read when it is imported) moved to ``url``."""
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", url)
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub at a loopback port nothing listens on, unless a test points it at its server."""
    point_hub_at(monkeypatch, "http://127.0.0.1:9")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """clipforge's download cache in tmp_path; the Hub offline, with an empty cache of its own."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "clipforge-cache"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads from plain addresses allowed (they only ever go to the loopback server here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != ".locks") if folder.exists() else []


# ----------------------------------------------------------------------------- plain addresses


def test_a_good_file_is_checked_cached_and_never_fetched_again(server, cache, online):
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    server.routes["/w/model.bin"] = (200, {}, data, None)
    path = download_url(f"{server.url}/w/model.bin", sha256=sha(data), progress=False)
    assert path == cache / "model.bin" and path.read_bytes() == data
    assert leftovers(cache) == ["model.bin", "model.bin.sha256"]  # no temporary file left behind
    assert download_url(f"{server.url}/w/model.bin", sha256=sha(data), progress=False) == path
    assert server.requests == [("GET", "/w/model.bin")]  # the second call asked nothing


def test_the_8_digit_prefix_of_openclips_release_names_is_checked(server, cache, online):
    data = b"weights" * 100
    server.routes["/x.pt"] = (200, {}, data, None)
    assert download_url(f"{server.url}/x.pt", sha256=sha(data)[:8], progress=False).read_bytes() == data


def test_a_cached_file_is_hashed_once(server, cache, online, monkeypatch):
    data = b"placed by hand" * 1000
    cache.mkdir(parents=True)
    (cache / "hand.pt").write_bytes(data)  # put there by hand, as the no-network message says
    assert download_url(f"{server.url}/hand.pt", sha256=sha(data), progress=False).read_bytes() == data
    assert server.requests == [] and (cache / "hand.pt.sha256").read_text().split() == [sha(data), str(len(data))]

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(dl, "_sha256_of", no_hashing)
    download_url(f"{server.url}/hand.pt", sha256=sha(data), progress=False)


def test_a_bad_cached_file_is_replaced(server, cache, online):
    good = b"the right bytes" * 10
    cache.mkdir(parents=True)
    (cache / "w.pt").write_bytes(b"something else")
    server.routes["/w.pt"] = (200, {}, good, None)
    assert download_url(f"{server.url}/w.pt", sha256=sha(good), progress=False).read_bytes() == good
    assert server.requests == [("GET", "/w.pt")]


def test_a_checksum_mismatch_removes_the_download(server, cache, online):
    server.routes["/bad.pt"] = (200, {}, b"corrupted bytes", None)
    with pytest.raises(DownloadError) as err:
        download_url(f"{server.url}/bad.pt", sha256=sha(b"expected bytes"), progress=False)
    message = str(err.value)
    assert "checksum mismatch" in message and sha(b"corrupted bytes") in message and "removed" in message
    assert "\n" not in message and leftovers(cache) == []


def test_a_hand_placed_file_with_the_wrong_checksum_is_named_and_removed(server, cache, online, monkeypatch):
    """Not "put it at PATH" where it already was: the mismatch, then why no fresh copy came."""
    cache.mkdir(parents=True)
    placed = cache / "w.pt"
    for offline, tail in ((True, "removed (HF_HUB_OFFLINE is set: not downloaded again"),
                          (False, "removed, and downloading it again failed: cannot download")):
        placed.write_bytes(b"something else")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
        with pytest.raises(DownloadError) as err:
            download_url(f"{server.url}/w.pt", sha256=sha(b"the right bytes"), progress=False)
        message = str(err.value)
        assert message.startswith(f"checksum mismatch for {placed}: SHA-256 {sha(b'something else')}, expected "
                                  f"{sha(b'the right bytes')}; {tail}"), message
        assert "put it at" not in message.split("failed:")[0] and "\n" not in message and not placed.exists()


def test_threads_loading_one_file_download_it_once(server, cache, online):
    """A lock per file: one download however many threads ask, and a corrupt cached file that
    one thread removes is not an error for the others."""
    from concurrent.futures import ThreadPoolExecutor

    data = os.urandom(256 * 1024)
    server.routes["/w.bin"] = (200, {}, data, None)
    server.slow = True
    url = f"{server.url}/w.bin"

    def load_all() -> list[Path]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: download_url(url, sha256=sha(data), progress=False), range(4)))

    assert load_all() == [cache / "w.bin"] * 4 and server.requests == [("GET", "/w.bin")]
    with (cache / "w.bin").open("r+b") as f:
        f.write(b"XXXX")
    (cache / "w.bin.sha256").unlink()
    server.requests.clear()
    assert load_all() == [cache / "w.bin"] * 4 and server.requests == [("GET", "/w.bin")]
    assert (cache / "w.bin").read_bytes() == data and leftovers(cache) == ["w.bin", "w.bin.sha256"]


def test_a_truncated_download_is_refused(server, cache, online):
    server.routes["/cut.pt"] = (200, {}, b"x" * 1000, 5000)  # announces 5000 bytes, sends 1000, closes
    with pytest.raises(DownloadError, match=r"truncated download of .*/cut.pt: 1,000 of the 5,000 bytes") as err:
        download_url(f"{server.url}/cut.pt", progress=False)
    assert "\n" not in str(err.value) and leftovers(cache) == []


def test_an_http_error_names_the_status(server, cache, online):
    with pytest.raises(DownloadError, match=r"cannot download .*/missing.pt: the server answered HTTP 404"):
        download_url(f"{server.url}/missing.pt", progress=False)


def test_no_network_names_the_file_and_where_to_put_it(server, cache, online):
    url = f"{server.url}/RN50.pt"
    server.close()  # nothing listens on the port any more
    with pytest.raises(DownloadError) as err:
        download_url(url, sha256="ab" * 32, progress=False)
    message = str(err.value)
    assert f"cannot download {url}" in message and f"put it at {cache / 'RN50.pt'}" in message
    assert "ab" * 32 in message and "\n" not in message


def test_offline_mode_fetches_no_address(server, cache):
    server.routes["/w.pt"] = (200, {}, b"w", None)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set and the file is not in the cache"):
        download_url(f"{server.url}/w.pt", progress=False)
    assert server.requests == []


def test_a_full_disk_names_the_folder(server, cache, online, monkeypatch):
    server.routes["/big.pt"] = (200, {}, b"x" * 4096, None)
    real = dl.tempfile.NamedTemporaryFile

    def full_disk(*args, **kwargs):
        tmp = real(*args, **kwargs)

        def write(data):
            raise OSError(errno.ENOSPC, "No space left on device")

        tmp.write = write
        return tmp

    monkeypatch.setattr(dl.tempfile, "NamedTemporaryFile", full_disk)
    with pytest.raises(DownloadError) as err:
        download_url(f"{server.url}/big.pt", progress=False)
    assert str(err.value).startswith(f"disk full: no space left in {cache} for big.pt")
    assert "CLIPFORGE_CACHE" in str(err.value) and leftovers(cache) == []


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPFORGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_dir() == tmp_path / "xdg" / "clipforge"
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "mine"))
    assert dl.cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- tiny models on "the Hub"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random tiny-vit with its own tokenizer saved as clipforge's, OpenCLIP's hub and Hugging
    Face's directories, a second one (other weights) in OpenCLIP's layout, for revisions, and one
    of the preset's shapes as a bare OpenCLIP weights file."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_bpe(["a red star", "a blue box", "a green ring"] * 10, 530, context_length=32)
    base = get_config("tiny-vit")
    config = replace(base, text=replace(base.text, vocab_size=tokenizer.vocab_size))
    for seed, name in ((0, "ckpt"), (1, "ckpt2")):
        torch.manual_seed(seed)
        save(CLIP(config), root / name, tokenizer=tokenizer)
    torch.manual_seed(2)
    preset = CLIP(base)  # the preset's own shapes, as registry entries hold them
    save(preset, root / "preset")
    save_file({k: v.contiguous() for k, v in to_openclip(preset.state_dict()).items()}, root / "preset.safetensors")
    return {
        "preset": root / "preset",
        "preset_weights": root / "preset.safetensors",
        "ckpt": root / "ckpt",
        "openclip": convert(root / "ckpt", root / "openclip", to="openclip"),
        "hf": convert(root / "ckpt", root / "hf", to="hf"),
        "openclip2": convert(root / "ckpt2", root / "openclip2", to="openclip"),
    }


def cache_repo(hf: Path, repo: str, files: dict[str, Path], *, commit: str = COMMIT_A,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Lays ``files`` (name in the repository -> local file) out in the Hugging Face cache
    ``hf`` as huggingface_hub does: content in ``blobs/`` under its SHA-256, a symlink per file
    in ``snapshots/COMMIT/``, and ``refs/BRANCH`` holding the commit.  The snapshot folder."""
    repo_dir = hf / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / sha(data)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def files_of(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hub_names_load_the_same_tensors_as_the_files(tiny, cache, tmp_path):
    hf = tmp_path / "hf"
    cache_repo(hf, "org/openclip-tiny", files_of(tiny["openclip"]))
    cache_repo(hf, "org/hf-tiny", files_of(tiny["hf"]))
    reference = load_model(tiny["ckpt"])
    for name in ("hf-hub:org/openclip-tiny", "org/hf-tiny", "org/openclip-tiny"):  # the last: only OpenCLIP's files
        model, preprocess, tokenizer = load(name)
        assert same_tensors(model, reference), name
        assert model.config.vision.act == reference.config.vision.act == "gelu"
    assert same_tensors(load_model("org/hf-tiny"), load_model(tiny["hf"]))


def test_a_revision_pin_picks_that_commit(tiny, cache, tmp_path):
    hf = tmp_path / "hf"
    cache_repo(hf, "org/tiny", files_of(tiny["openclip"]), commit=COMMIT_A, refs=("v1",))
    cache_repo(hf, "org/tiny", files_of(tiny["openclip2"]), commit=COMMIT_B, refs=("main",))
    first, second = load_model(tiny["openclip"]), load_model(tiny["openclip2"])
    assert same_tensors(load_model("hf-hub:org/tiny"), second)
    assert same_tensors(load_model(f"hf-hub:org/tiny@{COMMIT_A}"), first)
    assert same_tensors(load_model("hf-hub:org/tiny@v1"), first)
    assert same_tensors(load_model("org/tiny@main"), second)
    with pytest.raises(DownloadError) as err:
        load_model("hf-hub:org/tiny@v2")
    assert "org/tiny@v2: open_clip_config.json is not in the Hugging Face cache" in str(err.value)
    assert "--revision v2" in str(err.value) and "\n" not in str(err.value)


def test_offline_and_not_cached_says_how_to_fetch_it(cache, entry, monkeypatch):
    """The command given fetches every file the name needs: OpenCLIP's config and weights, the
    whole repository for a transformers model, the one weights file of a registry entry."""
    monkeypatch.setitem(registry.REGISTRY, entry.name, replace(entry, url=None, filename="w.safetensors"))
    for name, repo, file, command in (
            ("hf-hub:org/absent", "org/absent", "open_clip_config.json",
             "`hf download org/absent open_clip_config.json open_clip_model.safetensors`"),
            ("org/absent", "org/absent", "config.json", "`hf download org/absent`"),
            ("tiny-vit:test", "org/tiny-weights", "w.safetensors", "`hf download org/tiny-weights w.safetensors`")):
        with pytest.raises(DownloadError) as err:
            load(name)
        message = str(err.value)
        assert message.startswith(f"{repo}: {file} is not in the Hugging Face cache"), message
        assert command in message and "HF_HUB_OFFLINE" in message
        assert "\n" not in message


@pytest.fixture
def entry(tiny) -> Pretrained:
    """A registry entry for tiny-vit weights (trained, says the entry, with QuickGELU)."""
    return Pretrained(name="tiny-vit:test", architecture="tiny-vit", tag="test", activation="quick_gelu",
                      preprocessing=Preprocessing(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                                  resize_mode="squash"),
                      licence="MIT", params=1, hub="org/tiny-weights")


def test_a_registry_name_loads_its_weights_with_the_entrys_activation(tiny, cache, tmp_path, entry, monkeypatch):
    cache_repo(tmp_path / "hf", "org/tiny-weights", {"open_clip_model.safetensors": tiny["preset_weights"]})
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    reference = load_model(tiny["preset"])
    assert reference.config.vision.act == "gelu"  # the files say nothing of QuickGELU
    for model, preprocess, _ in (load("tiny-vit", pretrained="test"), load("tiny-vit:test"),
                                 load("tiny-vit", pretrained="TEST")):
        assert same_tensors(model, reference)
        assert (model.config.vision.act, model.config.text.act) == ("quick_gelu", "quick_gelu")
        assert model.config.vision.mean == (0.5, 0.5, 0.5)
        assert (preprocess.resize_mode, preprocess.size, preprocess.std) == ("squash", (64, 64), (0.25, 0.25, 0.25))
    assert load_model("tiny-vit:test", act="gelu").config.text.act == "gelu"  # act= still overrides


def test_a_transformers_entry_gets_the_entrys_activation_too(tiny, cache, tmp_path, entry, monkeypatch):
    cache_repo(tmp_path / "hf", "org/hf-tiny", files_of(tiny["hf"]))
    hf_entry = replace(entry, name="org/hf-tiny", hub="org/hf-tiny", layout="hf")
    monkeypatch.setitem(registry.REGISTRY, hf_entry.name, hf_entry)
    model = load_model("org/hf-tiny")
    assert model.config.vision.act == "quick_gelu" and same_tensors(model, load_model(tiny["hf"]))


def test_an_entry_falls_back_to_its_address(tiny, cache, online, server, entry, monkeypatch):
    """The Hub has no such repository (the loopback Hub says so): the plain address, checked."""
    data = tiny["preset_weights"].read_bytes()
    server.routes["/tiny.safetensors"] = (200, {}, data, None)
    point_hub_at(monkeypatch, server.url)
    monkeypatch.setitem(registry.REGISTRY, entry.name, replace(entry, hub="org/gone",
                                                                url=f"{server.url}/tiny.safetensors",
                                                                sha256=sha(data)))
    assert same_tensors(load_model("tiny-vit:test"), load_model(tiny["preset"]))
    asked = len(server.requests)
    load_model("tiny-vit:test")  # from clipforge's cache: nothing downloaded again
    assert not [r for r in server.requests[asked:] if r[1] == "/tiny.safetensors"]


def test_an_entry_whose_architecture_is_missing_fails_before_downloading(cache):
    from clipforge.model.config import PRESETS

    entry = registry.REGISTRY["ViT-B-32:openai"]
    before = dict(PRESETS)
    del PRESETS["ViT-B-32"]
    try:
        with pytest.raises(CheckpointError) as err:
            load_model("ViT-B-32:openai")
    finally:  # restored in its order: other tests read the presets' order (close matches, listings)
        PRESETS.clear()
        PRESETS.update(before)
    assert str(err.value).startswith(f"{entry.name}: needs the ViT-B-32 architecture, which this version of "
                                     "clipforge does not define")


def test_pretrained_may_be_a_weights_file_for_an_architecture(tiny, tmp_path):
    """OpenCLIP's ``create_model(name, pretrained=FILE)``: the architecture from the name."""
    path = tmp_path / "bare.safetensors"
    shutil.copy(tiny["preset_weights"], path)
    model = load_model("tiny-vit-quickgelu", pretrained=path)
    assert model.config.vision.act == "quick_gelu" and same_tensors(model, load_model(tiny["preset"]))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model("tiny", pretrained=path)


# ----------------------------------------------------------------------------- the Hub's error answers


@pytest.mark.parametrize("code, status, expected", [
    ("GatedRepo", 403, "org/repo is a gated repository: accept its terms at https://huggingface.co/org/repo"),
    ("RepoNotFound", 404, "org/repo: no such repository on the Hugging Face Hub, or a private one"),
    ("RevisionNotFound", 404, "org/repo: no revision 'v9' on the Hugging Face Hub"),
    ("EntryNotFound", 404, "org/repo@v9: the repository has no open_clip_config.json"),
])
def test_hub_errors_are_one_line_each(server, cache, online, monkeypatch, code, status, expected):
    point_hub_at(monkeypatch, server.url)
    server.routes["/org/repo/resolve/v9/open_clip_config.json"] = (status, {"X-Error-Code": code}, b"", None)
    with pytest.raises(DownloadError) as err:
        fetch_repo("org/repo", revision="v9", layout="openclip")
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def count_connections(monkeypatch: pytest.MonkeyPatch, port: int) -> list[int]:
    """The connections attempted to ``port`` from now on, one item each."""
    attempts: list[int] = []
    connect = socket.socket.connect

    def counted(self: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and address[1] == port:
            attempts.append(port)
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    return attempts


def test_no_hub_and_no_cache_says_so_in_one_line_after_one_attempt(cache, online, entry, monkeypatch, caplog):
    """Without network (a refused connection) and without HF_HUB_OFFLINE: the Hub is asked once,
    not again for the pickle after the safetensors, nor after huggingface_hub's retry waits; the
    entry's plain address, which would fail the same way, is not tried; one line, no warnings."""
    hub_port, address_port = closed_port(), closed_port()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{hub_port}")
    monkeypatch.setitem(registry.REGISTRY, entry.name,
                        replace(entry, url=f"http://127.0.0.1:{address_port}/tiny.safetensors"))
    hub, address = count_connections(monkeypatch, hub_port), count_connections(monkeypatch, address_port)
    with pytest.raises(DownloadError) as err:
        load_model("tiny-vit:test")
    message = str(err.value)
    assert message.startswith("org/tiny-weights: cannot reach the Hugging Face Hub (connection refused) and "
                              "open_clip_model.safetensors is not in the cache"), message
    assert "HF_ENDPOINT" in message and "\n" not in message and "Hub mirror failed" not in message
    assert len(hub) == 1 and address == []
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub") and r.levelno >= logging.WARNING]
    with pytest.raises(DownloadError) as err:
        fetch_repo("org/repo", layout="auto")  # config.json, then open_clip_config.json: still one attempt
    assert str(err.value).startswith("org/repo: cannot reach the Hugging Face Hub (connection refused) and "
                                     "config.json is not in the cache")
    assert "`hf download org/repo`" in str(err.value) and len(hub) == 2


def test_a_hub_file_is_downloaded_into_the_shared_cache_once(tiny, server, cache, online, monkeypatch, tmp_path):
    """Through huggingface_hub against a loopback Hub: the files land in the Hugging Face cache,
    and a second load, offline, reads them from there."""
    point_hub_at(monkeypatch, server.url)
    for name, path in files_of(tiny["openclip"]).items():
        data = path.read_bytes()
        headers = {"X-Repo-Commit": COMMIT_A, "ETag": f'"{sha(data)}"'}
        server.routes[f"/org/online/resolve/main/{name}"] = (200, headers, data, None)
    model = load_model("hf-hub:org/online")
    assert same_tensors(model, load_model(tiny["ckpt"]))
    assert (tmp_path / "hf" / "models--org--online" / "snapshots" / COMMIT_A / "open_clip_config.json").exists()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    server.requests.clear()
    assert same_tensors(load_model("hf-hub:org/online"), model) and server.requests == []
