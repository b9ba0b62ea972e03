"""Run a coroutine to completion from synchronous code, inside or outside an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (Linux, macOS), else asyncio's default.

    The downloader's event-loop thread is its bottleneck: uvloop's C loop and transports cut
    the per-request overhead by about a tenth end to end (docs/BENCHMARKS.md).
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coroutine)`` on the fastest event loop available."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coroutine)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """:func:`run_async`, or the same in a helper thread when a loop already runs here.

    Notebooks and some orchestrators call library code from inside a running event loop,
    where ``asyncio.run`` refuses to start a second one.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_async(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run_async, coroutine).result()
