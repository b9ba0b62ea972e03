"""What a pull or push compares and moves: file records, sameness, parallel transfers.

Both sides of a synchronised folder are listed as records (``LocalFile``: size and mtime;
``RemoteFile``: size and a fingerprint that changes with the object). ``same_bytes`` decides
that a file need not be transferred without reading it when the per-folder record of the last
sync (``sync_record``) still matches both sides, and otherwise through the MD5 an ETag
carries. ``in_parallel`` runs the transfers; ``SyncReport`` says what they did.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Concurrent transfers of one pull or push (s3fs and friends are thread-safe).
MAX_TRANSFERS = 8
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class SyncReport:
    """What one ``pull`` or ``push`` did; names are relative to the root (``shards/x.parquet``)."""

    copied: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    unchanged: int = 0
    bytes_copied: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class LocalFile:
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    #: Changes whenever the object does: the ETag where the store has one, else size + time.
    fingerprint: str
    #: The object's MD5 when its ETag is one (single-part uploads), else None.
    md5: str | None


def remote_file(path: str, info: dict[str, Any]) -> RemoteFile:
    size = int(info.get("size") or 0)
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag:
        fingerprint = f"etag:{etag}"
    else:
        when = next(
            (info[k] for k in ("LastModified", "mtime", "updated", "created") if k in info), ""
        )
        fingerprint = f"size:{size}:{when}"
    return RemoteFile(path, size, fingerprint, etag if _PLAIN_MD5.match(etag) else None)


def sync_record(path: Path, remote: RemoteFile) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "remote": remote.fingerprint}


def same_bytes(
    name: str, local: LocalFile | None, remote: RemoteFile | None, records: dict[str, Any]
) -> bool:
    """Whether a local and a remote file hold the same bytes, reading the file only if unavoidable.

    Unchanged on both sides since the last sync (local size and mtime, remote fingerprint) means
    equal. Otherwise equal sizes are confirmed through the MD5 an ETag carries, when it does one.
    """
    if local is None or remote is None or local.size != remote.size:
        return False
    record = records.get(name)
    if (
        record is not None
        and record.get("size") == local.size
        and record.get("mtime_ns") == local.mtime_ns
        and record.get("remote") == remote.fingerprint
    ):
        return True
    if remote.md5 is not None:
        return md5_hex(local.path) == remote.md5
    return False


def md5_hex(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def in_parallel(fn: Callable[[Any], None], items: Sequence[Any]) -> None:
    """Run ``fn`` over ``items`` on a few threads; the first error is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    pool = ThreadPoolExecutor(max_workers=min(MAX_TRANSFERS, len(items)))
    try:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
    finally:
        # On an error, transfers not yet started are dropped; running ones finish.
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "MAX_TRANSFERS",
    "LocalFile",
    "RemoteFile",
    "SyncReport",
    "in_parallel",
    "md5_hex",
    "remote_file",
    "same_bytes",
    "sync_record",
]
