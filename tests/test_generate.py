"""Designs from a checkpoint: files written, reproducible per seed, truncation respected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carmodels.generate import generate
from carmodels.latent import sample_noise
from carmodels.train import TrainConfig, train
from tests.conftest import write_blocky_shards

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    write_blocky_shards(root / "shards", ["train"] * 24, size=SIZE, seed=1)
    config = TrainConfig(
        preset="tiny",
        image_size=SIZE,
        epochs=1,
        batch_size=8,
        max_steps_per_epoch=2,
        device="cpu",
    )
    result = train(root / "shards", root / "run", config)
    assert result.checkpoint_path is not None
    return result.checkpoint_path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_writes_grid_and_designs(checkpoint: Path, tmp_path: Path) -> None:
    result = generate(checkpoint, n=5, seed=3, out_dir=tmp_path)
    assert [p.name for p in result.image_paths] == [f"design-000{i}.png" for i in range(5)]
    assert _pixels(result.image_paths[0]).shape == (SIZE, SIZE, 3)
    assert result.grid_path == tmp_path / "grid.png" and result.grid_path.stat().st_size > 0
    assert result.weights == "ema" and result.epoch == 1


def test_same_seed_same_designs_other_seed_other_designs(checkpoint: Path, tmp_path: Path) -> None:
    first = generate(checkpoint, n=3, seed=11, out_dir=tmp_path / "a")
    again = generate(checkpoint, n=3, seed=11, out_dir=tmp_path / "b")
    other = generate(checkpoint, n=3, seed=12, out_dir=tmp_path / "c")
    for a, b in zip(first.image_paths, again.image_paths, strict=True):
        assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(first.image_paths[0]), _pixels(other.image_paths[0]))


def test_raw_and_ema_weights_differ(checkpoint: Path, tmp_path: Path) -> None:
    ema = generate(checkpoint, n=1, seed=0, out_dir=tmp_path / "ema")
    raw = generate(checkpoint, n=1, seed=0, out_dir=tmp_path / "raw", ema=False)
    assert raw.weights == "generator"
    assert not np.array_equal(_pixels(ema.image_paths[0]), _pixels(raw.image_paths[0]))


def test_default_out_dir_is_next_to_the_run(checkpoint: Path) -> None:
    result = generate(checkpoint, n=1)
    assert result.out_dir == checkpoint.parent.parent / "generated"


def test_truncation_bounds_the_noise() -> None:
    z = sample_noise(500, 100, seed=0, truncation=0.5)
    assert z.abs().max() <= 0.5 and z.std() < 0.5
    assert torch.equal(z, sample_noise(500, 100, seed=0, truncation=0.5))
    assert sample_noise(500, 100, seed=0).abs().max() > 2.0
    with pytest.raises(ValueError, match="truncation"):
        sample_noise(1, 100, seed=0, truncation=0)


def test_bad_inputs(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        generate(checkpoint, n=0, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        generate(tmp_path / "missing.pt", out_dir=tmp_path)
