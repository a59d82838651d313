"""The CLIP tokenizer: OpenAI's text cleaning and splitting in Python, byte-level BPE in `tokenizers`.

Ids equal those of OpenAI's ``SimpleTokenizer`` (github.com/openai/CLIP, copied as
``open_clip.tokenizer``) on any input.  Its steps: ``ftfy.fix_text``, ``html.unescape`` twice,
whitespace collapsed, lower case; the text split by OpenAI's regex (special tokens, contractions,
letter runs, single digits, other symbol runs); each piece's UTF-8 bytes mapped to printable
characters and merged by BPE, ``</w>`` ending each piece.

The merging runs in Hugging Face `tokenizers` (Rust), once per distinct piece: pieces seen before
come from a bounded memo, as OpenAI's own tokenizer caches them.  The split stays in Python with
OpenAI's pattern and flags because `tokenizers`' regex engine (Oniguruma) splits differently on
some non-ASCII text: case-insensitive matches such as ``'ſ``, combining marks such as U+0345, and
some letters (U+0558).
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer

from clipforge.model.config import OPENAI_CONTEXT_LENGTH
from clipforge.tokenizer._bpe_vocab import (
    END_OF_WORD,
    EOT_TOKEN,
    SOT_TOKEN,
    base_vocab,
    bytes_to_unicode,
    find_bpe,
    read_hf_dir,
    read_openai_bpe,
    vocab_from_merges,
)

if TYPE_CHECKING:
    from clipforge.tokenizer.siglip import GemmaTokenizer, SentencePieceTokenizer
    from clipforge.tokenizer.wordpiece import WordPieceTokenizer

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "Tokenizer",
    "clean_text",
    "load_tokenizer",
    "tokenize",
    "train_bpe",
    "train_tokenizer_cli",
]

DEFAULT_CONTEXT_LENGTH = OPENAI_CONTEXT_LENGTH
CONFIG_FILE = "clipforge_tokenizer.json"
# OpenAI's pre-tokenisation pattern after the special tokens (simple_tokenizer.py, re.IGNORECASE).
_PIECES = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Hugging Face's CLIP files: transformers' CLIPTokenizer splits with OpenAI's pattern, special tokens
# spelled as in OpenAI's code, and always treats pad and unknown as the end-of-text token.
_HF_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|" + _PIECES
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # what `save` and `save_hf` share
# Printable ASCII, tabs and line breaks but no "&": ftfy.fix_text and html.unescape leave such
# text unchanged (tests/test_tokenizer.py checks), so it can skip them; they dominate the cost.
_PLAIN = re.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")
# Distinct pieces remembered between calls; past this the memo starts afresh (about 20 MB).
_MEMO_SIZE = 100_000


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapsed, lower-cased."""
    if not _PLAIN.fullmatch(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """OpenAI's split then CLIP's byte symbols, as `tokenizers` pre-tokenizers (exact on ASCII text)."""
    pieces = pre_tokenizers.Split(Regex(_PIECES), behavior="removed", invert=True)
    return pre_tokenizers.Sequence([pieces, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _piece_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> _RustTokenizer:
    """A `tokenizers` BPE that maps pre-split pieces to CLIP's byte symbols and merges them."""
    rust = _RustTokenizer(models.BPE(dict(vocab), list(merges), end_of_word_suffix=END_OF_WORD))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return rust


class Tokenizer:
    """CLIP's byte-level BPE tokenizer with start/end-of-text tokens and a fixed context length.

    Args:
        vocab: token to id, tokens written with CLIP's byte symbols (``</w>`` ends a word).
        merges: BPE merges, highest priority first.
        sot_token: start-of-text token, prepended by `__call__`.
        eot_token: end-of-text token, appended by `__call__` and kept last when truncating.
        context_length: default row length of `__call__`.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        sot_token: str = SOT_TOKEN,
        eot_token: str = EOT_TOKEN,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ) -> None:
        for name, token in (("sot_token", sot_token), ("eot_token", eot_token)):
            if token not in vocab:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        self.context_length = _check_context_length(context_length)
        self.sot_token, self.eot_token = sot_token, eot_token
        self.sot_token_id, self.eot_token_id = vocab[sot_token], vocab[eot_token]
        self.vocab_size = max(vocab.values()) + 1
        self._special_ids = {sot_token: self.sot_token_id, eot_token: self.eot_token_id}
        self._id_to_token = {i: t for t, i in vocab.items()}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        specials = "|".join(regex.escape(t) for t in self._special_ids)
        self._pattern = regex.compile(f"{specials}|{_PIECES}", regex.IGNORECASE)
        self._vocab, self._merges = dict(vocab), [tuple(m) for m in merges]
        self._rust_pieces = _piece_bpe(vocab, merges)
        self._memo = self._fresh_memo()

    def _fresh_memo(self) -> dict[str, list[int]]:
        # Special tokens written in the text become their ids, as in OpenAI's tokenizer.
        return {token: [i] for token, i in self._special_ids.items()}

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without start/end tokens."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for one text")
        piece_lists = [self._pattern.findall(clean_text(text)) for text in texts]
        if len(self._memo) > _MEMO_SIZE:
            self._memo = self._fresh_memo()
        memo = self._memo
        new = list({piece for pieces in piece_lists for piece in pieces if piece not in memo})
        if new:  # one call into Rust for the whole batch, each piece a pre-split word
            encodings = self._rust_pieces.encode_batch_fast(
                [[piece] for piece in new], is_pretokenized=True, add_special_tokens=False
            )
            memo.update(zip(new, (e.ids for e in encodings)))
        return [[i for piece in pieces for i in memo[piece]] for pieces in piece_lists]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> torch.LongTensor:
        """Token ids framed by start/end tokens, zero padded: shape (number of texts, context_length).

        Args:
            texts: one text or a sequence of texts.
            context_length: row length; defaults to the tokenizer's.
            truncate: cut over-long texts to ``context_length`` keeping the end token last
                (OpenAI's behaviour); if False an over-long text raises ValueError.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else _check_context_length(context_length)
        result = np.zeros((len(texts), length), dtype=np.int64)
        for row, (text, ids) in enumerate(zip(texts, self.encode_batch(texts))):
            tokens = [self.sot_token_id, *ids, self.eot_token_id]
            if len(tokens) > length:
                if not truncate:
                    shown = text if len(text) <= 40 else text[:40] + "..."
                    raise ValueError(
                        f"text {shown!r} has {len(tokens)} tokens including start/end tokens, more than "
                        f"context_length={length}; shorten it or pass truncate=True"
                    )
                tokens = tokens[:length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return torch.from_numpy(result)  # type: ignore[return-value]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as OpenAI decodes it: ``</w>`` becomes a space, bad UTF-8 becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # tensors and arrays
        symbols = "".join(self._id_to_token[int(i)] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the tokenizer into ``directory``; returns it.

        ``clipforge_tokenizer.json`` (context length, special tokens) and Hugging Face's files as
        `save_hf` writes them but for ``vocab.json`` and ``merges.txt``: transformers'
        ``AutoTokenizer.from_pretrained(directory)`` reads them too.  `from_dir` reads the vocabulary back.
        """
        directory = self._write_hf(directory)
        config = {
            "context_length": self.context_length,
            "sot_token": self.sot_token,
            "eot_token": self.eot_token,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Writes Hugging Face's CLIP tokenizer files into ``directory``; returns it.

        ``vocab.json`` and ``merges.txt`` (the vocabulary, as older tools read it), ``tokenizer.json``
        (the whole pipeline, as transformers' ``CLIPTokenizer`` builds it: `tokenizers` alone gives
        its ids), ``tokenizer_config.json`` (``CLIPTokenizer``, ``model_max_length`` = the context
        length) and ``special_tokens_map.json``.  Pad and unknown are the end-of-text token, as in
        Hugging Face's own CLIP files: rows padded by transformers hold it where clipforge's hold 0,
        which changes no feature (the text tower reads the first end-of-text token, causally).

        transformers does not clean text as OpenAI does: where ``ftfy`` or ``html.unescape``
        change a caption (curly quotes, HTML entities, mojibake, ligatures, full-width forms) its
        ids differ from clipforge's, as with Hugging Face's copies of OpenAI's models.
        """
        directory = self._write_hf(directory)
        (directory / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(merge) for merge in self._merges)]
        (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return directory

    def _write_hf(self, directory: str | os.PathLike[str]) -> Path:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (`save_hf`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sot, eot = self.sot_token, self.eot_token
        full = _RustTokenizer(models.BPE(
            self._vocab, self._merges, unk_token=eot, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
        ))
        full.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        full.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_HF_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        full.decoder = decoders.ByteLevel()
        full.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (sot, eot)])
        full.post_processor = processors.RobertaProcessing(
            (eot, self.eot_token_id), (sot, self.sot_token_id), trim_offsets=False, add_prefix_space=False
        )
        full.save(str(directory / "tokenizer.json"))
        specials = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
        config = {"tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": self.context_length,
                  "clean_up_tokenization_spaces": False}
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_dir(
        cls, directory: str | os.PathLike[str], *, context_length: int | None = None
    ) -> Tokenizer | SentencePieceTokenizer | GemmaTokenizer | WordPieceTokenizer:
        """Reads a directory written by `save`, or a Hugging Face checkpoint's CLIP tokenizer files.

        A directory with SigLIP's ``spiece.model`` or SigLIP 2's Gemma ``tokenizer.json`` gives
        their tokenizer instead (`clipforge.tokenizer.siglip`), which pads to 64 tokens unless
        ``context_length`` says otherwise; one with BERT's ``vocab.txt`` or a WordPiece
        ``tokenizer.json`` (Chinese-CLIP's) gives `clipforge.tokenizer.wordpiece`'s, 52 tokens.
        """
        from clipforge.tokenizer.siglip import is_siglip_tokenizer_dir, siglip_tokenizer_from_dir
        from clipforge.tokenizer.wordpiece import WordPieceTokenizer, is_wordpiece_tokenizer_dir

        if is_wordpiece_tokenizer_dir(directory):
            return WordPieceTokenizer(directory, context_length=context_length)
        if is_siglip_tokenizer_dir(directory):
            return siglip_tokenizer_from_dir(directory, context_length=context_length)
        directory = Path(directory)
        bpe = read_hf_dir(directory)
        config_file = directory / CONFIG_FILE
        saved = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        return cls(
            bpe.vocab,
            bpe.merges,
            sot_token=saved.get("sot_token", bpe.sot_token),
            eot_token=saved.get("eot_token", bpe.eot_token),
            context_length=context_length or saved.get("context_length", DEFAULT_CONTEXT_LENGTH),
        )


def _check_context_length(context_length: int) -> int:
    if not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return context_length


def load_tokenizer(
    path: str | os.PathLike[str] | None = None,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    download: bool = True,
) -> Tokenizer:
    """OpenAI's CLIP tokenizer, or the one in a directory.

    The vocabulary is looked up in this order: ``path`` (OpenAI's ``bpe_simple_vocab_16e6.txt.gz``,
    a directory written by `Tokenizer.save`, or a Hugging Face checkpoint directory); the
    ``CLIPFORGE_BPE`` environment variable (the same choices); a package that ships OpenAI's file
    (open_clip, clip); the download cache; a download from OpenAI (only when ``download``).
    """
    found = find_bpe(path, download=download)
    if found.is_dir():
        return Tokenizer.from_dir(found, context_length=context_length)
    bpe = read_openai_bpe(found)
    return Tokenizer(
        bpe.vocab, bpe.merges, sot_token=bpe.sot_token, eot_token=bpe.eot_token, context_length=context_length
    )


@lru_cache(maxsize=1)
def _default_tokenizer() -> Tokenizer:
    return load_tokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, *, truncate: bool = True
) -> torch.LongTensor:
    """OpenAI's ``clip.tokenize``: ids framed by start/end tokens, shape (len(texts), context_length).

    Over-long texts are cut with the end token kept last; with ``truncate=False`` they raise
    ValueError.  The vocabulary is found as `load_tokenizer` finds it, once per process.
    """
    return _default_tokenizer()(texts, context_length, truncate=truncate)


# --------------------------------------------------------------------- training
def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> Tokenizer:
    """Learns a CLIP-style BPE vocabulary of at most ``vocab_size`` ids from ``texts``.

    Same cleaning, pre-tokenisation and ``</w>`` suffix as OpenAI's; the same layout too: 512 byte
    symbols, one token per merge, then ``<start_of_text>`` and ``<end_of_text>`` as the last ids.
    Fewer ids result when the corpus has no more pairs seen ``min_frequency`` times.
    """
    num_base = len(base_vocab()) + 2
    if not isinstance(vocab_size, int) or vocab_size < num_base:
        raise ValueError(
            f"vocab_size must be an integer of at least {num_base} (512 byte symbols and 2 special "
            f"tokens), got {vocab_size!r}"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be non-negative, got {min_frequency}")
    learner = _RustTokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    learner.pre_tokenizer = _clip_pre_tokenizer()
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        # Its count then holds our 512 symbols, so it learns at least the merges needed; the
        # surplus is dropped below.
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=alphabet,
        # Every end-of-word symbol named up front, in a fixed order: left to the trainer, they
        # get ids in the order of a hash map's iteration, which differs from call to call, and
        # pairs of equal count are ranked by those ids — the same captions gave different
        # merges (huggingface/tokenizers#1794).
        special_tokens=[c + END_OF_WORD for c in alphabet],
        end_of_word_suffix=END_OF_WORD,
    )
    learner.train_from_iterator((clean_text(t) for t in texts), trainer)
    learned = json.loads(learner.to_str())["model"]["merges"]
    seen, merges = set(base_vocab()), []
    for merge in (tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned):
        token = "".join(merge)
        if token not in seen:
            if len(seen) == vocab_size - 2:
                break
            seen.add(token)
        merges.append(merge)
    vocab = vocab_from_merges(merges)
    return Tokenizer(vocab, merges, context_length=context_length)  # type: ignore[arg-type]


def train_tokenizer_cli(
    corpus_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> Tokenizer:
    """``clipforge tokenizer train CORPUS OUT_DIR --vocab-size N``: prints the size and the directory,
    and a line on stderr when the corpus could not fill N ids.

    Trains with `train_bpe` and saves with `Tokenizer.save`.  ``corpus_path`` is a UTF-8 text file
    with one caption per line; blank lines are skipped.  A small corpus runs out of pairs seen
    ``min_frequency`` times before reaching ``vocab_size``; the vocabulary is then smaller.
    """
    with open(corpus_path, encoding="utf-8") as corpus:
        tokenizer = train_bpe(
            (line for line in corpus if line.strip()),
            vocab_size,
            min_frequency=min_frequency,
            context_length=context_length,
        )
    saved = tokenizer.save(out_dir)
    if tokenizer.vocab_size < vocab_size:
        print(f"note: the corpus filled {tokenizer.vocab_size} of the {vocab_size} ids asked: it has no more pairs "
              f"seen at least {min_frequency} times (a larger corpus, or a lower --min-frequency, gives more)",
              file=sys.stderr)
    print(f"trained a BPE vocabulary of {tokenizer.vocab_size} ids; saved to {saved}")
    return tokenizer
