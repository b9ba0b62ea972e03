"""Remove exact and near-duplicate photos from the raw shards (the ``unique_images`` asset).

Listing sites repost the same photo under many URLs, re-encoded, resized, slightly cropped or
mirrored. Exact copies share a sha256; the others are found with a 64-bit perceptual hash
(``imagehash``) and a Hamming-distance threshold, then confirmed by a colour thumbnail:

1. Index the raw shards (no bytes): per URL the latest fetch wins; ``outcome == "ok"`` rows are
   the images.
2. Hash each distinct sha256 once, in a process pool, reading image bytes batch by batch, and
   keep a tiny RGB thumbnail of it (``colour_thumbnails``). Hashes and thumbnails are cached
   in ``hashes.parquet`` keyed by sha256, so a later run over grown raw shards hashes only
   the new photos.
3. Candidate pairs by multi-index hashing (``find_near_duplicates``), optionally also between
   a photo and the mirror image of another. A phash sees only the grey-level layout, so two
   different cars shot in the same plain studio booth hash alike; each candidate is kept only
   when the thumbnails agree too (``colour_distances``, vectorised over all candidates).
4. Connected components of exact + near pairs are the clusters; each keeps its best member
   (most pixels, then the largest file, then the smallest URL so that ties are deterministic).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from carmodels.imaging import ImageDecodeError, decode_image, decode_with_size, map_in_processes
from carmodels.io import atomic_save_image, atomic_write_parquet
from carmodels.scrape.raw import RAW_COLUMNS, RAW_SHARD_GLOB, THUMBNAIL_FIELD

if TYPE_CHECKING:
    import imagehash

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
HASH_CACHE_VERSION = 2


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
    #: photos of cars-sample plus planted copies of 150 of them (256px draft decode, as here),
    #: share of copies within 6 / 8 / 10 / 12 bits of their original:
    #: - q60 re-encode, resized to 80% and back, mirrored (flip-aware): 100% at 6 (max 2);
    #: - cropped by 3% of each dimension (1.5% a side): 83% / 98% / 99.3% / 100%;
    #: - cropped by 3% a side: 28% / 49% / 75% / 93%.
    #: Without verification 6 was the limit (cars-sample: 1 false pair at 6, 18 at 8, 269 at 10;
    #: demo catalog, 300 listings: 58 false candidates at 6, all studio shots). With it, 10
    #: keeps every planted pair and no false one (see ``max_colour_distance``); 12 gains only
    #: the heavy crops and costs ~2x the search time (candidates grow fast past 10).
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
    #: precision 0.85; at 6: recall 0.979 (1.5%-a-side crops 0.96).
    max_colour_distance: float = 6.5
    #: Candidate pairs verified per numpy batch (bounds memory: a few KB per pair).
    verify_batch_pairs: int = 65536
    #: Processes hashing images.
    workers: int = 2
    #: Images per task sent to a worker (large enough to amortise pickling overhead).
    chunk_size: int = 64
    #: Rows read from a raw shard at a time; bounds memory to a few batches of image bytes.
    read_batch_rows: int = 256
    #: JPEGs are decoded at a reduced scale at least this large (hashes work on 32px or less).
    decode_draft_px: int = 256
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
        if self.workers < 1 or self.chunk_size < 1 or self.read_batch_rows < 1:
            raise ValueError("DedupConfig.workers, chunk_size and read_batch_rows must be >= 1")
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
    #: "ok" rows whose bytes Pillow cannot decode (left out of ``unique.parquet``).
    n_undecodable: int = 0
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


def image_hashes(img: Image.Image, method: str, hash_size: int) -> tuple[int, int]:
    """(hash, hash of the mirror image) of a decoded image."""
    # Imported here so that modules which only read dedup's outputs (shards, the trainer on a
    # GPU machine) do not need imagehash installed.
    import imagehash

    function = getattr(imagehash, method)
    mirror = ImageOps.mirror(img)
    return (
        _imagehash_to_int(function(img, hash_size)),
        _imagehash_to_int(function(mirror, hash_size)),
    )


def colour_thumbnails(img: Image.Image, grid: int, crops: Iterable[float]) -> np.ndarray:
    """Mean-RGB thumbnails (``grid`` x ``grid`` cells) of ``img`` cut by each of ``crops``.

    Shape (len(crops), grid, grid, 3), uint8. The crop is the fraction removed from every side;
    the BOX filter averages exactly the pixels under each cell. The mirror image's thumbnail is
    this one flipped left to right (the crops are symmetric), so it is not stored.
    """
    width, height = img.size
    thumbs = [
        np.asarray(
            img.resize(
                (grid, grid),
                Image.Resampling.BOX,
                box=(width * crop, height * crop, width * (1 - crop), height * (1 - crop)),
            ),
            dtype=np.uint8,
        )
        for crop in crops
    ]
    return np.stack(thumbs)


@dataclass(frozen=True)
class _HashTask:
    sha256: str
    data: bytes


def _hash_chunk(tasks: list[_HashTask], config: DedupConfig) -> list[dict[str, object]]:
    """Worker: hash a chunk of images; undecodable ones get null hashes."""
    draft = (config.decode_draft_px, config.decode_draft_px)
    rows = []
    for task in tasks:
        row: dict[str, object] = {"sha256": task.sha256, "n_bytes": len(task.data)}
        try:
            # The size is the full-resolution, EXIF-oriented one: "most pixels" must compare
            # the originals, not the drafts JPEG decoding shrank by powers of two.
            img, width, height = decode_with_size(task.data, draft_size=draft)
            hash_value, flipped = image_hashes(img, config.hash_method, config.hash_size)
            thumbnails = colour_thumbnails(img, config.colour_grid, config.colour_crops)
            row.update(
                hash=hash_value,
                hash_flipped=flipped,
                thumbnails=thumbnails.tobytes(),
                width=width,
                height=height,
                decodable=True,
            )
        except ImageDecodeError:
            row.update(hash=0, hash_flipped=0, thumbnails=b"", width=0, height=0, decodable=False)
        rows.append(row)
    return rows


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


def _pairs_with_equal_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) with ``keys[i] == keys[j]``, vectorised per offset in the group.

    After a stable sort, a group of equal keys is a run; pairing each position with the one
    ``d`` places later for d = 1, 2, ... (only where both lie in the same run) enumerates every
    pair exactly once, and the active set shrinks as d outgrows the small runs, so the total
    work is the number of pairs.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    n = len(keys)
    if n < 2:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_lengths = np.diff(np.r_[starts, n])
    run_end = np.repeat(starts + run_lengths, run_lengths)  # exclusive end of each position's run
    left_parts, right_parts = [], []
    active = np.flatnonzero(run_end - np.arange(n) > 1)  # positions with a later run member
    d = 1
    while len(active):
        partner = active + d
        within = partner < run_end[active]
        active, partner = active[within], partner[within]
        left_parts.append(order[active])
        right_parts.append(order[partner])
        d += 1
    if not left_parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    left = np.concatenate(left_parts)
    right = np.concatenate(right_parts)
    return np.minimum(left, right), np.maximum(left, right)


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(values).astype(np.int64)


def _within_threshold(
    hashes: np.ndarray, threshold: int, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of ``hashes`` within ``threshold`` bits, by multi-index hashing.

    Split the hash into ``threshold + 1`` bands: two hashes differing in at most ``threshold``
    bits cannot differ in every band (pigeonhole), so each such pair shares at least one band
    value exactly. Candidates are pairs equal on some band; they are verified with a popcount.
    """
    n_bands = min(threshold + 1, bits)
    seen: list[np.ndarray] = []
    for shift, width in _band_layout(n_bands, bits):
        keys = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        i, j = _pairs_with_equal_keys(keys)
        distance = _popcount(hashes[i] ^ hashes[j])
        close = distance <= threshold
        # Encode each pair as one int64 to deduplicate pairs found in several bands.
        seen.append(i[close] * len(hashes) + j[close])
    codes = np.unique(np.concatenate(seen)) if seen else np.empty(0, dtype=np.int64)
    i, j = np.divmod(codes, len(hashes))
    return i, j, _popcount(hashes[i] ^ hashes[j])


def find_near_duplicates(
    hashes: np.ndarray,
    threshold: int,
    flipped_hashes: np.ndarray | None = None,
    bits: int = HASH_BITS,
) -> pd.DataFrame:
    """Pairs of hashes within ``threshold`` Hamming distance: columns ``i < j, distance``.

    With ``flipped_hashes`` (the hashes of the mirror images), a pair also matches when one
    photo is close to the other's mirror image; ``distance`` is the smaller of the two.
    Sub-quadratic for small thresholds (see ``_within_threshold``); equal to brute force.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if flipped_hashes is None:
        i, j, distance = _within_threshold(hashes, threshold, bits)
    else:
        flipped_hashes = np.ascontiguousarray(flipped_hashes, dtype=np.uint64)
        if flipped_hashes.shape != hashes.shape:
            raise ValueError("flipped_hashes must have the same shape as hashes")
        # Search originals and mirrors together; a stacked index k >= n is the mirror of k - n.
        a, b, distance = _within_threshold(
            np.concatenate([hashes, flipped_hashes]), threshold, bits
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
        raise FileNotFoundError(
            f"No {RAW_GLOB} files in {raw_dir}: materialise `raw_images` "
            "(or run `carmodels download`) first."
        )
    return files


def read_raw_index(raw_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """The ok images of the raw shards, without bytes: one row per URL (latest fetch wins).

    Columns: ``url, sha256, raw_shard, fetched_at`` + listing metadata (strings).
    """
    frames = []
    for path in raw_shard_files(raw_dir):
        schema = pq.read_schema(path)
        missing = {"url", "outcome", "sha256", "fetched_at"} - set(schema.names)
        if missing:
            raise ValueError(
                f"Raw shard {path} lacks columns {sorted(missing)}; was it written by "
                "`carmodels download`?"
            )
        columns = [name for name in schema.names if name != "image_bytes"]
        frame = pq.read_table(path, columns=columns).to_pandas()
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
        raise ValueError(
            f"Raw shard {bad['raw_shard']} has an ok row without sha256 ({bad['url']}); "
            "re-run the download."
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
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(
            batch_size=batch_rows, columns=["sha256", "outcome", "image_bytes"]
        ):
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
    table = pq.read_table(path)
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
        workers = config.workers if total > config.chunk_size else 1
        worker = functools.partial(_hash_chunk, config=config)
        for chunk_rows in map_in_processes(worker, _chunks(tasks, config.chunk_size), workers):
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
    cached = _read_hash_cache(out_dir / HASHES_FILE, config)
    hashes, n_hashed = _hash_new_images(raw_dir, index, cached, config, on_progress)
    _write_hash_cache(out_dir / HASHES_FILE, hashes, config)

    decodable = hashes[hashes["decodable"]].drop(columns="decodable")
    images = index.merge(decodable, on="sha256", how="inner", validate="many_to_one")
    n_undecodable = len(index) - len(images)
    images = images.sort_values("url", kind="stable").reset_index(drop=True)
    images["pixels"] = images["width"].astype(np.int64) * images["height"].astype(np.int64)

    distinct = images.drop_duplicates("sha256")  # factorize order == first appearance
    pairs = find_near_duplicates(
        distinct["hash"].to_numpy(np.uint64),
        config.threshold,
        distinct["hash_flipped"].to_numpy(np.uint64) if config.flip_aware else None,
        bits=config.hash_bits,
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
        n_hashed=n_hashed,
    )


# --------------------------------------------------------------------------- contact sheet

_KEPT_COLOUR = (40, 170, 60)
_DROPPED_COLOUR = (210, 50, 50)
_BORDER_PX = 4
_LABEL_PX = 14


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
    thumbs: dict[str, Image.Image] = {}
    draft = (config.thumbnail_px * 2, config.thumbnail_px * 2)
    for _, sha256, data in iter_raw_bytes(
        raw_dir, set(shown["sha256"]), config.read_batch_rows, set(shown["raw_shard"])
    ):
        try:
            thumb = decode_image(data, draft_size=draft)
        except ImageDecodeError:
            continue
        thumb.thumbnail((config.thumbnail_px, config.thumbnail_px), Image.Resampling.LANCZOS)
        thumbs[sha256] = thumb

    cell = config.thumbnail_px + 2 * _BORDER_PX
    row_height = cell + _LABEL_PX
    caption_width = 90
    n_rows = shown["cluster_id"].nunique()
    sheet = Image.new(
        "RGB",
        (caption_width + cell * config.contact_sheet_members, row_height * n_rows),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for row, (cluster_id, group) in enumerate(shown.groupby("cluster_id", sort=True)):
        top = row * row_height
        size = int(members.loc[members["cluster_id"] == cluster_id].shape[0])
        draw.text((4, top + cell // 2 - 10), f"cluster {cluster_id}\n{size} images", fill="black")
        for column, member in enumerate(group.itertuples()):
            left = caption_width + column * cell
            colour = _KEPT_COLOUR if member.kept else _DROPPED_COLOUR
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
            thumb = thumbs.get(member.sha256)
            if thumb is not None:
                offset_x = left + _BORDER_PX + (config.thumbnail_px - thumb.width) // 2
                offset_y = top + _BORDER_PX + (config.thumbnail_px - thumb.height) // 2
                sheet.paste(thumb, (offset_x, offset_y))
            label = "kept" if member.kept else f"{member.kind} d={member.distance}"
            draw.text((left + 2, top + cell), label, fill="black")
    return atomic_save_image(path, sheet)
