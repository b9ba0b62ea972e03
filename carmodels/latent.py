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

#: How ``sample_noise`` truncates: ``coordinates`` redraws every coordinate until it lies in
#: [-t, t] (BigGAN's trick), which also shrinks the latent's norm; ``sphere`` does the same,
#: then rescales the latent to the norm sqrt(nz) of N(0, I) latents, where the generator was
#: trained (docs/benchmarks/truncation.md measures both).
TRUNCATION_METHODS: tuple[str, ...] = ("coordinates", "sphere")


def sample_noise(
    n: int, nz: int, seed: int, truncation: float | None = None, method: str = "coordinates"
) -> torch.Tensor:
    """``n`` latent vectors from N(0, 1), or truncated at ``t`` by ``method`` (the truncation
    trick, see :data:`TRUNCATION_METHODS`).

    Truncation trades variety for fidelity: smaller ``t`` keeps designs nearer the typical car.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(n, nz)
    if truncation is None:
        return z.normal_(generator=generator)
    if truncation <= 0:
        raise InputError(f"truncation must be positive (e.g. 2.0) or None, got {truncation}")
    if method not in TRUNCATION_METHODS:
        raise InputError(
            f"truncation method must be one of {', '.join(TRUNCATION_METHODS)}, got {method!r}"
        )
    z = nn.init.trunc_normal_(z, a=-truncation, b=truncation, generator=generator)
    if method == "sphere":
        z = z * (nz**0.5 / z.norm(dim=1, keepdim=True).clamp(min=1e-12))
    return z


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


__all__ = ["TRUNCATION_METHODS", "lerp", "sample_noise", "slerp"]
