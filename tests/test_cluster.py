"""The Ray download's parts that need no Ray: the plan, the politeness coordinator and the
task-side gate (in one event loop), seeded robots.txt, idempotent tasks, and the one-line
error when Ray is missing. The runs on a Ray cluster are in tests/test_cluster_ray.py."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import replace

import pandas as pd
import pytest

from carmodels.cluster import (
    RAY_MISSING,
    FanoutConfig,
    download_on_ray,
    plan_tasks,
    ray_session,
)
from carmodels.cluster.ingest import JobContext, RawFolder, TaskSpec, run_task
from carmodels.cluster.politeness import (
    HostCoordinator,
    LocalCoordinatorCalls,
    SharedHostGate,
    fair_shares,
)
from carmodels.demo import DemoCatalog, DemoServer, build_catalog
from carmodels.errors import InputError
from carmodels.options import add_dataclass_options, from_args
from carmodels.scrape import ScrapeConfig, read_raw
from carmodels.scrape.fetch import open_fetcher, read_robots
from carmodels.scrape.raw import metadata_column_names
from carmodels.scrape.robots import RobotsVerdict
from carmodels.scrape.urls import host_of

pytestmark = pytest.mark.timeout(120)


# --------------------------------------------------------------------------- the plan


def _urls(counts: dict[str, int]) -> list[str]:
    """``counts[host]`` URLs per host, hosts interleaved as a real manifest would have them."""
    urls = [f"https://{host}/img/{i}.jpg" for host, n in counts.items() for i in range(n)]
    random.Random(0).shuffle(urls)
    return urls


def test_plan_keeps_each_small_host_in_one_task_and_big_hosts_in_few():
    counts = {"big.example": 95, "mid.example": 30, **{f"s{i}.example": 7 for i in range(12)}}
    urls = _urls(counts)
    plan = plan_tasks(urls, urls_per_task=40, first_shard_index=3)

    rows = sorted(r for task in plan.tasks for r in task.rows)
    assert rows == list(range(len(urls))), "every URL in exactly one task"
    assert all(len(task.rows) <= 40 for task in plan.tasks)
    assert [t.shard_index for t in plan.tasks] == list(range(3, 3 + len(plan.tasks)))
    assert len({t.key for t in plan.tasks}) == len(plan.tasks)
    for task in plan.tasks:
        assert list(task.rows) == sorted(task.rows), "manifest order inside a task"
        assert set(task.hosts) == {host_of(urls[r]) for r in task.rows}
    # A host of n URLs spans ceil(n / 40) tasks, the fewest possible; smaller ones one task.
    assert plan.tasks_per_host["big.example"] == math.ceil(95 / 40)
    assert plan.tasks_per_host["mid.example"] == 1
    assert all(plan.tasks_per_host[f"s{i}.example"] == 1 for i in range(12))
    assert plan.shared_hosts == {"big.example"}
    # 95 + 30 + 84 = 209 URLs pack into the fewest tasks of 40.
    assert len(plan.tasks) == math.ceil(209 / 40)


def test_plan_is_deterministic_and_keys_depend_on_the_urls():
    urls = _urls({"a.example": 50, "b.example": 9})
    assert plan_tasks(urls, 20) == plan_tasks(list(urls), 20)
    other = plan_tasks([*urls[:-1], "https://a.example/img/other.jpg"], 20)
    assert {t.key for t in other.tasks} != {t.key for t in plan_tasks(urls, 20).tasks}
    assert plan_tasks([], 20).tasks == ()
    with pytest.raises(ValueError, match="urls_per_task"):
        plan_tasks(urls, 0)


# --------------------------------------------------------------------------- coordinator


@pytest.mark.parametrize(
    ("limit", "demands", "expected"),
    [
        (16, {"a": 100, "b": 100}, {"a": 8, "b": 8}),
        (16, {"a": 3, "b": 100}, {"a": 3, "b": 13}),
        (5, {"a": 9, "b": 9, "c": 9}, {"a": 2, "b": 2, "c": 1}),
        (2, {"a": 9, "b": 9, "c": 9}, {"a": 1, "b": 1, "c": 0}),
        (4, {"a": 0, "b": 9}, {"a": 0, "b": 4}),
        (4, {}, {}),
    ],
)
def test_fair_shares(limit, demands, expected):
    assert fair_shares(limit, demands) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_coordinator_never_has_more_slots_out_than_the_limit():
    """Random renewals (holders keeping at most what they hold, as the gate does): the slots
    held never add up to more than the limit, and a silent holder's slots come back."""
    clock = FakeClock()
    coordinator = HostCoordinator(per_host_limit=5, lease_ttl_s=1.0, clock=clock)
    rng = random.Random(1)
    held = {f"task-{i}": 0 for i in range(4)}
    for _ in range(2000):
        clock.now += 0.01
        name = rng.choice(list(held))
        keep = rng.randint(0, held[name])
        held[name], share = coordinator.renew("h", name, keep, rng.randint(0, 8))
        assert held[name] <= max(share, keep)
        total = sum(coordinator.stats()["hosts"]["h"]["holders"].values())
        assert total <= 5
    assert coordinator.stats()["hosts"]["h"]["peak_held"] <= 5

    # One holder takes everything, then goes silent (its node died): after the TTL its
    # slots are given to the next holder that asks.
    coordinator = HostCoordinator(per_host_limit=3, lease_ttl_s=1.0, clock=clock)
    assert coordinator.renew("h", "lost", 0, 10) == (3, 3)
    assert coordinator.renew("h", "alive", 0, 10) == (0, 2)  # a share, but nothing free yet
    clock.now += 1.5
    assert coordinator.renew("h", "alive", 0, 10) == (3, 3)
    coordinator.leave("h", "alive")
    assert coordinator.stats()["hosts"]["h"]["holders"] == {}


def test_coordinator_schedules_starts_one_interval_apart():
    wall = FakeClock()
    wall.now = 100.0
    coordinator = HostCoordinator(per_host_limit=4, lease_ttl_s=1.0, wall_clock=wall)
    assert coordinator.reserve_starts("h", 3, 0.5) == [100.0, 100.5, 101.0]
    assert coordinator.reserve_starts("h", 1, 0.5) == [101.5]  # after every earlier one
    assert coordinator.reserve_starts("other", 1, 0.5) == [100.0]  # hosts are apart
    wall.now = 200.0
    assert coordinator.reserve_starts("h", 2, 0.25) == [200.0, 200.25]  # not in the past


# --------------------------------------------------------------------------- gates


async def _run_tasks_through_gates(
    config: ScrapeConfig,
    n_tasks: int,
    requests_per_task: int,
    request_s: float,
    crawl_delay_s: float = 0.0,
) -> tuple[list[tuple[float, float]], HostCoordinator]:
    """``n_tasks`` tasks, each with its own gate, fetching one shared host: the (start, end)
    of every request, as the host would see them."""
    coordinator = HostCoordinator(config.per_host_limit, lease_ttl_s=2.0)
    calls = LocalCoordinatorCalls(coordinator)
    spans: list[tuple[float, float]] = []

    async def task(number: int) -> None:
        gate = SharedHostGate(config, {"h"}, calls, f"task-{number}", 0.02, 2.0)

        async def request() -> None:
            async with gate.hold("h", crawl_delay_s):
                start = time.monotonic()
                await asyncio.sleep(request_s)
                spans.append((start, time.monotonic()))

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(requests_per_task):
                    group.create_task(request())
        finally:
            await gate.close()

    async with asyncio.TaskGroup() as group:
        for number in range(n_tasks):
            group.create_task(task(number))
    return spans, coordinator


def max_in_flight(spans: list[tuple[float, float]]) -> int:
    """Most intervals open at once (an end at the same instant as a start closes first)."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_shared_gates_hold_the_host_limit_across_tasks():
    config = ScrapeConfig(per_host_limit=3, concurrency=8)
    spans, coordinator = asyncio.run(_run_tasks_through_gates(config, 3, 8, 0.03))
    assert len(spans) == 24
    assert max_in_flight(spans) <= 3
    assert max_in_flight(spans) == 3, "the limit is used, not just respected"
    assert coordinator.stats()["hosts"]["h"]["peak_held"] <= 3
    assert coordinator.stats()["hosts"]["h"]["holders"] == {}, "every task handed its slots back"
    # Leases, not a call per request: 24 requests took far fewer than 24 calls per task.
    assert coordinator.stats()["calls"] < 3 * 24


@pytest.mark.parametrize(("rate", "crawl_delay_s"), [(25.0, 0.0), (0.0, 0.04)])
def test_shared_gates_space_starts_across_tasks(rate, crawl_delay_s):
    config = ScrapeConfig(per_host_limit=8, per_host_rate=rate, concurrency=8)
    spans, _ = asyncio.run(_run_tasks_through_gates(config, 3, 5, 0.001, crawl_delay_s))
    starts = sorted(start for start, _ in spans)
    interval = 1 / rate if rate else crawl_delay_s
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # One event loop, so the jitter is small: every gap but a late wake-up's neighbour.
    assert sum(g > 0.8 * interval for g in gaps) >= 0.85 * len(gaps), gaps
    assert starts[-1] - starts[0] > 0.9 * (len(starts) - 1) * interval


def test_hosts_of_one_task_never_call_the_coordinator():
    class Refusing(LocalCoordinatorCalls):
        async def renew(self, *args):
            raise AssertionError("a host of one task needs no coordinator")

    async def run() -> None:
        calls = Refusing(HostCoordinator(2, 1.0))
        gate = SharedHostGate(ScrapeConfig(per_host_limit=2), {"shared"}, calls, "t", 0.1, 1.0)
        async with gate.hold("mine", 0.0):
            pass
        await gate.close()

    asyncio.run(run())


# --------------------------------------------------------------------------- robots seeds


@pytest.fixture(scope="module")
def small_catalog() -> DemoCatalog:
    return build_catalog(seed=0, n_listings=12)


@pytest.fixture
def site(small_catalog: DemoCatalog) -> Iterator[DemoServer]:
    """A demo site of its own that asks for a Crawl-delay and logs its requests.

    Read its log after ``site.stop()``: a client can have a whole response a moment before
    the server's thread has logged it.
    """
    with DemoServer(catalog=small_catalog, record_requests=True, crawl_delay_s=0.05) as server:
        yield server


def test_robots_read_once_and_seeded(site):
    server = site
    config = ScrapeConfig(allowed_private_origins=(server.base_url,))
    urls = server.catalog.manifest_frame(server.base_url)["url"].tolist()[:3]

    seeds = asyncio.run(read_robots(config, urls))
    assert list(seeds) == [server.base_url]
    assert "Crawl-delay: 0.05" in seeds[server.base_url]

    async def fetch_seeded() -> tuple[list[str], float]:
        async with open_fetcher(config, robots_seeds=seeds) as fetcher:
            rows = [await fetcher.fetch(url) for url in urls]
            return [row["outcome"] for row in rows], fetcher._robots.crawl_delay_s(urls[0])

    outcomes, delay = asyncio.run(fetch_seeded())
    assert len(outcomes) == 3 and "ok" in outcomes  # the catalog plants a corrupt photo or so
    assert delay == 0.05, "the seeded file's Crawl-delay applies"
    assert asyncio.run(read_robots(replace(config, respect_robots=False), urls)) == {}
    server.stop()
    assert len(server.request_log.records("/robots.txt")) == 1, "the fetcher did not refetch"
    assert len(server.request_log.records("/images/")) == 3


def test_demo_request_log_and_delays(site):
    server = site
    config = ScrapeConfig(allowed_private_origins=(server.base_url,))
    asyncio.run(read_robots(config, [server.base_url + "/x"]))
    host = server.base_url.removeprefix("http://")
    server.stop()
    (record,) = server.request_log.records()
    assert record.path == "/robots.txt" and record.status == 200
    assert record.host == host
    assert record.start <= record.end
    with pytest.raises(ValueError, match="image_delay_s"):
        DemoServer(n_listings=10, image_delay_s=-1)


def test_seeded_verdicts_stand_for_the_origin():
    from carmodels.scrape.fetch import robots_settings
    from carmodels.scrape.robots import RobotsCache

    async def ask() -> tuple[RobotsVerdict, RobotsVerdict, RobotsVerdict]:
        cache = RobotsCache(
            None,  # never used: every origin asked about is seeded
            robots_settings(ScrapeConfig()),
            {
                "https://down.example": RobotsVerdict.UNAVAILABLE,
                "https://free.example": RobotsVerdict.ALLOWED,
                "https://rules.example": "User-agent: *\nDisallow: /private\n",
            },
        )
        return (
            await cache.verdict("https://down.example/a.jpg"),
            await cache.verdict("https://free.example/a.jpg"),
            await cache.verdict("https://rules.example/private/a.jpg"),
        )

    assert asyncio.run(ask()) == (
        RobotsVerdict.UNAVAILABLE,
        RobotsVerdict.ALLOWED,
        RobotsVerdict.DENIED,
    )


# --------------------------------------------------------------------------- tasks


def test_a_task_is_idempotent_behind_its_done_marker(site, tmp_path):
    """``run_task`` without Ray (no host shared with another task): it writes its shard and
    marker; run again, it returns the recorded result without fetching anything."""
    server = site
    config = ScrapeConfig(allowed_private_origins=(server.base_url,), per_host_limit=4)
    manifest = server.catalog.manifest_frame(server.base_url).head(6)
    names = metadata_column_names(manifest.columns)
    jobs = tuple(
        (row["url"], {names[c]: str(row[c]) for c in names}, None)
        for row in manifest.to_dict("records")
    )
    seeds = asyncio.run(read_robots(config, manifest["url"]))
    context = JobContext(
        str(tmp_path / "raw"), {}, config, tuple(names.values()), seeds, frozenset(), None, 0.1, 1.0
    )
    spec = TaskSpec("00007-test", 7, jobs)
    # After read_robots's request started: that one may be logged a moment after it returned.
    tasks_started = time.monotonic()

    first = run_task(context, spec)
    assert first.shard == "raw-00007.parquet"
    assert sum(first.outcome_counts.values()) == first.n_urls == 6
    again = run_task(context, spec)
    assert again == first
    server.stop()
    assert len(server.request_log.records("/images/")) == 6, "nothing fetched the second time"
    robots = [r for r in server.request_log.records("/robots.txt") if r.start >= tasks_started]
    assert not robots, "seeded: robots.txt not refetched"
    raw = read_raw(tmp_path / "raw")
    assert raw["url"].tolist() == manifest["url"].tolist(), "rows in manifest order"
    assert raw["make"].tolist() == manifest["make"].tolist()
    assert RawFolder(str(tmp_path / "raw")).scan(False).next_shard_index == 8


def test_a_revalidating_task_writes_only_changed_rows(site, tmp_path):
    """With stored validators the task asks conditionally: 304s keep the stored rows, so a
    task whose photos all answer 304 writes no shard, only its marker with the tally."""
    server = site
    config = ScrapeConfig(allowed_private_origins=(server.base_url,), revalidate=True)
    manifest = server.catalog.manifest_frame(server.base_url).head(3)
    raw = tmp_path / "raw"
    seeds = asyncio.run(read_robots(config, manifest["url"]))
    context = JobContext(str(raw), {}, config, (), seeds, frozenset(), None, 0.1, 1.0)
    first = run_task(context, TaskSpec("00000-a", 0, tuple((u, {}, None) for u in manifest.url)))
    validators = RawFolder(str(raw)).scan(with_validators=True).validators
    ok = [url for url in manifest.url if url in validators]
    assert ok and first.outcome_counts["ok"] == len(ok)

    again = run_task(context, TaskSpec("00001-b", 1, tuple((u, {}, validators[u]) for u in ok)))
    assert again.revalidation_counts == {"not_modified": len(ok)}
    assert (again.shard, again.outcome_counts) == (None, {})
    assert RawFolder(str(raw)).read_marker("00001-b") == again
    assert [p.name for p in sorted(raw.glob("raw-*.parquet"))] == ["raw-00000.parquet"]


# --------------------------------------------------------------------------- settings, errors


def test_missing_ray_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    manifest = pd.DataFrame({"url": ["https://example.com/a.jpg"]})
    with pytest.raises(InputError) as caught:
        download_on_ray(manifest, str(tmp_path), fanout=FanoutConfig(address="local"))
    assert str(caught.value) == RAY_MISSING == "Ray is not installed: pip install 'carmodels[ray]'"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(InputError, match="Ray is not installed"), ray_session("local"):
        pass


def test_an_unreachable_cluster_is_one_line_in_seconds():
    """Ray itself retries an unreachable head for many minutes; the check before it does not."""
    from carmodels.cluster.connect import check_reachable
    from tests.conftest import free_port

    for address in (f"127.0.0.1:{free_port()}", f"ray://127.0.0.1:{free_port()}"):
        started = time.monotonic()
        with pytest.raises(InputError, match="Cannot reach the Ray cluster at") as caught:
            check_reachable(address, timeout_s=5)
        assert time.monotonic() - started < 5
        assert address in str(caught.value) and "\n" not in str(caught.value)
        assert caught.value.__cause__ is None
    check_reachable("auto")  # Ray resolves these itself
    check_reachable("local")


def test_fanout_config_is_checked_and_makes_options():
    with pytest.raises(ValueError, match="urls_per_task"):
        FanoutConfig(urls_per_task=0)
    with pytest.raises(ValueError, match="lease_ttl_s"):
        FanoutConfig(lease_s=1.0, lease_ttl_s=2.0)
    parser = argparse.ArgumentParser()
    names = ["address", "urls_per_task", "task_retries"]
    add_dataclass_options(parser, FanoutConfig, names)
    args = parser.parse_args(["--address", "local", "--urls-per-task", "50"])
    assert from_args(FanoutConfig, args, names) == FanoutConfig(address="local", urls_per_task=50)
