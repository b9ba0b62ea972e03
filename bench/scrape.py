"""Scrape benchmark: carmodels against img2dataset, URLs to 128x128 images in Parquet.

    python bench/scrape.py [--images DIR] [--n N] [--repeats R]

Serves the JPEGs listed in DIR/manifest.csv (default ``../shared/data/cars-sample``) from
memory on 127.0.0.1, in a process of its own, and builds N distinct URLs by repeating the
list with a ``?r=k`` query suffix. Then, on the same URLs:

1. **server ceiling**: a bare aiohttp client fetching every URL and dropping the bodies, to
   show the server is not the bottleneck;
2. **decode pools**: the validator with 128 px thumbnails run over the photos in a pool of
   2 threads and a pool of 2 processes (why the downloader decodes in threads);
3. **carmodels**: ``download_images`` with ``thumbnail_size=128`` (raw shards whose
   ``thumbnail`` column holds the letterboxed 128x128 RGB images), in a fresh interpreter;
4. **img2dataset**: ``output_format parquet``, ``image_size 128``, ``resize_mode border``,
   2 processes, each thread count of ``--i2d-threads`` (its best is reported).

Both tools run as subprocesses timed from launch to exit, so interpreter start-up and
imports count for both; their CPU time (user + system, all their processes and threads) is
read from ``RUSAGE_CHILDREN`` and reported as core-ms per URL. ``--json PATH`` writes every
run to a JSON file (``docs/bench-results/``). The last line is
``scrape: carmodels X img/s, img2dataset Y img/s, ratio R, ok A/N vs B/N``.
img2dataset comes from ``--img2dataset`` (default: ``img2dataset`` on PATH or beside this
Python); it pins ``pandas<3``, so it usually lives in a virtual environment of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import glob
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carmodels.scrape import ScrapeConfig  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "cars-sample"
THUMBNAIL_SIZE = 128

CARMODELS_WORKER = f"""
import sys, json
import pandas as pd
from carmodels.scrape import ScrapeConfig, download_images
manifest, out, concurrency, pool = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = ScrapeConfig(
    concurrency=concurrency, per_host_limit=concurrency, allow_private_networks=True,
    thumbnail_size={THUMBNAIL_SIZE}, keep_image_bytes=False, max_retries=0, shard_size=5000,
    decode_pool=pool, fetch_processes=int(sys.argv[5]),
)
if __name__ == "__main__":
    result = download_images(pd.read_csv(manifest), out, config)
    print(json.dumps({{"ok": result.n_ok, "outcomes": result.outcome_counts}}))
"""


# --------------------------------------------------------------------------- server


def _serve(images: dict[str, bytes], port_queue: multiprocessing.Queue) -> None:
    from aiohttp import web

    async def image(request: web.Request) -> web.Response:
        data = images.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/images/{name}", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def read_photos(images_dir: Path) -> dict[str, bytes]:
    """The photos ``images_dir/manifest.csv`` lists, by file name, as the server serves them."""
    manifest_csv = images_dir / "manifest.csv"
    if not manifest_csv.exists():
        raise SystemExit(f"{manifest_csv} not found: pass --images DIR with a manifest.csv")
    with manifest_csv.open(newline="") as f:
        names = [row["image"] for row in csv.DictReader(f)]
    return {Path(n).name: (images_dir / n).read_bytes() for n in names}


def start_server(images: dict[str, bytes]) -> tuple[multiprocessing.Process, int]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_serve, args=(images, queue), daemon=True)
    process.start()
    return process, queue.get(timeout=60)


async def _ceiling(urls: list[str], concurrency: int) -> tuple[float, int]:
    import aiohttp

    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def work() -> None:
            nonlocal ok
            while not queue.empty():
                async with session.get(queue.get_nowait()) as response:
                    await response.read()
                    ok += response.status == 200

        started = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(concurrency)))
        return time.perf_counter() - started, ok


# --------------------------------------------------------------------------- decode pools


def _check(data: bytes) -> str:
    from carmodels.scrape.validate import inspect_image

    return inspect_image(data, 40_000_000, THUMBNAIL_SIZE).outcome


def decode_rate(pool: Executor, bodies: list[bytes]) -> float:
    list(pool.map(_check, bodies[:20]))  # warm up: imports, pool start
    started = time.perf_counter()
    outcomes = list(pool.map(_check, bodies, chunksize=1))
    assert outcomes.count("ok") == len(bodies), "every benchmark photo must decode"
    return len(bodies) / (time.perf_counter() - started)


# --------------------------------------------------------------------------- the two tools


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_carmodels(
    manifest: Path, out: Path, concurrency: int, pool: str, processes: int
) -> tuple[float, int, float]:
    """``(wall seconds, ok thumbnails, CPU seconds)`` of one carmodels run."""
    shutil.rmtree(out, ignore_errors=True)
    cpu = _children_cpu_s()
    started = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            CARMODELS_WORKER,
            str(manifest),
            str(out),
            str(concurrency),
            pool,
            str(processes),
        ],  # fmt: skip
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu
    ok = json.loads(completed.stdout.strip().splitlines()[-1])["ok"]
    return elapsed, _count_thumbnails(out, ok), cpu


def _count_thumbnails(out: Path, reported_ok: int) -> int:
    """ok rows that really hold a 128x128x3 thumbnail (checked, not taken on trust)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    count = 0
    for path in sorted(out.glob("raw-*.parquet")):
        table = pq.read_table(path, columns=["outcome", "thumbnail"])
        ok = table.filter(pc.equal(table["outcome"], "ok"))
        lengths = pc.binary_length(ok["thumbnail"]).to_pylist()
        count += sum(n == THUMBNAIL_SIZE * THUMBNAIL_SIZE * 3 for n in lengths)
    if count != reported_ok:
        raise RuntimeError(f"carmodels reported {reported_ok} ok but wrote {count} thumbnails")
    return count


def run_img2dataset(
    binary: str, manifest: Path, out: Path, threads: int, n: int
) -> tuple[float, int, float]:
    """``(wall seconds, successes, CPU seconds)`` of one img2dataset run."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        binary,
        f"--url_list={manifest}",
        "--input_format=csv",
        "--url_col=url",
        f"--output_folder={out}",
        "--output_format=parquet",
        f"--image_size={THUMBNAIL_SIZE}",
        "--resize_mode=border",
        "--processes_count=2",
        f"--thread_count={threads}",
        # Several shards, so that both processes get work.
        f"--number_sample_per_shard={max(100, n // 8)}",
        "--distributor=multiprocessing",
        "--enable_wandb=False",
        "--retries=0",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    cpu = _children_cpu_s()
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    elapsed = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu
    ok = 0
    for stats in glob.glob(str(out / "*_stats.json")):
        ok += json.loads(Path(stats).read_text())["successes"]
    return elapsed, ok, cpu


def find_img2dataset(given: str | None) -> str | None:
    if given:
        if shutil.which(given) is None:
            raise SystemExit(f"--img2dataset {given}: no such executable")
        return given
    beside = Path(sys.executable).with_name("img2dataset")
    return shutil.which("img2dataset") or (str(beside) if beside.exists() else None)


# --------------------------------------------------------------------------- main


def _variant_name(pool: str, processes: int) -> str:
    return f"{pool} pool, {processes or 'auto'} fetch processes"


def _spread(rates: list[float]) -> str:
    if len(rates) == 1:
        return f"{rates[0]:.0f}"
    return f"median {statistics.median(rates):.0f} (min {min(rates):.0f}, max {max(rates):.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--n", type=int, default=10_000, help="distinct URLs (default 10000)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool, interleaved")
    parser.add_argument("--concurrency", type=int, default=64, help="carmodels requests in flight")
    parser.add_argument("--i2d-threads", default="32,64,128", help="img2dataset thread counts")
    parser.add_argument("--img2dataset", help="img2dataset executable")
    parser.add_argument(
        "--pools", default=ScrapeConfig.decode_pool, help="carmodels decode pools: thread,process"
    )
    parser.add_argument(
        "--fetch-processes",
        default=str(ScrapeConfig.fetch_processes),
        help="carmodels fetch process counts, e.g. 0,1,2 (0: automatic, the default)",
    )
    parser.add_argument("--skip-decode-pools", action="store_true")
    parser.add_argument("--skip-img2dataset", action="store_true")
    parser.add_argument("--json", type=Path, help="write every run's figures to this file")
    args = parser.parse_args(argv)
    record: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "load_average_at_start": os.getloadavg(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
    }

    images = read_photos(args.images)
    mean_kb = sum(map(len, images.values())) / len(images) / 1024
    print(f"{len(images)} photos, mean {mean_kb:.0f} KB, {os.cpu_count()} CPU cores")

    server, port = start_server(images)
    try:
        keys = list(images)
        urls = [
            f"http://127.0.0.1:{port}/images/{keys[i % len(keys)]}?r={i // len(keys)}"
            for i in range(args.n)
        ]
        work = Path(tempfile.mkdtemp(prefix="bench-scrape-"))
        manifest = work / "urls.csv"
        with manifest.open("w", newline="") as f:
            csv.writer(f).writerows([["url"], *([u] for u in urls)])

        elapsed, ok = asyncio.run(_ceiling(urls, args.concurrency))
        print(f"server ceiling (download only, bodies dropped): {ok / elapsed:.0f} img/s")
        record["server_ceiling_img_s"] = ok / elapsed

        if not args.skip_decode_pools:
            bodies = [images[keys[i % len(keys)]] for i in range(min(args.n, 3000))]
            with ThreadPoolExecutor(2) as threads:
                thread_rate = decode_rate(threads, bodies)
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as procs:
                process_rate = decode_rate(procs, bodies)
            print(
                f"decode+hash+128px thumbnail: 2 threads {thread_rate:.0f} img/s, "
                f"2 processes {process_rate:.0f} img/s"
            )
            record["decode_img_s"] = {"threads": thread_rate, "processes": process_rate}

        binary = None if args.skip_img2dataset else find_img2dataset(args.img2dataset)
        thread_counts = [int(t) for t in args.i2d_threads.split(",")]
        variants = [
            (pool, int(processes))
            for pool in args.pools.split(",")
            for processes in args.fetch_processes.split(",")
        ]
        by_variant: dict[tuple[str, int], list[tuple[float, int]]] = {v: [] for v in variants}
        theirs: dict[int, list[tuple[float, int]]] = {t: [] for t in thread_counts}

        def note(tool: str, elapsed: float, ok: int, cpu: float, repeat: int) -> None:
            core_ms = 1000 * cpu / args.n
            print(
                f"[{repeat + 1}] {tool}: {ok}/{args.n} ok in {elapsed:.1f} s, "
                f"{ok / elapsed:.0f} img/s, {core_ms:.2f} core-ms per URL (CPU {cpu:.1f} s)"
            )
            record["runs"].append(
                {"tool": tool, "repeat": repeat + 1, "elapsed_s": elapsed, "ok": ok,
                 "images_per_s": ok / elapsed, "cpu_s": cpu, "core_ms_per_url": core_ms}
            )  # fmt: skip

        for repeat in range(args.repeats):
            for pool, processes in variants:
                elapsed, ok, cpu = run_carmodels(
                    manifest, work / "carmodels", args.concurrency, pool, processes
                )
                by_variant[pool, processes].append((ok / elapsed, ok))
                note(f"carmodels, {_variant_name(pool, processes)}", elapsed, ok, cpu, repeat)
            if binary is None:
                continue
            for threads in thread_counts:
                elapsed, ok, cpu = run_img2dataset(binary, manifest, work / "i2d", threads, args.n)
                theirs[threads].append((ok / elapsed, ok))
                note(f"img2dataset {threads} threads", elapsed, ok, cpu, repeat)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        server.terminate()
        server.join(10)

    for (pool, processes), runs in by_variant.items():
        name = _variant_name(pool, processes)
        print(f"carmodels {name} img/s: {_spread([r for r, _ in runs])}")
    # The headline is the library's defaults, whatever else was measured.
    default = (ScrapeConfig.decode_pool, ScrapeConfig.fetch_processes)
    ours = by_variant.get(default) or next(iter(by_variant.values()))
    our_rate = statistics.median(r for r, _ in ours)
    our_ok = min(ok for _, ok in ours)
    record["load_average_at_end"] = os.getloadavg()
    if binary is None:
        print("img2dataset not found (pass --img2dataset PATH): compared with the ceiling only")
        summary = (
            f"scrape: carmodels {our_rate:.0f} img/s, img2dataset n/a, ratio n/a, "
            f"ok {our_ok}/{args.n} vs n/a"
        )
        _write_json(args.json, record, summary)
        print(summary)
        return 0
    best_threads = max(theirs, key=lambda t: statistics.median(r for r, _ in theirs[t]))
    for threads, runs in theirs.items():
        print(f"img2dataset {threads} threads img/s: {_spread([r for r, _ in runs])}")
    their_rate = statistics.median(r for r, _ in theirs[best_threads])
    their_ok = min(ok for _, ok in theirs[best_threads])
    summary = (
        f"scrape: carmodels {our_rate:.0f} img/s, img2dataset {their_rate:.0f} img/s, "
        f"ratio {our_rate / their_rate:.2f}, ok {our_ok}/{args.n} vs {their_ok}/{args.n}"
    )
    record.update(
        carmodels_img_s=our_rate, img2dataset_img_s=their_rate, ratio=our_rate / their_rate,
        img2dataset_best_threads=best_threads,
    )  # fmt: skip
    _write_json(args.json, record, summary)
    print(summary)
    return 0


def _write_json(path: Path | None, record: dict, summary: str) -> None:
    if path is None:
        return
    record["summary"] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
