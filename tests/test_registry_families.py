"""The registry's SigLIP and SigLIP 2 names: what each entry records, against what OpenCLIP itself
uses for the same name (tests/fixtures/siglip/preset_shapes.json, written by
tests/fixtures/make_siglip_fixtures.py from open_clip), and loading one from a Hugging Face
cache laid out here: OpenCLIP's weights file read into the preset, the towers' activations the
entry records, and the tokenizer of the repository the entry names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipforge.checkpoints import load, load_model, read_checkpoint, registry
from clipforge.checkpoints.download import DownloadError, is_cached
from clipforge.checkpoints.names import to_openclip
from clipforge.checkpoints.registry import REGISTRY, SIGLIP_LICENCE, Preprocessing, Pretrained, list_pretrained
from clipforge.model import CLIP
from clipforge.model.config import PRESETS
from clipforge.tokenizer import Tokenizer
from test_download import cache, cache_repo, files_of, same_tensors  # noqa: F401 (cache: a fixture)

FIXTURES = Path(__file__).parent / "fixtures"
OPENCLIP = json.loads((FIXTURES / "siglip" / "preset_shapes.json").read_text(encoding="utf-8"))["models"]
SPIECE = FIXTURES / "siglip_tokenizers" / "siglip"
GEMMA = FIXTURES / "siglip_tokenizers" / "siglip2"


def siglip_entries() -> list[Pretrained]:
    return [e for e in REGISTRY.values() if "SigLIP" in e.architecture]


def test_every_siglip_preset_has_its_openclip_name_and_a_transformers_repository():
    names = {e.name for e in siglip_entries()}
    for arch in OPENCLIP:
        assert f"{arch}:webli" in names, arch
    hf = [e for e in siglip_entries() if e.layout == "hf"]
    assert {e.hub.split("/")[0] for e in hf} == {"google"} and len(hf) >= 19
    assert {e.name for e in list_pretrained("siglip2")} >= {"ViT-B-16-SigLIP2:webli", "google/siglip2-base-patch16-224"}


@pytest.mark.parametrize("arch", sorted(OPENCLIP))
def test_openclip_names_record_what_openclip_runs(arch):
    """Each tower's activation, the preprocessing, the parameters and the tokenizer's repository,
    as open_clip builds the model of that name."""
    entry, recorded = REGISTRY[f"{arch}:webli"], OPENCLIP[arch]
    assert (entry.activation, entry.text_activation or entry.activation) == (recorded["act"]["visual"],
                                                                             recorded["act"]["text"])
    pre, cfg = entry.preprocessing, recorded["pretrained"]["webli"]
    assert (tuple(pre.mean), tuple(pre.std)) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert (pre.resize_mode, pre.interpolation) == (cfg["resize_mode"], cfg["interpolation"])
    assert pre.image_size == recorded["image_size"] == PRESETS[arch].vision.image_size
    assert entry.params == recorded["params"]
    assert entry.tokenizer == recorded["model_cfg"]["text_cfg"]["hf_tokenizer_name"]
    assert entry.licence == SIGLIP_LICENCE and entry.layout == "openclip" and entry.hub.startswith("timm/")


def test_transformers_repositories_run_the_tanh_gelu_in_both_towers():
    for entry in siglip_entries():
        if entry.layout == "hf":
            assert entry.activations == "gelu_tanh" and entry.tokenizer is None, entry.name
            assert entry.preprocessing.resize_mode == "squash" and entry.preprocessing.mean == (0.5, 0.5, 0.5)


def test_mixed_activations_are_shown_per_tower():
    assert REGISTRY["ViT-B-16-SigLIP2:webli"].activations == "gelu / gelu_tanh"
    assert REGISTRY["ViT-B-16-SigLIP:webli"].activations == "gelu"
    with pytest.raises(ValueError, match="activation must be one of"):
        replace(REGISTRY["ViT-B-16-SigLIP:webli"], text_activation="relu")


# ----------------------------------------------------------------------------- loading one


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small random SigLIP with the vocabulary of the SentencePiece fixture, as OpenCLIP's bare
    weights file and as OpenCLIP's hub folder, with its config."""
    root = tmp_path_factory.mktemp("tiny-siglip")
    base = read_checkpoint(FIXTURES / "siglip" / "openclip_siglip.safetensors").config
    vocab = Tokenizer.from_dir(SPIECE, context_length=base.text.context_length).vocab_size
    config = replace(base, text=replace(base.text, vocab_size=vocab))
    torch.manual_seed(0)
    model = CLIP(config)
    weights = root / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in to_openclip(model.state_dict()).items()}, weights)
    return {"config": config, "weights": weights, "state": model.state_dict()}


@pytest.fixture
def tiny_entry(tiny_siglip, monkeypatch) -> Pretrained:
    monkeypatch.setitem(PRESETS, "tiny-siglip", tiny_siglip["config"])
    entry = Pretrained(name="tiny-siglip:test", architecture="tiny-siglip", tag="test", activation="gelu",
                       text_activation="gelu_tanh", tokenizer="org/siglip-tokenizer",
                       preprocessing=Preprocessing(tiny_siglip["config"].vision.image_size, (0.5,) * 3, (0.5,) * 3,
                                                   resize_mode="squash"),
                       licence="Apache-2.0", params=1, hub="org/siglip-weights")
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    return entry


@pytest.mark.usefixtures("cache")
def test_a_siglip_name_loads_its_weights_towers_and_tokenizer(tiny_siglip, tiny_entry, tmp_path):
    hf = tmp_path / "hf"
    cache_repo(hf, "org/siglip-weights", {"open_clip_model.safetensors": tiny_siglip["weights"]})
    assert not is_cached(tiny_entry)  # the weights alone are not enough: the tokenizer is the entry's too
    cache_repo(hf, "org/siglip-tokenizer", files_of(SPIECE))
    assert is_cached(tiny_entry)
    model, preprocess, tokenizer = load("tiny-siglip:test")
    state = model.state_dict()
    assert state.keys() == tiny_siglip["state"].keys()
    assert all(torch.equal(state[k], tiny_siglip["state"][k]) for k in state)
    assert (model.config.vision.act, model.config.text.act) == ("gelu", "gelu_tanh")
    assert preprocess.resize_mode == "squash"
    texts = ["A photo of a cat.", "two dogs"]
    context = model.config.text.context_length
    expected = Tokenizer.from_dir(SPIECE, context_length=context)(texts)
    assert torch.equal(tokenizer(texts), expected)
    assert load_model("tiny-siglip:test", act="gelu_tanh").config.vision.act == "gelu_tanh"  # act= overrides


@pytest.mark.usefixtures("cache")
def test_a_missing_tokenizer_repository_is_one_line(tiny_siglip, tiny_entry, tmp_path):
    cache_repo(tmp_path / "hf", "org/siglip-weights", {"open_clip_model.safetensors": tiny_siglip["weights"]})
    with pytest.raises(DownloadError) as err:
        load("tiny-siglip:test")
    message = str(err.value)
    assert message.startswith("org/siglip-tokenizer: a tokenizer vocabulary is not in the Hugging Face cache")
    assert ("`hf download org/siglip-tokenizer --include '*token*' --include '*.model' --include 'vocab*' "
            "--include 'merges.txt'`") in message
    assert "\n" not in message


@pytest.mark.usefixtures("cache")
def test_offline_the_first_message_names_every_download_a_name_needs(tiny_siglip, tiny_entry, tmp_path):
    """Weights and tokenizer live in two repositories (SigLIP 1's larger sizes): one message, both
    commands; following it, the load works."""
    with pytest.raises(DownloadError) as err:
        load("tiny-siglip:test")
    message = str(err.value)
    assert message.startswith("org/siglip-weights: open_clip_model.safetensors is not in the Hugging Face cache")
    assert ("run `hf download org/siglip-weights open_clip_model.safetensors` and `hf download org/siglip-tokenizer "
            "--include '*token*'") in message and "\n" not in message


@pytest.mark.usefixtures("cache")
def test_a_tokenizer_repository_without_a_vocabulary_is_named(tiny_siglip, tiny_entry, tmp_path):
    hf = tmp_path / "hf"
    cache_repo(hf, "org/siglip-weights", {"open_clip_model.safetensors": tiny_siglip["weights"]})
    cache_repo(hf, "org/siglip-tokenizer", {"tokenizer_config.json": SPIECE / "tokenizer_config.json"})
    assert not is_cached(tiny_entry)
    with pytest.raises(DownloadError, match="org/siglip-tokenizer: a tokenizer vocabulary is not in the Hugging"):
        load("tiny-siglip:test")


@pytest.mark.usefixtures("cache")
def test_an_openclip_hub_folder_reads_the_tokenizer_its_config_names(tiny_siglip, tiny_entry, tmp_path,
                                                                    monkeypatch):
    """OpenCLIP's SigLIP 1 configs name timm/ViT-B-16-SigLIP's tokenizer, not their own repository's.
    (OpenCLIP names a SigLIP image tower by timm's name: the small one is given one here.)"""
    from clipforge.checkpoints import configs, convert

    v = tiny_siglip["config"].vision
    monkeypatch.setitem(configs.TIMM_SIGLIP_TOWERS, "vit_small_test_siglip",
                        (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio, v.act))
    folder = convert(tiny_siglip["weights"], tmp_path / "openclip", to="openclip", tokenizer=SPIECE)
    config_file = folder / "open_clip_config.json"
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "org/siglip-tokenizer"
    config_file.write_text(json.dumps(data), encoding="utf-8")
    hf = tmp_path / "hf"
    cache_repo(hf, "org/siglip-openclip", {n: p for n, p in files_of(folder).items()
                                           if n in ("open_clip_config.json", "open_clip_model.safetensors")})
    cache_repo(hf, "org/siglip-tokenizer", files_of(SPIECE))
    model, _, tokenizer = load("hf-hub:org/siglip-openclip")
    assert same_tensors(model, load_model(tiny_siglip["weights"]))
    assert torch.equal(tokenizer(["a cat"]), Tokenizer.from_dir(SPIECE, context_length=16)(["a cat"]))


# ----------------------------------------------------------------------------- OpenCLIP's text cleaning

OPENCLIP_IDS = json.loads((FIXTURES / "siglip_tokenizers" / "openclip_ids.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
@pytest.mark.parametrize("cleaning", ["whitespace", "lower", "canonicalize"])
def test_openclips_cleaning_gives_openclips_ids(name, cleaning):
    """open_clip's HFTokenizer on the same files (tests/fixtures/make_siglip_tokenizer_fixtures.py
    openclip): its cleaning, then the tokenizer, for every caption of the fixture."""
    tokenizer = Tokenizer.from_dir(FIXTURES / "siglip_tokenizers" / name, context_length=OPENCLIP_IDS["max_length"])
    ids = tokenizer.clean_as(cleaning)(OPENCLIP_IDS["captions"])
    assert ids.tolist() == OPENCLIP_IDS[name][cleaning]


def test_cleaning_changes_the_ids_where_transformers_differs():
    """Without OpenCLIP's cleaning the Gemma tokenizer keeps case and punctuation, as transformers does."""
    tokenizer = Tokenizer.from_dir(GEMMA, context_length=64)
    plain = tokenizer(["A Photo Of A CAT!"])
    assert not torch.equal(plain, tokenizer.clean_as("canonicalize")(["A Photo Of A CAT!"]))
    assert torch.equal(tokenizer(["A Photo Of A CAT!"]), tokenizer(["a photo of a cat"]))
    with pytest.raises(ValueError, match="unknown text cleaning 'upper'"):
        tokenizer.clean_as("upper")


@pytest.mark.usefixtures("cache")
def test_openclip_names_and_folders_clean_as_their_configs_say(tiny_siglip, tiny_entry, tmp_path, monkeypatch):
    from clipforge.checkpoints import CheckpointError, configs, convert

    v = tiny_siglip["config"].vision
    monkeypatch.setitem(configs.TIMM_SIGLIP_TOWERS, "vit_small_test_siglip",
                        (v.image_size, v.patch_size, v.width, v.layers, v.heads, v.mlp_ratio, v.act))
    hf = tmp_path / "hf"
    cache_repo(hf, "org/siglip-tokenizer", files_of(GEMMA))
    monkeypatch.setitem(registry.REGISTRY, tiny_entry.name, replace(tiny_entry, text_cleaning="canonicalize"))
    vocab = Tokenizer.from_dir(GEMMA, context_length=16).vocab_size
    monkeypatch.setitem(PRESETS, "tiny-siglip", replace(tiny_siglip["config"],
                                                        text=replace(tiny_siglip["config"].text, vocab_size=vocab)))
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny-siglip"])
    save_file({k: v.contiguous() for k, v in to_openclip(model.state_dict()).items()},
              tmp_path / "open_clip_model.safetensors")
    cache_repo(hf, "org/siglip-weights", {"open_clip_model.safetensors": tmp_path / "open_clip_model.safetensors"})
    _, _, tokenizer = load("tiny-siglip:test")
    assert tokenizer.cleaning == "canonicalize"
    assert torch.equal(tokenizer(["A CAT!"]), tokenizer(["a cat"]))
    folder = convert(tmp_path / "open_clip_model.safetensors", tmp_path / "openclip", to="openclip", tokenizer=GEMMA)
    config_file = folder / "open_clip_config.json"
    for clean, expected in ((None, "whitespace"), ("lower", "lower"), ("canonicalize", "canonicalize")):
        data = json.loads(config_file.read_text(encoding="utf-8"))
        data["model_cfg"]["text_cfg"].pop("tokenizer_kwargs", None)
        if clean:
            data["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"clean": clean}
        config_file.write_text(json.dumps(data), encoding="utf-8")
        assert load(folder)[2].cleaning == expected
    data["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"clean": "shout"}
    config_file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "text_cfg.tokenizer_kwargs.clean is 'shout'" in str(err.value) and "\n" not in str(err.value)
    exported = convert(tmp_path / "open_clip_model.safetensors", tmp_path / "hf-export", to="hf", tokenizer=GEMMA)
    assert load(exported)[2].cleaning is None  # transformers' folders: text as transformers takes it


# ----------------------------------------------------------------------------- transformers' image processors


def test_a_transformers_siglip_folder_squashes_as_its_image_processor(tmp_path):
    """SiglipImageProcessor resizes to the square (no crop) with its ``resample`` filter;
    CLIPImageProcessor resizes the short side and crops."""
    import shutil

    from clipforge.checkpoints import CheckpointError

    folder = shutil.copytree(FIXTURES / "siglip" / "hf_siglip", tmp_path / "siglip")
    preprocess = load(folder)[1]
    assert (preprocess.resize_mode, preprocess.interpolation) == ("squash", "bicubic")
    file = folder / "preprocessor_config.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    file.write_text(json.dumps({**data, "resample": 2}), encoding="utf-8")
    assert load(folder)[1].interpolation == "bilinear"
    file.write_text(json.dumps({**data, "resample": 1}), encoding="utf-8")
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "preprocessor_config.json: resample=1 is not supported" in str(err.value) and "\n" not in str(err.value)
    file.write_text(json.dumps({**data, "image_processor_type": "CLIPImageProcessor"}), encoding="utf-8")
    assert load(folder)[1].resize_mode == "shortest"


def test_a_processor_without_its_centre_crop_squashes(tmp_path):
    """Chinese-CLIP's releases resize to the square (``do_center_crop: false``), as cn_clip's own
    transform does; a CLIP processor that crops keeps the short-side resize."""
    import shutil

    folder = shutil.copytree(FIXTURES / "siglip" / "hf_siglip", tmp_path / "siglip")
    file = folder / "preprocessor_config.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    clip = {**data, "image_processor_type": "ChineseCLIPImageProcessor"}
    file.write_text(json.dumps({**clip, "do_center_crop": False}), encoding="utf-8")
    assert load(folder)[1].resize_mode == "squash"
    file.write_text(json.dumps({**clip, "do_center_crop": True, "size": {"shortest_edge": 32}}), encoding="utf-8")
    assert load(folder)[1].resize_mode == "shortest"


# ----------------------------------------------------------------------------- Chinese-CLIP

CHINESE = json.loads((FIXTURES / "chinese_clip" / "preset_shapes.json").read_text(encoding="utf-8"))["models"]


def test_chinese_clips_four_transformers_releases_are_registered():
    entries = [e for e in REGISTRY.values() if e.architecture.startswith("CN-CLIP")]
    assert sorted(e.architecture for e in entries) == sorted(CHINESE)
    for entry in entries:
        assert entry.layout == "hf" and entry.hub.startswith("OFA-Sys/chinese-clip-vit-"), entry.name
        assert entry.params == CHINESE[entry.architecture]["params"]  # transformers' own count of the same shapes
        assert entry.activations == "quick_gelu / gelu"  # OpenAI's ViT, BERT's text tower
        assert entry.preprocessing.resize_mode == "squash" and entry.top1 is None
    assert REGISTRY["OFA-Sys/chinese-clip-vit-large-patch14-336px"].preprocessing.image_size == 336


@pytest.mark.usefixtures("cache")
def test_a_chinese_clip_name_keeps_berts_gelu(tmp_path, monkeypatch):
    """A registry entry's activations reach each tower: QuickGELU for the ViT, GELU for the BERT."""
    folder = FIXTURES / "chinese_clip" / "hf_chinese_clip"
    reference = load_model(folder)
    cache_repo(tmp_path / "hf", "org/cn-tiny", files_of(folder))
    entry = replace(REGISTRY["OFA-Sys/chinese-clip-vit-base-patch16"], name="org/cn-tiny", hub="org/cn-tiny",
                    preprocessing=Preprocessing(reference.config.vision.image_size, resize_mode="squash"))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    model, preprocess, tokenizer = load("org/cn-tiny")
    assert (model.config.vision.act, model.config.text.act) == ("quick_gelu", "gelu")
    assert same_tensors(model, reference) and preprocess.resize_mode == "squash"
    assert torch.equal(tokenizer(["一只红色的猫"]), load(folder)[2](["一只红色的猫"]))


@pytest.mark.usefixtures("cache")
def test_siglip2s_naflex_releases_are_registered_and_load_with_their_own_preprocessing(tmp_path, monkeypatch):
    """google/siglip2-*-naflex: transformers' Siglip2Model, read by its own config; images go
    through NaFlex's preprocessing (each at its own grid), not a square resize."""
    from clipforge.transforms import naflex_transform

    naflex = [e for e in REGISTRY.values() if e.name.endswith("-naflex")]
    assert {e.name for e in naflex} == {"google/siglip2-base-patch16-naflex", "google/siglip2-so400m-patch16-naflex"}
    assert all(e.layout == "hf" and e.activations == "gelu_tanh" for e in naflex)
    folder = FIXTURES / "siglip2_naflex" / "model"
    reference = load_model(folder)
    cache_repo(tmp_path / "hf", "org/naflex-tiny", files_of(folder))
    entry = replace(REGISTRY["google/siglip2-base-patch16-naflex"], name="org/naflex-tiny", hub="org/naflex-tiny",
                    preprocessing=replace(REGISTRY["google/siglip2-base-patch16-naflex"].preprocessing,
                                          image_size=reference.config.vision.image_size))
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    model, preprocess, _ = load("org/naflex-tiny")
    assert model.config.vision.naflex and same_tensors(model, reference)
    v = model.config.vision
    assert type(preprocess) is type(naflex_transform(v.patch_size, v.max_num_patches, mean=v.mean, std=v.std))

