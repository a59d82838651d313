"""Training: the run's configuration, the pure step and the one linear loop.

    from clipforge.train import TrainConfig, train
    final = train(TrainConfig(model="tiny", data="shapes://", steps=300, out="runs/try"))

| module | what |
|---|---|
| `config` | `TrainConfig`, every setting of a run, validated on construction; what a resume may change |
| `step` | `compute_gradients`, `train_step`, `build_optimizer`, `lr_factor`: no I/O |
| `loop` | `train(config)`: data, model, resume, the loop, logs and checkpoints |
| `run_state` | checkpoint directories written atomically, RNG states |
| `interrupt` | SIGINT, SIGTERM and SIGUSR1: stop after the step with a checkpoint (`Interrupted`) |
| `report` | ``report.md`` and figures for a finished run |
"""

from clipforge.train.config import TrainConfig
from clipforge.train.loop import build_model, train
from clipforge.train.step import build_optimizer, compute_gradients, lr_factor, train_step

__all__ = ["TrainConfig", "build_model", "build_optimizer", "compute_gradients", "lr_factor", "train", "train_step"]
