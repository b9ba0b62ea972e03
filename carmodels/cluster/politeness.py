"""Per-host limits that hold across every task of a Ray download.

A host whose URLs all sit in one task is paced inside that task by the fetcher's own gate
(:class:`carmodels.scrape.fetch.LocalHostGate`), exactly as on one machine: no coordination
and no cost. A host spread over several tasks (:attr:`carmodels.cluster.plan.FanoutPlan.
shared_hosts`) is coordinated by one :class:`HostCoordinator`, which the driver runs as a
named Ray actor, and each task reaches it through a :class:`SharedHostGate`:

* **Concurrency** (``per_host_limit``) is leased, not asked for per request. Each task holds
  a number of the host's slots and renews its lease every ``lease_s`` seconds, reporting its
  demand (requests waiting or in flight). The coordinator splits the limit max-min fairly
  among the tasks that want some, and grants only slots no one holds, so the slots held add
  up to at most the limit at every moment. A task told to shrink stops using the extra slots
  at once and hands them back at its next renewal, once its requests on them have finished;
  only then can another task get them. A request therefore costs no round trip: it waits on
  its own task's slots.
* **Pace** (``per_host_rate`` and robots.txt's ``Crawl-delay``, the slower winning, as in
  :class:`carmodels.scrape.net.HostPacer`) is one schedule of start times per host, kept by
  the coordinator. A task reserves start times for the requests it has waiting (and holding a
  slot), all in one call, and each request sleeps until its own. That is at most one round
  trip per request, and only for paced hosts, whose requests are at least an interval apart
  anyway. Start times are wall-clock times, so the nodes' clocks must agree (NTP) to well
  under the interval.
* **Lost tasks.** A task that stops renewing (its node died) loses its slots after
  ``lease_ttl_s``; a task whose renewals fail stops starting requests before the coordinator
  would give its slots away (it counts its lease from when it asked, the coordinator from
  when it heard), and its requests fail with :class:`CoordinatorLost` when the coordinator
  cannot be reached, so that Ray retries the task rather than record failures.

The coordinator is a plain class here (tested without Ray); the driver makes it an actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from carmodels.scrape.fetch import LocalHostGate, ScrapeConfig

log = logging.getLogger(__name__)

#: A task counts its lease as valid for this share of ``lease_ttl_s`` after asking for it, so
#: it stops using slots before the coordinator (which counts from when it heard) frees them.
HOLDER_TTL_SHARE = 0.8


def fair_shares(limit: int, demands: Mapping[str, int]) -> dict[str, int]:
    """``limit`` slots split max-min fairly by ``demands`` (holder → slots wanted).

    No holder gets more than it wants; what one does not want goes to the others; whole slots
    left over go to the holders first in name order, so the split is deterministic.
    """
    shares = dict.fromkeys(demands, 0)
    wanting = sorted(name for name, demand in demands.items() if demand > 0)
    left = limit
    while left > 0 and wanting:
        each = left // len(wanting)
        if each == 0:
            for name in wanting[:left]:
                shares[name] += 1
            break
        still = []
        for name in wanting:
            give = min(each, demands[name] - shares[name])
            shares[name] += give
            left -= give
            if shares[name] < demands[name]:
                still.append(name)
        wanting = still
    return shares


@dataclass
class _Holder:
    held: int
    demand: int
    seen: float


@dataclass
class _HostState:
    holders: dict[str, _Holder] = field(default_factory=dict)
    #: Wall-clock time from which the next request to the host may start.
    next_start: float = 0.0
    #: Most slots held at once so far (the limit bounds it; tests check that).
    peak_held: int = 0


class HostCoordinator:
    """Leases of per-host slots and the schedule of request starts, for the hosts several
    tasks share. Every method is one short, non-blocking step (a Ray actor runs them one at
    a time)."""

    def __init__(
        self,
        per_host_limit: int,
        lease_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._limit = per_host_limit
        self._ttl = lease_ttl_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._hosts: dict[str, _HostState] = {}
        self._calls = 0

    def renew(self, host: str, holder: str, keep: int, demand: int) -> tuple[int, int]:
        """``holder`` keeps ``keep`` of its slots (handing back the rest) and wants ``demand``;
        returns ``(slots it now holds, slots it may use)``.

        The second number is its fair share: it may be below the first, and then the holder
        uses only that many and hands back the rest at its next renewal.
        """
        self._calls += 1
        now = self._clock()
        state = self._hosts.setdefault(host, _HostState())
        self._expire(state, now)
        current = state.holders.get(holder)
        # Unknown (new, or expired and its slots given away): it holds nothing yet.
        held = 0 if current is None else max(0, min(keep, current.held))
        state.holders[holder] = entry = _Holder(held, demand, now)
        share = fair_shares(self._limit, {h: x.demand for h, x in state.holders.items()})[holder]
        free = self._limit - sum(x.held for x in state.holders.values())
        entry.held += max(0, min(share - held, free))
        state.peak_held = max(state.peak_held, sum(x.held for x in state.holders.values()))
        if entry.held == 0 and demand == 0:
            del state.holders[holder]  # an idle holder: forget it
        return entry.held, share

    def reserve_starts(self, host: str, count: int, interval_s: float) -> list[float]:
        """The next ``count`` start times (``time.time()`` values) of ``host``'s requests,
        ``interval_s`` apart and after every start reserved before."""
        self._calls += 1
        state = self._hosts.setdefault(host, _HostState())
        now = self._wall_clock()
        first = max(now, state.next_start)
        state.next_start = first + count * interval_s
        return [first + i * interval_s for i in range(count)]

    def leave(self, host: str, holder: str) -> None:
        """``holder`` is done with ``host``: its slots (all idle by now) are free."""
        self._calls += 1
        state = self._hosts.get(host)
        if state is not None:
            state.holders.pop(holder, None)

    def stats(self) -> dict[str, Any]:
        """Calls served, and per host the most slots held at once and the current holders."""
        return {
            "calls": self._calls,
            "hosts": {
                host: {
                    "peak_held": state.peak_held,
                    "holders": {h: x.held for h, x in state.holders.items()},
                }
                for host, state in self._hosts.items()
            },
        }

    def _expire(self, state: _HostState, now: float) -> None:
        for name in [n for n, x in state.holders.items() if now - x.seen > self._ttl]:
            log.warning("lease of %s expired (task lost?): its slots are free again", name)
            del state.holders[name]


class CoordinatorLost(RuntimeError):
    """The host coordinator could not be reached: the task fails, and Ray runs it again."""


class CoordinatorCalls(Protocol):
    """How a task reaches the coordinator: its methods, awaited."""

    def renew(
        self, host: str, holder: str, keep: int, demand: int
    ) -> Awaitable[tuple[int, int]]: ...

    def reserve_starts(
        self, host: str, count: int, interval_s: float
    ) -> Awaitable[list[float]]: ...

    def leave(self, host: str, holder: str) -> Awaitable[None]: ...


class LocalCoordinatorCalls:
    """A :class:`HostCoordinator` in this process (tests, and tasks sharing one event loop)."""

    def __init__(self, coordinator: HostCoordinator) -> None:
        self.coordinator = coordinator

    async def renew(self, host: str, holder: str, keep: int, demand: int) -> tuple[int, int]:
        return self.coordinator.renew(host, holder, keep, demand)

    async def reserve_starts(self, host: str, count: int, interval_s: float) -> list[float]:
        return self.coordinator.reserve_starts(host, count, interval_s)

    async def leave(self, host: str, holder: str) -> None:
        self.coordinator.leave(host, holder)


class RayCoordinatorCalls:
    """The coordinator as a Ray actor: each call is an actor method call, awaited."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def renew(self, host: str, holder: str, keep: int, demand: int) -> tuple[int, int]:
        return await self.actor.renew.remote(host, holder, keep, demand)

    async def reserve_starts(self, host: str, count: int, interval_s: float) -> list[float]:
        return await self.actor.reserve_starts.remote(host, count, interval_s)

    async def leave(self, host: str, holder: str) -> None:
        await self.actor.leave.remote(host, holder)


class _Lease:
    """One task's share of one shared host, as the task sees it."""

    def __init__(self) -> None:
        self.held = 0
        self.share = 0
        self.in_flight = 0
        self.waiting = 0
        #: ``time.monotonic()`` after which the lease may have been given away.
        self.valid_until = 0.0
        self.error: BaseException | None = None
        self.changed = asyncio.Condition()
        self.renewer: asyncio.Task[None] | None = None
        #: Requests waiting for a start time, with the interval each asks for.
        self.start_waiters: list[tuple[asyncio.Future[float], float]] = []
        self.reserver: asyncio.Task[None] | None = None

    def usable(self) -> int:
        if time.monotonic() >= self.valid_until:
            return 0
        return min(self.held, self.share)


class SharedHostGate:
    """A task's :class:`carmodels.scrape.fetch.HostGate`: the hosts in ``shared`` through the
    coordinator, every other host through the fetcher's own :class:`LocalHostGate` (those are
    this task's alone). Call :meth:`close` when the task is done fetching."""

    def __init__(
        self,
        config: ScrapeConfig,
        shared: Collection[str],
        calls: CoordinatorCalls,
        holder: str,
        lease_s: float,
        lease_ttl_s: float,
    ) -> None:
        self._shared = frozenset(shared)
        self._local = LocalHostGate(config.per_host_limit, config.per_host_rate)
        self._calls = calls
        self._holder = holder
        self._lease_s = lease_s
        self._holder_ttl = lease_ttl_s * HOLDER_TTL_SHARE
        self._rate_interval = 1.0 / config.per_host_rate if config.per_host_rate > 0 else 0.0
        self._leases: dict[str, _Lease] = {}
        self._closed = False

    @asynccontextmanager
    async def hold(self, host: str, crawl_delay_s: float) -> AsyncIterator[None]:
        if host not in self._shared:
            async with self._local.hold(host, crawl_delay_s):
                yield
            return
        lease = self._lease(host)
        await self._take_slot(lease)
        try:
            # After the slot, unlike HostPacer: a start time is only reserved for a request
            # that can start, so reserved times are used promptly and none goes stale.
            interval = max(self._rate_interval, crawl_delay_s)
            if interval > 0:
                start = await self._start_time(host, lease, interval)
                delay = start - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield
        finally:
            async with lease.changed:
                lease.in_flight -= 1
                lease.changed.notify_all()

    async def close(self) -> None:
        """Stop renewing and hand every slot back (the task's requests are all over)."""
        self._closed = True
        leases, self._leases = self._leases, {}
        for lease in leases.values():
            for task in (lease.renewer, lease.reserver):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        for host in leases:
            try:
                await self._calls.leave(host, self._holder)
            except Exception:  # the slots expire after lease_ttl_s all the same
                log.warning("could not hand back %s's slots of %s", self._holder, host)

    # -- concurrency

    def _lease(self, host: str) -> _Lease:
        if self._closed:
            raise RuntimeError("SharedHostGate is closed")
        lease = self._leases.get(host)
        if lease is None:
            lease = self._leases[host] = _Lease()
        if lease.renewer is None:
            lease.renewer = asyncio.create_task(self._renew(host, lease))
        return lease

    async def _take_slot(self, lease: _Lease) -> None:
        async with lease.changed:
            lease.waiting += 1
            try:
                # Woken by a request ending or by a renewal; no call per request.
                while lease.error is None and lease.in_flight >= lease.usable():
                    await lease.changed.wait()
                if lease.error is not None:
                    raise CoordinatorLost(
                        f"the host coordinator cannot be reached: {lease.error}"
                    ) from lease.error
                lease.in_flight += 1
            finally:
                lease.waiting -= 1

    async def _renew(self, host: str, lease: _Lease) -> None:
        """Renew the lease at once, then every ``lease_s`` while the host is in use here."""
        while True:
            asked = time.monotonic()
            # Keep what is in use and what the share allows; in between the answer and this
            # snapshot requests use at most min(held, share), which this never goes below.
            keep = min(lease.held, max(lease.share, lease.in_flight))
            demand = lease.waiting + lease.in_flight
            try:
                held, share = await self._calls.renew(host, self._holder, keep, demand)
            except Exception as error:
                async with lease.changed:
                    lease.error = error
                    lease.changed.notify_all()
                lease.renewer = None
                return
            async with lease.changed:
                lease.held, lease.share = held, share
                lease.valid_until = asked + self._holder_ttl
                lease.changed.notify_all()
            if held == 0 and demand == 0 and lease.waiting == 0:
                lease.renewer = None  # idle: the next request starts renewing again
                return
            await asyncio.sleep(self._lease_s)

    # -- pace

    async def _start_time(self, host: str, lease: _Lease, interval_s: float) -> float:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        lease.start_waiters.append((future, interval_s))
        if lease.reserver is None:
            lease.reserver = asyncio.create_task(self._reserve(host, lease))
        return await future

    async def _reserve(self, host: str, lease: _Lease) -> None:
        """Reserve start times for every request waiting for one, one call per batch."""
        try:
            while lease.start_waiters:
                batch, lease.start_waiters = lease.start_waiters, []
                interval = max(wanted for _, wanted in batch)
                try:
                    starts = await self._calls.reserve_starts(host, len(batch), interval)
                except Exception as error:
                    lost = CoordinatorLost(f"the host coordinator cannot be reached: {error}")
                    for future, _ in batch:
                        if not future.done():
                            future.set_exception(lost)
                    continue
                for (future, _), start in zip(batch, starts, strict=True):
                    if not future.done():  # a cancelled request leaves its start unused
                        future.set_result(start)
        finally:
            lease.reserver = None
