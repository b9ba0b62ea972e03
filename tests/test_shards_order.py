"""Tests for the canonical row order of car shards: rows sorted by (url, sha256) by an external
merge sort, whatever order the photos were downloaded in and however the raw shards lay them
out; and for the pluggable mapper that normalises the chunks."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import carmodels.shards as shards_module
from carmodels.dedup import DedupConfig, deduplicate
from carmodels.errors import InputError
from carmodels.imaging import ImagingConfig
from carmodels.shards import (
    PREVIEW_FILE,
    REJECTS_FILE,
    SUMMARY_FILE,
    build_shards,
    data_version_of,
    shard_files,
)
from tests.test_shards import _config, make_dataset, read_shards, write_raw_shard

DEDUP = DedupConfig(workers=1)


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """24 cars, a tiny photo, in raw shards of 12 and 13 rows; deduplicated."""
    return make_dataset(tmp_path)


def _shard_bytes(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in shard_files(folder)]


def _keys(folder: Path) -> list[tuple[str, str]]:
    table = read_shards(folder)
    return list(zip(table["url"], table["sha256"], strict=True))


def _raw_order(raw: Path) -> list[str]:
    """The urls in the order the build reads them: raw shards by name, then rows."""
    return [url for p in sorted(raw.glob("raw-*.parquet")) for url in pd.read_parquet(p)["url"]]


def _shuffled_layout(dataset: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The photos of the ``dataset`` fixture, rows shuffled over three raw shards of other
    names (as a download in another order would lay them out), deduplicated."""
    _, raw = dataset
    rows = pd.concat([pd.read_parquet(p) for p in sorted(raw.glob("raw-*.parquet"))])
    photos = dict(zip(rows["url"], rows["image_bytes"], strict=True))
    items = list(photos.items())
    random.Random(7).shuffle(items)
    other = tmp_path / "raw-other"
    for k, start in enumerate(range(0, len(items), 9)):
        write_raw_shard(other / f"raw-{5 - k:05d}.parquet", dict(items[start : start + 9]))
    unique = tmp_path / "unique-other"
    assert deduplicate(other, unique, DEDUP).n_kept == 25
    return unique, other


@pytest.mark.parametrize("images_per_shard", [50, 10])
def test_same_photos_in_another_raw_layout_give_the_same_bytes(
    dataset, tmp_path: Path, images_per_shard: int
):
    unique, raw = dataset
    other_unique, other_raw = _shuffled_layout(dataset, tmp_path)
    # The raw layouts differ, and so the order in which the photos arrive.
    assert _raw_order(raw) != _raw_order(other_raw)
    assert sorted(_raw_order(raw)) == sorted(_raw_order(other_raw))
    config = _config(images_per_shard=images_per_shard)
    first = build_shards(unique, raw, tmp_path / "a", config)
    second = build_shards(other_unique, other_raw, tmp_path / "b", config)

    assert len(first.shard_paths) == -(-24 // images_per_shard)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert data_version_of(tmp_path / "a") == data_version_of(tmp_path / "b")
    for name in (REJECTS_FILE, PREVIEW_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (first.n_train, first.n_val, first.facing_counts, first.rejects_by_reason) == (
        second.n_train,
        second.n_val,
        second.facing_counts,
        second.rejects_by_reason,
    )
    assert _keys(tmp_path / "a") == sorted(_keys(tmp_path / "a"))


def test_many_runs_are_merged_into_sorted_shards(dataset, tmp_path: Path, monkeypatch):
    unique, raw = dataset
    whole = build_shards(unique, raw, tmp_path / "whole", _config(images_per_shard=50))
    assert len(whole.shard_paths) == 1  # one sorted buffer, no runs

    small = build_shards(unique, raw, tmp_path / "small", _config(images_per_shard=3))
    assert [pq.read_metadata(p).num_rows for p in small.shard_paths] == [3] * 8
    keys = _keys(tmp_path / "small")
    assert keys == sorted(keys) and len(set(keys)) == 24
    pd.testing.assert_frame_equal(read_shards(tmp_path / "small"), read_shards(tmp_path / "whole"))
    assert not list((tmp_path / "small").glob(".runs-*"))
    # The preview shows the first images of the final order, however they were sorted.
    assert (tmp_path / "small" / PREVIEW_FILE).read_bytes() == (
        tmp_path / "whole" / PREVIEW_FILE
    ).read_bytes()
    assert (small.n_train, small.n_val, small.facing_counts) == (
        whole.n_train,
        whole.n_val,
        whole.facing_counts,
    )
    summaries = [
        pd.read_json(tmp_path / name / SUMMARY_FILE, typ="series") for name in ("small", "whole")
    ]
    for key in ("counts", "rejects_by_reason", "facing_counts", "n_mirrored", "n_written"):
        assert summaries[0][key] == summaries[1][key], key

    # More runs than are merged at once: merged in passes, to the same shards.
    monkeypatch.setattr(shards_module, "_MAX_FAN_IN", 3)
    build_shards(unique, raw, tmp_path / "passes", _config(images_per_shard=3))
    assert _shard_bytes(tmp_path / "passes") == _shard_bytes(tmp_path / "small")
    assert not list((tmp_path / "passes").glob(".runs-*"))


def test_rejects_are_sorted_like_the_shards(dataset, tmp_path: Path):
    unique, raw = dataset
    (raw / "raw-00000.parquet").unlink()  # 12 photos lost: missing_source rejects
    result = build_shards(unique, raw, tmp_path / "shards", _config(images_per_shard=4))
    assert result.rejects_by_reason == {"missing_source": 12, "too_small": 1}
    rejects = pd.read_parquet(tmp_path / "shards" / REJECTS_FILE)
    keys = list(zip(rejects["url"], rejects["sha256"], strict=True))
    assert keys == sorted(keys) and rejects["url"].iloc[-1] == "https://cars.example/tiny.jpg"

    nothing_fits = _config(imaging=ImagingConfig(face="none", min_side=100_000))
    with pytest.raises(InputError, match="None of the 25 images"):
        build_shards(unique, raw, tmp_path / "none", nothing_fits)
    assert not list((tmp_path / "none").glob(".runs-*"))


def test_runs_of_a_crashed_build_are_never_read_and_cleaned_up(
    dataset, tmp_path: Path, monkeypatch
):
    unique, raw = dataset
    out = tmp_path / "shards"
    build_shards(unique, raw, out, _config(images_per_shard=50))
    before = _shard_bytes(out)

    # A build killed while merging leaves its runs (and here a finished shard) behind.
    real_write = shards_module.atomic_write_parquet

    def crash_on_shards(path, table, *args, **kwargs):
        if Path(path).name.startswith("car-"):
            raise OSError("disk full")
        return real_write(path, table, *args, **kwargs)

    monkeypatch.setattr(shards_module, "atomic_write_parquet", crash_on_shards)
    with pytest.raises(OSError, match="disk full"):
        build_shards(unique, raw, out, _config(images_per_shard=3))
    assert not list(out.glob(".runs-*"))  # a failed build deletes its runs ...
    monkeypatch.undo()

    # ... and a killed one cannot: its folder is left out by the readers, then deleted.
    leftover = out / ".runs-g0002"
    leftover.mkdir()
    (leftover / "run-000000.parquet").write_bytes(before[0])
    (leftover / "car-g0002-00000.parquet").write_bytes(before[0])
    (leftover / SUMMARY_FILE).write_text("{}")
    assert _shard_bytes(out) == before
    build_shards(unique, raw, out, _config(images_per_shard=50))
    assert not list(out.glob(".runs-*"))
    assert _shard_bytes(out) == before


def test_a_plain_chunk_mapper_gives_the_same_shards(dataset, tmp_path: Path):
    unique, raw = dataset
    calls = []

    def in_process(fn, chunks):
        calls.append(fn)
        return map(fn, chunks)

    config = _config(workers=2, chunk_size=4, images_per_shard=10)
    build_shards(unique, raw, tmp_path / "default", config)
    build_shards(unique, raw, tmp_path / "mapped", config, map_chunks=in_process)
    build_shards(
        unique, raw, tmp_path / "lambda", config, map_chunks=lambda fn, chunks: map(fn, chunks)
    )
    assert len(calls) == 1
    assert _shard_bytes(tmp_path / "mapped") == _shard_bytes(tmp_path / "default")
    assert _shard_bytes(tmp_path / "lambda") == _shard_bytes(tmp_path / "default")
