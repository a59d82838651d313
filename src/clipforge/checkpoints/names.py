"""How OpenAI, OpenCLIP, timm and Hugging Face name clipforge's tensors, and the renaming both ways.

    state, scheme = to_clipforge_names(tensors_of_any_file, path)  # scheme: "clipforge", "openclip" or "hf"
    hf_state = to_hf(model.state_dict())

Three naming schemes meet here: clipforge's (``visual.*`` as OpenAI's, the text tower under
``text.``, ``logit_scale.log_scale``/``logit_scale.bias``), OpenAI's and OpenCLIP's (the text
tower at the top level, ``logit_scale``, ``logit_bias``), and Hugging Face's ``CLIPModel``
(separate q/k/v projections, projections stored as ``nn.Linear`` weights, i.e. transposed).
Only names, shapes and layout change; every value is kept.

SigLIP's towers (`clipforge.model.siglip`) come in the same schemes: Hugging Face's
``SiglipModel`` (``vision_model.head.*`` for the attention-pooling head, ``text_model.head``,
``logit_bias``) renames as ``CLIPModel`` does, plus those; OpenCLIP's ``ViT-*-SigLIP*`` models
keep the text tower under ``text.`` (its "custom text" layout) and hold the image tower as a
timm ViT under ``visual.trunk.`` with timm's names (``patch_embed.proj``, ``pos_embed`` [1, N, D],
``blocks.N.attn.qkv``, ``norm``, ``attn_pool.latent``/``q``/``kv``/``proj``/``norm``/``mlp``).

SigLIP 2's NaFlex ``Siglip2Model`` has SiglipModel's names; its patch embedding is an ``nn.Linear``
over flattened patches (row, column, channel), [D, P*P*3], which is the patch convolution's weight
[D, 3, P, P] reordered: it is read into ``visual.conv1.weight`` and written back (``to_hf(...,
patch_linear=True)``).

Chinese-CLIP's ``ChineseCLIPModel`` names its image tower and projections as ``CLIPModel`` does
and its BERT text tower as BERT does (``text_model.embeddings.word_embeddings``, ...,
``text_model.encoder.layer.N.attention.self.query``, ...); it has no BERT pooler, so a
``text_model.pooler.*`` left in a file is dropped, as transformers drops it when loading.
OpenCLIP has no Chinese-CLIP: `to_openclip` refuses one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError, few

__all__ = ["OPENAI_EXTRAS", "from_hf", "from_openclip", "from_timm", "to_clipforge_names", "to_hf", "to_openclip"]

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
    """clipforge's names to OpenCLIP's (which are OpenAI's, plus ``logit_bias``).

    A SigLIP image tower becomes OpenCLIP's timm trunk (`to_timm`); a SigLIP text tower stays
    under ``text.``, as OpenCLIP's custom-text models hold it.
    """
    if "text.token_type_embedding" in state:
        raise CheckpointError("OpenCLIP has no Chinese-CLIP model (a BERT text tower); convert it to 'hf' or "
                              "'clipforge' instead")
    siglip_text = "text.text_projection.weight" in state
    out = {}
    for key, value in state.items():
        if key == "logit_scale.log_scale":
            out["logit_scale"] = value
        elif key == "logit_scale.bias":
            out["logit_bias"] = value
        elif key.startswith("visual.") and "visual.attn_pool.probe" in state:
            continue  # renamed below
        else:
            out[key if siglip_text else key.removeprefix("text.")] = value
    if "visual.attn_pool.probe" in state:
        out.update(to_timm({k: v for k, v in state.items() if k.startswith("visual.")}))
    return out


# ----------------------------------------------------------------------------- timm (OpenCLIP's SigLIP)
# timm's VisionTransformer with global_pool="map" (timm/models/vision_transformer.py, layers/attention_pool.py)
# as OpenCLIP's TimmModel holds it, and clipforge's SigLIP image tower.
_TIMM = "visual.trunk."
_TIMM_GLOBAL = {
    "patch_embed.proj.weight": "visual.conv1.weight",
    "patch_embed.proj.bias": "visual.conv1.bias",
    "norm.weight": "visual.ln_post.weight",
    "norm.bias": "visual.ln_post.bias",
    "attn_pool.latent": "visual.attn_pool.probe",
    "attn_pool.proj.weight": "visual.attn_pool.attn.out_proj.weight",
    "attn_pool.proj.bias": "visual.attn_pool.attn.out_proj.bias",
    "attn_pool.norm.weight": "visual.attn_pool.ln.weight",
    "attn_pool.norm.bias": "visual.attn_pool.ln.bias",
    "attn_pool.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "attn_pool.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "attn_pool.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "attn_pool.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
}
_TIMM_BLOCK = {
    "norm1": "ln_1",
    "attn.qkv": "attn.in_proj",  # rows q, k, v, as nn.MultiheadAttention's in_proj
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TIMM_LAYER = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")
_OUR_VISUAL_LAYER = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")


def _block_name(module: str, kind: str) -> str:
    """clipforge's name of a block tensor: "attn.in_proj" + "weight" is "attn.in_proj_weight"."""
    return f"{module}_{kind}" if module == "attn.in_proj" else f"{module}.{kind}"


def from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's SigLIP names (timm trunk under ``visual.trunk.``, text under ``text.``) to clipforge's.

    The attention pool's query (``q``) and key-value (``kv``) projections are stacked into one
    ``in_proj`` (q, k, v), the position embedding [1, N, D] becomes [N, D].  Tensors without a
    clipforge name keep theirs, so that loading reports them.
    """
    out: dict[str, Tensor] = {}
    pool: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key == "logit_scale":
            out["logit_scale.log_scale"] = value.reshape(())
        elif key == "logit_bias":
            out["logit_scale.bias"] = value.reshape(())
        elif not key.startswith(_TIMM):
            out[key] = value  # the text tower's names are clipforge's
        elif (name := key.removeprefix(_TIMM)) in _TIMM_GLOBAL:
            out[_TIMM_GLOBAL[name]] = value
        elif name == "pos_embed":
            out["visual.positional_embedding"] = value.reshape(value.shape[-2:])  # [1, N, D] -> [N, D]
        elif name in ("attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight", "attn_pool.kv.bias"):
            part, kind = name.split(".")[1:]
            pool.setdefault(kind, {})[part] = value
        elif (match := _TIMM_LAYER.fullmatch(name)) and match.group(2) in _TIMM_BLOCK:
            index, module, kind = match.groups()
            out[f"visual.transformer.resblocks.{index}.{_block_name(_TIMM_BLOCK[module], kind)}"] = value
        else:
            out[key] = value
    for kind, parts in pool.items():
        if sorted(parts) != ["kv", "q"]:
            missing = "q" if "q" not in parts else "kv"
            raise CheckpointError(f"{_TIMM}attn_pool: missing timm {missing}.{kind}")
        out[f"visual.attn_pool.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["kv"]])
    return out


def to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """clipforge's SigLIP image-tower names (``visual.*``) to OpenCLIP's timm trunk; the reverse of `from_timm`."""
    ours = {v: k for k, v in _TIMM_GLOBAL.items()}
    block = {v: k for k, v in _TIMM_BLOCK.items()}
    out = {}
    for key, value in state.items():
        if key in ours:
            out[_TIMM + ours[key]] = value
        elif key == "visual.positional_embedding":
            out[_TIMM + "pos_embed"] = value.unsqueeze(0)  # [N, D] -> [1, N, D]
        elif key.startswith("visual.attn_pool.attn.in_proj_"):
            kind = key.rsplit("_", 1)[1]
            width = value.shape[0] // 3
            out[f"{_TIMM}attn_pool.q.{kind}"] = value[:width].contiguous()
            out[f"{_TIMM}attn_pool.kv.{kind}"] = value[width:].contiguous()
        elif match := _OUR_VISUAL_LAYER.fullmatch(key.replace("in_proj_", "in_proj.")):
            index, module, kind = match.groups()
            if module not in block:
                raise CheckpointError(f"no timm name for {key!r}")
            out[f"{_TIMM}blocks.{index}.{block[module]}.{kind}"] = value
        else:
            raise CheckpointError(f"no timm name for {key!r} (SigLIP's image tower has no such tensor)")
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
# SiglipModel's names beyond CLIPModel's: the patch bias, the attention-pooling head, the text
# head (an nn.Linear in both, not transposed) and the logit bias.  Its blocks are named as CLIPModel's.
_HF_SIGLIP = {
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.head.probe": "visual.attn_pool.probe",
    "vision_model.head.attention.in_proj_weight": "visual.attn_pool.attn.in_proj_weight",
    "vision_model.head.attention.in_proj_bias": "visual.attn_pool.attn.in_proj_bias",
    "vision_model.head.attention.out_proj.weight": "visual.attn_pool.attn.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.attn_pool.attn.out_proj.bias",
    "vision_model.head.layernorm.weight": "visual.attn_pool.ln.weight",
    "vision_model.head.layernorm.bias": "visual.attn_pool.ln.bias",
    "vision_model.head.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "vision_model.head.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "vision_model.head.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "vision_model.head.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
    "text_model.head.weight": "text.text_projection.weight",
    "text_model.head.bias": "text.text_projection.bias",
    "logit_bias": "logit_scale.bias",
}
_HF_PATCH = "vision_model.embeddings.patch_embedding.weight"
_HF_SCALARS = ("logit_scale", "logit_bias")  # CLIPModel stores the scale as [], SiglipModel both as [1]
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_HF_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOWERS = {"vision_model": "visual", "text_model": "text"}
# ChineseCLIPModel's BERT text tower (transformers' ChineseCLIPTextModel without its pooler): the
# embeddings, then each layer's names (query, key and value kept apart; post-LayerNorm order).
_HF_BERT = "text_model.embeddings.word_embeddings.weight"  # the tensor that tells a BERT text tower
_HF_BERT_GLOBAL = {
    _HF_BERT: "text.token_embedding.weight",
    "text_model.embeddings.position_embeddings.weight": "text.positional_embedding",
    "text_model.embeddings.token_type_embeddings.weight": "text.token_type_embedding",
    "text_model.embeddings.LayerNorm.weight": "text.ln_embed.weight",
    "text_model.embeddings.LayerNorm.bias": "text.ln_embed.bias",
}
_HF_BERT_BLOCK = {
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "ln_1",
    "intermediate.dense": "mlp.c_fc",
    "output.dense": "mlp.c_proj",
    "output.LayerNorm": "ln_2",
}
_HF_BERT_QKV = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v"}
_HF_BERT_LAYER = re.compile(r"text_model\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_OUR_LAYER = re.compile(r"(visual|text)\.transformer\.resblocks\.(\d+)\.(attn\.in_proj|.+)[._](weight|bias)")


def from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face's CLIPModel, SiglipModel or ChineseCLIPModel names to clipforge's: q/k/v stacked,
    projections transposed."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith(("position_ids", "token_type_ids")) or key.startswith("text_model.pooler."):
            continue  # buffers older HF checkpoints saved; BERT's pooler, which ChineseCLIPModel lacks
        if key in _HF_BERT_GLOBAL:
            out[_HF_BERT_GLOBAL[key]] = value
        elif match := _HF_BERT_LAYER.fullmatch(key):
            index, module, kind = match.groups()
            base = f"text.transformer.resblocks.{index}"
            if module in _HF_BERT_QKV:
                qkv.setdefault((base, kind), {})[_HF_BERT_QKV[module]] = value
            elif module in _HF_BERT_BLOCK:
                out[f"{base}.{_HF_BERT_BLOCK[module]}.{kind}"] = value
            else:
                out[key] = value  # reported as unexpected when loaded
        elif key == _HF_PATCH and value.ndim == 2:  # Siglip2Model's nn.Linear [D, P*P*3]
            out[_HF_GLOBAL[key]] = _patch_linear_to_conv(value)
        elif key in _HF_GLOBAL or key in _HF_SIGLIP:
            name = _HF_GLOBAL.get(key) or _HF_SIGLIP[key]
            out[name] = value.reshape(()) if key in _HF_SCALARS else value
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


def _patch_linear_to_conv(weight: Tensor) -> Tensor:
    """Siglip2Model's patch embedding [D, P*P*3] (row, column, channel) as a convolution's [D, 3, P, P]."""
    D, K = weight.shape
    P = math.isqrt(K // 3)
    if 3 * P * P != K:
        raise CheckpointError(f"{_HF_PATCH}: {K} inputs per patch are not 3 channels of a square patch")
    return weight.reshape(D, P, P, 3).permute(0, 3, 1, 2).contiguous()


def to_hf(state: dict[str, Tensor], *, patch_linear: bool = False) -> dict[str, Tensor]:
    """clipforge's names to Hugging Face's CLIPModel, SiglipModel for a SigLIP image tower, or
    ChineseCLIPModel for a BERT text tower; a CheckpointError for a tensor it has no name for.
    ``patch_linear`` writes the patch convolution as Siglip2Model's (NaFlex) ``nn.Linear``."""
    if patch_linear:
        conv = state["visual.conv1.weight"]  # [D, 3, P, P] -> [D, P*P*3]
        state = {**state, "visual.conv1.weight": conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)}
    siglip = "visual.attn_pool.probe" in state
    bert = "text.token_type_embedding" in state
    ours_to_hf = {v: k for k, v in (_HF_GLOBAL | _HF_SIGLIP if siglip else _HF_GLOBAL).items()}
    if bert:
        ours_to_hf = {k: v for k, v in ours_to_hf.items() if not k.startswith("text.")}
        ours_to_hf |= {v: k for k, v in _HF_BERT_GLOBAL.items()}
    bert_block = {v: k for k, v in _HF_BERT_BLOCK.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    out = {}
    for key, value in state.items():
        if key in ours_to_hf:
            name = ours_to_hf[key]
            out[name] = value.reshape(1) if siglip and name in _HF_SCALARS else value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        elif bert and (match := _OUR_LAYER.fullmatch(key)) and match.group(1) == "text":
            _, index, module, kind = match.groups()
            base = f"text_model.encoder.layer.{index}"
            if module == "attn.in_proj":  # rows: q, k, v
                for name, part in zip(_HF_BERT_QKV, value.chunk(3), strict=True):
                    out[f"{base}.{name}.{kind}"] = part.contiguous()
            elif module in bert_block:
                out[f"{base}.{bert_block[module]}.{kind}"] = value
            else:
                raise CheckpointError(f"no Hugging Face ChineseCLIPModel name for {key!r}")
        elif match := _OUR_LAYER.fullmatch(key):
            tower, index, module, kind = match.groups()
            base = f"{towers[tower]}.encoder.layers.{index}"
            if module == "attn.in_proj":  # rows: q, k, v
                for name, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{base}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                out[f"{base}.{block[module]}.{kind}"] = value
        elif siglip or bert:
            raise CheckpointError(f"no Hugging Face {'SiglipModel' if siglip else 'ChineseCLIPModel'} name for {key!r}")
        else:
            raise CheckpointError(f"no Hugging Face CLIPModel name for {key!r} (HF has no ResNet tower or logit bias)")
    return out


# ----------------------------------------------------------------------------- any scheme


def to_clipforge_names(state: dict[str, Tensor], path: Path) -> tuple[dict[str, Tensor], str]:
    """Any of the naming schemes renamed to clipforge's, and which scheme it was (OpenCLIP's
    SigLIP models, with a timm image tower, count as "openclip")."""
    if any(key.startswith(_TIMM) for key in state):
        return from_timm(state), "openclip"
    if "text.token_embedding.weight" in state:
        return state, "clipforge"
    if "token_embedding.weight" in state:
        return from_openclip(state), "openclip"
    if "text_model.embeddings.token_embedding.weight" in state or _HF_BERT in state:
        return from_hf(state), "hf"
    raise CheckpointError(
        f"{path}: not a CLIP state dict: no token_embedding.weight under OpenAI/OpenCLIP, "
        f"Hugging Face or clipforge names; its {len(state)} tensors include {few(sorted(state), 5)}"
    )
