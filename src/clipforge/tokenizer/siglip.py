"""SigLIP's and SigLIP 2's tokenizers, read from a checkpoint directory's own files.

SigLIP ships a SentencePiece unigram model (``spiece.model``), run here by `sentencepiece`;
SigLIP 2 ships Gemma's byte-fallback BPE (``tokenizer.json``), run here by Hugging Face
`tokenizers`.  Ids equal those of transformers' ``SiglipTokenizer`` and ``GemmaTokenizer`` loaded
from the same files and called as SigLIP's processors call them (``padding="max_length"``,
``truncation=True``, ``max_length=64``), padding included (tests/test_siglip_tokenizer.py):

- SigLIP: lower case (``do_lower_case``), ASCII punctuation removed and whitespace collapsed
  (big_vision's ``canonicalize_text``), an end token appended unless the text already ends with
  one, right padding with the pad token (``</s>`` in Google's files).  Special tokens written in
  the text (``</s>``, ``<unk>``) become their ids, as in transformers.
- SigLIP 2: ``tokenizer.json``'s pipeline as written, with ``add_bos_token``/``add_eos_token`` of
  ``tokenizer_config.json`` when it names them (Google's repositories: an end token, no start
  token), lower case only for transformers' ``Siglip2Tokenizer`` class, and padding on the side
  transformers pads Gemma on: the left unless the config says ``padding_side``.

OpenCLIP runs the same files after its own text cleaning (``tokenizer_kwargs.clean`` of its
config; "canonicalize" for SigLIP, which also changes SigLIP 2's ids: lower case, no punctuation).
A tokenizer of a model read through OpenCLIP's files or names cleans as OpenCLIP does
(`clean_as`, set by `clipforge.checkpoints`); ids then equal open_clip's ``HFTokenizer``'s.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import normalizers, processors

from clipforge.tokenizer._files import read_tokenizer_config

__all__ = [
    "OPENCLIP_CLEANING", "GemmaTokenizer", "SentencePieceTokenizer", "is_siglip_tokenizer_dir", "openclip_clean",
    "siglip_tokenizer_from_dir",
]

# OpenCLIP's text cleaning before a Hugging Face tokenizer (open_clip_config.json's
# ``tokenizer_kwargs.clean``; "whitespace" when absent): ftfy and HTML entities fixed, then
# whitespace collapsed; "lower" also lower-cases; "canonicalize" (SigLIP's configs) lower-cases and
# removes ASCII punctuation, "_" read as a space.
OPENCLIP_CLEANING = ("whitespace", "lower", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def openclip_clean(text: str, cleaning: str) -> str:
    """``text`` as OpenCLIP cleans it before its Hugging Face tokenizer (`OPENCLIP_CLEANING`)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if cleaning == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif cleaning == "lower":
        text = text.lower()
    elif cleaning != "whitespace":
        raise ValueError(f"unknown text cleaning {cleaning!r}; OpenCLIP's are {', '.join(OPENCLIP_CLEANING)}")
    return " ".join(text.split())


SPIECE_FILE = "spiece.model"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
SIGLIP_CONTEXT_LENGTH = 64  # SigLIP's text length (big_vision configs; transformers' model_max_length)
GEMMA_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")
_UNDERLINE = "\u2581"  # SentencePiece's word-start mark
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _token(config: dict[str, Any], key: str, default: str | None) -> str | None:
    """A special token of ``tokenizer_config.json``: a string or an ``AddedToken``'s dict."""
    value = config.get(key, default)
    return value.get("content") if isinstance(value, dict) else value


def _context_length(context_length: int | None, config: dict[str, Any]) -> int:
    if context_length is None:
        saved = config.get("model_max_length")
        # transformers writes a huge sentinel when a tokenizer has no length of its own
        context_length = saved if isinstance(saved, int) and 0 < saved <= 100_000 else SIGLIP_CONTEXT_LENGTH
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return context_length


class _DirectoryTokenizer(ABC):
    """What both tokenizers share: the directory they came from, padding to a fixed length."""

    directory: Path
    context_length: int
    pad_token_id: int
    padding_side: str
    files: tuple[str, ...]
    cleaning: str | None = None  # OpenCLIP's text cleaning before the ids, for OpenCLIP's models (`clean_as`)

    def clean_as(self, cleaning: str | None) -> _DirectoryTokenizer:
        """Cleans texts as OpenCLIP does before this tokenizer (`OPENCLIP_CLEANING`; None: as
        transformers, not at all); returns the tokenizer."""
        if cleaning is not None:
            openclip_clean("", cleaning)  # an unknown name fails here, once
        self.cleaning = cleaning
        return self

    def _clean(self, texts: Sequence[str]) -> list[str]:
        return list(texts) if self.cleaning is None else [openclip_clean(t, self.cleaning) for t in texts]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with its special tokens (the end token), unpadded and uncut."""
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with its special tokens, unpadded and uncut."""

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> torch.LongTensor:
        """Token ids padded to a fixed length: shape (number of texts, context_length).

        Over-long texts are cut keeping the end token last, as transformers' ``truncation=True``;
        with ``truncate=False`` they raise ValueError.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else _context_length(context_length, {})
        result = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, ids in enumerate(self._fit(texts, length, truncate)):
            if self.padding_side == "left":
                result[row, length - len(ids):] = ids
            else:
                result[row, : len(ids)] = ids
        return torch.from_numpy(result)  # type: ignore[return-value]

    def _fit(self, texts: list[str], length: int, truncate: bool) -> list[list[int]]:
        """Each text's ids, over-long ones cut to ``length`` (or refused when not ``truncate``)."""
        rows = self.encode_batch(texts)
        for text, ids in zip(texts, rows):
            if len(ids) > length and not truncate:
                shown = text if len(text) <= 40 else text[:40] + "..."
                raise ValueError(f"text {shown!r} has {len(ids)} tokens including the end token, more than "
                                 f"context_length={length}; shorten it or pass truncate=True")
        return [ids if len(ids) <= length else self._cut(text, ids, length) for text, ids in zip(texts, rows)]

    @abstractmethod
    def _cut(self, text: str, ids: list[int], length: int) -> list[int]:
        """``ids`` of ``text`` cut to ``length``, as the reference tokenizer cuts them."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Copies the tokenizer's files into ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.files:
            source = self.directory / name
            if source.is_file() and source.resolve() != (directory / name).resolve():
                shutil.copyfile(source, directory / name)
        return directory

    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the files transformers and OpenCLIP read: the tokenizer's own, copied (`save`)."""
        return self.save(directory)


class SentencePieceTokenizer(_DirectoryTokenizer):
    """SigLIP's tokenizer: a SentencePiece model with transformers' ``SiglipTokenizer`` text handling.

    Args:
        directory: holds ``spiece.model`` and, optionally, transformers' ``tokenizer_config.json``.
        context_length: default row length; the config's ``model_max_length``, else 64.
    """

    def __init__(self, directory: str | os.PathLike[str], *, context_length: int | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / SPIECE_FILE
        config = read_tokenizer_config(self.directory)
        self.model = spm.SentencePieceProcessor()
        try:
            self.model.Load(str(path))
        except (OSError, RuntimeError) as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{path}: not a SentencePiece model ({detail})") from None
        self.files = (SPIECE_FILE, *CONFIG_FILES)
        self.context_length = _context_length(context_length, config)
        self.lower = bool(config.get("do_lower_case", True))
        self.padding_side = config.get("padding_side", "right")
        eos, unk = _token(config, "eos_token", "</s>"), _token(config, "unk_token", "<unk>")
        pad = _token(config, "pad_token", eos)
        self.unk_token = unk
        self.eot_token_id, self.pad_token_id = self._id(eos, "eos_token"), self._id(pad, "pad_token")
        self.sot_token_id = None  # SigLIP has no start token
        self.vocab_size = self.model.get_piece_size()
        # Special tokens written in the text are kept whole.  The whitespace around them that
        # transformers may strip (an AddedToken's lstrip/rstrip) changes nothing here: the text
        # between them is stripped when canonicalised.
        self._specials = {token: self._id(token, "special token") for token in dict.fromkeys((eos, unk, pad)) if token}
        alternatives = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self._unk_length = len(self.model.encode(str(unk), out_type=str))

    def _id(self, token: str | None, what: str) -> int:
        index = self.model.piece_to_id(token) if token else -1
        if token is None or self.model.id_to_piece(index) != token:
            raise ValueError(f"{self.directory / SPIECE_FILE}: the {what} {token!r} of "
                             f"tokenizer_config.json is not a piece of the model")
        return index

    def _pieces(self, text: str) -> list[int]:
        """A stretch of text between special tokens: canonicalised, then encoded after the unknown
        token's spelling, whose pieces are dropped, so no word-start mark is added in front."""
        if self.lower:
            text = text.lower()
        text = " ".join(text.translate(_NO_PUNCTUATION).split())
        ids = self.model.encode(self.unk_token + text)
        return ids[self._unk_length:] if len(ids) >= self._unk_length else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for one text")
        return [self._encode_one(text) for text in self._clean(texts)]

    def _encode_one(self, text: str) -> list[int]:
        parts = self._split.split(_UNDERLINE + text.replace(_UNDERLINE, " "))
        chunks: list[list[int]] = []
        for i, part in enumerate(parts):
            if i % 2:
                chunks.append([self._specials[part]])
            elif part:
                chunks.append(self._pieces(part))
        # the word-start mark put in front is dropped when a special token follows it directly
        if len(chunks) > 1 and len(chunks[0]) == 1 and self.model.id_to_piece(chunks[0][0]) == _UNDERLINE:
            chunks = chunks[1:]
        ids = [i for chunk in chunks for i in chunk]
        return ids if ids and ids[-1] == self.eot_token_id else [*ids, self.eot_token_id]

    def _cut(self, text: str, ids: list[int], length: int) -> list[int]:
        # transformers cuts the text's own tokens to length - 1, then appends the end token
        body = ids[:-1] if ids[-1] == self.eot_token_id else ids
        body = body[: length - 1]
        return body if body and body[-1] == self.eot_token_id else [*body, self.eot_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, the special tokens left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        specials = set(self._specials.values())
        return self.model.decode([int(i) for i in ids if int(i) not in specials])


class GemmaTokenizer(_DirectoryTokenizer):
    """SigLIP 2's tokenizer: Gemma's byte-fallback BPE from ``tokenizer.json``, run by `tokenizers`.

    Args:
        directory: holds ``tokenizer.json`` and, optionally, transformers' ``tokenizer_config.json``.
        context_length: default row length; the config's ``model_max_length``, else 64.
    """

    def __init__(self, directory: str | os.PathLike[str], *, context_length: int | None = None) -> None:
        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        config = read_tokenizer_config(self.directory)
        model = _gemma_model(path)
        try:
            self.rust = _RustTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise ValueError(f"{path}: not a tokenizers file ({' '.join(str(err).split())})") from None
        self.files = ("tokenizer.json", *CONFIG_FILES)
        self.context_length = _context_length(context_length, config)
        tokens = {name: _token(config, f"{name}_token", default)
                  for name, default in (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>"))}
        ids = {name: self.rust.token_to_id(token) if token else None for name, token in tokens.items()}
        for name in ("eos", "pad"):
            if ids[name] is None:
                raise ValueError(f"{path}: the {name}_token {tokens[name]!r} of tokenizer_config.json is not in "
                                 f"its vocabulary of {len(model['vocab'])} tokens")
        self.eot_token_id, self.pad_token_id, self.sot_token_id = ids["eos"], ids["pad"], ids["bos"]
        self.vocab_size = self.rust.get_vocab_size(with_added_tokens=True)
        if "add_bos_token" in config or "add_eos_token" in config:  # transformers rebuilds the template
            add_bos = bool(config.get("add_bos_token")) and ids["bos"] is not None
            add_eos = bool(config.get("add_eos_token"))
            specials = [(tokens[n], ids[n]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on]
            single = " ".join([f"{tokens['bos']}:0"] * add_bos + ["$A:0"] + [f"{tokens['eos']}:0"] * add_eos)
            self.rust.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
        self.lower_cases = False
        if config.get("tokenizer_class") == "Siglip2Tokenizer":
            self.lower_case()
        self.padding_side = config.get("padding_side", "left" if config.get("tokenizer_class", "GemmaTokenizer")
                                       in GEMMA_CLASSES else "right")
        self.rust.no_padding()
        self.rust.no_truncation()

    def lower_case(self) -> GemmaTokenizer:
        """Lower-cases text first, as transformers' ``Siglip2Tokenizer`` does (set by the folder's
        ``tokenizer_class``, and for SigLIP 2's NaFlex models, whose folders transformers reads
        with that class whatever they name); once is enough.  Returns the tokenizer."""
        if not self.lower_cases:
            steps = [normalizers.Lowercase()] + ([self.rust.normalizer] if self.rust.normalizer is not None else [])
            self.rust.normalizer = normalizers.Sequence(steps)
            self.lower_cases = True
        return self

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for one text")
        return [e.ids for e in self.rust.encode_batch(self._clean(texts))]

    def _cut(self, text: str, ids: list[int], length: int) -> list[int]:
        # transformers cuts the text's own tokens so that they and the special tokens fit.
        self.rust.enable_truncation(length)
        try:
            return self.rust.encode(self._clean([text])[0]).ids
        finally:
            self.rust.no_truncation()

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, the special tokens left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=True)


def _gemma_model(path: Path) -> dict[str, Any]:
    """``tokenizer.json``'s model, checked to be a byte-fallback BPE as Gemma's is."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not model.get("byte_fallback"):
        kind = model.get("type") if isinstance(model, dict) else None
        what = "BPE without byte fallback" if kind == "BPE" else f"{kind or 'no'} model"
        raise ValueError(f"{path}: holds a {what}, not the byte-fallback BPE of Gemma's tokenizer "
                         "(SigLIP 2's)")
    return model


def is_siglip_tokenizer_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds SigLIP's ``spiece.model`` or a Gemma tokenizer (SigLIP 2's)."""
    directory = Path(directory)
    if (directory / SPIECE_FILE).is_file():
        return True
    if not (directory / "tokenizer.json").is_file():
        return False
    if read_tokenizer_config(directory).get("tokenizer_class") in GEMMA_CLASSES:
        return True
    try:  # no config naming the class: Gemma's model is the byte-fallback BPE
        model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(model, dict) and model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def siglip_tokenizer_from_dir(
    directory: str | os.PathLike[str], *, context_length: int | None = None
) -> SentencePieceTokenizer | GemmaTokenizer:
    """SigLIP's tokenizer when ``directory`` has ``spiece.model``, else SigLIP 2's (Gemma's)."""
    if (Path(directory) / SPIECE_FILE).is_file():
        return SentencePieceTokenizer(directory, context_length=context_length)
    return GemmaTokenizer(directory, context_length=context_length)
