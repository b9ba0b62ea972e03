"""The colour check that confirms or rejects each hash candidate pair.

A phash sees only the grey-level layout, so two different cars shot in the same plain studio
booth hash alike; ``verify_pairs`` keeps a candidate only when the stored colour thumbnails of
its two photos agree too (``colour_distances``, vectorised over all candidates). Apart from the
hashing and the search because it is a separate decision, with its own threshold
(``DedupConfig.max_colour_distance``), that runs on thumbnails only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from carmodels.dedup.schema import HASHES_FILE

if TYPE_CHECKING:
    from carmodels.dedup.config import DedupConfig


def colour_distances(
    thumbnails: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    flip_aware: bool,
    batch_pairs: int = 65536,
) -> np.ndarray:
    """Colour distance of each pair ``(i[k], j[k])`` of images, from their stored thumbnails.

    ``thumbnails`` has shape (images, crops, grid, grid, 3) with crop 0 the full frame. The
    distance is the mean over cells of the Euclidean RGB difference, minimised over pairings of
    one photo's crop with the other's full frame (a cropped copy lines up with its original at
    the matching crop) and, with ``flip_aware``, over mirroring one of them. A mean over cells
    is what separates the two failure modes measured: a cropped copy is a little off in many
    cells, a different car in the same studio is far off in the cells the car covers.
    """
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    n_crops = thumbnails.shape[1]
    # (crop of i, crop of j): each photo's crops against the other's full frame.
    pairings = [(0, 0)] + [(c, 0) for c in range(1, n_crops)] + [(0, c) for c in range(1, n_crops)]
    distances = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), batch_pairs):
        a = thumbnails[i[start : start + batch_pairs]].astype(np.float32)
        b = thumbnails[j[start : start + batch_pairs]].astype(np.float32)
        candidates = [b, b[:, :, :, ::-1]] if flip_aware else [b]  # axis 3: columns
        best = np.full(len(a), np.inf, dtype=np.float32)
        for crop_a, crop_b in pairings:
            for other in candidates:
                cell = np.sqrt(((a[:, crop_a] - other[:, crop_b]) ** 2).sum(axis=-1))
                best = np.minimum(best, cell.mean(axis=(1, 2)))
        distances[start : start + batch_pairs] = best
    return distances


def verify_pairs(pairs: pd.DataFrame, thumbnails: np.ndarray, config: DedupConfig) -> pd.DataFrame:
    """Those candidate ``pairs`` (``i, j, distance``) whose thumbnails agree, with their
    ``colour_distance``."""
    colour = colour_distances(
        thumbnails,
        pairs["i"].to_numpy(),
        pairs["j"].to_numpy(),
        config.flip_aware,
        config.verify_batch_pairs,
    )
    verified = pairs.assign(colour_distance=colour)
    return verified[verified["colour_distance"] <= config.max_colour_distance].reset_index(
        drop=True
    )


def stack_thumbnails(blobs: Iterable[bytes], config: DedupConfig) -> np.ndarray:
    """Thumbnail bytes of ``hashes.parquet`` rows as one (images, *thumbnail_shape) array."""
    blobs = list(blobs)
    shape = config.thumbnail_shape
    if any(len(blob) != np.prod(shape) for blob in blobs):
        raise ValueError(
            f"{HASHES_FILE} holds thumbnails of another shape than {shape}; delete it so that "
            "the images are hashed again."
        )
    return np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), *shape)


__all__ = ["colour_distances", "stack_thumbnails", "verify_pairs"]
