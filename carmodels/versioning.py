"""Content versions of a stage's outputs: short hashes that change exactly when the data does.

The orchestration layer reports them as data versions, so that a step whose inputs have the
same versions as last time can skip its work and its downstream stays in sync. They hash
content, never modification times: a working copy pulled from object storage, or a rewrite of
identical files, gives the same version.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

#: Hex digits kept of a sha256: 64 bits, plenty to tell a dataset's versions apart.
VERSION_LENGTH = 16
#: Read size when hashing files.
_CHUNK_BYTES = 1 << 20

# Hashes of files already read in this process, keyed by (path, size, mtime_ns): an unchanged
# file is hashed once however often its version is asked for.
_file_digests: dict[tuple[str, int, int], str] = {}


def _short(digest: hashlib._Hash) -> str:
    return digest.hexdigest()[:VERSION_LENGTH]


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (memoised per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _file_digests.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    _file_digests[key] = digest.hexdigest()
    return _file_digests[key]


def files_version(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Version of a set of files: their names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    return _short(digest)


def contents_version(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Version of a set of files' contents only: renaming or re-chunking keeps it if the bytes
    of each file are unchanged (shard generations get new names when rewritten)."""
    digest = hashlib.sha256()
    for file_hash in sorted(file_digest(p) for p in paths):
        digest.update(f"{file_hash}\n".encode())
    return _short(digest)


def frame_version(frame: pd.DataFrame, columns: Iterable[str] | None = None) -> str:
    """Version of a table's content, independent of its row order.

    Rows are hashed one by one (pandas' stable row hash) and the sorted row hashes hashed
    again, so the same rows written in another order or shard layout give the same version.
    """
    selected = frame if columns is None else frame[list(columns)]
    digest = hashlib.sha256(",".join(map(str, selected.columns)).encode())
    rows = np.sort(pd.util.hash_pandas_object(selected, index=False).to_numpy())
    digest.update(rows.tobytes())
    return _short(digest)


def json_version(value: object) -> str:
    """Version of a JSON-serialisable value (keys sorted, so dict order does not matter)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return _short(hashlib.sha256(text.encode()))


__all__ = [
    "VERSION_LENGTH",
    "contents_version",
    "file_digest",
    "files_version",
    "frame_version",
    "json_version",
]
