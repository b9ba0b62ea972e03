"""Restoration with the generator as prior: recovers what the generator can draw, keeps what
is known, handles any image size, rejects bad masks, reproducible; evaluation with baselines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carmodels.cli import main
from carmodels.restoration_eval import (
    METHOD_DAMAGED,
    METHOD_FINETUNED,
    METHOD_GENERATOR,
    RestorationEvalConfig,
    evaluate_restoration,
)
from carmodels.restore import (
    Letterbox,
    RestoreConfig,
    damage_mask,
    read_mask,
    restore,
    restore_file,
    to_tensor,
    to_uint8,
)
from carmodels.train import TrainConfig, load_generator, train
from tests.conftest import write_blocky_shards

SIZE = 32
#: Small enough for a 2-core CPU: a tiny 32 px generator, a few restarts and steps.
FAST = RestoreConfig(restarts=3, steps=120, lr=0.05, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: for these tiny models threads cost more than they save, badly so
    on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_shards(folder: Path, n: int = 36, n_val: int = 6, seed: int = 1) -> Path:
    """Blocky random 32 px images, the last ``n_val`` in the val split."""
    return write_blocky_shards(folder, ["train"] * (n - n_val) + ["val"] * n_val, SIZE, seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shards folder, checkpoint) of a tiny generator trained for a few steps."""
    root = tmp_path_factory.mktemp("restore")
    shards = write_shards(root / "shards")
    config = TrainConfig(
        preset="tiny",
        image_size=SIZE,
        epochs=1,
        batch_size=8,
        max_steps_per_epoch=3,
        device="cpu",
    )
    result = train(shards, root / "run", config)
    assert result.checkpoint_path is not None
    return shards, result.checkpoint_path


@pytest.fixture(scope="module")
def generator(data: tuple[Path, Path]) -> torch.nn.Module:
    return load_generator(data[1])[0]


@pytest.fixture(scope="module")
def drawable(generator: torch.nn.Module) -> np.ndarray:
    """An image the generator can draw exactly: G(z) for a known z."""
    z = torch.randn(1, generator.spec.nz, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return to_uint8(generator(z))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_inpaint_recovers_a_drawable_image_and_keeps_known_pixels(
    generator: torch.nn.Module, drawable: np.ndarray
) -> None:
    damaged_mask = damage_mask(SIZE, SIZE, seed=0, kind="blocks", fraction=0.25)
    damaged = drawable.copy()
    damaged[damaged_mask] = 0
    result = restore(generator, damaged, "inpaint", damaged_mask, FAST)
    assert result.image.shape == drawable.shape
    assert np.array_equal(result.image[~damaged_mask], drawable[~damaged_mask])
    # The holes are filled with what the generator draws there, not just plausibly.
    assert psnr(result.image, drawable) > psnr(damaged, drawable) + 10
    assert result.data_loss <= min(result.restart_losses) + 1e-9
    assert len(result.restart_losses) == FAST.restarts


def test_denoise_and_upscale_improve_on_their_input(
    generator: torch.nn.Module, drawable: np.ndarray
) -> None:
    rng = np.random.default_rng(0)
    noisy = np.clip(drawable + rng.normal(0, 25, drawable.shape), 0, 255).astype(np.uint8)
    denoised = restore(generator, noisy, "denoise", None, FAST)
    assert psnr(denoised.image, drawable) > psnr(noisy, drawable) + 3

    small = np.asarray(Image.fromarray(drawable).resize((16, 16), Image.Resampling.BOX))
    upscaled = restore(generator, small, "upscale", None, replace(FAST, upscale_factor=2))
    assert upscaled.image.shape == (SIZE, SIZE, 3)
    nearest = np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    assert psnr(upscaled.image, drawable) > psnr(nearest, drawable) + 3


def test_finetune_fits_the_known_pixels_better(
    generator: torch.nn.Module, drawable: np.ndarray
) -> None:
    # A picture the generator cannot draw exactly: fine-tuning can only help the fit.
    target = np.roll(drawable, 5, axis=1)[:, ::-1].copy()
    config = replace(FAST, steps=40, finetune_steps=40, finetune_lr=1e-3)
    result = restore(generator, target, "denoise", None, config)
    assert result.image_before_finetune is not None
    assert result.data_loss < min(result.restart_losses)
    assert psnr(result.image, target) > psnr(result.image_before_finetune, target)
    # The caller's generator is left as it was.
    assert not any(p.requires_grad for p in generator.parameters())


def test_same_seed_same_restoration(generator: torch.nn.Module, drawable: np.ndarray) -> None:
    config = replace(FAST, steps=30)
    first = restore(generator, drawable, "denoise", None, config)
    again = restore(generator, drawable, "denoise", None, config)
    other = restore(generator, drawable, "denoise", None, replace(config, seed=1))
    assert np.array_equal(first.image, again.image)
    assert torch.equal(first.z, again.z)
    assert first.restart_losses != other.restart_losses


@pytest.mark.parametrize("shape", [(50, 37), (20, 90), (64, 64), (7, 11)])
def test_any_size_is_letterboxed_and_mapped_back(
    generator: torch.nn.Module, shape: tuple[int, int]
) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    damaged = np.zeros(shape, bool)
    damaged[: shape[0] // 3, : shape[1] // 2] = True
    config = replace(FAST, steps=5, restarts=2)
    inpainted = restore(generator, image, "inpaint", damaged, config)
    assert inpainted.image.shape == image.shape
    assert np.array_equal(inpainted.image[~damaged], image[~damaged])
    upscaled = restore(generator, image, "upscale", None, replace(config, upscale_factor=3))
    assert upscaled.image.shape == (shape[0] * 3, shape[1] * 3, 3)


def test_letterbox_round_trip_keeps_the_picture() -> None:
    box = Letterbox(height=48, width=96, size=SIZE)
    assert box.content_shape == (16, 32) and box.offset == (8, 0)
    gradient = np.linspace(0, 255, 96, dtype=np.float64)[None, :, None].repeat(48, 0).repeat(3, 2)
    image = to_tensor(gradient.round().astype(np.uint8))
    canvas = box.to_canvas(image, fill=-1.0)
    assert canvas.shape == (1, 3, SIZE, SIZE)
    assert torch.all(canvas[..., :8, :] == -1.0) and torch.all(canvas[..., 24:, :] == -1.0)
    back = box.from_canvas(canvas)
    assert back.shape == image.shape
    assert (back - image).abs().mean() < 0.02  # a smooth picture survives the round trip


def test_bad_inputs_are_clear_errors(generator: torch.nn.Module, drawable: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"mask is 31x32 pixels but the image is 32x32"):
        restore(generator, drawable, "inpaint", np.zeros((32, 31), bool), FAST)
    with pytest.raises(ValueError, match="inpaint needs a mask"):
        restore(generator, drawable, "inpaint", None, FAST)
    with pytest.raises(ValueError, match="only applies to inpaint"):
        restore(generator, drawable, "denoise", np.zeros((32, 32), bool), FAST)
    with pytest.raises(ValueError, match="every pixel"):
        restore(generator, drawable, "inpaint", np.ones((32, 32), bool), FAST)
    with pytest.raises(ValueError, match="task must be"):
        restore(generator, drawable, "colourise", None, FAST)
    with pytest.raises(ValueError, match="H x W x 3"):
        restore(generator, drawable[..., 0], "denoise", None, FAST)
    with pytest.raises(ValueError, match="restarts"):
        RestoreConfig(restarts=0)


def test_damage_masks_are_seeded_and_near_the_fraction() -> None:
    for kind in ("blocks", "strokes"):
        mask = damage_mask(128, 128, seed=4, kind=kind, fraction=0.2)
        assert 0.15 <= mask.mean() <= 0.35
        assert np.array_equal(mask, damage_mask(128, 128, seed=4, kind=kind, fraction=0.2))
        assert not np.array_equal(mask, damage_mask(128, 128, seed=5, kind=kind, fraction=0.2))
    with pytest.raises(ValueError, match="kind"):
        damage_mask(8, 8, seed=0, kind="splodge")


def test_restore_file_and_cli(
    data: tuple[Path, Path], drawable: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, checkpoint = data
    photo = np.asarray(Image.fromarray(drawable).resize((45, 30)))
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    mask = np.zeros((30, 45), np.uint8)
    mask[5:15, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert np.array_equal(read_mask(tmp_path / "mask.png"), mask > 0)

    config = replace(FAST, steps=10, restarts=2)
    result = restore_file(
        checkpoint, tmp_path / "photo.jpg", "inpaint", tmp_path / "out.png", tmp_path / "mask.png",
        config,
    )  # fmt: skip
    with Image.open(tmp_path / "out.png") as out:
        assert out.size == (45, 30)
        assert np.array_equal(np.asarray(out), result.image)

    argv = ["restore", str(tmp_path / "photo.jpg"), "--checkpoint", str(checkpoint)]
    options = ["--steps", "5", "--restarts", "2", "--device", "cpu"]
    assert main([*argv, "--task", "upscale", "--out", str(tmp_path / "up.png"), *options]) == 0
    with Image.open(tmp_path / "up.png") as out:
        assert out.size == (90, 60)

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small-mask.png")
    bad = [*argv, "--task", "inpaint", "--mask", str(tmp_path / "small-mask.png")]
    assert main([*bad, "--out", str(tmp_path / "bad.png"), *options]) == 2
    assert "mask is 10x10 pixels but the image is 45x30" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_evaluation_scores_generator_and_baselines(data: tuple[Path, Path], tmp_path: Path) -> None:
    shards, checkpoint = data
    config = RestorationEvalConfig(
        n_images=2,
        upscale_from=(8, 16, 32),  # 32 is the images' own size: skipped
        restore=RestoreConfig(restarts=2, steps=10, finetune_steps=5, device="cpu"),
    )
    progress: list[tuple[int, int]] = []
    result = evaluate_restoration(
        checkpoint, shards, tmp_path, config, on_progress=lambda d, t: progress.append((d, t))
    )
    table = result.table
    assert progress[-1] == (8, 8)
    assert list(table["case"].unique()) == [
        "inpaint",
        "denoise (sigma 0.1)",
        "upscale x4 from 8 px",
        "upscale x2 from 16 px",
    ]
    methods = set(table["method"])
    assert {METHOD_DAMAGED, METHOD_GENERATOR, METHOD_FINETUNED} <= methods
    assert {
        "baseline: OpenCV Telea",
        "baseline: Gaussian blur",
        "baseline: bicubic",
    } <= methods
    assert table["psnr_db"].between(5, 100).all() and table["ssim"].between(-1, 1).all()
    assert (table["n"] == 2).all()
    # Telea and blur must beat the damage they repair on these blocky images.
    by = table.set_index(["case", "method"])
    assert (
        by.loc[("inpaint", "baseline: OpenCV Telea"), "psnr_db"]
        > by.loc[("inpaint", METHOD_DAMAGED), "psnr_db"]
    )
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["n_images"] == 2 and len(metrics["rows"]) == len(table)
    assert "| inpaint | baseline: OpenCV Telea |" in result.table_path.read_text()
    with Image.open(result.preview_path) as preview:
        assert preview.width > 5 * SIZE and preview.height > 2 * 4 * SIZE
