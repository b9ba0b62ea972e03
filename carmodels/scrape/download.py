"""The downloader: manifest URLs → raw Parquet shards, asynchronously, resumably, safely.

Three parts, as in img2dataset:

* **fetcher** (:class:`carmodels.scrape.fetch.Fetcher`): one pooled aiohttp session,
  robots.txt, pacing, deadlines, retries, redirects checked hop by hop, size caps,
  conditional requests when revalidating; in this process, or spread over fetch processes
  (:mod:`carmodels.scrape.processes`) for large runs.
* **validator** (:func:`carmodels.scrape.validate.inspect_image`): magic bytes, then a full
  Pillow decode (and an optional thumbnail), in a thread pool beside this process's event
  loop, or in each fetch process, never on the loop that feeds the shard writer.
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
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from carmodels.scrape.fetch import (
    RowFetcher,
    ScrapeConfig,
    Validators,
    error_row,
    is_transient,
    open_fetcher,
)
from carmodels.scrape.raw import (
    ExistingRaw,
    RawShardWriter,
    metadata_column_names,
    raw_schema,
    scan_existing,
)
from carmodels.scrape.run import run_sync
from carmodels.scrape.urls import normalise_url

if TYPE_CHECKING:
    from upath import UPath

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


@dataclass
class ScrapeResult:
    """What one :func:`download_images` run did (or one Ray download,
    :func:`carmodels.cluster.download_on_ray`: its paths are ``UPath`` on a remote root)."""

    out_dir: Path | UPath
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
    shard_paths: list[Path | UPath] = field(default_factory=list)
    #: With ``revalidate``: ``not_modified`` (304), ``unchanged`` (same bytes), ``changed``
    #: (new row written) and ``kept_after_failure`` (the request failed; old row kept).
    revalidation_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return self.outcome_counts.get("ok", 0)


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


def revalidation_verdict(row: dict[str, Any], known: Validators) -> str:
    """What a revalidating fetch's ``row`` means for the stored copy (a key of
    ``ScrapeResult.revalidation_counts``); only ``changed`` writes the row."""
    if row["outcome"] == "not_modified":
        return "not_modified"
    if row["outcome"] != "ok":
        return "kept_after_failure"  # a photo that went 404 is still a photo of that car
    if known.sha256 is not None and row.get("sha256") == known.sha256:
        return "unchanged"
    return "changed"


def prepare_manifest(manifest_df: pd.DataFrame) -> pd.DataFrame:
    """Normalised, distinct URLs with their metadata; clear errors for unusable input.

    The first row of a URL wins, so its metadata is the one stored.
    """
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


def metadata_value(value: Any) -> str | None:
    """A manifest cell as the raw shards store it: a string, or None when missing."""
    if value is None or (isinstance(value, float) and value != value):  # NaN
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


@dataclass
class _Plan:
    """What one run fetches: the manifest, the URLs still to fetch, and the shard writer."""

    manifest: pd.DataFrame
    todo: pd.DataFrame
    existing: ExistingRaw
    #: Manifest column → raw shard column, for every metadata column.
    metadata_names: dict[str, str]
    writer: RawShardWriter

    @property
    def n_skipped(self) -> int:
        return len(self.manifest) - len(self.todo)


def urls_to_fetch(
    manifest: pd.DataFrame, existing: ExistingRaw, config: ScrapeConfig
) -> pd.DataFrame:
    """The rows of a prepared ``manifest`` that a run under ``config`` fetches, given what
    the raw folder already has: URLs without a row, those whose latest outcome is transient
    (``retry_failed``), and ok ones to ask for again (``revalidate``)."""

    def wanted(url: str) -> bool:
        outcome = existing.latest_outcome.get(url)
        if outcome is None:
            return True
        if config.retry_failed and is_transient(outcome):
            return True
        return config.revalidate and url in existing.validators

    return manifest.loc[manifest["url"].map(wanted)]


def _plan(manifest_df: pd.DataFrame, out_dir: Path, config: ScrapeConfig) -> _Plan:
    """The manifest's URLs less those ``out_dir`` already has, and a writer numbering after it."""
    manifest = prepare_manifest(manifest_df)
    existing = scan_existing(out_dir, with_validators=config.revalidate)
    todo = urls_to_fetch(manifest, existing, config)
    metadata_names = metadata_column_names(manifest.columns)
    writer = RawShardWriter(
        out_dir,
        raw_schema(list(metadata_names.values()), thumbnails=config.thumbnail_size > 0),
        first_index=existing.next_shard_index,
        max_rows=config.shard_size,
        max_bytes=config.shard_max_bytes,
        max_age_s=config.flush_interval_s,
    )
    return _Plan(manifest, todo, existing, metadata_names, writer)


class _DownloadRun:
    """One run's queues, workers, shard writing and tallies.

    A producer puts the plan's URLs on ``jobs``; ``concurrency`` workers fetch them and put
    rows on ``results``; one writer task streams the rows into shards. The fetchers and the
    writer run in one task group, so if either fails the other stops.
    """

    def __init__(
        self, plan: _Plan, config: ScrapeConfig, on_progress: ProgressCallback | None
    ) -> None:
        self.plan = plan
        self.config = config
        self.on_progress = on_progress
        self.writer = plan.writer
        self.total = len(plan.todo)
        self.outcome_counts: Counter[str] = Counter()
        self.revalidation_counts: Counter[str] = Counter()
        self.failures: list[tuple[str, str, int | None]] = []
        # Small queues: they exist to keep workers busy, not to hold the manifest in memory.
        self.jobs: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=2 * config.concurrency)
        self.results: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(
            maxsize=config.concurrency
        )

    async def run(self) -> None:
        """Open the fetcher (in this process or in fetch processes) and fetch and write all."""
        # Imported here: the fetch processes run this module's fetcher, so they import it.
        from carmodels.scrape.processes import RemoteFetcher, fetch_process_count

        processes = fetch_process_count(self.config, self.total)
        if processes > 1:
            log.info("fetching in %d processes", processes)
            fetchers = RemoteFetcher.open(self.config, processes)
        else:
            fetchers = open_fetcher(self.config)
        async with fetchers as fetcher:
            try:
                # One group: if the writer fails the fetchers stop, and the other way round.
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._fetch_all(fetcher))
                    group.create_task(self._write())
            except BaseExceptionGroup as group_error:
                raise _first_error(group_error) from None

    def result(self, out_dir: Path, elapsed: float) -> ScrapeResult:
        return ScrapeResult(
            out_dir=out_dir,
            n_urls=len(self.plan.manifest),
            n_skipped_existing=self.plan.n_skipped,
            n_fetched=self.total,
            outcome_counts=dict(self.outcome_counts),
            elapsed_s=elapsed,
            images_per_s=self.outcome_counts["ok"] / elapsed if elapsed > 0 else 0.0,
            failures=pd.DataFrame(self.failures, columns=["url", "outcome", "status"]).astype(
                {"status": "Int32"}
            ),
            shard_paths=list(self.writer.written),
            revalidation_counts=dict(self.revalidation_counts),
        )

    # -- queue and workers

    async def _fetch_all(self, fetcher: RowFetcher) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._produce())
            for _ in range(self.config.concurrency):
                group.create_task(self._work(fetcher))
        await self.results.put(None)

    async def _produce(self) -> None:
        jobs, plan = self.jobs, self.plan
        metadata_names = plan.metadata_names
        validators = plan.existing.validators if self.config.revalidate else None
        columns = ["url", *metadata_names]
        for url, *values in plan.todo[columns].itertuples(index=False, name=None):
            metadata = {
                metadata_names[c]: metadata_value(v)
                for c, v in zip(metadata_names, values, strict=True)
            }
            # validators exist for ok rows only: a URL retried after a failure is a plain fetch.
            known = validators.get(url) if validators is not None else None
            await jobs.put(_Job(url, metadata, known))
        for _ in range(self.config.concurrency):
            await jobs.put(None)

    async def _work(self, fetcher: RowFetcher) -> None:
        from carmodels.scrape.processes import FetchProcessFailed  # see run()

        jobs, results = self.jobs, self.results
        while (job := await jobs.get()) is not None:
            try:
                row = await fetcher.fetch(job.url, job.known)
            except FetchProcessFailed:
                raise  # a dead fetch process stops the run: its URLs are fetched on resume
            except Exception:  # a bug must cost one URL, not the run: record and go on
                log.exception("unexpected error fetching %s", job.url)
                row = error_row(job.url)
            row.update(job.metadata)
            if job.known is not None:
                verdict = revalidation_verdict(row, job.known)
                self.revalidation_counts[verdict] += 1
                if verdict != "changed":
                    row = {"url": job.url, "outcome": _NOT_WRITTEN}  # the old row stays
            await results.put(row)

    # -- drain and finalise

    async def _write(self) -> None:
        done, total, on_progress = 0, self.total, self.on_progress
        results, writer = self.results, self.writer
        # The shard being written, in a thread, while the next one fills: fetching never
        # waits for the disk unless a whole shard's rows arrive first. At most two shards'
        # rows are in memory.
        writing: asyncio.Task[None] | None = None
        try:
            while (row := await results.get()) is not None:
                if row["outcome"] != _NOT_WRITTEN:
                    self._count(row)
                    if writer.add(row):
                        if writing is not None:
                            await writing
                        writing = asyncio.create_task(self._write_batch(writer.take_batch()))
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
            if writing is not None:
                await writing
        except BaseException as error:
            # Crash or Ctrl-C: save the rows already fetched, so a resumed run skips them
            # (unless writing is what hangs: trying again would hang the run's end).
            if not isinstance(error, ShardWriteTimeout):
                await self._save_after_error(writing)
            raise
        await self._write_batch(writer.take_batch())

    def _count(self, row: dict[str, Any]) -> None:
        self.outcome_counts[row["outcome"]] += 1
        if row["outcome"] != "ok":
            self.failures.append((row["url"], row["outcome"], row.get("status")))

    async def _save_after_error(self, writing: asyncio.Task[None] | None) -> None:
        try:
            if writing is not None:
                await writing  # the shard that was being written when the error came
            self.writer.flush()
        except Exception:
            log.exception("could not save the rows fetched since the last shard")

    async def _write_batch(self, batch: tuple[Path, list[list[Any]]] | None) -> None:
        if batch is None:
            return
        # In a thread so downloads go on meanwhile; under a deadline so a hung disk or
        # network filesystem stops the run with an error instead of hanging it forever.
        timeout_s = self.config.shard_write_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await _in_daemon_thread(self.writer.write_batch, *batch)
        except TimeoutError:
            raise ShardWriteTimeout(
                f"writing raw shard {batch[0]} took over {timeout_s:g} s; "
                "check the disk (full? hung network mount?) and run again to resume"
            ) from None


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
    plan = _plan(manifest_df, out_dir, config)
    log.info(
        "downloading %d URL(s) into %s (%d already there)", len(plan.todo), out_dir, plan.n_skipped
    )
    run = _DownloadRun(plan, config, on_progress)
    if on_progress is not None:
        on_progress(0, run.total)
    await run.run()
    return run.result(out_dir, time.perf_counter() - started)


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
