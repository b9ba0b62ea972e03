"""Pixel-space statistics of images: Fréchet distance, uint8 quantisation, box-downsampled
features and mean pairwise distance.

Used by the evaluate stage (``pixel_fd_16``, nearest-neighbour and diversity distances) and by
the trainer's per-epoch :class:`carmodels.train.monitor.SampleMonitor`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


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
