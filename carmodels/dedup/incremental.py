"""Dedup across every partition, incrementally: each run decides only the photos it has not
decided before, against the images already kept.

A partitioned ingest gives each partition (a manifest file, or a batch of a large one) its own
raw folder. ``deduplicate_incremental`` takes all of them and writes one ``unique.parquet``
(the contract of ``carmodels.dedup.schema``, plus a ``partition`` column) covering every
partition. Its record (``carmodels.dedup.record``) says which partitions were done, at which
content version, and the cluster of every image. A run then:

1. stamps every partition's raw shards (reading only files it has not seen) and sorts the
   partitions into unchanged, new, changed and removed (recorded but not passed);
2. drops the images of removed and changed partitions from the record; an image whose cluster
   lost a member (and is not that cluster's kept image) is decided again below, since what
   tied it to its kept image may be gone;
3. hashes only photos the hash cache lacks: those of new and changed partitions (and kept
   or re-decided ones only if the cache lost their thumbnails);
4. decides the new photos (and those to decide again), all in one batch:

   - within the batch, as ``deduplicate`` does: connected components of exact and verified
     near pairs, each keeping its best member (most pixels, then largest file, then
     smallest URL);
   - against earlier clusters: the batch is searched against the kept images only
     (``find_near_duplicates_between``), never the kept ones against each other; a component
     with a verified pair to a kept image, or a photo byte-identical to any earlier one,
     joins that image's cluster (the closest such link; ties by URL, then partition) and
     keeps nothing; a component with no link is a new cluster.

Guarantees, against ``deduplicate`` run on all the same photos at once (same settings):

- No two kept images are a duplicate pair (within ``threshold``, colours agreeing), exactly as
  at once: the batch's kept images have no link to the earlier kept ones, nor to each other.
- An image kept by one run stays kept by every later run while its partition is passed
  unchanged, so the training data built from ``unique.parquet`` does not churn.
- Every incremental cluster lies inside one all-at-once cluster (each is tied together by
  duplicate pairs). So each all-at-once cluster keeps at least one image, never fewer images
  are kept than at once, and extra ones occur only in a cluster holding photos last decided
  in different runs (a photo is decided again when its cluster loses a member).
- When no all-at-once cluster holds such photos, the result is the all-at-once result: the
  same kept images and clusters, numbered the same, ``unique.parquet`` and
  ``clusters.parquet`` row for row (but for ``raw_shard`` and ``partition``, which say where
  the photos are), provided no URL is in two partitions (see below). A run without a usable
  record (the first one, or one after a settings change) decides everything in one batch, so
  it is always this case.

Where a cluster spans runs, three things differ from at once: (1) a newer, better photo of an
image already kept is dropped in its favour; (2) new photos that link two earlier clusters
join one of them (the closer) instead of merging them, so both earlier kept images stay;
(3) a new photo that is a near duplicate only of an earlier *dropped* photo (a chain:
at once it would join that photo's cluster) is kept as a cluster of its own.

A partition is identified by its name, and its content by its raw shards' bytes: a changed
partition (a new, removed or rewritten shard) is redone as if removed and added again, which
may also re-decide images of other partitions that were in its clusters; a removed partition's
images leave the output. A URL present in two partitions counts once in each (``deduplicate``
of one folder keeps only its latest fetch); byte-identical fetches are exact duplicates.
Cluster ids are numbered by size on every run, as by ``deduplicate``: they are not stable
across runs, the kept images are.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carmodels.dedup.cache import _hash_new_images, _read_hash_cache, _write_hash_cache
from carmodels.dedup.cluster import _cluster
from carmodels.dedup.config import DedupConfig
from carmodels.dedup.record import (
    MEMBER_COLUMNS,
    DedupRecord,
    PartitionState,
    commit_record,
    read_record,
    shard_stamps,
    shards_version,
    write_members,
)
from carmodels.dedup.schema import HASHES_FILE, PARTITION_COLUMN, RECORD_FILE
from carmodels.dedup.search import SearchStats, find_near_duplicates_between
from carmodels.dedup.sources import Partitions, partition_dirs
from carmodels.dedup.stage import (
    DedupResult,
    _describe_clusters,
    _near_pairs,
    _undecodable_by_reason,
    _with_hashes,
    _write_outputs,
)
from carmodels.dedup.verify import stack_thumbnails, verify_pairs
from carmodels.errors import InputError
from carmodels.scrape.raw import CLASHING_METADATA_PREFIX, read_raw_index


@dataclass(frozen=True)
class IncrementalDedupResult(DedupResult):
    """``DedupResult`` over every partition, and what this run had to do."""

    #: Partitions by what happened to them since the last run (names, sorted).
    partitions_new: tuple[str, ...] = ()
    partitions_changed: tuple[str, ...] = ()
    partitions_removed: tuple[str, ...] = ()
    partitions_unchanged: tuple[str, ...] = ()
    #: Images decided in this run: those of new and changed partitions, plus ``n_redecided``.
    n_decided: int = 0
    #: Earlier images decided again because their cluster lost a member.
    n_redecided: int = 0
    #: Distinct photos of this run's batch that were searched (against each other and the
    #: kept images), and the distinct kept images they were searched against.
    n_searched_new: int = 0
    n_searched_kept: int = 0
    #: Candidate pairs the two searches checked (all involve a photo of the batch).
    search_candidates: int = 0
    #: Why the record was not extended (None when it was): e.g. no earlier record, or the
    #: duplicate settings changed. Everything was then decided in one batch.
    fresh_start: str | None = None


def deduplicate_incremental(
    partitions: Partitions,
    out_dir: str | os.PathLike[str],
    config: DedupConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> IncrementalDedupResult:
    """Deduplicate every partition's raw shards into one ``unique.parquet`` in ``out_dir``,
    deciding only what the record there has not decided yet (see the module docstring for the
    rule and its guarantees against ``deduplicate``).

    ``partitions`` is every partition, each time: a mapping name -> raw folder, or raw folders
    named by their folder name. A recorded partition that is not passed is removed from the
    output. Writes what ``deduplicate`` writes (``unique.parquet`` with a ``partition``
    column, ``clusters.parquet``, ``hashes.parquet``, ``clusters.png``) and the record
    (``members-<generation>.parquet``, then ``record.json``). ``on_progress(done, total)``
    counts images hashed in this run. Bad input (a folder without raw shards, an unreadable
    shard) raises an ``InputError`` before anything is written.
    """
    config = config or DedupConfig()
    started = time.monotonic()
    dirs = partition_dirs(partitions)
    out_dir = Path(out_dir)
    record, fresh_start = read_record(out_dir, config)

    # Everything read and checked before the first write: bad input leaves the outputs and the
    # record of the last run as they were.
    stamps = {name: shard_stamps(path, record.partitions.get(name)) for name, path in dirs.items()}
    new, changed, removed, unchanged = _changes(record, stamps)
    index, metadata_of = _read_indexes({name: dirs[name] for name in [*new, *changed]})
    survivors, redecided = _split_members(record.members, gone={*removed, *changed})
    n_input = {name: record.partitions[name].n_input for name in unchanged}
    n_input |= index[PARTITION_COLUMN].value_counts().to_dict()
    if not sum(n_input.values()):
        raise InputError(
            f"The raw shards of partitions {sorted(dirs)} hold no successfully fetched image "
            "(outcome 'ok'); run `carmodels scrape` again (its outcome counts say why the "
            "fetches failed)."
        )

    cached = _read_hash_cache(out_dir / HASHES_FILE, config)
    kept = survivors[survivors["image_id"] == survivors["kept_id"]]
    # The colour check needs the thumbnails of the kept images and of those decided again:
    # they are in the cache, and hashed again only if the cache lost them.
    to_hash = [index, kept, redecided] if config.verify_colour else [index]
    hashes, n_hashed = _hash_new_images(
        _by_partition(pd.concat(to_hash, ignore_index=True), dirs), cached, config, on_progress
    )
    _write_hash_cache(out_dir / HASHES_FILE, hashes, config)

    fresh, _ = _with_hashes(index, hashes)
    fresh["image_id"] = record.next_id + np.arange(len(fresh), dtype=np.int64)
    batch = _sorted(pd.concat([fresh, _with_pixels(redecided, hashes)], ignore_index=True))
    stats = SearchStats()
    batch["kept_id"] = _place(batch, _with_pixels(kept, hashes), survivors, config, stats)
    members = _sorted(pd.concat([survivors, batch], ignore_index=True))
    undecodable = {name: _undecodable_by_reason(frame, hashes) for name, frame in _split(index)}
    states = {}
    for name, raw_dir in dirs.items():
        if name in unchanged:
            # Same content: what was counted stands; the stamps may be newer (a new copy).
            states[name] = replace(
                record.partitions[name], shards=stamps[name], raw_dir=str(raw_dir)
            )
        else:
            states[name] = PartitionState(
                version=shards_version(stamps[name]),
                shards=stamps[name],
                n_input=n_input.get(name, 0),
                undecodable_by_reason=undecodable.get(name, {}),
                metadata=metadata_of[name],
                raw_dir=str(raw_dir),
            )
    # The listing columns of the partitions passed: a removed partition's go with it.
    metadata = list(dict.fromkeys(c for state in states.values() for c in state.metadata))
    members = _string_metadata(members.reindex(columns=[*MEMBER_COLUMNS, *metadata]))
    undecodable_by_reason = _sum_counts(s.undecodable_by_reason for s in states.values())
    if members.empty:
        raise InputError(
            f"None of the {sum(n_input.values())} fetched images in partitions {sorted(dirs)} "
            f"decodes ({undecodable_by_reason}); check what the scraped URLs serve."
        )

    # Write: the next members file, the outputs, then the record that commits them.
    committed = DedupRecord(
        decision=record.decision,
        generation=record.generation + 1,
        partitions=states,
        members=members,
        next_id=record.next_id + len(fresh),
    )
    members_name = write_members(out_dir, committed.generation, members)
    images = _with_pixels(members, None)
    kept_flags = (images["image_id"] == images["kept_id"]).to_numpy()
    _describe_clusters(images, pd.factorize(images["kept_id"])[0], kept_flags, config)
    outputs = _write_outputs(images, [PARTITION_COLUMN, *metadata], out_dir, dirs, config)
    commit_record(out_dir, committed, members_name)
    return IncrementalDedupResult(
        n_input=sum(n_input.values()),
        **outputs,
        elapsed_s=time.monotonic() - started,
        n_undecodable=sum(undecodable_by_reason.values()),
        undecodable_by_reason=undecodable_by_reason,
        n_hashed=n_hashed,
        partitions_new=tuple(new),
        partitions_changed=tuple(changed),
        partitions_removed=tuple(removed),
        partitions_unchanged=tuple(unchanged),
        n_decided=len(batch),
        n_redecided=len(redecided),
        n_searched_new=int(batch["sha256"].nunique()),
        n_searched_kept=len(kept) if len(batch) else 0,  # an empty batch searches nothing
        search_candidates=stats.candidates,
        fresh_start=fresh_start,
    )


def _changes(
    record: DedupRecord, stamps: dict[str, dict[str, dict[str, Any]]]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """The partitions passed (``stamps``) that are new, changed (another content version than
    recorded) or unchanged, and the recorded ones that were not passed (removed); sorted."""
    recorded = record.partitions
    new = sorted(set(stamps) - set(recorded))
    changed = sorted(
        name
        for name, shards in stamps.items()
        if name in recorded and shards_version(shards) != recorded[name].version
    )
    removed = sorted(set(recorded) - set(stamps))
    unchanged = sorted(set(stamps) - set(new) - set(changed))
    return new, changed, removed, unchanged


def _read_indexes(dirs: dict[str, Path]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The raw index (``read_raw_index``) of each partition, with its ``partition`` column;
    and each partition's listing metadata columns."""
    frames, metadata = [], {}
    for name, raw_dir in dirs.items():
        index = read_raw_index(raw_dir)
        # A listing column called "partition" keeps its values under the raw shards' name for
        # a clashing metadata column.
        clash = CLASHING_METADATA_PREFIX + PARTITION_COLUMN
        index = index.rename(columns={PARTITION_COLUMN: clash})
        metadata[name] = [c for c in index.columns if c not in MEMBER_COLUMNS]
        frames.append(index.assign(**{PARTITION_COLUMN: name}))
    if not frames:
        fixed = ["url", "sha256", "raw_shard", "fetched_at", PARTITION_COLUMN]
        return pd.DataFrame({c: pd.Series(dtype=MEMBER_COLUMNS[c]) for c in fixed}), metadata
    return _string_metadata(pd.concat(frames, ignore_index=True)), metadata


def _split_members(members: pd.DataFrame, gone: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The recorded members that stand (in passed, unchanged partitions, in clusters that lost
    no member, or kept), and those to decide again (in a cluster that lost a member).

    A dropped image can be tied to its kept image through a chain of duplicate pairs; when a
    member of its cluster leaves, the chain may break, so it is decided again rather than left
    in a cluster it may no longer belong to. A kept image whose partition stays stays kept.
    """
    leaving = members[PARTITION_COLUMN].isin(gone)
    touched = members.loc[leaving, "kept_id"].unique()
    staying = members[~leaving]
    again = staying["kept_id"].isin(touched) & (staying["image_id"] != staying["kept_id"])
    return staying[~again].reset_index(drop=True), staying[again].reset_index(drop=True)


def _by_partition(frame: pd.DataFrame, dirs: dict[str, Path]) -> list[tuple[Path, pd.DataFrame]]:
    return [(dirs[name], rows) for name, rows in _split(frame)]


def _split(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(str(name), rows) for name, rows in frame.groupby(PARTITION_COLUMN, sort=True)]


def _with_pixels(members: pd.DataFrame, hashes: pd.DataFrame | None) -> pd.DataFrame:
    """Recorded ``members`` with ``pixels`` (the kept-image ranking) and, from ``hashes``, the
    ``thumbnails`` of the colour check."""
    frame = members.assign(pixels=members["width"].astype(np.int64) * members["height"])
    if hashes is None:
        return frame.reset_index(drop=True)
    thumbnails = hashes.drop_duplicates("sha256")[["sha256", "thumbnails"]]
    frame = frame.merge(thumbnails, on="sha256", how="left", validate="many_to_one")
    return frame.reset_index(drop=True)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """By URL, then partition: the order ``deduplicate`` decides in (it sorts by URL), so that
    ties break the same way and cluster ids come out the same."""
    frame = _string_metadata(frame)
    return frame.sort_values(["url", PARTITION_COLUMN], kind="stable").reset_index(drop=True)


def _string_metadata(frame: pd.DataFrame) -> pd.DataFrame:
    """Listing metadata as nullable strings, as ``read_raw_index`` gives it (a partition
    without a column fills it with missing values, which would otherwise change its type)."""
    metadata = [c for c in frame.columns if c not in MEMBER_COLUMNS and c not in _WORK_COLUMNS]
    return frame.astype(dict.fromkeys(metadata, "string"))


#: Columns a batch carries while it is decided (some of them recorded too): not metadata.
_WORK_COLUMNS = ("hash", "hash_flipped", "thumbnails", "pixels", "width", "height", "n_bytes")


def _place(
    batch: pd.DataFrame,
    kept: pd.DataFrame,
    survivors: pd.DataFrame,
    config: DedupConfig,
    stats: SearchStats,
) -> np.ndarray:
    """The ``kept_id`` of each row of ``batch`` (sorted by ``_sorted``, with hashes, pixels
    and, for the colour check, thumbnails): the rule of the module docstring.

    ``kept`` are the kept images of the earlier clusters that stand, ``survivors`` all their
    members (for byte-identical copies).
    """
    if batch.empty:
        return np.empty(0, dtype=np.int64)
    labels, best = _cluster(batch, _near_pairs(batch, config, stats))
    # Each label's own kept image, then the earlier cluster it joins instead, if it links one.
    kept_id = pd.Series(batch["image_id"].to_numpy()[best], index=labels[best]).sort_index()
    distinct = batch.drop_duplicates("sha256")  # the order _cluster indexes sha256 values in
    links = _links(distinct, kept, survivors, config, stats)
    if len(links):
        links["label"] = labels[distinct.index.to_numpy()[links["j"].to_numpy()]]
        closest = links.sort_values(
            ["distance", "kept_url", "kept_partition"], kind="stable"
        ).drop_duplicates("label")
        kept_id.loc[closest["label"].to_numpy()] = closest["kept_id"].to_numpy()
    return kept_id.loc[labels].to_numpy(np.int64)


def _links(
    distinct: pd.DataFrame,
    kept: pd.DataFrame,
    survivors: pd.DataFrame,
    config: DedupConfig,
    stats: SearchStats,
) -> pd.DataFrame:
    """Ties of the batch's distinct photos (``j``, their position in ``distinct``) to earlier
    clusters: ``kept_id``, ``distance`` and the kept image's URL and partition (tie-breaks).

    A verified near pair with a kept image, found by searching the batch against the kept
    images only; and a byte-identical copy of any earlier member (distance 0), so that exact
    copies always share a cluster, as at once.
    """
    flip = config.flip_aware
    pairs = find_near_duplicates_between(
        kept["hash"].to_numpy(np.uint64),
        distinct["hash"].to_numpy(np.uint64),
        config.threshold,
        kept["hash_flipped"].to_numpy(np.uint64) if flip else None,
        distinct["hash_flipped"].to_numpy(np.uint64) if flip else None,
        bits=config.hash_bits,
        stats=stats,
        workers=config.workers,
    )
    if config.verify_colour and len(pairs):
        blobs = pd.concat([kept["thumbnails"], distinct["thumbnails"]], ignore_index=True)
        if blobs.isna().any():
            raise InputError(
                "The hash cache lacks the thumbnails of recorded images and their raw shards "
                f"no longer hold them; deduplicate afresh: delete {RECORD_FILE} in the output "
                "folder."
            )
        # One thumbnail array, kept images first: the batch's indices move up by len(kept).
        offset = pairs.assign(j=pairs["j"] + len(kept))
        verified = verify_pairs(offset, stack_thumbnails(blobs, config), config)
        pairs = verified.assign(j=verified["j"] - len(kept))
    near = pd.DataFrame(
        {
            "j": pairs["j"].to_numpy(np.int64),
            "kept_id": kept["kept_id"].to_numpy(np.int64)[pairs["i"].to_numpy(np.int64)],
            "distance": pairs["distance"].to_numpy(np.int64),
        }
    )
    cluster_of_sha = survivors.drop_duplicates("sha256").set_index("sha256")["kept_id"]
    matched = distinct["sha256"].map(cluster_of_sha).to_numpy()
    copies = np.flatnonzero(pd.notna(matched))
    exact = pd.DataFrame(
        {
            "j": copies.astype(np.int64),
            "kept_id": matched[copies].astype(np.int64),
            "distance": np.zeros(len(copies), dtype=np.int64),
        }
    )
    links = pd.concat([near, exact], ignore_index=True)
    by_id = kept.set_index("image_id")
    links["kept_url"] = by_id["url"].reindex(links["kept_id"]).to_numpy()
    links["kept_partition"] = by_id[PARTITION_COLUMN].reindex(links["kept_id"]).to_numpy()
    return links


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for reason, n in count.items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))


__all__ = ["IncrementalDedupResult", "deduplicate_incremental"]
