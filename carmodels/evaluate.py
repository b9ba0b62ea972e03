"""Evaluate a trained generator: sample grid, loss curves, memorisation check, cheap metrics.

Every metric is computed offline in seconds from pixels, so it runs anywhere the pipeline
does. They are *not* FID: the Fréchet distance here lives in a fixed pixel feature space
(``pixel_fd_16``), which tracks colour and layout statistics but not semantics. Learned-feature
metrics (FID/KID, a car classifier) can be added beside them in :func:`compute_metrics`.

Feature spaces (images are first quantised to uint8, as they would be saved):

* ``pixel_fd_16``: images box-downsampled to 16x16 (768 values in [0, 1]), projected onto
  the top ``fd_components`` principal components of the *training* images; Fréchet distance
  between the Gaussians fitted to validation images and to generated images.
* nearest-neighbour and diversity distances: L2 between 32x32 downsamples, divided by
  sqrt(dimensions), i.e. the root-mean-square per-pixel difference in [0, 1].

Validation images and generated images are compared at the same count (``n_samples``, the
validation set is subsampled deterministically when larger), since both the Fréchet distance
and mean distances depend on the sample size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from carmodels.generate import sample_images
from carmodels.io import atomic_write_json
from carmodels.shards import iter_images, load_images
from carmodels.train import (
    HISTORY_NAME,
    fit_image_size,
    load_generator,
    plot_history,
    read_history,
    resolve_device,
    save_image_grid,
)

logger = logging.getLogger(__name__)

METRIC_DEFINITIONS = {
    "pixel_fd_16": "Frechet distance, val vs generated, 16x16 pixels -> PCA (fit on train). "
    "Not FID; lower is closer.",
    "nn_generated_to_train": "Mean RMS pixel distance (32x32) from each generated image to its "
    "nearest training image.",
    "nn_val_to_train": "Same for validation images: the distance of genuinely new cars.",
    "nn_ratio": "nn_generated_to_train / nn_val_to_train; well below 1 suggests memorisation "
    "when diversity_ratio is near 1 (blurry, collapsed samples also sit close to everything).",
    "diversity_generated": "Mean pairwise RMS pixel distance (32x32) among generated images.",
    "diversity_val": "Same among validation images, for reference.",
    "diversity_ratio": "diversity_generated / diversity_val; well below 1 suggests mode collapse.",
}


@dataclass
class EvalConfig:
    n_samples: int = 256
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"
    #: Evaluate the EMA generator when the run kept one.
    ema: bool = True
    #: Side of the downsample the pixel Fréchet distance works on (the 16 in pixel_fd_16).
    fd_size: int = 16
    fd_components: int = 32
    #: Side of the downsample for nearest-neighbour and diversity distances.
    nn_size: int = 32
    #: How many generated/nearest-training pairs ``nearest.png`` shows.
    n_nearest_shown: int = 8
    #: Training images are streamed from the shards in chunks of this many.
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        for name in (
            "n_samples",
            "batch_size",
            "fd_size",
            "fd_components",
            "nn_size",
            "n_nearest_shown",
            "chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples < 2:
            raise ValueError("EvalConfig.n_samples must be >= 2 to measure diversity")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    samples_path: Path
    loss_plot_path: Path | None
    nearest_path: Path
    metrics_path: Path


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature rows.

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, with the matrix
    square roots taken by symmetric eigendecomposition (stable for singular covariances).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (n >= 2, d) feature arrays, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    trace_term = np.trace(cov_a) + np.trace(cov_b) - 2 * np.sum(np.sqrt(np.clip(cross, 0, None)))
    return max(mean_term + float(trace_term), 0.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] quantised exactly as a PNG would store them."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def pixel_features(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """Box-downsampled pixels in [0, 1], flattened: N x (3 * size * size) float32."""
    small = F.interpolate(images_uint8.float(), size=(size, size), mode="area")
    return small.div_(255).flatten(1)


def mean_pairwise_rms(features: torch.Tensor) -> float:
    """Mean RMS distance over all pairs of rows."""
    return float(torch.pdist(features).mean() / math.sqrt(features.shape[1]))


@dataclass
class _TrainScan:
    """What one streaming pass over the training split gives."""

    n_train: int
    fd_mean: np.ndarray
    fd_components: np.ndarray  # d x k
    nearest_distance: torch.Tensor  # per query, RMS
    nearest_images: torch.Tensor  # per query, uint8 training image


def _scan_training_set(
    shards_dir: str | os.PathLike[str],
    queries: torch.Tensor,
    image_size: int,
    config: EvalConfig,
    device: torch.device,
) -> _TrainScan:
    """One pass over the train split: PCA statistics and every query's nearest image."""
    query_features = pixel_features(queries, config.nn_size).to(device)
    best = torch.full((len(queries),), math.inf, device=device)
    best_images = torch.zeros_like(queries)
    dims = 3 * config.fd_size**2
    total, outer, n_train = np.zeros(dims), np.zeros((dims, dims)), 0
    for chunk in iter_images(shards_dir, split="train", batch_size=config.chunk_size):
        chunk = fit_image_size(chunk, image_size, str(shards_dir))
        fd = pixel_features(chunk, config.fd_size).double().numpy()
        total += fd.sum(0)
        outer += fd.T @ fd
        n_train += len(chunk)
        distances = torch.cdist(query_features, pixel_features(chunk, config.nn_size).to(device))
        chunk_best, index = distances.min(dim=1)
        closer = chunk_best < best
        best = torch.where(closer, chunk_best, best)
        best_images[closer.cpu()] = chunk[index[closer].cpu()]
    if n_train < 2:
        raise ValueError(f"{shards_dir} has {n_train} training images; evaluation needs >= 2.")
    mean = total / n_train
    covariance = (outer - n_train * np.outer(mean, mean)) / (n_train - 1)
    values, vectors = np.linalg.eigh(covariance)
    k = min(config.fd_components, n_train - 1, dims)
    components = vectors[:, np.argsort(values)[::-1][:k]]
    return _TrainScan(
        n_train=n_train,
        fd_mean=mean,
        fd_components=components,
        nearest_distance=best.cpu() / math.sqrt(3 * config.nn_size**2),
        nearest_images=best_images,
    )


def _validation_images(
    shards_dir: str | os.PathLike[str], image_size: int, config: EvalConfig
) -> torch.Tensor | None:
    """Up to n_samples validation images (a seeded subset), or None when there is no val split."""
    try:
        images = load_images(shards_dir, split="val")
    except ValueError:
        return None
    if len(images) > config.n_samples:
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
        images = images[pick[: config.n_samples].sort().values]
    return fit_image_size(images, image_size, str(shards_dir))


def compute_metrics(
    generated: torch.Tensor,
    val: torch.Tensor | None,
    scan: _TrainScan,
    config: EvalConfig,
) -> dict[str, float | None]:
    """Metric values (None where the validation split is missing or too small)."""
    n_generated = len(generated)
    nn_generated = float(scan.nearest_distance[:n_generated].mean())
    metrics: dict[str, float | None] = {
        "nn_generated_to_train": nn_generated,
        "diversity_generated": mean_pairwise_rms(pixel_features(generated, config.nn_size)),
        "pixel_fd_16": None,
        "nn_val_to_train": None,
        "nn_ratio": None,
        "diversity_val": None,
        "diversity_ratio": None,
    }
    if val is None or len(val) < 2:
        return metrics

    def project(images: torch.Tensor) -> np.ndarray:
        features = pixel_features(images, config.fd_size).double().numpy()
        return (features - scan.fd_mean) @ scan.fd_components

    nn_val = float(scan.nearest_distance[n_generated:].mean())
    diversity_val = mean_pairwise_rms(pixel_features(val, config.nn_size))
    metrics.update(
        pixel_fd_16=frechet_distance(project(val), project(generated)),
        nn_val_to_train=nn_val,
        nn_ratio=nn_generated / nn_val if nn_val > 0 else None,
        diversity_val=diversity_val,
        diversity_ratio=metrics["diversity_generated"] / diversity_val if diversity_val else None,
    )
    return metrics


def evaluate(
    checkpoint_path: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: EvalConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Write samples.png, losses.png, nearest.png and metrics.json for a checkpoint."""
    config = config or EvalConfig()
    log = log or logger.info
    out = Path(out_dir)
    checkpoint_path = Path(checkpoint_path)
    device = resolve_device(config.device)
    generator, spec, meta = load_generator(checkpoint_path, device=str(device), ema=config.ema)

    generated_float = sample_images(generator, config.n_samples, config.seed, config.batch_size)
    generated = to_uint8(generated_float)
    side = math.isqrt(min(64, config.n_samples))
    samples_path = save_image_grid(generated_float[: side * side], out / "samples.png", nrow=side)

    val = _validation_images(shards_dir, spec.image_size, config)
    if val is None:
        log(f"No validation split in {shards_dir}: val-based metrics are null.")
    queries = generated if val is None else torch.cat([generated, val])
    scan = _scan_training_set(shards_dir, queries, spec.image_size, config, device)
    metrics = compute_metrics(generated, val, scan, config)

    # The generated images closest to a training image: the likeliest copies.
    n_shown = min(config.n_nearest_shown, len(generated))
    closest = scan.nearest_distance[: len(generated)].argsort()[:n_shown]
    pairs = torch.cat([generated[closest], scan.nearest_images[closest]]).float().div(127.5).sub(1)
    nearest_path = save_image_grid(pairs, out / "nearest.png", nrow=n_shown)

    history_csv = checkpoint_path.parent.parent / HISTORY_NAME
    history = read_history(history_csv) if history_csv.is_file() else meta["history"]
    loss_plot = plot_history(history, out / "losses.png") if history else None
    final = history[-1] if history else {}
    metrics.update({f"final_{k}": final.get(k) for k in ("loss_d", "loss_g", "d_x", "d_g_z")})
    metrics.update(
        n_generated=len(generated),
        n_val=0 if val is None else len(val),
        n_train=scan.n_train,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
    )
    metrics_path = atomic_write_json(
        out / "metrics.json",
        {
            **metrics,
            "checkpoint": str(checkpoint_path),
            "weights": meta["weights"],
            "data_version": meta["data_version"],
            "config": asdict(config),
            "definitions": METRIC_DEFINITIONS,
        },
    )
    log(
        "Evaluation: "
        + ", ".join(
            f"{k}={v:.4g}"
            for k, v in metrics.items()
            if isinstance(v, float) and k in METRIC_DEFINITIONS
        )
    )
    return EvalResult(
        metrics=metrics,
        samples_path=samples_path,
        loss_plot_path=loss_plot,
        nearest_path=nearest_path,
        metrics_path=metrics_path,
    )
