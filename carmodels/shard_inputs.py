"""What a shard build reads: the dedup stage's kept images and their photos, normalised.

The input side of :func:`carmodels.shards.build_shards`, kept apart from the shard format:

- ``read_index``: ``unique.parquet`` of a dedup output folder, checked, one row per image,
  and the raw folders its photos are read from (``PhotoSource``);
- ``normalised_chunks``: the photos' bytes read from the raw shards and put through
  ``imaging.normalise_keyed``, chunk by chunk, in worker processes for large sets (or by
  any other ``ChunkMapper``, such as one fanning the chunks out on a cluster).

``deduplicate`` indexes one raw folder; ``deduplicate_incremental`` indexes several
partitions, each in its own raw folder, whose shards share names (``raw-00000.parquet`` in
each): its ``unique.parquet`` says in a ``partition`` column whose folder holds each
``raw_shard``. That column says where a photo is, not what the listing was, so it is not
copied into the car shards.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa

from carmodels.dedup.schema import (
    PARTITION_COLUMN,
    RECORD_FILE,
    UNIQUE_CORE_COLUMNS,
    UNIQUE_FILE,
)
from carmodels.dedup.sources import Partitions, iter_photo_bytes, partition_dirs
from carmodels.errors import (
    InputError,
    MissingColumnError,
    MissingInputError,
    ShardsError,
    one_line,
)
from carmodels.imaging import ImagingConfig, NormalisedImage, Rejection, normalise_keyed
from carmodels.parallel import chunked, map_in_processes
from carmodels.scrape.raw import raw_shard_files

#: Columns ``unique.parquet`` holds for dedup's own use, not listing metadata.
_DEDUP_COLUMNS = (*UNIQUE_CORE_COLUMNS, "phash_flipped", "n_bytes", "fetched_at")

#: Where a build finds the photos of ``unique.parquet``: the raw folder ``deduplicate``
#: read; or, for the output of ``deduplicate_incremental``, its partitions as passed to it (a
#: mapping partition → raw folder, or raw folders named by their folder name) or the one
#: folder holding them as ``<folder>/<partition>/`` (the storage layout's ``raw/``).
PhotoSource = str | os.PathLike[str] | Partitions

T = TypeVar("T")
R = TypeVar("R")


class ChunkMapper(Protocol):
    """Runs ``fn`` over each chunk and yields the results in the order of the chunks: how
    ``normalised_chunks`` spreads its work. The default is ``map_in_processes`` over the
    local CPUs; another implementation (a cluster's) only has to keep this signature, take
    ``chunks`` lazily if it wants memory bounded, and keep the order.
    """

    def __call__(self, fn: Callable[[list[T]], R], chunks: Iterable[list[T]], /) -> Iterator[R]: ...


@dataclass(frozen=True)
class ShardIndex:
    """The images to shard: ``unique.parquet``, its rows by sha256 (one per image), and the
    raw shards that hold their photos."""

    unique: pd.DataFrame
    rows_by_sha: pd.DataFrame
    #: Listing metadata columns, copied into the shards as strings.
    metadata_columns: list[str]
    #: ``(raw folder, names of its shards that hold indexed photos)``, in the order they are
    #: read: partitions by name (the raw folders of ``deduplicate_incremental``), else the one
    #: raw folder.
    sources: tuple[tuple[Path, frozenset[str]], ...]
    #: Partition → raw folder, for an index of ``deduplicate_incremental``; None for one
    #: raw folder.
    partitions: dict[str, Path] | None = None

    @property
    def n_images(self) -> int:
        return len(self.rows_by_sha)

    def photo_location(self, sha256: str) -> str:
        """Where the photo of ``sha256`` should be: its raw shard (and partition)."""
        row = self.rows_by_sha.loc[sha256]
        if self.partitions is None:
            return str(row["raw_shard"])
        partition = str(row[PARTITION_COLUMN])
        return f"{row['raw_shard']} of partition {partition!r} ({self.partitions[partition]})"


def read_index(unique_dir: Path, raw: PhotoSource, *, partition: str | None = None) -> ShardIndex:
    """The index of a dedup output folder and where its photos are (``raw``, see
    ``PhotoSource``), checked before any shard is written.

    With ``partition``, only that partition's rows of an index of ``deduplicate_incremental``
    (only its raw folder needs to exist): the images of one partition's shards.

    Raises ``MissingInputError`` when a partition named in ``unique.parquet`` (or the one
    asked for) has no raw folder (or one without raw shards), and ``InputError`` for
    partitions passed with the index of one raw folder, for ``partition`` with such an index,
    or for a ``partition`` without kept images.
    """
    unique = _read_unique(unique_dir)
    if partition is not None:
        unique = _partition_rows(unique_dir, unique, raw, partition)
    folders = _photo_folders(unique_dir, unique, raw)
    rows_by_sha = unique.drop_duplicates("sha256").set_index("sha256", drop=False)
    if isinstance(folders, Path):
        # The index of one raw folder: read as before there were partitions.
        metadata_columns = [c for c in unique.columns if c not in _DEDUP_COLUMNS]
        sources = ((folders, frozenset(unique["raw_shard"])),)
        return ShardIndex(unique, rows_by_sha, metadata_columns, sources)
    metadata_columns = [
        c for c in unique.columns if c not in _DEDUP_COLUMNS and c != PARTITION_COLUMN
    ]
    shards_of = {
        str(name): frozenset(shards)
        for name, shards in unique.groupby(PARTITION_COLUMN)["raw_shard"]
    }
    sources = tuple((folder, shards_of[name]) for name, folder in folders.items())
    return ShardIndex(unique, rows_by_sha, metadata_columns, sources, folders)


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


def _is_partitioned(unique_dir: Path, unique: pd.DataFrame, raw: PhotoSource) -> bool:
    """Whether ``unique`` is the index of ``deduplicate_incremental`` (photos in partitions).

    ``deduplicate`` passes listing columns through, so a manifest's own ``partition`` column
    can reach the index of one raw folder; only ``deduplicate_incremental`` commits its record
    beside the index. Without one, one folder is read as before and the column is listing
    metadata.
    """
    if PARTITION_COLUMN not in unique.columns:
        return False
    return not isinstance(raw, str | os.PathLike) or (unique_dir / RECORD_FILE).exists()


def _check_partition_names(unique_dir: Path, unique: pd.DataFrame) -> None:
    if unique[PARTITION_COLUMN].isna().any():
        raise InputError(
            f"{unique_dir / UNIQUE_FILE} has rows without a {PARTITION_COLUMN}; run "
            "`carmodels dedup` again to rewrite it."
        )


def _partition_rows(
    unique_dir: Path, unique: pd.DataFrame, raw: PhotoSource, partition: str
) -> pd.DataFrame:
    """The rows of ``unique`` in ``partition``, refused for an index without partitions or a
    partition without kept images (an empty set would replace its shards with nothing)."""
    unique_path = unique_dir / UNIQUE_FILE
    if not _is_partitioned(unique_dir, unique, raw):
        raise InputError(
            f"{unique_path} indexes one raw folder (`deduplicate`), not partitions, so there "
            f"is no partition {partition!r} to shard: build without a partition."
        )
    _check_partition_names(unique_dir, unique)
    names = unique[PARTITION_COLUMN].astype(str)
    rows = unique[names == partition]
    if rows.empty:
        known = ", ".join(sorted(set(names)))
        raise InputError(
            f"Partition {partition!r} has no kept images in {unique_path} (its partitions: "
            f"{known}), so there is nothing to shard; nothing was written."
        )
    return rows.reset_index(drop=True)


def _photo_folders(
    unique_dir: Path, unique: pd.DataFrame, raw: PhotoSource
) -> Path | dict[str, Path]:
    """The one raw folder of an index of ``deduplicate``; or the raw folder of each
    partition an index of ``deduplicate_incremental`` names (sorted by name), each checked to
    hold raw shards."""
    unique_path = unique_dir / UNIQUE_FILE
    if isinstance(raw, str | os.PathLike) and not _is_partitioned(unique_dir, unique, raw):
        return Path(raw)
    if PARTITION_COLUMN not in unique.columns:
        raise InputError(
            f"{unique_path} has no {PARTITION_COLUMN!r} column: it indexes one raw folder "
            "(`deduplicate`), so pass that folder rather than partitions."
        )
    _check_partition_names(unique_dir, unique)
    wanted = sorted(set(unique[PARTITION_COLUMN].astype(str)))
    given = _given_folders(raw, wanted)
    folders = {}
    for name in wanted:
        folder = given.get(name)
        if folder is None:
            raise MissingInputError(
                f"Partition {name!r} of {unique_path} is not among the partitions given "
                f"({', '.join(sorted(given))}): pass every partition's raw folder, as given to "
                "the dedup, or run `carmodels dedup` again without it."
            )
        if not folder.is_dir():
            raise MissingInputError(
                f"Partition {name!r} of {unique_path} has no raw folder {folder}: restore it, "
                "pass the partitions' raw folders as given to the dedup, or run `carmodels "
                "dedup` again without the partition."
            )
        # Checked here, not when the folder is read: by then earlier partitions' images may
        # already be in new shard files.
        try:
            raw_shard_files(folder)
        except MissingInputError as error:
            raise MissingInputError(f"Partition {name!r} of {unique_path}: {error}") from None
        folders[name] = folder
    return folders


def _given_folders(raw: PhotoSource, wanted: list[str]) -> dict[str, Path]:
    """Partition → raw folder from what the caller passed (see ``PhotoSource``)."""
    if not isinstance(raw, str | os.PathLike):
        return partition_dirs(raw)
    parent = Path(raw)
    for name in wanted:
        # A name is joined to the folder: it must stay below it.
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(
                f"Partition {name!r} is no folder name below {parent}; pass a mapping of "
                "partition names to raw folders."
            )
    return {name: parent / name for name in wanted}


def normalised_chunks(
    index: ShardIndex,
    imaging: ImagingConfig,
    mirror_sources: tuple[str, ...],
    read_batch_rows: int,
    chunk_size: int,
    workers: int,
    *,
    map_chunks: ChunkMapper | None = None,
) -> Iterator[list[tuple[str, NormalisedImage | Rejection]]]:
    """``(sha256, normalised image or rejection)`` chunks, in the order ``index.sources``
    holds the photos (those not found are left out). Photos from a ``mirror_sources`` host
    are mirrored.

    The chunks (of ``chunk_size`` photos) are normalised by ``map_chunks``; None means
    ``map_in_processes`` in ``workers`` processes when there is more than one chunk
    (``workers`` is not used otherwise: the mapper decides where the work runs).
    """
    rows_by_sha = index.rows_by_sha
    tasks = (
        (sha256, data, _is_mirror_source(rows_by_sha.at[sha256, "url"], mirror_sources))
        for _, sha256, data in iter_photo_bytes(index.sources, rows_by_sha.index, read_batch_rows)
    )
    worker = functools.partial(normalise_keyed, config=imaging)
    if map_chunks is not None:
        return map_chunks(worker, chunked(tasks, chunk_size))
    workers = workers if index.n_images > chunk_size else 1
    return map_in_processes(worker, chunked(tasks, chunk_size), workers)


def _is_mirror_source(url: str, hosts: tuple[str, ...]) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return any(host == h.lower() or host.endswith("." + h.lower()) for h in hosts)


__all__ = ["ChunkMapper", "PhotoSource", "ShardIndex", "normalised_chunks", "read_index"]
