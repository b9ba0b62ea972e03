"""Which URLs each Ray task fetches: pure planning, no Ray.

Politeness is cheapest inside one task (the fetcher's own per-host limits, no coordination),
so URLs are bucketed by host and a host's URLs fill as few tasks as possible:

* a host with at least ``urls_per_task`` URLs gets whole tasks of its own, and its remainder
  joins the small hosts;
* small hosts (and remainders) are packed whole into tasks, largest first, each into the task
  with the least room that still fits it (best-fit decreasing), so a small host never spans
  two tasks.

Only the hosts that span several tasks (``FanoutPlan.shared_hosts``) need the coordinator
(:mod:`carmodels.cluster.politeness`).

Tasks are numbered in the order of their first URL in the manifest and each writes one raw
shard, ``raw-NNNNN.parquet`` with ``NNNNN = first_shard_index + task number``, so the output
folder looks like the local downloader's. A task's key names its shard and hashes its URLs:
a retried task finds its own done-marker, and never one left by another plan.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from carmodels.scrape.urls import host_of


@dataclass(frozen=True)
class PlannedTask:
    """One task: the positions (in the planned URL list) of its URLs, in manifest order."""

    shard_index: int
    key: str
    rows: tuple[int, ...]
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class FanoutPlan:
    """The tasks of one download, and how many tasks each host's URLs are spread over."""

    tasks: tuple[PlannedTask, ...]
    tasks_per_host: dict[str, int]

    @property
    def shared_hosts(self) -> frozenset[str]:
        """Hosts fetched by more than one task: their limits need the coordinator."""
        return frozenset(host for host, n in self.tasks_per_host.items() if n > 1)


def task_key(shard_index: int, urls: Sequence[str]) -> str:
    """``NNNNN-<hash of the URLs>``: stable across runs of the same plan, distinct otherwise."""
    digest = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    return f"{shard_index:05d}-{digest}"


def plan_tasks(urls: Sequence[str], urls_per_task: int, first_shard_index: int = 0) -> FanoutPlan:
    """Split ``urls`` (distinct, normalised) into tasks of at most ``urls_per_task`` URLs,
    bucketed by host (see the module docstring). Deterministic: the same URLs in the same
    order always give the same plan."""
    if urls_per_task < 1:
        raise ValueError(f"urls_per_task must be at least 1, got {urls_per_task}")
    by_host: dict[str, list[int]] = {}
    for position, url in enumerate(urls):
        by_host.setdefault(host_of(url) or "", []).append(position)

    groups: list[list[int]] = []  # each becomes one task
    pieces: list[list[int]] = []  # small hosts and remainders, packed together below
    for positions in by_host.values():
        whole = len(positions) - len(positions) % urls_per_task
        groups += [positions[i : i + urls_per_task] for i in range(0, whole, urls_per_task)]
        if whole < len(positions):
            pieces.append(positions[whole:])
    groups += _best_fit_decreasing(pieces, urls_per_task)

    ordered = sorted((sorted(group) for group in groups), key=lambda rows: rows[0])
    tasks = []
    spread: Counter[str] = Counter()
    for number, rows in enumerate(ordered):
        index = first_shard_index + number
        hosts = tuple(sorted({host_of(urls[r]) or "" for r in rows}))
        spread.update(hosts)
        key = task_key(index, [urls[r] for r in rows])
        tasks.append(PlannedTask(index, key, tuple(rows), hosts))
    return FanoutPlan(tuple(tasks), dict(spread))


def _best_fit_decreasing(pieces: list[list[int]], capacity: int) -> list[list[int]]:
    """Pack whole pieces (each smaller than ``capacity``) into as few bins as is cheap to find."""
    bins: list[list[int]] = []
    # (room left, bin number), sorted: the first entry at or above a size is the best fit.
    room: list[tuple[int, int]] = []
    for piece in sorted(pieces, key=lambda p: (-len(p), p[0])):
        at = bisect.bisect_left(room, (len(piece), -1))
        if at == len(room):
            bins.append(list(piece))
            left, number = capacity - len(piece), len(bins) - 1
        else:
            left, number = room.pop(at)
            bins[number] += piece
            left -= len(piece)
        if left > 0:
            bisect.insort(room, (left, number))
    return bins
