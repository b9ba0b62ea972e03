"""Perceptual hashes and colour thumbnails of one photo, or of a chunk of photos in a worker.

``phash_pixels`` and ``phash_batch`` reproduce imagehash's phash bit for bit with matrix
products (the Lanczos resize and the DCT), ``image_hashes`` covers imagehash's other functions,
and ``colour_thumbnails`` keeps the tiny mean-RGB grids that the colour check compares.
``_hash_chunk`` is the unit of work of a hashing thread or process. This module knows nothing
of shards, caches or the search, so that a worker process imports only numpy, Pillow and
``carmodels.imaging``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps
from threadpoolctl import threadpool_limits

from carmodels.imaging import Box, ImageDecodeError, decode_draft

if TYPE_CHECKING:
    import imagehash

    from carmodels.dedup.config import DedupConfig


def phash_distance(a: int, b: int) -> int:
    """Hamming distance between two hashes given as integers."""
    return (int(a) ^ int(b)).bit_count()


def hash_to_hex(value: int) -> str:
    """The 16-digit hex form of a 64-bit hash (the same digits as ``str(ImageHash)``)."""
    return f"{int(value):016x}"


def hex_to_hash(text: str) -> int:
    return int(text, 16)


def _imagehash_to_int(h: imagehash.ImageHash) -> int:
    """Bits in imagehash's order, first bit most significant (so hex matches ``str(h)``)."""
    bits = np.asarray(h.hash, dtype=bool).ravel()
    return int("".join("1" if bit else "0" for bit in bits), 2)


@functools.cache
def _dct_rows(size: int, rows: int) -> np.ndarray:
    """The first ``rows`` rows of the unnormalised size-point DCT-II matrix.

    ``M @ x`` equals ``scipy.fftpack.dct(x)[:rows]`` (type 2, no normalisation), the transform
    imagehash's phash applies along each axis.
    """
    n = np.arange(size)
    k = np.arange(rows)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


def _grey(rgb: np.ndarray) -> np.ndarray:
    """uint8 luma (ITU-R 601 weights, rounded: what Pillow's ``convert("L")`` gives)."""
    import cv2  # lazy: modules that only read dedup's outputs need not load OpenCV

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


#: Lanczos window half-width, in output pixels (Pillow's and imagehash's filter).
_LANCZOS_SUPPORT = 3.0


def _lanczos(x: np.ndarray) -> np.ndarray:
    """sinc(x) sinc(x / 3) on |x| < 3, else 0."""
    return np.where(np.abs(x) < _LANCZOS_SUPPORT, np.sinc(x) * np.sinc(x / _LANCZOS_SUPPORT), 0.0)


@functools.lru_cache(maxsize=4096)
def _lanczos_weights(n_in: int, start: float, stop: float, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix resampling the span [start, stop) of n_in pixels to n_out with
    Pillow's antialiased Lanczos filter (its ``precompute_coeffs``, in floating point)."""
    scale = (stop - start) / n_out
    stretch = max(scale, 1.0)  # widen the filter when shrinking: antialiasing
    centres = start + (np.arange(n_out) + 0.5) * scale
    support = _LANCZOS_SUPPORT * stretch
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centres + support + 0.5).astype(np.int64), n_in)
    # Only the taps under each output pixel's window are evaluated (~1/5 of a row).
    taps = first[:, None] + np.arange(int(2 * support) + 2)
    weights = _lanczos((taps + 0.5 - centres[:, None]) / stretch)
    weights[taps >= last[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    dense = np.zeros((n_out, n_in + taps.shape[1]), dtype=np.float32)
    dense[np.arange(n_out)[:, None], taps] = weights
    return dense[:, :n_in]


@functools.lru_cache(maxsize=4096)
def _area_weights(
    n_in: int, start: float, stop: float, n_out: int, crops: tuple[float, ...]
) -> np.ndarray:
    """(crops, n_out, n_in) matrices averaging, for each crop c, the span [start, stop) less
    c of its length at either end into n_out equal cells, each pixel weighed by the share of
    it inside the cell."""
    length = stop - start
    cut = np.asarray(crops)[:, None] * length  # (crops, 1)
    edges = start + cut + np.arange(n_out + 1) * ((length - 2 * cut) / n_out)  # (crops, n+1)
    x = np.arange(n_in)
    overlap = np.minimum(edges[:, 1:, None], x + 1.0) - np.maximum(edges[:, :-1, None], x)
    weights = np.clip(overlap, 0.0, None)
    return (weights / weights.sum(axis=2, keepdims=True)).astype(np.float32)


def _whole(rgb: np.ndarray, box: Box | None) -> Box:
    return box if box is not None else (0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0]))


def phash_pixels(rgb: np.ndarray, hash_size: int = 8, box: Box | None = None) -> np.ndarray:
    """The grey ``4 * hash_size`` square that imagehash's phash transforms (uint8), of RGB
    pixels or of their part ``box`` (left, upper, right, lower; fractional), such as
    ``Draft.box``.

    What imagehash does (``convert("L")``, then Pillow's Lanczos resize), with the resize as
    two small matrix products in floating point: within two grey levels of Pillow's result
    (which rounds between its two passes; tested) for a fraction of its CPU, most of it
    outside the GIL, where Pillow's resize of a small image is mostly Python. Mirroring the
    pixels and the box mirrors the square exactly.
    """
    size = 4 * hash_size
    left, top, right, bottom = _whole(rgb, box)
    rows, columns = rgb.shape[:2]
    grey = _grey(rgb).astype(np.float32)
    square = (
        _lanczos_weights(rows, top, bottom, size)
        @ grey
        @ _lanczos_weights(columns, left, right, size).T
    )
    return np.clip(np.rint(square), 0, 255).astype(np.uint8)


def phash_batch(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """imagehash's phash of each of ``pixels`` (N x 4h x 4h grey) and of its mirror image.

    Returns two uint64 arrays, bits in imagehash's order (first bit most significant), bit for
    bit what ``phash(Image.fromarray(p), h)`` and ``phash(ImageOps.mirror(...), h)`` give
    (tested): DCT-II along both axes, low h x h block above its median. Only that block is
    computed, for the whole batch in two matrix products (imagehash: a full 2D transform per
    call), and the mirror image's block is this one with the odd horizontal frequencies
    negated (mirroring a sequence multiplies its k-th DCT-II coefficient by (-1)^k), so
    mirror images are never resized or transformed.
    """
    n, size, _ = pixels.shape
    hash_size = size // 4
    basis = _dct_rows(size, hash_size)
    low = basis @ pixels.astype(np.float64) @ basis.T  # rows: vertical frequency
    mirrored = low * np.where(np.arange(hash_size) % 2, -1.0, 1.0)
    weights = np.left_shift(np.uint64(1), np.arange(hash_size**2, dtype=np.uint64)[::-1])
    hashes = []
    for block in (low, mirrored):
        flat = block.reshape(n, hash_size**2)
        bits = flat > np.median(flat, axis=1, keepdims=True)
        hashes.append(np.bitwise_or.reduce(np.where(bits, weights, np.uint64(0)), axis=1))
    return hashes[0], hashes[1]


def phash_pair(rgb: np.ndarray, hash_size: int = 8, box: Box | None = None) -> tuple[int, int]:
    """phash of RGB pixels (or their part ``box``) and of their mirror image (see
    ``phash_pixels``, ``phash_batch``)."""
    hashes, flipped = phash_batch(phash_pixels(rgb, hash_size, box)[None])
    return int(hashes[0]), int(flipped[0])


def image_hashes(
    rgb: np.ndarray, method: str, hash_size: int, box: Box | None = None
) -> tuple[int, int]:
    """(hash, hash of the mirror image) of RGB pixels (H x W x 3 uint8) or of their part
    ``box`` (to the nearest pixel for the imagehash functions other than phash)."""
    if method == "phash":
        return phash_pair(rgb, hash_size, box)
    # Imported here so that modules which only read dedup's outputs (shards, the trainer on a
    # GPU machine) do not need imagehash installed.
    import imagehash

    function = getattr(imagehash, method)
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if box is not None:
        img = img.crop(tuple(round(edge) for edge in box))
    mirror = ImageOps.mirror(img)
    return (
        _imagehash_to_int(function(img, hash_size)),
        _imagehash_to_int(function(mirror, hash_size)),
    )


def colour_thumbnails(
    rgb: np.ndarray, grid: int, crops: Iterable[float], box: Box | None = None
) -> np.ndarray:
    """Mean-RGB thumbnails (``grid`` x ``grid`` cells) of RGB pixels cut by each of ``crops``.

    Shape (len(crops), grid, grid, 3), uint8. The crop is the fraction removed from every side
    of ``box`` (default: the whole image); each cell is the mean colour under it, every pixel
    weighed by the share of it inside the cell (fractional edges count exactly, which keeps
    a photo and its mirror image aligned). The mirror image's thumbnail is this one flipped
    left to right (the crops are symmetric), so it is not stored.
    """
    left, top, right, bottom = _whole(rgb, box)
    rows, columns = rgb.shape[:2]
    crops = tuple(crops)
    row_weights = _area_weights(rows, top, bottom, grid, crops).reshape(-1, rows)
    column_weights = _area_weights(columns, left, right, grid, crops)  # (crops, grid, columns)
    per_row = row_weights @ rgb.reshape(rows, columns * 3).astype(np.float32)
    per_row = per_row.reshape(len(crops), grid, columns, 3)
    cells = column_weights[:, None] @ per_row  # (crops, grid rows, grid columns, RGB)
    return np.rint(cells).astype(np.uint8)


@dataclass(frozen=True)
class _HashTask:
    sha256: str
    data: bytes


def _hash_chunk(tasks: list[_HashTask], config: DedupConfig) -> list[dict[str, object]]:
    """Worker: hash a chunk of images; undecodable ones get null hashes.

    phash is computed for the whole chunk at once (``phash_batch``); the other imagehash
    functions image by image.
    """
    batched = config.hash_method == "phash"
    rows: list[dict[str, object]] = []
    phash_rows: list[dict[str, object]] = []
    phash_inputs: list[np.ndarray] = []
    for task in tasks:
        row: dict[str, object] = {"sha256": task.sha256, "n_bytes": len(task.data)}
        rows.append(row)
        try:
            # The size is the full-resolution, EXIF-oriented one: "most pixels" must compare
            # the originals, not the drafts JPEG decoding shrank by powers of two.
            draft = decode_draft(task.data, config.decode_draft_px)
        except ImageDecodeError:
            row.update(hash=0, hash_flipped=0, thumbnails=b"", width=0, height=0, decodable=False)
            continue
        if batched:
            phash_inputs.append(phash_pixels(draft.pixels, config.hash_size, draft.box))
            phash_rows.append(row)
        else:
            row["hash"], row["hash_flipped"] = image_hashes(
                draft.pixels, config.hash_method, config.hash_size, draft.box
            )
        thumbnails = colour_thumbnails(
            draft.pixels, config.colour_grid, config.colour_crops, draft.box
        )
        row.update(
            thumbnails=thumbnails.tobytes(), width=draft.width, height=draft.height, decodable=True
        )
    if phash_inputs:
        hashes, flipped = phash_batch(np.stack(phash_inputs))
        for row, hash_value, flipped_value in zip(phash_rows, hashes, flipped, strict=True):
            row.update(hash=int(hash_value), hash_flipped=int(flipped_value))
    return rows


def _hash_chunk_one_blas_thread(
    tasks: list[_HashTask], config: DedupConfig
) -> list[dict[str, object]]:
    """``_hash_chunk`` in a worker process, its BLAS held to one thread like the parent's."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _hash_chunk(tasks, config)


__all__ = [
    "colour_thumbnails",
    "hash_to_hex",
    "hex_to_hash",
    "image_hashes",
    "phash_batch",
    "phash_distance",
    "phash_pair",
    "phash_pixels",
]
