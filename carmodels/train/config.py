"""What a training run is told and what it reports: :class:`TrainConfig`, :class:`TrainResult`
and :class:`TrainingDiverged`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from carmodels.augment import ADA_TARGET, parse_policy
from carmodels.device import AMP_MODES
from carmodels.models import PRESETS, ModelSpec, get_preset
from carmodels.train.step import LOSSES


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


#: The recipe the recipe study chose (bench/quality.py, docs/benchmarks/quality.md): DCGAN with
#: batch norm at lr 8e-4 for G and D, DiffAugment whose probability adapts as ADA's does (it
#: starts at 0, so short runs learn unhindered, and rises only while D memorises the photos),
#: sampled through the EMA generator (``ema_decay``'s default). At the study's 33,000 images
#: (batch 8) it draws car bodies in nearly every cell, with windows in most and wheels in
#: many, and has the best FD and KID, ahead of batch norm alone and of the previous choice
#: (DiffAugment on every image, lr 2e-4). It was chosen at batch 16 by its samples, when the
#: previous choice's blurred bands scored better on FD. The lr was chosen at 64 px and small
#: batches and is unmeasured at the full profile's 128 px and batch 128. The ``full`` profile
#: trains it; ``TrainConfig``'s own defaults stay the 2019 model's.
MEASURED_RECIPE: dict[str, Any] = {
    "preset": "dcgan",
    "lr_g": 8e-4,
    "lr_d": 8e-4,
    "diffaugment": "color,translation,cutout",
    "diffaugment_target": ADA_TARGET,
}


@dataclass
class TrainConfig:
    """Every training setting. ``None`` learning rates, betas, ``nz``, ``base_channels``,
    ``generator_channels``, ``batch_norm`` and ``spectral_norm`` mean "the preset's"."""

    preset: str = field(
        default="seed",
        metadata={"help": "model preset (small and tiny suit CPUs)", "choices": sorted(PRESETS)},
    )
    image_size: int = field(
        default=128, metadata={"help": "side of the training images in pixels: 64 or 128"}
    )
    epochs: int = field(default=170, metadata={"help": "epochs to train"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr_g: float | None = field(
        default=None, metadata={"help": "generator learning rate; unset = the preset's"}
    )
    lr_d: float | None = field(
        default=None, metadata={"help": "discriminator learning rate; unset = the preset's"}
    )
    beta1: float | None = None
    beta2: float | None = None
    nz: int | None = None
    device: str = field(
        default="auto",
        metadata={"help": "auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    checkpoint_every: int = 1
    #: How many epoch checkpoints to keep (None keeps all); ``latest.pt`` is always kept.
    keep_last: int | None = 3
    sample_every: int = 1
    log_every_steps: int = 20
    #: "auto" = bf16 autocast on CUDA; on a CPU, bf16 only where it computes in bf16 natively
    #: and a start-up probe measures bf16 clearly faster (carmodels.train.cpu_amp), else fp32;
    #: "bf16" forces it; "off" is plain fp32.
    amp: str = field(
        default="auto",
        metadata={
            "help": "precision: auto (bf16 autocast on CUDA, and on a CPU where a start-up "
            "probe measures it clearly faster), bf16, or off (fp32)",
            "choices": AMP_MODES,
        },
    )
    channels_last: bool = True
    #: torch.compile G and D. Off: slower than eager on an H200 (docs/benchmarks/train-gpu.md).
    compile: bool = False
    max_steps_per_epoch: int | None = field(
        default=None,
        metadata={
            "help": "cap on steps per epoch (tests, smoke runs); unset = one pass over the data"
        },
    )
    # Unset: half the memory available at start-up, divided among the node's processes (and
    # at most half a GPU's memory when training on one): loading the split whole briefly
    # holds it twice (pyarrow's table and the tensor), so this streams only data that could
    # not be loaded with room to spare, and keeps every run that fits on the in-memory path,
    # unchanged. The path depends on the machine then: set it for runs that must repeat bit
    # for bit elsewhere. See carmodels.train.data.
    memory_budget_mb: int | None = field(
        default=None,
        metadata={
            "help": "MiB the training images may take in each process: above it, the trainer "
            "streams the shards' row groups instead of loading the train split; unset = half "
            "the available memory, shared by the node's processes"
        },
    )
    #: Decay of the exponential moving average of G used for samples; None disables it.
    #: On: the EMA generator scores better than the raw one (docs/benchmarks/train-options.md).
    ema_decay: float | None = 0.999
    # Off: within noise (docs/benchmarks/train-options.md).
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "one-sided label smoothing: the discriminator's target for real images is "
            "1 - this"
        },
    )
    # Off: within noise or worse, and free when off (docs/benchmarks/train-options.md).
    diffaugment: str = field(
        default="",
        metadata={
            "help": "DiffAugment policy for D's inputs, e.g. color,translation,cutout; '' = off"
        },
    )
    # Unset: DiffAugment applies to every image, as published. Set (ADA's 0.6): each image is
    # augmented with a probability that starts at 0 and rises only while D is too sure of the
    # real images (carmodels.augment.adapt_probability), so short runs learn unhindered.
    diffaugment_target: float | None = field(
        default=None,
        metadata={
            "help": "adapt DiffAugment's probability as ADA does, holding the mean sign of D's "
            "outputs on real images near this target (0.6 in the ADA paper); unset = augment "
            "every image"
        },
    )
    # Recipes beyond the 2015/2019 DCGAN, for comparisons at equal images seen; all off by
    # default, which trains bit-identically to before they existed.
    loss: str = field(
        default="bce",
        metadata={
            "help": "GAN loss: bce (non-saturating, as DCGAN) or hinge (as SN-GAN, BigGAN)",
            "choices": LOSSES,
        },
    )
    r1_gamma: float = field(
        default=0.0,
        metadata={
            "help": "weight of the R1 penalty gamma/2 * E|grad D(real)|^2 on D; 0 = off "
            "(StyleGAN2 uses 10 at 1024 px, less for smaller images)"
        },
    )
    r1_every: int = field(
        default=16,
        metadata={
            "help": "apply the R1 penalty every this many D steps, scaled by it (lazy "
            "regularisation, as StyleGAN2)"
        },
    )
    spectral_norm: bool | None = field(
        default=None,
        metadata={
            "help": "spectral norm on the discriminator's convolutions; unset = the preset's"
        },
    )
    base_channels: int | None = field(
        default=None,
        metadata={
            "help": "channels at the highest resolution (doubled at each halving); unset = the "
            "preset's"
        },
    )
    generator_channels: int | None = field(
        default=None,
        metadata={
            "help": "the generator's channels at its highest resolution, where they differ "
            "from the discriminator's base_channels; unset = the preset's (the same)"
        },
    )
    batch_norm: bool | None = field(
        default=None,
        metadata={"help": "batch norm in G and D (and the DCGAN init); unset = the preset's"},
    )
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
        if self.memory_budget_mb is not None and self.memory_budget_mb < 1:
            raise ValueError(
                f"TrainConfig.memory_budget_mb must be >= 1 or None, got {self.memory_budget_mb}"
            )
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
        if self.diffaugment_target is not None:
            if not self.diffaugment:
                raise ValueError(
                    "TrainConfig.diffaugment_target adapts a DiffAugment policy; set diffaugment "
                    "(e.g. color,translation,cutout) or leave the target unset"
                )
            if not -1.0 < self.diffaugment_target < 1.0:
                raise ValueError(
                    "TrainConfig.diffaugment_target must be in (-1, 1) (ADA uses 0.6), got "
                    f"{self.diffaugment_target}"
                )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(
                f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}"
            )
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The loss, the R1 penalty and the model overrides."""
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.loss == "hinge" and self.label_smoothing:
            raise ValueError(
                "TrainConfig.label_smoothing applies to the bce loss only; set it to 0 with "
                f"loss='hinge' (got {self.label_smoothing})"
            )
        if not (math.isfinite(self.r1_gamma) and self.r1_gamma >= 0.0):
            raise ValueError(f"TrainConfig.r1_gamma must be >= 0 (0 = off), got {self.r1_gamma}")
        if self.r1_every < 1:
            raise ValueError(f"TrainConfig.r1_every must be >= 1, got {self.r1_every}")
        for name in ("base_channels", "generator_channels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(
                    f"TrainConfig.{name} must be >= 1 or None, got {getattr(self, name)}"
                )
        for name in ("spectral_norm", "batch_norm"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(
                    f"TrainConfig.{name} must be true, false or None, got {getattr(self, name)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_spec(self) -> ModelSpec:
        """The preset's spec at ``image_size``, with the ``nz``, ``base_channels``,
        ``generator_channels``, ``batch_norm`` and ``spectral_norm`` overrides that are set."""
        spec = get_preset(self.preset).spec
        return replace(
            spec,
            image_size=self.image_size,
            nz=self.nz or spec.nz,
            base_channels=self.base_channels or spec.base_channels,
            generator_channels=self.generator_channels or spec.generator_channels,
            batch_norm=spec.batch_norm if self.batch_norm is None else self.batch_norm,
            spectral_norm=spec.spectral_norm if self.spectral_norm is None else self.spectral_norm,
        )

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
    #: What TrainConfig.amp resolved to, e.g. "amp auto -> bf16 on CPU (probe: fp32 1948 ms,
    #: bf16 1373 ms, batch 8)" (also in the log and each checkpoint's "amp").
    amp: str = ""

    @property
    def epochs(self) -> int:
        return self.epochs_completed
