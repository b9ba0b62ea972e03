"""Find manifest files that are new or changed in a watched folder, and cut them into batches.

Used by the Dagster sensor that starts ingest when someone drops a manifest into a folder;
kept here, free of Dagster, so that the rule for "changed" and the batches of a partitioned
ingest are tested on their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from carmodels.errors import InputError, MissingInputError
from carmodels.scrape.manifest import MANIFEST_SUFFIXES, read_manifest

#: Every suffix read_manifest understands.
WATCHED_SUFFIXES: tuple[str, ...] = tuple(s for group in MANIFEST_SUFFIXES.values() for s in group)


@dataclass(frozen=True)
class FileState:
    """What identifies one version of a file: its size and modification time (ns)."""

    size: int
    mtime_ns: int

    def token(self) -> str:
        return f"{self.size}-{self.mtime_ns}"


def scan_manifests(folder: str | os.PathLike[str]) -> dict[str, FileState]:
    """The manifest files directly inside ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    states = {}
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        # Editors and partial copies leave hidden or temporary files: wait for the real one.
        if name.startswith(".") or not path.is_file() or not name.endswith(WATCHED_SUFFIXES):
            continue
        stat = path.stat()
        states[str(path.resolve())] = FileState(stat.st_size, stat.st_mtime_ns)
    return states


def changed_manifests(
    current: dict[str, FileState], previous: dict[str, str]
) -> list[tuple[str, FileState]]:
    """Files in ``current`` that are new or whose token differs from ``previous`` (path→token)."""
    return [(path, state) for path, state in current.items() if previous.get(path) != state.token()]


# --------------------------------------------------------------------------- manifest batches
#
# At scale, each manifest file in the watched folder is ingested as one or more partitions: a
# fixed-size batch of its distinct URLs each, so that a 50-million-row file becomes many
# partitions a backfill can spread over runs, and a small file is one partition. A partition
# key names its file and batch (``listings.csv@0000``), so a run can find its rows from the
# key alone: that is what a backfill of many partitions gives each run.

#: Separates a manifest's file name from its batch number in a partition key.
BATCH_SEPARATOR = "@"
#: Digits of the batch number (more are used past 9,999 batches).
BATCH_DIGITS = 4


def partition_key(file_name: str, batch: int) -> str:
    """The partition key of batch ``batch`` of manifest ``file_name`` (``listings.csv@0000``)."""
    return f"{file_name}{BATCH_SEPARATOR}{batch:0{BATCH_DIGITS}d}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """``(file name, batch)`` of a partition key, or InputError naming the expected form."""
    file_name, separator, batch = key.rpartition(BATCH_SEPARATOR)
    if not separator or not file_name or not batch.isdigit() or "/" in file_name:
        raise InputError(
            f"Partition {key!r} is not a manifest batch: expected <file name>"
            f"{BATCH_SEPARATOR}<batch number>, e.g. listings.csv{BATCH_SEPARATOR}0000 (the "
            "manifest sensor adds such partitions for each file in the watched folder)."
        )
    return file_name, int(batch)


def batch_count(n_urls: int, batch_rows: int) -> int:
    """Batches of at most ``batch_rows`` URLs that ``n_urls`` make (at least one)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    return max(1, -(-n_urls // batch_rows))


def manifest_partition_keys(
    path: str | os.PathLike[str],
    batch_rows: int,
    url_column: str | None = None,
    row_filter: str | None = None,
) -> list[str]:
    """The partition keys of a manifest file: one per ``batch_rows`` of its distinct URLs.

    Reads the file (as ``read_manifest`` does, so a bad file is an InputError naming it).
    """
    frame = read_manifest(path, url_column=url_column, row_filter=row_filter)
    return [partition_key(Path(path).name, b) for b in range(batch_count(len(frame), batch_rows))]


def read_manifest_partition(
    folder: str | os.PathLike[str],
    key: str,
    batch_rows: int,
    url_column: str | None = None,
    row_filter: str | None = None,
) -> pd.DataFrame:
    """The listings of partition ``key``: its batch of the distinct URLs of its file in
    ``folder``, in file order. ``attrs`` of the whole file's read are kept.

    Raises InputError when the key is malformed, the file is gone, or the batch lies past the
    file's end (the file shrank since the partition was added).
    """
    file_name, batch = parse_partition_key(key)
    path = Path(folder) / file_name
    if not path.is_file():
        raise MissingInputError(
            f"Partition {key!r} reads {path}, which is not there: put the manifest back in "
            f"{folder}, or delete the partition in the UI (Partitions tab of the asset)."
        )
    frame = read_manifest(path, url_column=url_column, row_filter=row_filter)
    n_batches = batch_count(len(frame), batch_rows)
    if batch >= n_batches:
        raise InputError(
            f"Partition {key!r} is batch {batch} of {path}, which now has {len(frame)} URLs "
            f"({n_batches} batch(es) of {batch_rows}): the file shrank or batch_rows changed; "
            "delete the partition, or restore the file."
        )
    part = frame.iloc[batch * batch_rows : (batch + 1) * batch_rows].reset_index(drop=True)
    part.attrs = dict(frame.attrs)
    return part
