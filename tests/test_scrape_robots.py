"""robots.txt in the crawler and ``Crawl-delay`` in both the crawler and the downloader,
measured as request spacing at a local test server; RFC 9309's matching rules, asked of
:class:`RobotsCache` with robots.txt served by that server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

from carmodels.scrape import crawl_listings, download_images
from carmodels.scrape.net import SessionSettings, open_session
from carmodels.scrape.robots import (
    ROBOTS_MAX_BYTES,
    RobotsCache,
    RobotsSettings,
    RobotsVerdict,
    parse_crawl_delay,
)
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


def ask_robots(
    server: ScrapeTestServer, robots_txt: str, paths: list[str], user_agent: str = AGENT
) -> tuple[dict[str, bool], float]:
    """Serve ``robots_txt`` and ask a fresh :class:`RobotsCache` (fetch, parse and match, as
    the downloader does) whether ``user_agent`` may fetch each path, and its Crawl-delay."""
    server.robots_txt = robots_txt

    async def ask() -> tuple[dict[str, RobotsVerdict], float]:
        settings = SessionSettings(user_agent=user_agent, allow_private_networks=True)
        async with open_session(settings) as session:
            cache = RobotsCache(session, RobotsSettings(user_agent, allow_private_networks=True))
            try:
                verdicts = {path: await cache.verdict(server.url(path)) for path in paths}
                return verdicts, cache.crawl_delay_s(server.url("/"))
            finally:
                await cache.close()

    verdicts, delay = asyncio.run(ask())
    assert set(verdicts.values()) <= {RobotsVerdict.ALLOWED, RobotsVerdict.DENIED}
    return {path: v is RobotsVerdict.ALLOWED for path, v in verdicts.items()}, delay


def allowed(
    server: ScrapeTestServer, robots_txt: str, paths: dict[str, bool], user_agent: str = AGENT
) -> dict[str, bool]:
    return ask_robots(server, robots_txt, list(paths), user_agent)[0]


def test_wildcard_matches_any_run_of_characters(fresh_server):
    robots = "User-agent: *\nDisallow: /gallery/*/full\n"
    paths = {
        "/gallery/2019/full/1.jpg": False,
        "/gallery/a/b/full": False,  # the * spans slashes too
        "/gallery/full": True,  # * stands between two slashes here: /gallery//full would do
        "/gallery/2019/thumb/1.jpg": True,
    }
    assert allowed(fresh_server, robots, paths) == paths


def test_dollar_anchors_the_end_of_the_url(fresh_server):
    paths = {
        "/x/2.png": False,
        "/2.png": False,
        "/x/2.png?x=1": True,  # the query is part of what is matched
        "/x/2.pngs": True,
        "/x/2.PNG": True,  # paths match case-sensitively
        "/x/2.jpg": True,
    }
    assert allowed(fresh_server, "User-agent: *\nDisallow: /*.png$\n", paths) == paths
    # Without the anchor the same pattern is a prefix match and catches them all.
    unanchored = allowed(fresh_server, "User-agent: *\nDisallow: /*.png\n", paths)
    assert unanchored == {**paths, "/x/2.png?x=1": False, "/x/2.pngs": False}


@pytest.mark.parametrize("order", [1, -1], ids=["as-written", "reversed"])
def test_longest_match_wins_whatever_the_order(fresh_server, order):
    lines = [
        "Disallow: /gallery/",
        "Allow: /gallery/public/",
        "Allow: /cars/",
        "Disallow: /cars/*/private",
    ]
    robots = "User-agent: *\n" + "\n".join(lines[::order]) + "\n"
    paths = {
        "/gallery/public/4.jpg": True,
        "/gallery/private/4.jpg": False,
        "/gallery/": False,
        "/cars/audi/1.jpg": True,
        "/cars/audi/private/1.jpg": False,
        "/elsewhere": True,
    }
    assert allowed(fresh_server, robots, paths) == paths


@pytest.mark.parametrize("order", [1, -1], ids=["as-written", "reversed"])
def test_allow_wins_a_tie_of_equal_length(fresh_server, order):
    lines = ["Disallow: /page", "Allow: /page", "Disallow: /cars/", "Allow: /cars*", "Disallow: /p"]
    robots = "User-agent: *\n" + "\n".join(lines[::order]) + "\n"
    paths = {
        "/page": True,
        "/page/2": True,
        "/cars/1.jpg": True,  # /cars/ and /cars* both match, both 6 characters long
        "/pa.jpg": False,  # only the shorter Disallow: /p matches
    }
    assert allowed(fresh_server, robots, paths) == paths


GROUPS = """\
User-agent: *
Disallow: /

User-agent: carmodels-tests
Disallow: /private/

User-agent: otherbot
User-agent: models
Disallow: /img/

User-agent: carmodels-tests
Disallow: /drafts/
"""


@pytest.mark.parametrize(
    ("text", "user_agent", "expected"),
    [
        # Ours, both groups naming us combined (RFC 9309 2.2.1); not the * group.
        (GROUPS, AGENT, (True, False, False, True)),
        (GROUPS, "OtherBot/2.0 (+https://example.com/bot)", (False, True, True, True)),
        (GROUPS, "somebot/1.0", (False, False, False, False)),  # nobody named: the * group
        # ``models`` is inside ``supermodels`` but not its product token: the * group.
        (GROUPS, "supermodels/1.0", (False, False, False, False)),
        (GROUPS.replace("carmodels-tests", "CarModels-Tests"), AGENT, (True, False, False, True)),
        # A version after the name (not RFC 9309, but seen) still names our token.
        (GROUPS.replace("tests\n", "tests/2.0\n"), AGENT, (True, False, False, True)),
    ],
    ids=["ours", "other", "star", "substring", "case", "version"],
)  # fmt: skip
def test_the_group_naming_our_product_token_applies(fresh_server, text, user_agent, expected):
    paths = ["/img/a.jpg", "/private/a.jpg", "/drafts/a.jpg", "/a.jpg"]
    assert allowed(fresh_server, text, dict.fromkeys(paths), user_agent) == dict(
        zip(paths, expected, strict=True)
    )


def test_paths_are_compared_with_percent_encoding_normalised(fresh_server):
    robots = "User-agent: *\nDisallow: /foo/bar/ツ\nDisallow: /%62%61%7A/\nDisallow: /a%3cb\n"
    paths = {
        "/foo/bar/%E3%83%84": False,  # the rule's UTF-8, percent-encoded (RFC 9309 2.2.2)
        "/foo/bar/ツ": False,
        "/baz/1.jpg": False,  # the rule's unreserved characters, decoded
        "/a%3Cb": False,  # hex digits in either case
        "/foo/bar/x": True,
    }
    assert allowed(fresh_server, robots, paths) == paths


@pytest.mark.parametrize(
    ("user_agent", "delay"), [(AGENT, 0.25), ("otherbot/1.0", 1.5), ("somebot/1.0", 0.0)]
)
def test_fractional_crawl_delay_of_the_group_that_applies(fresh_server, user_agent, delay):
    robots = (
        "User-agent: carmodels-tests\nCrawl-delay: 0.25\n\n"
        "User-agent: otherbot\nCrawl-delay: 1.5\n\n"
        "User-agent: *\nDisallow: /private/\n"
    )
    assert ask_robots(fresh_server, robots, ["/x"], user_agent)[1] == delay


def test_byte_order_mark_does_not_hide_the_first_group(fresh_server):
    paths = {"/private/a.jpg": False, "/img/a.jpg": True}
    assert allowed(fresh_server, "\ufeffUser-agent: *\nDisallow: /private/\n", paths) == paths


def test_rules_past_the_size_cap_are_ignored(fresh_server):
    padding = "# padding\n" * (ROBOTS_MAX_BYTES // 10)
    robots = f"User-agent: *\nDisallow: /early/\n{padding}Disallow: /late/\n"
    paths = {"/early/a.jpg": False, "/late/a.jpg": True}
    assert allowed(fresh_server, robots, paths) == paths


def test_downloader_applies_wildcard_and_anchored_rules(fresh_server, tmp_path):
    fresh_server.robots_txt = ROBOTS_TXT + "Disallow: /*.png$\nDisallow: /img/*-private.jpg\n"
    outcomes = {
        "/good.png": "robots_denied",
        "/img/a-private.jpg": "robots_denied",
        "/img/a.jpg": "ok",
    }
    urls = [fresh_server.url(p) for p in outcomes]
    result = download_images(manifest_for(urls), tmp_path, FAST)
    assert result.outcome_counts == {"robots_denied": 2, "ok": 1}
    assert dict(zip(result.failures["url"], result.failures["outcome"], strict=True)) == {
        fresh_server.url(p): o for p, o in outcomes.items() if o != "ok"
    }
    assert fresh_server.hits["/good.png"] == fresh_server.hits["/img/a-private.jpg"] == 0
