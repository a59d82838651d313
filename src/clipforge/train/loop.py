"""Training CLIP: one linear `train(config)`.

    clipforge train --model tiny --data shapes:// --steps 2000 --out runs/shapes
    torchrun --nproc-per-node 4 -m clipforge.cli train --config run.toml

prints a progress bar (step, samples/s, loss, lr, temperature, ETA) and writes
``OUT/metrics.jsonl``, ``OUT/metrics.json``, TensorBoard scalars (when `tensorboard` is
installed) and checkpoints under ``OUT/checkpoints/``.  The step itself is `clipforge.train.step`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge import distributed
from clipforge.train.config import TrainConfig
from clipforge.train.step import build_optimizer, lr_factor, train_step

__all__ = ["train", "build_model", "evaluate", "open_eval_sets"]


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


EvalSet = tuple[str, str, Any]  # (data URI, "zeroshot" or "retrieval", the opened source)


def open_eval_sets(config: TrainConfig) -> list[EvalSet]:
    """The ``eval_zeroshot`` and ``eval_retrieval`` sets, opened and checked once, before the
    first step: a source that cannot serve its task stops the run at the start."""
    from clipforge.evaluate import open_eval_source

    sets = [(uri, "zeroshot", open_eval_source(uri, "zeroshot")) for uri in config.eval_zeroshot]
    if config.eval_retrieval:
        sets.append((config.eval_retrieval, "retrieval", open_eval_source(config.eval_retrieval, "retrieval")))
    return sets


def evaluate(model: nn.Module, tokenizer: Callable, preprocess: Callable, sets: list[EvalSet],
             config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Zero-shot accuracy or retrieval recall on each of the `open_eval_sets`, on the first
    ``eval_samples`` images of each: `clipforge.evaluate`, as ``clipforge eval`` runs it.
    Results are keyed by URI; a set evaluated both ways holds both tasks' metrics (their names
    differ: ``acc1``, ... and ``text_to_image_R@1``, ...).

    Each module keeps its own mode afterwards (a locked tower stays in eval mode); the images are
    never augmented, whatever ``augment`` says for training.
    """
    from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot
    from clipforge.transforms import ImageTransform

    if isinstance(preprocess, ImageTransform) and preprocess.train:
        preprocess = replace(preprocess, train=False)  # resize and centre crop instead of random crops
    run = {"limit": config.eval_samples, "device": device, "workers": config.workers,
           "autocast_dtype": torch.bfloat16 if config.precision == "bf16" else None, "progress": False}
    results: dict[str, Any] = {}
    for uri, task, source in sets:
        if task == "zeroshot":
            zeroshot = evaluate_zeroshot(model, preprocess, tokenizer, source, ks=(1, 5), **run)
            keys = ("acc1", "acc5", "mean_per_class_recall", "confusion_matrix")
            metrics, skipped = {k: zeroshot.metrics[k] for k in keys}, zeroshot.skipped
        else:
            retrieval = evaluate_retrieval(model, preprocess, tokenizer, source, ks=(1, 5, 10), **run)
            metrics, skipped = dict(retrieval.metrics), retrieval.skipped
        if skipped:
            metrics["skipped_images"] = len(skipped)
        results.setdefault(uri, {}).update(metrics)
    return results


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def build_model(config: TrainConfig, source: Any) -> tuple[nn.Module, Callable, Callable]:
    """(model, preprocess, tokenizer) to train: a checkpoint as it is, or a fresh preset whose
    vocabulary is a BPE trained on the data's captions when the preset has none of its own."""
    from clipforge.checkpoints import is_preset, load
    from clipforge.data.batches import captions_of
    from clipforge.model import CLIP, get_config
    from clipforge.model.config import OPENAI_VOCAB_SIZE
    from clipforge.tokenizer import Tokenizer, train_bpe
    from clipforge.transforms import image_transform

    tokenizer = Tokenizer.from_dir(config.tokenizer) if config.tokenizer else None
    if is_preset(config.model):
        cfg = get_config(config.model)
        if tokenizer is None and cfg.text.vocab_size != OPENAI_VOCAB_SIZE:  # no OpenAI BPE to use: train one
            captions = captions_of(source, 20_000)
            tokenizer = train_bpe(captions, config.vocab_size, context_length=cfg.text.context_length)
        if tokenizer is not None:
            cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
        if config.loss == "siglip" and cfg.init_logit_bias is None:
            from clipforge.loss import SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE

            cfg = replace(cfg, init_logit_scale=SIGLIP_INIT_SCALE, init_logit_bias=SIGLIP_INIT_BIAS)
        torch.manual_seed(config.seed)
        model = CLIP(cfg)
        vision = cfg.vision
        preprocess = image_transform(vision.image_size, mean=vision.mean, std=vision.std, train=config.augment)
        if tokenizer is None:
            from clipforge.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(context_length=cfg.text.context_length)
        return model, preprocess, tokenizer
    model, _, loaded_tok = load(config.model)
    tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError(f"{config.model} has no tokenizer of its own: pass --tokenizer DIR")
    vision = model.config.vision
    preprocess = image_transform(vision.image_size, mean=vision.mean, std=vision.std, train=config.augment)
    model.train()
    return model, preprocess, tokenizer


def _check_stream_position(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """A streamed source resumes exactly only with the settings that cut its stream."""
    if not now["streaming"] or not saved:
        return
    keys = ("data", "seed", "batch_size", "accum_steps", "world", "workers")
    changed = [f"{key} {saved.get(key)!r} -> {now[key]!r}" for key in keys if saved.get(key) != now[key]]
    if changed:
        raise ValueError(
            f"cannot resume {checkpoint} exactly: a streamed data source (shards:) is split by these settings, "
            f"which changed: {'; '.join(changed)}; resume with the original ones, or start a new run from the "
            f"checkpoint with --model {checkpoint}"
        )


def _batch_stream(config: TrainConfig, source: Any, preprocess: Callable, tokenizer: Callable, *,
                  pixel_std: tuple[float, ...], rank: int, world: int) -> tuple[Any, dict[str, Any]]:
    """This rank's batches, and the settings that decide where the data stands at a step."""
    from clipforge.data.batches import BatchPlan, BatchStream, StreamBatchStream

    streaming = bool(getattr(source, "streaming", False))
    split = dict(batch_size=config.batch_size, seed=config.seed, rank=rank, world=world, accum=config.accum_steps)
    # noise of std image_noise in pixels is image_noise / std in the normalised tensor's units
    noise = tuple(config.image_noise / s for s in pixel_std) if config.image_noise else ()
    loading = dict(preprocess=preprocess, tokenizer=tokenizer, augment=config.augment, noise=noise,
                   workers=config.workers, max_bad_fraction=config.max_bad_fraction, source_name=config.data)
    if streaming:  # shards: each rank and worker reads its own share
        stream: BatchStream = StreamBatchStream(source, **split, **loading)
    else:
        stream = BatchStream(source, BatchPlan(len(source), **split), **loading)
    # where the data stands is a function of the step and of these (a stream's also of world and workers)
    position = {"data": config.data, "seed": config.seed, "batch_size": config.batch_size,
                "accum_steps": config.accum_steps, "world": world, "workers": config.workers, "streaming": streaming}
    return stream, position


def _restore(checkpoint: Path, optimizer: torch.optim.Optimizer, schedule: Any, scaler: Any,
             data_position: dict[str, Any]) -> int:
    """Loads a checkpoint's optimiser, schedule, grad scaler and RNG states; returns its step."""
    from clipforge.train.run_state import load_train_state, set_rng_state

    state = load_train_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    _check_stream_position(state.get("data", {}), data_position, checkpoint)
    return int(state["step"])


def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` to its last step; returns the final metrics (also in OUT/metrics.json)."""
    from clipforge.data import open_data
    from clipforge.train.run_state import find_checkpoint, save_checkpoint

    # ---- processes and device -----------------------------------------------------------
    device_probe = _device(config.device, 0)
    joined_here = not distributed.is_initialized()
    rank, world, local_rank = distributed.init_from_env(device_probe.type)
    device = _device(config.device, local_rank)
    main_process = rank == 0
    out = Path(config.out)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # ---- data and model -----------------------------------------------------------------
    source = open_data(config.data)
    resume_from = find_checkpoint(out, config.resume) if config.resume else None
    # a resumed run takes model and tokenizer from its checkpoint
    start_from = config.replace(model=str(resume_from)) if resume_from else config
    model, preprocess, tokenizer = build_model(start_from, source)
    model.to(device)
    if config.lock_image or config.lock_text:
        tower = model.visual if config.lock_image else model.text
        tower.requires_grad_(False)
        tower.eval()
    if config.grad_checkpointing:
        model.set_grad_checkpointing(image=not config.lock_image, text=not config.lock_text)
    # the plain model holds the weights (optimiser, checkpoints, evaluation); the step runs its
    # compiled form when asked, and back-propagates through the data-parallel wrapper under torchrun
    step_model: nn.Module = torch.compile(model) if config.compile else model
    ddp = distributed.data_parallel(step_model, device)

    stream, data_position = _batch_stream(config, source, preprocess, tokenizer, pixel_std=model.config.vision.std,
                                          rank=rank, world=world)
    eval_sets = open_eval_sets(config) if main_process else []

    # ---- optimiser, schedule, resume ----------------------------------------------------
    optimizer = build_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    start = 0
    if resume_from is not None:
        start = _restore(resume_from, optimizer, schedule, scaler, data_position)
    log = _Log(out, start, config, enabled=main_process)
    if main_process and resume_from is not None:
        print(f"resumed from {resume_from} at step {start}")

    # ---- the loop -----------------------------------------------------------------------
    def save(step: int) -> None:
        if main_process:
            save_checkpoint(out, step, model=model, tokenizer=tokenizer, keep_last=config.keep_last, state={
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "config": config.to_dict(),
                "data": data_position,
            })
        distributed.barrier()

    bar = _progress(config, start, enabled=main_process)
    t_last, samples = time.perf_counter(), 0
    skipped_steps = 0
    for step, micro in enumerate(stream.steps(start, config.steps), start=start):
        micro = [m.to(device) for m in micro]
        stats = train_step(step_model, micro, optimizer, config=config, ddp=ddp, scaler=scaler)
        schedule.step()
        skipped_steps += int(stats["skipped"])
        samples += sum(len(m) for m in micro) * world
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.perf_counter()
            row = {"step": done, **stats, "lr": schedule.get_last_lr()[0],
                   "samples_per_s": samples / max(now - t_last, 1e-9), "epoch": stream.epoch(done),
                   "bad_samples": stream.bad_count, "skipped_steps": skipped_steps}
            log.write(row)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{row['lr']:.2e}", T=f"{1 / stats['logit_scale']:.4f}",
                            sps=f"{row['samples_per_s']:.0f}")
            t_last, samples = now, 0
        bar.update(1)
        if config.eval_every and done % config.eval_every == 0 and done < config.steps and main_process:
            log.write({"step": done, "eval": evaluate(model, tokenizer, preprocess, eval_sets, config, device)})
        if done % config.save_every == 0 and done < config.steps:
            save(done)
    bar.close()

    # ---- the end ------------------------------------------------------------------------
    final: dict[str, Any] = {"step": config.steps, "bad_samples": stream.bad_count, "samples_read": stream.seen,
                             "skipped_steps": skipped_steps}
    if start < config.steps:
        save(config.steps)
    if main_process:
        if config.eval_zeroshot or config.eval_retrieval:
            final["eval"] = evaluate(model, tokenizer, preprocess, eval_sets, config, device)
            log.write({"step": config.steps, "eval": final["eval"]})
        final["bad_examples"] = [f"#{b.index}: {b.reason}" for b in stream.bad[:5]]
        (out / "metrics.json").write_text(json.dumps(final, indent=1))
        log.close()
    if joined_here:
        distributed.shutdown()  # the group this call joined; a caller's own group stays
    return final


class _Log:
    """metrics.jsonl (truncated to the resumed step, so a resumed run's log reads as one run)
    and TensorBoard scalars when available."""

    def __init__(self, out: Path, start: int, config: TrainConfig, *, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.jsonl", None
        if not enabled:
            return
        kept = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line).get("step", 0) <= start]
        self.path.write_text("".join(line + "\n" for line in kept))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start or None)
        except ImportError:
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in _flatten(row).items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[prefix + key] = value
    return flat


def _progress(config: TrainConfig, start: int, *, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, disable=not (enabled and config.progress), unit="step",
                dynamic_ncols=True)
