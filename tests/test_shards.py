"""Tests for carmodels.shards: building shards from the dedup index and loading them back."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw

import carmodels.shards as shards_module
from carmodels.dedup import DedupConfig, deduplicate
from carmodels.errors import EmptySplitError, InputError, ShardsError
from carmodels.imaging import ImagingConfig
from carmodels.shards import (
    SHARD_SCHEMA_VERSION,
    SUMMARY_FILE,
    ShardConfig,
    build_shards,
    iter_images,
    load_images,
    shard_files,
    split_for,
)
from carmodels.train import data_version_of
from tests.conftest import write_blocky_shards

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def car_photo(seed: int) -> bytes:
    """A distinct photo per seed: a random backdrop with a coloured car-like block."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((280, 180), Image.Resampling.BICUBIC)
    x = int(rng.integers(20, 120))
    ImageDraw.Draw(img).rectangle(
        [x, 90, x + 140, 150], fill=tuple(rng.integers(0, 256, 3).tolist())
    )
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_raw_shard(path: Path, photos: dict[str, bytes | None]) -> None:
    rows = {
        "url": list(photos),
        "outcome": ["ok" if data is not None else "corrupt" for data in photos.values()],
        "image_bytes": list(photos.values()),
        "sha256": [
            hashlib.sha256(d).hexdigest() if d is not None else None for d in photos.values()
        ],
        "fetched_at": [T0 + timedelta(seconds=k) for k in range(len(photos))],
        "make": ["Volvo"] * len(photos),
        "year": ["2012"] * len(photos),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Raw shards with 24 distinct photos, one tiny one, one undecodable; deduplicated."""
    return make_dataset(tmp_path)


def make_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """The ``dataset`` fixture's folders (unique, raw), for other modules' fixtures."""
    photos = {f"https://cars.example/{k:02d}.jpg": car_photo(k) for k in range(24)}
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="JPEG")
    photos["https://cars.example/tiny.jpg"] = buffer.getvalue()
    raw = tmp_path / "raw"
    items = list(photos.items())
    write_raw_shard(raw / "raw-00000.parquet", dict(items[:12]))
    write_raw_shard(raw / "raw-00001.parquet", dict(items[12:]))
    unique = tmp_path / "unique"
    result = deduplicate(raw, unique, DedupConfig(workers=1))
    assert result.n_kept == 25
    return unique, raw


def read_shards(path: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in shard_files(path)], ignore_index=True)


def _config(**overrides) -> ShardConfig:
    defaults = {"imaging": ImagingConfig(face="none"), "val_fraction": 0.25, "workers": 1}
    return ShardConfig(**{**defaults, **overrides})


def test_build_and_load_round_trip(dataset, tmp_path: Path):
    unique, raw = dataset
    out = tmp_path / "shards"
    result = build_shards(unique, raw, out, _config(images_per_shard=10))
    assert result.n_input == 25
    assert result.n_written == 24
    assert result.rejects_by_reason == {"too_small": 1}
    assert len(result.shard_paths) == 3
    assert sum(result.facing_counts.values()) == 24

    images = load_images(out)
    assert images.shape == (24, 3, 128, 128) and images.dtype == torch.uint8
    train, val = load_images(out, "train"), load_images(out, "val")
    assert len(train) == result.n_train and len(val) == result.n_val
    assert result.n_train + result.n_val == 24 and result.n_val > 0
    assert sum(len(batch) for batch in iter_images(out, batch_size=7)) == 24

    table = read_shards(out)
    expected_split = [split_for(sha, 0.25) for sha in table["sha256"]]
    assert table["split"].tolist() == expected_split
    assert set(table["make"]) == {"Volvo"}
    first = table.iloc[0]
    decoded = np.frombuffer(first["image"], dtype=np.uint8).reshape(128, 128, 3)
    np.testing.assert_array_equal(torch.from_numpy(decoded.copy()).permute(2, 0, 1), images[0])
    assert (first["source_width"], first["source_height"]) == (280, 180)

    summary = json.loads(result.summary_path.read_text())
    assert summary["counts"] == {"train": result.n_train, "val": result.n_val}
    assert summary["image_size"]["height"] == 128 and summary["schema_version"] >= 1
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert rejects["url"].tolist() == ["https://cars.example/tiny.jpg"]
    assert Image.open(result.preview_path).size == (8 * 128, 3 * 128)


def test_rebuild_is_deterministic_and_replaces_old_set(dataset, tmp_path: Path):
    unique, raw = dataset
    out = tmp_path / "shards"
    first = build_shards(unique, raw, out, _config(images_per_shard=5))
    before = load_images(out)
    second = build_shards(unique, raw, out, _config(images_per_shard=50))
    assert len(second.shard_paths) == 1
    assert sorted(out.glob("car-*.parquet")) == second.shard_paths  # old set removed
    assert torch.equal(load_images(out), before)
    assert (second.n_train, second.n_val) == (first.n_train, first.n_val)


def test_failed_build_leaves_previous_shards_readable(dataset, tmp_path: Path, monkeypatch):
    unique, raw = dataset
    out = tmp_path / "shards"
    build_shards(unique, raw, out, _config(images_per_shard=50))
    before = load_images(out)

    real_write = shards_module.atomic_write_parquet
    writes = []

    def write_then_crash(path, table, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        return real_write(path, table, *args, **kwargs)

    monkeypatch.setattr(shards_module, "atomic_write_parquet", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        build_shards(unique, raw, out, _config(images_per_shard=4, val_fraction=0.5))
    assert writes[0].exists()  # a new shard was written before the crash ...
    assert torch.equal(load_images(out), before)  # ... yet readers see only the old set


def test_mirror_sources_flip_whole_sites(dataset, tmp_path: Path):
    unique, raw = dataset
    plain = build_shards(unique, raw, tmp_path / "plain", _config())
    mirrored = build_shards(
        unique, raw, tmp_path / "mirrored", _config(mirror_sources=("cars.example",))
    )
    assert plain.n_written == mirrored.n_written
    a, b = load_images(tmp_path / "plain"), load_images(tmp_path / "mirrored")
    assert torch.equal(a.flip(-1), b)
    assert read_shards(tmp_path / "mirrored")["mirrored"].all()


def test_parallel_build_matches_serial(dataset, tmp_path: Path):
    unique, raw = dataset
    build_shards(unique, raw, tmp_path / "serial", _config())
    build_shards(unique, raw, tmp_path / "parallel", _config(workers=2, chunk_size=4))
    assert torch.equal(load_images(tmp_path / "serial"), load_images(tmp_path / "parallel"))


def test_missing_unique_index_names_the_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="unique_images"):
        build_shards(tmp_path / "unique", tmp_path / "raw", tmp_path / "shards", _config())


# --------------------------------------------------------------------------- bad input


def _blocky_with_summary(folder: Path, **summary: object) -> Path:
    """A hand-made shards folder with the summary.json a build would write (or a broken one)."""
    write_blocky_shards(folder, ["train", "val", "train"])
    (folder / SUMMARY_FILE).write_text(json.dumps({"shards": ["car-00000.parquet"], **summary}))
    return folder


def test_every_reader_checks_the_schema_version(tmp_path: Path):
    current = _blocky_with_summary(tmp_path / "current", schema_version=SHARD_SCHEMA_VERSION)
    assert len(load_images(current)) == 3

    other = _blocky_with_summary(tmp_path / "other", schema_version=SHARD_SCHEMA_VERSION + 1)
    unversioned = _blocky_with_summary(tmp_path / "unversioned")
    readers = {
        "shard_files": shard_files,
        "load_images": load_images,
        "iter_images": lambda path: list(iter_images(path)),
        "data_version_of": data_version_of,
    }
    for folder in (other, unversioned):
        for name, read in readers.items():
            with pytest.raises(ShardsError, match=r"schema_version.*carmodels shard") as caught:
                read(folder)
            assert str(folder) in str(caught.value), name


def test_damaged_summary_or_shard_names_the_folder(tmp_path: Path):
    damaged_summary = write_blocky_shards(tmp_path / "summary", ["train"])
    (damaged_summary / SUMMARY_FILE).write_text('{"schema_version": 1, "shards": [')
    with pytest.raises(ShardsError, match="summary.json is not valid JSON"):
        load_images(damaged_summary)

    damaged_shard = tmp_path / "shard"
    damaged_shard.mkdir()
    (damaged_shard / "car-00000.parquet").write_bytes(b"PAR1 cut short")
    for read in (load_images, lambda path: list(iter_images(path))):
        with pytest.raises(ShardsError, match=r"cannot be read.*carmodels shard"):
            read(damaged_shard)


def test_empty_split_is_its_own_error(tmp_path: Path):
    folder = write_blocky_shards(tmp_path / "shards", ["train", "train"])
    with pytest.raises(EmptySplitError, match="split 'val'"):
        load_images(folder, "val")


def test_build_that_keeps_nothing_leaves_previous_shards(dataset, tmp_path: Path):
    unique, raw = dataset
    out = tmp_path / "shards"
    build_shards(unique, raw, out, _config())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    nothing_fits = _config(imaging=ImagingConfig(face="none", min_side=100_000))
    with pytest.raises(InputError, match=r"None of the 25 images.*too_small"):
        build_shards(unique, raw, out, nothing_fits)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_empty_or_damaged_unique_index_is_refused(dataset, tmp_path: Path):
    unique, raw = dataset
    empty = tmp_path / "empty"
    empty.mkdir()
    pd.read_parquet(unique / "unique.parquet").head(0).to_parquet(empty / "unique.parquet")
    with pytest.raises(InputError, match="lists no images"):
        build_shards(empty, raw, tmp_path / "shards", _config())
    (empty / "unique.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ShardsError, match=r"unique\.parquet cannot be read.*carmodels dedup"):
        build_shards(empty, raw, tmp_path / "shards", _config())
    assert not (tmp_path / "shards").exists()


def test_rebuilding_replaces_a_folder_of_another_schema_version(dataset, tmp_path: Path):
    # The fix the error names must work: `carmodels shard` over the outdated folder.
    unique, raw = dataset
    out = tmp_path / "shards"
    build_shards(unique, raw, out, _config())
    summary = json.loads((out / SUMMARY_FILE).read_text())
    (out / SUMMARY_FILE).write_text(json.dumps({**summary, "schema_version": 0}))
    with pytest.raises(ShardsError, match="schema_version 0"):
        load_images(out)
    result = build_shards(unique, raw, out, _config())
    assert len(load_images(out)) == result.n_written == 24
    assert sorted(out.glob("car-*.parquet")) == result.shard_paths
