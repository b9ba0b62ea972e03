"""The fetcher: one URL in, one raw row out, politely and safely; no pandas, no Arrow.

:class:`Fetcher` holds one pooled aiohttp session; robots.txt is consulted per origin
(:mod:`carmodels.scrape.robots`), requests to a host are paced (a per-host rate or the
robots.txt ``Crawl-delay``, whichever is slower), every attempt has a deadline, transient
failures are retried with backoff, redirects are followed by hand (each hop checked against
private addresses, robots.txt and counted), ``X-Robots-Tag: noai`` is honoured before the
body is read, bodies are streamed under a size cap, and images are validated (and
thumbnailed) by :func:`carmodels.scrape.validate.inspect_image` off the event loop.

Per-host concurrency and pacing live behind a :class:`HostGate`: the fetcher's own
(:class:`LocalHostGate`) by default, or one a Ray task is given so that a host's limits hold
across every task fetching it (:mod:`carmodels.cluster.politeness`). robots.txt files read
elsewhere can be handed in too (``open_fetcher(robots_seeds=...)``, made by
:func:`read_robots`), so that a site is asked once per job rather than once per task.

It lives apart from the downloader (:mod:`carmodels.scrape.download`, manifests and shards)
so that fetch processes (:mod:`carmodels.scrape.processes`) start without importing pandas
and pyarrow: a second off a process's start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import random
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp

from carmodels.scrape.net import (
    DEFAULT_USER_AGENT,
    BodyTooLarge,
    HostPacer,
    SessionSettings,
    check_destination,
    is_private_refusal,
    normalise_origins,
    open_session,
    read_body,
)
from carmodels.scrape.robots import (
    RobotsCache,
    RobotsSeed,
    RobotsSettings,
    RobotsVerdict,
    opts_out_of_ai,
)
from carmodels.scrape.urls import host_of, origin_of, resolve_url
from carmodels.scrape.validate import (
    ACCEPTED_IMAGE_TYPES,
    MAGIC_BYTES_NEEDED,
    inspect_image,
    sniff_image_format,
)

log = logging.getLogger(__name__)

#: Name of the raw-shard column holding a thumbnail (``ScrapeConfig.thumbnail_size``).
THUMBNAIL_COLUMN = "thumbnail"
#: Outcomes worth another try later: the server or network may be fine next time.
TRANSIENT_OUTCOMES = frozenset(
    {"timeout", "connection_error", "http_408", "http_429", "robots_unavailable"}
)


def is_transient(outcome: str) -> bool:
    """True for outcomes that ``retry_failed`` fetches again (network trouble, 5xx, 408, 429)."""
    return outcome in TRANSIENT_OUTCOMES or bool(re.fullmatch(r"http_5\d\d", outcome))


@dataclass(frozen=True)
class Validators:
    """What a conditional request needs to know about the stored copy of an ``ok`` URL."""

    etag: str | None
    last_modified: str | None
    sha256: str | None


#: Statuses whose ``Location`` header is followed.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Statuses retried even though they are 4xx: the server asks us to come back later.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})


#: Where images are decoded: a thread pool or a process pool beside the event loop, or
#: ``inline`` on the loop's own thread (what each fetch process does, see
#: :mod:`carmodels.scrape.processes`: with several loops running, a decode holds up only its
#: own process, and no hand-off to a thread costs GIL round trips).
DECODE_POOLS = ("thread", "process", "inline")


@dataclass(frozen=True)
class ScrapeConfig:
    """Every knob of the downloader, with the defaults the pipeline uses."""

    concurrency: int = field(
        default=64, metadata={"help": "requests in flight at once, over all hosts"}
    )
    per_host_limit: int = field(
        default=16,
        metadata={
            "help": "requests in flight at once to one host (politeness; also the connection "
            "pool per host)"
        },
    )
    # Off by default because ``per_host_limit`` already bounds the load; set it for sites that
    # ask for a pace. A robots.txt ``Crawl-delay`` (with ``respect_robots``) spaces requests
    # too: the slower of the two wins.
    per_host_rate: float = field(
        default=0.0, metadata={"help": "requests started per second per host at most; 0 = no cap"}
    )
    max_crawl_delay_s: float = field(
        default=60.0,
        metadata={
            "help": "cap in seconds on a robots.txt Crawl-delay; a site asking for more gets "
            "this and a warning"
        },
    )
    #: Seconds to open a TCP (and TLS) connection.
    connect_timeout_s: float = 10.0
    #: Seconds without receiving a byte before a response counts as stalled.
    read_timeout_s: float = 20.0
    total_timeout_s: float = field(
        default=60.0,
        metadata={
            "help": "deadline in seconds for one attempt at one URL, redirects and body included"
        },
    )
    max_retries: int = field(
        default=3,
        metadata={
            "help": "extra attempts after a transient failure (connection error, timeout, 5xx, "
            "408, 429)"
        },
    )
    #: First backoff delay; doubles per retry, plus up to as much random jitter.
    backoff_base_s: float = 0.5
    #: Cap on the exponential backoff delay.
    backoff_max_s: float = 30.0
    #: Cap on a server's ``Retry-After`` (a server asking for an hour gets this instead).
    max_retry_after_s: float = 60.0
    #: Redirect hops followed before giving up with ``too_many_redirects``.
    max_redirects: int = 5
    #: Largest body accepted; bigger is ``too_large`` (refused from Content-Length if sent).
    max_bytes: int = 20 * 1024 * 1024
    #: Largest image (width x height) decoded; bigger is ``bomb``.
    max_pixels: int = 40_000_000
    #: Rows per raw shard at most.
    shard_size: int = 1000
    #: Image bytes per raw shard at most (bounds memory and the Parquet binary column).
    shard_max_bytes: int = 512 * 1024 * 1024
    #: Workers decoding images; 0 means one per CPU core.
    decode_workers: int = 0
    #: ``thread``, ``process`` or ``inline``: where images are decoded and hashed (see
    #: DECODE_POOLS). Fetch processes turn ``thread`` into ``inline``.
    decode_pool: str = "thread"
    # Each process has its own event loop and a share of the limits (see
    # :mod:`carmodels.scrape.processes`). "Large" is ``PROCESSES_MIN_URLS`` URLs or more: a
    # process costs about a second to start; smaller runs fetch all in this process.
    fetch_processes: int = field(
        default=0,
        metadata={
            "help": "processes fetching and decoding; 0 = one per CPU core for large runs, else 1"
        },
    )
    allow_private_networks: bool = field(
        default=False,
        metadata={
            "help": "fetch private, loopback and link-local addresses (local test servers "
            "only, such as the demo server)"
        },
    )
    #: Private ``scheme://host:port`` origins fetched all the same, and no others: the
    #: demo catalog the pipeline serves itself on 127.0.0.1.
    allowed_private_origins: tuple[str, ...] = ()
    #: Sent with every request so that site operators can see who is fetching.
    user_agent: str = DEFAULT_USER_AGENT
    respect_robots: bool = field(
        default=True,
        metadata={
            "help": "obey robots.txt (outcome robots_denied) and X-Robots-Tag: noai/noimageai "
            "(outcome opted_out); turn off only for sources you own"
        },
    )
    #: Deadline for fetching one robots.txt.
    robots_timeout_s: float = 15.0
    retry_failed: bool = field(
        default=False,
        metadata={"help": "fetch again the URLs whose latest outcome is a transient failure"},
    )
    # Conditionally (``If-None-Match`` / ``If-Modified-Since``): 304 or identical bytes keep
    # the old row, changed content adds a new row that supersedes it, and a failure keeps the
    # old image.
    revalidate: bool = field(
        default=False,
        metadata={"help": "ask again for URLs already fetched ok, with their ETag/Last-Modified"},
    )
    #: Write a shard when its oldest buffered row is this old, so a kill loses little.
    flush_interval_s: float = 30.0
    #: Deadline for writing one shard; past it the run stops with an error instead of hanging.
    shard_write_timeout_s: float = 300.0
    #: When positive, also store a ``thumbnail`` column: each ok image letterboxed to this
    #: square size, RGB uint8 (decoded with DCT scaling, so almost free for JPEGs).
    thumbnail_size: int = 0
    #: Keep the downloaded bytes in ``image_bytes``; off saves space when only thumbnails matter.
    keep_image_bytes: bool = True
    #: Bytes read from the socket at a time while streaming a body.
    chunk_bytes: int = 64 * 1024
    #: Seconds a DNS answer is reused.
    dns_cache_ttl_s: int = 300

    def __post_init__(self) -> None:
        if self.decode_pool not in DECODE_POOLS:
            raise ValueError(
                f"ScrapeConfig.decode_pool must be one of {DECODE_POOLS}, got {self.decode_pool!r}"
            )
        positive = (
            "concurrency", "per_host_limit", "connect_timeout_s", "read_timeout_s",
            "total_timeout_s", "max_bytes", "max_pixels", "shard_size", "shard_max_bytes",
            "chunk_bytes", "robots_timeout_s", "flush_interval_s", "shard_write_timeout_s",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ScrapeConfig.{name} must be positive, got {getattr(self, name)}")
        not_negative = (
            "max_retries", "backoff_base_s", "backoff_max_s", "max_retry_after_s",
            "max_redirects", "decode_workers", "dns_cache_ttl_s", "per_host_rate",
            "thumbnail_size", "max_crawl_delay_s", "fetch_processes",
        )  # fmt: skip
        for name in not_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"ScrapeConfig.{name} must be >= 0, got {getattr(self, name)}")
        # Compared as check_destination does; also accepts a list from a config file.
        object.__setattr__(
            self, "allowed_private_origins", normalise_origins(self.allowed_private_origins)
        )


@dataclass(frozen=True)
class _Attempt:
    """One try at a URL, before image validation."""

    outcome: str
    status: int | None = None
    content_type: str | None = None
    body: bytes | None = None
    retry_after_s: float | None = None
    etag: str | None = None
    last_modified: str | None = None


class _HostSlots:
    """Per-host concurrency, taken *before* an attempt's deadline starts.

    The connector's ``limit_per_host`` alone would make requests queue for a connection
    inside their deadline, so a single-host manifest would time out while merely waiting.
    """

    def __init__(self, per_host: int) -> None:
        self._per_host = per_host
        self._slots: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def hold(self, host: str) -> AsyncIterator[None]:
        entry = self._slots.get(host)
        semaphore, users = entry if entry is not None else (asyncio.Semaphore(self._per_host), 0)
        self._slots[host] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._slots[host]
            if users == 1:
                del self._slots[host]  # forget idle hosts: a long crawl meets many
            else:
                self._slots[host] = (semaphore, users - 1)


class HostGate(Protocol):
    """Where a request to a host waits for its turn: per-host concurrency and pacing.

    ``hold(host, crawl_delay_s)`` is entered before each attempt (outside its deadline) and
    left when the attempt is over; ``crawl_delay_s`` is robots.txt's ``Crawl-delay`` for the
    URL's origin (0 for none). :class:`LocalHostGate` is this process's own; a Ray download
    passes one that shares a host's limits with the other tasks fetching it
    (:mod:`carmodels.cluster.politeness`).
    """

    def hold(self, host: str, crawl_delay_s: float) -> AbstractAsyncContextManager[None]: ...


class LocalHostGate:
    """The fetcher's own gate: ``per_host_limit`` requests in flight per host, and starts
    spaced by ``per_host_rate`` or the Crawl-delay, whichever is slower
    (:class:`carmodels.scrape.net.HostPacer`)."""

    def __init__(self, per_host_limit: int, per_host_rate: float) -> None:
        self._host_slots = _HostSlots(per_host_limit)
        self._pacer = HostPacer(per_host_rate)

    @asynccontextmanager
    async def hold(self, host: str, crawl_delay_s: float) -> AsyncIterator[None]:
        await self._pacer.wait(host, crawl_delay_s)
        async with self._host_slots.hold(host):
            yield


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class RowFetcher(Protocol):
    """What the downloader's workers fetch through: this process's fetcher or the fetch
    processes' (:class:`carmodels.scrape.processes.RemoteFetcher`)."""

    async def fetch(self, url: str, known: Validators | None = None) -> dict[str, Any]: ...


class Fetcher:
    """Turns a URL into a raw row (without metadata); never raises for network trouble."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        decoder: Executor | None,
        config: ScrapeConfig,
        robots: RobotsCache | None,
        crawl_delay_scale: int = 1,
        host_gate: HostGate | None = None,
    ) -> None:
        self._session = session
        self._decoder = decoder
        self._config = config
        self._robots = robots
        # Fetch processes sharing a host each space their requests by this many Crawl-delays.
        self._crawl_delay_scale = crawl_delay_scale
        self._gate = host_gate or LocalHostGate(config.per_host_limit, config.per_host_rate)
        self._random = random.Random()

    async def fetch(self, url: str, known: Validators | None = None) -> dict[str, Any]:
        """The raw row for ``url``; with ``known`` validators the request is conditional and
        a 304 comes back as outcome ``not_modified``."""
        config = self._config
        attempt = await self._attempt(url, known)
        for retry in range(config.max_retries):
            # robots_unavailable is transient across runs but settled for this one.
            if not is_transient(attempt.outcome) or attempt.outcome == "robots_unavailable":
                break
            await asyncio.sleep(self._backoff_s(retry, attempt.retry_after_s))
            attempt = await self._attempt(url, known)

        row: dict[str, Any] = {
            "url": url,
            "status": attempt.status,
            "outcome": attempt.outcome,
            "content_type": attempt.content_type,
        }
        if attempt.body is not None:
            if self._decoder is None:
                check = inspect_image(attempt.body, config.max_pixels, config.thumbnail_size)
            else:
                loop = asyncio.get_running_loop()
                check = await loop.run_in_executor(
                    self._decoder,
                    inspect_image,
                    attempt.body,
                    config.max_pixels,
                    config.thumbnail_size,
                )
            row["outcome"] = check.outcome
            if check.outcome == "ok":
                row.update(
                    image_bytes=attempt.body if config.keep_image_bytes else None,
                    sha256=check.sha256,
                    width=check.width,
                    height=check.height,
                    etag=attempt.etag,
                    last_modified=attempt.last_modified,
                )
                if config.thumbnail_size:
                    row[THUMBNAIL_COLUMN] = check.thumbnail
        row["fetched_at"] = datetime.now(UTC)
        return row

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        config = self._config
        if retry_after_s is not None:
            return min(retry_after_s, config.max_retry_after_s)
        exponential = min(config.backoff_max_s, config.backoff_base_s * 2**retry)
        # Jitter spreads the retries of many workers hit by the same outage.
        return exponential + self._random.uniform(0, config.backoff_base_s)

    async def _robots_verdict(self, url: str) -> RobotsVerdict:
        if self._robots is None:
            return RobotsVerdict.ALLOWED
        return await self._robots.verdict(url)

    async def _attempt(self, url: str, known: Validators | None) -> _Attempt:
        config = self._config
        # robots.txt first, outside the deadline and the host slot: its fetch (once per
        # origin) must not eat into the image request's time or block the host's slots.
        verdict = await self._robots_verdict(url)
        if verdict is not RobotsVerdict.ALLOWED:
            return _Attempt(verdict.value)
        host = host_of(url)
        crawl_delay = self._robots.crawl_delay_s(url) if self._robots is not None else 0.0
        async with self._gate.hold(host, crawl_delay * self._crawl_delay_scale):
            try:
                async with asyncio.timeout(config.total_timeout_s):
                    return await self._follow_redirects(url, known)
            except TimeoutError:
                return _Attempt("timeout")
            except aiohttp.InvalidURL:
                return _Attempt("invalid_url")
            except (aiohttp.ClientError, OSError) as error:
                if is_private_refusal(error):
                    return _Attempt("private_address_refused")
                return _Attempt("connection_error")

    async def _follow_redirects(self, url: str, known: Validators | None) -> _Attempt:
        config = self._config
        status: int | None = None
        headers = {"Accept": ACCEPTED_IMAGE_TYPES}
        if known is not None and known.etag:
            headers["If-None-Match"] = known.etag
        if known is not None and known.last_modified:
            headers["If-Modified-Since"] = known.last_modified
        for hop in range(config.max_redirects + 1):
            if not config.allow_private_networks:
                check_destination(
                    host_of(url), False, origin_of(url), config.allowed_private_origins
                )
            if hop:  # the first URL was checked before the deadline started
                verdict = await self._robots_verdict(url)
                if verdict is not RobotsVerdict.ALLOWED:
                    return _Attempt(verdict.value, status)
            async with self._session.get(url, allow_redirects=False, headers=headers) as response:
                status = response.status
                content_type = response.headers.get("Content-Type")
                location = response.headers.get("Location")
                if status in REDIRECT_STATUSES and location:
                    next_url = resolve_url(url, location)
                    if next_url is None:
                        return _Attempt("invalid_url", status, content_type)
                    url = next_url
                    continue
                if status == 304 and known is not None:
                    return _Attempt("not_modified", status, content_type)
                if status != 200:
                    retry_after = None
                    if status in RETRYABLE_CLIENT_STATUSES or status >= 500:
                        retry_after = _retry_after_s(response.headers.get("Retry-After"))
                    return _Attempt(f"http_{status}", status, content_type, None, retry_after)
                # Opt-outs are read from the headers, before a byte of the body is fetched.
                if config.respect_robots and opts_out_of_ai(
                    response.headers.getall("X-Robots-Tag", []), config.user_agent
                ):
                    return _Attempt("opted_out", status, content_type)
                try:
                    body = await read_body(response, config.max_bytes, config.chunk_bytes)
                except BodyTooLarge:
                    return _Attempt("too_large", status, content_type)
                # The cheap magic-bytes check here spares the decoder pool HTML error pages.
                if sniff_image_format(body[:MAGIC_BYTES_NEEDED]) is None:
                    return _Attempt("not_image", status, content_type)
                return _Attempt(
                    "fetched",
                    status,
                    content_type,
                    body,
                    etag=response.headers.get("ETag"),
                    last_modified=response.headers.get("Last-Modified"),
                )
        return _Attempt("too_many_redirects", status)


def error_row(url: str) -> dict[str, Any]:
    """The row of a URL whose fetch failed with an unexpected error (a bug, logged)."""
    return {"url": url, "outcome": "error", "fetched_at": datetime.now(UTC)}


def session_settings(config: ScrapeConfig) -> SessionSettings:
    """The HTTP session a fetcher under ``config`` uses."""
    return SessionSettings(
        user_agent=config.user_agent,
        allow_private_networks=config.allow_private_networks,
        allowed_private_origins=config.allowed_private_origins,
        total_connections=config.concurrency,
        connections_per_host=config.per_host_limit,
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
        dns_cache_ttl_s=config.dns_cache_ttl_s,
    )


def robots_settings(config: ScrapeConfig) -> RobotsSettings:
    """How a fetcher under ``config`` reads robots.txt."""
    return RobotsSettings(
        user_agent=config.user_agent,
        allow_private_networks=config.allow_private_networks,
        allowed_private_origins=config.allowed_private_origins,
        timeout_s=config.robots_timeout_s,
        max_redirects=max(5, config.max_redirects),
        max_crawl_delay_s=config.max_crawl_delay_s,
    )


@asynccontextmanager
async def open_fetcher(
    config: ScrapeConfig,
    crawl_delay_scale: int = 1,
    *,
    host_gate: HostGate | None = None,
    robots_seeds: Mapping[str, RobotsSeed] | None = None,
) -> AsyncIterator[Fetcher]:
    """A fetcher with its own session, robots.txt cache and decode pool, closed on exit.

    ``host_gate`` replaces the fetcher's own per-host limits (:class:`LocalHostGate`);
    ``robots_seeds`` (origin → :data:`carmodels.scrape.robots.RobotsSeed`) are robots.txt
    files read elsewhere, which this fetcher uses instead of fetching them.
    """
    # Threads by default, not processes. Pillow releases the GIL while it decodes and
    # resizes, so threads use the core this event loop leaves free without pickling each
    # body to another process and the result back (docs/benchmarks/scrape.md). Either
    # way the event loop only awaits the pool, so downloads keep flowing.
    decode_workers = config.decode_workers or os.cpu_count() or 1
    with _decode_pool(config.decode_pool, decode_workers) as decoder:
        async with open_session(session_settings(config)) as session:
            robots = (
                RobotsCache(session, robots_settings(config), robots_seeds)
                if config.respect_robots
                else None
            )
            try:
                yield Fetcher(session, decoder, config, robots, crawl_delay_scale, host_gate)
            finally:
                if robots is not None:
                    await robots.close()


async def read_robots(config: ScrapeConfig, urls: Iterable[str]) -> dict[str, RobotsSeed]:
    """Origin → what its robots.txt came to, for the origins of ``urls``, each fetched once
    under ``config`` (to seed fetchers elsewhere through ``open_fetcher(robots_seeds=...)``).

    Empty when ``config.respect_robots`` is off.
    """
    if not config.respect_robots:
        return {}
    first_url = {origin_of(url): url for url in reversed(list(urls))}
    if not first_url:
        return {}
    seeds: dict[str, RobotsSeed] = {}
    # As many origins at once as the fetcher would have requests in flight.
    limit = asyncio.Semaphore(config.concurrency)
    async with open_session(session_settings(config)) as session:
        robots = RobotsCache(session, robots_settings(config))

        async def read(origin: str, url: str) -> None:
            async with limit:
                seeds[origin] = await robots.seed_of(url)

        try:
            async with asyncio.TaskGroup() as group:
                for origin, url in first_url.items():
                    group.create_task(read(origin, url))
        finally:
            await robots.close()
    return dict(sorted(seeds.items()))


def _decode_pool(kind: str, workers: int) -> Executor | contextlib.nullcontext[None]:
    if kind == "inline":
        return contextlib.nullcontext()
    if kind == "process":
        # spawn: forking a process that runs an event loop and threads is unsafe.
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(workers, thread_name_prefix="decode")
