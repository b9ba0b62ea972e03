"""How well the generator restores held-out photos, next to simple classical baselines.

Each chosen validation image (at the shards' resolution) is damaged in four ways, restored
with :func:`carmodels.restore.restore` and with a baseline, and scored against the original
with PSNR and SSIM (torchmetrics, pixels in [0, 1]):

========================  =================================  ==============================
case                      damage                             baseline
========================  =================================  ==============================
inpaint                   ~20% of pixels lost (blocks on     OpenCV Telea inpainting
                          even images, strokes on odd ones)  (``cv2.inpaint``)
denoise                   Gaussian noise, sigma 0.1          Gaussian blur (``cv2``)
upscale from 32 / 64 px   area downsampling to 32 / 64 px    bicubic upscaling (``cv2``)
========================  =================================  ==============================

The damaged input itself is scored too (where it has the output's size), so every table
shows what each method gains. Everything is seeded: the same checkpoint, data and config
give the same table on one device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from carmodels.checkpoint import load_generator
from carmodels.device import resolve_device
from carmodels.io import atomic_save_image, atomic_write_bytes, atomic_write_json
from carmodels.restore import (
    DEFAULT_FINETUNE_STEPS,
    RestoreConfig,
    RestoreResult,
    damage_mask,
    restore,
)
from carmodels.shards import load_images

METRICS_NAME = "metrics.json"
TABLE_NAME = "table.md"
PREVIEW_NAME = "preview.png"
#: Column titles of the preview, in the order of the images in each row.
PREVIEW_COLUMNS = ("original", "damaged", "baseline", "generator", "generator + fine-tune")

METHOD_DAMAGED = "damaged input"
METHOD_GENERATOR = "generator (z search)"
METHOD_FINETUNED = "generator (z search + fine-tune)"


@dataclass(frozen=True)
class RestorationEvalConfig:
    """Which images, which damage, which baselines, and how the generator restores."""

    n_images: int = field(default=8, metadata={"help": "validation images"})
    split: str = "val"
    seed: int = field(
        default=0,
        metadata={"help": "seed of the damage (masks and noise); the restoration has its own seed"},
    )
    hole_fraction: float = 0.2
    #: Standard deviation of the added noise, pixels in [0, 1].
    noise_sigma: float = 0.1
    #: Standard deviation (pixels) of the Gaussian-blur denoising baseline.
    blur_sigma: float = 1.0
    #: Neighbourhood radius (pixels) of the Telea inpainting baseline.
    telea_radius: int = 5
    #: Low resolutions (square side, pixels) the upscaling cases start from.
    upscale_from: tuple[int, ...] = (32, 64)
    #: The "+ fine-tune" rows use ``restore.finetune_steps``; 0 leaves them out.
    restore: RestoreConfig = field(
        default_factory=lambda: RestoreConfig(finetune_steps=DEFAULT_FINETUNE_STEPS)
    )
    #: Images shown in the preview (each as one row per case).
    preview_images: int = 2

    def __post_init__(self) -> None:
        if self.n_images < 1:
            raise ValueError(f"RestorationEvalConfig.n_images must be >= 1, got {self.n_images}")
        if self.noise_sigma <= 0 or self.blur_sigma <= 0 or self.telea_radius < 1:
            raise ValueError("noise_sigma and blur_sigma must be positive, telea_radius >= 1")


@dataclass
class RestorationEvalResult:
    out_dir: Path
    #: One row per (case, method): mean PSNR (dB) and SSIM over the images.
    table: pd.DataFrame
    metrics_path: Path
    table_path: Path
    preview_path: Path
    n_images: int
    image_size: int
    model_size: int
    elapsed_s: float


@dataclass(frozen=True)
class _Case:
    name: str
    task: str
    low_size: int | None = None  # upscale only


@dataclass
class _Outcome:
    """One image's damaged version and each method's output, all at the original's size."""

    damaged: np.ndarray
    baseline_name: str
    baseline: np.ndarray
    generator: np.ndarray
    finetuned: np.ndarray | None
    score_damaged: bool


def _cases(image_size: int, config: RestorationEvalConfig) -> list[_Case]:
    cases = [_Case("inpaint", "inpaint"), _Case(f"denoise (sigma {config.noise_sigma})", "denoise")]
    for low in config.upscale_from:
        if low < image_size and image_size % low == 0:
            cases.append(_Case(f"upscale x{image_size // low} from {low} px", "upscale", low))
    return cases


def _run_case(
    generator: torch.nn.Module,
    original: np.ndarray,
    case: _Case,
    index: int,
    config: RestorationEvalConfig,
) -> _Outcome:
    import cv2

    size = original.shape[0]
    damage_seed = config.seed * 1_000_003 + index
    restore_config = config.restore
    if case.task == "inpaint":
        kind = "blocks" if index % 2 == 0 else "strokes"
        damaged_mask = damage_mask(size, size, damage_seed, kind, config.hole_fraction)
        damaged = original.copy()
        damaged[damaged_mask] = 0
        baseline = cv2.inpaint(
            damaged, damaged_mask.astype(np.uint8) * 255, config.telea_radius, cv2.INPAINT_TELEA
        )
        result = restore(generator, damaged, "inpaint", damaged_mask, restore_config)
        return _Outcome(damaged, "OpenCV Telea", baseline, *_split(result), True)
    if case.task == "denoise":
        rng = np.random.default_rng(damage_seed)
        noise = rng.normal(0.0, config.noise_sigma * 255.0, original.shape)
        damaged = np.clip(original + noise, 0, 255).round().astype(np.uint8)
        baseline = cv2.GaussianBlur(damaged, (0, 0), config.blur_sigma)
        result = restore(generator, damaged, "denoise", None, restore_config)
        return _Outcome(damaged, "Gaussian blur", baseline, *_split(result), True)
    assert case.low_size is not None
    low = cv2.resize(original, (case.low_size, case.low_size), interpolation=cv2.INTER_AREA)
    baseline = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    restore_config = replace(restore_config, upscale_factor=size // case.low_size)
    result = restore(generator, low, "upscale", None, restore_config)
    shown = cv2.resize(low, (size, size), interpolation=cv2.INTER_NEAREST)
    return _Outcome(shown, "bicubic", baseline, *_split(result), False)


def _split(result: RestoreResult) -> tuple[np.ndarray, np.ndarray | None]:
    """The z-search-only restoration, and the fine-tuned one when fine-tuning ran."""
    if result.image_before_finetune is None:
        return result.image, None
    return result.image_before_finetune, result.image


def _scores(outputs: np.ndarray, originals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of N x H x W x 3 uint8 outputs against the originals."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    def prepare(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0

    preds, target = prepare(outputs), prepare(originals)
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    return psnr.numpy(), ssim.numpy()


def evaluate_restoration(
    checkpoint_path: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: RestorationEvalConfig | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RestorationEvalResult:
    """Score restoration on ``n_images`` images of ``split``; write metrics, table and preview."""
    config = config or RestorationEvalConfig()
    started = time.monotonic()
    out = Path(out_dir)
    generator, spec, meta = load_generator(
        checkpoint_path, device=str(resolve_device(config.restore.device))
    )
    images = load_images(shards_dir, split=config.split)
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"shards under {shards_dir} are not square: {tuple(images.shape[-2:])}")
    # Evenly spaced over the split, so a few images still span all of it.
    chosen = np.unique(np.linspace(0, len(images) - 1, min(config.n_images, len(images))).round())
    originals = [images[int(i)].permute(1, 2, 0).numpy() for i in chosen]
    size = originals[0].shape[0]
    cases = _cases(size, config)

    outcomes: dict[str, list[_Outcome]] = {case.name: [] for case in cases}
    total, done = len(originals) * len(cases), 0
    for index, original in enumerate(originals):
        for case in cases:
            outcomes[case.name].append(_run_case(generator, original, case, index, config))
            done += 1
            if on_progress is not None:
                on_progress(done, total)

    table = _table(cases, outcomes, np.stack(originals))
    metrics = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_epoch": int(meta["epoch"]),
        "weights": meta["weights"],
        "model_image_size": spec.image_size,
        "image_size": size,
        "n_images": len(originals),
        "config": asdict(config),
        "rows": table.to_dict(orient="records"),
    }
    metrics_path = atomic_write_json(out / METRICS_NAME, metrics)
    table_path = atomic_write_bytes(out / TABLE_NAME, (format_table(table) + "\n").encode())
    preview_path = _save_preview(
        out / PREVIEW_NAME, cases, outcomes, originals[: config.preview_images]
    )
    return RestorationEvalResult(
        out_dir=out,
        table=table,
        metrics_path=metrics_path,
        table_path=table_path,
        preview_path=preview_path,
        n_images=len(originals),
        image_size=size,
        model_size=spec.image_size,
        elapsed_s=time.monotonic() - started,
    )


def _table(
    cases: list[_Case], outcomes: dict[str, list[_Outcome]], originals: np.ndarray
) -> pd.DataFrame:
    rows = []
    for case in cases:
        results = outcomes[case.name]
        methods: list[tuple[str, list[np.ndarray]]] = []
        if results[0].score_damaged:
            methods.append((METHOD_DAMAGED, [r.damaged for r in results]))
        methods.append((f"baseline: {results[0].baseline_name}", [r.baseline for r in results]))
        methods.append((METHOD_GENERATOR, [r.generator for r in results]))
        if results[0].finetuned is not None:
            methods.append((METHOD_FINETUNED, [r.finetuned for r in results]))  # type: ignore[misc]
        for method, outputs in methods:
            psnr, ssim = _scores(np.stack(outputs), originals)
            rows.append(
                {
                    "case": case.name,
                    "method": method,
                    "psnr_db": round(float(psnr.mean()), 2),
                    "ssim": round(float(ssim.mean()), 4),
                    "n": len(outputs),
                }
            )
    return pd.DataFrame(rows, columns=["case", "method", "psnr_db", "ssim", "n"])


def format_table(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, the best PSNR of each case in bold."""
    lines = ["| case | method | PSNR (dB) | SSIM |", "|---|---|---:|---:|"]
    for _, group in table.groupby("case", sort=False):
        best_psnr, best_ssim = group["psnr_db"].max(), group["ssim"].max()
        for row in group.itertuples():
            psnr = f"**{row.psnr_db:.2f}**" if row.psnr_db == best_psnr else f"{row.psnr_db:.2f}"
            ssim = f"**{row.ssim:.4f}**" if row.ssim == best_ssim else f"{row.ssim:.4f}"
            lines.append(f"| {row.case} | {row.method} | {psnr} | {ssim} |")
    return "\n".join(lines)


def _save_preview(
    path: Path,
    cases: list[_Case],
    outcomes: dict[str, list[_Outcome]],
    originals: list[np.ndarray],
) -> Path:
    """A labelled sheet: per shown image and case, one row of PREVIEW_COLUMNS."""
    from PIL import Image, ImageDraw

    size, gap, label_w, header_h = originals[0].shape[0], 4, 170, 20
    rows = [(index, case) for index in range(len(originals)) for case in cases]
    sheet = Image.new(
        "RGB",
        (label_w + len(PREVIEW_COLUMNS) * (size + gap), header_h + len(rows) * (size + gap)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(PREVIEW_COLUMNS):
        draw.text((label_w + column * (size + gap) + 2, 4), title, fill="black")
    for row, (index, case) in enumerate(rows):
        outcome = outcomes[case.name][index]
        top = header_h + row * (size + gap)
        draw.text((4, top + size // 2 - 12), f"image {index}", fill="black")
        draw.text((4, top + size // 2), case.name, fill="black")
        tiles = [originals[index], outcome.damaged, outcome.baseline, outcome.generator]
        if outcome.finetuned is not None:
            tiles.append(outcome.finetuned)
        for column, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile), (label_w + column * (size + gap), top))
    return atomic_save_image(path, sheet)
