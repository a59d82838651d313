"""Chinese-CLIP's tokenizer: BERT's WordPiece, read from a checkpoint directory's own files.

    tokenizer = WordPieceTokenizer("chinese-clip-vit-base-patch16/")  # vocab.txt (or tokenizer.json)
    ids = tokenizer(["一只红色的猫", "a photo of 一只狗"])               # [2, 52]: [CLS] ... [SEP], then [PAD]
    mask = tokenizer.attention_mask(ids)                              # True where a token is not padding

The pipeline runs in Hugging Face `tokenizers` and is the one transformers' ``BertTokenizer``
(``AutoTokenizer`` for a ``ChineseCLIPModel`` directory) builds: ``BertNormalizer`` (control
characters removed, whitespace normalised, a space around each CJK character, lower case and
accents stripped per ``tokenizer_config.json``'s ``do_lower_case``, ``tokenize_chinese_chars`` and
``strip_accents``), ``BertPreTokenizer`` (whitespace and punctuation), WordPiece with ``##``
continuations and ``[UNK]``, then ``[CLS] text [SEP]``.  A directory's ``tokenizer.json`` is used as
written, as transformers uses it.  Special tokens written in the text keep their ids.

Rows are cut as transformers' ``truncation=True`` cuts them (the text's tokens, keeping [CLS] and
[SEP]) and padded on the right with the pad id ([PAD] = 0) to the context length: 52 tokens
unless told otherwise, Chinese-CLIP's caption length (``cn_clip.clip.tokenize``).  The ids and
`attention_mask` then equal transformers' ``tokenizer(texts, padding="max_length", truncation=True,
max_length=52)``; the text tower masks the pad id by itself (`clipforge.model.bert`), so padding
to the longest caption instead (``padding=True``) gives the same features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.decoders import WordPiece as WordPieceDecoder
from tokenizers.models import WordPiece

from clipforge.model.config import CHINESE_CLIP_CONTEXT_LENGTH
from clipforge.tokenizer._files import read_tokenizer_config

__all__ = ["VOCAB_FILE", "WordPieceTokenizer", "is_wordpiece_tokenizer_dir"]

VOCAB_FILE = "vocab.txt"  # BERT's vocabulary: one token a line, the line number its id
_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"}  # BertTokenizer's defaults
_BERT_CLASSES = ("BertTokenizer", "BertTokenizerFast", "ChineseCLIPTokenizer")


def _token(config: dict[str, Any], key: str) -> str:
    """A special token of ``tokenizer_config.json``: a string or an ``AddedToken``'s dict, else BERT's default."""
    value = config.get(key, _SPECIALS[key])
    return str(value.get("content") if isinstance(value, dict) else value)


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt as transformers' ``load_vocab`` reads it: the line number is the id (a repeated
    token keeps its last)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line
    if not lines:
        raise ValueError(f"{path}: an empty vocabulary")
    return {token.removesuffix("\r"): i for i, token in enumerate(lines)}


def _wordpiece_model(path: Path) -> dict[str, Any] | None:
    """``tokenizer.json``'s model when it is a WordPiece one, else None."""
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, dict) and model.get("type") == "WordPiece" else None


def is_wordpiece_tokenizer_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a BERT tokenizer: ``vocab.txt``, or a WordPiece ``tokenizer.json``
    that ``tokenizer_config.json`` does not give to another class."""
    directory = Path(directory)
    if (directory / VOCAB_FILE).is_file():
        return True
    if not (directory / "tokenizer.json").is_file() or _wordpiece_model(directory / "tokenizer.json") is None:
        return False
    try:
        named = read_tokenizer_config(directory).get("tokenizer_class")
    except ValueError:
        return True  # a BERT tokenizer all the same; reading it names the broken file
    return named is None or named in _BERT_CLASSES


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer with transformers' ``BertTokenizer`` pipeline, padded to a fixed length.

    Args:
        directory: holds ``vocab.txt`` or a WordPiece ``tokenizer.json``, and optionally
            transformers' ``tokenizer_config.json``.
        context_length: default row length; 52 (Chinese-CLIP's) unless given.
    """

    def __init__(self, directory: str | os.PathLike[str], *, context_length: int | None = None) -> None:
        self.directory = Path(directory)
        self.config = read_tokenizer_config(self.directory)
        self.context_length = _context_length(CHINESE_CLIP_CONTEXT_LENGTH if context_length is None
                                              else context_length)
        self.lower = bool(self.config.get("do_lower_case", True))
        self.chinese_chars = bool(self.config.get("tokenize_chinese_chars", True))
        strip = self.config.get("strip_accents")
        self.strip_accents = None if strip is None else bool(strip)
        self.tokens = {key: _token(self.config, key) for key in _SPECIALS}
        json_file = self.directory / "tokenizer.json"
        if json_file.is_file() and _wordpiece_model(json_file) is not None:
            try:
                self.rust = _RustTokenizer.from_file(str(json_file))
            except Exception as err:  # tokenizers raises its own Exception type
                raise ValueError(f"{json_file}: not a tokenizers file ({' '.join(str(err).split())})") from None
            source = json_file
        else:
            source = self.directory / VOCAB_FILE
            self.rust = self._build(_read_vocab(source))
        vocab = self.rust.get_vocab(with_added_tokens=True)
        for key in ("unk_token", "sep_token", "pad_token", "cls_token"):
            if self.tokens[key] not in vocab:
                raise ValueError(f"{source}: the {key} {self.tokens[key]!r} is not in its vocabulary of "
                                 f"{len(vocab)} tokens")
        self.cls_token_id, self.sep_token_id = vocab[self.tokens["cls_token"]], vocab[self.tokens["sep_token"]]
        self.pad_token_id = vocab[self.tokens["pad_token"]]
        self.sot_token_id, self.eot_token_id = self.cls_token_id, self.sep_token_id  # as CLIP's tokenizers name them
        self.vocab_size = max(vocab.values()) + 1
        self.rust.no_padding()
        self.rust.no_truncation()

    def _build(self, vocab: dict[str, int]) -> _RustTokenizer:
        """transformers' BertTokenizer pipeline over ``vocab`` (tokenization_bert.py builds the same)."""
        rust = _RustTokenizer(WordPiece(vocab, unk_token=self.tokens["unk_token"]))
        rust.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=self.chinese_chars,
                                                     strip_accents=self.strip_accents, lowercase=self.lower)
        rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        rust.decoder = WordPieceDecoder(prefix="##")
        present = [t for t in dict.fromkeys(self.tokens.values()) if t in vocab]
        rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
        cls, sep = self.tokens["cls_token"], self.tokens["sep_token"]
        if cls in vocab and sep in vocab:
            rust.post_processor = processors.TemplateProcessing(
                single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
        return rust

    # ----------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with [CLS] and [SEP], unpadded and uncut."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with [CLS] and [SEP], unpadded and uncut."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for one text")
        return [e.ids for e in self.rust.encode_batch(list(texts))]

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, *, truncate: bool = True
    ) -> torch.LongTensor:
        """Token ids padded with the pad id: shape (number of texts, context_length).

        Over-long texts are cut keeping [CLS] and [SEP], as transformers' ``truncation=True``;
        with ``truncate=False`` they raise ValueError.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = self.context_length if context_length is None else _context_length(context_length)
        if not truncate:
            for text, ids in zip(texts, self.encode_batch(texts)):
                if len(ids) > length:
                    shown = text if len(text) <= 40 else text[:40] + "..."
                    raise ValueError(f"text {shown!r} has {len(ids)} tokens including [CLS] and [SEP], more than "
                                     f"context_length={length}; shorten it or pass truncate=True")
        self.rust.enable_truncation(length)
        self.rust.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.tokens["pad_token"])
        try:
            rows = [e.ids for e in self.rust.encode_batch(texts)]
        finally:
            self.rust.no_padding()
            self.rust.no_truncation()
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), length)  # type: ignore[return-value]

    def attention_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """True where ``ids`` hold a token, False at padding: transformers' ``attention_mask`` for these rows."""
        return ids != self.pad_token_id

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, the special tokens left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self.rust.decode([int(i) for i in ids], skip_special_tokens=True)

    # ----------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the tokenizer's files into ``directory`` (`save_hf`'s); `WordPieceTokenizer` reads them back."""
        return self.save_hf(directory)

    def save_hf(self, directory: str | os.PathLike[str]) -> Path:
        """Writes ``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
        into ``directory``, as transformers' ``AutoTokenizer.from_pretrained(directory)`` reads them
        (``BertTokenizer``, ``model_max_length`` = the context length); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = self.rust.get_vocab(with_added_tokens=True)
        by_id = sorted(vocab.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(f"{self.directory}: its vocabulary's ids are not 0..{len(by_id) - 1}; vocab.txt "
                             "cannot hold it")
        (directory / VOCAB_FILE).write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
        self.rust.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k not in ("auto_map", "tokenizer_file", "name_or_path")}
        config |= {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lower,
                   "tokenize_chinese_chars": self.chinese_chars, "strip_accents": self.strip_accents,
                   **self.tokens, "model_max_length": self.context_length}
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", self.tokens)):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory


def _context_length(context_length: Any) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
    return context_length
