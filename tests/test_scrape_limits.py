"""Downloader limits that no other test measures: a server's ``Retry-After`` on 429 and 503,
and the cap on requests in flight to one host (``ScrapeConfig.per_host_limit``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from email.utils import formatdate

import pytest
from aiohttp import web

from carmodels.scrape import download_images
from tests.test_scrape import FAST, GOOD_JPEG, ScrapeTestServer, manifest_for

pytestmark = pytest.mark.timeout(60)

#: Loopback addresses: three hosts to the downloader, whose per-host limits key on the host
#: name, not the port. Linux routes all of 127.0.0.0/8 to the loopback interface.
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class LimitsServer(ScrapeTestServer):
    """:class:`ScrapeTestServer`'s thread, hit counting and 404 robots.txt, with this file's
    routes, listening on each of ``hosts`` (a port each):

    * ``/busy/{status}/{token}?after=A``: the first hit answers ``status`` with
      ``Retry-After: A`` (``A`` = ``date``: an HTTP date 1 to 2 s ahead), later hits an image;
    * ``/slow/{name}``: an image after ``hold_s``, counting requests in flight per host.
    """

    def __init__(self, hosts: tuple[str, ...] = HOSTS[:1]) -> None:
        super().__init__()
        self.hosts = hosts
        self.ports: dict[str, int] = {}
        self.robots_txt = None  # no rules: only the limits under test shape the requests
        self.hold_s = 0.2
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.max_total_in_flight = 0
        #: Wall-clock arrival times per /busy path (request_times are monotonic).
        self.wall_times: dict[str, list[float]] = {}
        #: The wall-clock time each ``after=date`` response asked the client to wait for.
        self.retry_at: dict[str, float] = {}

    def host_url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.ports[host]}{path}"

    async def _start(self) -> None:
        self._release = asyncio.Event()
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/busy/{status}/{token}", self._busy)
        app.router.add_get("/slow/{name}", self._slow)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        for host in self.hosts:
            site = web.TCPSite(self._runner, host, 0)
            await site.start()
            self.ports[host] = site._server.sockets[0].getsockname()[1]
        self.port = self.ports[self.hosts[0]]

    async def _busy(self, request: web.Request) -> web.Response:
        self.wall_times.setdefault(request.path, []).append(time.time())
        if self.hits[request.path] > 1:
            return self._bytes(GOOD_JPEG, "image/jpeg")
        after = request.query["after"]
        if after == "date":
            # Whole seconds, all an HTTP date can say; at least a second ahead.
            self.retry_at[request.path] = retry_at = math.ceil(time.time()) + 1
            after = formatdate(retry_at, usegmt=True)
        status = int(request.match_info["status"])
        return web.Response(status=status, headers={"Retry-After": after})

    async def _slow(self, request: web.Request) -> web.Response:
        # All handlers run on the server's one event loop thread: plain counters are safe.
        host = request.url.host or ""
        self.in_flight[host] += 1
        self.max_in_flight[host] = max(self.max_in_flight[host], self.in_flight[host])
        self.max_total_in_flight = max(self.max_total_in_flight, self.in_flight.total())
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.in_flight[host] -= 1
        return self._bytes(GOOD_JPEG, "image/jpeg")


def serve(hosts: tuple[str, ...]) -> Iterator[LimitsServer]:
    server = LimitsServer(hosts)
    try:
        server.start()
    except OSError as error:  # macOS, for one, has only 127.0.0.1 on its loopback
        server.stop()
        pytest.skip(f"cannot listen on {hosts}: {error}")
    yield server
    server.stop()


@pytest.fixture
def busy_server() -> Iterator[LimitsServer]:
    yield from serve(HOSTS[:1])


@pytest.fixture
def three_host_server() -> Iterator[LimitsServer]:
    yield from serve(HOSTS)


@pytest.mark.parametrize(
    ("status", "after"), [(429, "1"), (503, "1"), (503, "date")], ids=["429", "503", "503-date"]
)
def test_retry_waits_for_retry_after(busy_server, tmp_path, status, after):
    path = f"/busy/{status}/{after}"
    # FAST's own backoff is 0.05 to 0.1 s: a wait of a second can only be the server's.
    config = replace(FAST, max_retries=1, max_retry_after_s=5.0)
    url = busy_server.url(f"{path}?after={after}")
    result = download_images(manifest_for([url]), tmp_path, config)

    assert result.outcome_counts == {"ok": 1}, "the retry after the wait succeeded"
    assert busy_server.hits[path] == 2
    if after == "date":
        # The client reads the date against its own wall clock (to the microsecond) and
        # sleeps on the monotonic one: allow those clocks a few milliseconds of disagreement.
        assert busy_server.wall_times[path][1] >= busy_server.retry_at[path] - 0.005
    else:
        first, second = busy_server.request_times[path]
        assert second - first >= float(after)


def test_retry_after_beyond_the_cap_waits_the_cap(busy_server, tmp_path):
    path = "/busy/503/capped"
    config = replace(FAST, max_retries=1, max_retry_after_s=0.3)
    started = time.perf_counter()
    result = download_images(
        manifest_for([busy_server.url(f"{path}?after=3600")]), tmp_path, config
    )
    assert result.outcome_counts == {"ok": 1}
    first, second = busy_server.request_times[path]
    assert second - first >= 0.3
    assert time.perf_counter() - started < 30, "an hour's Retry-After is cut to the cap"


def test_per_host_limit_caps_requests_in_flight_to_each_host(three_host_server, tmp_path):
    server = three_host_server
    config = replace(FAST, concurrency=8, per_host_limit=2, fetch_processes=1)
    # Hosts interleaved, so the workers' first requests go to all three at once.
    urls = [server.host_url(host, f"/slow/{host}-{i}.jpg") for i in range(6) for host in HOSTS]
    result = download_images(manifest_for(urls), tmp_path, config)

    assert result.outcome_counts == {"ok": len(urls)}
    # Reached (so the measurement sees overlap) and never passed, on every host.
    assert server.max_in_flight == dict.fromkeys(HOSTS, config.per_host_limit)
    # Over the hosts together more were in flight: the cap is per host, not overall.
    assert server.max_total_in_flight > config.per_host_limit
