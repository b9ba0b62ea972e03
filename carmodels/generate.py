"""New car designs from a trained generator: a grid plus one PNG per design.

The latent vectors come from a CPU generator seeded with ``seed``, so the same seed gives the
same designs on any machine (up to floating-point differences between devices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carmodels.io import atomic_write
from carmodels.train import load_generator, resolve_device, save_image_grid, tensor_to_pil

#: Folder (next to the run's checkpoints) used when no out_dir is given.
DEFAULT_SUBDIR = "generated"


@dataclass
class GenerateResult:
    out_dir: Path
    grid_path: Path
    image_paths: list[Path]
    n: int
    seed: int
    truncation: float | None
    weights: str  # "ema" or "generator"
    epoch: int


def sample_noise(n: int, nz: int, seed: int, truncation: float | None = None) -> torch.Tensor:
    """``n`` latent vectors from N(0, 1), or from it truncated to [-t, t] (the truncation trick).

    Truncation trades variety for fidelity: smaller ``t`` keeps designs nearer the typical car.
    """
    generator = torch.Generator().manual_seed(seed)
    z = torch.empty(n, nz)
    if truncation is None:
        return z.normal_(generator=generator)
    if truncation <= 0:
        raise ValueError(f"truncation must be positive (e.g. 0.7) or None, got {truncation}")
    return nn.init.trunc_normal_(z, a=-truncation, b=truncation, generator=generator)


@torch.no_grad()
def sample_images(
    generator: nn.Module,
    n: int,
    seed: int,
    batch_size: int = 64,
    truncation: float | None = None,
) -> torch.Tensor:
    """``n`` generated images in [-1, 1] (N x 3 x S x S float32, on the CPU)."""
    device = next(generator.parameters()).device
    z = sample_noise(n, generator.spec.nz, seed, truncation)
    batches = [generator(chunk.to(device)).float().cpu() for chunk in z.split(batch_size)]
    return torch.cat(batches)


def generate(
    checkpoint_path: str | os.PathLike[str],
    n: int = 64,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    truncation: float | None = None,
    ema: bool = True,
    device: str = "cpu",
    batch_size: int = 64,
) -> GenerateResult:
    """Write ``grid.png`` and ``design-0000.png``... for ``n`` designs drawn with ``seed``.

    ``out_dir`` defaults to ``generated/`` in the run folder that holds the checkpoint.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    checkpoint_path = Path(checkpoint_path)
    out = Path(out_dir) if out_dir is not None else checkpoint_path.parent.parent / DEFAULT_SUBDIR
    generator, _, meta = load_generator(
        checkpoint_path, device=str(resolve_device(device)), ema=ema
    )
    images = sample_images(generator, n, seed, batch_size, truncation)

    grid_path = save_image_grid(images, out / "grid.png", nrow=max(1, round(n**0.5)))
    image_paths = []
    for index, image in enumerate(images):
        picture = tensor_to_pil(image[None], nrow=1, padding=0)
        image_paths.append(
            atomic_write(out / f"design-{index:04d}.png", lambda tmp, p=picture: p.save(tmp, "PNG"))
        )
    return GenerateResult(
        out_dir=out,
        grid_path=grid_path,
        image_paths=image_paths,
        n=n,
        seed=seed,
        truncation=truncation,
        weights=meta["weights"],
        epoch=int(meta["epoch"]),
    )
