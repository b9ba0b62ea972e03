"""What a shard build reads: the dedup stage's kept images and their photos, normalised.

The input side of :func:`carmodels.shards.build_shards`, kept apart from the shard format:

- ``read_index``: ``unique.parquet`` of a dedup output folder, checked, one row per image;
- ``normalised_chunks``: the photos' bytes read from the raw shards and put through
  ``imaging.normalise_keyed``, chunk by chunk, in worker processes for large sets.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa

from carmodels.dedup.schema import UNIQUE_CORE_COLUMNS, UNIQUE_FILE
from carmodels.errors import (
    InputError,
    MissingColumnError,
    MissingInputError,
    ShardsError,
    one_line,
)
from carmodels.imaging import ImagingConfig, NormalisedImage, Rejection, normalise_keyed
from carmodels.parallel import chunked, map_in_processes
from carmodels.scrape.raw import iter_raw_bytes

#: Columns ``unique.parquet`` holds for dedup's own use, not listing metadata.
_DEDUP_COLUMNS = (*UNIQUE_CORE_COLUMNS, "phash_flipped", "n_bytes", "fetched_at")


@dataclass(frozen=True)
class ShardIndex:
    """The images to shard: ``unique.parquet`` and its rows by sha256 (one per image)."""

    unique: pd.DataFrame
    rows_by_sha: pd.DataFrame
    #: Listing metadata columns, copied into the shards as strings.
    metadata_columns: list[str]

    @property
    def n_images(self) -> int:
        return len(self.rows_by_sha)


def read_index(unique_dir: Path) -> ShardIndex:
    """The index of a dedup output folder, checked before any shard is written."""
    unique = _read_unique(unique_dir)
    metadata_columns = [c for c in unique.columns if c not in _DEDUP_COLUMNS]
    rows_by_sha = unique.drop_duplicates("sha256").set_index("sha256", drop=False)
    return ShardIndex(unique, rows_by_sha, metadata_columns)


def _read_unique(unique_dir: Path) -> pd.DataFrame:
    """``unique.parquet`` of a dedup output folder, checked before any shard is written."""
    unique_path = unique_dir / UNIQUE_FILE
    if not unique_path.exists():
        raise MissingInputError(
            f"No {UNIQUE_FILE} in {unique_dir}: materialise `unique_images` "
            "(or run `carmodels dedup`) first."
        )
    try:
        unique = pd.read_parquet(unique_path)
    except pa.ArrowException as error:
        raise ShardsError(
            f"{unique_path} cannot be read ({one_line(error)}); run `carmodels dedup` again "
            "to rewrite it."
        ) from error
    missing = {"sha256", "url", "raw_shard", "phash"} - set(unique.columns)
    if missing:
        raise MissingColumnError(
            f"{unique_path} lacks columns {sorted(missing)}; run `carmodels dedup` again to "
            "rewrite it."
        )
    if unique.empty:
        raise InputError(
            f"{unique_path} lists no images, so there is nothing to shard; run `carmodels "
            "dedup` on raw shards that hold fetched images."
        )
    return unique


def normalised_chunks(
    index: ShardIndex,
    raw_dir: str | os.PathLike[str],
    imaging: ImagingConfig,
    mirror_sources: tuple[str, ...],
    read_batch_rows: int,
    chunk_size: int,
    workers: int,
) -> Iterator[list[tuple[str, NormalisedImage | Rejection]]]:
    """``(sha256, normalised image or rejection)`` chunks, in order, for every indexed image
    found in ``raw_dir`` (those not found are left out); in ``workers`` processes when there is
    more than one chunk. Photos from a ``mirror_sources`` host are mirrored."""
    rows_by_sha = index.rows_by_sha
    tasks = (
        (sha256, data, _is_mirror_source(rows_by_sha.at[sha256, "url"], mirror_sources))
        for _, sha256, data in iter_raw_bytes(
            raw_dir, rows_by_sha.index, read_batch_rows, set(index.unique["raw_shard"])
        )
    )
    workers = workers if index.n_images > chunk_size else 1
    worker = functools.partial(normalise_keyed, config=imaging)
    return map_in_processes(worker, chunked(tasks, chunk_size), workers)


def _is_mirror_source(url: str, hosts: tuple[str, ...]) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h.lower() or host.endswith("." + h.lower()) for h in hosts)


__all__ = ["ShardIndex", "normalised_chunks", "read_index"]
