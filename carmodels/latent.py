"""Latent vectors: seeded noise, and the straight and spherical paths between two latents.

Shared by generation (designs and latent walks, :mod:`carmodels.generate`) and evaluation
(the interpolation strip, :mod:`carmodels.evaluate`), so that both draw the same latents for
the same seed and walk between them the same way.

The latents come from a CPU generator seeded with ``seed``, so the same seed gives the same
latents on any machine. In ``nz`` = 100 dimensions N(0, I) samples lie near a sphere of radius
sqrt(nz); the straight line between two of them cuts through its inside, where the midpoints
have an unusually small norm (the generator rarely saw those, and the images look washed
out), which the spherical path (:func:`slerp`) avoids.
"""

from __future__ import annotations

import torch
from torch import nn

from carmodels.errors import InputError


def sample_noise(n: int, nz: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    """``n`` latent vectors from N(0, 1), or from it truncated to [-t, t] (the truncation trick).

    Truncation trades variety for fidelity: smaller ``t`` keeps designs nearer the typical car.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(n, nz)
    if truncation is None:
        return z.normal_(generator=generator)
    if truncation <= 0:
        raise InputError(f"truncation must be positive (e.g. 0.7) or None, got {truncation}")
    return nn.init.trunc_normal_(z, a=-truncation, b=truncation, generator=generator)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Straight-line interpolation of vectors ``a`` and ``b`` (nz) at fractions ``t`` (T)."""
    t = t[:, None]
    return a[None] * (1 - t) + b[None] * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of vectors ``a`` and ``b`` (nz) at fractions ``t`` (T): T x nz.

    Follows the great circle between the directions of ``a`` and ``b`` while the norm changes
    linearly from ``|a|`` to ``|b|``. Falls back to :func:`lerp` for (nearly) parallel or
    opposite vectors, where the great circle is undefined and dividing by ``sin(angle)`` would
    blow up.
    """
    norm_a, norm_b = a.norm(), b.norm()
    cos_angle = torch.dot(a / norm_a, b / norm_b).clamp(-1.0, 1.0)
    angle = torch.arccos(cos_angle)
    if angle.sin().abs() < 1e-6:
        return lerp(a, b, t)
    t = t[:, None]
    direction = (
        torch.sin((1 - t) * angle) * (a / norm_a)[None] + torch.sin(t * angle) * (b / norm_b)[None]
    ) / angle.sin()
    return direction * (norm_a * (1 - t) + norm_b * t)


__all__ = ["lerp", "sample_noise", "slerp"]
