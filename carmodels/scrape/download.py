"""The downloader: manifest URLs → raw Parquet shards, asynchronously, resumably, safely.

Three parts, as in img2dataset:

* **fetcher** (:class:`_Fetcher`): one pooled aiohttp session; robots.txt consulted per origin
  (:mod:`carmodels.scrape.robots`), a per-host request rate (or the robots.txt ``Crawl-delay``,
  whichever is slower), per-attempt deadline, retries
  with backoff for transient failures, redirects followed by hand (each hop checked against
  private addresses, robots.txt and counted), ``X-Robots-Tag: noai`` honoured before the
  body is read, bodies streamed under a size cap, conditional requests when revalidating.
* **validator** (:func:`carmodels.scrape.validate.inspect_image`): magic bytes, then a full
  Pillow decode (and an optional thumbnail) in a thread pool, away from the event loop.
* **shard writer** (:class:`carmodels.scrape.raw.RawShardWriter`): rows stream into atomic
  ``raw-NNNNN.parquet`` shards of bounded rows, bytes and age, each write under a deadline.
  The shards are the fetch log: one row per URL and outcome.

A fixed pool of ``concurrency`` worker tasks pulls URLs from a bounded queue, so the number
of requests in flight, of tasks and of rows held in memory are all bounded, however long the
manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd

from carmodels.scrape.net import (
    DEFAULT_USER_AGENT,
    BodyTooLarge,
    HostPacer,
    SessionSettings,
    check_destination,
    is_private_refusal,
    open_session,
    read_body,
)
from carmodels.scrape.raw import (
    THUMBNAIL_FIELD,
    RawShardWriter,
    Validators,
    is_transient,
    metadata_column_names,
    raw_schema,
    scan_existing,
)
from carmodels.scrape.robots import RobotsCache, RobotsSettings, RobotsVerdict, opts_out_of_ai
from carmodels.scrape.run import run_sync
from carmodels.scrape.urls import host_of, normalise_url, resolve_url
from carmodels.scrape.validate import (
    ACCEPTED_IMAGE_TYPES,
    MAGIC_BYTES_NEEDED,
    inspect_image,
    sniff_image_format,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

#: Statuses whose ``Location`` header is followed.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Statuses retried even though they are 4xx: the server asks us to come back later.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})


#: Pools that can decode off the event loop.
DECODE_POOLS = ("thread", "process")


@dataclass(frozen=True)
class ScrapeConfig:
    """Every knob of the downloader, with the defaults the pipeline uses."""

    #: Requests in flight at once, over all hosts.
    concurrency: int = 64
    #: Requests in flight at once to one host (politeness; also the connection pool per host).
    per_host_limit: int = 16
    #: Requests started per second per host at most; 0 for no limit. Off by default because
    #: ``per_host_limit`` already bounds the load; set it for sites that ask for a pace.
    #: A robots.txt ``Crawl-delay`` (with ``respect_robots``) spaces requests too: the slower
    #: of the two wins.
    per_host_rate: float = 0.0
    #: Cap on a robots.txt ``Crawl-delay``; a site asking for more gets this and a warning.
    max_crawl_delay_s: float = 60.0
    #: Seconds to open a TCP (and TLS) connection.
    connect_timeout_s: float = 10.0
    #: Seconds without receiving a byte before a response counts as stalled.
    read_timeout_s: float = 20.0
    #: Deadline for one attempt at one URL, redirects and body included.
    total_timeout_s: float = 60.0
    #: Extra attempts after a transient failure (connection error, timeout, 5xx, 408, 429).
    max_retries: int = 3
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
    #: ``thread`` or ``process``: where images are decoded and hashed (see DECODE_POOLS).
    decode_pool: str = "thread"
    #: Fetch private, loopback and link-local addresses (local test servers only).
    allow_private_networks: bool = False
    #: Sent with every request so that site operators can see who is fetching.
    user_agent: str = DEFAULT_USER_AGENT
    #: Obey robots.txt (outcome ``robots_denied``) and ``X-Robots-Tag: noai``/``noimageai``
    #: (outcome ``opted_out``). Turn off only for sources you own.
    respect_robots: bool = True
    #: Deadline for fetching one robots.txt.
    robots_timeout_s: float = 15.0
    #: Fetch again the URLs whose latest outcome in ``out_dir`` is transient.
    retry_failed: bool = False
    #: Ask again for URLs already fetched ``ok``, conditionally (``If-None-Match`` /
    #: ``If-Modified-Since``): 304 or identical bytes keep the old row, changed content adds
    #: a new row that supersedes it, and a failure keeps the old image.
    revalidate: bool = False
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
            "thumbnail_size", "max_crawl_delay_s",
        )  # fmt: skip
        for name in not_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"ScrapeConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ScrapeResult:
    """What one :func:`download_images` run did."""

    out_dir: Path
    #: Distinct valid URLs in the manifest.
    n_urls: int
    #: URLs not fetched because ``out_dir`` already had a row for them.
    n_skipped_existing: int
    #: URLs fetched (attempted) by this run.
    n_fetched: int
    #: Outcome → count, for this run's rows.
    outcome_counts: dict[str, int]
    elapsed_s: float
    #: ``ok`` images per second of wall time.
    images_per_s: float
    #: ``url, outcome, status`` of this run's rows that are not ``ok``.
    failures: pd.DataFrame
    #: Shards written by this run, in order.
    shard_paths: list[Path] = field(default_factory=list)
    #: With ``revalidate``: ``not_modified`` (304), ``unchanged`` (same bytes), ``changed``
    #: (new row written) and ``kept_after_failure`` (the request failed; old row kept).
    revalidation_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return self.outcome_counts.get("ok", 0)


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


class _Fetcher:
    """Turns a URL into a raw row (without metadata); never raises for network trouble."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        decoder: Executor,
        config: ScrapeConfig,
        robots: RobotsCache | None,
    ) -> None:
        self._session = session
        self._decoder = decoder
        self._config = config
        self._robots = robots
        self._host_slots = _HostSlots(config.per_host_limit)
        self._pacer = HostPacer(config.per_host_rate)
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
                    row[THUMBNAIL_FIELD.name] = check.thumbnail
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
        await self._pacer.wait(host, crawl_delay)
        async with self._host_slots.hold(host):
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
                check_destination(host_of(url), allow_private_networks=False)
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


class ShardWriteTimeout(TimeoutError):
    """Writing a raw shard took longer than ``ScrapeConfig.shard_write_timeout_s``."""


def _in_daemon_thread(function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """Run ``function(*args)`` in a new daemon thread; await the returned future for its result.

    Unlike ``asyncio.to_thread``, a call that never returns (a hung network filesystem) is not
    waited for when the event loop or the interpreter shuts down, so a deadline around the
    await really ends the run.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting side gave up (deadline passed)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="shard-writer", daemon=True).start()
    return future


#: Outcome of a revalidation that writes nothing (the stored row stays the latest).
_NOT_WRITTEN = "__not_written__"


@dataclass(frozen=True)
class _Job:
    url: str
    metadata: dict[str, str | None]
    #: The stored ok row's validators when this fetch revalidates it.
    known: Validators | None = None


def _decode_pool(kind: str, workers: int) -> Executor:
    if kind == "process":
        # spawn: forking a process that runs an event loop and threads is unsafe.
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(workers, thread_name_prefix="decode")


def _revalidation_verdict(row: dict[str, Any], known: Validators) -> str:
    if row["outcome"] == "not_modified":
        return "not_modified"
    if row["outcome"] != "ok":
        return "kept_after_failure"  # a photo that went 404 is still a photo of that car
    if known.sha256 is not None and row.get("sha256") == known.sha256:
        return "unchanged"
    return "changed"


def _prepare_manifest(manifest_df: pd.DataFrame) -> pd.DataFrame:
    """Normalised, distinct URLs with their metadata; clear errors for unusable input."""
    if "url" not in manifest_df.columns:
        raise KeyError(
            f"download_images needs a manifest with a 'url' column (see read_manifest); "
            f"columns found: {list(manifest_df.columns)}"
        )
    urls = manifest_df["url"].map(normalise_url)
    invalid = int(urls.isna().sum())
    if invalid:
        log.warning("skipping %d manifest row(s) without a usable http(s) URL", invalid)
    frame = manifest_df.assign(url=urls).loc[urls.notna()]
    return frame.drop_duplicates(subset="url", keep="first").reset_index(drop=True)


def _first_error(error: BaseException) -> BaseException:
    """The first real error inside (possibly nested) task-group exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _metadata_value(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # NaN
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


async def adownload_images(
    manifest_df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    config: ScrapeConfig | None = None,
    on_progress: ProgressCallback | None = None,
) -> ScrapeResult:
    """Async form of :func:`download_images`."""
    config = config or ScrapeConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    manifest = _prepare_manifest(manifest_df)
    existing = scan_existing(out_dir, with_validators=config.revalidate)

    def wanted(url: str) -> bool:
        outcome = existing.latest_outcome.get(url)
        if outcome is None:
            return True
        if config.retry_failed and is_transient(outcome):
            return True
        return config.revalidate and url in existing.validators

    todo = manifest.loc[manifest["url"].map(wanted)]
    n_skipped = len(manifest) - len(todo)
    metadata_names = metadata_column_names(manifest.columns)
    writer = RawShardWriter(
        out_dir,
        raw_schema(list(metadata_names.values()), thumbnails=config.thumbnail_size > 0),
        first_index=existing.next_shard_index,
        max_rows=config.shard_size,
        max_bytes=config.shard_max_bytes,
        max_age_s=config.flush_interval_s,
    )
    log.info("downloading %d URL(s) into %s (%d already there)", len(todo), out_dir, n_skipped)

    outcome_counts: Counter[str] = Counter()
    revalidation_counts: Counter[str] = Counter()
    failures: list[tuple[str, str, int | None]] = []
    total = len(todo)
    if on_progress is not None:
        on_progress(0, total)

    # Small queues: they exist to keep workers busy, not to hold the manifest in memory.
    jobs: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * config.concurrency)
    results: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=config.concurrency)

    async def produce() -> None:
        columns = ["url", *metadata_names]
        for url, *values in todo[columns].itertuples(index=False, name=None):
            metadata = {
                metadata_names[c]: _metadata_value(v)
                for c, v in zip(metadata_names, values, strict=True)
            }
            # validators exist for ok rows only: a URL retried after a failure is a plain fetch.
            known = existing.validators.get(url) if config.revalidate else None
            await jobs.put(_Job(url, metadata, known))
        for _ in range(config.concurrency):
            await jobs.put(None)

    async def work(fetcher: _Fetcher) -> None:
        while (job := await jobs.get()) is not None:
            try:
                row = await fetcher.fetch(job.url, job.known)
            except Exception:  # a bug must cost one URL, not the run: record and go on
                log.exception("unexpected error fetching %s", job.url)
                row = {"url": job.url, "outcome": "error", "fetched_at": datetime.now(UTC)}
            row.update(job.metadata)
            if job.known is not None:
                verdict = _revalidation_verdict(row, job.known)
                revalidation_counts[verdict] += 1
                if verdict != "changed":
                    row = {"url": job.url, "outcome": _NOT_WRITTEN}  # the old row stays
            await results.put(row)

    async def fetch_all(fetcher: _Fetcher) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(config.concurrency):
                group.create_task(work(fetcher))
        await results.put(None)

    async def write() -> None:
        done = 0
        try:
            while (row := await results.get()) is not None:
                if row["outcome"] != _NOT_WRITTEN:
                    outcome_counts[row["outcome"]] += 1
                    if row["outcome"] != "ok":
                        failures.append((row["url"], row["outcome"], row.get("status")))
                    if writer.add(row):
                        await write_batch(writer.take_batch())
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
        except BaseException as error:
            # Crash or Ctrl-C: save the rows already fetched, so a resumed run skips them
            # (unless writing is what hangs: trying again would hang the run's end).
            if not isinstance(error, ShardWriteTimeout):
                try:
                    writer.flush()
                except Exception:
                    log.exception("could not save the rows fetched since the last shard")
            raise
        await write_batch(writer.take_batch())

    async def write_batch(batch: tuple[Path, Any] | None) -> None:
        if batch is None:
            return
        # In a thread so downloads go on meanwhile; under a deadline so a hung disk or
        # network filesystem stops the run with an error instead of hanging it forever.
        try:
            async with asyncio.timeout(config.shard_write_timeout_s):
                await _in_daemon_thread(writer.write_batch, *batch)
        except TimeoutError:
            raise ShardWriteTimeout(
                f"writing raw shard {batch[0]} took over {config.shard_write_timeout_s:g} s; "
                "check the disk (full? hung network mount?) and run again to resume"
            ) from None

    decode_workers = config.decode_workers or os.cpu_count() or 1
    settings = SessionSettings(
        user_agent=config.user_agent,
        allow_private_networks=config.allow_private_networks,
        total_connections=config.concurrency,
        connections_per_host=config.per_host_limit,
        connect_timeout_s=config.connect_timeout_s,
        read_timeout_s=config.read_timeout_s,
        dns_cache_ttl_s=config.dns_cache_ttl_s,
    )
    robots_settings = RobotsSettings(
        user_agent=config.user_agent,
        allow_private_networks=config.allow_private_networks,
        timeout_s=config.robots_timeout_s,
        max_redirects=max(5, config.max_redirects),
        max_crawl_delay_s=config.max_crawl_delay_s,
    )
    # Threads by default, not processes. Pillow releases the GIL while it decodes and
    # resizes, so threads use every core without pickling each body to another process and
    # the result back. `bench/scrape.py --pools thread,process` measured end to end on the
    # 2-core machine: 119 img/s with threads against 80 with processes (docs/BENCHMARKS.md).
    # Either way the event loop only awaits the pool, so downloads keep flowing.
    with _decode_pool(config.decode_pool, decode_workers) as decoder:
        async with open_session(settings) as session:
            robots = RobotsCache(session, robots_settings) if config.respect_robots else None
            fetcher = _Fetcher(session, decoder, config, robots)
            try:
                # One group: if the writer fails the fetchers stop, and the other way round.
                async with asyncio.TaskGroup() as group:
                    group.create_task(fetch_all(fetcher))
                    group.create_task(write())
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None
            finally:
                if robots is not None:
                    await robots.close()

    elapsed = time.perf_counter() - started
    return ScrapeResult(
        out_dir=out_dir,
        n_urls=len(manifest),
        n_skipped_existing=n_skipped,
        n_fetched=total,
        outcome_counts=dict(outcome_counts),
        elapsed_s=elapsed,
        images_per_s=outcome_counts["ok"] / elapsed if elapsed > 0 else 0.0,
        failures=pd.DataFrame(failures, columns=["url", "outcome", "status"]).astype(
            {"status": "Int32"}
        ),
        shard_paths=list(writer.written),
        revalidation_counts=dict(revalidation_counts),
    )


def download_images(
    manifest_df: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    config: ScrapeConfig | None = None,
    on_progress: ProgressCallback | None = None,
) -> ScrapeResult:
    """Download every manifest URL into raw Parquet shards in ``out_dir``.

    Resumable: URLs that already have a row in ``out_dir`` are skipped (with
    ``config.retry_failed``, those whose latest outcome is transient are fetched again and
    the new row supersedes the old; with ``config.revalidate``, ok ones are asked for again
    conditionally), and new shards are numbered after the existing ones.
    Each URL ends with one ``outcome``: ``ok``, ``http_<code>``, ``timeout``,
    ``connection_error``, ``too_large``, ``not_image``, ``corrupt``, ``bomb``,
    ``too_many_redirects``, ``private_address_refused``, ``robots_denied`` (robots.txt
    disallows it), ``robots_unavailable`` (robots.txt answered 5xx or not at all),
    ``opted_out`` (``X-Robots-Tag: noai``/``noimageai``) or ``invalid_url`` (a redirect to
    something that is not an http(s) URL). ``on_progress(done, total)`` is called as URLs
    finish, ``total`` being the URLs this run fetches.
    """
    return run_sync(adownload_images(manifest_df, out_dir, config, on_progress))
