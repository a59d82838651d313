"""OpenAI's TorchScript archives read as tensors, without running the archive's code.

    state = read_torchscript(Path("ViT-B-32.pt"))  # {"visual.conv1.weight": ..., ...}, OpenAI's names

A TorchScript archive is a zip whose ``data.pkl`` pickles the module tree; `torch.jit.load` would
also compile and run the archive's code, so it is not used.  Instead a restricted unpickler
rebuilds tensors from the archive's raw storages and records each module's attributes,
refusing any other global (see `_ScriptUnpickler`).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError

__all__ = ["read_torchscript"]


class _ScriptObject:
    """Stands in for a TorchScript module while unpickling: keeps its attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return torch.as_strided(storage, size, stride, offset)


def _build_list(value: Any, *_: Any) -> Any:
    """Returns its first argument: the typed-list and type-tag wrappers carry plain values."""
    return value


_STORAGE_DTYPES = {
    "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool,
}
# Every global a TorchScript data.pkl may name, mapped to a harmless stand-in defined here.
_SCRIPT_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _build_list,
    **{("torch.jit._pickle", f"build_{kind}list"): _build_list for kind in ("int", "double", "bool", "tensor")},
    **{("torch", f"{name}Storage"): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _ScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl``: tensors, containers and attribute records, nothing else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) in _SCRIPT_GLOBALS:
            return _SCRIPT_GLOBALS[(module, name)]
        raise CheckpointError(
            f"{self.path}: the TorchScript archive refers to {module}.{name}, which is not a tensor; refusing it"
        )

    def persistent_load(self, pid: Any) -> Tensor:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: unexpected TorchScript record {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            dtype = storage_type.dtype
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() != numel:
                raise CheckpointError(
                    f"{self.path}: storage {key} holds {flat.numel()} values, not {numel} (truncated?)"
                )
            self.storages[key] = flat
        return self.storages[key]


def _flatten_script(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    state = obj.attributes if isinstance(obj, _ScriptObject) else obj
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, (_ScriptObject, dict)):
            _flatten_script(value, f"{prefix}{name}.", out)


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _read_archive(path: Path, archive: zipfile.ZipFile) -> dict[str, Tensor]:
    roots = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(roots) != 1:
        raise CheckpointError(f"{path}: TorchScript archive without a single <name>/data.pkl")
    prefix = roots[0].split("/")[0]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(f"{path}: big-endian TorchScript archives are not supported")
    root = _ScriptUnpickler(archive.read(roots[0]), archive, prefix, path).load()
    state: dict[str, Tensor] = {}
    _flatten_script(root, "", state)
    return state


def read_torchscript(path: Path) -> dict[str, Tensor] | None:
    """The tensors of the TorchScript archive at ``path`` by attribute path, or None if the zip at
    ``path`` is not one (``torch.save`` writes zips too).  A CheckpointError if it is damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_archive(path, archive) if _is_torchscript(archive) else None
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated TorchScript archive: {err}") from err
