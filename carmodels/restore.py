"""Restore damaged car photos with a trained generator: inpainting, denoising, upscaling.

The generator is used as a prior over car photos. For a damaged observation ``y`` and the
degradation ``A`` of the task, we look for the latent vector whose image explains the known
pixels best::

    z* = argmin_z  |A(G(z)) - y|^2 over the known pixels  +  latent_weight * mean(z^2)

from several random starting points at once (``restarts``), keeping the best. Optionally the
generator's own weights are then fine-tuned for a few steps on that one image (the "deep
image prior" idea: a convolutional network fits natural structure before it fits damage).
Finally the fit is blended with what is known:

* ``inpaint``: known pixels are exact, so they are kept and only the holes come from the fit.
* ``denoise``: every pixel is observed but noisy, so the fit itself is the estimate.
* ``upscale``: the low-resolution input is exact at its own scale, so the fit is corrected
  by one back-projection step (its downsampled version then matches the input).

Geometry: the model draws square images of ``spec.image_size`` pixels. An image of any size
is letterboxed into that square (scaled to fit, centred); only the letterbox's content box
enters the loss, and the fit is cropped and resized back to the image's size before blending.

Masks follow OpenCV's ``cv2.inpaint`` convention: non-zero (white) pixels are the damaged ones.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carmodels.checkpoint import load_generator
from carmodels.device import resolve_device
from carmodels.io import atomic_save_image

Task = Literal["inpaint", "denoise", "upscale"]
TASKS: tuple[str, ...] = ("inpaint", "denoise", "upscale")
MASK_KINDS: tuple[str, ...] = ("blocks", "strokes")
#: Generator fine-tuning steps used when fine-tuning is asked for without a number.
DEFAULT_FINETUNE_STEPS = 100


@dataclass(frozen=True)
class RestoreConfig:
    """How hard to search the latent space and whether to fine-tune the generator after."""

    restarts: int = field(
        default=8,
        metadata={
            "help": "latent starting points, optimised together (as one batch); the best one "
            "is kept"
        },
    )
    steps: int = field(default=200, metadata={"help": "optimisation (Adam) steps on z"})
    lr: float = 0.05
    #: Pull of z towards the origin, keeping it where the generator was trained.
    latent_weight: float = 1e-3
    #: Adam steps on the generator's weights after the z search (0 = no fine-tune).
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    upscale_factor: int = field(default=2, metadata={"help": "upscale: output/input size"})
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the starting points, so a restoration is reproducible on one device"
        },
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when available), cpu, cuda, ..."}
    )

    def __post_init__(self) -> None:
        for name in ("restarts", "steps", "upscale_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"RestoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps < 0:
            raise ValueError(
                f"RestoreConfig.finetune_steps must be >= 0, got {self.finetune_steps}"
            )
        for name in ("lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"RestoreConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.latent_weight < 0:
            raise ValueError(f"RestoreConfig.latent_weight must be >= 0, got {self.latent_weight}")


@dataclass
class RestoreResult:
    task: str
    #: The restored image (H x W x 3 uint8; for ``upscale`` the input size times the factor).
    image: np.ndarray
    #: The same restoration without the generator fine-tune (None when none was run).
    image_before_finetune: np.ndarray | None
    #: The generator's raw fit, mapped back to the output size, before blending.
    fit: np.ndarray
    #: The best latent vector (1 x nz).
    z: torch.Tensor
    #: Mean squared error on the known pixels ([-1, 1] scale) of each restart after the z
    #: search, and of the kept one at the end (after fine-tuning when there was one).
    restart_losses: list[float]
    data_loss: float
    elapsed_s: float = 0.0
    config: RestoreConfig = field(default_factory=RestoreConfig)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Letterbox:
    """Where an ``height`` x ``width`` image sits when scaled to fit a ``size`` square."""

    height: int
    width: int
    size: int

    @property
    def content_shape(self) -> tuple[int, int]:
        scale = self.size / max(self.height, self.width)
        return (
            max(1, min(self.size, round(self.height * scale))),
            max(1, min(self.size, round(self.width * scale))),
        )

    @property
    def offset(self) -> tuple[int, int]:
        content_h, content_w = self.content_shape
        return (self.size - content_h) // 2, (self.size - content_w) // 2

    def content(self, canvas: torch.Tensor) -> torch.Tensor:
        """The content box of square canvases (N x C x size x size)."""
        top, left = self.offset
        content_h, content_w = self.content_shape
        return canvas[..., top : top + content_h, left : left + content_w]

    def to_canvas(self, images: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Images (N x C x height x width) scaled into the square, the borders ``fill``ed."""
        top, left = self.offset
        content_h, content_w = self.content_shape
        canvas = images.new_full((*images.shape[:-2], self.size, self.size), fill)
        canvas[..., top : top + content_h, left : left + content_w] = resize(
            images, self.content_shape
        )
        return canvas

    def from_canvas(self, canvas: torch.Tensor) -> torch.Tensor:
        """Square canvases mapped back to ``height`` x ``width`` (differentiable)."""
        return resize(self.content(canvas), (self.height, self.width))


def resize(images: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of N x C x H x W images, antialiased when shrinking (differentiable)."""
    if tuple(images.shape[-2:]) == tuple(shape):
        return images
    return F.interpolate(images, size=shape, mode="bicubic", antialias=True, align_corners=False)


def _resize_known(known: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A known-pixel mask at another size: a pixel is known only if all it covers was known."""
    if tuple(known.shape[-2:]) == tuple(shape):
        return known
    coverage = F.adaptive_avg_pool2d(known.float(), shape)
    return coverage > 1.0 - 1e-6


# --------------------------------------------------------------------------- conversions


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 1 x 3 x H x W float in [-1, 1]."""
    # A copy: the array may be read-only (e.g. from a PIL image), torch needs it writable.
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """1 x 3 x H x W in [-1, 1] -> H x W x 3 uint8."""
    array = images[0].detach().float().cpu().add(1).mul(127.5).round().clamp(0, 255)
    return array.to(torch.uint8).permute(1, 2, 0).numpy()


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"{name} must be a uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"{name} must be H x W x 3 (RGB), got shape {image.shape}")


def _check_mask(damaged: np.ndarray, image: np.ndarray) -> np.ndarray:
    damaged = np.asarray(damaged)
    if damaged.ndim == 3 and damaged.shape[2] in (1, 3, 4):
        damaged = damaged[..., 0]  # grey masks read as RGB: all channels are equal
    if damaged.shape != image.shape[:2]:
        mask_h, mask_w = damaged.shape[:2]
        image_h, image_w = image.shape[:2]
        raise ValueError(
            f"the mask is {mask_w}x{mask_h} pixels but the image is {image_w}x{image_h}; "
            "give a mask of exactly the image's size (white = damaged, black = keep)."
        )
    damaged = damaged.astype(bool)
    if damaged.all():
        raise ValueError("the mask marks every pixel as damaged: nothing is known to fit.")
    return damaged


# --------------------------------------------------------------------------- damage


def damage_mask(
    height: int, width: int, seed: int, kind: str = "strokes", fraction: float = 0.2
) -> np.ndarray:
    """A random mask of damaged pixels (H x W bool, True = damaged), about ``fraction`` of them.

    ``blocks`` are rectangles (missing patches, stickers); ``strokes`` are thick random
    scratches. Deterministic for a seed.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    import cv2  # lazy: only damage generation and the baselines need OpenCV

    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    side = min(height, width)
    # Stop a little early so that the last shape does not overshoot the target much.
    while mask.mean() < fraction * 0.9:
        if kind == "blocks":
            h = int(rng.integers(max(2, side // 8), max(3, side // 3)))
            w = int(rng.integers(max(2, side // 8), max(3, side // 3)))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            mask[top : top + h, left : left + w] = 1
        else:
            points = rng.integers(0, [width, height], size=(int(rng.integers(2, 5)), 2))
            thickness = int(rng.integers(max(1, side // 32), max(2, side // 12) + 1))
            cv2.polylines(mask, [points.astype(np.int32)], False, 1, thickness)
    return mask.astype(bool)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask image as H x W bool, True where damaged (non-zero / white pixels)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {path}: no such file.")
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) > 127


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, EXIF orientation applied."""
    from carmodels.imaging import decode_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path}: no such file.")
    return np.asarray(decode_image(path.read_bytes()).convert("RGB"))


# --------------------------------------------------------------------------- restoration


@dataclass(frozen=True)
class _Problem:
    """One task's observation and degradation, at the model's working resolution."""

    task: str
    box: Letterbox  # of the output image
    observed: torch.Tensor  # what the loss compares with (1 x 3 x h x w)
    known: torch.Tensor | None  # 1 x 1 x h x w bool, only for inpaint

    def degrade(self, canvas: torch.Tensor) -> torch.Tensor:
        """A(G(z)): generator canvases -> what would have been observed."""
        content = self.box.content(canvas)
        if self.task == "upscale":
            return resize(content, tuple(self.observed.shape[-2:]))
        return content

    def data_loss(self, canvas: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the known pixels, one value per canvas."""
        error = (self.degrade(canvas) - self.observed).pow(2)
        if self.known is None:
            return error.mean(dim=(1, 2, 3))
        weight = self.known.float()
        return (error * weight).sum(dim=(1, 2, 3)) / (weight.sum() * error.shape[1])


def _problem(
    task: str, image: torch.Tensor, known: torch.Tensor | None, size: int, factor: int
) -> _Problem:
    height, width = image.shape[-2:]
    if task == "upscale":
        box = Letterbox(height * factor, width * factor, size)
        # The model sees the low-resolution input as it is, unless it is larger than the
        # model's own content box (then both are compared at the content box's size).
        content_h, content_w = box.content_shape
        shape = (min(height, content_h), min(width, content_w))
        return _Problem(task, box, resize(image, shape), None)
    box = Letterbox(height, width, size)
    observed = resize(image, box.content_shape)
    known_small = _resize_known(known, box.content_shape) if known is not None else None
    if known_small is not None and not known_small.any():
        raise ValueError(
            "at the model's resolution no pixel is fully known: the damage is too scattered; "
            "use a mask with larger intact areas."
        )
    return _Problem(task, box, observed, known_small)


def _blend(
    task: str, fit: torch.Tensor, image: torch.Tensor, known: torch.Tensor | None
) -> torch.Tensor:
    """Combine the generator's fit (at the output size) with what is known."""
    if task == "inpaint":
        assert known is not None
        return torch.where(known, image, fit)
    if task == "upscale":
        # One back-projection step: add back what the fit gets wrong at the input's scale.
        residual = image - resize(fit, tuple(image.shape[-2:]))
        return (fit + resize(residual, tuple(fit.shape[-2:]))).clamp(-1, 1)
    return fit


def _search_latents(
    generator: nn.Module, problem: _Problem, config: RestoreConfig, device: torch.device
) -> tuple[torch.Tensor, list[float]]:
    """Optimise ``restarts`` latent vectors together; return the best one and all final losses."""
    noise = torch.Generator().manual_seed(config.seed)
    z = torch.randn(config.restarts, generator.spec.nz, generator=noise).to(device)
    z.requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=config.lr)
    for _ in range(config.steps):
        losses = problem.data_loss(generator(z)) + config.latent_weight * z.pow(2).mean(dim=1)
        optimiser.zero_grad(set_to_none=True)
        # Summed, each restart gets the gradient of its own loss: they do not interact.
        losses.sum().backward()
        optimiser.step()
    with torch.no_grad():
        final = problem.data_loss(generator(z))
    best = int(final.argmin())
    return z[best : best + 1].detach(), [float(v) for v in final]


def _finetune(
    generator: nn.Module, z: torch.Tensor, problem: _Problem, config: RestoreConfig
) -> nn.Module:
    """A copy of the generator fitted to this one image for ``finetune_steps`` steps."""
    tuned = copy.deepcopy(generator).requires_grad_(True)
    # Eval mode keeps batch-norm statistics fixed: one image is no batch to estimate them.
    tuned.eval()
    optimiser = torch.optim.Adam(tuned.parameters(), lr=config.finetune_lr)
    for _ in range(config.finetune_steps):
        loss = problem.data_loss(tuned(z)).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return tuned.requires_grad_(False)


def restore(
    generator: nn.Module,
    image: np.ndarray,
    task: str,
    damaged: np.ndarray | None = None,
    config: RestoreConfig | None = None,
) -> RestoreResult:
    """Restore ``image`` (H x W x 3 uint8) with a generator from :func:`load_generator`.

    ``damaged`` (H x W, True/non-zero = damaged) is required for ``inpaint`` and not allowed
    for the other tasks. For ``upscale`` the output is ``upscale_factor`` times larger.
    """
    config = config or RestoreConfig()
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    _check_image(image)
    if task == "inpaint":
        if damaged is None:
            raise ValueError("inpaint needs a mask of the damaged pixels (white = damaged).")
        damaged = _check_mask(damaged, image)
    elif damaged is not None:
        raise ValueError(f"a mask only applies to inpaint, not to {task}.")

    started = time.monotonic()
    device = next(generator.parameters()).device
    observed = to_tensor(image).to(device)
    known = None if damaged is None else torch.from_numpy(~damaged)[None, None].to(device)
    problem = _problem(task, observed, known, generator.spec.image_size, config.upscale_factor)

    z, restart_losses = _search_latents(generator, problem, config, device)

    def finish(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        with torch.no_grad():
            canvas = model(z)
            fit = problem.box.from_canvas(canvas).clamp(-1, 1)
            return fit, _blend(task, fit, observed, known), float(problem.data_loss(canvas)[0])

    fit, restored, data_loss = finish(generator)
    before_finetune = None
    if config.finetune_steps > 0:
        before_finetune = to_uint8(restored)
        fit, restored, data_loss = finish(_finetune(generator, z, problem, config))
    return RestoreResult(
        task=task,
        image=to_uint8(restored),
        image_before_finetune=before_finetune,
        fit=to_uint8(fit),
        z=z.cpu(),
        restart_losses=restart_losses,
        data_loss=data_loss,
        elapsed_s=time.monotonic() - started,
        config=config,
    )


def restore_file(
    checkpoint_path: str | os.PathLike[str],
    image_path: str | os.PathLike[str],
    task: str,
    out_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None = None,
    config: RestoreConfig | None = None,
    ema: bool = True,
) -> RestoreResult:
    """Restore an image file and write the result as a PNG at ``out_path`` (atomically)."""
    from PIL import Image

    config = config or RestoreConfig()
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    image = read_image(image_path)
    damaged = read_mask(mask_path) if mask_path is not None else None
    if task == "inpaint" and damaged is None:
        raise ValueError("inpaint needs --mask: an image of the same size, white = damaged.")
    if damaged is not None:
        try:
            damaged = _check_mask(damaged, image)
        except ValueError as exc:
            raise ValueError(f"mask {mask_path} vs image {image_path}: {exc}") from None
    generator, _, _ = load_generator(checkpoint_path, device=str(resolve_device(config.device)))
    result = restore(generator, image, task, damaged, config)
    atomic_save_image(out_path, Image.fromarray(result.image))
    return result
