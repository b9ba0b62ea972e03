"""Fetch processes: the same rows as one process, limits split exactly, a dead worker stops
the run without losing what was fetched."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import Counter
from dataclasses import replace

import pytest

from carmodels.scrape import ScrapeConfig, download_images, read_raw
from carmodels.scrape.processes import (
    PROCESSES_MIN_URLS,
    FetchProcessFailed,
    fetch_process_count,
    usable_cores,
    worker_configs,
)
from tests.test_scrape import FAST, ScrapeTestServer, manifest_for

PATHS = {
    "/img/good.jpg": "ok",
    "/good.png": "ok",
    "/flaky/outcomes-p": "ok",
    "/ratelimited/outcomes-p": "ok",
    "/img/../missing": "http_404",
    "/html-as-jpeg": "not_image",
    "/truncated.jpg": "corrupt",
    "/bomb.png": "bomb",
    "/huge": "too_large",
    "/loop": "too_many_redirects",
    "/hang": "timeout",
    "/private/photo.jpg": "robots_denied",
    "/noai": "opted_out",
}


@pytest.fixture
def fresh_server():
    server = ScrapeTestServer()
    server.start()
    yield server
    server.stop()


def test_fetch_processes_give_the_outcomes_of_one_process(fresh_server, tmp_path):
    urls = [fresh_server.url(p) for p in PATHS]
    manifest = manifest_for(urls, make=[f"make{i}" for i in range(len(urls))])
    result = download_images(manifest, tmp_path, replace(FAST, fetch_processes=2))

    raw = read_raw(tmp_path).set_index("url")
    assert {p: raw.loc[fresh_server.url(p), "outcome"] for p in PATHS} == PATHS
    assert result.outcome_counts == dict(Counter(PATHS.values()))
    assert raw.loc[urls[0], "make"] == "make0", "metadata joins in the parent"
    # Retries happen in the worker as in one process: the 500 and the 429 once each.
    assert fresh_server.hits["/flaky/outcomes-p"] == 2
    assert fresh_server.hits["/ratelimited/outcomes-p"] == 2
    # Each process keeps its own robots.txt cache.
    assert 1 <= fresh_server.hits["/robots.txt"] <= 2
    assert not [p for p in multiprocessing.active_children() if p.name == "carmodels-fetch"]


def test_worker_configs_split_every_limit_exactly():
    config = ScrapeConfig(concurrency=64, per_host_limit=15, per_host_rate=6.0)
    parts = worker_configs(config, 4)
    assert sum(c.concurrency for c in parts) == 64
    assert sum(c.per_host_limit for c in parts) == 15
    assert [c.per_host_limit for c in parts] == [4, 4, 4, 3]
    assert sum(c.per_host_rate for c in parts) == pytest.approx(6.0)
    assert {c.fetch_processes for c in parts} == {1}


def test_fetch_process_count():
    cores = usable_cores()
    auto = ScrapeConfig(concurrency=64, per_host_limit=64)
    assert fetch_process_count(auto, PROCESSES_MIN_URLS - 1) == 1, "small runs stay in process"
    assert fetch_process_count(auto, PROCESSES_MIN_URLS) == min(cores, 64)
    # Never more processes than request slots per host (each needs one) or URLs.
    assert fetch_process_count(replace(auto, fetch_processes=8, per_host_limit=3), 10**6) == 3
    assert fetch_process_count(replace(auto, fetch_processes=8), 5) == 5
    with pytest.raises(ValueError, match="fetch_processes"):
        ScrapeConfig(fetch_processes=-1)


@pytest.mark.timeout(120)
def test_a_dead_fetch_process_stops_the_run_and_keeps_fetched_rows(fresh_server, tmp_path):
    fresh_server.image_delay_s = 0.01
    n_urls = 400
    urls = [fresh_server.url(f"/img/dead-{i}.jpg") for i in range(n_urls)]
    config = replace(FAST, fetch_processes=2, shard_size=20)
    killed: list[int] = []

    def kill_a_worker(done: int, total: int) -> None:
        if done == 100 and not killed:
            children = multiprocessing.active_children()
            worker = next(p for p in children if p.name == "carmodels-fetch")
            os.kill(worker.pid, signal.SIGKILL)
            killed.append(worker.pid)

    with pytest.raises(FetchProcessFailed, match=r"exited unexpectedly .*run again"):
        download_images(manifest_for(urls), tmp_path, config, on_progress=kill_a_worker)
    assert killed
    saved = read_raw(tmp_path)
    assert len(saved) >= 100, "rows fetched before the death are saved"

    result = download_images(manifest_for(urls), tmp_path, config)
    assert result.n_skipped_existing == len(saved)
    raw = read_raw(tmp_path)
    assert sorted(raw["url"]) == sorted(urls) and (raw["outcome"] == "ok").all()
