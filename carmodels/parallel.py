"""Ordered, bounded parallel maps over threads or processes, shared by dedup and the shard builder.

Both helpers are ``map(fn, chunks)`` in order, with at most ``max_in_flight`` chunks submitted
at a time (default: twice the workers), so that a lazy ``chunks`` iterator, such as image
bytes read batch by batch from Parquet, is consumed only as fast as the workers keep up and
memory stays bounded however large the input. With ``workers <= 1`` they run in the calling
thread. They live apart from the stages (and import only the standard library) so that a
worker process unpickling a task never has to import a stage it does not run.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily: the unit of work the
    maps below hand to a worker."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def map_in_threads(
    fn: Callable[[T], R], chunks: Iterable[T], workers: int, max_in_flight: int | None = None
) -> Iterator[R]:
    """``map(fn, chunks)`` in ``workers`` threads, in order, at most ``max_in_flight`` (default
    2 * workers) chunks ahead.

    For work whose numpy and decoding calls release the GIL (hashing inputs too small to pay
    for a process pool, the near-duplicate search's tables), so a second thread overlaps most
    of it at no start-up cost.
    """
    if workers <= 1:
        yield from map(fn, chunks)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from _map_bounded(pool, fn, chunks, max_in_flight or 2 * workers)


def map_in_processes(
    fn: Callable[[T], R], chunks: Iterable[T], workers: int, max_in_flight: int | None = None
) -> Iterator[R]:
    """``map(fn, chunks)`` over a process pool, in order, with at most ``max_in_flight``
    (default 2 * workers) chunks submitted at a time.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    Workers start with ``forkserver``: forking a process that runs threads (Dagster, tqdm)
    can deadlock, and forkserver is much cheaper than spawn for repeated pools.
    """
    if workers <= 1:
        yield from map(fn, chunks)
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from _map_bounded(pool, fn, chunks, max_in_flight or 2 * workers)


def _map_bounded(
    pool: Executor, fn: Callable[[T], R], chunks: Iterable[T], limit: int
) -> Iterator[R]:
    """Results of ``fn`` over ``chunks`` from ``pool``, in order, ``limit`` chunks in flight."""
    pending: deque[Future[R]] = deque()
    for chunk in chunks:
        pending.append(pool.submit(fn, chunk))
        if len(pending) >= limit:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


__all__ = ["chunked", "map_in_processes", "map_in_threads"]
