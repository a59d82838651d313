"""clipforge.tokenizer against open_clip's ids (tests/fixtures/tokenizer_ids.json) and a naive BPE."""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import itertools
import json
import os
import random
import types
from pathlib import Path

import ftfy
import pytest
import torch

from clipforge import tokenizer
from clipforge.tokenizer import Tokenizer, _bpe_vocab, clean_text, load_tokenizer, train_bpe, train_tokenizer_cli
from clipforge.tokenizer._bpe_vocab import BPE_ENV, BPE_FILENAME, BPE_SHA256, bytes_to_unicode, find_bpe

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_ids.json"
_SHARED_BPE = Path(__file__).parents[2] / "shared" / "clip-bpe" / BPE_FILENAME
_REAL_PACKAGED_BPE = _bpe_vocab._packaged_bpe  # before any test replaces it


def _bpe_path() -> Path:
    for candidate in (os.environ.get(BPE_ENV), _SHARED_BPE):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip(f"OpenAI's {BPE_FILENAME} not found at {_SHARED_BPE} nor in ${BPE_ENV}")


@pytest.fixture(scope="module")
def bpe_path() -> Path:
    return _bpe_path()


@pytest.fixture(scope="module")
def clip(bpe_path: Path) -> Tokenizer:
    return load_tokenizer(bpe_path)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.fixture
def no_lookup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing to find: no environment variable, no package, empty caches, no network."""
    monkeypatch.delenv(BPE_ENV, raising=False)
    # Online, so that the download is tried (urlopen, replaced below, fails or serves it), with an
    # empty Hugging Face cache: the conftest sets HF_HUB_OFFLINE, which skips the download.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(_bpe_vocab, "_packaged_bpe", lambda: None)
    monkeypatch.setattr(_bpe_vocab, "cache_dir", lambda: tmp_path / "cache")

    def offline(url: str, timeout: float) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(_bpe_vocab.urllib.request, "urlopen", offline)


# ------------------------------------------------------------------ ids equal open_clip's
def test_vocabulary_layout(clip: Tokenizer) -> None:
    assert (clip.vocab_size, clip.sot_token_id, clip.eot_token_id, clip.context_length) == (49408, 49406, 49407, 77)


def test_ids_equal_open_clip(clip: Tokenizer, fixture: dict) -> None:
    wrong = [c["text"] for c in fixture["cases"] if clip.encode(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} texts tokenised differently, first: {wrong[0]!r}"
    batch = clip.encode_batch([c["text"] for c in fixture["cases"]])
    assert batch == [c["ids"] for c in fixture["cases"]]


def test_decode_equals_open_clip(clip: Tokenizer, fixture: dict) -> None:
    wrong = [c["text"] for c in fixture["cases"] if clip.decode(c["ids"]) != c["decoded"]]
    assert not wrong, f"{len(wrong)} decoded differently, first: {wrong[0]!r}"


def test_call_equals_open_clip_tokenize(clip: Tokenizer, fixture: dict) -> None:
    for case in fixture["tokenize"]:
        rows = clip(case["texts"], case["context_length"])
        assert rows.dtype == torch.long and rows.shape == (len(case["texts"]), case["context_length"])
        assert rows.tolist() == case["rows"]


def test_tokenize_function(monkeypatch: pytest.MonkeyPatch, bpe_path: Path, fixture: dict) -> None:
    monkeypatch.setenv(BPE_ENV, str(bpe_path))
    tokenizer._default_tokenizer.cache_clear()
    try:
        case = fixture["tokenize"][0]
        assert tokenizer.tokenize(case["texts"]).tolist() == case["rows"]
        assert tokenizer.tokenize(case["texts"][0]).tolist() == case["rows"][:1]
    finally:
        tokenizer._default_tokenizer.cache_clear()


# ------------------------------------------------------------------ behaviours
def test_truncation_keeps_end_token_last(clip: Tokenizer) -> None:
    rows = clip(["word " * 200, "short"], context_length=10)
    assert rows[0, 0] == clip.sot_token_id and rows[0, -1] == clip.eot_token_id
    assert (rows[0, 1:-1] == clip.encode("word")[0]).all()
    assert rows[1].tolist()[:3] == [clip.sot_token_id, *clip.encode("short"), clip.eot_token_id][:3]
    assert clip("a b c", context_length=1).tolist() == [[clip.eot_token_id]]  # OpenAI's rule, literally


def test_truncate_false_names_text_and_count(clip: Tokenizer) -> None:
    text = "tokens " * 100
    with pytest.raises(ValueError, match=r"'tokens tokens .*' has 102 tokens .*context_length=77"):
        clip([text], truncate=False)
    assert clip(["fits exactly"], context_length=4, truncate=False).tolist() == [
        [49406, *clip.encode("fits exactly"), 49407]
    ]


def test_invalid_arguments(clip: Tokenizer) -> None:
    with pytest.raises(ValueError, match="context_length"):
        clip("x", context_length=0)
    with pytest.raises(TypeError, match="encode_batch"):
        clip.encode_batch("a text, not a list")
    with pytest.raises(ValueError, match="sot_token"):
        Tokenizer({"a": 0}, [], sot_token="<s>", eot_token="a")


def test_decode_round_trip(clip: Tokenizer) -> None:
    for text in ["a photo of a cat", "naïve café in zürich", "日本語 🎉"]:
        assert clip.decode(clip.encode(text)) == " ".join(clean_text(text).split()) + " "
    assert clip.decode(torch.tensor(clip.encode("tensor ids"))) == "tensor ids "


def test_memo_does_not_change_ids(clip: Tokenizer, fixture: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "_MEMO_SIZE", 3)  # start afresh on nearly every call
    for case in fixture["cases"][:40]:
        assert clip.encode(case["text"]) == case["ids"]


def _reference_clean(text: str) -> str:
    """OpenAI's basic_clean then whitespace_clean, verbatim."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def test_clean_text_shortcut_matches_ftfy() -> None:
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] + [
        "\t",
        "\n",
        "\r",
        "\r\n",
        "&amp;",
        "&#39;",
        "é",
        "Ã©",
        "\x00",
        "\x1b[1m",
    ]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(3000)]
    texts += [a + b for a in alphabet[:97] for b in alphabet[:97]][::7]
    assert [clean_text(t) for t in texts] == [_reference_clean(t) for t in texts]


# ------------------------------------------------------------------ finding the vocabulary
def _export_hf_dir(bpe_path: Path, directory: Path) -> Path:
    """A Hugging Face CLIP checkpoint's vocab.json + merges.txt, written from OpenAI's file."""
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_hf_checkpoint_dir(bpe_path: Path, tmp_path: Path, clip: Tokenizer, fixture: dict) -> None:
    hf = load_tokenizer(_export_hf_dir(bpe_path, tmp_path / "hf"))
    assert (hf.sot_token_id, hf.eot_token_id, hf.vocab_size) == (49406, 49407, 49408)
    texts = [c["text"] for c in fixture["cases"] if "<" not in c["text"]]  # HF spells special tokens differently
    assert hf.encode_batch(texts) == clip.encode_batch(texts)


def test_tokenizer_json_dir(clip: Tokenizer, tmp_path: Path, fixture: dict) -> None:
    saved = clip.save(tmp_path / "saved")
    (saved / "clipforge_tokenizer.json").unlink()  # only Hugging Face's file is left
    again = load_tokenizer(saved, context_length=32)
    assert again.context_length == 32 and again.vocab_size == clip.vocab_size
    texts = [c["text"] for c in fixture["cases"]]
    assert again.encode_batch(texts) == clip.encode_batch(texts)


def test_lookup_order(bpe_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lookup: None) -> None:
    small = train_bpe(["a small corpus of words"] * 5, 600).save(tmp_path / "small")
    monkeypatch.setenv(BPE_ENV, str(small))
    assert find_bpe(bpe_path) == bpe_path  # explicit path first
    assert find_bpe() == small  # then the environment variable
    assert load_tokenizer().vocab_size < 600
    monkeypatch.delenv(BPE_ENV)
    # then a package shipping the file, found by importlib.util.find_spec without importing it
    empty, package = tmp_path / "empty" / "open_clip", tmp_path / "site" / "clip"
    empty.mkdir(parents=True)
    package.mkdir(parents=True)
    (package / BPE_FILENAME).write_bytes(bpe_path.read_bytes())
    specs = {"open_clip": empty, "clip": package}
    monkeypatch.setattr(_bpe_vocab, "_packaged_bpe", _REAL_PACKAGED_BPE)
    monkeypatch.setattr(
        _bpe_vocab.importlib.util,
        "find_spec",
        lambda name: types.SimpleNamespace(submodule_search_locations=[str(specs[name])]) if name in specs else None,
    )
    assert find_bpe() == package / BPE_FILENAME
    specs.pop("clip")
    with pytest.raises(FileNotFoundError, match="network disabled"):  # nothing left but the download
        find_bpe()


def test_cache_and_verified_download(
    bpe_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lookup: None
) -> None:
    good = bpe_path.read_bytes()
    served: list[bytes] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        assert url == _bpe_vocab.BPE_URL
        return io.BytesIO(served.pop())

    monkeypatch.setattr(_bpe_vocab.urllib.request, "urlopen", fake_urlopen)
    served.append(b"not the vocabulary")
    with pytest.raises(FileNotFoundError, match="SHA-256"):
        find_bpe()
    assert not (tmp_path / "cache" / BPE_FILENAME).exists()
    served.append(good)
    cached = find_bpe()
    assert cached == tmp_path / "cache" / BPE_FILENAME
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == BPE_SHA256
    assert find_bpe() == cached and not served  # found in the cache, no second download


def test_clear_error_when_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lookup: None) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer()
    message = str(err.value)
    for hint in (BPE_ENV, "open_clip_torch", _bpe_vocab.BPE_URL, "vocab.json", "network disabled"):
        assert hint in message
    with pytest.raises(FileNotFoundError, match="download disabled"):
        find_bpe(download=False)
    with pytest.raises(FileNotFoundError, match="path '.*missing.txt.gz' does not exist"):
        find_bpe(tmp_path / "missing.txt.gz")
    monkeypatch.setenv(BPE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=f"{BPE_ENV} '.*nowhere' does not exist"):
        find_bpe()


# ------------------------------------------------------------------ training a vocabulary
CORPUS = [
    "a photo of a cat on a mat",
    "a photo of a dog in the park",
    "two cats and a dog playing together",
    "the dog chases the cat around the park",
    "a close-up photo of a tabby cat's face",
    "a red car parked on a street in the rain",
    "a bowl of ramen with an egg, 日本語",
] * 20


def _naive_bpe_ids(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """OpenAI's SimpleTokenizer.bpe, restated: merge the lowest-ranked adjacent pair until none is left."""
    ranks = {m: r for r, m in enumerate(merges)}
    encoder = bytes_to_unicode()
    ids = []
    for piece in tokenizer.regex.findall(tokenizer._PIECES, clean_text(text), tokenizer.regex.IGNORECASE):
        word = [encoder[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(itertools.pairwise(word))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            pair, out, j = (word[i], word[i + 1]), [], 0
            while j < len(word):  # merge every occurrence, left to right
                if j < len(word) - 1 and (word[j], word[j + 1]) == pair:
                    out.append(word[j] + word[j + 1])
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            word = out
        ids += [vocab[s] for s in word]
    return ids


def test_train_bpe_layout_and_ids(tmp_path: Path) -> None:
    trained = train_bpe(CORPUS, 560)
    assert trained.vocab_size == 560
    assert (trained.sot_token_id, trained.eot_token_id) == (558, 559)
    saved = trained.save(tmp_path / "trained")
    model = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    assert list(model["vocab"])[:512] == _bpe_vocab.base_vocab()
    for text in CORPUS[:7] + ["an unseen sentence, with ünïcode!"]:
        assert trained.encode(text) == _naive_bpe_ids(text, model["vocab"], merges)
    assert len(trained.encode("a photo of a cat")) == 5  # one token per frequent word
    again = Tokenizer.from_dir(saved)
    assert again(CORPUS[:7]).tolist() == trained(CORPUS[:7]).tolist()


def test_train_bpe_gives_the_same_merges_every_time() -> None:
    """Pairs of equal count are common in a small caption corpus; left to the trainer, their
    order followed hash-map iteration and 15 trainings on these captions gave 2 different
    vocabularies (before end-of-word symbols were named up front)."""
    from clipforge.data.shapes import ShapesDataset

    captions = [ShapesDataset(n=40, size=32).caption(k) for k in range(40)]
    encodings = {tuple(map(tuple, train_bpe(captions, 600, context_length=32)(captions).tolist())) for _ in range(15)}
    assert len(encodings) == 1


def test_train_bpe_small_corpus_and_errors() -> None:
    tiny = train_bpe(["ab ab ab"], 5000)  # runs out of pairs long before 5000 ids
    assert tiny.vocab_size < 530 and tiny.eot_token_id == tiny.vocab_size - 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(CORPUS, 100)


def test_train_tokenizer_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(CORPUS) + "\n\n", encoding="utf-8")
    trained = train_tokenizer_cli(corpus, tmp_path / "out", 540)
    assert "540 ids" in capsys.readouterr().out
    assert Tokenizer.from_dir(tmp_path / "out").encode("a photo") == trained.encode("a photo")
