"""128x128 RGB uint8 training shards: schema, train/val split, and fast loading.

A shard is a zstd Parquet file whose ``image`` column holds each picture as raw
``height * width * 3`` uint8 bytes in HWC order, so loading is a single ``np.frombuffer``
over the column's data buffer rather than one decode per image.

Raw bytes vs PNG in the ``image`` column, measured on 980 Stanford Cars photos at 128x128
(zstd Parquet, 2 shared CPU cores): raw 24.3 MB, ``load_images`` 200-300 ms; PNG-encoded
17.5 MB (-28%), 650-800 ms to read and decode (2-3x slower). Raw is kept: the shards are
read every epoch and zstd already recovers much of what PNG would save.

``build_shards`` writes the shards of one build as ``car-g<generation>-<n>.parquet``, rows
sorted by (``url``, ``sha256``), and commits the set by writing ``summary.json`` (which lists
it) last; see there. A folder of such folders, one per partition, reads as their union (see
``shard_files``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from PIL import Image

from carmodels.errors import (
    EmptySplitError,
    InputError,
    MissingInputError,
    ShardsError,
    one_line,
)
from carmodels.imaging import ImagingConfig, NormalisedImage, Rejection
from carmodels.io import atomic_save_image, atomic_write_json, atomic_write_parquet
from carmodels.shard_inputs import (
    ChunkMapper,
    PhotoSource,
    ShardIndex,
    normalised_chunks,
    read_index,
)

#: Bumped whenever a column is added, removed or changes meaning.
SHARD_SCHEMA_VERSION = 1
#: File name pattern of image shards inside a shards folder.
SHARD_GLOB = "car-*.parquet"
#: Fraction of images assigned to the validation split by default.
DEFAULT_VAL_FRACTION = 0.1
SPLITS = ("train", "val")
#: Written last by ``build_shards``: the commit point naming the current shard set.
SUMMARY_FILE = "summary.json"
REJECTS_FILE = "rejects.parquet"
PREVIEW_FILE = "preview.png"


def split_for(sha256: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """Deterministic split from the image's content hash: stable across runs and machines."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bucket = int(hashlib.sha256(f"split:{sha256}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


#: What to do about a shards folder that is missing, damaged or of another version.
_REBUILD = "rebuild the folder with `carmodels shard` (or materialise `car_shards`)"


def shard_files(path: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a shards folder (or a single shard file), sorted by name.

    A folder written by ``build_shards`` lists its current shard set in ``summary.json``; only
    those files are read, so leftovers of an interrupted build are never mixed in. Every reader
    of shards starts here, so this is also where a folder's ``schema_version`` is checked
    (see ``read_summary``).

    A folder with neither a ``summary.json`` nor shard files of its own, whose subfolders hold
    shards folders (``build_shards(..., partition=P)`` into ``<folder>/<P>/``), reads as the
    union of theirs: subfolders by name, each as above; hidden ones (a build's ``.runs-*``)
    and ones without a ``summary.json`` (never committed) are left out.

    Raises:
        MissingInputError: no such folder, no shard files in it, or listed files are gone.
        ShardsError: an unreadable ``summary.json``, or one of another schema version.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingInputError(
            f"No shards at {path}: materialise `car_shards` (or run `carmodels shard`) first."
        )
    summary = read_summary(path)
    listed = None if summary is None else summary.get("shards")
    if listed is not None:
        files = [path / name for name in listed]
        missing = [p.name for p in files if not p.exists()]
        if missing:
            raise MissingInputError(
                f"{path / SUMMARY_FILE} lists shards that are gone ({', '.join(missing[:3])}); "
                f"{_REBUILD}."
            )
    else:
        files = sorted(path.glob(SHARD_GLOB))
        if summary is None and not files:
            parts = _partition_folders(path)
            if parts:
                return [file for part in parts for file in shard_files(part)]
    if not files:
        raise MissingInputError(
            f"{path} holds no {SHARD_GLOB} files: materialise `car_shards` "
            "(or run `carmodels shard`) first."
        )
    return files


def _partition_folders(path: Path) -> list[Path]:
    """The shards folders (with a ``summary.json``) directly below ``path``, by name."""
    return sorted(
        sub
        for sub in path.iterdir()
        if sub.is_dir() and not sub.name.startswith(".") and (sub / SUMMARY_FILE).is_file()
    )


def read_summary(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The ``summary.json`` of a shards folder, checked to be of this ``SHARD_SCHEMA_VERSION``.

    None for a folder without one (shard files put there by hand: read as they are). A folder
    written by another version of ``build_shards`` may hold columns under other names or
    meanings, so it is refused rather than half understood.
    """
    summary_path = Path(path) / SUMMARY_FILE
    if not summary_path.exists():
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardsError(
            f"{summary_path} is not valid JSON ({one_line(error)}); the shards folder "
            f"{summary_path.parent} is damaged: {_REBUILD}."
        ) from error
    if not isinstance(summary, dict):
        raise ShardsError(f"{summary_path} is not a shards summary; {_REBUILD}.")
    version = summary.get("schema_version")
    if version != SHARD_SCHEMA_VERSION:
        raise ShardsError(
            f"The shards in {summary_path.parent} have schema_version {version!r}, this "
            f"carmodels reads {SHARD_SCHEMA_VERSION}; {_REBUILD}."
        )
    return summary


@contextlib.contextmanager
def _unreadable_shards(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn pyarrow's complaint about a damaged shard (its message names the file) into an
    error naming the folder and the fix."""
    try:
        yield
    except pa.ArrowException as error:
        raise ShardsError(
            f"The shards in {path} cannot be read ({one_line(error)}); {_REBUILD}."
        ) from error


def _dataset(path: str | os.PathLike[str]) -> ds.Dataset:
    files = shard_files(path)
    with _unreadable_shards(path):
        return ds.dataset([str(p) for p in files], format="parquet")


def _split_filter(split: str | None) -> ds.Expression | None:
    if split is None:
        return None
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return ds.field("split") == split


def _images_to_tensor(images: pa.ChunkedArray | pa.Array, height: int, width: int) -> torch.Tensor:
    """Turn a binary column of HWC uint8 buffers into an N x 3 x H x W uint8 tensor.

    One copy: each Arrow chunk's bytes are transposed straight into a preallocated NCHW array
    (numpy's strided copy; concatenating first and permuting in torch cost a second full copy
    and a slower transpose, see docs/BENCHMARKS.md).
    """
    chunks = images.chunks if isinstance(images, pa.ChunkedArray) else [images]
    chunks = [c for c in chunks if len(c)]
    per_image = height * width * 3
    out = np.empty((sum(len(c) for c in chunks), 3, height, width), dtype=np.uint8)
    row = 0
    for chunk in chunks:
        offset_type = np.int64 if chunk.type == pa.large_binary() else np.int32
        offsets = np.frombuffer(chunk.buffers()[1], dtype=offset_type)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        if np.any(np.diff(offsets) != per_image):
            raise ShardsError(f"Shard images are not all {height}x{width}x3 bytes; {_REBUILD}.")
        hwc = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        out[row : row + len(chunk)] = hwc.reshape(-1, height, width, 3).transpose(0, 3, 1, 2)
        row += len(chunk)
    return torch.from_numpy(out)


def _image_size(table: pa.Table, path: str | os.PathLike[str]) -> tuple[int, int]:
    heights = set(table.column("height").unique().to_pylist())
    widths = set(table.column("width").unique().to_pylist())
    if len(heights) != 1 or len(widths) != 1:
        raise ShardsError(f"Shards in {path} mix image sizes {heights}x{widths}; {_REBUILD}.")
    return heights.pop(), widths.pop()


def load_images(path: str | os.PathLike[str], split: str | None = None) -> torch.Tensor:
    """All images of a shards folder (optionally one split) as an N x 3 x H x W uint8 tensor.

    Raises ``EmptySplitError`` when there are none, ``ShardsError`` for a damaged folder.
    """
    dataset = _dataset(path)
    with _unreadable_shards(path):
        table = dataset.to_table(columns=["image", "height", "width"], filter=_split_filter(split))
    if table.num_rows == 0:
        raise EmptySplitError(
            f"No images{f' in split {split!r}' if split else ''} under {path}; "
            "check the shards were built from enough photos."
        )
    height, width = _image_size(table, path)
    return _images_to_tensor(table.column("image"), height, width)


def iter_images(
    path: str | os.PathLike[str], split: str | None = None, batch_size: int = 4096
) -> Iterator[torch.Tensor]:
    """Stream images in batches (N x 3 x H x W uint8) for data larger than memory."""
    dataset = _dataset(path)
    with _unreadable_shards(path):
        scanner = dataset.scanner(
            columns=["image", "height", "width"], filter=_split_filter(split), batch_size=batch_size
        )
        batches = scanner.to_batches()
    while True:
        # Only pyarrow's reading is wrapped: errors of the caller's code between batches are
        # not the shards' fault.
        with _unreadable_shards(path):
            batch = next(batches, None)
        if batch is None:
            return
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        height, width = _image_size(table, path)
        yield _images_to_tensor(table.column("image"), height, width)


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a shards folder, with the number of its rows in a split.

    The unit the trainer streams (`carmodels.train.data`): the builder writes each shard file
    as one row group, so a row group can hold thousands of images, and it is read a few
    hundred rows at a time (`iter_row_group_images`)."""

    path: Path
    index: int
    #: Rows of the split in this row group (> 0).
    n_images: int


def split_row_groups(
    path: str | os.PathLike[str], split: str | None = None
) -> tuple[list[RowGroup], tuple[int, int]]:
    """The row groups of a shards folder holding images of ``split`` (None: any), in the order
    `load_images` reads them (file, then row group), and the images' (height, width).

    Reads only the ``split``, ``height`` and ``width`` columns. Raises ``EmptySplitError``
    when there are no such images and ``ShardsError`` for a damaged folder or mixed sizes.
    """
    groups: list[RowGroup] = []
    sides: set[tuple[int, int]] = set()
    _split_filter(split)  # checks the name
    columns = ["height", "width"] + (["split"] if split else [])
    with _unreadable_shards(path):
        for file in shard_files(path):
            parquet = pq.ParquetFile(file)
            for index in range(parquet.num_row_groups):
                table = parquet.read_row_group(index, columns=columns)
                if split is not None:
                    table = table.filter(pc.equal(table.column("split"), split))
                if table.num_rows:
                    sides.add(_image_size(table, path))
                    groups.append(RowGroup(file, index, table.num_rows))
    if not groups:
        raise EmptySplitError(
            f"No images{f' in split {split!r}' if split else ''} under {path}; "
            "check the shards were built from enough photos."
        )
    if len(sides) != 1:
        raise ShardsError(f"Shards in {path} mix image sizes {sorted(sides)}; {_REBUILD}.")
    return groups, sides.pop()


#: Bytes `iter_row_group_images` reads from a file at a time. Without read buffering pyarrow
#: reads a whole column chunk (a whole shard's images, ~240 MiB) before the first batch.
_READ_BUFFER_BYTES = 4 << 20


def iter_row_group_images(
    group: RowGroup,
    split: str | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    batch_rows: int = 256,
) -> Iterator[torch.Tensor]:
    """Images ``start:stop`` of a row group's ``split`` rows (counted among those rows), in
    file order, as N x 3 x H x W uint8 tensors of at most ``batch_rows`` images.

    At most ``batch_rows`` rows of the file (both splits) are decoded at a time, and reading
    stops after ``stop``; the rows before ``start`` are read and dropped (Parquet has no
    cheaper way into the middle of a column chunk). pyarrow still decompresses a whole Parquet
    page at a time: ``build_shards`` writes pyarrow's default pages, up to 1,024 images each
    (about 50 MB at 128 px), and a first dictionary page as large, so reading one of its
    shards takes about 200 MB however small ``batch_rows`` is (measured: 210 MB on a 3,000
    image row group; 24 MB with pages of 64 images and no dictionary for ``image``).
    """
    stop = group.n_images if stop is None else min(stop, group.n_images)
    _split_filter(split)  # checks the name
    with _unreadable_shards(group.path):
        parquet = pq.ParquetFile(group.path, buffer_size=_READ_BUFFER_BYTES, pre_buffer=False)
        batches = parquet.iter_batches(
            batch_size=batch_rows,
            row_groups=[group.index],
            columns=["image", "height", "width"] + (["split"] if split else []),
            use_threads=False,
        )
    seen = 0  # split rows of the row group passed so far
    while seen < stop:
        with _unreadable_shards(group.path):
            batch = next(batches, None)
        if batch is None:
            return
        table = pa.Table.from_batches([batch])
        if split is not None:
            table = table.filter(pc.equal(table.column("split"), split))
        first, last = max(start - seen, 0), min(stop - seen, table.num_rows)
        seen += table.num_rows
        if first < last:
            part = table.slice(first, last - first)
            height, width = _image_size(part, group.path)
            yield _images_to_tensor(part.column("image"), height, width)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class ShardConfig:
    """How the kept images become training shards."""

    imaging: ImagingConfig = field(default_factory=ImagingConfig)
    val_fraction: float = field(
        default=DEFAULT_VAL_FRACTION,
        metadata={"help": "fraction of images in the validation split (by content hash)"},
    )
    #: Images per Parquet file (5,000 x 48 KiB ~ 240 MiB before compression).
    images_per_shard: int = 5000
    #: Hosts whose photos are all mirrored (``example.com`` also matches ``img.example.com``),
    #: for sites known to publish every car the other way round.
    mirror_sources: tuple[str, ...] = ()
    #: Processes normalising images.
    workers: int = 2
    #: Images per task sent to a worker.
    chunk_size: int = 64
    #: Rows read from a raw shard at a time (bounds the bytes held in memory).
    read_batch_rows: int = 256
    #: Images in the preview grid, and its columns.
    preview_images: int = 64
    preview_columns: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"ShardConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.images_per_shard < 1 or self.workers < 1 or self.chunk_size < 1:
            raise ValueError("ShardConfig.images_per_shard, workers and chunk_size must be >= 1")


@dataclass(frozen=True)
class ShardResult:
    n_input: int
    n_written: int
    n_train: int
    n_val: int
    rejects_by_reason: dict[str, int]
    facing_counts: dict[str, int]
    shard_paths: list[Path]
    summary_path: Path
    preview_path: Path
    elapsed_s: float


#: Reason recorded when a kept image's bytes are no longer in the raw shards.
MISSING_SOURCE = "missing_source"


def _shard_schema(metadata_columns: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("image", pa.binary()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("sha256", pa.string()),
            ("url", pa.string()),
            ("source_width", pa.int32()),
            ("source_height", pa.int32()),
            ("phash", pa.string()),
            ("split", pa.string()),
            ("facing", pa.string()),
            ("facing_confidence", pa.float32()),
            ("mirrored", pa.bool_()),
            *[(name, pa.string()) for name in metadata_columns],
        ]
    )


_REJECTS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def _previous_generation(out_dir: Path) -> int:
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.exists():
        return 0
    try:
        return int(json.loads(summary_path.read_text()).get("generation", 0))
    except (ValueError, TypeError):
        return 0


#: Hidden folder (inside the shards folder) of a build's sorted runs: ``.runs-g<generation>``.
#: Hidden so that ``shard_files`` never takes it for a partition's shards folder.
RUNS_PREFIX = ".runs-"
#: Rows per row group of a run file and per batch read back while merging: a run is read a
#: row group at a time, so this bounds the memory each open run holds (32 x 48 KiB = 1.5 MiB,
#: held as Arrow and as Python rows, plus a read buffer of ``_RUN_READ_BUFFER_BYTES``).
_RUN_ROWS = 32
_RUN_READ_BUFFER_BYTES = 1 << 20
#: Runs merged at once (~4 MiB each, so ~0.5 GiB): more are first merged into fewer, longer
#: runs (a pass costs one more read and write of the images, but bounds open files and
#: memory). One pass merges 128 x ``images_per_shard`` images (640,000 at 5,000), two 82M.
_MAX_FAN_IN = 128


def _sort_key(row: dict[str, object]) -> tuple[str, str]:
    """The canonical order of shard rows (and rejects): by url, then content hash. It does
    not depend on how the photos were laid out in raw shards, and (url, sha256) is unique."""
    return str(row["url"]), str(row["sha256"])


class _Generation:
    """A new shard generation as it is written: its shards, rejects, counts and preview.

    Normalised images come in through :meth:`add`, in whatever order the photos were read,
    and leave in the canonical order (``_sort_key``) by an external merge sort that holds at
    most ``images_per_shard`` rows: each time that many wait, they are sorted and written as a
    run (a Parquet file in ``.runs-g<generation>/``); :meth:`finish` merges the runs into the
    shards and deletes them (when all rows fit in one run, it writes the sorted rows straight
    away). :meth:`commit` writes the summary that makes the generation the current one.
    """

    def __init__(self, out_dir: Path, index: ShardIndex, config: ShardConfig) -> None:
        self.out_dir = out_dir
        self.index = index
        self.config = config
        self.number = _previous_generation(out_dir) + 1
        out_dir.mkdir(parents=True, exist_ok=True)
        # Runs of a build that crashed are of no use to this one (and can be large).
        for leftover in out_dir.glob(f"{RUNS_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.runs_dir = out_dir / f"{RUNS_PREFIX}g{self.number:04d}"
        self.schema = _shard_schema(index.metadata_columns)
        self.shard_paths: list[Path] = []
        self.rejects: list[dict[str, str]] = []
        self.preview: list[np.ndarray] = []
        self.split_counts = dict.fromkeys(SPLITS, 0)
        self.facing_counts: dict[str, int] = {}
        self.n_mirrored = 0
        self._buffer: list[dict[str, object]] = []
        self._runs: list[Path] = []
        self._n_runs_made = 0
        self._seen: set[str] = set()

    def add(self, sha256: str, outcome: NormalisedImage | Rejection) -> None:
        self._seen.add(sha256)
        source = self.index.rows_by_sha.loc[sha256]
        if isinstance(outcome, Rejection):
            self.rejects.append(
                {
                    "sha256": sha256,
                    "url": source["url"],
                    "reason": outcome.reason,
                    "detail": outcome.detail,
                }
            )
            return
        split = split_for(sha256, self.config.val_fraction)
        self.split_counts[split] += 1
        self.facing_counts[outcome.facing] = self.facing_counts.get(outcome.facing, 0) + 1
        self.n_mirrored += outcome.mirrored
        # Spilled only when one more row comes, so that a set of images_per_shard rows or
        # fewer is never written as a run and merged.
        if len(self._buffer) >= self.config.images_per_shard:
            self._spill()
        self._buffer.append(self._row(sha256, outcome, source, split))

    def _row(
        self, sha256: str, outcome: NormalisedImage, source: pd.Series, split: str
    ) -> dict[str, object]:
        size = self.config.imaging.size
        return {
            "image": outcome.pixels.tobytes(),
            "height": size,
            "width": size,
            "sha256": sha256,
            "url": source["url"],
            "source_width": outcome.source_width,
            "source_height": outcome.source_height,
            "phash": source["phash"],
            "split": split,
            "facing": outcome.facing,
            "facing_confidence": outcome.facing_confidence,
            "mirrored": outcome.mirrored,
            **{
                c: None if pd.isna(source[c]) else str(source[c])
                for c in self.index.metadata_columns
            },
        }

    def _new_run_path(self) -> Path:
        self.runs_dir.mkdir(exist_ok=True)
        # Numbered by a counter, not len(self._runs): a merge pass writes new runs while
        # reading the ones it replaces.
        path = self.runs_dir / f"run-{self._n_runs_made:06d}.parquet"
        self._n_runs_made += 1
        self._runs.append(path)
        return path

    def _spill(self) -> None:
        """Write the waiting rows, sorted, as a run."""
        self._buffer.sort(key=_sort_key)
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        # Small row groups and no dictionary: merging reads a run a row group (a page) at a
        # time, so these bound what each open run holds.
        pq.write_table(table, self._new_run_path(), row_group_size=_RUN_ROWS, use_dictionary=False)
        self._buffer.clear()

    def _read_run(self, path: Path) -> Iterator[dict[str, object]]:
        parquet = pq.ParquetFile(path, buffer_size=_RUN_READ_BUFFER_BYTES, pre_buffer=False)
        with parquet:
            for batch in parquet.iter_batches(batch_size=_RUN_ROWS, use_threads=False):
                yield from batch.to_pylist()

    def _merged(self) -> Iterator[dict[str, object]]:
        """All rows of the runs in canonical order, at most ``_MAX_FAN_IN`` runs open."""
        while len(self._runs) > _MAX_FAN_IN:
            groups = [
                self._runs[k : k + _MAX_FAN_IN] for k in range(0, len(self._runs), _MAX_FAN_IN)
            ]
            self._runs = []
            for group in groups:
                self._merge_into_run(group)
        return heapq.merge(*(self._read_run(path) for path in self._runs), key=_sort_key)

    def _merge_into_run(self, runs: list[Path]) -> None:
        rows = heapq.merge(*(self._read_run(path) for path in runs), key=_sort_key)
        with pq.ParquetWriter(self._new_run_path(), self.schema, use_dictionary=False) as writer:
            batch: list[dict[str, object]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == _RUN_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=self.schema))
                    batch.clear()
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=self.schema))
        for path in runs:
            path.unlink()

    def _write_shards(self, rows: Iterable[dict[str, object]]) -> None:
        """Write ``rows`` (in canonical order) as shards of ``images_per_shard`` rows, and
        keep the first ``preview_images`` for the preview."""
        size = self.config.imaging.size
        shard: list[dict[str, object]] = []
        for row in rows:
            if len(self.preview) < self.config.preview_images:
                pixels = np.frombuffer(row["image"], dtype=np.uint8)
                self.preview.append(pixels.reshape(size, size, 3))
            shard.append(row)
            if len(shard) == self.config.images_per_shard:
                self._write_shard(shard)
                shard = []
        if shard:
            self._write_shard(shard)

    def _write_shard(self, rows: list[dict[str, object]]) -> None:
        # Built from Python rows whichever way they came (sorted buffer or merged runs), so
        # the same rows give the same bytes.
        path = self.out_dir / f"car-g{self.number:04d}-{len(self.shard_paths):05d}.parquet"
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.shard_paths.append(atomic_write_parquet(path, table))

    def finish(self) -> None:
        """Write the shards in canonical order; reject the images whose photo is not in the
        raw shards; sort the rejects the same way."""
        if self._runs:
            if self._buffer:
                self._spill()  # merged from disk rather than held beside the shard written
            self._write_shards(self._merged())
        else:
            self._buffer.sort(key=_sort_key)
            self._write_shards(self._buffer)
        self._buffer = []
        self.discard_runs()
        rows_by_sha = self.index.rows_by_sha
        for sha256 in rows_by_sha.index.difference(pd.Index(sorted(self._seen))):
            where = self.index.photo_location(sha256)
            self.rejects.append(
                {
                    "sha256": sha256,
                    "url": rows_by_sha.at[sha256, "url"],
                    "reason": MISSING_SOURCE,
                    "detail": f"no ok row with this sha256 in {where}",
                }
            )
        self.rejects.sort(key=_sort_key)

    def discard_runs(self) -> None:
        """Delete this build's runs (done with them, or the build failed)."""
        shutil.rmtree(self.runs_dir, ignore_errors=True)
        self._runs = []

    def rejects_by_reason(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects).most_common())

    def commit(self, rejects_by_reason: dict[str, int], started: float) -> ShardResult:
        """Write the rejects, the preview and the summary, then delete the older shards."""
        out_dir, config, split_counts = self.out_dir, self.config, self.split_counts
        size = config.imaging.size
        rejects_table = pa.Table.from_pylist(self.rejects, schema=_REJECTS_SCHEMA)
        atomic_write_parquet(out_dir / REJECTS_FILE, rejects_table)
        preview_path = atomic_save_image(
            out_dir / PREVIEW_FILE, image_grid(self.preview, config.preview_columns, size)
        )
        n_written = sum(split_counts.values())
        summary = {
            "schema_version": SHARD_SCHEMA_VERSION,
            "generation": self.number,
            "shards": [p.name for p in self.shard_paths],
            "image_size": {"height": size, "width": size, "channels": 3},
            "n_input": self.index.n_images,
            "n_written": n_written,
            "counts": split_counts,
            "rejects_by_reason": rejects_by_reason,
            "facing_counts": self.facing_counts,
            "n_mirrored": self.n_mirrored,
            "imaging": dataclasses.asdict(config.imaging),
            "val_fraction": config.val_fraction,
            "mirror_sources": list(config.mirror_sources),
        }
        # The commit point: from here on load_images reads the new set.
        summary_path = atomic_write_json(out_dir / SUMMARY_FILE, summary)
        current = {p.name for p in self.shard_paths}
        for stale in out_dir.glob(SHARD_GLOB):
            if stale.name not in current:
                stale.unlink(missing_ok=True)
        return ShardResult(
            n_input=self.index.n_images,
            n_written=n_written,
            n_train=split_counts["train"],
            n_val=split_counts["val"],
            rejects_by_reason=rejects_by_reason,
            facing_counts=self.facing_counts,
            shard_paths=self.shard_paths,
            summary_path=summary_path,
            preview_path=preview_path,
            elapsed_s=time.monotonic() - started,
        )


def build_shards(
    unique_dir: str | os.PathLike[str],
    raw_dir: PhotoSource,
    out_dir: str | os.PathLike[str],
    config: ShardConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    partition: str | None = None,
    map_chunks: ChunkMapper | None = None,
) -> ShardResult:
    """Normalise every kept image of ``unique_dir`` into training shards in ``out_dir``.

    ``raw_dir`` is where the photos are: the raw folder ``deduplicate`` read; for the output
    of ``deduplicate_incremental`` (a ``unique.parquet`` with a ``partition`` column), the
    partitions as passed to it (a mapping partition → raw folder, or the raw folders), or the
    one folder holding them as ``<raw_dir>/<partition>/``. A partition whose folder is missing
    is a ``MissingInputError`` before anything is written.

    With ``partition``, only that partition of such an index is sharded and only its raw
    folder needs to exist; ``out_dir`` is then typically ``<shards>/<partition>/``, and the
    readers read ``<shards>`` as the union of its partitions' folders (see ``shard_files``).
    An index without partitions, or a partition without kept images, is an ``InputError``.

    The images are written sorted by (``url``, ``sha256``), not in the order the photos
    arrive: the order the raw shards hold them is the order they happened to be downloaded
    (in parallel, locally or on a cluster), so the same photos give the same shard bytes, and
    the same ``data_version_of``, however they were downloaded and laid out. The sort is an
    external merge sort holding at most ``images_per_shard`` images in memory (see
    ``_Generation``); its runs are kept in a hidden ``.runs-g<generation>/`` folder inside
    ``out_dir`` and deleted when the shards are written (or by the next build, after a crash).
    The rejects and the preview follow the same order.

    The photos are normalised in chunks of ``config.chunk_size`` by ``map_chunks`` (see
    ``ChunkMapper``: ``map_chunks(fn, chunks)`` yielding results in order); None means
    ``config.workers`` local processes.

    Replacing a previous shard set is crash-safe: the new shards get new names
    (``car-g<generation>-<n>.parquet``), ``summary.json`` is written last and lists them, which
    is the moment the new set becomes the one ``load_images`` reads; only then are the old
    shards deleted. A build that fails midway leaves the previous set readable and untouched.
    """
    config = config or ShardConfig()
    started = time.monotonic()
    unique_dir, out_dir = Path(unique_dir), Path(out_dir)
    index = read_index(unique_dir, raw_dir, partition=partition)
    total = index.n_images
    generation = _Generation(out_dir, index, config)
    try:
        chunks = normalised_chunks(
            index,
            config.imaging,
            config.mirror_sources,
            config.read_batch_rows,
            config.chunk_size,
            config.workers,
            map_chunks=map_chunks,
        )
        done = 0
        if on_progress:
            on_progress(0, total)
        for results in chunks:
            for sha256, outcome in results:
                generation.add(sha256, outcome)
            done += len(results)
            if on_progress:
                on_progress(done, total)
        generation.finish()
    finally:
        # Runs are scratch space: a failed build must not leave gigabytes behind.
        generation.discard_runs()
    if on_progress and done < total:
        on_progress(total, total)
    rejects_by_reason = generation.rejects_by_reason()
    if not generation.shard_paths:
        # Committing an empty set would replace the previous shards with nothing to train on.
        raise InputError(
            f"None of the {total} images in {unique_dir} survived normalising (rejected: "
            f"{rejects_by_reason}); nothing in {out_dir} was replaced. Loosen the imaging "
            "settings (e.g. --min-side) or add photos."
        )
    return generation.commit(rejects_by_reason, started)


def image_grid(images: list[np.ndarray], columns: int, size: int) -> Image.Image:
    """HxWx3 uint8 images tiled row by row (grey when there are none)."""
    if not images:
        return Image.new("RGB", (size, size), (128, 128, 128))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * size, rows * size), "white")
    for k, pixels in enumerate(images):
        grid.paste(Image.fromarray(pixels), ((k % columns) * size, (k // columns) * size))
    return grid


def data_version_of(shards_dir: str | os.PathLike[str]) -> str:
    """Content version of the shard files (their bytes, not their generation names)."""
    from carmodels.versioning import contents_version

    return contents_version(shard_files(shards_dir))


def check_image_size(height: int, width: int, size: int, source: str) -> None:
    """Refuse shard images that `fit_image_size` cannot bring to ``size`` px."""
    if height != width:
        raise ValueError(f"Shards in {source} hold {height}x{width} images; expected squares.")
    if height < size:
        raise ValueError(
            f"Shards in {source} hold {height}px images, smaller than image_size={size}; "
            f"train with image_size={height} or rebuild the shards at {size}px."
        )


def fit_image_size(images: torch.Tensor, size: int, source: str) -> torch.Tensor:
    """Downscale (box filter, in chunks) shards larger than the model's image size."""
    height, width = images.shape[-2:]
    check_image_size(height, width, size, source)
    if height == size:
        return images
    chunks = [
        torch.nn.functional.interpolate(chunk.float(), size=(size, size), mode="area")
        .round_()
        .to(torch.uint8)
        for chunk in images.split(4096)
    ]
    return torch.cat(chunks)
