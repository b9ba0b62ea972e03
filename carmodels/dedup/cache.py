"""The hash cache ``hashes.parquet``: its schema, its I/O, and hashing only what it lacks.

Hashes and colour thumbnails are keyed by sha256 and stamped with ``DedupConfig.hash_spec``, so
a later run over grown raw shards hashes only the new photos, and a run with another hash
function (or a cache of an older layout) hashes everything again rather than misreading it.
``_hash_new_images`` reads the missing photos' bytes batch by batch and hashes them in threads,
or in a process pool when there are thousands. Apart from the stage because the cache's layout
and its invalidation are one concern, versioned by ``HASH_CACHE_VERSION``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits

from carmodels.dedup.hashing import (
    _area_weights,
    _hash_chunk,
    _hash_chunk_one_blas_thread,
    _HashTask,
    _lanczos_weights,
)
from carmodels.dedup.sources import iter_photo_bytes
from carmodels.io import atomic_write_parquet
from carmodels.parallel import chunked, map_in_processes, map_in_threads

if TYPE_CHECKING:
    from carmodels.dedup.config import DedupConfig

#: Parquet key-value metadata saying which hash function filled ``hashes.parquet``.
_HASH_SPEC_KEY = b"carmodels.hash_spec"

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
    sources: Sequence[tuple[Path, pd.DataFrame]],
    cached: pd.DataFrame,
    config: DedupConfig,
    on_progress: Callable[[int, int], None] | None,
) -> tuple[pd.DataFrame, int]:
    """Hashes of every distinct sha256 of the sources' frames (cache + new), and how many
    were hashed.

    ``sources`` are ``(raw folder, rows)`` with rows holding ``sha256, raw_shard``: one folder
    for ``deduplicate``, one per partition for an incremental run. A photo missing from the
    cache is read from the first source that lists it.
    """
    wanted = set().union(*(frame["sha256"] for _, frame in sources))
    todo = sorted(wanted - set(cached["sha256"]))
    total = len(todo)
    if on_progress:
        on_progress(0, total)
    rows: list[dict[str, object]] = []
    if todo:
        todo_set = set(todo)
        # Only the shards that hold a photo to hash (its first row) are opened.
        shards = []
        for raw_dir, frame in sources:
            first_rows = frame.drop_duplicates("sha256")
            holding = first_rows.loc[first_rows["sha256"].isin(todo_set), "raw_shard"]
            shards.append((raw_dir, set(holding)))
        tasks = (
            _HashTask(sha256, data)
            for _, sha256, data in iter_photo_bytes(
                [(raw_dir, names) for raw_dir, names in shards if names],
                todo,
                config.read_batch_rows,
            )
        )
        processes = max(1, min(config.workers, total // config.min_images_per_worker))
        worker = functools.partial(_hash_chunk, config=config)
        chunks = chunked(tasks, config.chunk_size)
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
                results = map_in_threads(worker, chunks, config.workers)
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
