"""Finding and reading byte-level BPE vocabularies: OpenAI's merges file and Hugging Face files.

OpenAI's CLIP ships one file, ``bpe_simple_vocab_16e6.txt.gz``: a header line, then one merge
per line.  The vocabulary it defines is laid out as OpenAI's ``SimpleTokenizer`` builds it
(github.com/openai/CLIP, ``clip/simple_tokenizer.py``): the 256 byte symbols, the same 256 with
``</w>``, one token per merge, then ``<start_of_text>`` and ``<end_of_text>``: 49,408 ids.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_URL = "https://openaipublic.azureedge.net/clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
BPE_ENV = "CLIPFORGE_BPE"
# Packages known to ship OpenAI's file next to their tokenizer (open_clip_torch, openai/CLIP).
BPE_PACKAGES = ("open_clip", "clip")
# A Hub repository holding the same vocabulary as vocab.json + merges.txt (the same 49,408 ids), so
# a Hugging Face cache copied from another machine carries it.
BPE_HUB_REPO = "openai/clip-vit-base-patch32"

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# Hugging Face's CLIP files spell the special tokens differently (same ids, 49406 and 49407).
_SOT_ALIASES = (SOT_TOKEN, "<|startoftext|>")
_EOT_ALIASES = (EOT_TOKEN, "<|endoftext|>")
# OpenAI reads merges[1 : 49152 - 256 - 2 + 1]: 48,894 merges after the header line.
_OPENAI_NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"


@dataclass(frozen=True)
class BpeVocab:
    """A byte-level BPE vocabulary: token to id, merges in rank order, and the special tokens."""

    vocab: dict[str, int]
    merges: list[tuple[str, str]]
    sot_token: str
    eot_token: str


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from each byte to a printable character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_values, code_points = list(printable), list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + len(code_points) - len(printable))
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def base_vocab() -> list[str]:
    """The 512 base symbols in OpenAI's order: each byte, then each byte ending a word."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + END_OF_WORD for s in symbols]


def vocab_from_merges(
    merges: list[tuple[str, str]], sot_token: str = SOT_TOKEN, eot_token: str = EOT_TOKEN
) -> dict[str, int]:
    """OpenAI's layout: base symbols, one token per merge, then the two special tokens.

    A merge whose result already exists keeps the earlier id (OpenAI's dict does the same).
    """
    vocab: dict[str, int] = {}
    for token in base_vocab() + ["".join(m) for m in merges] + [sot_token, eot_token]:
        vocab.setdefault(token, len(vocab))
    return vocab


def read_openai_bpe(path: str | os.PathLike[str]) -> BpeVocab:
    """Reads OpenAI's merges file (gzipped or plain text)."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _OPENAI_NUM_MERGES + 1] if line.strip()]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise ValueError(f"bpe file {str(path)!r} is not a BPE merges file: line {' '.join(bad)!r}")
    return BpeVocab(vocab_from_merges(merges), merges, SOT_TOKEN, EOT_TOKEN)  # type: ignore[arg-type]


def _special(vocab: dict[str, int], aliases: tuple[str, ...], where: Path) -> str:
    found = next((t for t in aliases if t in vocab), None)
    if found is None:
        raise ValueError(f"tokenizer files in {str(where)!r} have none of the special tokens {aliases}")
    return found


def read_hf_dir(path: str | os.PathLike[str]) -> BpeVocab:
    """Reads a Hugging Face CLIP tokenizer: ``vocab.json`` + ``merges.txt``, else ``tokenizer.json``."""
    path = Path(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        lines = (path / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    elif (path / "tokenizer.json").is_file():
        model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
            where = str(path / "tokenizer.json")
            raise ValueError(f"{where!r} is not a byte-level BPE with the {END_OF_WORD!r} suffix")
        vocab = model["vocab"]
        # tokenizers writes merges as "a b" strings (before 0.20) or as [a, b] pairs.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    else:
        raise FileNotFoundError(f"{str(path)!r} holds neither vocab.json + merges.txt nor tokenizer.json")
    sot, eot = _special(vocab, _SOT_ALIASES, path), _special(vocab, _EOT_ALIASES, path)
    return BpeVocab(vocab, merges, sot, eot)  # type: ignore[arg-type]


def _packaged_bpe() -> Path | None:
    """OpenAI's file inside an installed package, located without importing the package."""
    for name in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / BPE_FILENAME
            if candidate.is_file():
                return candidate
    return None


def cache_dir() -> Path:
    """Where a downloaded vocabulary is kept: clipforge's download cache (``$CLIPFORGE_CACHE``, else
    ``$XDG_CACHE_HOME/clipforge``, i.e. ``~/.cache/clipforge``), beside the released weights."""
    # Imported when called: the checkpoints package imports the tokenizer (for its exports), and
    # loading the tokenizer need not load the checkpoints package and the model with it.
    from clipforge.checkpoints.download import cache_dir as downloads

    return downloads()


def _hub_cached_bpe() -> Path | None:
    """The snapshot folder of `BPE_HUB_REPO` in the Hugging Face cache when it holds vocab.json and
    merges.txt; the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    vocab, merges = (try_to_load_from_cache(BPE_HUB_REPO, name) for name in ("vocab.json", "merges.txt"))
    if isinstance(vocab, str) and isinstance(merges, str) and Path(vocab).parent == Path(merges).parent:
        return Path(vocab).parent
    return None


def _offline() -> bool:
    from clipforge.checkpoints.download import offline

    return offline()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download(url: str, dest: Path) -> Path:
    """Downloads ``url`` to ``dest`` atomically, keeping it only if its SHA-256 is OpenAI's."""
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != BPE_SHA256:
        raise OSError(f"download of {url} does not have SHA-256 {BPE_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(dest)
    return dest


def _missing_message(reason: str) -> str:
    return (
        f"cannot find OpenAI's CLIP BPE vocabulary {BPE_FILENAME} ({reason}). Supply it one of these ways:\n"
        f"  - pass its path, or a Hugging Face checkpoint directory holding vocab.json + merges.txt\n"
        f"    or tokenizer.json;\n"
        f"  - set the environment variable {BPE_ENV} to that path;\n"
        f"  - install a package that ships it (pip install open_clip_torch);\n"
        f"  - download {BPE_URL} into {cache_dir()} (SHA-256 {BPE_SHA256})."
    )


def find_bpe(path: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
    """Locates the vocabulary: ``path``; ``$CLIPFORGE_BPE``; an installed package; the cache;
    `BPE_HUB_REPO`'s files in the Hugging Face cache; a download (not with ``HF_HUB_OFFLINE``).

    ``path`` and the environment variable may name a merges file or a directory of tokenizer
    files; either one, when given, must exist.  The download is tried last, only when ``download``.
    """
    for given, name in ((path, "path"), (os.environ.get(BPE_ENV) or None, BPE_ENV)):
        if given is not None:
            if not Path(given).exists():
                raise FileNotFoundError(f"{name} {str(given)!r} does not exist")
            return Path(given)
    packaged = _packaged_bpe()
    if packaged is not None:
        return packaged
    cached = cache_dir() / BPE_FILENAME
    if cached.is_file() and _sha256(cached) == BPE_SHA256:
        return cached
    hub = _hub_cached_bpe()
    if hub is not None:
        return hub
    if download and _offline():
        raise FileNotFoundError(
            f"OpenAI's CLIP BPE vocabulary is not on this machine and HF_HUB_OFFLINE is set: put {BPE_FILENAME} "
            f"(SHA-256 {BPE_SHA256[:12]}...) in {cache_dir()}, or set {BPE_ENV} to its path or to a folder holding "
            f"vocab.json + merges.txt, or copy {BPE_HUB_REPO}'s files into the Hugging Face cache")
    if not download:
        raise FileNotFoundError(_missing_message("download disabled"))
    try:
        return _download(BPE_URL, cached)
    except OSError as err:
        raise FileNotFoundError(_missing_message(f"download failed: {err}")) from err
