"""The dedup stage's output contract: file names and the core columns of ``unique.parquet``.

Downstream stages (``carmodels.shards``) read ``unique.parquet`` through these names. They live
in a module of their own, with no imports, so that a reader of the stage's outputs does not load
the stage itself (hashing, search, scipy, OpenCV); ``carmodels.dedup``'s package ``__init__``
imports nothing eagerly, so importing this module costs nothing more.
"""

from __future__ import annotations

#: Columns of ``unique.parquet`` written by the dedup stage (the rest is listing metadata).
UNIQUE_CORE_COLUMNS = (
    "sha256",
    "url",
    "raw_shard",
    "phash",
    "width",
    "height",
    "cluster_id",
    "cluster_size",
)

#: Column of ``unique.parquet`` naming the partition whose raw folder holds ``raw_shard``
#: (partitioned raw folders share shard names); written only by ``deduplicate_incremental``.
PARTITION_COLUMN = "partition"

UNIQUE_FILE = "unique.parquet"
CLUSTERS_FILE = "clusters.parquet"
HASHES_FILE = "hashes.parquet"
CONTACT_SHEET_FILE = "clusters.png"
#: The incremental record (``deduplicate_incremental``): written last, it names the partitions
#: deduplicated so far (with their content versions) and the members file of that state.
RECORD_FILE = "record.json"
#: The members files the record names: every deduplicated image and the kept image of its
#: cluster (``members-<generation>.parquet``).
MEMBERS_GLOB = "members-*.parquet"

__all__ = [
    "CLUSTERS_FILE",
    "CONTACT_SHEET_FILE",
    "HASHES_FILE",
    "MEMBERS_GLOB",
    "PARTITION_COLUMN",
    "RECORD_FILE",
    "UNIQUE_CORE_COLUMNS",
    "UNIQUE_FILE",
]
