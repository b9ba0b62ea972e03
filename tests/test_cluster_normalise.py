"""A shard build's normalising as Ray tasks (carmodels.cluster.normalise), on a Ray head on
127.0.0.1 with two CPUs (started once for the module): results in chunk order, a bounded
number of chunks in flight, a failed chunk as one error, and shards byte for byte those of a
local build.

Slow: Ray starts in a few seconds, and its workers import the package.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from carmodels.cluster import (  # noqa: E402
    FanoutConfig,
    FanoutFailed,
    RayChunkMapper,
    ray_chunk_mapper,
    ray_chunk_mapping,
    ray_session,
)
from carmodels.dedup import DedupConfig, deduplicate  # noqa: E402
from carmodels.errors import InputError  # noqa: E402
from carmodels.shards import ShardConfig, build_shards, data_version_of, shard_files  # noqa: E402
from tests import test_cluster_ray  # noqa: E402
from tests.test_cluster_ray import MIB  # noqa: E402
from tests.test_shards import car_photo, write_raw_shard  # noqa: E402

pytestmark = pytest.mark.slow

#: CPUs of the test head: two one-CPU tasks at a time, so four chunks in flight by default.
HEAD_CPUS = 2


#: No usage statistics and no token file, as for every test cluster (module-scoped).
ray_env = test_cluster_ray.ray_env


@pytest.fixture(scope="module")
def local_ray(ray_env: None) -> Iterator[None]:
    """A Ray head on 127.0.0.1 with room for two one-CPU tasks at once."""
    with ray_session("local", num_cpus=HEAD_CPUS, object_store_memory=100 * MIB):
        yield


@pytest.fixture(scope="module")
def dedup_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two raw shards of 25 photos (one too small to keep), deduplicated: the unique index
    and the raw folder."""
    folder = tmp_path_factory.mktemp("photos")
    photos = {f"https://cars.example/{k:02d}.jpg": car_photo(k) for k in range(24)}
    photos["https://cars.example/tiny.jpg"] = tiny_photo()
    items = list(photos.items())
    write_raw_shard(folder / "raw" / "raw-00000.parquet", dict(items[:12]))
    write_raw_shard(folder / "raw" / "raw-00001.parquet", dict(items[12:]))
    result = deduplicate(folder / "raw", folder / "unique", DedupConfig(workers=1))
    assert result.n_kept == 25
    return folder / "unique", folder / "raw"


def tiny_photo() -> bytes:
    """A photo too small to keep."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="JPEG")
    return buffer.getvalue()


def slow_sum(chunk: list[int], delay_s: float) -> tuple[int, int]:
    """The chunk's first item and its sum, after a delay that is longest for the earliest
    chunks, so that later chunks finish first and the mapper has to put them back in order."""
    time.sleep(delay_s / (1 + chunk[0]))
    return chunk[0], sum(chunk)


def fail_on_three(chunk: list[int]) -> int:
    if chunk[0] == 3:
        raise ValueError("chunk three is broken")
    return sum(chunk)


class CountedChunks:
    """Chunks handed out lazily, counting how many have been taken."""

    def __init__(self, chunks: list[list[int]]) -> None:
        self.chunks = chunks
        self.taken = 0

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self.chunks:
            self.taken += 1
            yield chunk


@pytest.mark.timeout(120)
def test_results_come_in_chunk_order_with_a_bounded_number_in_flight(local_ray):
    """Twenty chunks, four in flight (two per CPU): the same results as ``map``, in order,
    though later chunks finish first; and no more than four chunks are ever taken beyond
    the results handed back."""
    fn = functools.partial(slow_sum, delay_s=0.3)
    chunks = [[k, k * k, 1] for k in range(20)]
    mapper = ray_chunk_mapper(FanoutConfig())
    assert isinstance(mapper, RayChunkMapper)
    assert mapper.in_flight_limit(ray) == 2 * HEAD_CPUS

    source = CountedChunks(chunks)
    ahead = []
    results = []
    for result in mapper(fn, source):
        results.append(result)
        ahead.append(source.taken - len(results))
    assert results == list(map(fn, chunks))
    assert max(ahead) <= 2 * HEAD_CPUS - 1, ahead  # the next chunk is taken after a result
    assert source.taken == len(chunks)

    # An explicit limit, and the context manager on this process's connection.
    with ray_chunk_mapping(FanoutConfig(), max_in_flight=1) as mapper_of_one:
        source = CountedChunks(chunks[:5])
        ahead = []
        for k, _ in enumerate(mapper_of_one(fn, source), start=1):
            ahead.append(source.taken - k)
        assert ahead == [0] * 5
    assert ray.is_initialized(), "a connection the process already had is left open"


@pytest.mark.timeout(120)
def test_a_failing_chunk_is_one_error_naming_it(local_ray):
    """A chunk whose function raises is not retried (it would only fail again) and fails the
    map with what it raised; the chunks after it are not waited for."""
    chunks = [[k, 1] for k in range(12)]
    started = time.monotonic()
    with pytest.raises(FanoutFailed, match=r"chunk 3 .*ValueError: chunk three is broken"):
        list(ray_chunk_mapper(FanoutConfig(task_retries=2))(fail_on_three, chunks))
    assert time.monotonic() - started < 30


def test_a_mapper_needs_a_ray_connection(ray_env, monkeypatch):
    """Called without a connection, the mapper says how to get one, before any result is
    asked for; ``ray_chunk_mapping`` without an address says which setting is missing."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(InputError, match="ray_session"):
        ray_chunk_mapper(FanoutConfig())(sum, [[1]])
    with (
        pytest.raises(InputError, match=r"FanoutConfig\.address"),
        ray_chunk_mapping(FanoutConfig()),
    ):
        pass
    with pytest.raises(ValueError, match="max_in_flight"):
        RayChunkMapper(FanoutConfig(), max_in_flight=0)


class CountingMapper(RayChunkMapper):
    """The Ray mapper, counting the chunks it hands back (so the test knows Ray did the work)."""

    chunks_mapped = 0

    def __call__(self, fn, chunks):
        for result in super().__call__(fn, chunks):
            self.chunks_mapped += 1
            yield result


@pytest.mark.timeout(180)
def test_shards_normalised_on_ray_are_the_local_builds_bytes(local_ray, dedup_output, tmp_path):
    """The same 25 photos sharded once by local processes and once with every chunk a Ray
    task (7 chunks of 4, more than the 4 in flight): the same shard files, byte for byte, so
    the same ``data_version_of``, and the same rejects and counts."""
    unique, raw = dedup_output
    config = ShardConfig(val_fraction=0.25, images_per_shard=10, chunk_size=4, workers=2)
    local = build_shards(unique, raw, tmp_path / "local", config)

    mapper = CountingMapper(FanoutConfig())
    on_ray = build_shards(unique, raw, tmp_path / "ray", config, map_chunks=mapper)
    assert mapper.chunks_mapped == 7

    assert (on_ray.n_input, on_ray.n_written) == (local.n_input, local.n_written) == (25, 24)
    assert on_ray.rejects_by_reason == local.rejects_by_reason == {"too_small": 1}
    assert on_ray.facing_counts == local.facing_counts
    assert data_version_of(tmp_path / "ray") == data_version_of(tmp_path / "local")
    ray_files, local_files = shard_files(tmp_path / "ray"), shard_files(tmp_path / "local")
    assert [p.name for p in ray_files] == [p.name for p in local_files]
    assert len(ray_files) == 3
    for ours, theirs in zip(ray_files, local_files, strict=True):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    rejects = "rejects.parquet"
    assert (tmp_path / "ray" / rejects).read_bytes() == (tmp_path / "local" / rejects).read_bytes()
