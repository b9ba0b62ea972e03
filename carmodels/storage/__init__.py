"""Asset data under a configurable storage root: a local folder or any fsspec URL.

The library writes its outputs with ``pathlib``, atomic renames, pyarrow and ``torch.save``,
all of which need a real file system; object stores have no rename. So a remote root
(``s3://bucket/prefix``, ``gcs://...``, ``memory://...``) is worked on through a local working
copy that is synchronised folder by folder:

- ``StorageRoot.parse(root)`` decides: a plain path or ``file://`` URL is used as it is (sync is a
  no-op); any other fsspec URL gets a working copy under the cache folder
  (``$CARMODELS_CACHE``, else ``~/.cache/carmodels``), one per root URL.
- ``pull("unique", "raw")`` before a step brings its inputs in, ``push("shards")`` after it
  publishes its outputs. Both transfer only what changed: a per-folder record of the last sync
  (local size and mtime, remote ETag) says which files are unchanged without reading them; with
  no record, equal sizes are confirmed by comparing the local MD5 with the remote ETag.

Ordering rule of ``push``, so that a reader of the remote never sees a commit marker (a
``summary.json``, ``champion.json``, ``latest.pt``, ...: see ``DEFAULT_MARKERS``) that names a
missing file: (1) new and changed data files, (2) new and changed markers, (3) only then the
deletion of remote files that are gone locally (an older shard generation stays readable until
the marker that replaced it is in place). ``pull`` reads the markers first and lists the data
after them, so every file a downloaded marker names was uploaded before it.

A push never wipes the remote because of a broken working copy: pushing a folder that does not
exist locally, or whose last pull did not finish, is an error, and so is pushing an empty folder
over a non-empty remote one unless ``allow_empty=True``.
"""

from carmodels.storage.errors import StorageError, StorageInputError
from carmodels.storage.files import MAX_TRANSFERS, SyncReport
from carmodels.storage.root import (
    CACHE_ENV,
    DEFAULT_MARKERS,
    LOCAL_PROTOCOLS,
    StorageRoot,
)

__all__ = [
    "CACHE_ENV",
    "DEFAULT_MARKERS",
    "LOCAL_PROTOCOLS",
    "MAX_TRANSFERS",
    "StorageError",
    "StorageInputError",
    "StorageRoot",
    "SyncReport",
]
