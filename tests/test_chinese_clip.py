"""Tests for Chinese-CLIP: the BERT text tower (clipforge.model.bert), its presets, Hugging Face's
ChineseCLIPModel files both ways, and its WordPiece tokenizer (clipforge.tokenizer.wordpiece).

Parity: a tiny random-weight ChineseCLIPModel made in the reference environment by
tests/fixtures/make_chinese_clip_fixtures.py gives transformers' image and text features within 1e-5
in fp32 (texts padded, the padding masked as transformers' processor masks it), and its tokenizer
files give transformers' ids and attention masks.  The same script converted the fixture to
clipforge's format and back to hf, and loaded the export with transformers' AutoModel and
AutoProcessor (export_check.json); here the export is checked to hold what the fixture holds.
Neither transformers nor a network is needed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _preset_helpers import meta_model
from clipforge.checkpoints import CheckpointError, convert, load, load_for_inference, read_checkpoint
from clipforge.checkpoints.configs import config_from_hf, config_to_hf, config_to_openclip, infer_config
from clipforge.checkpoints.names import from_hf, to_clipforge_names, to_hf, to_openclip
from clipforge.cli import main
from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig, get_config, list_presets
from clipforge.model.bert import BertTextTransformer
from clipforge.templates import load_templates
from clipforge.tokenizer import Tokenizer
from clipforge.tokenizer.wordpiece import WordPieceTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chinese_clip"
HF_DIR = FIXTURES / "hf_chinese_clip"
TOLERANCE = 1e-5  # fp32, as the CLIP and SigLIP fixtures


def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "hf_chinese_clip.expected.safetensors"))


def tokenizer_record() -> dict:
    return json.loads((FIXTURES / "tokenizer.json").read_text(encoding="utf-8"))


def assert_matches(model: CLIP, tokens: torch.Tensor | None = None) -> None:
    expected = reference()
    tokens = expected["input_ids"] if tokens is None else tokens
    with torch.no_grad():
        image_features, text_features = model.encode_image(expected["images"]), model.encode_text(tokens)
        logits = model.logits(image_features, text_features)
    scale = float(model.logit_scale().detach())
    for key, value in (("image_features", image_features), ("text_features", text_features), ("logits", logits)):
        allowed = TOLERANCE * scale if key == "logits" else TOLERANCE  # 1e-5 on the cosines
        diff = (value - expected[key]).abs().max().item()
        assert diff <= allowed, f"{key}: max abs diff {diff:.2e} > {allowed:.1e}"


# ----------------------------------------------------------------------------- parity with transformers


def test_hugging_face_chinese_clip_matches_transformers():
    checkpoint = read_checkpoint(HF_DIR)
    assert checkpoint.format == "hf" and checkpoint.config.family == "chinese_clip"
    model, _, tokenizer = load(HF_DIR)
    assert_matches(model)
    assert isinstance(tokenizer, WordPieceTokenizer) and tokenizer.context_length == 52


def test_features_equal_transformers_from_clipforges_own_tokens():
    """The user's path: clipforge's tokenizer on the texts, then the model; the padding to 52
    tokens (transformers' reference padded to the longest text only) changes nothing."""
    model, _, tokenizer = load(HF_DIR)
    assert_matches(model, tokenizer(tokenizer_record()["texts"]))


def test_padding_is_masked_and_parity_check_can_fail_without_the_mask():
    """The features do not depend on how far a caption is padded; attending to the padding (transformers
    without an attention mask) would change them by far more than the tolerance."""
    model = load(HF_DIR)[0]
    tokens = reference()["input_ids"][:3]
    with torch.no_grad():
        padded = model.encode_text(tokens)
        longer = model.encode_text(torch.cat([tokens, torch.zeros(3, 12, dtype=torch.long)], dim=1))
        unmasked = replace(model.config, text=replace(model.config.text, pad_token_id=5))  # 5: "[MASK]", absent
        wrong = CLIP(unmasked).eval()
        wrong.load_state_dict(model.state_dict())
        attended = wrong.encode_text(tokens)
    torch.testing.assert_close(longer, padded, rtol=0, atol=1e-6)
    assert (attended - padded).abs().max() > 100 * TOLERANCE


def test_too_long_captions_are_named():
    model = load(HF_DIR)[0]
    message = r"token ids of length 65 \(padding aside\) exceed the model's context_length=64"
    with pytest.raises(ValueError, match=message):
        model.encode_text(torch.full((1, 65), 7))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = load(HF_DIR)[0].train()
    expected = reference()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(image=checkpointing, text=checkpointing)
        logits = model.logits(model.encode_image(expected["images"]), model.encode_text(expected["input_ids"]))
        logits.sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert "text.token_type_embedding" in plain and "text.transformer.resblocks.0.ln_1.weight" in plain
    for key, value in plain.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=0, atol=1e-6)


def test_base_size_record_shows_parity_with_transformers():
    """tests/fixtures/chinese_clip/base_parity.json, written by compare_chinese_clip_base.py in the
    reference environment: ViT-B/16 + RoBERTa-wwm-ext-base, random weights, against transformers."""
    record = json.loads((FIXTURES / "base_parity.json").read_text())
    assert {"torch", "transformers", "clipforge"} <= set(record["versions"]) and record["date"]
    (result,) = record["results"].values()
    assert result["towers_equal_preset_CN-CLIP-ViT-B-16"]
    assert result["params"] == meta_model("CN-CLIP-ViT-B-16").num_params()
    assert max(result["max_abs_diff"].values()) <= TOLERANCE


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", ["hf_chinese_clip", "tokenizer_saved"])
def test_tokenizer_ids_and_mask_equal_transformers(name):
    """vocab.txt + tokenizer_config.json (as OFA-Sys publish them), and the tokenizer.json transformers
    writes: [CLS]/[SEP], lower case, accents, CJK characters split, [UNK], [MASK] kept, a cut at 52."""
    record = tokenizer_record()
    tokenizer = Tokenizer.from_dir(FIXTURES / name)
    assert isinstance(tokenizer, WordPieceTokenizer)
    ids = tokenizer(record["texts"])
    assert ids.tolist() == record[name]["input_ids"]
    assert tokenizer.attention_mask(ids).long().tolist() == record[name]["attention_mask"]
    assert ids.shape == (len(record["texts"]), 52) and int(ids[-1, -1]) == tokenizer.sep_token_id  # cut, [SEP] kept


def test_tokenizer_refuses_over_long_text_when_asked():
    tokenizer = Tokenizer.from_dir(HF_DIR)
    message = r"has 67 tokens including \[CLS\] and \[SEP\], more than context_length=52"
    with pytest.raises(ValueError, match=message):
        tokenizer(tokenizer_record()["texts"][-1], truncate=False)
    assert tokenizer.decode(tokenizer("一只红色的猫")[0]) == "一 只 红 色 的 猫"


@pytest.mark.parametrize(("files", "message"), [
    ({"vocab.txt": "[UNK]\n[CLS]\n[SEP]\n"}, "vocab.txt: the pad_token '[PAD]' is not in its vocabulary of 3 tokens"),
    ({"vocab.txt": ""}, "vocab.txt: an empty vocabulary"),
    ({"vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n", "tokenizer_config.json": "{"},
     "tokenizer_config.json: not valid JSON"),
])
def test_bad_tokenizer_files_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as err:
        Tokenizer.from_dir(tmp_path)
    assert message in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- files both ways


def test_hugging_face_names_round_trip():
    theirs = load_file(str(HF_DIR / "model.safetensors"))
    ours, scheme = to_clipforge_names(theirs, HF_DIR)
    assert scheme == "hf" and "text.transformer.resblocks.1.attn.in_proj_weight" in ours
    back = to_hf(ours)
    assert sorted(back) == sorted(theirs)
    assert all(torch.equal(back[k], v) for k, v in theirs.items())


def test_a_bert_pooler_in_the_file_is_dropped_as_transformers_drops_it():
    theirs = load_file(str(HF_DIR / "model.safetensors"))
    extra = {"text_model.pooler.dense.weight": torch.zeros(32, 32), "text_model.pooler.dense.bias": torch.zeros(32)}
    assert from_hf(theirs | extra).keys() == from_hf(theirs).keys()


def test_convert_to_clipforge_and_back_to_hf_is_lossless(tmp_path):
    ours = convert(HF_DIR, tmp_path / "ours", to="clipforge")
    assert_matches(load(ours)[0])
    export = convert(ours, tmp_path / "hf", to="hf")
    theirs, back = load_file(str(HF_DIR / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert sorted(back) == sorted(theirs) and all(torch.equal(back[k], v) for k, v in theirs.items())
    # the config and processor files name what the fixture's name, with the same values
    original, written = (json.loads((d / "config.json").read_text()) for d in (HF_DIR, export))
    assert (written["model_type"], written["architectures"]) == ("chinese_clip", ["ChineseCLIPModel"])
    for tower in ("text_config", "vision_config"):
        for key, value in written[tower].items():
            assert original[tower][key] == value, (tower, key)
    assert written["projection_dim"] == original["projection_dim"]
    pre = json.loads((export / "preprocessor_config.json").read_text())
    assert (pre["image_processor_type"], pre["processor_class"]) == ("ChineseCLIPImageProcessor",
                                                                     "ChineseCLIPProcessor")
    # the tokenizer files: BertTokenizer's, with the same ids
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BertTokenizer" and config["model_max_length"] == 52
    assert (export / "vocab.txt").read_text() == (HF_DIR / "vocab.txt").read_text()
    record = tokenizer_record()
    assert Tokenizer.from_dir(export)(record["texts"]).tolist() == record["hf_chinese_clip"]["input_ids"]
    assert_matches(load(export)[0])


def test_transformers_loaded_the_export_unchanged():
    """export_check.json: make_chinese_clip_fixtures.py converted the fixture with clipforge and
    loaded the export with transformers' AutoModel and AutoProcessor."""
    record = json.loads((FIXTURES / "export_check.json").read_text())
    assert (record["model_class"], record["processor_class"]) == ("ChineseCLIPModel", "ChineseCLIPProcessor")
    assert (record["tokenizer_class"], record["image_processor_class"]) == ("BertTokenizer",
                                                                           "ChineseCLIPImageProcessor")
    assert record["ids_equal"] and max(record["max_abs_diff"].values()) == 0.0


def test_openclip_has_no_chinese_clip(tmp_path):
    for dst in (tmp_path / "oc", tmp_path / "oc.safetensors"):
        with pytest.raises(CheckpointError) as err:
            convert(HF_DIR, dst, to="openclip")
        assert str(err.value) == (f"{HF_DIR}: OpenCLIP has no Chinese-CLIP model (a BERT text tower); convert it "
                                  "to 'hf' or 'clipforge' instead")
        assert not dst.exists()
    model = load(HF_DIR)[0]
    with pytest.raises(CheckpointError, match="OpenCLIP has no Chinese-CLIP model"):
        config_to_openclip(model.config)
    with pytest.raises(CheckpointError, match="OpenCLIP has no Chinese-CLIP model"):
        to_openclip(model.state_dict())


@pytest.mark.parametrize("name", list_presets("chinese_clip"))
def test_a_bare_state_dict_reads_back_by_its_shapes(name):
    """clipforge-named tensors without a config (a bare .safetensors): the preset's towers, ViT-H/14's 80-wide
    heads and RoBERTa-large's 16 heads included."""
    preset = get_config(name)
    config = infer_config(meta_model(name).state_dict(), act="quick_gelu")
    assert (config.embed_dim, config.vision, config.text) == (preset.embed_dim, preset.vision, preset.text)


def test_unsupported_hugging_face_config_is_named():
    data = json.loads((HF_DIR / "config.json").read_text())
    data["text_config"]["position_embedding_type"] = "relative_key"
    path = HF_DIR / "config.json"
    with pytest.raises(CheckpointError) as err:
        config_from_hf(data, None, path)
    assert str(err.value) == (f"{path}: text_config.position_embedding_type='relative_key' is not supported "
                              "(ChineseCLIPModel's BERT adds absolute position embeddings)")
    data["text_config"].update(position_embedding_type="absolute", pad_token_id=500)
    with pytest.raises(CheckpointError, match="unsupported Hugging Face Chinese-CLIP config: TextConfig.pad_token_id"):
        config_from_hf(data, None, path)


# ----------------------------------------------------------------------------- presets and configs


def test_presets_list_the_released_sizes_apart_from_clips():
    assert list_presets("chinese_clip") == ["CN-CLIP-ViT-B-16", "CN-CLIP-ViT-L-14", "CN-CLIP-ViT-L-14-336",
                                            "CN-CLIP-ViT-H-14"]
    assert not set(list_presets("chinese_clip")) & set(list_presets())


def block_zero(name: str) -> bool:
    """Whether a Hugging Face tensor lies outside the repeated blocks, or in block 0 of either tower."""
    parts = name.split(".")
    return not any(a in ("layer", "layers") and b.isdigit() and b != "0" for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("name", list_presets("chinese_clip"))
def test_preset_has_the_tensors_and_parameter_count_of_the_released_model(name):
    """tests/fixtures/chinese_clip/preset_shapes.json: transformers' ChineseCLIPModel at the released sizes."""
    reference = json.loads((FIXTURES / "preset_shapes.json").read_text())["models"][name]
    model = meta_model(name)
    ours = {k: list(v.shape) for k, v in to_hf(model.state_dict()).items()}
    assert len(ours) == reference["tensors"] and model.num_params() == reference["params"]
    assert {k: v for k, v in ours.items() if block_zero(k)} == reference["shapes"]


@pytest.mark.parametrize("name", list_presets("chinese_clip"))
def test_preset_round_trips_through_hugging_faces_config(name):
    config = get_config(name)
    hf, pre = config_to_hf(config)
    back = config_from_hf(hf, pre, Path(name))
    assert (back.embed_dim, back.vision, back.text) == (config.embed_dim, config.vision, config.text)
    assert CLIPConfig.from_dict(config.to_dict()) == config
    assert isinstance(meta_model(name).text, BertTextTransformer)


def test_quickgelu_leaves_berts_gelu():
    config = get_config("CN-CLIP-ViT-B-16").with_activation("gelu")
    assert (config.vision.act, config.text.act) == ("gelu", "gelu")
    assert get_config("CN-CLIP-ViT-B-16").text.act == "gelu"


def test_clip_configs_do_not_carry_berts_fields():
    assert "pad_token_id" not in get_config("ViT-B-32").to_dict()["text"]
    with pytest.raises(ValueError, match="TextConfig.pad_token_id must be an id below vocab_size=10, got 10"):
        TextConfig(vocab_size=10, pool="cls", pad_token_id=10)
    with pytest.raises(ValueError, match="BertTextTransformer needs a text config with pool='cls'"):
        BertTextTransformer(TextConfig(), 8)
    assert CLIP(CLIPConfig(embed_dim=8, vision=VisionConfig(image_size=16, patch_size=8, width=16, heads=2, layers=1),
                           text=TextConfig(context_length=8, vocab_size=10, width=16, heads=2, layers=1,
                                           pool="cls"))).context_length == 8


# ----------------------------------------------------------------------------- the user's view


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An image folder of three classes named in Chinese, two images each."""
    root = tmp_path_factory.mktemp("photos")
    colours = {"猫": (200, 40, 40), "狗": (40, 40, 200), "车": (40, 180, 40)}
    for name, rgb in colours.items():
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40 + 8 * i, 36), tuple(c + 20 * i for c in rgb)).save(root / name / f"{i}.png")
    return root


def test_index_then_search_in_chinese(photos, tmp_path, capsys):
    out = tmp_path / "photos.index"
    assert main(["index", "build", "--model", str(HF_DIR), "--data", f"imagefolder:{photos}", "--out", str(out),
                 "--quiet", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), "一只红色的猫", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["query"] == {"text": "一只红色的猫"} and len(result["results"]) == 3
    # the scores are the model's own: its image and text features' cosines
    ready = load_for_inference(HF_DIR, device="cpu")
    with torch.no_grad():
        text = ready.model.encode_text(ready.tokenizer(["一只红色的猫"]), normalize=True)
        first = Path(result["results"][0]["path"])
        image = ready.model.encode_image(ready.preprocess(Image.open(first).convert("RGB"))[None], normalize=True)
    assert float(text @ image.T) == pytest.approx(result["results"][0]["score"], abs=1e-4)


def test_zeroshot_with_chinese_templates(photos, tmp_path, capsys):
    out = tmp_path / "zeroshot.json"
    assert main(["eval", "zeroshot", "--model", str(HF_DIR), "--data", f"imagefolder:{photos}", "--templates", "zh",
                 "--out", str(out), "--quiet", "--workers", "0", "--batch-size", "4"]) == 0
    result = json.loads(out.read_text())
    extra = result["clipforge"]
    assert extra["classes"] == ["狗", "猫", "车"] and extra["prompts"] == 3 * len(load_templates("zh"))
    assert extra["images_evaluated"] == 6 and 0 <= result["metrics"]["acc1"] <= 1
    assert result["language"] == "cn"  # CLIP_benchmark's code for Chinese prompts
