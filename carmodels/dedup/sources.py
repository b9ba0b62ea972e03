"""Where a dedup run finds its photos: one raw folder, or the raw folders of several partitions.

A partitioned ingest gives each partition (a manifest file, or a batch of a large one) its own
raw folder, and the shards of different folders share names (``raw-00000.parquet`` in each),
so a photo is located by its partition and its shard name. ``partition_dirs`` turns what a
caller passes into partition name → folder, checked before anything is read or written;
``iter_photo_bytes`` reads the bytes of wanted photos across several folders, each photo once,
for the hashing and the contact sheet. Apart from the stages because both the one-folder stage
(``stage``) and the partitioned one (``incremental``) read through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from carmodels.errors import InputError
from carmodels.scrape.raw import iter_raw_bytes

#: A partitioned run's input: partition name → raw folder, or raw folders named by their
#: folder name.
Partitions = Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]]


def partition_dirs(partitions: Partitions) -> dict[str, Path]:
    """Partition name → raw folder, in name order.

    A sequence of folders names each partition by its folder's name (``raw/<partition>/``);
    two folders of one name would be one partition, so that is refused rather than guessed.
    Whether each folder holds raw shards is checked when it is read.
    """
    if isinstance(partitions, str | os.PathLike):
        raise InputError(
            f"Partitions must be a list of raw folders or a mapping name -> folder, got the "
            f"single path {os.fspath(partitions)!r}; pass [{os.fspath(partitions)!r}]."
        )
    if isinstance(partitions, Mapping):
        named = {str(name): Path(path) for name, path in partitions.items()}
    else:
        named = {}
        for path in map(Path, partitions):
            if path.name in named:
                raise InputError(
                    f"Raw folders {named[path.name]} and {path} would both be partition "
                    f"{path.name!r}; pass a mapping of distinct partition names to folders."
                )
            named[path.name] = path
    if not named:
        raise InputError(
            "No partitions given: pass every partition's raw folder (materialise `raw_images` "
            "or run `carmodels scrape` first)."
        )
    bad = [name for name in named if not name.strip()]
    if bad:
        raise InputError(f"Partition names must not be empty, got {bad!r}; name each partition.")
    return dict(sorted(named.items()))


def iter_photo_bytes(
    sources: Iterable[tuple[Path, Iterable[str] | None]],
    wanted: Iterable[str],
    batch_rows: int,
) -> Iterator[tuple[str, str, bytes]]:
    """(raw shard name, sha256, bytes) of the ``wanted`` photos, each once, read from the
    ``(raw folder, shard names or None for all)`` sources in turn (see ``iter_raw_bytes``).

    Equal sha256 means equal bytes, so a photo found in one partition is not looked for in
    the next ones.
    """
    remaining = set(wanted)
    for raw_dir, shard_names in sources:
        if not remaining:
            return
        for shard, sha256, data in iter_raw_bytes(raw_dir, set(remaining), batch_rows, shard_names):
            if sha256 in remaining:
                remaining.discard(sha256)
                yield shard, sha256, data


__all__ = ["Partitions", "iter_photo_bytes", "partition_dirs"]
