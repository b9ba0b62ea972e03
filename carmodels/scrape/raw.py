"""Raw shards: the downloader's output, one row per fetched URL with its bytes and outcome.

Shards are ``raw-NNNNN.parquet`` (zstd), each written atomically (temporary file, fsync,
rename) and never modified afterwards. They are also the fetch log: every URL's outcome is a
row, so there is no second file that could disagree with them. A crash, SIGKILL included,
loses at most the rows buffered since the last shard (a shard is written every
``shard_size`` rows or ``flush_interval_s`` seconds, whichever comes first) and never damages
a written one; the next run fetches exactly the URLs without a row.
A re-fetch of a URL (``retry_failed``, ``revalidate``) appends a newer row instead of
rewriting the old shard; readers take the latest row per URL by ``fetched_at``.

The readers of the later stages live here too, beside the writer whose format they read:
``read_raw_index`` (the ok images, one per URL, without bytes) and ``iter_raw_bytes`` (their
bytes, shard by shard and batch by batch), both over ``raw_shard_files``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from carmodels.errors import MissingColumnError, MissingInputError, ShardsError, one_line
from carmodels.io import atomic_write
from carmodels.scrape.fetch import THUMBNAIL_COLUMN, Validators

if TYPE_CHECKING:
    import fsspec

RAW_SHARD_GLOB = "raw-*.parquet"
_RAW_SHARD_NAME = re.compile(r"^raw-(\d+)\.parquet$")
RAW_SHARD_COMPRESSION = "zstd"
#: zstd's fastest level: raw shards hold JPEG bytes and thumbnail pixels, which no level
#: compresses much further (a 5,000-thumbnail shard: 125 MB at -1, 124 MB at the default),
#: while writing takes a quarter less time on the downloader's critical path.
RAW_SHARD_COMPRESSION_LEVEL = -1

#: The fixed leading columns of every raw shard; manifest metadata columns follow as strings.
RAW_FIELDS: tuple[pa.Field, ...] = (
    pa.field("url", pa.string(), nullable=False),
    pa.field("status", pa.int32()),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("content_type", pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("fetched_at", pa.timestamp("us", tz="UTC"), nullable=False),
    # Validators of an ``ok`` response, for conditional requests when revalidating.
    pa.field("etag", pa.string()),
    pa.field("last_modified", pa.string()),
)
RAW_COLUMNS: tuple[str, ...] = tuple(f.name for f in RAW_FIELDS)


def local_photo_row(
    url: str, data: bytes, fetched_at: datetime, **metadata: str | None
) -> dict[str, Any]:
    """The ``ok`` raw row of JPEG bytes read from disk rather than downloaded (the benchmarks
    put photo folders through the later stages this way), with manifest ``metadata``."""
    return {
        "url": url,
        "status": 200,
        "outcome": "ok",
        "content_type": "image/jpeg",
        "image_bytes": data,
        "sha256": hashlib.sha256(data).hexdigest(),
        "fetched_at": fetched_at,
        **metadata,
    }


#: Written only when the downloader makes thumbnails (``ScrapeConfig.thumbnail_size``):
#: ``size x size x 3`` uint8 RGB bytes, row-major (the layout of car shards' ``image``).
THUMBNAIL_FIELD = pa.field(THUMBNAIL_COLUMN, pa.binary())
#: Non-metadata columns of a raw shard: ``read_raw_index`` keeps every other one as metadata.
RAW_CORE_COLUMNS = (*RAW_COLUMNS, THUMBNAIL_FIELD.name)
#: Prefix given to a manifest column whose name clashes with a raw column (e.g. ``width``).
CLASHING_METADATA_PREFIX = "manifest_"

#: Columns never dictionary-encoded: their values are (nearly) all distinct, so Parquet's
#: attempt to build a dictionary is pure cost (it doubled the write time of thumbnail shards).
_NO_DICTIONARY = frozenset({"url", "image_bytes", "sha256", "etag", THUMBNAIL_FIELD.name})


def metadata_column_names(manifest_columns: Iterable[str]) -> dict[str, str]:
    """Map manifest column → raw shard column for every metadata column (all but ``url``)."""
    names: dict[str, str] = {}
    for column in manifest_columns:
        if column == "url":
            continue
        clashes = column in RAW_COLUMNS or column == THUMBNAIL_FIELD.name
        names[column] = f"{CLASHING_METADATA_PREFIX}{column}" if clashes else column
    return names


def raw_schema(metadata_columns: Sequence[str], thumbnails: bool = False) -> pa.Schema:
    """The schema of a shard holding ``metadata_columns`` (already renamed) after the raw ones."""
    optional = [THUMBNAIL_FIELD] if thumbnails else []
    metadata = [pa.field(name, pa.string()) for name in metadata_columns]
    return pa.schema([*RAW_FIELDS, *optional, *metadata])


def shard_index(path: PurePath) -> int | None:
    match = _RAW_SHARD_NAME.match(path.name)
    return int(match.group(1)) if match else None


def raw_shard_paths(raw_dir: str | os.PathLike[str]) -> list[Path]:
    """The finished shards of ``raw_dir`` in shard-number order (temp files are ignored)."""
    paths = [p for p in Path(raw_dir).glob(RAW_SHARD_GLOB) if shard_index(p) is not None]
    return sorted(paths, key=lambda p: shard_index(p) or 0)


def shard_path(raw_dir: Path, index: int) -> Path:
    return raw_dir / f"raw-{index:05d}.parquet"


@dataclass
class ExistingRaw:
    """What earlier runs left in a raw folder: latest outcome per URL, next shard number."""

    latest_outcome: dict[str, str] = field(default_factory=dict)
    next_shard_index: int = 0
    #: Latest ``ok`` row's validators per URL (filled only when asked for).
    validators: dict[str, Validators] = field(default_factory=dict)


def scan_existing(
    raw_dir: str | os.PathLike[str],
    with_validators: bool = False,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> ExistingRaw:
    """Read only the small columns of existing shards (never the image bytes).

    With ``filesystem``, ``raw_dir`` is a path on it (an S3 prefix read in place, say);
    otherwise a local folder.
    """
    paths: Sequence[str | Path]
    if filesystem is None:
        paths = raw_shard_paths(raw_dir)
    else:
        paths = remote_raw_shard_paths(filesystem, os.fspath(raw_dir))
    if not paths:
        return ExistingRaw()
    columns = ["url", "outcome", "fetched_at"]
    if with_validators:
        columns += ["etag", "last_modified", "sha256"]
    frame = _latest_per_url(_read_tables(paths, columns, filesystem)).to_pandas()
    latest = dict(zip(frame["url"], frame["outcome"], strict=True))
    validators: dict[str, Validators] = {}
    if with_validators:
        ok = frame[frame["outcome"] == "ok"].reindex(columns=columns)  # old shards lack some
        ok = ok.astype(object).where(ok.notna(), None)
        for url, etag, last_modified, sha256 in ok[
            ["url", "etag", "last_modified", "sha256"]
        ].itertuples(index=False, name=None):
            validators[url] = Validators(etag, last_modified, sha256)
    next_index = max(shard_index(PurePosixPath(p)) or 0 for p in paths) + 1
    return ExistingRaw(latest, next_index, validators)


def remote_raw_shard_paths(filesystem: fsspec.AbstractFileSystem, raw_dir: str) -> list[str]:
    """The finished shards under ``raw_dir`` of an fsspec file system, in shard-number order."""
    filesystem.invalidate_cache(raw_dir)  # another process (a Ray task) may have written some
    found = filesystem.glob(f"{raw_dir.rstrip('/')}/{RAW_SHARD_GLOB}")
    paths = [p for p in found if shard_index(PurePosixPath(p)) is not None]
    return sorted(paths, key=lambda p: shard_index(PurePosixPath(p)) or 0)


class RawShardWriter:
    """Buffers result rows and writes a shard whenever ``max_rows`` or ``max_bytes`` is reached.

    The byte bound keeps memory (and the 2 GiB offset limit of a ``binary`` column) in check
    when images are large; the row bound keeps shards a convenient size for the next stage.
    Rows are buffered column by column (one list per schema field), so that turning a batch
    into a table is one ``pa.array`` per column rather than a conversion per row.
    """

    def __init__(
        self,
        raw_dir: Path,
        schema: pa.Schema,
        first_index: int,
        max_rows: int,
        max_bytes: int,
        compression: str = RAW_SHARD_COMPRESSION,
        max_age_s: float | None = None,
    ) -> None:
        self.raw_dir = raw_dir
        self.schema = schema
        self.next_index = first_index
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.compression = compression
        self.max_age_s = max_age_s
        self.written: list[Path] = []
        self._names = schema.names
        self._columns: list[list[Any]] = [[] for _ in self._names]
        self._n_rows = 0
        self._buffered_bytes = 0
        self._oldest_row_at = 0.0

    def add(self, row: dict[str, Any]) -> bool:
        """Buffer ``row``; True when the buffer should be written out now.

        That is when it holds ``max_rows`` rows or ``max_bytes`` bytes, or when its oldest row
        waited ``max_age_s`` seconds: a slow run still saves its progress regularly, so a kill
        costs at most that much refetching.
        """
        now = time.monotonic()
        if not self._n_rows:
            self._oldest_row_at = now
        get = row.get
        for column, name in zip(self._columns, self._names, strict=True):
            column.append(get(name))
        self._n_rows += 1
        self._buffered_bytes += len(get("image_bytes") or b"")
        self._buffered_bytes += len(get(THUMBNAIL_FIELD.name) or b"")
        too_old = self.max_age_s is not None and now - self._oldest_row_at >= self.max_age_s
        return self._n_rows >= self.max_rows or self._buffered_bytes >= self.max_bytes or too_old

    def take_batch(self) -> tuple[Path, list[list[Any]]] | None:
        """Detach the buffered rows and reserve their shard path (None when empty).

        Cheap (the column lists change hands), so the event loop calls it; the costly part,
        building the Arrow table and writing it, is :meth:`write_batch`, which the caller
        runs in a worker thread while new rows arrive.
        """
        if not self._n_rows:
            return None
        path = shard_path(self.raw_dir, self.next_index)
        columns = self._columns
        self.next_index += 1
        self._columns = [[] for _ in self._names]
        self._n_rows = 0
        self._buffered_bytes = 0
        return path, columns

    def write_batch(self, path: Path, columns: list[list[Any]]) -> Path:
        """Write a batch from :meth:`take_batch` atomically to ``path``."""
        arrays = [
            _binary_array(column) if field.type == pa.binary() else pa.array(column, field.type)
            for column, field in zip(columns, self.schema, strict=True)
        ]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        dictionary = [name for name in table.column_names if name not in _NO_DICTIONARY]
        level = RAW_SHARD_COMPRESSION_LEVEL if self.compression == "zstd" else None
        atomic_write(
            path,
            lambda tmp: pq.write_table(
                table,
                tmp,
                compression=self.compression,
                compression_level=level,
                use_dictionary=dictionary,
            ),
        )
        self.written.append(path)
        return path

    def flush(self) -> Path | None:
        batch = self.take_batch()
        return self.write_batch(*batch) if batch else None


def _binary_array(values: list[bytes | None]) -> pa.Array:
    """``pa.array(values, pa.binary())`` built from one joined buffer.

    Arrow's builder appends and regrows value by value, which measured ten times slower for
    image-sized values (2.2 s against 0.25 s for 3,000 thumbnails of 48 KiB).
    """
    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    total = int(lengths.sum())
    if total > np.iinfo(np.int32).max:  # past binary's 32-bit offsets: let Arrow chunk it
        return pa.array(values, pa.binary())
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    data = b"".join(v for v in values if v is not None)
    validity = None
    if any(v is None for v in values):
        valid = np.fromiter((v is not None for v in values), np.bool_, len(values))
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(values), buffers)


def _read_tables(
    paths: Sequence[str | Path],
    columns: Sequence[str] | None,
    filesystem: fsspec.AbstractFileSystem | None = None,
) -> pa.Table:
    tables = []
    for path in paths:
        try:
            # A shard from a run with another manifest may lack some metadata columns.
            present = (
                None if columns is None else [c for c in columns if c in _names(path, filesystem)]
            )
            tables.append(pq.read_table(path, columns=present, filesystem=filesystem))
        except (pa.ArrowInvalid, OSError) as error:
            raise ValueError(
                f"cannot read raw shard {path}: {error}. Delete it and run the scrape again "
                "to fetch its URLs anew."
            ) from error
    # Runs with different manifests may carry different metadata columns: union them.
    return pa.concat_tables(tables, promote_options="default")


def _names(path: str | Path, filesystem: fsspec.AbstractFileSystem | None = None) -> list[str]:
    return pq.read_schema(path, filesystem=filesystem).names


def _latest_per_url(table: pa.Table) -> pa.Table:
    """Keep the row with the newest ``fetched_at`` for each URL, oldest first.

    Ties (same microsecond) go to the row read last, i.e. the one from the newer shard.
    """
    if table.num_rows == 0:
        return table
    position = pa.array(range(table.num_rows), pa.int64())
    order = pc.sort_indices(
        table.append_column("__position", position),
        sort_keys=[("fetched_at", "descending"), ("__position", "descending")],
    )
    seen: set[str] = set()
    keep = []
    urls_newest_first = table.column("url").take(order).to_pylist()
    for index, url in zip(order.to_pylist(), urls_newest_first, strict=True):
        if url not in seen:
            seen.add(url)
            keep.append(index)
    keep.reverse()  # oldest first, like the shards themselves
    return table.take(pa.array(keep, pa.int64()))


def read_raw(raw_dir: str | os.PathLike[str], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All raw shards of ``raw_dir`` as one DataFrame, the latest row per URL.

    ``columns`` limits what is read (pass it without ``image_bytes`` to keep memory small);
    ``url`` and ``fetched_at`` are always read to pick the latest row, and dropped again when
    not asked for. ``status``, ``width`` and ``height`` come back as nullable ``Int32``.
    """
    raw_dir = Path(raw_dir)
    paths = raw_shard_paths(raw_dir)
    if not paths:
        raise FileNotFoundError(
            f"no raw shards ({RAW_SHARD_GLOB}) in {raw_dir}: materialise `raw_images` or run "
            "`carmodels scrape` first"
        )
    wanted = list(dict.fromkeys(columns)) if columns is not None else None
    to_read = None if wanted is None else list(dict.fromkeys(["url", "fetched_at", *wanted]))
    if to_read is not None:
        available = set(RAW_COLUMNS).union(*(_names(p) for p in paths))
        unknown = [c for c in to_read if c not in available]
        if unknown:
            raise KeyError(f"raw shards in {raw_dir} have no column(s) {unknown}")
    table = _latest_per_url(_read_tables(paths, to_read))
    # Nullable integers: a missing status or size stays missing instead of turning into NaN.
    frame = table.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    return frame[wanted] if wanted is not None else frame


# --------------------------------------------------------------------------- stage readers


def raw_shard_files(raw_dir: str | os.PathLike[str]) -> list[Path]:
    raw_dir = Path(raw_dir)
    files = sorted(raw_dir.glob(RAW_SHARD_GLOB)) if raw_dir.is_dir() else []
    if not files:
        raise MissingInputError(
            f"No {RAW_SHARD_GLOB} files in {raw_dir}: materialise `raw_images` "
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
