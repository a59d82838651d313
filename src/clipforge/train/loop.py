"""Training CLIP: one linear `train(config)`.

    clipforge train --model tiny --data shapes:// --steps 2000 --out runs/shapes
    torchrun --nproc-per-node 4 -m clipforge.cli train --config run.toml

prints a progress bar (step, samples/s, loss, lr, temperature, ETA; a plain line every
``log_every`` steps when stderr is not a terminal) and writes ``OUT/metrics.jsonl``,
``OUT/metrics.json``, TensorBoard scalars (when `tensorboard` is installed) and checkpoints under
``OUT/checkpoints/``.  The step itself is `clipforge.train.step`.

Settings are checked before anything is written: the device and precision against this machine,
and a resumed run against its checkpoint (`clipforge.train.config.check_resume`).  SIGINT, SIGTERM
and SIGUSR1 stop the run after the current step with a checkpoint (`clipforge.train.interrupt`).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clipforge import distributed
from clipforge.train.config import ConfigError, TrainConfig, check_resume
from clipforge.train.step import build_optimizer, lr_factor, train_step

if TYPE_CHECKING:  # pragma: no cover
    from clipforge.model import CLIPConfig

__all__ = ["train", "build_model", "check_loss_fits", "evaluate", "open_eval_sets", "scores_for_loss"]


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
    """``name`` as a device: "auto" is this process's CUDA device if there is one, else the CPU, and
    so is "cuda" without an index under torchrun.  A device this machine lacks is a `ConfigError`."""
    from clipforge.devices import default_device

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = default_device(name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return torch.device(f"cuda:{local_rank}") if device.type == "cuda" and device.index is None else device


def scores_for_loss(cfg: CLIPConfig, loss: str) -> CLIPConfig:
    """A fresh model's config with the initial logit scale (and bias) of ``loss``, whatever the
    preset's family: the sigmoid loss's s = 10, b = −10 (Zhai et al., 2023, section 3.2; OpenCLIP's
    ``--siglip`` sets the same on any model), the softmax loss's s = 1/0.07 and no bias (Radford et
    al., 2021, section 2.5).  A SigLIP preset trained with ``clip`` is its architecture trained as
    CLIP was (the SigLIP paper compares the two losses so), and has CLIP's softmax scores."""
    from clipforge.loss import CLIP_INIT_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_SCALE

    if loss == "siglip":
        if cfg.init_logit_bias is None:
            return replace(cfg, init_logit_scale=SIGLIP_INIT_SCALE, init_logit_bias=SIGLIP_INIT_BIAS)
        return cfg  # a SigLIP preset: its own initialisation
    if cfg.init_logit_bias is not None:
        return replace(cfg, init_logit_scale=CLIP_INIT_SCALE, init_logit_bias=None)
    return cfg


FAMILY_NAMES = {"clip": "CLIP", "siglip": "SigLIP", "chinese_clip": "Chinese-CLIP"}  # as messages name them


def check_loss_fits(model: nn.Module, loss: str, named: str) -> None:
    """A `ConfigError` when a trained model's scores do not fit ``loss``: a SigLIP model (its scores
    are sigmoid probabilities with a learned bias) fine-tuned with the softmax loss, which would
    leave the bias untrained, or a CLIP model with the sigmoid loss, which needs a bias it lacks."""
    from clipforge.zeroshot import is_sigmoid_model

    if loss == "clip" and is_sigmoid_model(model):
        raise ConfigError(f"--loss clip: {named} is a SigLIP model (sigmoid scores with a learned bias); fine-tune it "
                          "with --loss siglip, or train its architecture afresh with the softmax loss from the preset")
    if loss == "siglip" and not is_sigmoid_model(model):
        family = FAMILY_NAMES.get(getattr(getattr(model, "config", None), "family", "clip"), "CLIP")
        raise ConfigError(f"--loss siglip: {named} is a {family} model, without the learned bias the sigmoid loss "
                          "needs; fine-tune it with --loss clip, or start from a SigLIP checkpoint or a preset")


def build_model(config: TrainConfig, source: Any) -> tuple[nn.Module, Callable, Callable]:
    """(model, preprocess, tokenizer) to train: a checkpoint or released weights (``model`` and
    ``pretrained``, any name `clipforge.load` takes) as they are, or a fresh preset whose
    vocabulary is a BPE trained on the data's captions when the preset has none of its own.
    A fresh preset gets the logit scale (and bias) of ``config.loss`` (`scores_for_loss`); a trained
    model must already have the scores of its loss (`check_loss_fits`)."""
    from clipforge.checkpoints import is_preset, load
    from clipforge.data.batches import captions_of
    from clipforge.model import CLIP, get_config
    from clipforge.model.config import OPENAI_VOCAB_SIZE
    from clipforge.tokenizer import Tokenizer, train_bpe
    from clipforge.transforms import image_transform

    tokenizer = Tokenizer.from_dir(config.tokenizer) if config.tokenizer else None
    pretrained = config.pretrained or None
    if pretrained is None and is_preset(config.model):
        cfg = get_config(config.model)
        if tokenizer is None and cfg.text.vocab_size != OPENAI_VOCAB_SIZE:  # no OpenAI BPE to use: train one
            captions = captions_of(source, 20_000)
            tokenizer = train_bpe(captions, config.vocab_size, context_length=cfg.text.context_length)
        if tokenizer is not None:
            cfg = replace(cfg, text=replace(cfg.text, vocab_size=tokenizer.vocab_size))
        cfg = scores_for_loss(cfg, config.loss)
        torch.manual_seed(config.seed)
        model = CLIP(cfg)
        vision = cfg.vision
        preprocess = image_transform(vision.image_size, mean=vision.mean, std=vision.std, train=config.augment)
        if tokenizer is None:
            from clipforge.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(context_length=cfg.text.context_length)
        return model, preprocess, tokenizer
    model, loaded_preprocess, loaded_tok = load(config.model, pretrained=pretrained)
    check_loss_fits(model, config.loss, config.model if pretrained is None else f"{config.model} ({pretrained})")
    named = config.model if pretrained is None else f"{config.model} --pretrained {pretrained}"
    if tokenizer is not None and tokenizer.vocab_size > model.config.text.vocab_size:
        raise ConfigError(f"--tokenizer {config.tokenizer}: {tokenizer.vocab_size} ids, more than the "
                          f"{model.config.text.vocab_size} of {named}'s vocabulary; give the tokenizer it was "
                          "trained with")
    tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ConfigError(f"{named} has no tokenizer of its own: pass --tokenizer DIR")
    vision = model.config.vision
    # Without augmentation, images are prepared as the model's own preprocessing does (SigLIP's and
    # Chinese-CLIP's resize to the square, CLIP's crops the centre); with it, random resized crops.
    preprocess = (image_transform(vision.image_size, mean=vision.mean, std=vision.std, train=True)
                  if config.augment else loaded_preprocess)
    model.train()
    return model, preprocess, tokenizer


def _check_stream_position(saved: dict[str, Any], now: dict[str, Any], *, run: Path, step: int) -> None:
    """A streamed source resumes exactly only in as many processes as cut its stream (the
    config's own keys are `check_resume`'s)."""
    if not now["streaming"] or not saved or saved.get("world", now["world"]) == now["world"]:
        return
    raise ConfigError(
        f"cannot resume {run} at step {step}: a streamed data source (shards:) is split between the processes, "
        f"{saved['world']} in the checkpoint, {now['world']} now; resume with {saved['world']}, or start a new run "
        f"from the checkpoint with --model {run}/checkpoints/step-{step:07d}"
    )


def _data_position(config: TrainConfig, *, world: int, streaming: bool) -> dict[str, Any]:
    """The settings that decide where the data stands at a step (a stream's also world and workers)."""
    return {"data": config.data, "seed": config.seed, "batch_size": config.batch_size,
            "accum_steps": config.accum_steps, "world": world, "workers": config.workers, "streaming": streaming}


def _batch_stream(config: TrainConfig, source: Any, preprocess: Callable, tokenizer: Callable, *,
                  pixel_std: tuple[float, ...], rank: int, world: int) -> Any:
    """This rank's batches."""
    from clipforge.data.batches import BatchPlan, BatchStream, StreamBatchStream

    split = dict(batch_size=config.batch_size, seed=config.seed, rank=rank, world=world, accum=config.accum_steps)
    # noise of std image_noise in pixels is image_noise / std in the normalised tensor's units
    noise = tuple(config.image_noise / s for s in pixel_std) if config.image_noise else ()
    loading = dict(preprocess=preprocess, tokenizer=tokenizer, augment=config.augment, noise=noise,
                   workers=config.workers, max_bad_fraction=config.max_bad_fraction, source_name=config.data)
    if getattr(source, "streaming", False):  # shards: each rank and worker reads its own share
        return StreamBatchStream(source, **split, **loading)
    return BatchStream(source, BatchPlan(len(source), **split), **loading)


def _restore(state: dict[str, Any], optimizer: torch.optim.Optimizer, schedule: Any, scaler: Any) -> None:
    """Loads a checkpoint's optimiser, schedule, grad scaler and RNG states."""
    from clipforge.train.run_state import set_rng_state

    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def _check_device(config: TrainConfig) -> str | None:
    """What this machine cannot run, as a `ConfigError` before anything is written; a precision
    that runs slowly here as a warning text to show once the run is sure to start."""
    from clipforge.devices import check_precision

    try:
        return check_precision(config.precision, _device(config.device, 0), training=True)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _warn_small_data(config: TrainConfig, source: Any) -> None:
    """A warning when a batch holds the data set more than once: each sample's copies share the batch.
    The batch stays as asked (capping it would change the run's numbers without being asked)."""
    from clipforge.data.batches import image_groups

    if getattr(source, "streaming", False) or config.batch_size <= len(source):
        return
    times = config.batch_size / len(source)
    copies = ("its copies are positives of each other" if image_groups(source) is not None
              else "its copies are negatives of each other")
    warnings.warn(f"batch_size {config.batch_size} is larger than the {len(source)} samples of {config.data}: "
                  f"each batch holds every sample about {times:.0f} times, and {copies}; a batch_size of at most "
                  f"{len(source)} avoids it", stacklevel=3)


def _replan(config: TrainConfig, state: dict[str, Any], start: int) -> tuple[int, float] | None:
    """The schedule of a run resumed at ``start``: the checkpoint's re-planned one, or, when
    ``steps`` changed (`check_resume` let it only with ``extend_schedule``), a cosine from the
    factor at ``start`` to the floor at the new last step.  Warm-up does not depend on ``steps``:
    a run extended during it needs no re-planning."""
    saved = state.get("schedule_replanned")
    before = tuple(saved) if saved else None
    old_steps = state.get("config", {}).get("steps", config.steps)
    if old_steps == config.steps or start < config.warmup:
        return before  # type: ignore[return-value]
    factor = lr_factor(start, config.replace(steps=old_steps), replanned=before)  # type: ignore[arg-type]
    return start, factor


def train(config: TrainConfig, *, extend_schedule: bool = False) -> dict[str, Any]:
    """Run ``config`` to its last step; returns the final metrics (also in OUT/metrics.json).

    ``extend_schedule``: a resumed run may have more ``steps`` than its checkpoint; the learning
    rate then decays from where it stands to the floor at the new last step.  Other contradictions
    of the checkpoint (`clipforge.train.config.check_resume`) and settings this machine cannot run
    raise a `ConfigError` before anything is written.

    SIGINT, SIGTERM and SIGUSR1 stop the run after the current step with a checkpoint, and raise
    `clipforge.train.interrupt.Interrupted`; a second signal stops at once.
    """
    from clipforge.data import DataError, open_data
    from clipforge.train.interrupt import Interrupted, StopRequests
    from clipforge.train.run_state import find_checkpoint, load_train_state, save_checkpoint

    # ---- processes and device: checked before anything is written --------------------------
    joined_here = not distributed.is_initialized()
    precision_note = _check_device(config)
    rank, world, local_rank = distributed.init_from_env(_device(config.device, 0).type)
    try:
        device = _device(config.device, local_rank)
        main_process = rank == 0
        if config.batch_size % (world * config.accum_steps):
            raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {world} processes × "
                              f"accum_steps {config.accum_steps}")
        out = Path(config.out)
        torch.manual_seed(config.seed)

        # ---- data, resume, model -------------------------------------------------------------
        source = open_data(config.data)
        if not (getattr(source, "streaming", False) or hasattr(source, "__getitem__")):
            # imagefolder: and folder: hold images without captions: nothing to contrast them with
            raise DataError(f"train cannot use {config.data!r}: it gives a {type(source).__name__}, images "
                            "without captions; train on csv:, jsonl:, pairs:, shards:, shapes:// or digits://")
        streaming = bool(getattr(source, "streaming", False))
        data_position = _data_position(config, world=world, streaming=streaming)
        resume_from = find_checkpoint(out, config.resume) if config.resume else None
        state = load_train_state(resume_from) if resume_from is not None else None
        start = int(state["step"]) if state is not None else 0
        if state is not None:
            check_resume(state.get("config", {}), config, run=out, step=start, streaming=streaming,
                         extend_schedule=extend_schedule)
            _check_stream_position(state.get("data", {}), data_position, run=out, step=start)
        if main_process:  # once per run, not once per rank
            if precision_note:
                warnings.warn(precision_note, stacklevel=2)
            _warn_small_data(config, source)
        # a resumed run takes model and tokenizer from its checkpoint (its config keeps the names it started from)
        start_from = config.replace(model=str(resume_from), pretrained="") if resume_from else config
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

        stream = _batch_stream(config, source, preprocess, tokenizer, pixel_std=model.config.vision.std,
                               rank=rank, world=world)
        eval_sets = open_eval_sets(config) if main_process else []

        # ---- optimiser, schedule, resume -----------------------------------------------------
        replanned = _replan(config, state, start) if state is not None else None
        extended_from = state["config"].get("steps") if state is not None and "config" in state else None
        optimizer = build_optimizer(model, config)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, replanned=replanned))
        scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
        # the counts of the whole run: the checkpoint's (older ones kept none: every step read a
        # whole batch, bad samples included), plus this process group's since
        counts = {"samples_read": start * config.batch_size, "bad_samples": 0, "skipped_steps": 0}
        if state is not None:
            _restore(state, optimizer, schedule, scaler)
            counts.update(state.get("counts", {}))
        del state  # the optimiser's copy of the moments is the one kept
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
            if start < config.steps:  # the run is not finished: its final metrics come at the end
                (out / "metrics.json").unlink(missing_ok=True)
        log = _Log(out, start, config, enabled=main_process)
        if main_process and resume_from is not None:
            print(f"resumed from {resume_from} at step {start}")
            if extended_from not in (None, config.steps):
                floor = f"{config.lr * config.min_lr_ratio:.3g} at step {config.steps}"
                how = (f"decays from {config.lr * replanned[1]:.3g} at step {start} to {floor}"
                       if replanned is not None and replanned[0] == start
                       else f"warms up as before, then decays by cosine to {floor}")
                print(f"extended the run from {extended_from} to {config.steps} steps: the learning rate {how}")

        def totals(skipped_steps: int) -> dict[str, int]:
            """The run's counts so far, all ranks together (each rank counts its own share)."""
            seen, bad = distributed.sum_over_ranks([stream.seen, stream.bad_count], device)
            return {"samples_read": counts["samples_read"] + seen, "bad_samples": counts["bad_samples"] + bad,
                    "skipped_steps": counts["skipped_steps"] + skipped_steps}

        def save(step: int, skipped_steps: int) -> Path:
            run_counts = totals(skipped_steps)
            path = out / "checkpoints" / f"step-{step:07d}"
            if main_process:
                path = save_checkpoint(out, step, model=model, tokenizer=tokenizer, keep_last=config.keep_last, state={
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "config": config.to_dict(),
                    "data": data_position, "counts": run_counts,
                    **({"schedule_replanned": list(replanned)} if replanned is not None else {}),
                })
            distributed.barrier()
            return path

        # ---- the loop -----------------------------------------------------------------------
        with StopRequests(label="clipforge train" + (f" (rank {rank})" if world > 1 else "")) as stop:
            progress = _Progress(config, start, enabled=main_process)
            t_last, samples = time.perf_counter(), 0
            skipped_steps, stopped_by, saved_at, done = 0, 0, start if resume_from is not None else None, start
            batches = stream.steps(start, config.steps)
            stop.running = True
            try:
                for step, micro in enumerate(batches, start=start):
                    micro = [m.to(device) for m in micro]
                    stats = train_step(step_model, micro, optimizer, config=config, ddp=ddp, scaler=scaler)
                    schedule.step()
                    skipped_steps += int(stats["skipped"])
                    samples += sum(len(m) for m in micro) * world
                    done = step + 1
                    if done % config.log_every == 0 or done == config.steps:
                        now = time.perf_counter()
                        run_counts = totals(skipped_steps)
                        row = {"step": done, **stats, "lr": schedule.get_last_lr()[0],
                               "samples_per_s": samples / max(now - t_last, 1e-9), "epoch": stream.epoch(done),
                               "bad_samples": run_counts["bad_samples"], "skipped_steps": run_counts["skipped_steps"]}
                        log.write(row)
                        progress.log(row)
                        t_last, samples = now, 0
                    progress.update(done)
                    if config.eval_every and done % config.eval_every == 0 and done < config.steps and main_process:
                        log.write({"step": done, "eval": evaluate(model, tokenizer, preprocess, eval_sets, config,
                                                                  device)})
                    if done % config.save_every == 0 and done < config.steps:
                        save(done, skipped_steps)
                        saved_at = done
                    # every rank stops after the same step, whichever of them was signalled
                    stopped_by = distributed.max_over_ranks(stop.signum, device)
                    if stopped_by and done < config.steps:
                        break
            finally:
                batches.close()  # the loader's workers shut down now, also when the loop stopped early
                progress.close()

            # ---- the end --------------------------------------------------------------------
            try:
                if stopped_by and done < config.steps:
                    path = save(done, skipped_steps) if saved_at != done else out / "checkpoints" / f"step-{done:07d}"
                    raise Interrupted(stopped_by, step=done, checkpoint=str(path), main_process=main_process)
                if start < config.steps:
                    save(config.steps, skipped_steps)
                run_counts = totals(skipped_steps)
                final: dict[str, Any] = {"step": config.steps, "bad_samples": run_counts["bad_samples"],
                                         "samples_read": run_counts["samples_read"],
                                         "skipped_steps": run_counts["skipped_steps"]}
                # a signal during the last step or the final save: the checkpoint is written, and the
                # final evaluation is left to the resumed run, which does only that
                stopped_by = distributed.max_over_ranks(stop.signum, device)
                if stopped_by:
                    checkpoint = out / "checkpoints" / f"step-{config.steps:07d}"
                    raise Interrupted(stopped_by, step=config.steps, checkpoint=str(checkpoint),
                                      main_process=main_process)
                if main_process:
                    if config.eval_zeroshot or config.eval_retrieval:
                        final["eval"] = evaluate(model, tokenizer, preprocess, eval_sets, config, device)
                        log.write({"step": config.steps, "eval": final["eval"]})
                    final["bad_examples"] = [f"#{b.index}: {b.reason}" for b in stream.bad[:5]]
                    (out / "metrics.json").write_text(json.dumps(final, indent=1))
            finally:
                log.close()
        return final
    finally:
        if joined_here:
            distributed.shutdown()  # the group this call joined; a caller's own group stays


class _Log:
    """metrics.jsonl (truncated to the resumed step, so a resumed run's log reads as one run),
    the run's config.json and TensorBoard scalars when available."""

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
            self.tb = None


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[prefix + key] = value
    return flat


class _Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI, ``nohup``), where a bar's carriage
    returns would pile up on one line, a plain line per metrics.jsonl row: step, loss, learning
    rate, temperature, samples/s and the time left."""

    def __init__(self, config: TrainConfig, start: int, *, enabled: bool) -> None:
        self.bar, self.lines = None, False
        self.start, self.total, self.t0 = start, config.steps, time.perf_counter()
        if not (enabled and config.progress):
            return
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=config.steps, initial=start, unit="step", dynamic_ncols=True)
        else:
            self.lines = True

    def log(self, row: dict[str, Any]) -> None:
        """A metrics row: the bar's figures, or one plain line."""
        temperature = 1 / row["logit_scale"]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", T=f"{temperature:.4f}",
                                 sps=f"{row['samples_per_s']:.0f}", refresh=False)
        elif self.lines:
            done = row["step"]
            rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)  # steps/s in this process
            left = (self.total - done) / rate if rate > 0 else 0.0
            print(f"step {done}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  T {temperature:.4f}  "
                  f"samples/s {row['samples_per_s']:.0f}  ETA {_duration(left)}", file=sys.stderr, flush=True)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """3h05m, 4m10s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
