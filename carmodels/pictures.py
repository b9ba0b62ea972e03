"""The pictures people look at: image grids, the training loss plot, the progress GIF and the
plot of the promotion history.

Shared by training (:mod:`carmodels.train`), generation (:mod:`carmodels.generate`),
evaluation (:mod:`carmodels.evaluate`) and promotion (:mod:`carmodels.promotion`); it imports
none of them: what to draw (images, history rows, the metrics and their directions) comes in
as arguments. Every file is written atomically (:mod:`carmodels.io`). PIL, torchvision and
matplotlib are imported when a picture is drawn, so the GPU benchmark, which draws none, does
not load them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carmodels.io import atomic_save_figure, atomic_write


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict[str, float]], path: str | os.PathLike[str]) -> Path:
    """A training run's ``losses.png``: two panels against the training step, the D/G losses
    and D(x)/D(G(z)), from ``history.csv`` rows (``carmodels.train.artefacts.read_history``)."""
    plt = _pyplot()
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


def plot_promotion_history(
    frame: Any,
    path: str | os.PathLike[str],
    metrics: Sequence[str],
    directions: Mapping[str, str],
) -> Path | None:
    """The evaluation history's ``history.png``: one panel per metric of ``metrics`` present
    in ``frame`` (a pandas DataFrame of history rows), against ``evaluated_at``, each labelled
    with its direction ("lower"/"higher" is better) from ``directions``. None when there is
    nothing to plot."""
    import pandas as pd

    columns = [c for c in metrics if c in frame.columns and frame[c].notna().any()]
    if frame.empty or not columns:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(columns), 1, figsize=(10, 2.4 * len(columns)), sharex=True)
    axes = [axes] if len(columns) == 1 else list(axes)
    when = pd.to_datetime(frame["evaluated_at"])
    for ax, column in zip(axes, columns, strict=True):
        ax.plot(when, frame[column], marker="o")
        direction = directions.get(column)
        ax.set_ylabel(column + (f"\n({direction} is better)" if direction else ""))
        ax.grid(alpha=0.3)
    axes[0].set_title("Generator evaluations over time")
    axes[-1].set_xlabel("evaluated at (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    return atomic_save_figure(path, fig)


__all__ = [
    "plot_losses",
    "plot_promotion_history",
    "save_image_grid",
    "save_progress_gif",
    "tensor_to_pil",
]
