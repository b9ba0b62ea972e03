"""The duplicate search's settings, apart from the stage so that every dedup module can name
them without importing the stage that runs it."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Perceptual hashes `imagehash` offers; `phash` is the one tuned and benchmarked.
HASH_METHODS = ("phash", "dhash", "whash", "colorhash")
#: Bits of one hash: the search packs each into a 64-bit integer.
HASH_BITS = 64
#: Layout version of ``hashes.parquet`` (see ``cache.py``); part of ``DedupConfig.cache_key``,
#: so a cache written by an older version (v1 had no thumbnails) is hashed again rather than
#: misread.
HASH_CACHE_VERSION = 3


@dataclass(frozen=True)
class DedupConfig:
    """Settings of the duplicate search."""

    hash_method: str = field(
        default="phash",
        metadata={
            "help": "perceptual hash: phash (DCT; robust to re-encoding and resizing), dhash, "
            "whash or colorhash (colour histogram; hash_size <= 4 to fit 64 bits)",
            "choices": HASH_METHODS,
        },
    )
    #: imagehash ``hash_size`` (``binbits`` for colorhash); the hash must fit in 64 bits.
    hash_size: int = 8
    # 10: every planted copy kept, no false pair after the colour check; 12 adds only heavy
    # crops, at ~2x the search time (docs/benchmarks/dedup.md).
    threshold: int = field(
        default=10,
        metadata={
            "help": "largest Hamming distance between two hashes that makes a candidate pair "
            "(the colour check then confirms or rejects it)"
        },
    )
    flip_aware: bool = field(
        default=True,
        metadata={
            "help": "count a mirrored copy as a duplicate (each photo is also compared with "
            "the mirror images of the others)"
        },
    )
    #: Confirm every hash candidate with the colour thumbnails (False: the hash alone decides,
    #: and ``threshold`` should then be 6, its limit without the check: docs/benchmarks/dedup.md).
    verify_colour: bool = True
    #: Side of the colour thumbnail, in cells (each cell is the mean RGB of its area). 8x8 was
    #: as discriminating as 16x16 and more tolerant of crops (cells move less).
    colour_grid: int = 8
    #: Crops (fraction cut from every side) at which thumbnails are stored. Two photos are
    #: compared at every pairing of one photo's crop with the other's full frame, so a copy
    #: cropped by up to the largest crop (and in between) lines up with its original.
    colour_crops: tuple[float, ...] = (0.0, 0.015, 0.03)
    #: Largest mean per-cell RGB distance (Euclidean, 0-255 scale, best crop pairing, mirror
    #: tried when flip_aware) between the thumbnails of a near-duplicate pair.
    #: 6.5 sits between the planted copies (max 5.6) and the hardest false candidate, one drawn
    #: car painted grey vs blue (7.0 to 9.5) (docs/benchmarks/dedup.md).
    max_colour_distance: float = 6.5
    #: Candidate pairs verified per numpy batch (bounds memory: a few KB per pair).
    verify_batch_pairs: int = 65536
    #: Processes (threads below ``min_images_per_worker``) hashing images, and threads
    #: scanning the near-neighbour search's tables.
    workers: int = 2
    #: New images per worker process below which fewer processes are started (none: hashing
    #: in ``workers`` threads of this process instead).
    #: 2000: a photo costs ~1 ms to hash, a worker pool 2-5 s to start (docs/benchmarks/dedup.md).
    min_images_per_worker: int = 2000
    #: Images per task sent to a worker (large enough to amortise pickling overhead).
    chunk_size: int = 64
    #: Rows read from a raw shard at a time; bounds memory to a few batches of image bytes.
    read_batch_rows: int = 256
    #: JPEGs are decoded at a reduced scale (DCT scaling) at least this large: phash works on
    #: 32 px and the colour cells on 8.
    #: 64: ~1 ms a photo (256 px: ~11 ms); 32 px blurred crops past ``max_colour_distance``
    #: (docs/benchmarks/dedup.md).
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
