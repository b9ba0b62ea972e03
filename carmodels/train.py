"""DCGAN training: a fast on-device loop, exact resume, and the artefacts people look at.

Speed follows nanoGPT / stylegan2-ada rather than a ``DataLoader``: the whole uint8 training
set is moved to the device once (60,000 128 px images are 2.9 GB), every step indexes a batch
from a per-epoch permutation and normalises it on the device, and the step never calls
``.item()``: losses are summed on the device and read every ``log_every_steps`` steps, which
is also when divergence (NaN/inf) is detected.

Exact resume: each epoch's permutation comes from a generator seeded with ``(seed, epoch)``,
the noise of the step has its own generator, and checkpoints hold the state of every random
number generator, both optimisers and the EMA generator. On the CPU, 2 epochs straight and
1 epoch + resume + 1 epoch give bit-identical weights.

:class:`TrainStep` (one D + one G update) is shared with ``bench/train_gpu.py`` so the
benchmark times exactly the code that trains.

Outputs under ``out_dir``: ``checkpoints/epoch-NNNN.pt`` (+ ``latest.pt``),
``samples/epoch-NNNN.png``, ``history.csv``, ``losses.png`` and ``progress.gif``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carmodels.augment import DiffAugment, parse_policy
from carmodels.distributed import (
    SINGLE_PROCESS,
    DistContext,
    device_for_rank,
    init_from_env,
    shutdown,
)
from carmodels.errors import CheckpointError, MissingInputError, one_line
from carmodels.io import atomic_save_figure, atomic_write, atomic_write_bytes
from carmodels.models import (
    Discriminator,
    Generator,
    ModelSpec,
    build_discriminator,
    build_generator,
    get_preset,
)
from carmodels.versioning import contents_version

logger = logging.getLogger(__name__)

#: Version of the checkpoint dictionary layout.
CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
SAMPLES_DIR = "samples"
LATEST_NAME = "latest.pt"
BEST_NAME = "best.pt"
TENSORBOARD_DIR = "tensorboard"
HISTORY_NAME = "history.csv"
LOSS_PLOT_NAME = "losses.png"
GIF_NAME = "progress.gif"
HISTORY_COLUMNS = (
    "epoch",
    "step",
    "loss_d",
    "loss_g",
    "d_x",
    "d_g_z",
    "images_per_s",
    # Filled on the last row of each sampled epoch (see SampleMonitor), empty elsewhere.
    "sample_fd",
    "sample_diversity",
    "collapse_warning",
)
#: The per-epoch sample grid is GRID_SIDE x GRID_SIDE images from fixed noise.
GRID_SIDE = 8
AMP_MODES = ("auto", "bf16", "off")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left in place."""

    def __init__(
        self, epoch: int, step: int, losses: dict[str, float], last_checkpoint: Path | None
    ) -> None:
        self.epoch, self.step, self.losses, self.last_checkpoint = (
            epoch,
            step,
            losses,
            last_checkpoint,
        )
        shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"Training diverged at epoch {epoch}, step {step} ({shown}); {kept}. "
            "Lower the learning rates (lr_g/lr_d) or resume from that checkpoint."
        )


@dataclass
class TrainConfig:
    """Every training setting. ``None`` learning rates and betas mean "the preset's"."""

    preset: str = "seed"
    image_size: int = 128
    epochs: int = 170
    batch_size: int = 128
    lr_g: float | None = None
    lr_d: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    nz: int | None = None
    #: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 1
    #: How many epoch checkpoints to keep (None keeps all); ``latest.pt`` is always kept.
    keep_last: int | None = 3
    sample_every: int = 1
    log_every_steps: int = 20
    #: "auto" = bf16 autocast on CUDA and off on CPU; "bf16" forces it; "off" is plain fp32.
    amp: str = "auto"
    channels_last: bool = True
    #: torch.compile G and D. Off by default: on an H200 (torch 2.11) eager bf16 with
    #: channels_last was ~25% faster than compiled (see bench/train_gpu.py).
    compile: bool = False
    #: Cap on steps per epoch (tests, smoke runs); None = one pass over the data.
    max_steps_per_epoch: int | None = None
    # The next three defaults were chosen by measurement (bench/train_options.py, figures in
    # docs/BENCHMARKS.md "Training options", 2026-11-28): the small preset, 64 px, 30 epochs
    # on the 1,188 cars-sample training photos, 2 seeds, scored on the val split.
    #: Decay of the exponential moving average of G used for samples; None disables it.
    #: On: the EMA generator scored better than the raw one on both seeds and both metrics
    #: (type_fd 32.4 vs 44.3, pixel_fd_16 3.9 vs 6.8).
    ema_decay: float | None = 0.999
    #: One-sided label smoothing: the discriminator's target for real images is 1 - this.
    #: Off: 0.1 was within noise (type_fd 35.1 vs 32.4, seed-to-seed range 6.4).
    label_smoothing: float = 0.0
    #: DiffAugment policy for D's inputs, e.g. "color,translation,cutout"; "" = off.
    #: Off: that policy was within noise on type_fd (35.1 vs 32.4) and worse on pixel_fd_16
    #: (5.8 vs 3.9, both seeds); off also costs nothing.
    diffaugment: str = ""
    #: Also keep ``best.pt``: the checkpoint with the lowest ``sample_fd`` (see SampleMonitor).
    keep_best: bool = True
    #: Warn of mode collapse when the fixed-noise samples' diversity falls below this
    #: fraction of the highest diversity seen earlier in the run.
    collapse_fraction: float = 0.5
    #: Write TensorBoard event files to ``out_dir/tensorboard``.
    tensorboard: bool = True
    #: Identifies the training data in checkpoints; None = hash of the shard files.
    data_version: str | None = None
    #: The progress GIF keeps at most this many evenly spaced epochs (always the last)...
    gif_max_frames: int = 60
    #: ...each scaled to this many pixels wide, so 170 epochs stay a few MB.
    gif_frame_width: int = 512
    gif_frame_ms: int = 200

    def __post_init__(self) -> None:
        get_preset(self.preset)  # raises a clear error for unknown names
        positive = (
            "epochs",
            "batch_size",
            "checkpoint_every",
            "sample_every",
            "log_every_steps",
            "gif_max_frames",
            "gif_frame_width",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"TrainConfig.keep_last must be >= 1 or None, got {self.keep_last}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError("TrainConfig.max_steps_per_epoch must be >= 1 or None")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"TrainConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        if not 0.0 < self.collapse_fraction < 1.0:
            raise ValueError(
                f"TrainConfig.collapse_fraction must be in (0, 1), got {self.collapse_fraction}"
            )
        parse_policy(self.diffaugment)  # raises a clear error for unknown policies
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(
                f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_spec(self) -> ModelSpec:
        spec = get_preset(self.preset).spec
        return replace(spec, image_size=self.image_size, nz=self.nz or spec.nz)

    def hyperparameters(self) -> dict[str, float]:
        """Learning rates and Adam betas, filled in from the preset where not set."""
        preset = get_preset(self.preset)
        return {
            "lr_g": self.lr_g if self.lr_g is not None else preset.lr_g,
            "lr_d": self.lr_d if self.lr_d is not None else preset.lr_d,
            "beta1": self.beta1 if self.beta1 is not None else preset.beta1,
            "beta2": self.beta2 if self.beta2 is not None else preset.beta2,
        }


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint_path: Path | None
    epochs_completed: int
    steps: int
    #: Mean training throughput of this call (checkpointing and sampling excluded).
    images_per_s: float
    final_losses: dict[str, float]
    grid_path: Path | None
    loss_plot_path: Path | None
    gif_path: Path | None
    history_path: Path
    device: str
    #: The checkpoint with the lowest sample_fd, when keep_best and one was measured.
    best_checkpoint_path: Path | None = None
    tensorboard_dir: Path | None = None
    #: Epochs at which the fixed-noise samples' diversity collapsed.
    collapse_epochs: list[int] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return self.epochs_completed


@dataclass(frozen=True)
class StepStats:
    """Means over the steps since the last read."""

    loss_d: float
    loss_g: float
    d_x: float
    d_g_z: float
    n_steps: int

    def losses(self) -> dict[str, float]:
        return {"loss_d": self.loss_d, "loss_g": self.loss_g, "d_x": self.d_x, "d_g_z": self.d_g_z}

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.losses().values())


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. Only called at run time, never at import."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'.")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a TrainConfig.amp setting (None = full fp32)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


class EmaGenerator:
    """Exponential moving average of the generator's weights (sharper, steadier samples).

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so that short runs are not
    dominated by the random initialisation.
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, list(generator.parameters()), 1.0 - decay)
        for ema_buffer, buffer in zip(self.module.buffers(), generator.buffers(), strict=True):
            ema_buffer.copy_(buffer)


class TrainStep:
    """One DCGAN update (D on real + detached fake, then G with the non-saturating loss).

    Losses and the mean discriminator outputs are accumulated on the device; :meth:`drain`
    reads them (one host sync) and resets the sums.

    Work is saved only where the result is mathematically unchanged:

    * without batch norm, D sees real and fake images as one concatenated batch (one larger
      convolution per layer instead of two; with batch norm the batch statistics would mix,
      so BN models keep two calls);
    * in the G step D's parameters are frozen, so backward computes the gradient that flows
      into G but not D's weight gradients, which the old loop computed and then discarded;
    * on the CPU the models' convolutions on small feature maps run as im2col + matrix
      multiply (see ``carmodels.models.CPU_GEMM_MAX_SIDE``), where oneDNN is slowest.
    """

    def __init__(
        self,
        generator: Generator,
        discriminator: Discriminator,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compile: bool,
        ema: EmaGenerator | None,
        noise: torch.Generator,
        seed: int = 0,
        label_smoothing: float = 0.0,
        diffaugment: str = "",
        dist_context: DistContext = SINGLE_PROCESS,
    ) -> None:
        self.generator, self.discriminator = generator, discriminator
        self.opt_g, self.opt_d = opt_g, opt_d
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.ema, self.noise = ema, noise
        self.nz = generator.spec.nz
        self.seed, self.dist = seed, dist_context
        self.real_label = 1.0 - label_smoothing
        self.augment = DiffAugment(diffaugment)
        self.concat_d_batches = not discriminator.spec.batch_norm
        g_train: nn.Module = generator
        d_train: nn.Module = discriminator
        if dist_context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Buffers (BN running stats) only matter for sampling; broadcasting them before
            # every forward would add a collective per call.
            g_train = DistributedDataParallel(generator, device_ids=ids, broadcast_buffers=False)
            d_train = DistributedDataParallel(
                discriminator, device_ids=ids, broadcast_buffers=False
            )
        # Compiled wrappers share parameters with the plain modules, which are what we save.
        self._g = torch.compile(g_train) if compile else g_train
        self._d = torch.compile(d_train) if compile else d_train
        # The G step needs no gradient synchronisation of D (it is frozen), so it calls the
        # plain (possibly compiled) module, not the DDP wrapper.
        self._d_frozen = torch.compile(discriminator) if compile else discriminator
        self.step = 0
        self._sums: torch.Tensor | None = None
        self._pending = 0

    @classmethod
    def create(
        cls,
        spec: ModelSpec,
        *,
        lr_g: float,
        lr_d: float,
        beta1: float,
        beta2: float,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compile: bool,
        ema_decay: float | None,
        seed: int,
        label_smoothing: float = 0.0,
        diffaugment: str = "",
        dist_context: DistContext = SINGLE_PROCESS,
    ) -> TrainStep:
        """Fresh models (initialised on the CPU, so identical on every device and rank) and Adam."""
        torch.manual_seed(seed)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        generator = build_generator(spec).to(device, memory_format=memory_format)
        if channels_last:
            # z is 1x1, so channels_last buys nothing in the first layer, and Inductor
            # (torch 2.11) mispredicts the strides of that layer's weight gradient.
            generator.project.to(memory_format=torch.contiguous_format)
        discriminator = build_discriminator(spec).to(device, memory_format=memory_format)
        # One multi-tensor kernel per optimiser step (CUDA and, since torch 2.4, CPU).
        adam = {"betas": (beta1, beta2), "fused": True}
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, **adam)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, **adam)
        ema = EmaGenerator(generator, ema_decay) if ema_decay is not None else None
        noise = torch.Generator(device=device)
        return cls(
            generator,
            discriminator,
            opt_g,
            opt_d,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            compile=compile,
            ema=ema,
            noise=noise,
            seed=seed,
            label_smoothing=label_smoothing,
            diffaugment=diffaugment,
            dist_context=dist_context,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _seed_noise(self) -> None:
        """Noise and augmentation draws are a pure function of (seed, rank, step).

        So a resumed run draws exactly what a straight run draws, on every rank, without
        saving one generator state per rank; reseeding costs no host sync.
        """
        self.noise.manual_seed((self.seed * 1_000_003 + self.dist.rank) * 1_000_003 + self.step)

    def __call__(self, real_uint8: torch.Tensor) -> None:
        """Train on one batch of N x 3 x S x S uint8 images already on the device."""
        real = real_uint8.float().div_(127.5).sub_(1.0)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        n = real.shape[0]
        self._seed_noise()
        z = torch.randn(n, self.nz, 1, 1, device=self.device, generator=self.noise)
        augment, noise = self.augment, self.noise
        with self._autocast():
            fake = self._g(z)
            seen_real, seen_fake = augment(real, noise), augment(fake.detach(), noise)
            if self.concat_d_batches:
                logits_real, logits_fake = self._d(torch.cat([seen_real, seen_fake])).split(n)
            else:
                logits_real, logits_fake = self._d(seen_real), self._d(seen_fake)
            # One-sided label smoothing: real targets 1 - s, fake targets stay 0.
            loss_d = F.binary_cross_entropy_with_logits(
                logits_real, torch.full_like(logits_real, self.real_label)
            ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)
        try:
            with self._autocast():
                logits_gen = self._d_frozen(augment(fake, noise))
                # Non-saturating loss: maximise log D(G(z)) rather than minimise log(1 - D(G(z))).
                loss_g = F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            self.discriminator.requires_grad_(True)
        self.opt_g.step()

        self.step += 1
        if self.ema is not None:
            self.ema.update(self.generator, self.step)
        stats = torch.stack(
            [
                loss_d.detach(),
                loss_g.detach(),
                torch.sigmoid(logits_real.detach()).mean(),
                torch.sigmoid(logits_fake.detach()).mean(),
            ]
        ).float()
        self._sums = stats if self._sums is None else self._sums.add_(stats)
        self._pending += 1

    def drain(self) -> StepStats | None:
        """Mean stats since the last drain (None if no step ran); the only host sync."""
        if self._sums is None:
            return None
        # Averaged over the ranks too, so every rank sees (and stops on) the same numbers.
        means = self.dist.all_reduce_mean_(self._sums / self._pending)
        loss_d, loss_g, d_x, d_g_z = means.tolist()
        stats = StepStats(loss_d, loss_g, d_x, d_g_z, self._pending)
        self._sums, self._pending = None, 0
        return stats

    def sampling_generator(self) -> nn.Module:
        """The generator to draw samples from: the EMA one when enabled."""
        return self.ema.module if self.ema is not None else self.generator

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "ema_generator": self.ema.module.state_dict() if self.ema is not None else None,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            # A checkpoint trained without EMA starts the average from the current weights.
            self.ema.module.load_state_dict(state["ema_generator"] or state["generator"])
        self.step = int(state["step"])

    def set_hyperparameters(self, lr_g: float, lr_d: float, beta1: float, beta2: float) -> None:
        """Apply the config's settings over those restored from a checkpoint."""
        for optimizer, lr in ((self.opt_g, lr_g), (self.opt_d, lr_d)):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = lr, (beta1, beta2)


def epoch_permutation(
    n: int, seed: int, epoch: int, device: torch.device, rank: int = 0
) -> torch.Tensor:
    """The order of the training images in an epoch, a pure function of (seed, epoch, rank)."""
    key = f"carmodels-epoch:{seed}:{epoch}" + (f":{rank}" if rank else "")
    digest = hashlib.sha256(key.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator).to(device)


def epoch_batches(
    images: torch.Tensor, permutation: torch.Tensor, batch_size: int, n_steps: int
) -> Iterator[torch.Tensor]:
    """Batches of a device-resident image tensor (the last partial batch is dropped)."""
    for i in range(n_steps):
        yield images[permutation[i * batch_size : (i + 1) * batch_size]]


def data_version_of(shards_dir: str | os.PathLike[str]) -> str:
    """Content version of the shard files (their bytes, not their generation names)."""
    from carmodels.shards import shard_files  # lazily: see _load_training_images

    return contents_version(shard_files(shards_dir))


def fit_image_size(images: torch.Tensor, size: int, source: str) -> torch.Tensor:
    """Downscale (box filter, in chunks) shards larger than the model's image size."""
    height, width = images.shape[-2:]
    if height != width:
        raise ValueError(f"Shards in {source} hold {height}x{width} images; expected squares.")
    if height == size:
        return images
    if height < size:
        raise ValueError(
            f"Shards in {source} hold {height}px images, smaller than image_size={size}; "
            f"train with image_size={height} or rebuild the shards at {size}px."
        )
    chunks = [
        F.interpolate(chunk.float(), size=(size, size), mode="area").round_().to(torch.uint8)
        for chunk in images.split(4096)
    ]
    return torch.cat(chunks)


def _load_training_images(shards_dir: str | os.PathLike[str]) -> torch.Tensor:
    # carmodels.shards pulls in the dedup stage (imagehash); importing it only here keeps
    # this module importable where only torch/numpy/pyarrow exist (bench/train_gpu.py).
    from carmodels.shards import load_images

    return load_images(shards_dir, split="train")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    """Every global RNG as tensors and primitives (so ``weights_only=True`` can load it)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": cuda,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"])
    )


#: Keys every checkpoint written by ``train`` holds and some reader indexes.
CHECKPOINT_KEYS = (
    "generator",
    "discriminator",
    "opt_g",
    "opt_d",
    "ema_generator",
    "step",
    "rng",
    "epoch",
    "spec",
    "config",
    "data_version",
    "history",
    "torch_version",
)
#: The fix named by every checkpoint error.
_CHECKPOINT_FIX = (
    "pass a checkpoint written by `carmodels train` (e.g. DATA/train/checkpoints/latest.pt) "
    "or train again"
)


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """A checkpoint dictionary, loaded safely (tensors and primitives only).

    Raises ``MissingInputError`` when there is no file, ``CheckpointError`` when it is not a
    complete carmodels checkpoint of this format (truncated, another program's, a text file).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"No checkpoint at {path}: train first (`carmodels train` / materialise train_dcgan)."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # the file system's trouble (permissions, I/O), not the file's content
    except Exception as error:
        # A damaged or foreign file fails in torch's zip reader (RuntimeError) or unpickler
        # (UnpicklingError, even KeyError): whatever it is, the file is not a checkpoint.
        # torch's own text is left to --debug: it is long and mostly about weights_only.
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}): it is truncated "
            f"or not a torch file; {_CHECKPOINT_FIX}."
        ) from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint)
        raise CheckpointError(
            f"{path} is not a carmodels checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found {found!r}); {_CHECKPOINT_FIX}."
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (no {missing}); {_CHECKPOINT_FIX}."
        )
    return checkpoint


def _checkpoint_spec(checkpoint: dict[str, Any], path: str | os.PathLike[str]) -> ModelSpec:
    try:
        return ModelSpec.from_dict(checkpoint["spec"])
    except (TypeError, ValueError) as error:  # fields this version does not know, bad values
        raise CheckpointError(
            f"{path} holds a model spec this carmodels cannot build ({one_line(error, 160)}); "
            f"{_CHECKPOINT_FIX}."
        ) from error


def load_generator(
    checkpoint_path: str | os.PathLike[str], device: str = "cpu", ema: bool = True
) -> tuple[Generator, ModelSpec, dict[str, Any]]:
    """The trained generator in eval mode, its spec, and the checkpoint's metadata.

    ``ema=True`` loads the moving-average weights when the run kept them (else the raw ones);
    ``meta["weights"]`` says which were loaded.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    use_ema = ema and checkpoint["ema_generator"] is not None
    spec = _checkpoint_spec(checkpoint, checkpoint_path)
    try:
        generator = build_generator(spec)
        generator.load_state_dict(
            checkpoint["ema_generator"] if use_ema else checkpoint["generator"]
        )
    except (TypeError, ValueError, RuntimeError) as error:
        # A spec this version cannot build, or weights of another shape: the file's fault.
        raise CheckpointError(
            f"{checkpoint_path} holds a model this carmodels cannot load ({type(error).__name__}: "
            f"{one_line(error, 160)}); {_CHECKPOINT_FIX}."
        ) from error
    generator.to(resolve_device(device)).eval().requires_grad_(False)
    meta = {
        key: checkpoint[key]
        for key in ("epoch", "step", "config", "data_version", "history", "torch_version")
    }
    meta["weights"] = "ema" if use_ema else "generator"
    meta["checkpoint_path"] = str(checkpoint_path)
    return generator, spec, meta


class SampleMonitor:
    """Two cheap per-epoch signals from the fixed-noise samples, against the training images.

    * ``sample_fd``: Fréchet distance between the samples and a fixed subset of training
      images in the evaluate stage's pixel feature space (16x16 pixels projected onto the
      training images' top principal components): the ``pixel_fd_16`` yardstick, at the
      sample grid's size. It picks ``best.pt``. It is preferred to the discriminator's
      D(x) - D(G(z)) gap because that gap is measured by a judge that changes every step
      (a strong D and a weak G can show the same gap as a weak D and a strong G), whereas
      the pixel statistics of the data are a fixed reference across epochs.
    * ``sample_diversity``: mean pairwise RMS distance (32x32) among the samples divided by
      the same for as many training images: near 1 is as varied as the data, a sharp fall
      means the generator maps different noise to the same image (mode collapse).

    Both use the same 64 noise vectors every epoch, so their changes come from the model.
    """

    #: Training images the reference statistics come from.
    N_REFERENCE = 512
    FD_SIZE = 16
    FD_COMPONENTS = 32
    DIVERSITY_SIZE = 32

    def __init__(self, images_uint8: torch.Tensor, n_samples: int, seed: int) -> None:
        from carmodels.evaluate import mean_pairwise_rms, pixel_features

        pick = torch.randperm(len(images_uint8), generator=torch.Generator().manual_seed(seed))
        reference = images_uint8[pick[: self.N_REFERENCE]].cpu()
        features = pixel_features(reference, self.FD_SIZE).double()
        self._mean = features.mean(0)
        centred = features - self._mean
        k = max(1, min(self.FD_COMPONENTS, len(reference) - 1, n_samples - 1))
        # Right singular vectors = principal axes of the reference images.
        self._components = torch.linalg.svd(centred, full_matrices=False).Vh[:k].T
        self._reference = (centred @ self._components).numpy()
        diversity_pick = reference[: max(2, n_samples)]
        self._reference_diversity = mean_pairwise_rms(
            pixel_features(diversity_pick, self.DIVERSITY_SIZE)
        )

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        """``sample_fd`` and ``sample_diversity`` of images in [-1, 1]."""
        from carmodels.evaluate import (
            frechet_distance,
            mean_pairwise_rms,
            pixel_features,
            to_uint8,
        )

        generated = to_uint8(samples.detach().float().cpu())
        projected = (pixel_features(generated, self.FD_SIZE).double() - self._mean) @ (
            self._components
        )
        diversity = mean_pairwise_rms(pixel_features(generated, self.DIVERSITY_SIZE))
        return {
            "sample_fd": frechet_distance(self._reference, projected.numpy()),
            "sample_diversity": diversity / self._reference_diversity
            if self._reference_diversity > 0
            else 0.0,
        }


def is_collapse(diversity: float, history: list[dict[str, float]], fraction: float) -> bool:
    """Diversity fell below ``fraction`` of the highest earlier value in the run."""
    earlier = [row["sample_diversity"] for row in history if "sample_diversity" in row]
    return bool(earlier) and diversity < fraction * max(earlier)


def tensor_to_pil(images: torch.Tensor, nrow: int, padding: int = 2) -> Any:
    """A grid of images in [-1, 1] (N x 3 x H x W) as a PIL image."""
    from PIL import Image  # imported lazily: the GPU benchmark needs neither
    from torchvision.utils import make_grid

    grid = make_grid(
        images.detach().float().cpu(),
        nrow=nrow,
        padding=padding,
        normalize=True,
        value_range=(-1, 1),
    )
    array = grid.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int) -> Path:
    """Save images in [-1, 1] as one PNG grid, atomically."""
    image = tensor_to_pil(images, nrow)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_history(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of history.csv as floats; empty cells (epoch-only columns) are left out."""
    with open(path, newline="") as f:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(f)
        ]


def write_history(path: str | os.PathLike[str], history: list[dict[str, float]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    return atomic_write_bytes(path, buffer.getvalue().encode())


def plot_history(history: list[dict[str, float]], path: str | os.PathLike[str]) -> Path:
    """Two panels against the training step: D/G losses, and D(x)/D(G(z))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, (ax_loss, ax_prob) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax_loss.plot(steps, [r["loss_d"] for r in history], label="discriminator loss")
    ax_loss.plot(steps, [r["loss_g"] for r in history], label="generator loss")
    ax_loss.set_ylabel("BCE loss")
    ax_loss.set_title("DCGAN training")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_prob.plot(steps, [r["d_x"] for r in history], label="D(x): real images")
    ax_prob.plot(steps, [r["d_g_z"] for r in history], label="D(G(z)): generated images")
    ax_prob.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="undecided (0.5)")
    ax_prob.set_ylim(0, 1)
    ax_prob.set_ylabel("mean discriminator output")
    ax_prob.set_xlabel("training step")
    ax_prob.legend()
    ax_prob.grid(alpha=0.3)
    fig.tight_layout()
    return atomic_save_figure(path, fig)


def save_progress_gif(
    frame_paths: list[Path],
    path: str | os.PathLike[str],
    max_frames: int,
    width: int,
    frame_ms: int,
) -> Path | None:
    """Animate sample grids (evenly thinned to ``max_frames``, always ending on the last)."""
    from PIL import Image

    if not frame_paths:
        return None
    if len(frame_paths) > max_frames:
        picks = np.linspace(0, len(frame_paths) - 1, max_frames).round().astype(int)
        frame_paths = [frame_paths[i] for i in sorted(set(picks.tolist()))]
    frames = []
    for frame_path in frame_paths:
        with Image.open(frame_path) as image:
            image = image.convert("RGB")
            if image.width > width:
                image = image.resize(
                    (width, round(image.height * width / image.width)), Image.Resampling.LANCZOS
                )
            frames.append(image)
    return atomic_write(
        path,
        lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0
        ),
    )


def _epoch_name(epoch: int, suffix: str) -> str:
    return f"epoch-{epoch:04d}{suffix}"


def _link_or_copy(source: Path, target: Path) -> Path:
    """Atomically make ``target`` a hard link to (or, failing that, a copy of) ``source``."""

    def write(tmp: Path) -> None:
        try:
            os.link(source, tmp)  # no copy of hundreds of MB when the filesystem allows it
        except OSError:
            tmp.write_bytes(source.read_bytes())

    return atomic_write(target, write)


def _save_checkpoint(
    state: dict[str, Any],
    checkpoint_dir: Path,
    epoch: int,
    keep_last: int | None,
    is_best: bool = False,
) -> Path:
    """Write epoch-NNNN.pt, point latest.pt (and best.pt) at it atomically, prune old epochs.

    ``best.pt`` is its own link, so pruning the epoch file it came from does not remove it.
    """
    path = checkpoint_dir / _epoch_name(epoch, ".pt")
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    _link_or_copy(path, checkpoint_dir / LATEST_NAME)
    if is_best:
        _link_or_copy(path, checkpoint_dir / BEST_NAME)
    if keep_last is not None:
        for old in sorted(checkpoint_dir.glob("epoch-*.pt"))[:-keep_last]:
            old.unlink()
    return path


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint of a training run folder, or None when it has none."""
    latest = Path(run_dir) / CHECKPOINT_DIR / LATEST_NAME
    return latest if latest.is_file() else None


def _resume_path(resume: bool | str | os.PathLike[str], checkpoint_dir: Path) -> Path | None:
    if resume is False:
        return None
    if resume is True:
        latest = checkpoint_dir / LATEST_NAME
        return latest if latest.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise MissingInputError(f"resume={str(resume)!r}: no checkpoint file there.")
    return path


def _clear_previous_run(run_dir: Path, log: Callable[[str], None]) -> None:
    """A fresh run replaces the artefacts of an earlier one in the same folder."""
    stale = [
        *(run_dir / CHECKPOINT_DIR).glob("*.pt"),
        *(run_dir / SAMPLES_DIR).glob("epoch-*.png"),
        *[run_dir / name for name in (HISTORY_NAME, LOSS_PLOT_NAME, GIF_NAME)],
        *(run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"),
    ]
    stale = [p for p in stale if p.exists()]
    if stale:
        log(f"Starting a fresh run in {run_dir}: removing {len(stale)} files of the previous run.")
        for path in stale:
            path.unlink()


@dataclass
class _Throughput:
    """Images per second between log points (each log point syncs, so timings are real)."""

    images: int = 0
    seconds: float = 0.0
    _since: float = field(default_factory=time.perf_counter)
    _images_since: int = 0

    def add(self, n_images: int) -> None:
        self._images_since += n_images

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed = now - self._since
        rate = self._images_since / elapsed if elapsed > 0 else 0.0
        self.images += self._images_since
        self.seconds += elapsed
        self._since, self._images_since = now, 0
        return rate

    def pause_until_now(self) -> None:
        """Exclude time spent outside the training steps (checkpoints, samples)."""
        self._since = time.perf_counter()

    @property
    def mean(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _tensorboard_writer(run_dir: Path, purge_step: int | None) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # lazily: pulls in tensorboard

    # purge_step drops events a crashed run wrote after the checkpoint we resume from.
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)


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
        return _train(shards_dir, out_dir, config, on_progress, resume, log, dist_context)
    finally:
        shutdown(dist_context)


def _train(
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    on_progress: Callable[[int, int], None] | None,
    resume: bool | str | os.PathLike[str],
    log: Callable[[str], None] | None,
    dist_context: DistContext,
) -> TrainResult:
    main = dist_context.is_main
    log = (log or logger.info) if main else (lambda message: None)
    if not main:
        on_progress = None
    run_dir = Path(out_dir)
    checkpoint_dir, samples_dir = run_dir / CHECKPOINT_DIR, run_dir / SAMPLES_DIR
    history_path = run_dir / HISTORY_NAME
    spec, hyper = config.model_spec(), config.hyperparameters()
    device = device_for_rank(resolve_device(config.device), dist_context)
    world = dist_context.world_size
    if config.batch_size % world:
        raise ValueError(
            f"batch_size={config.batch_size} is the global batch and must divide evenly over "
            f"{world} processes; use a multiple of {world}."
        )
    rank_batch = config.batch_size // world

    resume_from = _resume_path(resume, checkpoint_dir)
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    if checkpoint is not None and _checkpoint_spec(checkpoint, resume_from) != spec:
        raise CheckpointError(
            f"Checkpoint {resume_from} has model {checkpoint['spec']}, but the config asks for "
            f"{spec.to_dict()}; resume with the same preset, image_size and nz."
        )

    all_images = fit_image_size(_load_training_images(shards_dir), spec.image_size, str(shards_dir))
    n_images = all_images.shape[0]
    if n_images < config.batch_size:
        raise ValueError(
            f"Only {n_images} training images in {shards_dir}, fewer than batch_size="
            f"{config.batch_size}; lower batch_size or add images."
        )
    data_version = config.data_version or data_version_of(shards_dir)
    # Each rank keeps every world-th image; the smallest slice sets the epoch length.
    steps_per_epoch = (n_images // world) // rank_batch
    if config.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    _seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels
    trainer = TrainStep.create(
        spec,
        **hyper,
        device=device,
        amp_dtype=resolve_amp(config.amp, device),
        channels_last=config.channels_last,
        compile=config.compile,
        ema_decay=config.ema_decay,
        seed=config.seed,
        label_smoothing=config.label_smoothing,
        diffaugment=config.diffaugment,
        dist_context=dist_context,
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    last_checkpoint: Path | None = None
    best: dict[str, float] | None = None
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
        trainer.set_hyperparameters(**hyper)
        _restore_rng_state(checkpoint["rng"])
        history = [dict(row) for row in checkpoint["history"]]
        best = checkpoint.get("best")
        start_epoch, last_checkpoint = int(checkpoint["epoch"]), resume_from
        if checkpoint["data_version"] != data_version:
            log(
                f"Warning: {resume_from} was trained on data version "
                f"{checkpoint['data_version']}, the shards are now {data_version}."
            )
        log(f"Resuming from {resume_from} (epoch {start_epoch}, step {trainer.step}).")
    elif main:
        _clear_previous_run(run_dir, log)
    dist_context.barrier()  # no rank starts before rank 0 has cleared the previous run
    del checkpoint

    monitor = SampleMonitor(all_images, GRID_SIDE * GRID_SIDE, config.seed) if main else None
    # Once: every step indexes this rank's slice on the device.
    images = all_images[dist_context.rank :: world].to(device)
    del all_images
    fixed_noise = torch.randn(
        GRID_SIDE * GRID_SIDE, spec.nz, generator=torch.Generator().manual_seed(config.seed)
    ).to(device)
    total_steps = config.epochs * steps_per_epoch
    grid_path: Path | None = None
    throughput = _Throughput()
    writer = (
        _tensorboard_writer(run_dir, trainer.step if start_epoch else None)
        if main and config.tensorboard
        else None
    )
    collapse_epochs: list[int] = []
    log(
        f"Training {config.preset} ({spec.image_size}px) on {n_images} images, {device}"
        + (f" x {world} processes" if world > 1 else "")
        + f", epochs {start_epoch + 1}..{config.epochs}, {steps_per_epoch} steps/epoch."
    )

    def record(epoch: int) -> StepStats | None:
        stats = trainer.drain()
        if stats is None:
            return None
        row = {
            "epoch": float(epoch),
            "step": float(trainer.step),
            **stats.losses(),
            "images_per_s": throughput.lap(),
        }
        history.append(row)
        if not stats.is_finite():
            if main:
                write_history(history_path, history)
            raise TrainingDiverged(epoch, trainer.step, stats.losses(), last_checkpoint)
        if writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    writer.add_scalar(f"train/{key}", value, trainer.step)
        return stats

    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            permutation = epoch_permutation(
                images.shape[0], config.seed, epoch, device, rank=dist_context.rank
            )
            throughput.pause_until_now()
            for batch in epoch_batches(images, permutation, rank_batch, steps_per_epoch):
                trainer(batch)
                throughput.add(batch.shape[0] * world)
                if trainer.step % config.log_every_steps == 0:
                    record(epoch)
                if on_progress is not None:
                    on_progress(trainer.step, total_steps)
            record(epoch)  # flush, so a checkpoint is never written after an unseen NaN
            last = history[-1]
            log(
                f"epoch {epoch}/{config.epochs} step {trainer.step}: "
                f"loss_d={last['loss_d']:.4f} loss_g={last['loss_g']:.4f} "
                f"D(x)={last['d_x']:.3f} D(G(z))={last['d_g_z']:.3f} "
                f"{last['images_per_s']:.0f} img/s"
            )
            if not main:
                continue
            is_best = False
            if epoch % config.sample_every == 0 or epoch == config.epochs:
                sampler = trainer.sampling_generator()
                was_training = sampler.training
                with torch.no_grad():
                    samples = sampler.eval()(fixed_noise)
                sampler.train(was_training)
                grid_path = save_image_grid(
                    samples, samples_dir / _epoch_name(epoch, ".png"), nrow=GRID_SIDE
                )
                assert monitor is not None
                quality = monitor.measure(samples)
                collapsed = is_collapse(
                    quality["sample_diversity"], history[:-1], config.collapse_fraction
                )
                last.update(quality, collapse_warning=float(collapsed))
                if collapsed:
                    collapse_epochs.append(epoch)
                    log(
                        f"Warning: possible mode collapse at epoch {epoch}: sample diversity "
                        f"{quality['sample_diversity']:.3f} fell below "
                        f"{config.collapse_fraction:.0%} of its best so far "
                        f"(samples/{_epoch_name(epoch, '.png')})."
                    )
                is_best = config.keep_best and (
                    best is None or quality["sample_fd"] < best["sample_fd"]
                )
                if writer is not None:
                    for key, value in quality.items():
                        writer.add_scalar(f"samples/{key}", value, trainer.step)
                    writer.add_image(
                        "samples/fixed_noise",
                        np.asarray(tensor_to_pil(samples, GRID_SIDE)),
                        trainer.step,
                        dataformats="HWC",
                    )
            if epoch % config.checkpoint_every == 0 or epoch == config.epochs:
                if is_best:
                    best = {"epoch": float(epoch), "sample_fd": last["sample_fd"]}
                state = {
                    "format": CHECKPOINT_FORMAT,
                    **trainer.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch,
                    "spec": spec.to_dict(),
                    "config": config.to_dict(),
                    "hyperparameters": hyper,
                    "data_version": data_version,
                    "history": history,
                    "best": best,
                    "torch_version": str(torch.__version__),
                }
                last_checkpoint = _save_checkpoint(
                    state, checkpoint_dir, epoch, config.keep_last, is_best=is_best
                )
            write_history(history_path, history)
            if writer is not None:
                writer.flush()
    finally:
        if writer is not None:
            writer.close()

    latest = checkpoint_dir / LATEST_NAME
    best_path = checkpoint_dir / BEST_NAME
    grids = sorted(samples_dir.glob("epoch-*.png"))
    loss_plot = gif = None
    if main:
        if grid_path is None and grids:
            grid_path = grids[-1]
        loss_plot = plot_history(history, run_dir / LOSS_PLOT_NAME) if history else None
        gif = save_progress_gif(
            grids,
            run_dir / GIF_NAME,
            config.gif_max_frames,
            config.gif_frame_width,
            config.gif_frame_ms,
        )
        if not history_path.exists():
            write_history(history_path, history)
    final = {k: history[-1][k] for k in ("loss_d", "loss_g", "d_x", "d_g_z")} if history else {}
    return TrainResult(
        run_dir=run_dir,
        checkpoint_path=latest if latest.is_file() else None,
        epochs_completed=max(start_epoch, config.epochs),
        steps=trainer.step,
        images_per_s=throughput.mean,
        final_losses=final,
        grid_path=grid_path,
        loss_plot_path=loss_plot,
        gif_path=gif,
        history_path=history_path,
        device=str(device),
        best_checkpoint_path=best_path if best_path.is_file() else None,
        tensorboard_dir=run_dir / TENSORBOARD_DIR if writer is not None else None,
        collapse_epochs=collapse_epochs,
    )
