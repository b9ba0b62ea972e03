"""robots.txt in the crawler and ``Crawl-delay`` in both the crawler and the downloader,
measured as request spacing at a local test server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from carmodels.scrape import crawl_listings, download_images
from carmodels.scrape.robots import parse_crawl_delay
from tests.test_scrape import FAST, ROBOTS_TXT, ScrapeTestServer, manifest_for

pytestmark = pytest.mark.timeout(60)

#: The test agent's token; ROBOTS_TXT's last group is ``User-agent: carmodels-tests``, so
#: lines appended to it apply to us.
AGENT = "carmodels-tests/1.0"


@pytest.fixture
def fresh_server() -> Iterator[ScrapeTestServer]:
    server = ScrapeTestServer()
    server.start()
    yield server
    server.stop()


def arrival_times(server: ScrapeTestServer, paths: list[str]) -> np.ndarray:
    return np.sort([t for p in paths for t in server.request_times.get(p, [])])


def assert_spaced(times: np.ndarray, interval: float) -> None:
    """Requests arrived about ``interval`` apart.

    Arrival times at the server carry the scheduling jitter of a loaded machine: one request
    held up in transit makes one long gap and one short gap after it. So most gaps (not all)
    must be at least 0.8 ``interval``, and the whole run must span the intervals. Unpaced
    requests arrive milliseconds apart and fail both.
    """
    gaps = np.diff(times)
    assert (gaps > 0.8 * interval).mean() >= 0.75, f"gaps {gaps.round(3)} vs {interval}"
    assert times[-1] - times[0] > 0.9 * (len(times) - 1) * interval


TWO_GROUPS = "User-agent: carmodels\nCrawl-delay: 1.5\n\nUser-agent: *\nCrawl-delay: 5\n"


@pytest.mark.parametrize(
    ("text", "agent", "expected"),
    [
        ("User-agent: *\nCrawl-delay: 0.2\nDisallow: /x\n", "carmodels", 0.2),
        (TWO_GROUPS, "carmodels", 1.5),
        (TWO_GROUPS, "otherbot", 5.0),
        ("User-agent: a\nUser-agent: carmodels # us\nDisallow: /\nCrawl-delay: 2", "carmodels", 2),
        ("User-agent: *\nCrawl-delay: soon\n", "carmodels", 0.0),
        ("User-agent: *\nCrawl-delay: nan\n", "carmodels", 0.0),
        ("User-agent: *\nCrawl-delay: -3\n", "carmodels", 0.0),
        ("Crawl-delay: 3\nUser-agent: *\nDisallow: /\n", "carmodels", 0.0),  # outside any group
        ("User-agent: otherbot\nCrawl-delay: 9\n", "carmodels", 0.0),
    ],
)  # fmt: skip
def test_parse_crawl_delay(text, agent, expected):
    assert parse_crawl_delay(text, agent) == expected


def test_crawler_does_not_fetch_pages_robots_txt_disallows(fresh_server, caplog):
    fresh_server.robots_txt = ROBOTS_TXT + "Disallow: /cars/page2\n"
    with caplog.at_level(logging.WARNING, logger="carmodels.scrape.crawl"):
        frame = crawl_listings(
            fresh_server.url("/cars/page1"), allow_private_networks=True, user_agent=AGENT
        )
    assert fresh_server.hits["/cars/page1"] == 1
    assert fresh_server.hits["/cars/page2"] == 0, "a disallowed page is never requested"
    assert fresh_server.hits["/robots.txt"] == 1, "robots.txt is fetched once per origin"
    assert frame.attrs["pages_fetched"] == 1
    assert frame.attrs["pages_robots_denied"] == 1
    assert frame.attrs["pages_failed"] == 0
    assert "cars/page2 not fetched: robots_denied" in caplog.text
    assert set(frame["url"]) == {fresh_server.url(p) for p in ("/img/a1.jpg", "/cars/img/a2.jpg")}

    everything = crawl_listings(
        fresh_server.url("/cars/page1"),
        allow_private_networks=True,
        user_agent=AGENT,
        respect_robots=False,
    )
    assert everything.attrs["pages_fetched"] == 3
    assert everything.attrs["pages_robots_denied"] == 0


def test_crawler_skips_a_site_whose_robots_txt_is_unavailable(fresh_server):
    fresh_server.robots_status = 503
    frame = crawl_listings(fresh_server.url("/cars/page1"), allow_private_networks=True)
    assert frame.empty
    assert frame.attrs["pages_failed"] == 1
    assert fresh_server.hits["/cars/page1"] == 0


@pytest.mark.parametrize(
    ("per_host_rate", "crawl_delay", "interval"),
    [(20.0, 0.2, 0.2), (4.0, 0.1, 0.25)],
    ids=["crawl-delay-is-slower", "rate-is-slower"],
)
def test_downloader_spaces_requests_by_the_slower_of_crawl_delay_and_rate(
    fresh_server, tmp_path, per_host_rate, crawl_delay, interval
):
    fresh_server.robots_txt = ROBOTS_TXT + f"Crawl-delay: {crawl_delay}\n"
    paths = [f"/img/delayed-{i}.jpg" for i in range(5)]
    config = replace(FAST, per_host_rate=per_host_rate, total_timeout_s=5.0)
    result = download_images(manifest_for([fresh_server.url(p) for p in paths]), tmp_path, config)
    assert result.outcome_counts == {"ok": 5}
    assert_spaced(arrival_times(fresh_server, paths), interval)


def test_downloader_caps_an_excessive_crawl_delay(fresh_server, tmp_path, caplog):
    fresh_server.robots_txt = ROBOTS_TXT + "Crawl-delay: 3600\n"
    paths = [f"/img/capped-{i}.jpg" for i in range(3)]
    config = replace(FAST, max_crawl_delay_s=0.2)
    manifest = manifest_for([fresh_server.url(p) for p in paths])
    with caplog.at_level(logging.WARNING, logger="carmodels.scrape.robots"):
        result = download_images(manifest, tmp_path, config)
    assert result.outcome_counts == {"ok": 3}
    assert "Crawl-delay 3600 s; using the cap of 0.2 s" in caplog.text
    assert_spaced(arrival_times(fresh_server, paths), 0.2)


def test_downloader_without_robots_ignores_crawl_delay(fresh_server, tmp_path):
    fresh_server.robots_txt = ROBOTS_TXT + "Crawl-delay: 30\n"
    paths = [f"/img/unpaced-{i}.jpg" for i in range(4)]
    config = replace(FAST, respect_robots=False)
    result = download_images(manifest_for([fresh_server.url(p) for p in paths]), tmp_path, config)
    assert result.outcome_counts == {"ok": 4}  # within the test timeout: no 30 s waits


def test_crawler_honours_crawl_delay(fresh_server):
    fresh_server.robots_txt = ROBOTS_TXT + "Crawl-delay: 0.2\n"
    frame = crawl_listings(
        fresh_server.url("/cars/page1"), allow_private_networks=True, user_agent=AGENT
    )
    assert frame.attrs["pages_fetched"] == 3
    pages = [f"/cars/page{i}" for i in (1, 2, 3)]
    assert_spaced(arrival_times(fresh_server, pages), 0.2)


def test_crawler_spaces_pages_by_per_host_rate(fresh_server):
    fresh_server.robots_txt = None  # no robots.txt: only the configured rate paces
    frame = crawl_listings(
        fresh_server.url("/cars/page1"), allow_private_networks=True, per_host_rate=5.0
    )
    assert frame.attrs["pages_fetched"] == 3
    assert_spaced(arrival_times(fresh_server, [f"/cars/page{i}" for i in (1, 2, 3)]), 0.2)
    with pytest.raises(ValueError, match="per_host_rate"):
        crawl_listings(fresh_server.url("/cars/page1"), per_host_rate=-1)
