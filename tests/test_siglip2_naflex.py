"""SigLIP 2 NaFlex (transformers' ``Siglip2Model``, variable resolution): preprocessing, features,
files and commands.

Parity: tests/fixtures/make_siglip2_naflex_fixtures.py makes a tiny random Siglip2Model in the
reference environment (4-pixel patches, a 4 x 4 grid of learned positions, a budget of 24 patches)
and records what ``AutoProcessor.from_pretrained`` gives for pictures of several aspect ratios (some
padded, one enlarged) and for a few texts, and the model's outputs.  clipforge's preprocessing gives
the same grids and masks and the same pixel values (transformers' torchvision backend resizes with the
same torch call on this CPU; elsewhere it resizes in float and rounds, up to one grey level away,
which is the tolerance here), the same token ids, and features within 1e-5 in fp32.  The commands
run on the fixture folder as it is (a transformers directory).  Neither library is needed here.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.checkpoints import CheckpointError, convert, load, read_checkpoint
from clipforge.cli import main
from clipforge.embed import embed_images
from clipforge.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from clipforge.transforms import naflex_grid, naflex_transform, pack_patches, unpack_patches

FIXTURES = Path(__file__).parent / "fixtures" / "siglip2_naflex"
MODEL = FIXTURES / "model"
TOLERANCE = 1e-5  # fp32, as the other parity fixtures
SCALE = 112.0  # the fixture's logit scale: logits are compared per unit of it
RUN = ["--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((FIXTURES / "expected.json").read_text()), load_file(str(FIXTURES / "expected.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    model, preprocess, tokenizer = load(MODEL)
    return model.eval(), preprocess, tokenizer


def pictures(record: dict) -> list[Image.Image]:
    return [Image.open(FIXTURES / "images" / name) for name in record["images"]]


def transformers_inputs(expected: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' (pixel_values, pixel_attention_mask, spatial_shapes) as clipforge's packed inputs."""
    packed = []
    for values, mask, (rows, columns) in zip(expected["pixel_values"], expected["pixel_attention_mask"],
                                             expected["spatial_shapes"].tolist(), strict=True):
        assert int(mask.sum()) == rows * columns
        packed.append(pack_patches(values[: rows * columns], (rows, columns), values.shape[0]))
    return torch.stack(packed)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocessing_equals_transformers_image_processor(reference, loaded):
    record, expected = reference
    _, preprocess, _ = loaded
    assert record["image_processor"] == "Siglip2ImageProcessor"  # the torchvision backend
    packed = torch.stack([preprocess(image) for image in pictures(record)])
    grids = [grid for _, grid in unpack_patches(packed)]
    assert grids == [tuple(shape) for shape in expected["spatial_shapes"].tolist()]
    assert torch.equal(packed[..., 0].int(), expected["pixel_attention_mask"].int())
    # one grey level, divided by the smallest std (0.5), at most: see the module notes
    torch.testing.assert_close(packed[..., 2:], expected["pixel_values"], rtol=0, atol=1 / (255 * 0.5) + 1e-6)
    # some pictures fill the budget, others are padded; one 9x7 picture is enlarged
    counts = [rows * columns for rows, columns in grids]
    assert max(counts) == 24 and min(counts) < 24


def naive_grid(height: int, width: int, patch: int, budget: int) -> tuple[int, int]:
    """The grid at the largest scale whose grid fits the budget, in integers: the grid only grows at
    scales k * patch / side, where that side becomes k patches; the best grid is at one of them."""
    best = (1, 1)
    for side, other in ((height, width), (width, height)):
        for k in range(1, budget + 1):
            # at scale k * patch / side: this side is k patches, the other ceil(k * other / side)
            grid = (k, max(1, -(-k * other // side)))
            grid = grid if side == height else grid[::-1]
            if grid[0] * grid[1] <= budget and grid[0] * grid[1] > best[0] * best[1]:
                best = grid
    return best


def test_grid_is_the_largest_that_fits_the_budget():
    rng = random.Random(0)
    cases = [(30, 40, 4, 24), (61, 17, 4, 24), (7, 9, 4, 24), (224, 224, 16, 256), (1, 5000, 16, 256)]
    cases += [(rng.randint(1, 900), rng.randint(1, 900), rng.choice((4, 14, 16)), rng.choice((16, 24, 256, 1024)))
              for _ in range(200)]
    for height, width, patch, budget in cases:
        grid = naflex_grid(height, width, patch, budget)
        assert grid[0] * grid[1] == math.prod(naive_grid(height, width, patch, budget)), (height, width, patch, budget)
        assert grid[0] * grid[1] <= budget


def test_packed_inputs_carry_their_grid_and_bad_flags_are_named():
    patches = torch.randn(6, 12)
    packed = pack_patches(patches, (2, 3), 8)
    assert packed.shape == (8, 14)
    [(back, grid)] = unpack_patches(packed[None].bfloat16().float())  # flags survive bf16
    assert grid == (2, 3) and torch.equal(back, patches.bfloat16().float())
    broken = packed.clone()
    broken[6, 1] = 1  # a row start on a padding row
    with pytest.raises(ValueError, match=r"NaFlex input 0: its flag columns do not describe a grid of patches"):
        unpack_patches(broken[None])
    with pytest.raises(ValueError, match=r"a 5x5 grid has 25 patches, more than max_num_patches=24"):
        pack_patches(torch.zeros(25, 12), (5, 5), 24)
    with pytest.raises(ValueError, match=r"interpolation must be one of"):
        naflex_transform(16, 256, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="nearest")


# ----------------------------------------------------------------------------- features


def test_features_equal_transformers(reference, loaded):
    record, expected = reference
    model, preprocess, tokenizer = loaded
    tokens = tokenizer(record["texts"])
    assert torch.equal(tokens, expected["input_ids"])  # Siglip2Tokenizer: lower case, left padding to 64
    with torch.no_grad():
        from_transformers = model.encode_image(transformers_inputs(expected))
        ours = model.encode_image(torch.stack([preprocess(image) for image in pictures(record)]))
        text = model.encode_text(tokens)
        logits = model.logits(ours, text)
    torch.testing.assert_close(from_transformers, expected["image_features"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(ours, expected["image_features"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(text, expected["text_features"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=TOLERANCE * SCALE)


def test_batching_and_the_fast_path_do_not_change_features(reference, loaded):
    record, expected = reference
    model, preprocess, _ = loaded
    packed = torch.stack([preprocess(image) for image in pictures(record)])
    with torch.no_grad():
        together = model.encode_image(packed)
        alone = torch.cat([model.encode_image(p[None]) for p in packed])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    features = embed_images(model, packed, batch_size=3, progress=False)  # batches of mixed grids
    torch.testing.assert_close(features, torch.nn.functional.normalize(together, dim=-1), rtol=0, atol=1e-6)
    images = torch.randn(3, 3, 16, 16)  # fixed-size images, as `generate` and training give them, also embed
    with torch.no_grad():
        expected_images = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(embed_images(model, list(images), progress=False), expected_images, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match=r"or NaFlex patches \[P, 50\] or batches of them, got \[50\]"):
        embed_images(model, [torch.zeros(50)], progress=False)


def test_images_whose_sides_are_whole_patches_run_as_their_grid(loaded):
    model, _, _ = loaded
    images = torch.randn(2, 3, 12, 20)  # a 3 x 5 grid of 4-pixel patches
    patches = images.reshape(2, 3, 3, 4, 5, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 15, 48)
    packed = torch.stack([pack_patches(p, (3, 5), 24) for p in patches])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.encode_image(packed), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected NaFlex patches \[B, P, 50\] .* got \[2, 24, 12\]"):
        model.encode_image(torch.zeros(2, 24, 12))


# ----------------------------------------------------------------------------- config


def naflex_config(**vision) -> CLIPConfig:
    common = dict(width=32, layers=1, heads=4, act="gelu_tanh", layer_norm_eps=1e-6)
    v = dict(image_size=16, patch_size=4, pool="map", max_num_patches=24, **common) | vision
    return CLIPConfig(embed_dim=32, vision=VisionConfig(**v),
                      text=TextConfig(context_length=8, vocab_size=50, pool="last", **common), init_logit_bias=-10.0)


def test_config_round_trips_and_fixed_configs_keep_their_keys():
    config = naflex_config()
    assert CLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.vision.naflex and config.to_dict()["vision"]["max_num_patches"] == 24
    fixed = naflex_config(max_num_patches=None)
    assert "max_num_patches" not in fixed.to_dict()["vision"] and not fixed.vision.naflex
    with pytest.raises(ValueError, match=r"VisionConfig.max_num_patches \(NaFlex\) needs SigLIP's ViT"):
        VisionConfig(patch_size=16, max_num_patches=256)
    with pytest.raises(ValueError, match=r"VisionConfig.image_size=18 must be a multiple of patch_size=4 for NaFlex"):
        naflex_config(image_size=18)
    CLIP(config)  # builds


def test_config_from_transformers(loaded):
    model, _, _ = loaded
    v = model.config.vision
    assert (v.image_size, v.patch_size, v.max_num_patches, v.grid) == (16, 4, 24, 4)
    assert (v.mean, v.std) == ((0.5, 0.45, 0.4), (0.5, 0.55, 0.6))


def test_a_grid_of_positions_that_is_not_square_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "processor_config.json"):
        (folder / name).write_bytes((MODEL / name).read_bytes())
    config = json.loads((MODEL / "config.json").read_text())
    config["vision_config"]["num_patches"] = 15
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: vision_config.num_patches=15 is not a square grid"):
        read_checkpoint(folder)


# ----------------------------------------------------------------------------- convert


def test_convert_to_transformers_keeps_every_tensor_and_reads_back(reference, loaded, tmp_path):
    record, expected = reference
    there = convert(MODEL, tmp_path / "hf", to="hf")
    config = json.loads((there / "config.json").read_text())
    assert config["model_type"] == "siglip2" and config["architectures"] == ["Siglip2Model"]
    assert config["vision_config"]["num_patches"] == 16 and "image_size" not in config["vision_config"]
    pre = json.loads((there / "preprocessor_config.json").read_text())
    assert (pre["image_processor_type"], pre["processor_class"]) == ("Siglip2ImageProcessor", "Siglip2Processor")
    assert (pre["patch_size"], pre["max_num_patches"], pre["resample"]) == (4, 24, 2)
    original, exported = load_file(str(MODEL / "model.safetensors")), load_file(str(there / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)  # the Linear patch embedding included
    model, preprocess, tokenizer = load(there)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(image) for image in pictures(record)]))
        text = model.encode_text(tokenizer(record["texts"]))
    torch.testing.assert_close(image, expected["image_features"], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(text, expected["text_features"], rtol=0, atol=TOLERANCE)


def test_convert_to_clipforge_and_back_keeps_preprocessing_and_ids(reference, loaded, tmp_path):
    record, expected = reference
    folder = convert(MODEL, tmp_path / "ours", to="clipforge")
    model, preprocess, tokenizer = load(folder)
    assert model.config == loaded[0].config
    assert torch.equal(tokenizer(record["texts"]), expected["input_ids"])
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(image) for image in pictures(record)]))
    torch.testing.assert_close(image, expected["image_features"], rtol=0, atol=TOLERANCE)


def test_openclip_has_no_naflex_model(tmp_path, capsys):
    assert main(["convert", str(MODEL), str(tmp_path / "oc"), "--to", "openclip"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "OpenCLIP has no SigLIP 2 NaFlex (variable-resolution) model; convert it to 'hf' or 'clipforge'" in err
    with pytest.raises(CheckpointError, match="OpenCLIP has no SigLIP 2 NaFlex"):
        convert(MODEL, tmp_path / "oc.safetensors", to="openclip")


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, reference) -> Path:
    """The fixture's pictures (several grids) with captions, as a ``pairs:`` folder."""
    record, _ = reference
    folder = tmp_path_factory.mktemp("pairs")
    for index, name in enumerate(record["images"]):
        (folder / name).write_bytes((FIXTURES / "images" / name).read_bytes())
        (folder / name).with_suffix(".txt").write_text(f"picture number {index}")
    return folder


def test_eval_zeroshot_gives_sigmoid_probabilities(loaded, tmp_path, capsys):
    from clipforge.data import open_data
    from clipforge.zeroshot import build_zeroshot_classifier

    model, preprocess, tokenizer = loaded
    data, predictions = "shapes://?split=heldout&n=4&size=32", tmp_path / "predictions.csv"
    code = main(["eval", "zeroshot", "--model", str(MODEL), "--data", data, *RUN, "--quiet", "--predictions",
                 str(predictions)])
    assert code == 0, capsys.readouterr().err
    assert "per-class sigmoid" in capsys.readouterr().out
    rows = list(csv.DictReader(predictions.open(encoding="utf-8")))
    source = open_data(data)
    classifier = build_zeroshot_classifier(model, tokenizer, source.classnames, source.templates)
    features = embed_images(model, source.images(preprocess, batch_size=4), progress=False)
    with torch.no_grad():
        probabilities = torch.sigmoid(model.logits(features, classifier.T))
    assert len(rows) == len(probabilities) == 4
    for row, probs in zip(rows, probabilities, strict=True):
        assert row["predicted"] == source.classnames[int(probs.argmax())]
        assert float(row["probability"]) == pytest.approx(float(probs.max()), rel=1e-5)


def test_index_build_and_search_by_text_and_image(pairs, loaded, tmp_path, capsys):
    model, preprocess, tokenizer = loaded
    index = tmp_path / "index"
    assert main(["index", "build", "--model", str(MODEL), "--data", f"pairs:{pairs}", "--out", str(index), *RUN,
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "picture number 3", "-k", "7", "--json", "--device", "cpu"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 7
    with torch.no_grad():  # each hit's score is the cosine of the query and its picture
        text = model.encode_text(tokenizer(["picture number 3"]), normalize=True)[0]
        for hit in hits:
            image = model.encode_image(preprocess(Image.open(hit["path"]))[None], normalize=True)[0]
            assert hit["score"] == pytest.approx(float(image @ text), abs=1e-4)
    query = next(pairs.glob("picture2_*.png"))  # a 1-row grid
    assert main(["search", str(index), "--image", str(query), "-k", "1", "--json", "--device", "cpu"]) == 0
    [hit] = json.loads(capsys.readouterr().out)["results"]
    assert Path(hit["path"]).name == query.name and hit["score"] == pytest.approx(1.0, abs=1e-4)


def test_score_gives_each_pair_its_probability(pairs, loaded, tmp_path, capsys):
    model, _, _ = loaded
    captions = tmp_path / "captions.tsv"
    pngs = sorted(pairs.glob("*.png"))
    captions.write_text("".join(f"{p.name}\t{p.with_suffix('.txt').read_text()}\n" for p in pngs))
    out = tmp_path / "scores.json"
    assert main(["score", "--model", str(MODEL), "--images", str(pairs), "--captions", str(captions), "--device",
                 "cpu", "--quiet", "--out", str(out)]) == 0
    assert "P(match)" in capsys.readouterr().out
    rows = json.loads(out.read_text())["per_image"]
    assert len(rows) == len(pngs)
    scale, bias = float(model.logit_scale().detach()), float(model.logit_scale.bias.detach())
    for row in rows:
        assert row["probability"] == pytest.approx(1 / (1 + math.exp(-(scale * row["cosine"] + bias))), rel=1e-5)
