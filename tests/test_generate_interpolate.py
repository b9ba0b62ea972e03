"""Latent walks: lerp/slerp maths, strips written and reproducible, ends equal seeds' designs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carmodels.cli import main
from carmodels.generate import generate, interpolate, interpolation_latents
from carmodels.latent import lerp, sample_noise, slerp
from carmodels.train import TrainConfig, train
from tests.test_restore import SIZE, write_shards

#: make_grid's padding around each tile of a strip.
PADDING = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interpolate")
    config = TrainConfig(
        preset="tiny", image_size=SIZE, epochs=1, batch_size=8, max_steps_per_epoch=2, device="cpu"
    )
    result = train(write_shards(root / "shards"), root / "run", config)
    assert result.checkpoint_path is not None
    return result.checkpoint_path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _tile(strip: np.ndarray, index: int) -> np.ndarray:
    left = PADDING + index * (SIZE + PADDING)
    return strip[PADDING : PADDING + SIZE, left : left + SIZE]


def test_lerp_and_slerp_hit_both_ends_and_slerp_keeps_the_norm() -> None:
    a, b = sample_noise(2, 100, seed=0)
    t = torch.linspace(0, 1, 9)
    for path in (lerp(a, b, t), slerp(a, b, t)):
        assert path.shape == (9, 100)
        assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    # Norms along the great circle move linearly between the ends; the chord sags inside.
    expected = a.norm() * (1 - t) + b.norm() * t
    assert torch.allclose(slerp(a, b, t).norm(dim=1), expected, atol=1e-4)
    assert lerp(a, b, t)[4].norm() < 0.8 * slerp(a, b, t)[4].norm()
    # Parallel vectors have no great circle: the straight line is used.
    assert torch.allclose(slerp(a, 2 * a, t), lerp(a, 2 * a, t))


def test_interpolation_latents_start_at_each_seeds_single_design() -> None:
    z = interpolation_latents(100, seed_a=3, seed_b=7, steps=5, mode="linear", truncation=0.7)
    assert torch.allclose(z[0], sample_noise(1, 100, seed=3, truncation=0.7)[0])
    assert torch.allclose(z[-1], sample_noise(1, 100, seed=7, truncation=0.7)[0])
    with pytest.raises(ValueError, match="steps must be >= 2"):
        interpolation_latents(100, 0, 1, steps=1)
    with pytest.raises(ValueError, match="mode"):
        interpolation_latents(100, 0, 1, steps=4, mode="cubic")


def test_interpolate_writes_reproducible_strips(checkpoint: Path, tmp_path: Path) -> None:
    result = interpolate(checkpoint, seed_a=3, seed_b=9, steps=6, out_dir=tmp_path / "walk")
    assert set(result.strip_paths) == {"linear", "spherical"}
    assert result.strip_paths["spherical"].name == "interpolation-3-9-spherical.png"
    linear, spherical = (_pixels(result.strip_paths[m]) for m in ("linear", "spherical"))
    assert linear.shape == (SIZE + 2 * PADDING, PADDING + 6 * (SIZE + PADDING), 3)
    # Both walks share their ends and differ in between.
    assert np.array_equal(_tile(linear, 0), _tile(spherical, 0))
    assert np.array_equal(_tile(linear, 5), _tile(spherical, 5))
    assert not np.array_equal(_tile(linear, 2), _tile(spherical, 2))
    # The ends are the designs `generate(n=1)` draws with those seeds.
    start = generate(checkpoint, n=1, seed=3, out_dir=tmp_path / "a").image_paths[0]
    end = generate(checkpoint, n=1, seed=9, out_dir=tmp_path / "b").image_paths[0]
    assert np.array_equal(_tile(linear, 0), _pixels(start))
    assert np.array_equal(_tile(linear, 5), _pixels(end))

    again = interpolate(checkpoint, seed_a=3, seed_b=9, steps=6, out_dir=tmp_path / "again")
    for mode in ("linear", "spherical"):
        assert np.array_equal(_pixels(again.strip_paths[mode]), _pixels(result.strip_paths[mode]))


def test_cli_generate_interpolate(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["generate", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]
    assert main([*argv, "--interpolate", "1", "2", "--steps", "4", "--truncation", "0.8"]) == 0
    assert "spherical" in capsys.readouterr().out
    for mode in ("linear", "spherical"):
        strip = _pixels(tmp_path / f"interpolation-1-2-{mode}.png")
        assert strip.shape[1] == PADDING + 4 * (SIZE + PADDING)
    assert not list(tmp_path.glob("design-*.png"))  # interpolation mode writes only strips
