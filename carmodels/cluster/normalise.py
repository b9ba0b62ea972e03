"""Shard builds normalised on a Ray cluster: the photos' chunks as Ray tasks.

Normalising (decode, crop, resize, facing; :func:`carmodels.imaging.normalise_keyed`) is
CPU-bound: one decode and resize per photo. Locally the shard builder maps it over a
process pool (:func:`carmodels.parallel.map_in_processes`); given a :class:`RayChunkMapper`
instead (the builder's ``map_chunks``), each chunk goes to a Ray worker anywhere in the
cluster, with the results handed back in chunk order, so the shards are byte for byte those
of a local build.

The limit: only the normalising moves. The driver still reads every photo's bytes from the
raw shards (so it needs them on its own disk) and ships each chunk to its task through the
object store, and it writes the shards itself. Its memory stays bounded, since chunks are
read lazily and at most ``max_in_flight`` are submitted at a time, but its disk and network
bandwidth bound how many workers a build can keep busy (beyond that, the tasks would have to
read the photos themselves).

A mapper is used inside an open Ray connection (:func:`carmodels.cluster.ray_session`, or
:func:`ray_chunk_mapping`, which opens one for a block).

The shard builder itself (``carmodels.shards``) sits above this package in the import
layers, so a ``build_shards_on_ray`` belongs there (or in the pipelines), as
``with ray_chunk_mapping(fanout) as map_chunks: return build_shards(..., map_chunks=...)``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from carmodels.cluster.config import FanoutConfig
from carmodels.cluster.connect import ray_session, require_ray
from carmodels.cluster.ingest import FanoutFailed, _describe
from carmodels.errors import InputError

T = TypeVar("T")
R = TypeVar("R")

#: Chunks submitted per task slot of the cluster (its CPUs over ``task_cpus``): enough that a
#: worker finishing a chunk finds the next one waiting, few enough that the chunks' bytes in
#: the object store stay a small multiple of what the workers are busy with.
IN_FLIGHT_PER_SLOT = 2


def _apply(fn: Callable[[T], R], chunk: T) -> R:
    """What a Ray task runs: ``fn`` (from the object store, shared by every task) on its
    chunk."""
    return fn(chunk)


class RayChunkMapper:
    """``map(fn, chunks)`` with each chunk a Ray task: a ``ChunkMapper`` of the shard builder
    (``carmodels.shard_inputs``) for a Ray cluster.

    Results come back in chunk order. At most ``max_in_flight`` chunks are submitted at a time
    (default: ``IN_FLIGHT_PER_SLOT`` per task slot of the cluster when called), so a lazy
    ``chunks`` iterator is read only as fast as the cluster keeps up. A task is retried
    ``fanout.task_retries`` times when its worker or node is lost; an exception it raises is
    not retried (normalising has no I/O to fail by chance, so it would only fail again) and,
    like a task whose retries are used up, raises :class:`FanoutFailed`, after the tasks
    still queued are cancelled.
    """

    def __init__(self, fanout: FanoutConfig, max_in_flight: int | None = None) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.fanout = fanout
        self.max_in_flight = max_in_flight

    def in_flight_limit(self, ray: Any) -> int:
        """Chunks submitted at a time on the connected cluster."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        slots = max(1, int(cpus // self.fanout.task_cpus))
        return IN_FLIGHT_PER_SLOT * slots

    def __call__(self, fn: Callable[[list[T]], R], chunks: Iterable[list[T]]) -> Iterator[R]:
        """``fn`` over ``chunks`` on Ray, in order. ``fn`` must pickle (a module-level function
        or a ``functools.partial`` of one); it is put in the object store once."""
        ray = require_ray()
        if not ray.is_initialized():  # checked now, not at the first result
            raise InputError(
                "No Ray connection to normalise on: call inside carmodels.cluster.ray_session"
                "(...) or ray_chunk_mapping(...)."
            )
        return self._results(ray, fn, chunks, self.in_flight_limit(ray))

    def _results(
        self, ray: Any, fn: Callable[[list[T]], R], chunks: Iterable[list[T]], limit: int
    ) -> Iterator[R]:
        task = ray.remote(_apply).options(
            name="carmodels-normalise",
            num_cpus=self.fanout.task_cpus,
            max_retries=self.fanout.task_retries,
            retry_exceptions=False,
        )
        fn_ref = ray.put(fn)
        pending: deque[Any] = deque()
        done = 0
        try:
            for chunk in chunks:
                pending.append(task.remote(fn_ref, chunk))
                if len(pending) >= limit:
                    yield self._get(ray, pending.popleft(), done)
                    done += 1
            while pending:
                yield self._get(ray, pending.popleft(), done)
                done += 1
        finally:
            # Only when failed or abandoned midway: stop the chunks still queued or running.
            if pending and ray.is_initialized():
                for ref in pending:
                    with contextlib.suppress(Exception):  # finished meanwhile, or lost
                        ray.cancel(ref)

    def _get(self, ray: Any, ref: Any, position: int) -> Any:
        try:
            return ray.get(ref)
        except Exception as error:
            raise FanoutFailed(
                f"normalising chunk {position} on Ray failed (retried up to "
                f"{self.fanout.task_retries} times if its worker was lost): "
                f"{_describe(error)}"
            ) from error


def ray_chunk_mapper(fanout: FanoutConfig, max_in_flight: int | None = None) -> RayChunkMapper:
    """The shard builder's ``map_chunks`` for the Ray cluster this process is connected to:
    each chunk a task of ``fanout.task_cpus`` CPUs, retried ``fanout.task_retries`` times."""
    return RayChunkMapper(fanout, max_in_flight)


@contextlib.contextmanager
def ray_chunk_mapping(
    fanout: FanoutConfig, max_in_flight: int | None = None
) -> Iterator[RayChunkMapper]:
    """A :class:`RayChunkMapper` for the block, on this process's Ray connection, else on
    one to ``fanout.address`` opened for the block (as :func:`download_on_ray` connects)."""
    ray = require_ray()
    if not ray.is_initialized() and not fanout.address:
        raise InputError(
            "No Ray cluster to normalise on: set FanoutConfig.address (ray://head:10001, auto "
            "or local), or build inside carmodels.cluster.ray_session(...)."
        )
    with ray_session(fanout.address):  # reuses this process's connection when it has one
        yield ray_chunk_mapper(fanout, max_in_flight)


__all__ = ["IN_FLIGHT_PER_SLOT", "RayChunkMapper", "ray_chunk_mapper", "ray_chunk_mapping"]
