"""Loading details that reach the user: an OpenCLIP folder's image geometry, OpenAI's vocabulary
with ``HF_HUB_OFFLINE``, a linear probe of a model without a tokenizer, and the ``model`` /
``pretrained`` fields a command records for each kind of name."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.checkpoints import CheckpointError, convert, load, load_model, save
from clipforge.cli import main
from clipforge.cli._common import run_setup
from clipforge.model import CLIP, get_config
from clipforge.model.config import OPENAI_VOCAB_SIZE
from clipforge.tokenizer import _bpe_vocab, load_tokenizer, train_bpe
from clipforge.transforms import image_transform
from test_download import cache_repo, files_of


@pytest.fixture
def hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Hub offline, with an empty Hugging Face cache in tmp_path (returned)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "clipforge-cache"))
    return tmp_path / "hf"


# ----------------------------------------------------------------------------- OpenCLIP's preprocess_cfg


def openclip_folder(root: Path, **preprocess: object) -> Path:
    """A tiny-vit in OpenCLIP's layout whose config's preprocess_cfg also holds ``preprocess``."""
    torch.manual_seed(0)
    save(load_model("tiny-vit"), root / "saved")
    with pytest.warns(UserWarning, match="no tokenizer files written"):  # tiny-vit's vocabulary is not OpenAI's
        folder = convert(root / "saved", root / "openclip", to="openclip")
    config_file = folder / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    config["preprocess_cfg"].update(preprocess)
    config_file.write_text(json.dumps(config))
    return folder


def a_wide_image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (37, 90, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("where", ["folder", "hf-hub"])
def test_an_openclip_config_sets_the_resize_mode_and_interpolation(tmp_path, hub_offline, where):
    folder = openclip_folder(tmp_path, resize_mode="squash", interpolation="bilinear")
    name = str(folder)
    if where == "hf-hub":
        cache_repo(hub_offline, "org/squashed", files_of(folder))
        name = "hf-hub:org/squashed"
    model, preprocess, _ = load(name)
    vision = model.config.vision
    squash = image_transform(vision.image_size, mean=vision.mean, std=vision.std, resize_mode="squash",
                             interpolation="bilinear")
    crop = image_transform(vision.image_size, mean=vision.mean, std=vision.std)
    image = a_wide_image()
    assert torch.equal(preprocess(image), squash(image))
    assert not torch.equal(squash(image), crop(image))  # the image tells the two apart


def test_a_weights_file_alone_keeps_the_default_geometry(tmp_path):
    """The folder's config describes the folder; its weights file given alone carries no preprocessing."""
    folder = openclip_folder(tmp_path, resize_mode="squash")
    model, preprocess, _ = load(folder / "open_clip_model.safetensors")
    vision = model.config.vision
    crop = image_transform(vision.image_size, mean=vision.mean, std=vision.std)
    assert torch.equal(preprocess(a_wide_image()), crop(a_wide_image()))


def test_an_unknown_resize_mode_is_named_with_its_file(tmp_path):
    folder = openclip_folder(tmp_path, resize_mode="crop")
    with pytest.raises(CheckpointError, match=r"open_clip_config.json: preprocess_cfg: resize_mode .*'crop'"):
        load(folder)
    folder = openclip_folder(tmp_path / "b", interpolation=3)
    with pytest.raises(CheckpointError, match=r"open_clip_config.json: preprocess_cfg.interpolation must be a str"):
        load(folder)


# ----------------------------------------------------------------------------- OpenAI's vocabulary offline


@pytest.fixture
def nothing_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_offline: Path) -> Path:
    """No BPE file anywhere on this machine, the Hub offline; any download attempt fails the test."""
    monkeypatch.delenv(_bpe_vocab.BPE_ENV, raising=False)
    monkeypatch.setattr(_bpe_vocab, "_packaged_bpe", lambda: None)

    def no_download(url: str, timeout: float) -> None:
        raise AssertionError(f"tried to download {url} offline")

    monkeypatch.setattr(_bpe_vocab.urllib.request, "urlopen", no_download)
    return hub_offline


def test_offline_without_the_vocabulary_is_one_line_saying_where_to_put_it(nothing_local, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer()
    message = str(err.value)
    assert "\n" not in message and err.value.__cause__ is None and err.value.__context__ is None
    for hint in ("HF_HUB_OFFLINE", _bpe_vocab.BPE_FILENAME, str(tmp_path / "clipforge-cache"), _bpe_vocab.BPE_ENV):
        assert hint in message


def test_a_model_with_openais_vocabulary_offline_fails_in_one_line(nothing_local, tmp_path, capsys):
    config = get_config("tiny")
    config = replace(config, text=replace(config.text, vocab_size=OPENAI_VOCAB_SIZE))
    save(CLIP(config), tmp_path / "openai-vocab")  # no tokenizer saved: OpenAI's is looked for
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "openai-vocab"), "--data", "toy", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_the_vocabulary_is_read_from_the_hugging_face_cache(nothing_local, tmp_path):
    vocabulary = train_bpe(["a photo of a cat", "a dog"] * 5, 520, min_frequency=1).save_hf(tmp_path / "tok")
    snapshot = cache_repo(nothing_local, _bpe_vocab.BPE_HUB_REPO,
                          {name: vocabulary / name for name in ("vocab.json", "merges.txt")})
    assert _bpe_vocab.find_bpe() == snapshot
    assert load_tokenizer().vocab_size == len(json.loads((vocabulary / "vocab.json").read_text()))


# ----------------------------------------------------------------------------- a linear probe needs no tokenizer


def test_linear_probe_of_a_model_without_a_tokenizer(tmp_path, capsys):
    for split in ("train", "test"):
        for cls in range(2):
            for k in range(2):
                path = tmp_path / split / f"c{cls}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((16, 16, 3), 90 * cls + 20 * k, dtype=np.uint8)).save(path)
    torch.manual_seed(0)
    save(load_model("tiny"), tmp_path / "no-tokenizer")  # 4,096 ids, not OpenAI's: no tokenizer to find
    assert main(["eval", "linear-probe", "--model", str(tmp_path / "no-tokenizer"), "--train",
                 f"imagefolder:{tmp_path / 'train'}", "--test", f"imagefolder:{tmp_path / 'test'}", "--epochs", "1",
                 "--quiet", "--workers", "0", "--out", str(tmp_path / "lp.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "lp.json").read_text())["metrics"]["lp_acc1"] is not None


# ----------------------------------------------------------------------------- model and pretrained fields


class _Loaded:  # what run_setup reads of an InferenceModel
    device, precision, autocast_dtype = torch.device("cpu"), "fp32", None

    def __init__(self, source: str) -> None:
        self.source = source


@pytest.mark.parametrize(("name", "pretrained", "fields"), [
    ("ViT-B-32:openai", None, ("ViT-B-32", "openai")),
    ("ViT-B-32", "openai", ("ViT-B-32", "openai")),
    ("hf-hub:org/name@v1.0", None, ("hf-hub:org/name@v1.0", "hf-hub:org/name@v1.0")),
    ("org/name@v1.0", None, ("org/name@v1.0", "org/name@v1.0")),
    ("tiny", None, ("tiny", "random-init")),
])
def test_run_setup_records_what_the_name_means(name, pretrained, fields):
    setup = run_setup(_Loaded(name), name=name, pretrained=pretrained)
    assert (setup["model"], setup["pretrained"]) == fields


def test_run_setup_of_checkpoints_and_weights_files(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "ckpt.v2").mkdir()
    setup = run_setup(_Loaded(str(tmp_path / "ckpt.v2")), name=str(tmp_path / "ckpt.v2"))
    assert (setup["model"], setup["pretrained"]) == ("ckpt", str(tmp_path / "ckpt.v2"))
    setup = run_setup(_Loaded("tiny-vit"), name="tiny-vit", pretrained=str(weights))
    assert (setup["model"], setup["pretrained"]) == ("tiny-vit", str(weights))
