"""DiffAugment (Zhao et al., 2020): differentiable augmentation for data-efficient GANs.

With a few thousand images the discriminator memorises the training set and its feedback to
the generator degrades. DiffAugment applies the *same kind* of random augmentation to real
and generated images every time the discriminator sees them (in the D step and in the G
step), and because every operation is differentiable the generator still receives gradients
through it. The generator therefore never learns to produce augmented images.

Policies (comma-separated, applied in this order):

* ``color``: random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5);
* ``translation``: shift by up to 1/8 of the image size, zero padding;
* ``cutout``: zero a random square of half the image size.

Each operation can instead be applied to each image with a probability ``p``
(:attr:`DiffAugment.probability`), which :func:`adapt_probability` adjusts as ADA does
(Karras et al., 2020): it starts at 0 and rises only while the discriminator is too sure of
the real images. Early in a run, before D has seen the photos often enough to memorise them,
augmenting every image only slows learning: in the recipe study, at 33,000 images, batch
norm without DiffAugment drew car bodies where the same run with it drew blurred patches
(docs/benchmarks/quality.md).

Every random draw takes an explicit ``torch.Generator`` so that training stays exactly
resumable. Images are N x C x H x W in [-1, 1]; the memory format of the input is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POLICIES: tuple[str, ...] = ("color", "translation", "cutout")
#: Largest shift of ``translation`` and side of the ``cutout`` square, as image fractions.
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5
#: ADA's heuristic (Karras et al. 2020, section 3): r = E[sign(D(real))], the discriminator's
#: overfitting, is held near this target by raising p while r is above it, lowering it below.
ADA_TARGET = 0.6
#: Images over which p can move from 0 to 1 (ADA's ``ada_kimg`` of 500).
ADA_IMAGES_TO_FULL = 500_000


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"color,translation"`` -> ``("color", "translation")``; ``""`` -> no augmentation."""
    names = tuple(name.strip() for name in policy.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(
            f"Unknown DiffAugment policy {', '.join(unknown)!r} in {policy!r}; "
            f"use a comma-separated subset of {', '.join(POLICIES)} (or '' for none)."
        )
    return names


def _rand(n: int, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """n uniform [0, 1) values shaped to broadcast over N x C x H x W."""
    return torch.rand(n, 1, 1, 1, device=like.device, generator=generator, dtype=like.dtype)


# Each operation is split into its random draws (one row per image) and their application, so
# that with a probability below 1 an operation no image is chosen for still makes its draws
# (the random stream, and so training, stays as it was) but computes nothing.
Draws = tuple[torch.Tensor, ...]


def _color_draws(images: torch.Tensor, generator: torch.Generator) -> Draws:
    n = images.shape[0]
    return tuple(_rand(n, images, generator) for _ in range(3))


def _color(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    brightness, saturation, contrast = draws
    images = images + (brightness - 0.5)
    mean = images.mean(dim=1, keepdim=True)
    images = (images - mean) * (saturation * 2) + mean
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (contrast + 0.5) + mean


def _shifts(n: int, limit: int, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-limit, limit + 1, (n, 1, 1), device=images.device, generator=generator)


def _translation_draws(images: torch.Tensor, generator: torch.Generator) -> Draws:
    n, _, height, width = images.shape
    shift_y = _shifts(n, int(height * TRANSLATION_RATIO + 0.5), images, generator)
    shift_x = _shifts(n, int(width * TRANSLATION_RATIO + 0.5), images, generator)
    return shift_y, shift_x


def _translation(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    shift_y, shift_x = draws
    n, _, height, width = images.shape
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    # Index into a copy padded by one pixel: out-of-range positions read the zero border.
    src_y = (rows + shift_y + 1).clamp_(0, height + 1).expand(n, height, width)
    src_x = (cols + shift_x + 1).clamp_(0, width + 1).expand(n, height, width)
    padded = F.pad(images, [1, 1, 1, 1])
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    # Advanced indexing gives N x H x W x C; move channels back.
    return padded.permute(0, 2, 3, 1)[batch, src_y, src_x].permute(0, 3, 1, 2)


def _cutout_size(images: torch.Tensor) -> tuple[int, int]:
    _, _, height, width = images.shape
    return int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)


def _cutout_draws(images: torch.Tensor, generator: torch.Generator) -> Draws:
    n, _, height, width = images.shape
    cut_h, cut_w = _cutout_size(images)
    device = images.device
    top = torch.randint(0, height + (1 - cut_h % 2), (n, 1, 1), device=device, generator=generator)
    left = torch.randint(0, width + (1 - cut_w % 2), (n, 1, 1), device=device, generator=generator)
    return top, left


def _cutout(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    top, left = draws
    _, _, height, width = images.shape
    cut_h, cut_w = _cutout_size(images)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    inside = (
        (rows >= top - cut_h // 2)
        & (rows < top - cut_h // 2 + cut_h)
        & (cols >= left - cut_w // 2)
        & (cols < left - cut_w // 2 + cut_w)
    )
    return images * (~inside).unsqueeze(1).to(images.dtype)


def augment_color(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, saturation and contrast, one draw of each per image."""
    return _color(images, _color_draws(images, generator))


def augment_translation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to 1/8 of its size; uncovered pixels become 0 (mid grey)."""
    return _translation(images, _translation_draws(images, generator))


def augment_cutout(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero a square of half the image size at a random position (may overlap the border)."""
    return _cutout(images, _cutout_draws(images, generator))


#: Per policy name: (its draws, its application).
_OPERATIONS = {
    "color": (_color_draws, _color),
    "translation": (_translation_draws, _translation),
    "cutout": (_cutout_draws, _cutout),
}


class DiffAugment:
    """A callable that applies a policy; ``DiffAugment("")`` is the identity.

    ``probability`` 1 applies every operation to every image (DiffAugment as published); below
    1 each operation is applied to each image with that probability (as ADA does), and at 0
    nothing is computed. A plain float, read without a host sync. On a CPU, an operation that
    no image of the batch is chosen for is skipped (its draws are still made)."""

    def __init__(self, policy: str, probability: float = 1.0) -> None:
        self.policy = parse_policy(policy)
        self.probability = probability

    def __bool__(self) -> bool:
        return bool(self.policy)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.probability
        if not self.policy or p <= 0.0:
            return images
        memory_format = (
            torch.channels_last
            if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        for name in self.policy:
            draw, apply = _OPERATIONS[name]
            draws = draw(images, generator)
            if p >= 1.0:
                images = apply(images, draws)
                continue
            chosen = _rand(images.shape[0], images, generator) < p
            # At ADA's small probabilities most steps of a small batch choose no image for an
            # operation; on a CPU, reading the mask is free, and skipping the operation then
            # saves what every image's computation cost: at p 0.05 and batch 8, a sixth of the
            # chosen recipe's step (docs/benchmarks/train-cpu.md). On an accelerator the read
            # would wait for the device (a host sync in every step), so every step computes.
            if images.device.type == "cpu" and not chosen.any():
                continue
            images = torch.where(chosen, apply(images, draws), images)
        return images.contiguous(memory_format=memory_format)


def adapt_probability(
    probability: float, real_sign_mean: float, images: int, target: float = ADA_TARGET
) -> float:
    """ADA's rule (Karras et al. 2020): the augmentation probability after ``images`` images
    whose real logits had mean sign ``real_sign_mean``.

    p moves by ``images / ADA_IMAGES_TO_FULL`` towards more augmentation while that mean is
    above the target and towards less while it is below, within [0, 1]; it stays where it is
    on target or without a reading (NaN). ADA starts p at 0: no augmentation until the
    discriminator starts to memorise. The trainer applies the rule at every read of the step's
    statistics (every ``log_every_steps`` steps and at each epoch's end; ADA every 4 steps),
    which costs no extra host sync."""
    if not -1.0 < target < 1.0:
        raise ValueError(f"the adaptive augmentation target must be in (-1, 1), got {target}")
    if not math.isfinite(real_sign_mean) or real_sign_mean == target:
        return probability
    step = math.copysign(images / ADA_IMAGES_TO_FULL, real_sign_mean - target)
    return min(1.0, max(0.0, probability + step))
