"""Downloads on a Ray head on 127.0.0.1 (started once for the module), with the demo
catalog and moto's S3 as the shared root, all over loopback: the same rows as the local
downloader, and politeness across tasks. A lost node is tests/test_cluster_node_loss.py
(a cluster of its own: a process has one Ray connection at a time).

Slow: Ray starts in a few seconds, and the tasks share 2 cores with everything else."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pandas as pd
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from carmodels.cluster import FanoutConfig, download_on_ray, plan_tasks, ray_session  # noqa: E402
from carmodels.demo import DemoServer, build_catalog  # noqa: E402
from carmodels.demo.catalog import DemoCatalog  # noqa: E402
from carmodels.scrape import ScrapeConfig, download_images, read_raw  # noqa: E402
from carmodels.scrape.download import prepare_manifest  # noqa: E402
from carmodels.scrape.raw import raw_shard_paths  # noqa: E402
from carmodels.storage import StorageRoot  # noqa: E402
from tests.test_cluster import max_in_flight  # noqa: E402
from tests.test_storage import MotoS3, moto_s3_server  # noqa: E402

pytestmark = pytest.mark.slow

#: No usage statistics (no network lookups) and no token file in ~/.ray for test clusters.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def ray_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in RAY_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def local_ray(ray_env: None) -> Iterator[None]:
    """A Ray head on 127.0.0.1 with room for three one-CPU tasks at once."""
    with ray_session("local", num_cpus=3, object_store_memory=100 * MIB):
        yield


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def catalog() -> DemoCatalog:
    return build_catalog(seed=0, n_listings=30)


def demo_config(server: DemoServer, **changes: object) -> ScrapeConfig:
    config = ScrapeConfig(
        concurrency=8,
        per_host_limit=4,
        total_timeout_s=20.0,
        allowed_private_origins=(server.base_url,),
        user_agent="carmodels-tests/1.0",
    )
    return replace(config, **changes)


# --------------------------------------------------------------------------- same output


@pytest.mark.timeout(300)
def test_ray_download_to_s3_gives_the_local_downloaders_rows(local_ray, s3, catalog, tmp_path):
    """A local Ray head downloads the demo catalog into S3 (moto): the same rows as
    ``download_images`` without Ray, every column compared but ``fetched_at`` (when each row
    was fetched, which naturally differs). Each shard holds exactly its planned task's URLs in
    manifest order, so shards are deterministic; robots.txt is read once for the whole job;
    and a second run finds nothing left to fetch."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    with DemoServer(catalog=catalog, record_requests=True) as server:
        manifest = catalog.manifest_frame(server.base_url)
        config = demo_config(server)
        fanout = FanoutConfig(urls_per_task=16)  # several tasks over the catalog's one host

        on_ray = download_on_ray(
            manifest, s3.url(f"{prefix}/raw"), config, fanout, s3.storage_options
        )
        local_started = time.monotonic()
        local = download_images(manifest, tmp_path / "local", config)
    # Read once the server stopped: it logs a request a moment after the client has it.
    robots = [r for r in server.request_log.records("/robots.txt") if r.start < local_started]
    assert len(robots) == 1, "robots.txt read once for the whole Ray job"

    assert on_ray.n_urls == local.n_urls == len(manifest)
    assert on_ray.n_fetched == local.n_fetched
    assert on_ray.outcome_counts == local.outcome_counts
    assert set(map(tuple, on_ray.failures.to_numpy())) == set(map(tuple, local.failures.to_numpy()))

    root = StorageRoot.parse(
        s3.url(prefix), cache_dir=tmp_path / "cache", storage_options=s3.storage_options
    )
    root.pull("raw")  # the existing readers, on the pulled working copy
    ray_rows = read_raw(root.local_root / "raw")
    local_rows = read_raw(tmp_path / "local")
    assert list(ray_rows.columns) == list(local_rows.columns)
    assert {"make", "model", "year", "price", "listing_url"} <= set(ray_rows.columns)

    def comparable(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.drop(columns=["fetched_at"]).sort_values("url").reset_index(drop=True)

    pd.testing.assert_frame_equal(comparable(ray_rows), comparable(local_rows))

    urls = prepare_manifest(manifest)["url"].tolist()
    plan = plan_tasks(urls, fanout.urls_per_task)
    shards = raw_shard_paths(root.local_root / "raw")
    assert [p.name for p in shards] == [f"raw-{t.shard_index:05d}.parquet" for t in plan.tasks]
    assert [p.name for p in on_ray.shard_paths] == [p.name for p in shards]
    for task, path in zip(plan.tasks, shards, strict=True):
        assert pq.read_table(path, columns=["url"]).column("url").to_pylist() == [
            urls[r] for r in task.rows
        ]
    markers = {k for k in s3.keys(f"{prefix}/raw") if k.startswith("_tasks/")}
    assert markers == {f"_tasks/{t.key}.json" for t in plan.tasks}

    again = download_on_ray(manifest, s3.url(f"{prefix}/raw"), config, fanout, s3.storage_options)
    assert (again.n_fetched, again.n_skipped_existing) == (0, len(manifest))


# --------------------------------------------------------------------------- politeness


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("case", "limit", "rate", "crawl_delay_s", "image_delay_s"),
    [
        ("concurrency", 2, 0.0, 0.0, 0.1),
        ("rate", 8, 10.0, 0.0, 0.0),
        ("crawl-delay", 8, 0.0, 0.1, 0.0),
    ],
)
def test_politeness_holds_across_three_tasks(
    local_ray, catalog, tmp_path, case, limit, rate, crawl_delay_s, image_delay_s
):
    """Three tasks (three CPUs' worth, at once) fetch one host: the host never sees more than
    ``per_host_limit`` requests in flight, nor starts closer than the rate or the robots.txt
    Crawl-delay allows, as measured from the server's own log of each request."""
    with DemoServer(
        catalog=catalog,
        record_requests=True,
        image_delay_s=image_delay_s,
        crawl_delay_s=crawl_delay_s,
    ) as server:
        manifest = catalog.manifest_frame(server.base_url).head(24)
        config = demo_config(server, per_host_limit=limit, per_host_rate=rate)
        fanout = FanoutConfig(urls_per_task=8)
        result = download_on_ray(manifest, str(tmp_path / "raw"), config, fanout)
    records = server.request_log.records("/images/")  # complete once the server stopped

    assert result.n_fetched == 24 and len(result.shard_paths) == 3
    assert len(records) == 24
    spans = [(r.start, r.end) for r in records]
    peak = max_in_flight(spans)
    assert peak <= limit, f"{peak} requests in flight at once, limit {limit}"
    if case == "concurrency":
        assert peak == limit, "the limit is used, not just respected"
        return
    interval = 1 / rate if rate else crawl_delay_s
    starts = sorted(r.start for r in records)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # Arrival times carry the jitter of processes on a loaded machine (one late request
    # leaves a short gap after it), so most gaps, not all, are a full interval; the whole
    # run spans the intervals; and no 10 consecutive starts fit in much under 9 intervals.
    assert sum(g > 0.8 * interval for g in gaps) >= 0.75 * len(gaps), gaps
    assert starts[-1] - starts[0] > 0.9 * (len(starts) - 1) * interval
    window = [b - a for a, b in zip(starts, starts[9:], strict=False)]
    assert min(window) > 0.8 * 9 * interval, window
