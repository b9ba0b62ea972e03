"""Evaluation: files written, metrics finite and meaningful on constructed cases."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carmodels.evaluate import (
    METRIC_DEFINITIONS,
    EvalConfig,
    evaluate,
    frechet_distance,
    mean_pairwise_rms,
    pixel_features,
)
from carmodels.train import TrainConfig, train

SIZE = 32


def _write_shards(shards_dir: Path, n_images: int, val_every: int | None) -> Path:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n_images, 4, 4, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    splits = ["val" if val_every and i % val_every == 0 else "train" for i in range(n_images)]
    shards_dir.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "image": [a.tobytes() for a in images],
                "height": [SIZE] * n_images,
                "width": [SIZE] * n_images,
                "split": splits,
                "sha256": [hashlib.sha256(a.tobytes()).hexdigest() for a in images],
            }
        ),
        shards_dir / "car-00000.parquet",
    )
    return shards_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    shards = _write_shards(root / "shards", n_images=40, val_every=4)
    config = TrainConfig(
        preset="tiny",
        image_size=SIZE,
        epochs=2,
        batch_size=8,
        max_steps_per_epoch=2,
        device="cpu",
    )
    result = train(shards, root / "run", config)
    assert result.checkpoint_path is not None
    return result.checkpoint_path, shards


def test_evaluate_writes_files_and_finite_metrics(run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, shards = run
    result = evaluate(checkpoint, shards, tmp_path, EvalConfig(n_samples=16, device="cpu"))
    for path in (result.samples_path, result.loss_plot_path, result.nearest_path):
        assert path is not None and path.stat().st_size > 0
    on_disk = json.loads(result.metrics_path.read_text())
    for name in METRIC_DEFINITIONS:
        value = result.metrics[name]
        assert value is not None and math.isfinite(value), name
        assert on_disk[name] == pytest.approx(value)
    assert result.metrics["n_generated"] == 16 and result.metrics["n_val"] == 10
    assert result.metrics["n_train"] == 30 and result.metrics["epoch"] == 2
    assert math.isfinite(result.metrics["final_loss_d"])
    assert on_disk["definitions"]["pixel_fd_16"].startswith("Frechet")


def test_evaluate_is_deterministic(run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, shards = run
    config = EvalConfig(n_samples=8, device="cpu")
    first = evaluate(checkpoint, shards, tmp_path / "a", config).metrics
    assert evaluate(checkpoint, shards, tmp_path / "b", config).metrics == first


def test_without_val_split_val_metrics_are_null(tmp_path: Path, run: tuple[Path, Path]) -> None:
    checkpoint, _ = run
    shards = _write_shards(tmp_path / "train_only", n_images=12, val_every=None)
    metrics = evaluate(checkpoint, shards, tmp_path / "out", EvalConfig(n_samples=4)).metrics
    assert metrics["pixel_fd_16"] is None and metrics["nn_ratio"] is None
    assert math.isfinite(metrics["nn_generated_to_train"])


def test_frechet_distance_of_known_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet_distance(a, rng.normal(size=(20_000, 3))) == pytest.approx(0, abs=0.01)
    shifted = rng.normal(size=(20_000, 3)) + np.array([2.0, 0, 0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=0.02)
    # Isotropic scale 2: per dimension (1 - 2)^2 = 1, so 3 in total.
    assert frechet_distance(a, 2 * rng.normal(size=(20_000, 3))) == pytest.approx(3.0, rel=0.03)
    with pytest.raises(ValueError, match="feature arrays"):
        frechet_distance(a, a[:, :2])


def test_distances_detect_copies_and_collapse() -> None:
    images = torch.randint(0, 256, (10, 3, SIZE, SIZE), dtype=torch.uint8)
    features = pixel_features(images, 16)
    assert features.shape == (10, 3 * 16 * 16) and 0 <= features.min() <= features.max() <= 1
    collapsed = pixel_features(images[:1].repeat(10, 1, 1, 1), 16)
    assert mean_pairwise_rms(collapsed) == 0.0 < mean_pairwise_rms(features)


def test_a_generator_that_copies_training_images_is_flagged(
    run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint, shards = run
    from carmodels.shards import load_images

    copies = load_images(shards, split="train")[:8].float().div(127.5).sub(1)
    monkeypatch.setattr(
        "carmodels.evaluate.sample_images", lambda generator, n, *args, **kwargs: copies[:n]
    )
    metrics = evaluate(checkpoint, shards, tmp_path, EvalConfig(n_samples=8)).metrics
    assert metrics["nn_generated_to_train"] == pytest.approx(0.0, abs=1e-3)  # cdist via matmul
    assert metrics["nn_ratio"] == pytest.approx(0.0, abs=1e-3)  # cdist via matmul
    assert metrics["nn_val_to_train"] > 0.1
