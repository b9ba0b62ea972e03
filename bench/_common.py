"""What the benchmarks share: the machine facts and the JSON report every one can write, and
shards built from a folder of photos with a ``manifest.csv``."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a bare checkout

from carmodels.dedup import DedupConfig, deduplicate  # noqa: E402
from carmodels.imaging import ImagingConfig  # noqa: E402
from carmodels.scrape.raw import raw_schema, shard_path  # noqa: E402
from carmodels.shards import ShardConfig, build_shards  # noqa: E402

#: The shared photos beside the project (a user's clone has none).
SHARED_DATA = REPO.parent / "shared" / "data"
#: Manifest columns carried into the shards (``type`` and ``make`` label the judge).
METADATA_COLUMNS = ("make", "model", "year", "type")


def write_report(path: Path, args: argparse.Namespace, **figures: Any) -> None:
    """Write ``figures`` to ``path`` as JSON, with the date, the machine, its load and the
    command-line arguments, so that a result can be told apart from another run's."""
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "args": {key: str(value) for key, value in vars(args).items()},
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def build_sample_shards(
    images_dir: Path,
    work: Path,
    image_size: int,
    val_fraction: float = 0.2,
    framing: str = "letterbox",
) -> tuple[Path, str]:
    """The photos of ``images_dir/manifest.csv`` through raw shard, dedup and shards; shards
    already in ``work`` (a kept ``--work`` folder) are reused, and so is the judge cached
    for them."""
    raw_dir, unique_dir, shards_dir = work / "raw", work / "unique", work / "shards"
    if (shards_dir / "summary.json").is_file():
        summary = json.loads((shards_dir / "summary.json").read_text())
        return shards_dir, f"shards reused from {shards_dir}: {summary.get('counts', summary)}"
    manifest = images_dir / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("image", *METADATA_COLUMNS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{manifest} needs an image column and {METADATA_COLUMNS}; {missing=}")
    raw_dir.mkdir(parents=True, exist_ok=True)
    for stale in raw_dir.glob("raw-*.parquet"):
        stale.unlink()
    fetched_at = datetime.now(UTC)
    records = []
    for row in rows:
        data = (images_dir / row["image"]).read_bytes()
        records.append(
            {
                "url": f"file://{images_dir.resolve() / row['image']}",
                "status": 200,
                "outcome": "ok",
                "content_type": "image/jpeg",
                "image_bytes": data,
                "sha256": hashlib.sha256(data).hexdigest(),
                "fetched_at": fetched_at,
                **{c: row[c] for c in METADATA_COLUMNS},
            }
        )
    table = pa.Table.from_pylist(records, schema=raw_schema(list(METADATA_COLUMNS)))
    pq.write_table(table, shard_path(raw_dir, 0), compression="zstd")
    deduplicate(raw_dir, unique_dir, DedupConfig(workers=1))
    config = ShardConfig(
        imaging=ImagingConfig(size=image_size, framing=framing),
        val_fraction=val_fraction,
        workers=1,
    )
    result = build_shards(unique_dir, raw_dir, shards_dir, config)
    return shards_dir, (
        f"{len(rows)} photos -> {result.n_written} images ({result.n_train} train, "
        f"{result.n_val} val) at {image_size} px"
    )
