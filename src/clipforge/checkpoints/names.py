"""How OpenAI, OpenCLIP and Hugging Face name clipforge's tensors, and the renaming both ways.

    state, scheme = to_clipforge_names(tensors_of_any_file, path)  # scheme: "clipforge", "openclip" or "hf"
    hf_state = to_hf(model.state_dict())

Three naming schemes meet here: clipforge's (``visual.*`` as OpenAI's, the text tower under
``text.``, ``logit_scale.log_scale``/``logit_scale.bias``), OpenAI's and OpenCLIP's (the text
tower at the top level, ``logit_scale``, ``logit_bias``), and Hugging Face's ``CLIPModel``
(separate q/k/v projections, projections stored as ``nn.Linear`` weights, i.e. transposed).
Only names, shapes and layout change; every value is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError, few

__all__ = ["OPENAI_EXTRAS", "from_hf", "from_openclip", "to_clipforge_names", "to_hf", "to_openclip"]

# Tensors OpenAI's TorchScript archives carry that are not weights (OpenCLIP drops them too).
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------- OpenAI and OpenCLIP


def from_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI's or OpenCLIP's names to clipforge's, dropping the archives' non-weight entries."""
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRAS or key.endswith("attn_mask"):
            continue
        if key == "logit_scale":
            out["logit_scale.log_scale"] = value.reshape(())  # OpenCLIP may store shape [1]
        elif key == "logit_bias":
            out["logit_scale.bias"] = value.reshape(())
        elif key.startswith("visual."):
            out[key] = value
        else:
            out["text." + key] = value
    return out


def to_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """clipforge's names to OpenCLIP's (which are OpenAI's, plus ``logit_bias``)."""
    out = {}
    for key, value in state.items():
        if key == "logit_scale.log_scale":
            out["logit_scale"] = value
        elif key == "logit_scale.bias":
            out["logit_bias"] = value
        else:
            out[key.removeprefix("text.")] = value
    return out


# ----------------------------------------------------------------------------- Hugging Face
# CLIPModel's whole-model names, then the per-block names (q/k/v kept apart there).
_HF_GLOBAL = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "logit_scale": "logit_scale.log_scale",
}
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOWERS = {"vision_model": "visual", "text_model": "text"}
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_LAYER = re.compile(r"(visual|text)\.transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)")


def from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face's CLIPModel names to clipforge's: q/k/v stacked, projections transposed."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer older HF checkpoints saved
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()  # a transposed view would run other matmul kernels
        elif match := _HF_LAYER.fullmatch(key):
            tower, index, module, kind = match.groups()
            base = f"{_HF_TOWERS[tower]}.transformer.resblocks.{index}"
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((base, kind), {})[module[-6]] = value
            elif module in _HF_BLOCK:
                out[f"{base}.{_HF_BLOCK[module]}.{kind}"] = value
            else:
                out[key] = value  # reported as unexpected when loaded
        else:
            out[key] = value
    for (base, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            missing = [p for p in "qkv" if p not in parts]
            raise CheckpointError(f"{base}: missing Hugging Face {', '.join(p + '_proj' for p in missing)}.{kind}")
        out[f"{base}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """clipforge's names to Hugging Face's CLIPModel; a CheckpointError for a tensor it has no name for."""
    ours_to_hf = {v: k for k, v in _HF_GLOBAL.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    out = {}
    for key, value in state.items():
        if key in ours_to_hf:
            out[ours_to_hf[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif match := _OUR_LAYER.fullmatch(key):
            tower, index, module, kind = match.groups()
            base = f"{towers[tower]}.encoder.layers.{index}"
            if module == "attn.in_proj":  # rows: q, k, v
                for name, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{base}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                out[f"{base}.{block[module]}.{kind}"] = value
        else:
            raise CheckpointError(f"no Hugging Face CLIPModel name for {key!r} (HF has no ResNet tower or logit bias)")
    return out


# ----------------------------------------------------------------------------- any scheme


def to_clipforge_names(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], str]:
    """Any of the three naming schemes renamed to clipforge's, and which scheme it was."""
    if "text.token_embedding.weight" in state:
        return state, "clipforge"
    if "token_embedding.weight" in state:
        return from_openclip(state), "openclip"
    if "text_model.embeddings.token_embedding.weight" in state:
        return from_hf(state), "hf"
    raise CheckpointError(
        f"{path}: not a CLIP state dict: no token_embedding.weight under OpenAI/OpenCLIP, "
        f"Hugging Face or clipforge names; its {len(state)} tensors include {few(sorted(state), 5)}"
    )
