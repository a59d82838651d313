"""Runs of the demo recipe shared by the benchmark scripts: trained once, reused after."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

_NEWER = frozenset({"image_noise"})


def demo_run(root: Path, *, fresh: bool = False, **changes: Any) -> tuple[Path, bool]:
    """The run directory of `clipforge/train/demo.toml` with ``changes`` (seed, steps, ...), trained to
    its last step under ``root`` unless already there; returns (run, whether it trained now).

    The directory is named by a hash of the whole training config, so a changed recipe trains
    anew; a change in code alone (a preset, the data) does not show there: pass ``fresh``.  An
    interrupted run is resumed.
    """
    from clipforge.train import train
    from clipforge.train.config import demo_config
    from clipforge.train.run_state import list_checkpoints

    config = demo_config().replace(progress=False, **changes)
    # settings newer than some recorded runs are left out at their defaults: those runs keep their names
    defaults = type(config)().to_dict()
    recipe = {k: v for k, v in config.to_dict().items() if k != "out" and not (k in _NEWER and v == defaults[k])}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    run = root / f"seed-{config.seed}-steps-{config.steps}-{digest}"
    if fresh and run.exists():
        shutil.rmtree(run)
    found = list_checkpoints(run)
    if found and found[-1].name == f"step-{config.steps:07d}":
        return run, False
    print(f"training the demo recipe ({changes}) into {run}", flush=True)
    train(config.replace(out=str(run), resume="latest" if found else ""))
    return run, True
