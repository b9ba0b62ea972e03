"""Evaluation: files written, metrics finite and meaningful on constructed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from carmodels.cli import main
from carmodels.evaluate import (
    DOMAIN_METRICS,
    METRIC_DEFINITIONS,
    EvalConfig,
    evaluate,
    frechet_distance,
    mean_pairwise_rms,
    pixel_features,
)
from carmodels.metrics.fid import FidConfig
from carmodels.promotion import HISTORY_FILE, read_history, record_evaluation
from carmodels.train import TrainConfig, train
from tests.conftest import write_blocky_shards
from tests.test_classifier import TINY, write_labelled_shards
from tests.test_fid import random_inception  # noqa: F401 (fixture)

SIZE = 32


def _config(**kwargs: object) -> EvalConfig:
    """Offline and small: no download attempt, a few FID samples, a tiny classifier."""
    fid = FidConfig(download=False, n_samples=kwargs.pop("fid_samples", 8))  # type: ignore[arg-type]
    return EvalConfig(device="cpu", fid_config=fid, classifier_config=TINY, **kwargs)  # type: ignore[arg-type]


#: Null in these runs: no Inception weights, and the synthetic shards carry no type labels.
LEARNED_METRICS = {"fid", "kid_mean", "kid_std", *DOMAIN_METRICS}


def _write_shards(shards_dir: Path, n_images: int, val_every: int | None) -> Path:
    splits = ["val" if val_every and i % val_every == 0 else "train" for i in range(n_images)]
    return write_blocky_shards(shards_dir, splits, size=SIZE, seed=2)


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
    result = evaluate(checkpoint, shards, tmp_path, _config(n_samples=16))
    for path in (result.samples_path, result.loss_plot_path, result.nearest_path):
        assert path is not None and path.stat().st_size > 0
    on_disk = json.loads(result.metrics_path.read_text())
    for name in set(METRIC_DEFINITIONS) - LEARNED_METRICS:
        value = result.metrics[name]
        assert value is not None and math.isfinite(value), name
        assert on_disk[name] == pytest.approx(value)
    assert result.metrics["n_generated"] == 16 and result.metrics["n_val"] == 10
    assert result.metrics["n_train"] == 30 and result.metrics["epoch"] == 2
    assert math.isfinite(result.metrics["final_loss_d"])
    assert on_disk["definitions"]["pixel_fd_16"].startswith("Frechet")


def test_evaluate_is_deterministic(run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, shards = run
    config = _config(n_samples=8)
    first = evaluate(checkpoint, shards, tmp_path / "a", config).metrics
    assert evaluate(checkpoint, shards, tmp_path / "b", config).metrics == first


def test_without_val_split_val_metrics_are_null(tmp_path: Path, run: tuple[Path, Path]) -> None:
    checkpoint, _ = run
    shards = _write_shards(tmp_path / "train_only", n_images=12, val_every=None)
    metrics = evaluate(checkpoint, shards, tmp_path / "out", _config(n_samples=4)).metrics
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
    metrics = evaluate(checkpoint, shards, tmp_path, _config(n_samples=8)).metrics
    assert metrics["nn_generated_to_train"] == pytest.approx(0.0, abs=1e-3)  # cdist via matmul
    assert metrics["nn_ratio"] == pytest.approx(0.0, abs=1e-3)  # cdist via matmul
    assert metrics["nn_val_to_train"] > 0.1


def test_pictures_records_and_history(run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, shards = run
    config = _config(n_samples=8, n_nearest_shown=4, n_neighbours=2)
    result = evaluate(checkpoint, shards, tmp_path, config)
    assert set(result.sample_grids) == {"ema", "raw"}
    assert result.samples_path == result.sample_grids["ema"]
    from PIL import Image

    with Image.open(result.sample_grids["raw"]) as grid:  # 8 x 8 images of 32 px, 2 px padding
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)
    with Image.open(result.nearest_path) as grid:  # 4 rows: generated + 2 nearest
        assert grid.size == (3 * 34 + 2, 4 * 34 + 2)
    with Image.open(result.interpolation_path) as strip:
        assert strip.size == (
            config.interpolation_steps * 34 + 2,
            config.interpolation_rows * 34 + 2,
        )
    assert result.metrics["fid"] is None and result.fid_record["computed"] is False
    assert "looked for" in result.fid_record["reason"] and result.fid_record["how_to_supply"]
    assert result.type_record["computed"] is False and "type" in result.type_record["reason"]
    # Evaluating writes no promotion history; its callers (the evaluate_dcgan asset and
    # `carmodels evaluate`) record each evaluation, as here.
    assert not (tmp_path / HISTORY_FILE).exists() and not (tmp_path / "history.png").exists()
    record_evaluation(result.metrics_path, tmp_path)
    again = evaluate(checkpoint, shards, tmp_path, config)
    assert len(read_history(tmp_path / HISTORY_FILE)) == 1
    record_evaluation(again.metrics_path, tmp_path)
    history = read_history(tmp_path / HISTORY_FILE)
    assert len(history) == 2 and (tmp_path / "history.png").stat().st_size > 0


def test_the_evaluate_command_records_the_history(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, shards = run
    args = ["evaluate", "--checkpoint", str(checkpoint), "--shards", str(shards)]
    args += ["--out", str(tmp_path), "--n-samples", "8", "--no-fid", "--offline"]
    for _ in range(2):
        assert main(args) == 0
    assert "samples:" in capsys.readouterr().out
    history = read_history(tmp_path / HISTORY_FILE)
    assert len(history) == 2 and (tmp_path / "history.png").stat().st_size > 0
    assert set(history["checkpoint"]) == {str(checkpoint)}


def test_learned_metrics_with_labels_and_inception_weights(
    tmp_path: Path,
    random_inception: Path,  # noqa: F811
) -> None:
    torch.set_num_threads(1)
    shards = write_labelled_shards(tmp_path / "shards")
    trained = train(
        shards,
        tmp_path / "run",
        TrainConfig(preset="tiny", image_size=16, epochs=1, batch_size=8, device="cpu"),
    )
    config = _config(n_samples=8, fid_samples=6)
    config.fid_config.weights_path = str(random_inception)
    result = evaluate(trained.checkpoint_path, shards, tmp_path / "eval", config)
    for name in LEARNED_METRICS - {"judge_make_accuracy", "judge_key"}:
        assert result.metrics[name] is not None and math.isfinite(result.metrics[name]), name
    assert result.metrics["judge_make_accuracy"] is None  # these shards have no make column
    assert result.metrics["judge_key"] == result.type_record["judge_key"]
    assert result.fid_record["n_generated"] == 6 and result.fid_record["n_real"] == 6
    assert result.fid_record["real_split"] == "val"
    on_disk = json.loads(result.metrics_path.read_text())
    assert on_disk["fid_record"]["weights"]["sha256"] == result.fid_record["weights"]["sha256"]
    assert on_disk["type_record"]["classifier_n_val"] == 12
