"""The training loop: prepare -> resume -> epochs (steps, samples, checkpoint) -> finish.

Speed follows nanoGPT / stylegan2-ada rather than a ``DataLoader``: the whole uint8 training
set is moved to the device once, every step indexes a batch from a per-epoch permutation, and
losses are read (one host sync) every ``log_every_steps`` steps, which is also when divergence
is detected. A training set larger than the memory budget is streamed from the shards instead
(:mod:`.data`). Under ``torchrun`` every rank runs this loop on its own part of the images;
only rank 0 samples, measures, and writes files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from carmodels.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    best_checkpoint,
    checkpoint_spec,
    epoch_name,
    latest_checkpoint,
    load_checkpoint,
    resume_path,
)
from carmodels.checkpoint import save as save_checkpoint
from carmodels.device import resolve_device, retain_freed_cpu_memory
from carmodels.distributed import DistContext, device_for_rank, init_from_env, shutdown
from carmodels.errors import CheckpointError
from carmodels.models import ModelSpec
from carmodels.pictures import plot_losses, save_image_grid, save_progress_gif
from carmodels.train.artefacts import (
    GIF_NAME,
    GRID_SIDE,
    HISTORY_NAME,
    LOSS_PLOT_NAME,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    RunLog,
    clear_previous_run,
    tensorboard_writer,
    write_history,
)
from carmodels.train.config import TrainConfig, TrainingDiverged, TrainResult
from carmodels.train.cpu_amp import AmpChoice, choose_amp
from carmodels.train.data import InMemoryImages, StreamedImages, load_training_data
from carmodels.train.monitor import SampleMonitor, is_collapse
from carmodels.train.state import capture_rng_state, restore_rng_state, seed_everything
from carmodels.train.step import TrainStep

# The package's name, as when the trainer was one module: log configuration keeps working.
logger = logging.getLogger("carmodels.train")


def train(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    resume: bool | str | os.PathLike[str] = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a DCGAN on the train split of ``shards_dir``; write the run to ``out_dir``.

    ``resume=True`` continues from ``out_dir/checkpoints/latest.pt`` when there is one (else
    starts fresh); a path resumes from that checkpoint. Raises :class:`TrainingDiverged` when
    a loss becomes NaN/inf.

    Under ``torchrun`` (see :mod:`carmodels.distributed`) every rank calls this; the ranks
    split the images and ``config.batch_size`` (the global batch), and only rank 0 writes
    files, logs and reports progress.
    """
    config = config or TrainConfig()
    dist_context = init_from_env(resolve_device(config.device).type)
    try:
        run = _prepare(shards_dir, out_dir, config, on_progress, resume, log, dist_context)
        try:
            for epoch in range(run.start_epoch + 1, config.epochs + 1):
                _run_epoch(run, epoch)
                if dist_context.is_main:
                    _end_of_epoch(run, epoch)
        finally:
            run.records.close()
        return _finish(run)
    finally:
        shutdown(dist_context)


@dataclass
class _Run:
    """Everything one call of :func:`train` works with, set up by :func:`_prepare`."""

    config: TrainConfig
    dist: DistContext
    run_dir: Path
    spec: ModelSpec
    hyper: dict[str, float]
    device: torch.device
    #: The autocast dtype trained with, and why (the CPU probe's timings).
    amp: AmpChoice
    trainer: TrainStep
    #: This rank's training images: in memory, or streamed from the shards.
    images: InMemoryImages | StreamedImages
    rank_batch: int
    steps_per_epoch: int
    data_version: str
    fixed_noise: torch.Tensor
    #: Rank 0 only.
    monitor: SampleMonitor | None
    records: RunLog
    say: Callable[[str], None]
    on_progress: Callable[[int, int], None] | None
    start_epoch: int
    last_checkpoint: Path | None
    best: dict[str, float] | None
    grid_path: Path | None = None
    collapse_epochs: list[int] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


# -- prepare ---------------------------------------------------------------------------------


def _prepare(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    on_progress: Callable[[int, int], None] | None,
    resume: bool | str | os.PathLike[str],
    log: Callable[[str], None] | None,
    dist: DistContext,
) -> _Run:
    """Spec, device, data and models; then resume from a checkpoint or clear the folder."""
    main, world = dist.is_main, dist.world_size
    say = (log or logger.info) if main else _quiet
    run_dir = Path(out_dir)
    spec, hyper = config.model_spec(), config.hyperparameters()
    device = device_for_rank(resolve_device(config.device), dist)
    if device.type == "cpu":
        retain_freed_cpu_memory()  # no page faults on every step's activations
    rank_batch = _rank_batch(config.batch_size, world)
    resume_from = resume_path(resume, run_dir / CHECKPOINT_DIR)
    checkpoint = _load_resume_checkpoint(resume_from, spec)
    data = load_training_data(
        shards_dir, config, spec, dist, device, rank_batch, GRID_SIDE * GRID_SIDE
    )
    # Each rank trains on N // world images or more; the smallest part sets the epoch length.
    steps_per_epoch = (data.images.n_images // world) // rank_batch
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    # Before the models are seeded; the CPU probe leaves the RNGs as they were.
    amp = choose_amp(config.amp, device, spec, rank_batch, config.channels_last, dist)
    trainer = _build_trainer(config, spec, hyper, device, dist, amp.dtype)
    history: list[dict[str, float]] = []
    start_epoch, best, last_checkpoint = 0, None, None
    if checkpoint is not None:
        assert resume_from is not None
        history, best, start_epoch = _resume(trainer, checkpoint, resume_from, hyper)
        last_checkpoint = resume_from
        if checkpoint["data_version"] != data.data_version:
            say(
                f"Warning: {resume_from} was trained on data version "
                f"{checkpoint['data_version']}, the shards are now {data.data_version}."
            )
        say(f"Resuming from {resume_from} (epoch {start_epoch}, step {trainer.step}).")
    elif main:
        clear_previous_run(run_dir, say)
    dist.barrier()  # no rank starts before rank 0 has cleared the previous run
    del checkpoint

    run = _Run(
        config=config,
        dist=dist,
        run_dir=run_dir,
        spec=spec,
        hyper=hyper,
        device=device,
        amp=amp,
        trainer=trainer,
        monitor=data.monitor,
        images=data.images,
        rank_batch=rank_batch,
        steps_per_epoch=steps_per_epoch,
        data_version=data.data_version,
        fixed_noise=torch.randn(
            GRID_SIDE * GRID_SIDE, spec.nz, generator=torch.Generator().manual_seed(config.seed)
        ).to(device),
        records=RunLog(run_dir / HISTORY_NAME, history, None),
        say=say,
        on_progress=on_progress if main else None,
        start_epoch=start_epoch,
        last_checkpoint=last_checkpoint,
        best=best,
    )
    if main and config.tensorboard:
        run.records.writer = tensorboard_writer(run_dir, trainer.step if start_epoch else None)
    say(
        f"Training {config.preset} ({spec.image_size}px) on {data.images.n_images} images "
        f"({data.images.describe()}), {device}"
        + (f" x {world} processes" if world > 1 else "")
        + f", epochs {start_epoch + 1}..{config.epochs}, {steps_per_epoch} steps/epoch; "
        + f"{amp.describe()}."
    )
    return run


def _rank_batch(batch_size: int, world: int) -> int:
    """Each rank's share of the global batch."""
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} is the global batch and must divide evenly over "
            f"{world} processes; use a multiple of {world}."
        )
    return batch_size // world


def _load_resume_checkpoint(resume_from: Path | None, spec: ModelSpec) -> dict[str, Any] | None:
    """The checkpoint to resume from, checked to hold the model the config asks for."""
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    if checkpoint is not None and checkpoint_spec(checkpoint, resume_from) != spec:
        raise CheckpointError(
            f"Checkpoint {resume_from} has model {checkpoint['spec']}, but the config asks for "
            f"{spec.to_dict()}; resume with the same preset, image_size, nz, base_channels, "
            "generator_channels, batch_norm and spectral_norm."
        )
    return checkpoint


def _build_trainer(
    config: TrainConfig,
    spec: ModelSpec,
    hyper: dict[str, float],
    device: torch.device,
    dist: DistContext,
    amp_dtype: torch.dtype | None,
) -> TrainStep:
    """Seed every generator, then build fresh models and optimisers."""
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
    return TrainStep.create(
        spec,
        **hyper,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=config.channels_last,
        compile=config.compile,
        ema_decay=config.ema_decay,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
        diffaugment=config.diffaugment,
        diffaugment_target=config.diffaugment_target,
        loss=config.loss,
        r1_gamma=config.r1_gamma,
        r1_every=config.r1_every,
        dist_context=dist,
    )


def _resume(
    trainer: TrainStep, checkpoint: dict[str, Any], path: Path, hyper: dict[str, float]
) -> tuple[list[dict[str, float]], dict[str, float] | None, int]:
    """Load models, optimisers and RNGs; return the history, the best so far and the epoch."""
    trainer.load_state_dict(checkpoint)
    trainer.set_hyperparameters(**hyper)
    restore_rng_state(checkpoint["rng"])
    history = [dict(row) for row in checkpoint["history"]]
    return history, checkpoint.get("best"), int(checkpoint["epoch"])


# -- one epoch -------------------------------------------------------------------------------


def _run_epoch(run: _Run, epoch: int) -> None:
    """Every step of an epoch on every rank, logging as it goes."""
    trainer, records, config = run.trainer, run.records, run.config
    records.throughput.pause_until_now()
    for batch in run.images.batches(epoch, run.steps_per_epoch):
        trainer(batch)
        records.throughput.add(batch.shape[0] * run.dist.world_size)
        if trainer.step % config.log_every_steps == 0:
            _record(run, epoch)
        if run.on_progress is not None:
            run.on_progress(trainer.step, run.total_steps)
    _record(run, epoch)  # flush, so a checkpoint is never written after an unseen NaN
    last = records.history[-1]
    run.say(
        f"epoch {epoch}/{config.epochs} step {trainer.step}: "
        f"loss_d={last['loss_d']:.4f} loss_g={last['loss_g']:.4f} "
        f"D(x)={last['d_x']:.3f} D(G(z))={last['d_g_z']:.3f} "
        + (f"augment p={last['augment_p']:.3f} " if "augment_p" in last else "")
        + f"{last['images_per_s']:.0f} img/s"
    )


def _record(run: _Run, epoch: int) -> None:
    """Read the step's sums into a history row; stop if a loss is NaN or infinite."""
    stats = run.trainer.drain()
    if stats is None:
        return
    extra = {} if stats.augment_p is None else {"augment_p": stats.augment_p}
    row = run.records.append(epoch, run.trainer.step, {**stats.losses(), **extra})
    if not stats.is_finite():
        if run.dist.is_main:
            run.records.save_history()
        raise TrainingDiverged(epoch, run.trainer.step, stats.losses(), run.last_checkpoint)
    scalars = {key: value for key, value in row.items() if key not in ("epoch", "step")}
    run.records.add_scalars("train", scalars, run.trainer.step)


def _end_of_epoch(run: _Run, epoch: int) -> None:
    """Rank 0: sample and measure, checkpoint, save the history."""
    config = run.config
    is_best = False
    if epoch % config.sample_every == 0 or epoch == config.epochs:
        is_best = _sample(run, epoch)
    if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
        _checkpoint(run, epoch, is_best)
    run.records.save_history()
    run.records.flush()


def _sample(run: _Run, epoch: int) -> bool:
    """Save the fixed-noise grid, measure it into the last history row; True if best so far."""
    config, records, step = run.config, run.records, run.trainer.step
    sampler = run.trainer.sampling_generator()
    was_training = sampler.training
    with torch.no_grad():
        samples = sampler.eval()(run.fixed_noise)
    sampler.train(was_training)
    run.grid_path = save_image_grid(
        samples, run.run_dir / SAMPLES_DIR / epoch_name(epoch, ".png"), nrow=GRID_SIDE
    )
    assert run.monitor is not None
    quality = run.monitor.measure(samples)
    last = records.history[-1]
    collapsed = is_collapse(
        quality["sample_diversity"], records.history[:-1], config.collapse_fraction
    )
    last.update(quality, collapse_warning=float(collapsed))
    if collapsed:
        run.collapse_epochs.append(epoch)
        run.say(
            f"Warning: possible mode collapse at epoch {epoch}: sample diversity "
            f"{quality['sample_diversity']:.3f} fell below "
            f"{config.collapse_fraction:.0%} of its best so far "
            f"(samples/{epoch_name(epoch, '.png')})."
        )
    records.add_scalars("samples", quality, step)
    records.add_sample_grid(samples, step)
    return config.keep_best and (run.best is None or quality["sample_fd"] < run.best["sample_fd"])


def _checkpoint(run: _Run, epoch: int, is_best: bool) -> None:
    """Everything needed to resume exactly, as epoch-NNNN.pt (+ latest.pt, best.pt)."""
    history = run.records.history
    if is_best:
        run.best = {"epoch": float(epoch), "sample_fd": history[-1]["sample_fd"]}
    state = {
        "format": CHECKPOINT_FORMAT,
        **run.trainer.state_dict(),
        "rng": capture_rng_state(),
        "epoch": epoch,
        "spec": run.spec.to_dict(),
        "config": run.config.to_dict(),
        "hyperparameters": run.hyper,
        "data_version": run.data_version,
        # What config["amp"] resolved to in the process that wrote this (and the probe's times).
        "amp": run.amp.to_dict(),
        "history": history,
        "best": run.best,
        "torch_version": str(torch.__version__),
    }
    run.last_checkpoint = save_checkpoint(
        state, run.run_dir / CHECKPOINT_DIR, epoch, run.config.keep_last, is_best=is_best
    )


# -- finish ----------------------------------------------------------------------------------


def _finish(run: _Run) -> TrainResult:
    """Rank 0: the loss plot and progress GIF; every rank: the result."""
    config, run_dir, history = run.config, run.run_dir, run.records.history
    grids = sorted((run_dir / SAMPLES_DIR).glob("epoch-*.png"))
    grid_path, loss_plot, gif = run.grid_path, None, None
    if run.dist.is_main:
        if grid_path is None and grids:
            grid_path = grids[-1]
        loss_plot = plot_losses(history, run_dir / LOSS_PLOT_NAME) if history else None
        gif = save_progress_gif(
            grids,
            run_dir / GIF_NAME,
            config.gif_max_frames,
            config.gif_frame_width,
            config.gif_frame_ms,
        )
        if not run.records.history_path.exists():
            write_history(run.records.history_path, history)
    final = {k: history[-1][k] for k in ("loss_d", "loss_g", "d_x", "d_g_z")} if history else {}
    return TrainResult(
        run_dir=run_dir,
        checkpoint_path=latest_checkpoint(run_dir),
        epochs_completed=max(run.start_epoch, config.epochs),
        steps=run.trainer.step,
        images_per_s=run.records.throughput.mean,
        final_losses=final,
        grid_path=grid_path,
        loss_plot_path=loss_plot,
        gif_path=gif,
        history_path=run.records.history_path,
        device=str(run.device),
        best_checkpoint_path=best_checkpoint(run_dir),
        tensorboard_dir=run_dir / TENSORBOARD_DIR if run.records.writer is not None else None,
        collapse_epochs=run.collapse_epochs,
        amp=run.amp.describe(),
    )
