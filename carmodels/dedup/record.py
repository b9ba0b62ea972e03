"""The incremental dedup's record: what has been deduplicated so far, and how it was decided.

Two files in the dedup output folder:

- ``members-<generation>.parquet``: one row per decodable image of every partition done so
  far: where it is (``partition``, ``url``, ``raw_shard``), its hashes and size, and its
  cluster as ``kept_id``, the ``image_id`` of the cluster's kept image. Thumbnails stay in
  the hash cache, keyed by sha256, where the colour check finds them.
- ``record.json``, written last (the commit point): the members file of this state, the
  settings the decisions were made under, and per partition the content version of its raw
  shards (sha256 of each file's bytes; each stamped with size and modification time so that an
  untouched file is not read again) and its counts of fetched and undecodable images.

A run reads the record, works, writes the next generation's members file and its outputs, and
commits by replacing ``record.json``; only then are older members files deleted. A crash at
any point leaves the previous record and the members file it names intact, so the next run
redoes the same work. Anything unreadable or inconsistent is not trusted: the run starts
afresh (the hash cache still spares the hashing) and says why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from carmodels.dedup.schema import MEMBERS_GLOB, PARTITION_COLUMN, RECORD_FILE
from carmodels.io import atomic_write_json, atomic_write_parquet
from carmodels.scrape.raw import raw_shard_files
from carmodels.versioning import file_digest, json_version

if TYPE_CHECKING:
    from carmodels.dedup.config import DedupConfig

#: Layout of ``record.json`` and the members files; another one is not read (fresh start).
RECORD_FORMAT = 1

#: The fixed columns of a members file, with their pandas dtypes (those ``read_raw_index``
#: gives, so that recorded and new rows concatenate as they are); listing metadata (nullable
#: strings) follows.
MEMBER_COLUMNS: dict[str, str] = {
    PARTITION_COLUMN: "str",
    "url": "str",
    "sha256": "str",
    "raw_shard": "str",
    "fetched_at": "datetime64[us, UTC]",
    "hash": "uint64",
    "hash_flipped": "uint64",
    "width": "int32",
    "height": "int32",
    "n_bytes": "int64",
    "image_id": "int64",
    "kept_id": "int64",
}


@dataclass(frozen=True)
class PartitionState:
    """One partition as it was deduplicated."""

    #: Content version of its raw shards (``shards_version``).
    version: str
    #: Shard name -> ``size``, ``mtime_ns`` and ``sha256`` of the file.
    shards: dict[str, dict[str, Any]]
    #: Its ``outcome == "ok"`` images (one per URL), undecodable ones included.
    n_input: int
    undecodable_by_reason: dict[str, int] = field(default_factory=dict)
    #: Its listing metadata columns (the output has those of the partitions passed).
    metadata: list[str] = field(default_factory=list)
    #: Where it was read from (for a person reading the record; not part of its identity).
    raw_dir: str = ""


@dataclass
class DedupRecord:
    """The state after the last committed run (empty before the first)."""

    #: ``decision_spec`` of the settings the members were decided under.
    decision: str
    generation: int = 0
    partitions: dict[str, PartitionState] = field(default_factory=dict)
    members: pd.DataFrame = field(default_factory=lambda: empty_members())
    #: ``image_id`` for the next new image (ids are never reused).
    next_id: int = 0


def decision_spec(config: DedupConfig) -> str:
    """The settings that decide which images are duplicates of which; a record made under
    other ones is not extended (its decisions would mix two rules) but redone."""
    return (
        f"{config.hash_spec}|threshold{config.threshold}|flip{int(config.flip_aware)}|"
        f"colour{int(config.verify_colour)}:{config.max_colour_distance:g}"
    )


def empty_members() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in MEMBER_COLUMNS.items()})


def shard_stamps(raw_dir: Path, previous: PartitionState | None) -> dict[str, dict[str, Any]]:
    """Size, modification time and sha256 of each raw shard of ``raw_dir``.

    A shard with the name, size and modification time it had when ``previous`` was recorded
    keeps its recorded sha256 unread (raw shards are written once, by an atomic rename, and
    never modified); any other is read and hashed. Raises ``MissingInputError`` when the
    folder holds no raw shard.
    """
    known = previous.shards if previous is not None else {}
    stamps: dict[str, dict[str, Any]] = {}
    for path in raw_shard_files(raw_dir):
        stat = path.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        earlier = known.get(path.name)
        if earlier is not None and all(earlier.get(k) == v for k, v in stamp.items()):
            stamp["sha256"] = earlier["sha256"]
        else:
            stamp["sha256"] = file_digest(path)
        stamps[path.name] = stamp
    return stamps


def shards_version(stamps: dict[str, dict[str, Any]]) -> str:
    """Content version of a partition: its shards' names and bytes (not their times)."""
    return json_version({name: stamp["sha256"] for name, stamp in stamps.items()})


def read_record(out_dir: Path, config: DedupConfig) -> tuple[DedupRecord, str | None]:
    """The committed record of ``out_dir``, or an empty one and why it was not used."""
    empty = DedupRecord(decision_spec(config))
    path = out_dir / RECORD_FILE
    if not path.exists():
        return empty, "no earlier record"
    try:
        data = json.loads(path.read_text())
        if data.get("format") != RECORD_FORMAT:
            return empty, f"{RECORD_FILE} has format {data.get('format')!r}, not {RECORD_FORMAT}"
        if data["decision"] != empty.decision:
            return empty, "the hash or duplicate settings changed since the last run"
        partitions = {name: PartitionState(**state) for name, state in data["partitions"].items()}
        members = _read_members(out_dir / data["members"])
        record = DedupRecord(
            data["decision"], int(data["generation"]), partitions, members, int(data["next_id"])
        )
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as error:
        return empty, f"{RECORD_FILE} or its members file cannot be read ({error})"
    problem = _inconsistency(record)
    if problem:
        return empty, problem
    return record, None


def _read_members(path: Path) -> pd.DataFrame:
    frame = pq.ParquetFile(path).read().to_pandas()
    missing = set(MEMBER_COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"{path.name} lacks columns {sorted(missing)}")
    metadata = [c for c in frame.columns if c not in MEMBER_COLUMNS]
    # The dtypes a fresh index has (read_raw_index), so that old and new rows concatenate
    # without changing a column's type.
    return frame.astype({**MEMBER_COLUMNS, **dict.fromkeys(metadata, "string")})


def _inconsistency(record: DedupRecord) -> str | None:
    """Why ``record`` cannot be extended, or None: every member belongs to a recorded partition
    and to a cluster whose kept image is a member that keeps itself."""
    members = record.members
    unknown = set(members[PARTITION_COLUMN]) - set(record.partitions)
    if unknown:
        return f"the members file lists partitions the record does not: {sorted(unknown)}"
    kept_ids = set(members.loc[members["image_id"] == members["kept_id"], "image_id"])
    if not set(members["kept_id"]) <= kept_ids or members["image_id"].duplicated().any():
        return "the members file's clusters are inconsistent"
    if len(members) and members["image_id"].max() >= record.next_id:
        return "the members file's image ids run past the record's"
    return None


def write_members(out_dir: Path, generation: int, members: pd.DataFrame) -> str:
    """Write the members file of ``generation`` (not yet committed); return its name."""
    name = MEMBERS_GLOB.replace("*", f"{generation:05d}")
    metadata = [c for c in members.columns if c not in MEMBER_COLUMNS]
    table = pa.Table.from_pandas(
        members[[*MEMBER_COLUMNS, *metadata]].astype(MEMBER_COLUMNS), preserve_index=False
    )
    atomic_write_parquet(out_dir / name, table)
    return name


def commit_record(out_dir: Path, record: DedupRecord, members_name: str) -> Path:
    """Replace ``record.json`` with ``record`` (whose members are in ``members_name``), then
    delete the members files it no longer names."""
    data = {
        "format": RECORD_FORMAT,
        "decision": record.decision,
        "generation": record.generation,
        "members": members_name,
        "next_id": record.next_id,
        "partitions": {name: asdict(state) for name, state in record.partitions.items()},
    }
    path = atomic_write_json(out_dir / RECORD_FILE, data)
    for stale in out_dir.glob(MEMBERS_GLOB):
        if stale.name != members_name:
            stale.unlink(missing_ok=True)
    return path


__all__ = [
    "MEMBER_COLUMNS",
    "RECORD_FORMAT",
    "DedupRecord",
    "PartitionState",
    "commit_record",
    "decision_spec",
    "empty_members",
    "read_record",
    "shard_stamps",
    "shards_version",
    "write_members",
]
