"""Loading training shards: ``carmodels.shards.load_images`` and ``iter_images`` on 60,000 images.

Builds a shard set of ``--n`` (default 60,000) 128x128 RGB images in a temporary folder,
with the car shards' own schema (``carmodels.shards._shard_schema``: raw HWC uint8 bytes in the
``image`` column, zstd Parquet, 5,000 images per file as ``ShardConfig.images_per_shard``).
The pixels are the cars-sample photos letterboxed to 128 px by ``carmodels.imaging.to_square``
(``--images DIR``, default ``../shared/data/cars-sample``), repeated in turn to reach the
count; without those photos (or with ``--synthetic``), smooth random pictures (8x8 random
colour blocks upscaled bicubically), which compress about like photos. ``sha256`` is a
stand-in (the hash of the image's index), so that the train/val split (``split_for``) is the
usual ~90/10.

Then, in this process, ``--repeats`` (default 1) times each (the page cache warm after the
write, as in an epoch loop): ``load_images(path)``, ``load_images(path, split="train")``, and
a full pass of ``iter_images(path)`` (default batches of 4,096). The last line is
``load: load_images N images in S s (R img/s), iter_images S s (R img/s)``
with the median of the repeats. Peak memory (max RSS of this process) is printed too, as
``load_images`` holds the whole set (2.9 GB for 60,000 images) and its copies at once.

``load_images`` builds the tensor with one numpy transpose into a preallocated N x 3 x H x W
array (before 2026-11-28 it concatenated and then copied again through torch's permute; the
figures of both are in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import write_report  # noqa: E402

from carmodels.imaging import decode_image, to_square  # noqa: E402
from carmodels.io import atomic_write_parquet  # noqa: E402
from carmodels.shards import (  # noqa: E402
    ShardConfig,
    _shard_schema,
    iter_images,
    load_images,
    split_for,
)

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "cars-sample"
SIZE = 128


def base_images(images: Path | None, limit: int) -> tuple[np.ndarray, str]:
    """Up to ``limit`` distinct 128x128x3 uint8 images, and where they came from."""
    if images is not None and (images / "manifest.csv").exists():
        with (images / "manifest.csv").open(newline="") as f:
            names = [row["image"] for row in csv.DictReader(f)][:limit]
        pixels = [
            to_square(decode_image((images / name).read_bytes(), draft_size=(256, 256)), SIZE)
            for name in names
        ]
        return np.stack(pixels), f"{len(pixels)} cars-sample photos letterboxed"
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(limit, 8, 8, 3), dtype=np.uint8)
    pixels = [
        np.asarray(Image.fromarray(b).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        for b in blocks
    ]
    return np.stack(pixels), f"{limit} synthetic smooth random pictures"


def write_shards(folder: Path, base: np.ndarray, n: int, per_shard: int) -> list[Path]:
    schema = _shard_schema([])
    paths = []
    for first in range(0, n, per_shard):
        rows = range(first, min(n, first + per_shard))
        sha = [hashlib.sha256(f"image {k}".encode()).hexdigest() for k in rows]
        table = pa.table(
            {
                "image": [base[k % len(base)].tobytes() for k in rows],
                "height": [SIZE] * len(rows),
                "width": [SIZE] * len(rows),
                "sha256": sha,
                "url": [f"https://bench.invalid/{k}.jpg" for k in rows],
                "source_width": [640] * len(rows),
                "source_height": [480] * len(rows),
                "phash": ["0" * 16] * len(rows),
                "split": [split_for(s) for s in sha],
                "facing": ["left"] * len(rows),
                "facing_confidence": [1.0] * len(rows),
                "mirrored": [False] * len(rows),
            },
            schema=schema,
        )
        paths.append(atomic_write_parquet(folder / f"car-g0001-{len(paths):05d}.parquet", table))
    return paths


def timed(function, repeats: int) -> tuple[list[float], list[float], int]:
    """Wall and CPU seconds (this process, all threads) of each run, and the image count."""
    times, cpu_times, count = [], [], 0
    for _ in range(repeats):
        gc.collect()
        started, started_cpu = time.perf_counter(), time.process_time()
        count = function()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - started_cpu)
    return times, cpu_times, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60_000, help="images in the shard set")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--synthetic", action="store_true", help="random pictures, no photos")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096, help="iter_images batch")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        started = time.perf_counter()
        base, source = base_images(None if args.synthetic else args.images, min(args.n, 1500))
        per_shard = ShardConfig.images_per_shard
        paths = write_shards(work, base, args.n, per_shard)
        del base
        size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(
            f"{args.n} images ({source}), {len(paths)} shards, {size_mb:.0f} MB on disk "
            f"({size_mb * 1e6 / (args.n * SIZE * SIZE * 3):.0%} of raw), built in "
            f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} CPU cores, load average "
            f"{os.getloadavg()[0]:.1f}"
        )

        def load_all() -> int:
            return len(load_images(work))

        def load_train() -> int:
            return len(load_images(work, split="train"))

        def stream() -> int:
            return sum(len(batch) for batch in iter_images(work, batch_size=args.batch_size))

        results = {}
        for name, function in (
            ("load_images", load_all),
            ("load_images_train", load_train),
            ("iter_images", stream),
        ):
            times, cpu_times, count = timed(function, args.repeats)
            median = statistics.median(times)
            results[name] = {
                "seconds": times,
                "cpu_seconds": cpu_times,
                "median_s": median,
                "median_cpu_s": statistics.median(cpu_times),
                "images": count,
            }
            print(
                f"{name}: {count} images, median {median:.2f} s ({count / median:,.0f} img/s; "
                f"CPU {statistics.median(cpu_times):.2f} s), runs "
                f"{', '.join(f'{t:.2f}' for t in times)} s"
            )
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"peak memory (max RSS) {peak_gb:.1f} GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if args.json:
        write_report(
            args.json,
            args,
            source=source,
            shard_mb=size_mb,
            peak_rss_gb=peak_gb,
            results=results,
        )
    load, stream = results["load_images"], results["iter_images"]
    print(
        f"load: load_images {load['images']} images in {load['median_s']:.2f} s "
        f"({load['images'] / load['median_s']:,.0f} img/s), iter_images "
        f"{stream['median_s']:.2f} s ({stream['images'] / stream['median_s']:,.0f} img/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
