"""Downloads of released weights: Hugging Face Hub repositories and plain addresses, and their caches.

    path = fetch_entry(REGISTRY["ViT-B-32:openai"])        # the weights file, downloaded once
    folder = fetch_repo("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", layout="auto")
    path = download_url(url, sha256=digest)                 # into clipforge's own cache

Hub repositories go through ``huggingface_hub`` into the standard Hugging Face cache, the one
transformers and open_clip share (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), so a
model fetched by any of them is not fetched again; ``huggingface_hub`` brings resumed downloads,
revisions, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` mirrors and ``HF_TOKEN``.  Only the files a
model needs are fetched: OpenCLIP's config and one weights file (safetensors, else the pickle),
or a CLIPModel's config, weights and tokenizer files.

Plain addresses are fetched with urllib into clipforge's cache (`cache_dir`: ``CLIPFORGE_CACHE``,
by default ``$XDG_CACHE_HOME/clipforge``, i.e. ``~/.cache/clipforge``) under the address's file
name.  The bytes go to a temporary file in the same folder, with a progress bar, and are moved
into place (`os.replace`, atomic) only once their count matches the server's Content-Length and
their SHA-256 the one expected; a bad download is removed.  A cached file is hashed once: a
``NAME.sha256`` file beside it records the digest, and later loads only compare sizes.  With
``HF_HUB_OFFLINE`` set, plain addresses are not fetched either; a file already cached is used.
One download per file at a time: a lock per destination (``.locks/`` in the cache) makes other
threads and processes wait for it and then use the file.

The Hub is asked once per fetch, without huggingface_hub's retries, before the first file: when
it cannot be reached, the rest is read from the cache only, the entry's plain address (which
would fail the same way) is not tried, and the failure is one line with no retry warnings.

Every failure is a `DownloadError` (a CheckpointError) of one line saying what to do: a gated or
missing repository, revision or file; no network, naming the file and where to put it by hand;
a checksum mismatch; a truncated download; a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipforge.checkpoints._errors import CheckpointError
from clipforge.checkpoints.registry import Pretrained

__all__ = [
    "CACHE_ENV", "TOKENIZER_FILES", "DownloadError", "cache_dir", "cached_url_path", "download_url", "fetch_entry",
    "fetch_repo", "fetch_tokenizer", "hub_cache_dir", "is_cached", "offline",
]

CACHE_ENV = "CLIPFORGE_CACHE"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEX = "model.safetensors.index.json"
# A tokenizer's files: CLIP's BPE (vocab.json, merges.txt), SigLIP's SentencePiece model, SigLIP 2's
# Gemma tokenizer.json, Chinese-CLIP's WordPiece vocab.txt, and transformers' settings for them.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
HF_OPTIONAL = ("preprocessor_config.json", *TOKENIZER_FILES)
# The files that hold a vocabulary (the others only configure one), and `hf download` patterns
# that fetch a repository's tokenizer files and nothing else.
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "vocab.txt")
TOKENIZER_PATTERNS = ("*token*", "*.model", "vocab*", "merges.txt")
_CHUNK = 1 << 20
_TIMEOUT = 60  # seconds without a byte before a download is given up


class DownloadError(CheckpointError):
    """Released weights that could not be fetched; the message says why and what to do.
    ``fallback`` is False where another address would not help (a gated repository, a bad token);
    ``unreachable`` is True where the Hub could not be reached at all (no network)."""

    def __init__(self, message: str, *, fallback: bool = True, unreachable: bool = False) -> None:
        super().__init__(message)
        self.fallback = fallback
        self.unreachable = unreachable


# ----------------------------------------------------------------------------- caches


def cache_dir() -> Path:
    """clipforge's download cache: ``$CLIPFORGE_CACHE``, else ``$XDG_CACHE_HOME/clipforge``
    (``~/.cache/clipforge``)."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipforge"


def hub_cache_dir() -> Path:
    """The Hugging Face cache that huggingface_hub reads and writes (``HF_HUB_CACHE``, ``HF_HOME``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (as huggingface_hub read it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_url_path(url: str) -> Path:
    """Where `download_url` keeps the file at ``url``: its file name, in `cache_dir`."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"{url}: names no file")
    return cache_dir() / name


# ----------------------------------------------------------------------------- plain addresses


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_digest(path: Path) -> str | None:
    """The SHA-256 of the cached ``path``, hashing it only when no marker records its digest for
    its present size (a marker is then written); None when there is no such file (any more)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    marker = _marker(path)
    try:
        digest, recorded = marker.read_text().split()
        if int(recorded) != size:
            raise ValueError("size changed")
    except (OSError, ValueError):
        digest = _sha256_of(path)
        try:
            marker.write_text(f"{digest} {size}\n")
        except OSError:
            pass  # a read-only cache: the file is hashed again next time, nothing worse
    return digest


def _disk_full(err: OSError, folder: Path, what: str) -> DownloadError | None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"disk full: no space left in {folder} for {what}; free some space or set "
                             f"{CACHE_ENV} (or HF_HUB_CACHE for Hub downloads) to a folder on another disk")
    return None


def _no_network(url: str, dest: Path, sha256: str | None, reason: str) -> DownloadError:
    check = f" (SHA-256 {sha256}{'...' if sha256 and len(sha256) < 64 else ''})" if sha256 else ""
    return DownloadError(f"cannot download {url}: {reason}; without network, fetch it elsewhere and put it "
                         f"at {dest}{check}")


def download_url(url: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """The file at ``url`` in clipforge's cache, downloaded unless it is there and checks out.

    ``sha256`` is the file's digest (all 64 hex digits, or a prefix such as the 8 that OpenCLIP's
    release names carry); None skips the check.  A cached file whose digest differs is removed
    and downloaded again.  A DownloadError of one line for every failure (module notes).
    """
    from filelock import FileLock

    dest = cached_url_path(url)
    locks = dest.parent / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if not dest.is_file():
            raise DownloadError(f"cannot create the cache folder {dest.parent}: {err.strerror or err}; set "
                                f"{CACHE_ENV} to a folder you can write") from None
        return _download_locked(url, dest, sha256, progress)  # a read-only cache: nothing to download into
    with FileLock(locks / f"{dest.name}.lock"):  # one download per file, across threads and processes
        return _download_locked(url, dest, sha256, progress)


def _download_locked(url: str, dest: Path, sha256: str | None, progress: bool) -> Path:
    digest = _cached_digest(dest) if dest.is_file() else None
    mismatch = None
    if digest is not None:
        if sha256 is None or digest.startswith(sha256):
            return dest
        dest.unlink(missing_ok=True)
        _marker(dest).unlink(missing_ok=True)
        mismatch = f"checksum mismatch for {dest}: SHA-256 {digest}, expected {sha256}; removed"
    if offline():
        if mismatch:
            raise DownloadError(f"{mismatch} (HF_HUB_OFFLINE is set: not downloaded again from {url})")
        raise _no_network(url, dest, sha256, "HF_HUB_OFFLINE is set and the file is not in the cache")
    try:
        return _download(url, dest, sha256, progress)
    except DownloadError as err:
        if mismatch is None:
            raise
        raise DownloadError(f"{mismatch}, and downloading it again failed: {err}", fallback=err.fallback) from None


def _download(url: str, dest: Path, sha256: str | None, progress: bool) -> Path:
    tmp_name = None
    try:
        with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part",
                                         delete=False) as tmp:
            tmp_name = tmp.name
            digest, received, expected = _stream(url, tmp, dest, sha256, progress)
        if expected is not None and received != expected:
            raise DownloadError(f"truncated download of {url}: {received:,} of the {expected:,} bytes the server "
                                f"announced arrived; nothing was kept, try again")
        if sha256 is not None and not digest.startswith(sha256):
            raise DownloadError(f"checksum mismatch for {url}: SHA-256 {digest}, expected {sha256}; the download "
                                "was removed (a damaged transfer or a changed file), try again")
        os.replace(tmp_name, dest)
        tmp_name = None
        _marker(dest).write_text(f"{digest} {received}\n")
    except OSError as err:
        full = _disk_full(err, dest.parent, dest.name)
        if full is not None:
            raise full from None
        raise DownloadError(f"cannot write {dest}: {err.strerror or err}") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    return dest


def _stream(url: str, out: Any, dest: Path, sha256: str | None, progress: bool) -> tuple[str, int, int | None]:
    """Copies ``url`` into ``out``: (its SHA-256, bytes received, Content-Length or None)."""
    from tqdm.auto import tqdm

    from clipforge import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"clipforge/{__version__}"})
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=None if progress else True, dynamic_ncols=True) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {url}: the server answered HTTP {err.code} {err.reason}") from None
    except http.client.IncompleteRead as err:
        got = received + len(err.partial)
        raise DownloadError(f"truncated download of {url}: the connection closed after {got:,} bytes; nothing "
                            "was kept, try again") from None
    except urllib.error.URLError as err:
        reason = err.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise _no_network(url, dest, sha256, text) from None
    except (TimeoutError, ConnectionError) as err:
        if received:
            raise DownloadError(f"truncated download of {url}: the connection broke after {received:,} bytes "
                                f"({type(err).__name__}); nothing was kept, try again") from None
        raise _no_network(url, dest, sha256, type(err).__name__) from None
    return digest.hexdigest(), received, expected


# ----------------------------------------------------------------------------- the Hugging Face Hub

_ABSENT, _UNCACHED = "absent", "uncached"  # a file the repository lacks; one offline and not cached


class _Contact:
    """One fetch's dealings with the Hub: whether it could be reached (asked once, before the first
    file, without huggingface_hub's retries), and the files the fetch needs, for the messages."""

    def __init__(self, repo: str, revision: str | None, needs: tuple[str, ...], *, patterns: tuple[str, ...] = (),
                 also: _Contact | None = None) -> None:
        self.repo, self.revision, self.needs = repo, revision, needs
        self.patterns = patterns  # `hf download --include` patterns, where the file names are not known
        self.also = also  # a second repository the same load needs (a registry entry's tokenizer)
        self.asked = False
        self.unreachable: str | None = None  # why the Hub could not be reached; None: it could

    def ask(self, filename: str) -> None:
        """Asks the Hub for ``filename``'s metadata once, without retries: a Hub that does not
        answer is not asked again in this fetch (only the cache is read), and no retry waits."""
        if self.asked or offline():
            return
        self.asked = True
        import httpx2
        from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(self.repo, filename, revision=self.revision)
        try:
            get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)  # retry_on_errors defaults to False
        except errors.HfHubHTTPError:
            pass  # the Hub answered: hf_hub_download turns the answer into its error
        except (httpx2.TransportError, OSError) as err:
            self.unreachable = _reason(err)

    def where(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo

    def command(self) -> str:
        pin = f" --revision {self.revision}" if self.revision else ""
        include = "".join(f" --include '{p}'" for p in self.patterns)
        own = f"`hf download {' '.join([self.repo, *self.needs])}{include}{pin}`"
        return own if self.also is None else f"{own} and {self.also.command()}"


def _reason(err: BaseException) -> str:
    """A short reason for a failed connection: the innermost OS error's text, else the type."""
    seen = err
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    text = str(err).splitlines()[0] if str(err) else ""
    return text if 0 < len(text) <= 80 else type(err).__name__


def _not_cached(contact: _Contact, filename: str) -> DownloadError:
    where, fetch = contact.where(), contact.command()
    if offline():
        return DownloadError(f"{where}: {filename} is not in the Hugging Face cache ({hub_cache_dir()}) and "
                             f"HF_HUB_OFFLINE is set; on a machine with network run {fetch} and copy its cache "
                             "here, or unset HF_HUB_OFFLINE")
    why = f" ({contact.unreachable})" if contact.unreachable else ""
    return DownloadError(f"{where}: cannot reach the Hugging Face Hub{why} and {filename} is not in the cache "
                         f"({hub_cache_dir()}); check the network (or HF_ENDPOINT for a mirror), or run {fetch} "
                         "on a machine with network and copy its cache here",
                         unreachable=contact.unreachable is not None)


def _hub_error(err: Exception, contact: _Contact, filename: str) -> DownloadError | None:
    """The one-line error for a huggingface_hub exception; None for one that is not about the download."""
    from huggingface_hub import errors

    repo, revision, where = contact.repo, contact.revision, contact.where()
    if isinstance(err, errors.GatedRepoError):
        return DownloadError(f"{repo} is a gated repository: accept its terms at https://huggingface.co/{repo} "
                             "and log in (`hf auth login`, or set HF_TOKEN)", fallback=False)
    if isinstance(err, errors.RepositoryNotFoundError):
        return DownloadError(f"{repo}: no such repository on the Hugging Face Hub, or a private one (log in with "
                             "`hf auth login`, or set HF_TOKEN)")
    if isinstance(err, errors.RevisionNotFoundError):
        return DownloadError(f"{repo}: no revision {revision!r} on the Hugging Face Hub")
    if isinstance(err, errors.LocalEntryNotFoundError):
        return _not_cached(contact, filename)
    if isinstance(err, errors.EntryNotFoundError):
        return DownloadError(f"{where}: the repository has no file {filename}")
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(err.response, "status_code", None)
        if status == 401:
            return DownloadError(f"{repo}: the Hugging Face Hub refused the token (HTTP 401); check HF_TOKEN or "
                                 "`hf auth login`", fallback=False)
        return DownloadError(f"{where}/{filename}: the Hugging Face Hub answered HTTP {status}")
    if isinstance(err, OSError):
        return _disk_full(err, hub_cache_dir(), f"{repo}/{filename}")
    return None


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's warnings (its retries, "Retrying in 8s") kept off the terminal during a
    fetch: each failure becomes one line of clipforge's."""
    from huggingface_hub import logging as hf_logging

    logger = hf_logging.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _fetch_one(contact: _Contact, filename: str) -> Path | str:
    """``filename`` of the repository in the Hugging Face cache, downloaded if needed; `_ABSENT`
    when the repository lacks it, `_UNCACHED` when the Hub cannot be asked and the cache lacks it."""
    from huggingface_hub import errors, hf_hub_download

    from clipforge import __version__

    contact.ask(filename)
    try:
        with _quiet_hub():
            return Path(hf_hub_download(contact.repo, filename, revision=contact.revision, library_name="clipforge",
                                        library_version=__version__,
                                        local_files_only=contact.unreachable is not None))
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        return _UNCACHED
    except errors.EntryNotFoundError:
        return _ABSENT
    except Exception as err:  # huggingface_hub's errors, each mapped to its line; anything else re-raised
        mapped = _hub_error(err, contact, filename)
        if mapped is None:
            raise
        raise mapped from None


def _hub_file(contact: _Contact, names: tuple[str, ...], *, optional: bool = False) -> Path | None:
    """The first of ``names`` that the repository holds (OpenCLIP's order: safetensors first), in
    the Hugging Face cache; None for an ``optional`` file it lacks or that cannot be fetched."""
    outcomes = []
    for name in names:
        found = _fetch_one(contact, name)
        if isinstance(found, Path):
            return found
        outcomes.append(found)
    if optional:
        return None
    if _UNCACHED in outcomes:
        raise _not_cached(contact, names[0])
    raise DownloadError(f"{contact.where()}: the repository has no {' or '.join(names)}")


def _hf_files(contact: _Contact) -> Path:
    """A transformers CLIPModel's files; the snapshot folder holding them."""
    config = _hub_file(contact, (HF_CONFIG,))
    assert config is not None
    index = _hub_file(contact, (HF_INDEX,), optional=True)
    if index is not None:  # sharded weights: every shard the index lists
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        for shard in sorted(set(shards)):
            _hub_file(contact, (shard,))
    else:
        _hub_file(contact, HF_WEIGHTS)
    for name in HF_OPTIONAL:
        _hub_file(contact, (name,), optional=True)
    return config.parent


def _is_clip_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("model_type") == "clip" or "vision_config" in data)


def fetch_repo(repo: str, *, revision: str | None = None, layout: str = "auto") -> Path:
    """The snapshot folder of a Hub repository, holding the files a model needs.

    ``layout``: "openclip" (``hf-hub:`` names: ``open_clip_config.json`` and OpenCLIP's weights),
    "hf" (a transformers CLIPModel) or "auto" (a CLIPModel when ``config.json`` describes one,
    else OpenCLIP's files).  A folder holding both is read as OpenCLIP's (the same weights).
    """
    if layout not in ("openclip", "hf", "auto"):
        raise ValueError(f"layout must be 'openclip', 'hf' or 'auto', got {layout!r}")
    # what to fetch by hand: OpenCLIP's two files, else the whole repository (config, weights, tokenizer)
    needs = (OPENCLIP_CONFIG, OPENCLIP_WEIGHTS[0]) if layout == "openclip" else ()
    contact = _Contact(repo, revision, needs)
    if layout == "hf":
        return _hf_files(contact)
    if layout == "auto":  # a bare ORG/NAME, which may have been meant as a local path
        try:
            return _auto_files(contact)
        except DownloadError as err:
            if not err.fallback or Path(repo).exists():
                raise
            raise DownloadError(f"{err} (no local file or folder {repo} either)", unreachable=err.unreachable) from None
    return _openclip_files(contact)


def _auto_files(contact: _Contact) -> Path:
    """A transformers CLIPModel's files when the repository's config.json describes one, else
    OpenCLIP's."""
    config = _fetch_one(contact, HF_CONFIG)
    if isinstance(config, Path) and _is_clip_config(config):
        return _hf_files(contact)
    if config == _UNCACHED and contact.unreachable is not None:
        raise _not_cached(contact, HF_CONFIG)
    openclip = _fetch_one(contact, OPENCLIP_CONFIG)
    if not isinstance(openclip, Path):
        if _UNCACHED in (config, openclip):
            raise _not_cached(contact, HF_CONFIG)
        what = "its config.json describes no CLIPModel" if isinstance(config, Path) else "it has no config.json"
        raise DownloadError(f"{contact.where()}: neither a transformers CLIPModel ({what}) nor an OpenCLIP "
                            f"repository (no {OPENCLIP_CONFIG})")
    return _openclip_files(contact)


def _openclip_files(contact: _Contact) -> Path:
    """OpenCLIP's config and weights; the snapshot folder holding them."""
    config = _hub_file(contact, (OPENCLIP_CONFIG,))
    assert config is not None
    _hub_file(contact, OPENCLIP_WEIGHTS)
    return config.parent


def fetch_entry(entry: Pretrained, *, revision: str | None = None, progress: bool = True) -> Path:
    """The weights of a registry entry on disk: a weights file ("openclip" entries) or a snapshot
    folder ("hf" entries).  The Hub first; the entry's plain address when the Hub has no such
    repository or file (not when the Hub cannot be reached at all, nor with ``HF_HUB_OFFLINE``:
    then only an address already in clipforge's cache is used)."""
    revision = revision or entry.revision
    hub_error: DownloadError | None = None
    if entry.hub is not None:
        try:
            if entry.layout == "hf":
                return fetch_repo(entry.hub, revision=revision, layout="hf")
            tokenizer = None if entry.tokenizer is None else _tokenizer_contact(
                entry.tokenizer, revision if entry.tokenizer == entry.hub else None)
            contact = _Contact(entry.hub, revision, (entry.filename or OPENCLIP_WEIGHTS[0],), also=tokenizer)
            found = _hub_file(contact, (entry.filename,) if entry.filename else OPENCLIP_WEIGHTS)
            assert found is not None
            return found
        except DownloadError as err:
            if entry.url is None or not err.fallback:
                raise
            hub_error = err
    assert entry.url is not None
    no_network = hub_error is not None and (offline() or hub_error.unreachable)
    if no_network and not cached_url_path(entry.url).is_file():
        raise hub_error  # the address would fail the same way: one error, the Hub's
    try:
        return download_url(entry.url, sha256=entry.sha256, progress=progress)
    except DownloadError as err:
        if hub_error is None:
            raise
        raise DownloadError(f"{entry.name}: {err} (the Hub mirror failed first: {hub_error})") from None


def _tokenizer_contact(repo: str, revision: str | None) -> _Contact:
    return _Contact(repo, revision, (), patterns=TOKENIZER_PATTERNS)


def fetch_tokenizer(repo: str, *, revision: str | None = None) -> Path:
    """The snapshot folder holding a Hub repository's tokenizer files (`TOKENIZER_FILES`, those it
    has); a DownloadError when it holds no vocabulary (`VOCABULARY_FILES`), or when the files
    cannot be fetched or found in the cache (the message names the `hf download` that fetches them)."""
    contact = _tokenizer_contact(repo, revision)
    found = {name: path for name in TOKENIZER_FILES if (path := _hub_file(contact, (name,), optional=True)) is not None}
    if not any(name in found for name in VOCABULARY_FILES):
        if contact.unreachable is not None or offline():
            raise _not_cached(contact, "a tokenizer vocabulary")
        raise DownloadError(f"{contact.where()}: the repository has no tokenizer vocabulary "
                            f"({' or '.join(VOCABULARY_FILES)})")
    return next(iter(found.values())).parent


def is_cached(entry: Pretrained) -> bool:
    """Whether loading ``entry`` needs no download: its Hub files in the Hugging Face cache, or
    its plain address's file in clipforge's.  Reads the caches only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(entry.hub, name, revision=entry.revision), str)

    if entry.tokenizer is not None:  # a tokenizer of its own, beside the weights file
        pin = entry.revision if entry.tokenizer == entry.hub else None
        tokenizer_cached = any(isinstance(try_to_load_from_cache(entry.tokenizer, name, revision=pin), str)
                               for name in VOCABULARY_FILES)
        if not tokenizer_cached:
            return False
    if entry.hub is not None:
        if entry.layout == "hf":
            if cached(HF_CONFIG) and (cached(HF_INDEX) or any(cached(n) for n in HF_WEIGHTS)):
                return True
        elif any(cached(n) for n in ((entry.filename,) if entry.filename else OPENCLIP_WEIGHTS)):
            return True
    return entry.url is not None and cached_url_path(entry.url).is_file()
