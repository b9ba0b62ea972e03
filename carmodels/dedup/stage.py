"""The dedup stage itself: its settings (``DedupConfig``), its summary (``DedupResult``) and
``deduplicate``, which runs the steps the package docstring lists and writes the outputs.

Everything here is orchestration: indexing the raw shards, the hash cache, the search, the
colour check, the clustering and the contact sheet are each a module of their own, and this
one wires them together in order and writes ``unique.parquet`` and ``clusters.parquet``
(their names in ``carmodels.dedup.schema``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from carmodels.dedup.cache import (
    _hash_new_images,
    _read_hash_cache,
    _write_hash_cache,
)
from carmodels.dedup.cluster import _cluster, _relabel_by_size
from carmodels.dedup.config import DedupConfig
from carmodels.dedup.contact_sheet import write_contact_sheet
from carmodels.dedup.hashing import hash_to_hex
from carmodels.dedup.schema import (
    CLUSTERS_FILE,
    CONTACT_SHEET_FILE,
    HASHES_FILE,
    PARTITION_COLUMN,
    UNIQUE_CORE_COLUMNS,
    UNIQUE_FILE,
)
from carmodels.dedup.search import SearchStats, _popcount, find_near_duplicates
from carmodels.dedup.verify import stack_thumbnails, verify_pairs
from carmodels.errors import InputError
from carmodels.io import atomic_write_parquet
from carmodels.scrape.raw import read_raw_index


@dataclass(frozen=True)
class DedupResult:
    #: ``outcome == "ok"`` images (one per URL) in the raw shards.
    n_input: int
    n_kept: int
    #: Dropped images with the same sha256 as their cluster's kept image.
    n_exact_duplicates: int
    #: Dropped images that only look like their cluster's kept image.
    n_near_duplicates: int
    #: Clusters with more than one member.
    n_clusters: int
    #: Cluster size -> number of clusters, over all clusters (size 1 = no duplicate).
    cluster_size_histogram: dict[int, int]
    unique_path: Path
    clusters_path: Path
    #: None when there are no duplicate clusters to show.
    contact_sheet_path: Path | None
    elapsed_s: float
    #: "ok" rows left out of ``unique.parquet`` because they have no usable image: the sum of
    #: ``undecodable_by_reason``.
    n_undecodable: int = 0
    #: Why, per reason: ``decode_error`` (bytes that are not an image Pillow/OpenCV can
    #: decode) and ``no_bytes`` (an ok row whose ``image_bytes`` are missing from the raw
    #: shard). Only reasons that occurred are present.
    undecodable_by_reason: dict[str, int] = field(default_factory=dict)
    #: Images hashed in this run (the rest came from ``hashes.parquet``).
    n_hashed: int = 0


#: Schema of ``clusters.parquet``: one row per member of a cluster of more than one image.
_CLUSTERS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int64()),
        ("sha256", pa.string()),
        ("url", pa.string()),
        ("kept", pa.bool_()),
        ("kind", pa.string()),
        ("distance", pa.int32()),
    ]
)


def deduplicate(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: DedupConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DedupResult:
    """Find exact and near duplicates in ``raw_dir`` and write the kept-image index to ``out_dir``.

    Writes ``unique.parquet`` (one row per kept image), ``clusters.parquet`` (members of
    clusters with more than one image), ``hashes.parquet`` (hash cache for the next run) and
    ``clusters.png`` (contact sheet of the largest clusters). ``on_progress(done, total)``
    counts images hashed in this run.
    """
    config = config or DedupConfig()
    started = time.monotonic()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    index = read_raw_index(raw_dir)
    if index.empty:
        # Raised before anything is written, so an earlier unique.parquet stays as it was.
        raise InputError(
            f"The raw shards in {raw_dir} hold no successfully fetched image (outcome 'ok'); "
            "run `carmodels scrape` again (its outcome counts say why the fetches failed)."
        )
    cached = _read_hash_cache(out_dir / HASHES_FILE, config)
    hashes, n_hashed = _hash_new_images([(raw_dir, index)], cached, config, on_progress)
    _write_hash_cache(out_dir / HASHES_FILE, hashes, config)

    images, undecodable_by_reason = _with_hashes(index, hashes)
    if images.empty:
        raise InputError(
            f"None of the {len(index)} fetched images in {raw_dir} decodes "
            f"({undecodable_by_reason}); check what the scraped URLs serve."
        )
    _assign_clusters(images, _near_pairs(images, config), config)
    metadata = [c for c in index.columns if c not in ("url", "sha256", "raw_shard", "fetched_at")]
    return DedupResult(
        n_input=len(index),
        **_write_outputs(images, metadata, out_dir, raw_dir, config),
        elapsed_s=time.monotonic() - started,
        n_undecodable=len(index) - len(images),
        undecodable_by_reason=undecodable_by_reason,
        n_hashed=n_hashed,
    )


def _write_outputs(
    images: pd.DataFrame,
    metadata: list[str],
    out_dir: Path,
    photos: Path | Mapping[str, Path],
    config: DedupConfig,
) -> dict[str, Any]:
    """Write ``unique.parquet``, ``clusters.parquet`` and the contact sheet of clustered
    ``images`` (photos read from ``photos``: a raw folder, or partition -> raw folder); return
    the ``DedupResult`` fields that describe them."""
    unique_path = _write_unique(images, metadata, out_dir)
    members, clusters_path = _write_clusters(images, out_dir)
    contact_sheet_path = None
    if len(members):
        contact_sheet_path = write_contact_sheet(
            photos, members, out_dir / CONTACT_SHEET_FILE, config
        )
    else:
        (out_dir / CONTACT_SHEET_FILE).unlink(missing_ok=True)  # stale sheet of a past run

    sizes = images.groupby("cluster_id").size()
    histogram = {int(size): int(count) for size, count in sizes.value_counts().sort_index().items()}
    kinds = images["kind"].value_counts()
    return {
        "n_kept": int(images["kept"].sum()),
        "n_exact_duplicates": int(kinds.get("exact", 0)),
        "n_near_duplicates": int(kinds.get("near", 0)),
        "n_clusters": int((sizes > 1).sum()),
        "cluster_size_histogram": histogram,
        "unique_path": unique_path,
        "clusters_path": clusters_path,
        "contact_sheet_path": contact_sheet_path,
    }


def _with_hashes(index: pd.DataFrame, hashes: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows of ``index`` whose image decodes, with their hashes, thumbnails and ``pixels``,
    sorted by URL (then partition, when there is one); and the others counted by reason
    (``_undecodable_by_reason``)."""
    decodable = hashes[hashes["decodable"]].drop(columns="decodable")
    images = index.merge(decodable, on="sha256", how="inner", validate="many_to_one")
    order = ["url", PARTITION_COLUMN] if PARTITION_COLUMN in images.columns else ["url"]
    images = images.sort_values(order, kind="stable").reset_index(drop=True)
    images["pixels"] = images["width"].astype(np.int64) * images["height"].astype(np.int64)
    return images, _undecodable_by_reason(index, hashes)


def _near_pairs(
    images: pd.DataFrame, config: DedupConfig, stats: SearchStats | None = None
) -> pd.DataFrame:
    """Near pairs ``i, j`` of the distinct sha256 values of ``images`` (indexed in order of
    first appearance): hash candidates, kept only if their colours agree when
    ``verify_colour``. ``stats`` counts the search's work."""
    distinct = images.drop_duplicates("sha256")  # factorize order == first appearance
    pairs = find_near_duplicates(
        distinct["hash"].to_numpy(np.uint64),
        config.threshold,
        distinct["hash_flipped"].to_numpy(np.uint64) if config.flip_aware else None,
        bits=config.hash_bits,
        stats=stats,
        workers=config.workers,
    )
    if config.verify_colour:
        pairs = verify_pairs(pairs, stack_thumbnails(distinct["thumbnails"], config), config)
    return pairs


def _assign_clusters(images: pd.DataFrame, pairs: pd.DataFrame, config: DedupConfig) -> None:
    """Add to ``images`` (in place) each one's cluster (``cluster_id``, ``cluster_size``,
    ``kept``), its hashes in hex (``phash``, ``phash_flipped``) and its relation to its
    cluster's kept image (``distance``, ``kind``)."""
    labels, kept = _cluster(images, pairs)
    _describe_clusters(images, labels, kept, config)


def _describe_clusters(
    images: pd.DataFrame, labels: np.ndarray, kept: np.ndarray, config: DedupConfig
) -> None:
    """Add to ``images`` (in place) the columns ``_assign_clusters`` describes, for given
    cluster ``labels`` (one kept image each, flagged by ``kept``): numbered by size, with each
    member's distance to its kept image."""
    kept_row_of_label = pd.Series(np.flatnonzero(kept), index=labels[kept])
    kept_row = kept_row_of_label.loc[labels].to_numpy()
    images["cluster_id"] = _relabel_by_size(
        labels, images["url"].iloc[kept_row].reset_index(drop=True)
    )
    images["cluster_size"] = images.groupby("cluster_id")["url"].transform("size").astype(np.int32)
    images["kept"] = kept
    images["phash"] = [hash_to_hex(h) for h in images["hash"]]
    images["phash_flipped"] = [hash_to_hex(h) for h in images["hash_flipped"]]

    # Relation of each member to its cluster's kept image.
    kept_hash = images["hash"].to_numpy(np.uint64)[kept_row]
    distance = _popcount(images["hash"].to_numpy(np.uint64) ^ kept_hash)
    if config.flip_aware:
        kept_flipped = images["hash_flipped"].to_numpy(np.uint64)[kept_row]
        distance = np.minimum(
            distance, _popcount(kept_flipped ^ images["hash"].to_numpy(np.uint64))
        )
    same_bytes = images["sha256"].to_numpy() == images["sha256"].to_numpy()[kept_row]
    images["distance"] = np.where(same_bytes, 0, distance).astype(np.int32)
    images["kind"] = np.where(kept, None, np.where(same_bytes, "exact", "near"))


def _write_unique(images: pd.DataFrame, metadata: list[str], out_dir: Path) -> Path:
    """Write ``unique.parquet``: the kept images, by cluster, with the ``metadata`` columns."""
    unique = images[images["kept"]].sort_values(["cluster_id", "url"], kind="stable")
    unique_table = pa.Table.from_pandas(
        unique[[*UNIQUE_CORE_COLUMNS, "phash_flipped", "n_bytes", "fetched_at", *metadata]].astype(
            {"width": np.int32, "height": np.int32, "cluster_id": np.int64}
        ),
        preserve_index=False,
    )
    return atomic_write_parquet(out_dir / UNIQUE_FILE, unique_table)


def _write_clusters(images: pd.DataFrame, out_dir: Path) -> tuple[pd.DataFrame, Path]:
    """Write ``clusters.parquet`` and return its rows (plus ``raw_shard``, for the contact
    sheet): the members of clusters of more than one image, each kept image first."""
    members = images[images["cluster_size"] > 1].sort_values(
        ["cluster_id", "kept", "distance", "url"],
        ascending=[True, False, True, True],
        kind="stable",
    )
    clusters_table = pa.Table.from_pandas(
        members[["cluster_id", "sha256", "url", "kept", "kind", "distance"]].astype(
            {"cluster_id": np.int64}
        ),
        schema=_CLUSTERS_SCHEMA,
        preserve_index=False,
    )
    return members, atomic_write_parquet(out_dir / CLUSTERS_FILE, clusters_table)


def _undecodable_by_reason(index: pd.DataFrame, hashes: pd.DataFrame) -> dict[str, int]:
    """Ok rows of ``index`` that are not images, by reason (see ``DedupResult``).

    A sha256 hashed as not decodable is a ``decode_error``; one that never reached hashing had
    no bytes to hash (``iter_raw_bytes`` skips null ``image_bytes``): ``no_bytes``.
    """
    decodable_by_sha = hashes.drop_duplicates("sha256").set_index("sha256")["decodable"]
    decodable = index["sha256"].map(decodable_by_sha)
    counts = {
        "decode_error": int(decodable.eq(False).sum()),  # NaN (never hashed) is not False
        "no_bytes": int(decodable.isna().sum()),
    }
    return {reason: n for reason, n in counts.items() if n}


__all__ = ["DedupConfig", "DedupResult", "deduplicate"]
