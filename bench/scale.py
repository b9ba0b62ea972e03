"""Scale-out benchmark: the same download job on this machine and on a local Ray cluster.

    python bench/scale.py [--images DIR] [--n N] [--repeats R] [--cpus C] [--json PATH]

Serves the JPEGs listed in DIR/manifest.csv (default ``../shared/data/cars-sample``) from
memory on 127.0.0.1, in a process of its own (``bench/scrape.py``'s server), and builds N
distinct URLs by repeating the list with a ``?r=k`` query suffix. Then, run after run,
alternating which side goes first:

1. **local**: :func:`carmodels.scrape.download_images`, its fetch processes chosen as by
   default for C cores (the path every user without Ray takes);
2. **ray**: :func:`carmodels.cluster.download_on_ray` on a Ray head started on 127.0.0.1 with
   C CPUs, one task per ``--urls-per-task`` URLs, the host coordinator holding the per-host
   limit across the tasks (all URLs are on one host, so every task shares it).

Both sides use one :class:`~carmodels.scrape.ScrapeConfig` (128 px thumbnails, 64 requests in
flight, per-host limit 64, no retries) and write raw shards into a fresh folder. Each side's
time runs from the call to its return. For the local side, that includes starting its fetch
processes. For Ray, it includes planning, reading robots.txt, starting the coordinator,
scheduling the tasks and writing the shards, but not starting the cluster, which a user starts
once for many jobs. The Ray workers are warmed by one small job before the timed runs, as they
are on a running cluster; ``--cold`` skips that warm-up.

**Identical** means both outputs hold the same rows, compared by URL: outcome, status, sha256,
width, height and the thumbnail bytes. ``fetched_at`` naturally differs. The overhead is
``local rate / ray rate - 1`` on the medians; the goal is at most 15%. The last line is
``scale: ray X img/s, local Y img/s, overhead Z%, identical yes|no``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, scrape, also from a test

from _common import SHARED_DATA, write_report  # noqa: E402
from scrape import read_photos, start_server  # noqa: E402

from carmodels.cluster import FanoutConfig, download_on_ray, ray_session  # noqa: E402
from carmodels.scrape import ScrapeConfig, download_images  # noqa: E402
from carmodels.scrape.raw import read_raw  # noqa: E402

DEFAULT_IMAGES = SHARED_DATA / "cars-sample"
#: The columns that must agree between the two outputs (``fetched_at`` differs by nature).
COMPARED = ["url", "outcome", "status", "sha256", "width", "height", "thumbnail"]
#: The goal of the scale-out issue: Ray may cost at most this much throughput.
MAX_OVERHEAD = 0.15


def scrape_config(concurrency: int) -> ScrapeConfig:
    """The settings both sides use: bench/scrape.py's, so the local side runs at its best."""
    return ScrapeConfig(
        concurrency=concurrency,
        per_host_limit=concurrency,
        allow_private_networks=True,  # the benchmark's own server on 127.0.0.1
        thumbnail_size=128,
        keep_image_bytes=False,
        max_retries=0,
    )


def output_rows(raw_dir: Path | str) -> pd.DataFrame:
    """The compared columns of every row, sorted by URL."""
    frame = read_raw(raw_dir)
    columns = [c for c in COMPARED if c in frame.columns]
    return frame[columns].sort_values("url").reset_index(drop=True)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return False
    return all(a[c].equals(b[c]) for c in a.columns)


def run_local(manifest: pd.DataFrame, out: Path, config: ScrapeConfig) -> tuple[float, int]:
    started = time.perf_counter()
    result = download_images(manifest, out, config)
    return time.perf_counter() - started, result.n_ok


def run_ray(
    manifest: pd.DataFrame, out: Path, config: ScrapeConfig, fanout: FanoutConfig
) -> tuple[float, int]:
    started = time.perf_counter()
    result = download_on_ray(manifest, str(out), config, fanout)
    return time.perf_counter() - started, result.n_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--n", type=int, default=10_000, help="distinct URLs (default 10000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="cores for each side")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument(
        "--urls-per-task",
        type=int,
        default=FanoutConfig.urls_per_task,
        help="URLs per Ray task (default: FanoutConfig's)",
    )
    parser.add_argument("--cold", action="store_true", help="no warm-up job for the Ray workers")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)

    images = read_photos(args.images)
    print(f"{len(images)} photos, {args.n} URLs, {args.cpus} CPUs a side")

    config = scrape_config(args.concurrency)
    fanout = FanoutConfig(urls_per_task=args.urls_per_task)
    server, port = start_server(images)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    local_s: list[float] = []
    ray_s: list[float] = []
    ok: dict[str, int] = {}
    identical = True
    try:
        keys = list(images)
        urls = [
            f"http://127.0.0.1:{port}/images/{keys[i % len(keys)]}?r={i // len(keys)}"
            for i in range(args.n)
        ]
        manifest = pd.DataFrame({"url": urls})
        with ray_session("local", num_cpus=args.cpus, object_store_memory=200 * 2**20):
            if not args.cold:
                warm = pd.DataFrame({"url": [f"{u}&warm=1" for u in urls[: 4 * args.cpus]]})
                download_on_ray(warm, str(work / "warm"), config, FanoutConfig(urls_per_task=4))
            for repeat in range(args.repeats):
                sides = ["local", "ray"] if repeat % 2 == 0 else ["ray", "local"]
                outs = {side: work / f"{side}-{repeat}" for side in sides}
                for side in sides:
                    if side == "local":
                        seconds, ok["local"] = run_local(manifest, outs[side], config)
                        local_s.append(seconds)
                    else:
                        seconds, ok["ray"] = run_ray(manifest, outs[side], config, fanout)
                        ray_s.append(seconds)
                    print(f"  run {repeat + 1} {side:5s} {args.n / seconds:7.0f} img/s")
                same = same_rows(output_rows(outs["local"]), output_rows(outs["ray"]))
                identical = identical and same
                for out in outs.values():
                    shutil.rmtree(out)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    local_rate = ok["local"] / statistics.median(local_s)
    ray_rate = ok["ray"] / statistics.median(ray_s)
    overhead = local_rate / ray_rate - 1
    if args.json:
        write_report(
            args.json,
            args,
            local_s=local_s,
            ray_s=ray_s,
            local_img_per_s=round(local_rate, 1),
            ray_img_per_s=round(ray_rate, 1),
            overhead=round(overhead, 4),
            ok={"local": ok["local"], "ray": ok["ray"], "of": args.n},
            identical=identical,
        )
    print(
        f"scale: ray {ray_rate:.0f} img/s, local {local_rate:.0f} img/s, "
        f"overhead {overhead:.0%}, identical {'yes' if identical else 'no'}"
    )
    return 0 if identical and overhead <= MAX_OVERHEAD else 1


if __name__ == "__main__":
    sys.exit(main())
