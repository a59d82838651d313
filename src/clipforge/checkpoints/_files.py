"""Files on disk: what a file is, the tensors of one weights file, JSON files, and writing tensors.

    kind, what = identify(Path("x.pt"))   # ("text", "a 6-byte text file")
    state, torchscript = read_tensors(Path("ViT-B-32.pt"))

A weights file is recognised by its first bytes, whatever its name, before anything reads it:
safetensors (its header's length, 8 bytes little-endian, then '{'), a zip archive (OpenAI's
TorchScript, read by `torchscript`, or torch.save's own format) or torch.save's legacy pickle
(pickle protocol 2 and PyTorch's magic number).  Only those two PyTorch formats reach
``torch.load(weights_only=True)``, so that nothing but tensors is ever unpickled.  Anything else
(text, JSON, an empty file, a plain Python pickle, unknown bytes, a truncated file) is a
CheckpointError of one line saying what the file is and what was expected; PyTorch's own
messages are not passed on, since they advise ``weights_only=False``, unsafe for a file of
unknown origin.  The tensors come back under the file's own names; `names` renames them.
"""

from __future__ import annotations

import codecs
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipforge.checkpoints._errors import CheckpointError, few
from clipforge.checkpoints.torchscript import read_torchscript

__all__ = ["EXPECTED", "identify", "read_json", "read_tensors", "write_tensors"]

EXPECTED = "expected a PyTorch zip archive, a pickle, or safetensors"
# torch.save's legacy format opens with pickle protocol 2 (0x80 0x02) and a 10-byte LONG1 (0x8a 0x0a)
# holding MAGIC_NUMBER from torch/serialization.py.
_TORCH_PICKLE = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty archive
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
_SNIFF = 4096  # bytes read to tell text from binary


def _sized(size: int, noun: str) -> str:
    """"a 6-byte text file", "an 8-byte ...": the article as the number is spoken."""
    number = f"{size:,}"
    lead = number.split(",")[0]
    return f"{'an' if lead.startswith('8') or lead in ('11', '18') else 'a'} {number}-byte {noun}"


def _text_kind(head: bytes, size: int) -> tuple[str, str] | None:
    """("json"/"lfs"/"text", description) if ``head`` reads as UTF-8 text, else None."""
    if b"\x00" in head:
        return None
    try:  # an incremental decode: a multi-byte character cut at the end of the sample is fine
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError:
        return None
    if sum(c.isprintable() or c in "\t\r\n" for c in text) < 0.95 * len(text):
        return None
    start = text.lstrip("\ufeff \t\r\n")
    if start.startswith("version https://git-lfs"):
        return "lfs", "a Git LFS pointer"
    if start[:15].lower().startswith(("<!doctype html", "<html")):
        return "text", _sized(size, "HTML page") + " (a download that failed?)"
    if start.startswith(("{", "[")):
        return "json", _sized(size, "JSON file")
    return "text", _sized(size, "text file")


def _safetensors_kind(head: bytes, path: Path, size: int) -> tuple[str, str] | None:
    """("safetensors", ...) or ("damaged", ...) if ``head`` opens a safetensors file, else None."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    length = int.from_bytes(head[:8], "little")
    if length > _SAFETENSORS_MAX_HEADER:
        return None  # chance bytes: no safetensors header is this long
    if 8 + length > size:
        return "damaged", f"a truncated safetensors file (its header alone is {length:,} bytes; the file has {size:,})"
    with path.open("rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "damaged", "a damaged safetensors file (its header is not valid safetensors JSON)"
    if 8 + length + end > size:
        listed = 8 + length + end
        return "damaged", f"a truncated safetensors file (holds {size:,} of the {listed:,} bytes its header lists)"
    return "safetensors", _sized(size, "safetensors file")


def identify(path: Path) -> tuple[str, str]:
    """What ``path`` is, by its first bytes: a kind and a phrase for messages ("a 6-byte text file").

    Kinds: "missing", "directory", "empty", "safetensors", "zip" (TorchScript or torch.save),
    "torch-pickle" (torch.save's legacy format), "pickle" (any other pickle), "damaged" (a
    truncated zip or safetensors file), "json", "lfs" (a Git LFS pointer), "text" and "binary".
    """
    if path.is_dir():
        return "directory", "a directory"
    if not path.exists():
        return "missing", "no such file"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_SNIFF)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    if size == 0:
        return "empty", "an empty (0-byte) file"
    if head.startswith(_ZIP):
        if zipfile.is_zipfile(path):
            return "zip", _sized(size, "zip archive")
        return "damaged", f"a truncated or damaged zip archive of {size:,} bytes (no central directory)"
    if head.startswith(_TORCH_PICKLE):
        return "torch-pickle", _sized(size, "PyTorch pickle")
    safetensors = _safetensors_kind(head, path, size)
    if safetensors is not None:
        return safetensors
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle", _sized(size, "Python pickle") + " not written by torch.save"
    text = _text_kind(head, size)
    if text is not None:
        return text
    return "binary", _sized(size, "file of unrecognised binary data")


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: a damaged safetensors file ({reason})") from None


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


def _read_torch(path: Path) -> dict[str, Tensor]:
    """torch.save's zip or legacy pickle, tensors only.  PyTorch's messages are summarised, never
    quoted whole: they advise loading with ``weights_only=False``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its notes on pickle protocols say nothing to a user
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        held = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: holds objects other than tensors{held}; clipforge does not unpickle them"
        ) from None
    except EOFError:
        raise CheckpointError(f"{path}: a truncated PyTorch checkpoint (its pickle ends early)") from None
    except (RuntimeError, ValueError, OSError) as err:
        first = re.split(r"(?<=\.)\s|\n", str(err).strip(), maxsplit=1)[0][:120]
        reason = f" ({first})" if first and "weights_only" not in first else ""
        raise CheckpointError(f"{path}: a damaged or truncated PyTorch checkpoint{reason}") from None
    return _unwrap(obj, path)


def _has_data_pkl(path: Path) -> bool:
    """Whether the zip at ``path`` is laid out as torch.save writes it: ``<name>/data.pkl``."""
    with zipfile.ZipFile(path) as archive:
        return any(n.count("/") == 1 and n.endswith("/data.pkl") for n in archive.namelist())


def read_tensors(path: Path) -> tuple[dict[str, Tensor], bool]:
    """The tensors of a weights file, and whether it was a TorchScript archive."""
    kind, what = identify(path)
    if kind == "missing":
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if kind == "safetensors":
        return _read_safetensors(path), False
    if kind == "zip":
        try:
            state = read_torchscript(path)
            if state is not None:
                return state, True
            if not _has_data_pkl(path):
                raise CheckpointError(f"{path}: a zip archive without data.pkl, not a checkpoint ({EXPECTED})")
        except zipfile.BadZipFile as err:
            raise CheckpointError(f"{path}: a damaged zip archive ({err})") from None
        return _read_torch(path), False
    if kind == "torch-pickle":
        return _read_torch(path), False
    if kind == "pickle":
        raise CheckpointError(f"{path}: {what}; clipforge does not unpickle objects other than tensors ({EXPECTED})")
    if kind == "directory":
        raise CheckpointError(f"{path}: a directory, where a weights file was expected")
    if kind == "damaged":
        raise CheckpointError(f"{path}: {what}; copy or download it again")
    if kind == "lfs":
        raise CheckpointError(f"{path}: a Git LFS pointer, not the weights it names; fetch them with `git lfs pull`")
    hint = "; give the directory that holds it" if path.name in ("config.json", "open_clip_config.json") else ""
    raise CheckpointError(f"{path}: {what}, not a checkpoint ({EXPECTED}){hint}")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a CheckpointError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (invalid byte at {err.start})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def write_tensors(state: dict[str, Tensor], path: Path) -> None:
    """Writes ``state`` (moved to the CPU) as safetensors if ``path`` ends in .safetensors, else with torch.save."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)
