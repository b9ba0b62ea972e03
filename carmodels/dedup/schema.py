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

UNIQUE_FILE = "unique.parquet"
CLUSTERS_FILE = "clusters.parquet"
HASHES_FILE = "hashes.parquet"
CONTACT_SHEET_FILE = "clusters.png"

__all__ = [
    "CLUSTERS_FILE",
    "CONTACT_SHEET_FILE",
    "HASHES_FILE",
    "UNIQUE_CORE_COLUMNS",
    "UNIQUE_FILE",
]
