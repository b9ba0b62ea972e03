"""Training shards of several partitions built at once on a Ray cluster: one task each.

A partitioned ingest (``deduplicate_incremental``'s ``unique.parquet``, one raw folder per
partition) builds each partition's shards on its own (``build_shards(..., partition=P)`` into
``shards/<P>/``). On a cluster those builds are independent tasks: each reads its partition's
photos from the storage root, normalises them with the node's processes, and writes
``shards/<P>/`` straight back to the root, ``summary.json`` last, which is the build's
done-marker (readers trust only the shards it lists). A task whose node is lost is retried
and builds the partition again from the start; a bad input (an ``InputError``) is not retried
and is raised as it was, in one line.

So the driver never holds a photo: the partitions' bytes move between the root and the
workers only. The root must be one every worker reaches: an fsspec URL (S3 and the like),
worked on in a temporary copy on each worker, or, with a local Ray head, a local folder.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carmodels.cluster.config import FanoutConfig
from carmodels.cluster.connect import ray_session
from carmodels.cluster.ingest import FanoutFailed, _describe
from carmodels.errors import InputError
from carmodels.layout import RAW_DIR, SHARDS_DIR, UNIQUE_DIR
from carmodels.shards import ShardConfig, ShardResult, build_shards
from carmodels.storage import StorageRoot


def build_partition(
    root: str, partition: str, config: ShardConfig, storage_options: dict[str, Any] | None
) -> ShardResult:
    """Build ``shards/<partition>/`` under ``root`` from its raw folder and the dedup's index:
    what one task runs. A remote root is worked on in a temporary copy, deleted after."""
    scratch = tempfile.mkdtemp(prefix="carmodels-shards-")
    try:
        storage = StorageRoot.parse(root, cache_dir=scratch, storage_options=storage_options)
        out = f"{SHARDS_DIR}/{partition}"
        with storage.working_copy(
            pull=[UNIQUE_DIR, f"{RAW_DIR}/{partition}", out], push=[out]
        ) as layout:
            return build_shards(
                layout.unique_dir,
                layout.raw_dir,
                layout.root / out,
                config,
                partition=partition,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_partitions_on_ray(
    root: str,
    partitions: Sequence[str],
    config: ShardConfig,
    fanout: FanoutConfig,
    local_root: Path,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, ShardResult]:
    """Build every partition's shards under ``root`` (a path or fsspec URL), one Ray task per
    partition, all at once; their results by partition, with paths under ``local_root``
    (where this machine sees the root: itself, or its working copy once pulled)."""
    with ray_session(fanout.address) as ray:
        task = ray.remote(build_partition).options(
            # A build uses `config.workers` processes; give it that many CPUs.
            num_cpus=config.workers,
            max_retries=fanout.task_retries,
            # An exception raised by the build is about its input: it would only recur.
            retry_exceptions=False,
        )
        refs = {p: task.remote(root, p, config, storage_options) for p in partitions}
        results: dict[str, ShardResult] = {}
        failures: dict[str, BaseException] = {}
        for partition, ref in refs.items():
            try:
                results[partition] = ray.get(ref)
            except Exception as error:  # a RayTaskError wraps what the build raised
                failures[partition] = getattr(error, "cause", None) or error
    for error in failures.values():
        if isinstance(error, InputError):
            raise error
    if failures:
        details = "; ".join(f"{p}: {_describe(e)}" for p, e in sorted(failures.items()))
        raise FanoutFailed(
            f"{len(failures)} of {len(partitions)} partition shard builds failed on Ray after "
            f"{fanout.task_retries} retries ({details}); the shards of the others are written, "
            "run the step again to build the rest."
        )
    return {p: _seen_from(local_root, p, result) for p, result in results.items()}


def _seen_from(local_root: Path, partition: str, result: ShardResult) -> ShardResult:
    """``result`` with its paths moved from the worker's copy to ``local_root``."""
    folder = local_root / SHARDS_DIR / partition
    return dataclasses.replace(
        result,
        shard_paths=[folder / Path(p).name for p in result.shard_paths],
        summary_path=folder / Path(result.summary_path).name,
        preview_path=folder / Path(result.preview_path).name,
    )


__all__ = ["build_partition", "build_partitions_on_ray"]
