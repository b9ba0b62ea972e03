"""Remove exact and near-duplicate photos from the raw shards (the ``unique_images`` asset).

Listing sites repost the same photo under many URLs, re-encoded, resized, slightly cropped or
mirrored. Exact copies share a sha256; the others are found with a 64-bit perceptual hash
(``imagehash``) and a Hamming-distance threshold, then confirmed by a colour thumbnail:

1. Index the raw shards (no bytes): per URL the latest fetch wins; ``outcome == "ok"`` rows are
   the images.
2. Hash each distinct sha256 once (from a 64 px JPEG draft, ``decode_draft``; in threads, or
   a process pool when there are thousands), reading image bytes batch by batch, and keep a
   tiny RGB thumbnail of it (``colour_thumbnails``). Hashes and thumbnails are cached
   in ``hashes.parquet`` keyed by sha256, so a later run over grown raw shards hashes only
   the new photos.
3. Candidate pairs by an exact multi-index search (``find_near_duplicates``, tables chosen by
   ``search_masks``), optionally also between a photo and the mirror image of another. A
   phash sees only the grey-level layout, so two different cars shot in the same plain
   studio booth hash alike; each candidate is kept only when the thumbnails agree too
   (``colour_distances``, vectorised over all candidates).
4. Connected components of exact + near pairs are the clusters; each keeps its best member
   (most pixels, then the largest file, then the smallest URL so that ties are deterministic).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from threadpoolctl import threadpool_limits

from carmodels.errors import (
    InputError,
    MissingColumnError,
    MissingInputError,
    ShardsError,
    one_line,
)
from carmodels.imaging import (
    Box,
    ImageDecodeError,
    decode_draft,
    decode_image,
    map_in_processes,
)
from carmodels.io import atomic_write, atomic_write_parquet
from carmodels.scrape.raw import RAW_COLUMNS, RAW_SHARD_GLOB, THUMBNAIL_FIELD

if TYPE_CHECKING:
    import imagehash

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

#: Raw shard file pattern and non-metadata columns: the scraper's, so the two never drift.
RAW_GLOB = RAW_SHARD_GLOB
RAW_CORE_COLUMNS = (*RAW_COLUMNS, THUMBNAIL_FIELD.name)
#: Columns of ``unique.parquet`` written by this module (the rest is listing metadata).
UNIQUE_CORE_COLUMNS = (
    "sha256",
    "url",
    "raw_shard",
    "phash",
    "width",
    "height",
    "cluster_id",
    "cluster_size",
)
HASH_METHODS = ("phash", "dhash", "whash", "colorhash")
#: Bits per hash the search works on (one uint64).
HASH_BITS = 64

UNIQUE_FILE = "unique.parquet"
CLUSTERS_FILE = "clusters.parquet"
HASHES_FILE = "hashes.parquet"
CONTACT_SHEET_FILE = "clusters.png"
#: Parquet key-value metadata saying which hash function filled ``hashes.parquet``.
_HASH_SPEC_KEY = b"carmodels.hash_spec"
#: Layout version of ``hashes.parquet``; part of the spec, so a cache written by an older
#: version (v1 had no thumbnails) is hashed again rather than misread.
HASH_CACHE_VERSION = 3


@dataclass(frozen=True)
class DedupConfig:
    """Settings of the duplicate search."""

    #: imagehash function: ``phash`` (DCT; robust to re-encoding and resizing), ``dhash``,
    #: ``whash`` or ``colorhash`` (colour histogram; only for hash_size <= 4 to fit 64 bits).
    hash_method: str = "phash"
    #: imagehash ``hash_size`` (``binbits`` for colorhash); the hash must fit in 64 bits.
    hash_size: int = 8
    #: Largest Hamming distance between two 64-bit hashes that makes a candidate pair (the
    #: colour check below then confirms or rejects it). Measured with phash on the 1,500
    #: photos of cars-sample plus planted copies of 150 of them (256px draft decode), share of
    #: copies within 6 / 8 / 10 / 12 bits of their original:
    #: - q60 re-encode, resized to 80% and back, mirrored (flip-aware): 100% at 6 (max 2);
    #: - cropped by 3% of each dimension (1.5% a side): 83% / 98% / 99.3% / 100%;
    #: - cropped by 3% a side: 28% / 49% / 75% / 93%.
    #: Without verification 6 was the limit (cars-sample: 1 false pair at 6, 18 at 8, 269 at 10;
    #: demo catalog, 300 listings: 58 false candidates at 6, all studio shots). With it, 10
    #: keeps every planted pair and no false one (see ``max_colour_distance``); 12 gains only
    #: the heavy crops and costs ~2x the search time (candidates grow fast past 10).
    #: Re-measured with the 64 px draft and exact-box resampling (``phash_pixels``) by
    #: bench/dedup_margins.py, one copy of each kind of all 1,500 photos: q60, 80% resize
    #: and mirror within 4 bits (p99 2); 1.5%-a-side crops 99.7% within 10 (p99 10); 3% a
    #: side 84.9%; all four combined 99.7%. 59 false candidates at 10 among the originals,
    #: all rejected by the colour check (min 29.5).
    threshold: int = 10
    #: Also compare each photo with the mirror image of the others, so a mirrored repost
    #: counts as a duplicate.
    flip_aware: bool = True
    #: Confirm every hash candidate with the colour thumbnails (False: the hash alone decides,
    #: and ``threshold`` should then be 6, see above).
    verify_colour: bool = True
    #: Side of the colour thumbnail, in cells (each cell is the mean RGB of its area). 8x8 was
    #: as discriminating as 16x16 and more tolerant of crops (cells move less).
    colour_grid: int = 8
    #: Crops (fraction cut from every side) at which thumbnails are stored. Two photos are
    #: compared at every pairing of one photo's crop with the other's full frame, so a copy
    #: cropped by up to the largest crop (and in between) lines up with its original.
    colour_crops: tuple[float, ...] = (0.0, 0.015, 0.03)
    #: Largest mean per-cell RGB distance (Euclidean, 0-255 scale, best crop pairing, mirror
    #: tried when flip_aware) between the thumbnails of a near-duplicate pair. Measured:
    #: - cars-sample planted copies (q60, 80% resize and back, 1.5%-a-side crop, mirror, and
    #:   all four combined): max 5.3, p99.5 4.9; 3%-a-side crops: max 9.1 (p99 of all 4.4);
    #: - false candidates at threshold 10: demo catalog (studio shots, e.g. a white sedan vs a
    #:   yellow coupe) min 11.6; cars-sample min 29.6; the hardest case, the same drawn car in
    #:   the same pose and booth painted grey vs blue: 7.0 to 9.5 (white vs yellow: >= 13).
    #: 6.5 sits between the benchmark copies and that grey/blue case. Cluster-pair precision /
    #: recall with threshold 10: demo catalog, 120 and 300 listings: 1.0 / 1.0 (6 and 15
    #: planted pairs; 34 and 390 hash candidates rejected); cars-sample + 900 planted copies
    #: of 150 photos (the kinds above, 1.5% and 3% a side crops): 1.0 / 1.0 (the 3%-a-side
    #: crops beyond 6.5 still join their cluster through the other copies). Hash alone at 10:
    #: precision 0.85; at 6: recall 0.979 (1.5%-a-side crops 0.96). With the 64 px draft and
    #: area-weighted cells over the exact photo box (bench/dedup_margins.py, every photo):
    #: copies max 5.6 (all four kinds combined; 1.5%-a-side crops 4.5, 3% a side 4.3, q60
    #: 2.2, resize 1.7, mirror 1.3; Pillow's BOX cells had crops at 7.0 and mirrors at 3.9),
    #: false candidates min 29.5; demo-catalog and studio-shot tests unchanged.
    max_colour_distance: float = 6.5
    #: Candidate pairs verified per numpy batch (bounds memory: a few KB per pair).
    verify_batch_pairs: int = 65536
    #: Processes (threads below ``min_images_per_worker``) hashing images, and threads
    #: scanning the near-neighbour search's tables.
    workers: int = 2
    #: New images per worker process below which fewer processes are started (none: hashing
    #: in ``workers`` threads of this process instead). A photo costs ~1 ms to decode and
    #: hash here, while a worker pool costs 2-5 s to start (forkserver, then each worker
    #: imports carmodels, pandas, pyarrow and aiohttp): on the 1,650 files of bench/dedup.py,
    #: on the loaded 2-core machine, the pool's first result came after 4.9 s and all after
    #: 9.6 s, vs ~2.8 s in this process.
    min_images_per_worker: int = 2000
    #: Images per task sent to a worker (large enough to amortise pickling overhead).
    chunk_size: int = 64
    #: Rows read from a raw shard at a time; bounds memory to a few batches of image bytes.
    read_batch_rows: int = 256
    #: JPEGs are decoded at a reduced scale (DCT scaling) at least this large: phash works on
    #: 32 px and the colour cells on 8, and decoding, resizing and hashing a 64 px draft took
    #: ~1.7 ms a photo against ~11 ms at 256 px (cars-sample; ~1 ms since decoding went
    #: through OpenCV and resampling through matrix products). 32 px was faster still but
    #: blurred crops apart (1.5%-a-side crop colour distance up to 10, over the 6.5 limit);
    #: 64 px keeps them within 4.5, see above.
    decode_draft_px: int = 64
    #: Contact sheet: how many of the largest clusters, members per row, thumbnail side.
    contact_sheet_clusters: int = 12
    contact_sheet_members: int = 8
    thumbnail_px: int = 96

    def __post_init__(self) -> None:
        if self.hash_method not in HASH_METHODS:
            raise ValueError(
                f"DedupConfig.hash_method must be one of {HASH_METHODS}, got {self.hash_method!r}"
            )
        if self.hash_bits > HASH_BITS:
            raise ValueError(
                f"DedupConfig: {self.hash_method} with hash_size {self.hash_size} gives "
                f"{self.hash_bits} bits; the search needs <= {HASH_BITS} (phash/dhash/whash: "
                "hash_size <= 8; colorhash: hash_size <= 4)."
            )
        if self.hash_method == "whash" and self.hash_size & (self.hash_size - 1):
            raise ValueError(f"whash needs a power-of-two hash_size, got {self.hash_size}")
        if not 0 <= self.threshold < self.hash_bits:
            raise ValueError(
                f"DedupConfig.threshold must be in [0, {self.hash_bits}), got {self.threshold}"
            )
        if min(self.workers, self.chunk_size, self.read_batch_rows, self.min_images_per_worker) < 1:
            raise ValueError(
                "DedupConfig.workers, chunk_size, read_batch_rows and min_images_per_worker "
                "must be >= 1"
            )
        if self.colour_grid < 1 or self.verify_batch_pairs < 1:
            raise ValueError("DedupConfig.colour_grid and verify_batch_pairs must be >= 1")
        crops = self.colour_crops
        if not crops or crops[0] != 0.0 or not all(0.0 <= c < 0.25 for c in crops):
            raise ValueError(
                "DedupConfig.colour_crops must start with 0.0 (the full frame) and hold "
                f"fractions in [0, 0.25), got {crops!r}"
            )
        if self.max_colour_distance < 0:
            raise ValueError(
                f"DedupConfig.max_colour_distance must be >= 0, got {self.max_colour_distance}"
            )

    @property
    def hash_bits(self) -> int:
        if self.hash_method == "colorhash":
            return 14 * self.hash_size  # imagehash.colorhash: 14 bins of `binbits` bits
        return self.hash_size * self.hash_size

    @property
    def hash_spec(self) -> str:
        """Identifies hash function and thumbnails; the cache is reused only under the same spec."""
        crops = ",".join(f"{c:g}" for c in self.colour_crops)
        return (
            f"v{HASH_CACHE_VERSION}:{self.hash_method}:{self.hash_size}:"
            f"draft{self.decode_draft_px}:colour{self.colour_grid}@{crops}"
        )

    @property
    def thumbnail_shape(self) -> tuple[int, int, int, int]:
        """(crops, rows, columns, RGB) of one image's stored thumbnails."""
        return (len(self.colour_crops), self.colour_grid, self.colour_grid, 3)


@dataclass(frozen=True)
class DedupResult:
    #: ``outcome == "ok"`` images (one per URL) in the raw shards.
    n_input: int
    n_kept: int
    #: Dropped images with the same sha256 as their cluster's kept image.
    n_exact_duplicates: int
    #: Dropped images that only look like their cluster's kept image.
    n_near_duplicates: int
    #: Clusters with more than one member.
    n_clusters: int
    #: Cluster size -> number of clusters, over all clusters (size 1 = no duplicate).
    cluster_size_histogram: dict[int, int]
    unique_path: Path
    clusters_path: Path
    #: None when there are no duplicate clusters to show.
    contact_sheet_path: Path | None
    elapsed_s: float
    #: "ok" rows left out of ``unique.parquet`` because they have no usable image: the sum of
    #: ``undecodable_by_reason``.
    n_undecodable: int = 0
    #: Why, per reason: ``decode_error`` (bytes that are not an image Pillow/OpenCV can
    #: decode) and ``no_bytes`` (an ok row whose ``image_bytes`` are missing from the raw
    #: shard). Only reasons that occurred are present.
    undecodable_by_reason: dict[str, int] = field(default_factory=dict)
    #: Images hashed in this run (the rest came from ``hashes.parquet``).
    n_hashed: int = 0


# --------------------------------------------------------------------------- hashing


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


# --------------------------------------------------------------------------- near-neighbour search


def _band_layout(n_bands: int, bits: int = HASH_BITS) -> list[tuple[int, int]]:
    """(shift, width) of ``n_bands`` contiguous bit bands covering ``bits`` bits."""
    base, extra = divmod(bits, n_bands)
    layout, shift = [], 0
    for band in range(n_bands):
        width = base + (1 if band < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


#: Cost model of the search, per hash and table (key, sort, gathers) and per candidate pair
#: (distance check, and locating the close ones: shorter keys make candidates closer), in
#: the same unit. Fitted to timings of every plan at 10^3 to 3 * 10^5 random hashes
#: (threshold 10): with these weights the model picks the fastest plan at each size.
_COST_PER_HASH_TABLE = 1.0
_COST_PER_CANDIDATE = 2.0
#: Parts whose covering would need more tables than this are not considered.
_MAX_TABLES_PER_PART = 1024


def _covering_masks(shift: int, width: int, tolerance: int) -> list[int]:
    """Bit masks inside one part such that two hashes differing in at most ``tolerance`` of
    the part's bits agree exactly on at least one mask (Pagh's covering LSH, SODA 2016).

    Each bit position i of the part gets a nonzero vector m(i) of GF(2)^(tolerance + 1); mask v
    (one per nonzero v) holds the positions with <m(i), v> = 1. The <= tolerance positions
    where two hashes differ span at most ``tolerance`` dimensions, so some nonzero v is
    orthogonal to all of them and its mask avoids them all: no false negative, by
    construction. The vectors are spread so that every mask holds about half the part (all
    nonzero vectors in turn when the part is wide enough; else first those with the lowest
    coordinate set, which every v but that coordinate's splits evenly). tolerance 0 is the
    classic multi-index band: one mask, the whole part.
    """
    dims = tolerance + 1
    nonzero = list(range(1, 2**dims))
    if width < len(nonzero):
        nonzero = [u for u in nonzero if u & 1] + [u for u in nonzero if not u & 1]
    vectors = [nonzero[k % len(nonzero)] for k in range(width)]
    masks = []
    for v in range(1, 2**dims):
        mask = 0
        for k, u in enumerate(vectors):
            if (u & v).bit_count() % 2:
                mask |= 1 << (shift + k)
        masks.append(mask)
    return masks


def _plan_masks(threshold: int, bits: int, n_parts: int) -> list[int] | None:
    """The masks of ``n_parts`` parts (see ``search_masks``); None if a part needs too many."""
    spare = threshold - n_parts + 1  # sum of the parts' tolerances
    if spare < 0 or n_parts > bits:
        raise ValueError(f"{n_parts} parts cannot cover threshold {threshold} on {bits} bits")
    base, extra = divmod(spare, n_parts)
    layout = _band_layout(n_parts, bits)  # wider parts first: they take the extra tolerance
    tolerances = [base + (1 if k < extra else 0) for k in range(n_parts)]
    if any(2 ** (t + 1) - 1 > _MAX_TABLES_PER_PART for t in tolerances):
        return None
    return [
        mask
        for (shift, width), tolerance in zip(layout, tolerances, strict=True)
        for mask in _covering_masks(shift, width, tolerance)
    ]


@functools.cache
def search_masks(threshold: int, bits: int, n_hashes: int) -> tuple[int, ...]:
    """The tables of the exact search: bit masks such that any two hashes within ``threshold``
    bits of each other agree exactly on at least one mask.

    The hash is split into P parts; by the general pigeonhole principle, two hashes within
    ``threshold`` differ in at most t_j bits of some part j whenever the t_j sum to
    ``threshold - P + 1``, and each part is covered for its t_j by ``_covering_masks``. P =
    threshold + 1 is classic multi-index hashing (every t_j = 0, each part one table); fewer
    parts give more tables but longer keys. Longer keys matter as the count grows: with
    threshold 10 and 64 bits, the 11 bands of 5-6 bits put any two of 10^6 random hashes in
    a common bucket with probability ~1/5, about 10^11 candidate pairs, while 2 parts of 32
    bits (t = 5 and 4) give 94 tables of 16-bit keys and ~7 * 10^8 candidates. P is chosen
    per call by the cost model above for ``n_hashes`` uniformly random hashes (real hashes
    cluster, which adds candidates to every plan alike).
    """
    best: tuple[float, tuple[int, ...]] | None = None
    pairs = n_hashes * (n_hashes - 1) / 2
    for n_parts in range(1, min(threshold + 1, bits) + 1):
        masks = _plan_masks(threshold, bits, n_parts)
        if masks is None or not all(masks):
            continue
        candidates = sum(pairs * 2.0 ** -mask.bit_count() for mask in masks)
        cost = len(masks) * n_hashes * _COST_PER_HASH_TABLE + candidates * _COST_PER_CANDIDATE
        if best is None or cost < best[0]:
            best = (cost, tuple(masks))
    assert best is not None  # n_parts = threshold + 1 (tolerance 0) always qualifies
    return best[1]


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(values).astype(np.int64)


#: Odd 64-bit multiplier (2^64 / golden ratio): its top bits hash a masked key.
_KEY_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


#: Hashes per block when checking runs: bounds a block's arrays to under 1 MB, which stay in
#: the CPU's L2 cache across its offsets (2^14 to 2^22 timed within 5% of each other at 10^6
#: hashes, so memory decided).
_BLOCK_ELEMENTS = 1 << 15


def _close_pairs_in_table(
    hashes: np.ndarray, mask: int, threshold: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pairs (i < j) of ``hashes`` equal on ``mask`` and within ``threshold`` bits, and how
    many candidate pairs were checked.

    Hashes with equal masked bits must end up next to each other. Sorting one uint64 per hash
    (a hash of the masked bits in the high bits, the index in the low bits) is several times
    faster than an argsort; two different keys that share the hashed bits only add candidates,
    and every candidate is checked on the full hash, so the result stays exact. Equal keys form
    runs, and every pair inside a run is a candidate (``_close_pairs_in_runs``).
    """
    n = len(hashes)
    index_bits = np.uint64(max(1, (n - 1).bit_length()))
    # In place: at 10^6 hashes each pass over the keys costs about as much as the sort.
    packed = np.bitwise_and(hashes, np.uint64(mask))
    packed *= _KEY_MULTIPLIER
    packed >>= index_bits  # keep the top key bits, make room for the index
    packed <<= index_bits
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & ((np.uint64(1) << index_bits) - np.uint64(1))).astype(np.int64)
    packed >>= index_bits  # the sorted keys
    sorted_hashes = hashes[order]
    starts = np.flatnonzero(np.r_[True, packed[1:] != packed[:-1]])
    lengths = np.diff(np.r_[starts, n])
    left_parts, right_parts = [], []
    n_candidates = 0
    for length in np.unique(lengths[lengths > 1]).tolist():
        run_starts = starts[lengths == length]
        n_candidates += len(run_starts) * length * (length - 1) // 2
        left, right = _close_pairs_in_runs(sorted_hashes, run_starts, length, threshold)
        left_parts.append(order[left])
        right_parts.append(order[right])
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, n_candidates
    left = np.concatenate(left_parts)
    right = np.concatenate(right_parts)
    return np.minimum(left, right), np.maximum(left, right), n_candidates


def _close_pairs_in_runs(
    sorted_hashes: np.ndarray, run_starts: np.ndarray, length: int, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Close pairs (sorted positions) inside runs that all have ``length`` hashes.

    The runs are laid out as columns (``length`` rows, one column per run) and member k is
    checked against member (k + d) mod ``length`` for d = 1 .. length // 2: every pair exactly
    once (at d = length / 2 only the first half of the rows, which the second half repeats).
    Each step is two numpy calls over a contiguous block, with no index array per candidate;
    close pairs are rare, so they are looked for only in a step whose minimum is close. Any
    length works in bounded memory (a block holds at least one run): runs of ~150 at 10^7
    random hashes, or thousands when many photos share one hash.
    """
    half = length // 2
    rows = np.r_[np.arange(length), np.arange(half)]  # row k + d of a column: member (k + d) % L
    columns = max(1, _BLOCK_ELEMENTS // length)
    left_parts, right_parts = [], []
    for first in range(0, len(run_starts), columns):
        block_starts = run_starts[first : first + columns]
        cyclic = sorted_hashes[rows[:, None] + block_starts]  # (length + half, runs)
        xor = np.empty((length, len(block_starts)), dtype=np.uint64)
        bit_counts = np.empty(xor.shape, dtype=np.uint8)
        for d in range(1, half + 1):
            k = length if 2 * d < length else half
            np.bitwise_xor(cyclic[d : d + k], cyclic[:k], out=xor[:k])
            np.bitwise_count(xor[:k], out=bit_counts[:k])
            if bit_counts[:k].min() > threshold:
                continue
            member, run = np.divmod(np.flatnonzero(bit_counts[:k] <= threshold), xor.shape[1])
            left_parts.append(block_starts[run] + member)
            right_parts.append(block_starts[run] + (member + d) % length)
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    return np.concatenate(left_parts), np.concatenate(right_parts)


#: Below this many hashes a table takes under a millisecond: threads would cost more than
#: they overlap.
_SEARCH_THREADS_MIN_HASHES = 20_000


@dataclass
class SearchStats:
    """What one search did: tables (masks) sorted and candidate pairs checked."""

    tables: int = 0
    candidates: int = 0


def _within_threshold(
    hashes: np.ndarray,
    threshold: int,
    bits: int,
    masks: Iterable[int] | None = None,
    stats: SearchStats | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of ``hashes`` within ``threshold`` bits, and their distances.

    Candidates are the pairs equal on some mask of ``search_masks`` (or ``masks``), checked
    with a popcount; exact, as every close pair shares at least one mask's bits. Tables are
    scanned in ``workers`` threads (the sort and the checks release the GIL).
    """
    n = len(hashes)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    masks = search_masks(threshold, bits, n) if masks is None else masks
    found = []
    threads = workers if n >= _SEARCH_THREADS_MIN_HASHES else 1
    tables = _map_in_threads(
        lambda mask: _close_pairs_in_table(hashes, mask, threshold), masks, threads
    )
    for i, j, n_candidates in tables:
        found.append(i * n + j)  # one int64 per pair, to drop pairs found in several tables
        if stats is not None:
            stats.tables += 1
            stats.candidates += n_candidates
    codes = np.unique(np.concatenate(found))
    i, j = np.divmod(codes, n)
    return i, j, _popcount(hashes[i] ^ hashes[j])


def find_near_duplicates(
    hashes: np.ndarray,
    threshold: int,
    flipped_hashes: np.ndarray | None = None,
    bits: int = HASH_BITS,
    stats: SearchStats | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Pairs of hashes within ``threshold`` Hamming distance: columns ``i < j, distance``.

    With ``flipped_hashes`` (the hashes of the mirror images), a pair also matches when one
    photo is close to the other's mirror image; ``distance`` is the smaller of the two.
    Exact (equal to brute force) and close to n log n for random hashes: see
    ``search_masks``; bench/dedup_scale.py times it up to 10^6 hashes. ``stats``, when given,
    is filled with the number of tables and candidate pairs. ``workers`` threads scan the
    tables (from 20,000 hashes; ~1.6x faster with 2 at 10^6 hashes, where memory bandwidth
    rather than the cores limits it).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if flipped_hashes is None:
        i, j, distance = _within_threshold(hashes, threshold, bits, stats=stats, workers=workers)
    else:
        flipped_hashes = np.ascontiguousarray(flipped_hashes, dtype=np.uint64)
        if flipped_hashes.shape != hashes.shape:
            raise ValueError("flipped_hashes must have the same shape as hashes")
        # Search originals and mirrors together; a stacked index k >= n is the mirror of k - n.
        a, b, distance = _within_threshold(
            np.concatenate([hashes, flipped_hashes]), threshold, bits, stats=stats, workers=workers
        )
        mirror_a, mirror_b = a >= n, b >= n
        a, b = a % n, b % n
        # Mirror vs mirror repeats original vs original; a photo vs its own mirror is no pair.
        keep = ~(mirror_a & mirror_b) & (a != b)
        i, j = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        distance = distance[keep]
    frame = pd.DataFrame({"i": i.astype(np.int64), "j": j.astype(np.int64), "distance": distance})
    frame = frame.groupby(["i", "j"], as_index=False, sort=True)["distance"].min()
    return frame.astype({"distance": np.int64})


# --------------------------------------------------------------------------- colour verification


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


# --------------------------------------------------------------------------- raw shards


def raw_shard_files(raw_dir: str | os.PathLike[str]) -> list[Path]:
    raw_dir = Path(raw_dir)
    files = sorted(raw_dir.glob(RAW_GLOB)) if raw_dir.is_dir() else []
    if not files:
        raise MissingInputError(
            f"No {RAW_GLOB} files in {raw_dir}: materialise `raw_images` "
            "(or run `carmodels scrape`) first."
        )
    return files


def read_raw_index(raw_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The ok images of the raw shards, without bytes: one row per URL (latest fetch wins).

    Columns: ``url, sha256, raw_shard, fetched_at`` + listing metadata (strings).
    """
    frames = []
    for path in raw_shard_files(raw_dir):
        # ParquetFile rather than pq.read_table: the latter imports pyarrow.dataset (0.1 s on
        # a first call) to read what is always one plain file here.
        with _unreadable_raw_shard(path):
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            missing = {"url", "outcome", "sha256", "fetched_at"} - set(schema.names)
            if missing:
                raise MissingColumnError(
                    f"Raw shard {path} lacks columns {sorted(missing)}; was it written by "
                    "`carmodels scrape`? Move it out of the folder."
                )
            columns = [name for name in schema.names if name != "image_bytes"]
            frame = parquet.read(columns=columns).to_pandas()
        frame["raw_shard"] = path.name
        frames.append(frame)
    raw = pd.concat(frames, ignore_index=True)
    raw["fetched_at"] = pd.to_datetime(raw["fetched_at"], utc=True)
    # Latest fetch per URL wins; ties broken by shard name and row so the result is stable.
    raw = raw.sort_values(["url", "fetched_at", "raw_shard"], kind="stable")
    raw = raw.drop_duplicates("url", keep="last")
    ok = raw[raw["outcome"] == "ok"]
    if ok["sha256"].isna().any():
        bad = ok[ok["sha256"].isna()].iloc[0]
        raise ShardsError(
            f"Raw shard {Path(raw_dir) / bad['raw_shard']} has an ok row without sha256 "
            f"({bad['url']}); move the shard away and run `carmodels scrape` again."
        )
    metadata = [c for c in ok.columns if c not in RAW_CORE_COLUMNS and c != "raw_shard"]
    out = ok[["url", "sha256", "raw_shard", "fetched_at", *metadata]].copy()
    for column in metadata:
        out[column] = out[column].astype("string")
    return out.sort_values("url", kind="stable").reset_index(drop=True)


def iter_raw_bytes(
    raw_dir: str | os.PathLike[str],
    wanted: Iterable[str],
    batch_rows: int,
    shard_names: Iterable[str] | None = None,
) -> Iterator[tuple[str, str, bytes]]:
    """(raw shard name, sha256, bytes) of ok rows whose sha256 is in ``wanted``, each sha once.

    Reads shard by shard and batch by batch, so memory holds one batch of bytes at a time.
    """
    remaining = set(wanted)
    paths = raw_shard_files(raw_dir)
    if shard_names is not None:
        names = set(shard_names)
        paths = [p for p in paths if p.name in names]
    wanted_array = pa.array(sorted(remaining), type=pa.string())
    for path in paths:
        if not remaining:
            return
        for batch in _raw_batches(path, batch_rows, ["sha256", "outcome", "image_bytes"]):
            selected = pc.and_(
                pc.equal(batch.column("outcome"), "ok"),
                pc.is_in(batch.column("sha256"), value_set=wanted_array),
            )
            batch = batch.filter(pc.fill_null(selected, False))
            for sha256, data in zip(
                batch.column("sha256").to_pylist(),
                batch.column("image_bytes").to_pylist(),
                strict=True,
            ):
                if sha256 in remaining and data is not None:
                    remaining.discard(sha256)
                    yield path.name, sha256, data


@contextlib.contextmanager
def _unreadable_raw_shard(path: Path) -> Iterator[None]:
    """Turn pyarrow's complaint about a damaged raw shard into an error naming it and the fix."""
    try:
        yield
    except pa.ArrowException as error:
        raise ShardsError(
            f"Raw shard {path} cannot be read ({one_line(error)}): it is truncated or not "
            "Parquet; move it out of the folder and run `carmodels scrape` again to refetch "
            "its images."
        ) from error


def _raw_batches(path: Path, batch_rows: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of a raw shard; a damaged page fails like a damaged footer."""
    with _unreadable_raw_shard(path):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


def _map_in_threads(
    fn: Callable[[_Item], _Result], chunks: Iterable[_Item], workers: int
) -> Iterator[_Result]:
    """``map(fn, chunks)`` in ``workers`` threads, in order, at most 2 * workers chunks ahead.

    For work whose numpy and decoding calls release the GIL (hashing inputs too small to pay
    for a process pool, the search's tables), so a second thread overlaps most of it at no
    start-up cost.
    """
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[_Result]] = deque()
        for chunk in chunks:
            pending.append(pool.submit(fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(items: Iterator[_HashTask], size: int) -> Iterator[list[_HashTask]]:
    chunk: list[_HashTask] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------- hash cache

_HASH_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("hash", pa.uint64()),
        ("hash_flipped", pa.uint64()),
        # ``colour_thumbnails`` as raw uint8 bytes, shape ``DedupConfig.thumbnail_shape``.
        ("thumbnails", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_bytes", pa.int64()),
        # False for bytes Pillow cannot decode (hashes and size are 0): cached too, so that a
        # broken file is not decoded again on every run.
        ("decodable", pa.bool_()),
    ]
)


def _read_hash_cache(path: Path, config: DedupConfig) -> pd.DataFrame:
    empty = _HASH_SCHEMA.empty_table().to_pandas()
    if not path.exists():
        return empty
    try:
        table = pq.ParquetFile(path).read()
    except pa.ArrowException:
        return empty  # a damaged cache only costs time: every image is hashed again
    spec = (table.schema.metadata or {}).get(_HASH_SPEC_KEY, b"").decode()
    if spec != config.hash_spec or set(table.schema.names) != set(_HASH_SCHEMA.names):
        return empty  # another hash function: every image is hashed again
    return table.to_pandas()


def _write_hash_cache(path: Path, hashes: pd.DataFrame, config: DedupConfig) -> None:
    table = pa.Table.from_pandas(
        hashes[_HASH_SCHEMA.names], schema=_HASH_SCHEMA, preserve_index=False
    )
    table = table.replace_schema_metadata({_HASH_SPEC_KEY: config.hash_spec.encode()})
    atomic_write_parquet(path, table)


def _hash_new_images(
    raw_dir: Path,
    index: pd.DataFrame,
    cached: pd.DataFrame,
    config: DedupConfig,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[pd.DataFrame, int]:
    """Hashes of every distinct sha256 in ``index`` (cache + new), and how many were hashed."""
    todo = sorted(set(index["sha256"]) - set(cached["sha256"]))
    total = len(todo)
    if on_progress:
        on_progress(0, total)
    rows: list[dict[str, object]] = []
    if todo:
        shard_of = index.drop_duplicates("sha256").set_index("sha256")["raw_shard"]
        tasks = (
            _HashTask(sha256, data)
            for _, sha256, data in iter_raw_bytes(
                raw_dir,
                todo,
                config.read_batch_rows,
                shard_names=set(shard_of.loc[todo]),
            )
        )
        processes = max(1, min(config.workers, total // config.min_images_per_worker))
        worker = functools.partial(_hash_chunk, config=config)
        chunks = _chunks(tasks, config.chunk_size)
        # Resampling weights are cached per photo size within a run, not across runs: a run
        # costs what it costs in a fresh process, and the cache does not outlive it.
        _lanczos_weights.cache_clear()
        _area_weights.cache_clear()
        # The hashing threads (or processes) are the parallelism: a BLAS thread pool behind
        # each of their small matrix products only adds hand-offs (2x the CPU, measured).
        with threadpool_limits(limits=1, user_api="blas"):
            if processes > 1:
                in_process = functools.partial(_hash_chunk_one_blas_thread, config=config)
                results = map_in_processes(in_process, chunks, processes)
            else:
                results = _map_in_threads(worker, chunks, config.workers)
            for chunk_rows in results:
                rows.extend(chunk_rows)
                if on_progress:
                    on_progress(len(rows), total)
    new = pd.DataFrame(rows, columns=_HASH_SCHEMA.names)
    if len(new):
        new = new.astype(
            {
                "hash": np.uint64,
                "hash_flipped": np.uint64,
                "width": np.int32,
                "height": np.int32,
                "n_bytes": np.int64,
                "decodable": bool,
            }
        )
    frames = [frame for frame in (cached, new) if len(frame)]
    hashes = pd.concat(frames, ignore_index=True) if frames else cached
    return hashes, len(new)


# --------------------------------------------------------------------------- clustering


def _cluster(images: pd.DataFrame, pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Cluster label per image (exact sha256 groups joined by near ``pairs``) and whether kept.

    ``images`` has one row per URL with ``sha256, url, pixels, n_bytes``; ``pairs`` indexes the
    distinct sha256 values in order of first appearance in ``images``.
    """
    n = len(images)
    sha_codes, _ = pd.factorize(images["sha256"])
    # Graph over URLs: every URL is linked to the first URL with its sha256 (exact duplicates),
    # and the representatives of two distinct sha256 values are linked by a near pair.
    first_of_sha = pd.Series(np.arange(n)).groupby(sha_codes).transform("first").to_numpy()
    representative = np.asarray(pd.Series(np.arange(n)).groupby(sha_codes).first())
    rows = np.concatenate([np.arange(n), representative[pairs["i"].to_numpy()]])
    cols = np.concatenate([first_of_sha, representative[pairs["j"].to_numpy()]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Best member first: most pixels, then the largest file, then the smallest URL.
    ranking = images.assign(label=labels).sort_values(
        ["label", "pixels", "n_bytes", "url"], ascending=[True, False, False, True], kind="stable"
    )
    kept = np.zeros(n, dtype=bool)
    kept[ranking.drop_duplicates("label").index.to_numpy()] = True
    return labels, kept


def _relabel_by_size(labels: np.ndarray, kept_urls: pd.Series) -> np.ndarray:
    """Cluster ids 0.. ordered by size (largest first), ties by the kept image's URL."""
    frame = pd.DataFrame({"label": labels, "kept_url": kept_urls})
    summary = frame.groupby("label").agg(size=("label", "size"), url=("kept_url", "first"))
    summary = summary.sort_values(["size", "url"], ascending=[False, True], kind="stable")
    new_id = pd.Series(np.arange(len(summary)), index=summary.index)
    return new_id.loc[labels].to_numpy()


# --------------------------------------------------------------------------- main entry


def deduplicate(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: DedupConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DedupResult:
    """Find exact and near duplicates in ``raw_dir`` and write the kept-image index to ``out_dir``.

    Writes ``unique.parquet`` (one row per kept image), ``clusters.parquet`` (members of
    clusters with more than one image), ``hashes.parquet`` (hash cache for the next run) and
    ``clusters.png`` (contact sheet of the largest clusters). ``on_progress(done, total)``
    counts images hashed in this run.
    """
    config = config or DedupConfig()
    started = time.monotonic()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    index = read_raw_index(raw_dir)
    if index.empty:
        # Raised before anything is written, so an earlier unique.parquet stays as it was.
        raise InputError(
            f"The raw shards in {raw_dir} hold no successfully fetched image (outcome 'ok'); "
            "run `carmodels scrape` again (its outcome counts say why the fetches failed)."
        )
    cached = _read_hash_cache(out_dir / HASHES_FILE, config)
    hashes, n_hashed = _hash_new_images(raw_dir, index, cached, config, on_progress)
    _write_hash_cache(out_dir / HASHES_FILE, hashes, config)

    decodable = hashes[hashes["decodable"]].drop(columns="decodable")
    images = index.merge(decodable, on="sha256", how="inner", validate="many_to_one")
    undecodable_by_reason = _undecodable_by_reason(index, hashes)
    n_undecodable = len(index) - len(images)
    if images.empty:
        raise InputError(
            f"None of the {len(index)} fetched images in {raw_dir} decodes "
            f"({undecodable_by_reason}); check what the scraped URLs serve."
        )
    images = images.sort_values("url", kind="stable").reset_index(drop=True)
    images["pixels"] = images["width"].astype(np.int64) * images["height"].astype(np.int64)

    distinct = images.drop_duplicates("sha256")  # factorize order == first appearance
    pairs = find_near_duplicates(
        distinct["hash"].to_numpy(np.uint64),
        config.threshold,
        distinct["hash_flipped"].to_numpy(np.uint64) if config.flip_aware else None,
        bits=config.hash_bits,
        workers=config.workers,
    )
    if config.verify_colour:
        pairs = verify_pairs(pairs, stack_thumbnails(distinct["thumbnails"], config), config)
    labels, kept = _cluster(images, pairs)
    kept_row_of_label = pd.Series(np.flatnonzero(kept), index=labels[kept])
    kept_row = kept_row_of_label.loc[labels].to_numpy()
    images["cluster_id"] = _relabel_by_size(
        labels, images["url"].iloc[kept_row].reset_index(drop=True)
    )
    images["cluster_size"] = images.groupby("cluster_id")["url"].transform("size").astype(np.int32)
    images["kept"] = kept
    images["phash"] = [hash_to_hex(h) for h in images["hash"]]
    images["phash_flipped"] = [hash_to_hex(h) for h in images["hash_flipped"]]

    # Relation of each member to its cluster's kept image.
    kept_hash = images["hash"].to_numpy(np.uint64)[kept_row]
    distance = _popcount(images["hash"].to_numpy(np.uint64) ^ kept_hash)
    if config.flip_aware:
        kept_flipped = images["hash_flipped"].to_numpy(np.uint64)[kept_row]
        distance = np.minimum(
            distance, _popcount(kept_flipped ^ images["hash"].to_numpy(np.uint64))
        )
    same_bytes = images["sha256"].to_numpy() == images["sha256"].to_numpy()[kept_row]
    images["distance"] = np.where(same_bytes, 0, distance).astype(np.int32)
    images["kind"] = np.where(kept, None, np.where(same_bytes, "exact", "near"))

    metadata = [c for c in index.columns if c not in ("url", "sha256", "raw_shard", "fetched_at")]
    unique = images[images["kept"]].sort_values(["cluster_id", "url"], kind="stable")
    unique_table = pa.Table.from_pandas(
        unique[[*UNIQUE_CORE_COLUMNS, "phash_flipped", "n_bytes", "fetched_at", *metadata]].astype(
            {"width": np.int32, "height": np.int32, "cluster_id": np.int64}
        ),
        preserve_index=False,
    )
    unique_path = atomic_write_parquet(out_dir / UNIQUE_FILE, unique_table)

    members = images[images["cluster_size"] > 1].sort_values(
        ["cluster_id", "kept", "distance", "url"],
        ascending=[True, False, True, True],
        kind="stable",
    )
    clusters_table = pa.Table.from_pandas(
        members[["cluster_id", "sha256", "url", "kept", "kind", "distance"]].astype(
            {"cluster_id": np.int64}
        ),
        schema=pa.schema(
            [
                ("cluster_id", pa.int64()),
                ("sha256", pa.string()),
                ("url", pa.string()),
                ("kept", pa.bool_()),
                ("kind", pa.string()),
                ("distance", pa.int32()),
            ]
        ),
        preserve_index=False,
    )
    clusters_path = atomic_write_parquet(out_dir / CLUSTERS_FILE, clusters_table)

    contact_sheet_path = None
    if len(members):
        contact_sheet_path = write_contact_sheet(
            raw_dir, members, out_dir / CONTACT_SHEET_FILE, config
        )
    else:
        (out_dir / CONTACT_SHEET_FILE).unlink(missing_ok=True)  # stale sheet of a past run

    sizes = images.groupby("cluster_id").size()
    histogram = {int(size): int(count) for size, count in sizes.value_counts().sort_index().items()}
    kinds = images["kind"].value_counts()
    return DedupResult(
        n_input=len(index),
        n_kept=int(kept.sum()),
        n_exact_duplicates=int(kinds.get("exact", 0)),
        n_near_duplicates=int(kinds.get("near", 0)),
        n_clusters=int((sizes > 1).sum()),
        cluster_size_histogram=histogram,
        unique_path=unique_path,
        clusters_path=clusters_path,
        contact_sheet_path=contact_sheet_path,
        elapsed_s=time.monotonic() - started,
        n_undecodable=n_undecodable,
        undecodable_by_reason=undecodable_by_reason,
        n_hashed=n_hashed,
    )


def _undecodable_by_reason(index: pd.DataFrame, hashes: pd.DataFrame) -> dict[str, int]:
    """Ok rows of ``index`` that are not images, by reason (see ``DedupResult``).

    A sha256 hashed as not decodable is a ``decode_error``; one that never reached hashing had
    no bytes to hash (``iter_raw_bytes`` skips null ``image_bytes``): ``no_bytes``.
    """
    decodable_by_sha = hashes.drop_duplicates("sha256").set_index("sha256")["decodable"]
    decodable = index["sha256"].map(decodable_by_sha)
    counts = {
        "decode_error": int(decodable.eq(False).sum()),  # NaN (never hashed) is not False
        "no_bytes": int(decodable.isna().sum()),
    }
    return {reason: n for reason, n in counts.items() if n}


# --------------------------------------------------------------------------- contact sheet

_KEPT_COLOUR = (40, 170, 60)
_DROPPED_COLOUR = (210, 50, 50)
_BORDER_PX = 4
_LABEL_PX = 14
_CAPTION_PX = 90


def _contact_thumbnail(data: bytes, side: int) -> Image.Image | None:
    """The photo shrunk to fit ``side`` x ``side``; None if it does not decode.

    JPEGs decode at the smallest DCT scale that still covers the thumbnail: a wide listing
    photo (640 x 270) asked for a square draft of twice the side was decoded at full size.
    """
    try:
        width, height = Image.open(io.BytesIO(data)).size  # header only; EXIF turns both alike
        longest = max(width, height, 1)
        draft = (max(1, side * width // longest), max(1, side * height // longest))
        thumb = decode_image(data, draft_size=draft)
    except (ImageDecodeError, OSError):
        return None
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumb


def write_contact_sheet(
    raw_dir: Path, members: pd.DataFrame, path: Path, config: DedupConfig
) -> Path:
    """One row per largest cluster: kept image first (green border), duplicates (red) after.

    ``members`` are the rows of ``clusters.parquet`` (sorted kept first), plus ``raw_shard``.
    """
    top_ids = members["cluster_id"].drop_duplicates().head(config.contact_sheet_clusters)
    shown = (
        members[members["cluster_id"].isin(top_ids)]
        .groupby("cluster_id", sort=True)
        .head(config.contact_sheet_members)
    )
    shown_bytes = iter_raw_bytes(
        raw_dir, set(shown["sha256"]), config.read_batch_rows, set(shown["raw_shard"])
    )
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        decoded = pool.map(
            lambda item: (item[1], _contact_thumbnail(item[2], config.thumbnail_px)), shown_bytes
        )
        thumbs = {sha256: thumb for sha256, thumb in decoded if thumb is not None}

    cell = config.thumbnail_px + 2 * _BORDER_PX
    row_height = cell + _LABEL_PX
    shown_per_cluster = shown["cluster_id"].value_counts()
    cluster_sizes = members["cluster_id"].value_counts()
    # As wide as the longest row shown: clusters of two get a narrow sheet, not a mostly
    # white one (which also took 4x longer to PNG-encode).
    sheet = Image.new(
        "RGB",
        (_CAPTION_PX + cell * int(shown_per_cluster.max()), row_height * len(shown_per_cluster)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for row, (cluster_id, group) in enumerate(shown.groupby("cluster_id", sort=True)):
        top = row * row_height
        size = int(cluster_sizes[cluster_id])
        draw.text((4, top + cell // 2 - 10), f"cluster {cluster_id}\n{size} images", fill="black")
        for column, member in enumerate(group.itertuples()):
            left = _CAPTION_PX + column * cell
            colour = _KEPT_COLOUR if member.kept else _DROPPED_COLOUR
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
            thumb = thumbs.get(member.sha256)
            if thumb is not None:
                offset_x = left + _BORDER_PX + (config.thumbnail_px - thumb.width) // 2
                offset_y = top + _BORDER_PX + (config.thumbnail_px - thumb.height) // 2
                sheet.paste(thumb, (offset_x, offset_y))
            label = "kept" if member.kept else f"{member.kind} d={member.distance}"
            draw.text((left + 2, top + cell), label, fill="black")
    # zlib level 1: a third of the default level's time for a few percent more bytes on a
    # sheet that is looked at, not archived.
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG", compress_level=1))
