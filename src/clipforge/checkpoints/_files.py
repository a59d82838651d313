"""Files on disk: the tensors of one weights file, JSON files, and writing tensors.

A weights file is read by what it holds, whatever its name: safetensors (recognised by its
header), OpenAI's TorchScript archives (`torchscript`), or a PyTorch pickle read with
``torch.load(weights_only=True)``, so that nothing but tensors is ever unpickled.  The tensors
come back under the file's own names; `names` renames them.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError, few
from clipforge.checkpoints.torchscript import read_torchscript

__all__ = ["read_json", "read_tensors", "write_tensors"]


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian), then '{'."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): {err}") from err


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The tensor dict inside a loaded object: bare, under "state_dict" or "model"; prefixes cut."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    others = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if others:
        raise CheckpointError(f"{path}: entries that are not tensors: {few(others)}")
    state = dict(obj)
    for wrapper in ("module.", "_orig_mod."):  # DistributedDataParallel, torch.compile
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
    return state


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refusing to unpickle objects other than tensors: {err}") from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or foreign?): {err}") from err
    return _unwrap(obj, path)


def read_tensors(path: Path) -> tuple[dict[str, Tensor], bool]:
    """The tensors of a weights file, and whether it was a TorchScript archive."""
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return _read_safetensors(path), False
    if zipfile.is_zipfile(path):  # a TorchScript archive, or torch.save's own zip format
        state = read_torchscript(path)
        if state is not None:
            return state, True
    return _read_pickle(path), False


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file: {err}") from err


def write_tensors(state: dict[str, Tensor], path: Path) -> None:
    """Writes ``state`` (moved to the CPU) as safetensors if ``path`` ends in .safetensors, else with torch.save."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
