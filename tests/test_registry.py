"""Tests for clipforge.checkpoints.registry: the entries against the presets and their sources,
the grammar of model names, its precedence, and the one-line errors for unknown names.

Nothing is downloaded: `resolve` only says what a name means.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import load_model, save
from clipforge.checkpoints.registry import (
    ARCHITECTURE_PARAMS,
    REGISTRY,
    UnknownModelError,
    architectures,
    list_pretrained,
    resolve,
    tags,
)
from clipforge.model import CLIP
from clipforge.model.config import PRESETS, get_config

OPENAI_RELEASES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


# ----------------------------------------------------------------------------- the entries


def test_openais_nine_releases_are_registered_with_quickgelu():
    for arch in OPENAI_RELEASES:
        entry = REGISTRY[f"{arch}:openai"]
        assert entry.activation == "quick_gelu" and entry.hub.startswith("timm/") and entry.hub.endswith(".openai")
        assert entry.url.startswith("https://openaipublic.azureedge.net/clip/models/")


def test_every_architecture_fits_the_preset_of_that_name(monkeypatch):
    """Parameters and input size of each registered architecture, against the preset where this
    version of clipforge has it (the large ones may be missing: loading them then says so).
    Models are built on the meta device without their random init, which only costs time there."""
    for name in ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    checked = 0
    for arch in architectures():
        assert arch in ARCHITECTURE_PARAMS, arch
        if arch not in PRESETS:
            continue
        config = get_config(arch)
        with torch.device("meta"):
            params = sum(p.numel() for p in CLIP(config).parameters())
        assert params == ARCHITECTURE_PARAMS[arch], arch
        for entry in REGISTRY.values():
            if entry.architecture == arch:
                assert entry.preprocessing.image_size == config.vision.image_size, entry.name
                assert entry.params == params
        checked += 1
    assert checked >= 9  # OpenAI's nine at least


def test_checksums_agree_with_the_addresses_that_carry_them():
    """OpenAI's addresses carry the file's SHA-256 as a folder; OpenCLIP's release names end in
    its first 8 hex digits (the prefix OpenCLIP checks)."""
    for entry in REGISTRY.values():
        if entry.url is None:
            assert entry.sha256 is None
            continue
        parts = entry.url.split("/")
        if "openaipublic" in entry.url:
            assert entry.sha256 == parts[-2] and len(entry.sha256) == 64, entry.name
        elif "mlfoundations" in entry.url:
            assert entry.sha256 == Path(parts[-1]).stem.rsplit("-", 1)[1] and len(entry.sha256) == 8, entry.name
        else:  # MetaCLIP's addresses carry none
            assert entry.sha256 is None, entry.name


def test_addresses_do_not_collide_in_the_cache():
    """clipforge's cache keeps a download under its file name: no two addresses share one."""
    names = [Path(e.url).name for e in REGISTRY.values() if e.url]
    assert len(names) == len(set(names))


def test_every_entry_says_where_its_numbers_come_from():
    for entry in REGISTRY.values():
        assert (entry.top1 is None) == (entry.top1_source is None), entry.name
        assert entry.top1 is None or 0.3 < entry.top1 < 0.9, entry.name
        assert entry.download_size == 4 * entry.params and "estimated" in entry.size_note
        assert entry.licence and (entry.hub or entry.url)


def openclip_pretrained() -> dict[str, dict]:
    """OpenCLIP's pretrained configs per ``ARCH:TAG`` (quick_gelu, mean, std, resize_mode), as
    tests/fixtures/parity/preset_shapes.json recorded them from open_clip itself."""
    import json

    fixture = Path(__file__).parent / "fixtures" / "parity" / "preset_shapes.json"
    models = json.loads(fixture.read_text(encoding="utf-8"))["models"]
    return {f"{arch}:{tag}": cfg for arch, model in models.items() for tag, cfg in model.get("pretrained", {}).items()}


def openclip_entries() -> list:
    """CLIP's OpenCLIP names (SigLIP's are checked against their own record: test_registry_families.py)."""
    return [e for e in REGISTRY.values()
            if e.layout != "hf" and e.name == f"{e.architecture}:{e.tag}" and "SigLIP" not in e.architecture]


def test_activations_follow_openclip():
    """Each entry's activation is the one OpenCLIP uses for the same weights (its quick_gelu)."""
    recorded = openclip_pretrained()
    compared = [e for e in openclip_entries() if e.name in recorded]
    for entry in compared:
        assert entry.activation == ("quick_gelu" if recorded[entry.name]["quick_gelu"] else "gelu"), entry.name
    assert len(compared) >= 0.9 * len(openclip_entries()) and len(compared) > 30


def test_preprocessing_follows_openclip():
    """mean, std and resize mode as OpenCLIP preprocesses for the same weights."""
    recorded = openclip_pretrained()
    compared = [e for e in openclip_entries() if e.name in recorded]
    for entry in compared:
        cfg, pre = recorded[entry.name], entry.preprocessing
        assert tuple(pre.mean) == pytest.approx(tuple(cfg["mean"])), entry.name
        assert tuple(pre.std) == pytest.approx(tuple(cfg["std"])), entry.name
        assert pre.resize_mode == cfg["resize_mode"], entry.name
    assert len(compared) >= 0.9 * len(openclip_entries()) and len(compared) > 30


def test_the_transformers_ids_and_the_largest_laion_models_are_there():
    for repo in ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14",
                 "openai/clip-vit-large-patch14-336", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        assert REGISTRY[repo].layout == "hf" and REGISTRY[repo].hub == repo
    for name in ("ViT-H-14:laion2b_s32b_b79k", "ViT-g-14:laion2b_s34b_b88k", "ViT-bigG-14:laion2b_s39b_b160k"):
        assert REGISTRY[name].hub.startswith("laion/")


def test_list_pretrained_filters_by_substring_or_glob():
    found = {e.name for e in list_pretrained("LAION2B_S3")}
    assert found >= {"ViT-B-32:laion2b_s34b_b79k", "ViT-H-14:laion2b_s32b_b79k"}
    assert {e.name for e in list_pretrained("ViT-L-14:*")} == {f"ViT-L-14:{t}" for t in tags("ViT-L-14")}
    assert list_pretrained("no such thing") == []
    assert len(list_pretrained()) == len(REGISTRY)


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, pretrained, kind, expected", [
    ("ViT-B-32", "openai", "pretrained", {"name": "ViT-B-32:openai"}),
    ("ViT-B-32", "LAION2B-S34B-B79K", "pretrained", {"name": "ViT-B-32:laion2b_s34b_b79k"}),
    ("ViT-B-32:openai", None, "pretrained", {"name": "ViT-B-32:openai"}),
    ("ViT-B-32-quickgelu:metaclip_400m", None, "pretrained", {"name": "ViT-B-32:metaclip_400m"}),
    ("openai/clip-vit-base-patch32", None, "pretrained", {"name": "openai/clip-vit-base-patch32"}),
    ("openai/clip-vit-base-patch32@main", None, "pretrained", {"revision": "main"}),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, "hub",
     {"repo_id": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "layout": "openclip", "revision": None}),
    ("hf-hub:org/name@abc123", None, "hub", {"repo_id": "org/name", "revision": "abc123"}),
    ("org/name", None, "hub", {"repo_id": "org/name", "layout": "auto"}),
    ("org/name@v1.0", None, "hub", {"repo_id": "org/name", "revision": "v1.0"}),
    ("ViT-B-32", None, "preset", {"architecture": "ViT-B-32"}),
    ("tiny-quickgelu", None, "preset", {"architecture": "tiny-quickgelu"}),
])
def test_the_grammar(name, pretrained, kind, expected):
    where = resolve(name, pretrained)
    assert where.kind == kind
    for key, value in expected.items():
        assert getattr(where, key) == value, key


def one_line_error(name: str, pretrained: str | None = None) -> str:
    with pytest.raises(UnknownModelError) as err:
        resolve(name, pretrained)
    assert isinstance(err.value, FileNotFoundError)  # as a missing path always was
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, pretrained, expected", [
    ("ViT-B-32:opnai", None, "ViT-B-32 has no pretrained tag 'opnai'; did you mean openai?"),
    ("ViT-B-32", "laion2b", "did you mean laion2b_e16"),
    ("ViT-L-14:laion", None, "(its tags: openai, laion400m_e31, "),
    ("ViT-B-23:openai", None, "unknown architecture 'ViT-B-23'; did you mean ViT-B-32"),
    ("ViT-B33", None, "nor a known model name; did you mean ViT-B-32"),
    ("no-such-model", None, "architectures: tiny, tiny-vit, ViT-B-32"),
    ("tiny:openai", None, "no released weights for tiny"),
    ("ViT-B/32", None, "'ViT-B/32' is OpenAI's name for it; clipforge's is ViT-B-32:openai"),
    ("ViT-B-32-quickgelu:laion2b_s34b_b79k", None, "trained with GELU, not QuickGELU; drop the -quickgelu suffix"),
    ("/no/such/dir", None, "neither an existing file or directory"),
    ("runs/x/model.pt", None, "neither an existing file or directory"),
    ("hf-hub:not a repo", None, "not a Hugging Face repository id; expected hf-hub:ORG/NAME"),
])
def test_unknown_names_give_one_line_with_the_closest_names(name, pretrained, expected):
    assert expected in one_line_error(name, pretrained)


def test_pretrained_goes_with_an_architecture(tmp_path):
    save(load_model("tiny"), tmp_path / "ckpt")
    assert "goes with an architecture name" in one_line_error(str(tmp_path / "ckpt"), "openai")
    assert "unknown architecture 'nothing'" in one_line_error("nothing", str(tmp_path / "ckpt"))


def test_a_local_path_wins_over_a_registry_name_and_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("openai/clip-vit-base-patch32").kind == "pretrained"
    assert resolve("org/name").kind == "hub"
    for name in ("openai/clip-vit-base-patch32", "org/name", "ViT-B-32:openai", "ViT-B-32"):
        Path(name).mkdir(parents=True)
        where = resolve(name)
        assert (where.kind, where.path) == ("path", Path(name)), name


def test_a_registry_name_wins_over_a_repo_id_and_keeps_its_entry():
    where = resolve("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert where.kind == "pretrained" and where.entry.layout == "hf" and where.entry.activation == "gelu"
    assert resolve("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K").kind == "hub"  # hf-hub: asks for the repo


def test_the_grammar_is_written_where_users_read_it():
    import clipforge.checkpoints.registry as registry
    from clipforge.checkpoints import load

    for doc in (registry.__doc__, load.__doc__):
        for form in ("hf-hub:", "pretrained=", "@", "ViT-B-32:openai"):
            assert form in doc
        assert re.search(r"existing (local )?path.*then a registry name", " ".join(doc.split()))


@pytest.mark.parametrize("missing", ["/no/such/dir/weights.pt", "weights.safetensors", "sub/dir/model"])
def test_a_missing_weights_file_is_named_as_such(missing):
    with pytest.raises(UnknownModelError) as err:
        resolve("ViT-B-32", pretrained=missing)
    message = str(err.value)
    assert message.startswith(f"pretrained={missing!r}: no such file") and "\n" not in message


@pytest.mark.parametrize("name, expected", [
    ("foo/bar--baz", "'foo/bar--baz': not a valid Hugging Face repository id"),
    ("org/" + "n" * 120, "not a valid Hugging Face repository id"),
])
def test_repo_ids_the_hub_refuses_are_one_line(name, expected):
    with pytest.raises(UnknownModelError) as err:
        resolve(name)
    assert expected in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 300


def test_pretrained_reads_the_name_as_an_architecture_even_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ViT-B-32").mkdir()
    where = resolve("ViT-B-32", "openai")
    assert where.kind == "pretrained" and where.entry is REGISTRY["ViT-B-32:openai"]


def test_an_empty_pretrained_is_none_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("ViT-B-32", "") == resolve("ViT-B-32")
    assert resolve("ViT-B-32", "").kind == "preset"


def test_a_mistyped_local_path_is_named_as_one_too():
    from clipforge.checkpoints.download import DownloadError, fetch_repo

    with pytest.raises(UnknownModelError, match=r"^'runs/x--y': .*; no local file or folder of that name either$"):
        resolve("runs/x--y")
    assert resolve("runs/ckpt").kind == "hub"
    with pytest.raises(DownloadError) as err:  # the Hub is not reached here: offline and not cached
        import huggingface_hub.constants

        mp = pytest.MonkeyPatch()
        try:
            mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", "/nonexistent-hf-cache")
            fetch_repo("runs/ckpt", layout="auto")
        finally:
            mp.undo()
    assert str(err.value).endswith("(no local file or folder runs/ckpt either)") and "\n" not in str(err.value)


@pytest.mark.parametrize("name, expected", [
    ("ViT-B-32:", "'ViT-B-32:': no pretrained tag after the colon (its tags: openai,"),
    ("ViT-B-32:openai@main", "'ViT-B-32:openai@main': a revision pin (@REVISION) applies to Hugging Face "
                             "repository ids only"),
])
def test_an_empty_tag_and_a_pin_on_a_registry_name(name, expected):
    with pytest.raises(UnknownModelError) as err:
        resolve(name)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
