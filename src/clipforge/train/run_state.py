"""Training checkpoints: one directory per step, written atomically, the last k kept.

    out/checkpoints/step-0000500/
        config.json, model.safetensors, tokenizer files   (clipforge's model format)
        train_state.pt    optimiser, schedule, grad scaler, RNG states, step, run config,
                          the run's counts (samples read, bad samples, skipped steps)

A checkpoint is written into ``step-N.tmp`` and renamed when complete: a process killed in
the middle of a save (even by SIGKILL) leaves the previous checkpoint intact, and the
half-written directory is ignored and removed by the next save.  Data positions need no
saving: the batch order is a function of (seed, step) (`clipforge.data.batches`).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "find_checkpoint", "load_run_config", "load_train_state", "list_checkpoints"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.pt"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint directories under ``out/checkpoints``, oldest first."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, *, model: Any, tokenizer: Any, state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep_last``."""
    from clipforge.checkpoints import save

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    save(model, tmp, tokenizer=tokenizer)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """The checkpoint ``resume`` names: "latest" (None when the run has none yet) or a path."""
    if resume == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    return path


def load_train_state(path: Path) -> dict[str, Any]:
    # Tensors, numbers, strings and containers only: the safe loader suffices.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def load_run_config(path: Path) -> dict[str, Any]:
    """The run config a checkpoint was written with (its `TrainConfig` as a dict), without reading
    the optimiser's state: the file is memory-mapped and its tensors are never touched."""
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True).get("config", {})
