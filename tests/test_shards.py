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
from carmodels.imaging import ImagingConfig
from carmodels.shards import (
    ShardConfig,
    build_shards,
    iter_images,
    load_images,
    shard_files,
    split_for,
)

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
