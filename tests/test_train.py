"""Training loop: artefacts, safe checkpoints, exact resume, divergence detection, benchmark."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from carmodels.augment import ADA_IMAGES_TO_FULL
from carmodels.train import (
    HISTORY_COLUMNS,
    TrainConfig,
    TrainingDiverged,
    epoch_permutation,
    is_collapse,
    load_checkpoint,
    load_generator,
    read_history,
    train,
)
from carmodels.train.step import TrainStep
from tests.conftest import write_blocky_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32


def write_shards(shards_dir: Path, n_images: int, size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """Blocky random-colour images in one shard; every 5th image goes to the val split."""
    splits = ["val" if i % 5 == 0 else "train" for i in range(n_images)]
    return write_blocky_shards(shards_dir, splits, size=size, seed=seed)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), n_images=40)


def tiny_config(**overrides: object) -> TrainConfig:
    base = TrainConfig(
        preset="tiny",
        image_size=IMAGE_SIZE,
        epochs=2,
        batch_size=8,
        max_steps_per_epoch=3,
        log_every_steps=2,
        device="cpu",
        seed=7,
    )
    return replace(base, **overrides)


def test_train_writes_every_artefact(shards: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    result = train(
        shards,
        tmp_path,
        tiny_config(epochs=3, keep_last=2),
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert result.epochs_completed == 3 and result.steps == 9
    assert progress[-1] == (9, 9)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # Pruned to the last 2 epochs, plus latest and best (links, never pruned).
    assert checkpoints == ["best.pt", "epoch-0002.pt", "epoch-0003.pt", "latest.pt"]
    assert result.best_checkpoint_path == tmp_path / "checkpoints" / "best.pt"
    best_epoch = load_checkpoint(result.best_checkpoint_path)["best"]["epoch"]
    with open(result.history_path, newline="") as f:
        epoch_rows = [r for r in csv.DictReader(f) if r["sample_fd"]]
    assert [int(float(r["epoch"])) for r in epoch_rows] == [1, 2, 3]
    fds = [float(r["sample_fd"]) for r in epoch_rows]
    assert best_epoch == 1 + fds.index(min(fds))
    assert all(float(r["sample_diversity"]) > 0.0 for r in epoch_rows)
    assert result.tensorboard_dir is not None
    assert any(result.tensorboard_dir.glob("events.out.tfevents.*"))
    assert result.checkpoint_path == tmp_path / "checkpoints" / "latest.pt"
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        f"epoch-000{e}.png" for e in (1, 2, 3)
    ]
    for path in (result.grid_path, result.loss_plot_path, result.gif_path):
        assert path is not None and path.stat().st_size > 0
    with open(result.history_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == HISTORY_COLUMNS
    # Log points every 2 steps plus a flush at each epoch end (3 steps per epoch).
    assert [int(float(r["step"])) for r in rows] == [2, 3, 4, 6, 8, 9]
    assert set(result.final_losses) == {"loss_d", "loss_g", "d_x", "d_g_z"}
    assert all(np.isfinite(v) for v in result.final_losses.values())
    assert 0.0 < result.final_losses["d_x"] < 1.0
    assert result.images_per_s > 0 and result.device == "cpu"


def test_checkpoint_loads_with_weights_only(shards: Path, tmp_path: Path) -> None:
    result = train(shards, tmp_path, tiny_config(epochs=1))
    assert result.checkpoint_path is not None
    raw = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 1 and raw["step"] == 3
    assert raw["config"]["preset"] == "tiny" and raw["spec"]["image_size"] == IMAGE_SIZE
    assert len(raw["data_version"]) == 16
    assert {"generator", "discriminator", "opt_g", "opt_d", "ema_generator", "rng"} <= set(raw)
    assert torch.equal(
        load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")["generator"][
            "project.0.weight"
        ],
        raw["generator"]["project.0.weight"],
    )

    ema_g, spec, meta = load_generator(result.checkpoint_path, ema=True)
    raw_g, _, raw_meta = load_generator(result.checkpoint_path, ema=False)
    assert meta["weights"] == "ema" and raw_meta["weights"] == "generator"
    assert spec.image_size == IMAGE_SIZE and not ema_g.training
    z = torch.randn(2, spec.nz)
    assert ema_g(z).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not torch.equal(ema_g(z), raw_g(z))  # the average differs from the last weights


def _state(checkpoint_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    checkpoint = load_checkpoint(checkpoint_path)
    return {k: checkpoint[k] for k in ("generator", "discriminator", "ema_generator")}


def test_resume_is_exact(shards: Path, tmp_path: Path) -> None:
    straight = train(shards, tmp_path / "straight", tiny_config(epochs=2))
    train(shards, tmp_path / "resumed", tiny_config(epochs=1))
    resumed = train(shards, tmp_path / "resumed", tiny_config(epochs=2), resume=True)
    assert resumed.steps == straight.steps == 6
    expected, actual = _state(straight.checkpoint_path), _state(resumed.checkpoint_path)
    for model in expected:
        for name, tensor in expected[model].items():
            assert torch.equal(tensor, actual[model][name]), f"{model}.{name} differs"
    # The history is carried across the resume too.
    assert straight.history_path.read_text().count("\n") == resumed.history_path.read_text().count(
        "\n"
    )


def test_resume_is_exact_with_augmentation_and_smoothing(shards: Path, tmp_path: Path) -> None:
    options = {"diffaugment": "color,translation,cutout", "label_smoothing": 0.1}
    straight = train(shards, tmp_path / "straight", tiny_config(epochs=2, **options))
    plain = train(shards, tmp_path / "plain", tiny_config(epochs=2))
    train(shards, tmp_path / "resumed", tiny_config(epochs=1, **options))
    resumed = train(shards, tmp_path / "resumed", tiny_config(epochs=2, **options), resume=True)
    expected, actual = _state(straight.checkpoint_path), _state(resumed.checkpoint_path)
    for name, tensor in expected["generator"].items():
        assert torch.equal(tensor, actual["generator"][name]), name
    # The options change training (else this test could not tell them apart).
    weight = "project.0.weight"
    assert not torch.equal(
        expected["generator"][weight], _state(plain.checkpoint_path)["generator"][weight]
    )


def test_resume_is_exact_with_adaptive_augmentation(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A target D's untrained outputs exceed and a fast controller, so p moves in 6 steps.
    monkeypatch.setattr("carmodels.augment.ADA_IMAGES_TO_FULL", 1_000)
    options = {"diffaugment": "color,translation,cutout", "diffaugment_target": -0.99}
    straight = train(shards, tmp_path / "straight", tiny_config(epochs=2, **options))
    train(shards, tmp_path / "resumed", tiny_config(epochs=1, **options))
    resumed = train(shards, tmp_path / "resumed", tiny_config(epochs=2, **options), resume=True)
    expected, actual = _state(straight.checkpoint_path), _state(resumed.checkpoint_path)
    for name, tensor in expected["generator"].items():
        assert torch.equal(tensor, actual["generator"][name]), name
    # p is in the checkpoint and the history, and moved: the resumed run went on from it.
    probabilities = [row["augment_p"] for row in read_history(straight.history_path)]
    assert probabilities == [row["augment_p"] for row in read_history(resumed.history_path)]
    assert len(set(probabilities)) > 1
    assert load_checkpoint(straight.checkpoint_path)["augment_probability"] == probabilities[-1]


def _adaptive_step() -> TrainStep:
    return TrainStep.create(
        TrainConfig(preset="tiny", image_size=IMAGE_SIZE).model_spec(),
        **TrainConfig(preset="tiny").hyperparameters(),
        device=torch.device("cpu"),
        amp_dtype=None,
        channels_last=False,
        compile=False,
        ema_decay=None,
        seed=0,
        diffaugment="color,translation,cutout",
        diffaugment_target=0.6,
    )


def test_adaptive_augmentation_moves_p_by_ada_rule() -> None:
    step = _adaptive_step()
    assert step.augment.probability == 0.0  # ADA starts without augmentation
    images = torch.randint(0, 256, (8, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for _ in range(3):
        step(images)
    stats = step.drain()
    assert stats is not None and -1.0 <= stats.real_sign <= 1.0
    moved = math.copysign(24 / ADA_IMAGES_TO_FULL, stats.real_sign - 0.6)
    assert stats.augment_p == pytest.approx(max(0.0, moved)) == step.augment.probability
    step.augment.probability = 0.25
    restored = _adaptive_step()
    restored.load_state_dict(step.state_dict())
    assert restored.augment.probability == 0.25


def test_collapse_is_a_sharp_fall_from_the_best_diversity() -> None:
    history = [{"step": 1.0}, {"step": 2.0, "sample_diversity": 0.8}, {"sample_diversity": 0.5}]
    assert not is_collapse(0.9, [], 0.5)  # nothing to compare with yet
    assert not is_collapse(0.41, history, 0.5)
    assert is_collapse(0.39, history, 0.5)


def test_new_options_are_validated() -> None:
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=0.7)
    with pytest.raises(ValueError, match="DiffAugment policy"):
        TrainConfig(diffaugment="colour")
    with pytest.raises(ValueError, match="collapse_fraction"):
        TrainConfig(collapse_fraction=1.5)


def test_different_seeds_train_differently(shards: Path, tmp_path: Path) -> None:
    a = train(shards, tmp_path / "a", tiny_config(epochs=1, seed=1))
    b = train(shards, tmp_path / "b", tiny_config(epochs=1, seed=2))
    weight = "project.0.weight"
    assert not torch.equal(
        _state(a.checkpoint_path)["generator"][weight],
        _state(b.checkpoint_path)["generator"][weight],
    )


def test_divergence_stops_and_keeps_last_good_checkpoint(shards: Path, tmp_path: Path) -> None:
    train(shards, tmp_path, tiny_config(epochs=1))
    good = tmp_path / "checkpoints" / "latest.pt"
    good_weights = load_checkpoint(good)["generator"]
    exploding = tiny_config(epochs=3, lr_g=1e30, lr_d=1e30, log_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step \d") as caught:
        train(shards, tmp_path, exploding, resume=True)
    assert caught.value.epoch == 2 and caught.value.last_checkpoint == good
    assert not (tmp_path / "checkpoints" / "epoch-0002.pt").exists()
    for name, tensor in load_checkpoint(good)["generator"].items():
        assert torch.equal(tensor, good_weights[name])
    # The history up to the failure is on disk for a post-mortem.
    assert (
        "nan" in (tmp_path / "history.csv").read_text()
        or "inf" in (tmp_path / "history.csv").read_text()
    )


def test_fresh_run_replaces_previous_outputs(shards: Path, tmp_path: Path) -> None:
    train(shards, tmp_path, tiny_config(epochs=2))
    result = train(shards, tmp_path, tiny_config(epochs=1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt",
        "epoch-0001.pt",
        "latest.pt",
    ]
    assert load_checkpoint(result.checkpoint_path)["epoch"] == 1


def test_larger_shards_are_downscaled(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "shards64", n_images=20, size=64)
    result = train(shards, tmp_path / "run", tiny_config(epochs=1))
    assert load_checkpoint(result.checkpoint_path)["spec"]["image_size"] == IMAGE_SIZE


def test_bad_inputs_give_clear_errors(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train(shards, tmp_path, tiny_config(batch_size=1000))
    with pytest.raises(ValueError, match="smaller than image_size"):
        train(shards, tmp_path, tiny_config(image_size=64))
    with pytest.raises(FileNotFoundError, match="car_shards"):
        train(tmp_path / "missing", tmp_path, tiny_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(shards, tmp_path, tiny_config(), resume=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="Unknown model preset"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")


def test_resume_rejects_a_different_model(shards: Path, tmp_path: Path) -> None:
    train(shards, tmp_path, tiny_config(epochs=1))
    with pytest.raises(ValueError, match="same preset"):
        train(shards, tmp_path, tiny_config(epochs=2, nz=16), resume=True)


def test_epoch_permutation_depends_only_on_seed_and_epoch() -> None:
    cpu = torch.device("cpu")
    first = epoch_permutation(50, seed=3, epoch=1, device=cpu)
    assert torch.equal(first, epoch_permutation(50, seed=3, epoch=1, device=cpu))
    assert not torch.equal(first, epoch_permutation(50, seed=3, epoch=2, device=cpu))
    assert sorted(first.tolist()) == list(range(50))


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "train_gpu.py"),
            "--smoke",
            "--json",
            str(report),
            "--profile",
            str(tmp_path / "profile.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert "img/s" in completed.stdout
    assert report.stat().st_size > 0
    # Where each variant's time went: a header and an operator table per variant.
    tables = (tmp_path / "profile.txt").read_text()
    variants = [v["variant"] for v in json.loads(report.read_text())["results"]]
    assert variants and all(f"== {v}: 20 steps under the profiler" in tables for v in variants)
    assert tables.count("Self CPU %") == len(variants)
