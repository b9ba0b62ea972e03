"""Fetch processes: the downloader's fetcher spread over several processes.

One process tops out near 1.3 of this machine's 2 cores however many decode threads it has
(``bench/scrape.py``): aiohttp's request handling, Pillow's Python-level work and the shard
writer all hold the one GIL. For large manifests the downloader therefore starts
``fetch_processes`` workers, each with its own event loop (uvloop), aiohttp session and
robots.txt cache, decoding on its own thread (``decode_pool="inline"``), and importing
neither pandas nor pyarrow so that it starts in under a second. The parent keeps everything
else (the manifest queue, the shard writer, counts, progress), so shards, resumption and
crash-safety are those of the one-process downloader: :class:`RemoteFetcher` has the
in-process fetcher's ``fetch`` and hands each URL to the least busy process.

Limits are split so that their sums hold: each of K processes gets a 1/K share of
``concurrency`` and ``per_host_limit`` (K is lowered until every share is at least 1) and of
``per_host_rate``, and spaces a host's requests by K times its robots.txt ``Crawl-delay``, so
a host sees at most the configured load on average. Each process reads robots.txt once per
origin.

A worker exits as soon as its pipe to the parent closes, so a killed parent (SIGKILL
included) leaves no process behind that could still be fetching, and the parent never waits
on a dead worker: its in-flight URLs fail the run with :class:`FetchProcessFailed`, after the
rows already fetched are saved, and the next run fetches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from carmodels.scrape.fetch import ScrapeConfig, Validators, error_row, open_fetcher
from carmodels.scrape.run import run_async

log = logging.getLogger(__name__)

#: With ``fetch_processes=0``, runs fetching fewer URLs than this stay in one process: a
#: process takes about a second to start (interpreter, aiohttp, Pillow), more than a small
#: run gains from a second core.
PROCESSES_MIN_URLS = 2000
#: Seconds a worker is given to exit after its last job before it is killed.
WORKER_EXIT_TIMEOUT_S = 10.0

#: Most rows a fetch process sends back in one message.
ROWS_PER_MESSAGE = 32
#: A job is ``(job id, url, known validators)``; ``None`` tells the worker to finish.
_Job = tuple[int, str, Validators | None]


class FetchProcessFailed(RuntimeError):
    """A fetch process died; the run stops, keeping the rows fetched so far."""


def usable_cores() -> int:
    """CPU cores this process may run on (a container's or taskset's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def fetch_process_count(config: ScrapeConfig, n_urls: int) -> int:
    """How many processes fetch ``n_urls`` URLs under ``config`` (1: in this process)."""
    wanted = config.fetch_processes
    if wanted == 0:
        wanted = usable_cores() if n_urls >= PROCESSES_MIN_URLS else 1
    # Every process needs at least one request slot overall and per host.
    return max(1, min(wanted, config.concurrency, config.per_host_limit, max(n_urls, 1)))


def _share(total: int, processes: int, index: int) -> int:
    """Process ``index``'s part of ``total`` split as evenly as integers allow."""
    return total // processes + (index < total % processes)


def worker_configs(config: ScrapeConfig, processes: int) -> list[ScrapeConfig]:
    """Each process's config: its share of the request limits (the shares sum to the whole)."""
    return [
        replace(
            config,
            concurrency=_share(config.concurrency, processes, index),
            per_host_limit=_share(config.per_host_limit, processes, index),
            per_host_rate=config.per_host_rate / processes,
            decode_workers=config.decode_workers or max(1, usable_cores() // processes),
            fetch_processes=1,
            # Inline: faster than a decode thread per process (docs/benchmarks/scrape.md#history).
            decode_pool="inline" if config.decode_pool == "thread" else config.decode_pool,
        )
        for index in range(processes)
    ]


# --------------------------------------------------------------------------- worker side


def _worker_main(connection: Connection, config: ScrapeConfig, crawl_delay_scale: int) -> None:
    """Entry point of a fetch process: serve jobs from ``connection`` until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="fetch process %(process)d: %(message)s")
    run_async(_serve(connection, config, crawl_delay_scale))


async def _serve(connection: Connection, config: ScrapeConfig, crawl_delay_scale: int) -> None:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    # Rows go back through one sender thread, so a full pipe never blocks the event loop.
    outbox: queue.SimpleQueue[tuple[int, dict[str, Any]] | None] = queue.SimpleQueue()
    running: set[asyncio.Task[None]] = set()

    async with open_fetcher(config, crawl_delay_scale) as fetcher:

        async def handle(job_id: int, url: str, known: Validators | None) -> None:
            try:
                row = await fetcher.fetch(url, known)
            except Exception:  # a bug must cost one URL, not the run (as in one process)
                log.exception("unexpected error fetching %s", url)
                row = error_row(url)
            outbox.put((job_id, row))

        def start(job: _Job) -> None:
            task = loop.create_task(handle(*job))
            running.add(task)
            task.add_done_callback(running.discard)

        def receive() -> None:
            try:
                while (job := connection.recv()) is not None:
                    loop.call_soon_threadsafe(start, job)
            except (EOFError, OSError):
                # The parent is gone (killed, or crashed): nobody will read our rows and
                # nothing of ours needs saving, so stop at once rather than fetch on.
                os._exit(1)
            loop.call_soon_threadsafe(finished.set_result, None)

        def send() -> None:
            # Rows that finished meanwhile go together: one message, one wake-up of the
            # parent's event loop, however many rows.
            done = False
            try:
                while not done and (item := outbox.get()) is not None:
                    batch = [item]
                    while len(batch) < ROWS_PER_MESSAGE and not outbox.empty():
                        if (item := outbox.get()) is None:
                            done = True
                            break
                        batch.append(item)
                    connection.send(batch)
            except (BrokenPipeError, OSError):
                os._exit(1)  # the parent is gone, as above

        threading.Thread(target=receive, name="jobs-in", daemon=True).start()
        sender = threading.Thread(target=send, name="rows-out", daemon=True)
        sender.start()
        await finished
        # The parent asks to finish only once it awaits no row; finish any stragglers anyway.
        while running:
            await asyncio.gather(*running)
    outbox.put(None)
    sender.join()
    connection.send(None)


# --------------------------------------------------------------------------- parent side


class _Worker:
    def __init__(self, process: multiprocessing.process.BaseProcess, connection: Connection):
        self.process = process
        self.connection = connection
        self.pending: set[int] = set()
        self.finished = threading.Event()
        #: Set (in the event loop's thread) once its pipe broke: no job may go to it.
        self.dead = False


class RemoteFetcher:
    """``fetch(url, known)`` answered by fetch processes; open with :meth:`open`."""

    def __init__(self, workers: list[_Worker]) -> None:
        self._workers = workers
        self._futures: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._job_ids = itertools.count()
        self._loop = asyncio.get_running_loop()

    @classmethod
    @asynccontextmanager
    async def open(cls, config: ScrapeConfig, processes: int) -> AsyncIterator[RemoteFetcher]:
        """Start ``processes`` fetch processes; on exit, stop them (kill them on an error)."""
        # spawn: forking a process that runs an event loop and threads is unsafe.
        context = multiprocessing.get_context("spawn")
        workers: list[_Worker] = []
        try:
            for worker_config in worker_configs(config, processes):
                ours, theirs = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main,
                    args=(theirs, worker_config, processes),
                    name="carmodels-fetch",
                    daemon=True,
                )
                process.start()
                theirs.close()  # so that our end sees EOF when the process dies
                workers.append(_Worker(process, ours))
            fetcher = cls(workers)
            for worker in workers:
                threading.Thread(
                    target=fetcher._receive, args=(worker,), name="rows-in", daemon=True
                ).start()
            yield fetcher
            await fetcher._finish()
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
                worker.process.join(WORKER_EXIT_TIMEOUT_S)
                worker.connection.close()

    async def fetch(self, url: str, known: Validators | None = None) -> dict[str, Any]:
        """The raw row for ``url``, fetched by the least busy process."""
        worker = min(self._workers, key=lambda w: len(w.pending))
        job_id = next(self._job_ids)
        future = self._loop.create_future()
        self._futures[job_id] = future
        worker.pending.add(job_id)
        try:
            if worker.dead:
                raise FetchProcessFailed(self._death_message(worker))
            # In-flight jobs are bounded by the caller's workers, so the pipe's buffer
            # always has room for this small message: the send does not block. A worker
            # that dies after this has the job in `pending`, which `_fail` fails.
            try:
                worker.connection.send((job_id, url, known))
            except OSError:
                raise FetchProcessFailed(self._death_message(worker)) from None
            return await future
        finally:
            worker.pending.discard(job_id)
            self._futures.pop(job_id, None)

    def _receive(self, worker: _Worker) -> None:
        """Reader thread: hand each row to its awaiting ``fetch``."""
        try:
            while (batch := worker.connection.recv()) is not None:
                self._loop.call_soon_threadsafe(self._settle, batch)
            worker.finished.set()
        except (EOFError, OSError):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._fail, worker)

    def _settle(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        for job_id, row in batch:
            future = self._futures.get(job_id)
            if future is not None and not future.done():
                future.set_result(row)

    def _fail(self, worker: _Worker) -> None:
        worker.dead = True
        error = FetchProcessFailed(self._death_message(worker))
        for job_id in list(worker.pending):
            future = self._futures.get(job_id)
            if future is not None and not future.done():
                future.set_exception(error)

    @staticmethod
    def _death_message(worker: _Worker) -> str:
        worker.process.join(1.0)
        return (
            f"fetch process {worker.process.pid} exited unexpectedly "
            f"(exit code {worker.process.exitcode}); the rows fetched so far are saved, "
            "run again to fetch the rest"
        )

    async def _finish(self) -> None:
        """Tell every process to finish and wait (bounded) for them to say they have."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.connection.send(None)
        for worker in self._workers:
            await asyncio.to_thread(worker.finished.wait, WORKER_EXIT_TIMEOUT_S)
            await asyncio.to_thread(worker.process.join, WORKER_EXIT_TIMEOUT_S)
