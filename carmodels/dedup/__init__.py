"""Remove exact and near-duplicate photos from the raw shards (the ``unique_images`` asset).

Listing sites repost the same photo under many URLs, re-encoded, resized, slightly cropped or
mirrored. Exact copies share a sha256; the others are found with a 64-bit perceptual hash
(``imagehash``) and a Hamming-distance threshold, then confirmed by a colour thumbnail:

1. Index the raw shards (no bytes): per URL the latest fetch wins; ``outcome == "ok"`` rows are
   the images.
2. Hash each distinct sha256 once (from a 64 px JPEG draft, ``decode_draft``; in threads, or
   a process pool when there are thousands), reading image bytes batch by batch, and keep a
   tiny RGB thumbnail of it (``colour_thumbnails``). Hashes and thumbnails are cached
   in ``hashes.parquet`` keyed by sha256, so a later run over grown raw shards hashes only the
   new photos.
3. Candidate pairs by an exact multi-index search (``find_near_duplicates``, tables chosen by
   ``search_masks``), optionally also between a photo and the mirror image of another. A
   phash sees only the grey-level layout, so two different cars shot in the same plain
   studio booth hash alike; each candidate is kept only when the thumbnails agree too
   (``colour_distances``, vectorised over all candidates).
4. Connected components of exact + near pairs are the clusters; each keeps its best member
   (most pixels, then the largest file, then the smallest URL so that ties are deterministic).

One module per step: ``carmodels.scrape.raw`` (reading the raw shards, step 1), ``hashing``
and ``cache`` (step 2), ``search`` and ``verify`` (step 3), ``cluster`` (step 4), then
``contact_sheet``; ``config`` holds ``DedupConfig``, ``stage`` ``DedupResult`` and
``deduplicate``, which runs them in order, and ``schema`` the names of the outputs.

A partitioned ingest (one raw folder per partition) is deduplicated by
``deduplicate_incremental`` (``incremental``): one output over every partition, where each run
hashes and decides only the photos it has not decided before, searching them against the kept
images only; its module docstring states the rule and what it guarantees against
``deduplicate`` of everything at once. ``record`` keeps what was decided, ``sources`` maps
partitions to their raw folders. The public
names below are imported on first use (PEP 562), so that ``carmodels.dedup.schema``, which
readers of the outputs such as ``carmodels.shards`` import, does not load the stage (scipy,
OpenCV, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name → the module defining it (relative: a submodule of this package).
_EXPORTS = {
    "CLUSTERS_FILE": ".schema",
    "CONTACT_SHEET_FILE": ".schema",
    "HASHES_FILE": ".schema",
    "UNIQUE_CORE_COLUMNS": ".schema",
    "UNIQUE_FILE": ".schema",
    "HASH_METHODS": ".config",
    "colour_thumbnails": ".hashing",
    "hash_to_hex": ".hashing",
    "hex_to_hash": ".hashing",
    "image_hashes": ".hashing",
    "phash_batch": ".hashing",
    "phash_distance": ".hashing",
    "phash_pair": ".hashing",
    "phash_pixels": ".hashing",
    "HASH_CACHE_VERSION": ".config",
    "HASH_BITS": ".config",
    "SearchStats": ".search",
    "find_near_duplicates": ".search",
    "find_near_duplicates_between": ".search",
    "search_masks": ".search",
    "colour_distances": ".verify",
    "stack_thumbnails": ".verify",
    "verify_pairs": ".verify",
    "write_contact_sheet": ".contact_sheet",
    "DedupConfig": ".config",
    "DedupResult": ".stage",
    "deduplicate": ".stage",
    "IncrementalDedupResult": ".incremental",
    "deduplicate_incremental": ".incremental",
    "PARTITION_COLUMN": ".schema",
    "RECORD_FILE": ".schema",
    "partition_dirs": ".sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
