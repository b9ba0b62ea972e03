"""Validate the judge (the offline car classifier behind ``judge_fd``) the way FID was validated.

Heusel et al. (2017, fig. 1) showed that FID rises with every level of four disturbances of real
images. This benchmark does the same for the judge, on real photos:

1. The photos of ``--images DIR`` (a folder with ``manifest.csv``: ``image``, ``make``,
   ``type``, ...) go through carmodels' own stages into 128 px shards, 80/20 train/val.
2. The judge is trained on the train split (:func:`carmodels.classifier.train_classifier`,
   cached in ``--judge-cache``, shared with the other scripts that judge), and its type and
   make accuracy are measured on the val split.
3. The floor: the Fréchet distance between the judge's features of real val and real train
   photos.
4. Four disturbances of the val photos at four increasing levels each (Gaussian noise mixed in,
   Gaussian blur, five black rectangles, swirl). Each of the 16 levels must give a larger
   distance to the train photos than the level before it (the first: than the floor).
5. Ranking: the judge must rank real generators the way a person does. Given ``--models``
   (checkpoints, worst first, as a person ranked their sample grids), each must score a larger
   ``judge_fd`` than the next. Without ``--models`` the benchmark trains the pair the issue
   describes on the same shards (``small`` preset, 64 px, equal images seen): one without
   DiffAugment, whose discriminator memorises the photos and whose samples are blobs, and one
   with DiffAugment (colour, translation, cutout), which draws cars; their grids are written
   beside the JSON for a person to check the order. Given ``--pairs FILE`` as well (a CSV of
   generators a person ranked in pairs, the better first: ``bench/person_pairs.csv`` holds the
   recipe study's), the better one of every pair must score the lower ``judge_fd``.

KID and precision/recall/density/coverage in the same features are reported for every level and
model. The thresholds are fixed in advance (strictly rising, and the blob model worse); nothing is
tuned on the reported photos. Exit status 1 when a step is not monotone or a ranking is wrong.

Last line::

    judge: monotone M/16 steps, floor F, accuracy A

Usage: ``python bench/judge.py [--images DIR] [--work DIR] [--models WORSE.pt BETTER.pt]
[--pairs CSV] [--judge-cache DIR] [--json PATH]``
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when a test loads this

from _common import (  # noqa: E402
    SHARED_DATA,
    RealReference,
    add_judge_cache_option,
    build_sample_shards,
    lacks_manifest,
    score_generator,
    study_judge,
    write_report,
)

from carmodels.checkpoint import load_checkpoint  # noqa: E402
from carmodels.classifier import TrainedClassifier  # noqa: E402
from carmodels.errors import InputError  # noqa: E402
from carmodels.metrics.domain import feature_scores  # noqa: E402
from carmodels.pictures import save_image_grid  # noqa: E402
from carmodels.shards import load_images  # noqa: E402
from carmodels.train import TrainConfig, train  # noqa: E402

DEFAULT_IMAGES = SHARED_DATA / "cars-train-6k"
IMAGE_SIZE = 128
#: The four disturbances and their levels, weakest first (Heusel et al.'s kinds; the levels
#: span "barely visible" to "badly damaged" at 128 px and were fixed before any run).
LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.05, 0.15, 0.3, 0.5),  # share of Gaussian noise mixed into the image
    "blur": (0.75, 1.5, 3.0, 6.0),  # Gaussian sigma in pixels
    "rectangles": (0.08, 0.16, 0.24, 0.32),  # side of each of 5 black squares / image side
    "swirl": (0.5, 1.0, 2.0, 4.0),  # swirl strength (radians at the centre)
}
N_RECTANGLES = 5
#: The reference pair trained without --models: the issue's setting (small preset, 64 px).
REFERENCE_PRESET = "small"
REFERENCE_SIZE = 64
REFERENCE_IMAGES_SEEN = 86_000  # 40 epochs of the 2,144 photos
REFERENCE_RECIPES = {"blobs": "", "cars": "color,translation,cutout"}
#: The columns of a --pairs file: two checkpoints (paths inside --work, where bench/quality.py
#: keeps its runs), the weights of each whose grid a person looked at, and what they saw.
PAIR_COLUMNS = ("better", "better_weights", "worse", "worse_weights", "seen")
WEIGHTS = ("ema", "raw")


@dataclass(frozen=True)
class PersonPair:
    """Two generators as a person ranked their sample grids, the better first."""

    better: Path
    better_ema: bool
    worse: Path
    worse_ema: bool
    seen: str


def disturb(images: torch.Tensor, kind: str, level: float, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8, N x 3 x S x S) with one disturbance at one level, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    x = images.float() / 255
    side = x.shape[-1]
    if kind == "noise":
        noise = (0.5 + 0.25 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        x = (1 - level) * x + level * noise
    elif kind == "blur":
        radius = math.ceil(3 * level)
        x = gaussian_blur(x, [2 * radius + 1, 2 * radius + 1], [level, level])
    elif kind == "rectangles":
        square = max(1, round(level * side))
        corners = torch.randint(
            0, side - square + 1, (len(x), N_RECTANGLES, 2), generator=generator
        )
        x = x.clone()
        for i, image_corners in enumerate(corners.tolist()):
            for top, left in image_corners:
                x[i, :, top : top + square, left : left + square] = 0
    elif kind == "swirl":
        x = _swirl(x, level)
    else:
        raise ValueError(f"unknown disturbance {kind!r}")
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _swirl(x: torch.Tensor, strength: float) -> torch.Tensor:
    """scikit-image's swirl about the centre: a point at distance r turns by
    ``strength * exp(-r / radius)`` with radius = side / 4 (in grid units, ln 2 folded in)."""
    side = x.shape[-1]
    coords = torch.linspace(-1, 1, side)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    rho = torch.sqrt(xx**2 + yy**2)
    theta = torch.atan2(yy, xx) + strength * torch.exp(-rho / (0.5 / math.log(2)))
    grid = torch.stack([rho * torch.cos(theta), rho * torch.sin(theta)], dim=-1)
    grid = grid.expand(len(x), side, side, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _features(judge: TrainedClassifier, images: torch.Tensor) -> np.ndarray:
    return judge.features_and_predictions(images)[0]


def disturbance_study(
    judge: TrainedClassifier, train_features: np.ndarray, val: torch.Tensor, out: Path
) -> tuple[dict[str, Any], int, float]:
    """Scores of every level against the train photos, the monotone step count and the floor."""
    floor_scores = feature_scores(train_features, _features(judge, val))
    rows: dict[str, Any] = {"floor": floor_scores}
    monotone = 0
    examples = []
    for kind, levels in LEVELS.items():
        previous = floor_scores["judge_fd"]
        rows[kind] = []
        for level in levels:
            disturbed = disturb(val, kind, level)
            scores = feature_scores(train_features, _features(judge, disturbed))
            rising = scores["judge_fd"] > previous
            monotone += rising
            rows[kind].append({"level": level, "rising": rising, **scores})
            print(
                f"  {kind:<10} level {level:<5} judge_fd {scores['judge_fd']:9.3f}"
                f" kid {scores['judge_kid']:.4f} precision {scores['judge_precision']:.3f}"
                f" recall {scores['judge_recall']:.3f} {'rises' if rising else 'DOES NOT RISE'}",
                flush=True,
            )
            previous = scores["judge_fd"]
            examples.append(disturbed[:1])
    save_image_grid(torch.cat(examples).float().div(127.5).sub(1), out / "disturbances.png", nrow=4)
    return rows, monotone, floor_scores["judge_fd"]


def train_reference_models(shards_dir: Path, work: Path, n_train: int) -> list[Path]:
    """The blob model and the car model (worst first), trained once and kept in ``work``."""
    epochs = max(1, round(REFERENCE_IMAGES_SEEN / n_train))
    paths = []
    for name, policy in REFERENCE_RECIPES.items():
        run_dir = work / "reference" / name
        done = run_dir / "checkpoints" / "latest.pt"
        if not done.is_file():
            started = time.perf_counter()
            config = TrainConfig(
                preset=REFERENCE_PRESET,
                image_size=REFERENCE_SIZE,
                epochs=epochs,
                batch_size=64,
                device="cpu",
                diffaugment=policy,
                tensorboard=False,
                keep_last=1,
                keep_best=False,
                sample_every=epochs,
            )
            result = train(shards_dir, run_dir, config, log=lambda message: None)
            assert result.checkpoint_path is not None
            done = result.checkpoint_path
            print(f"  trained {name}: {epochs} epochs in {time.perf_counter() - started:.0f} s")
        paths.append(done)
    return paths


def rank_models(
    reference: RealReference, models: list[Path], out: Path
) -> tuple[list[dict[str, Any]], bool]:
    """Each model's scores against the val photos at its own size; whether they rise in
    ``judge_fd`` from the last model to the first (the worst must score the largest)."""
    rows = []
    for path in models:
        grid = out / f"model-{len(rows)}.png"
        scores = score_generator(reference, path, grid, seed=0)
        rows.append({"checkpoint": str(path), "grid": str(grid), **scores})
        print(f"  model {path}: judge_fd {scores['judge_fd']:.3f}, grid {grid}", flush=True)
    fds = [row["judge_fd"] for row in rows]
    ranked = all(a > b for a, b in zip(fds, fds[1:], strict=False))
    return rows, ranked


def read_pairs(path: Path, root: Path) -> list[PersonPair]:
    """The pairs of a CSV with :data:`PAIR_COLUMNS`, their checkpoints inside ``root``; an
    :class:`InputError` naming the file, the line and the fix for anything unusable."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(
            f"--pairs {path}: cannot read it ({error}); give a CSV of {', '.join(PAIR_COLUMNS)}"
        ) from None
    missing = [column for column in PAIR_COLUMNS if not rows or column not in rows[0]]
    if missing:
        raise InputError(
            f"--pairs {path} needs a header row with {', '.join(PAIR_COLUMNS)} and one pair a "
            f"line; {'missing: ' + ', '.join(missing) if rows else 'it has no pairs'}"
        )
    pairs = []
    for line, row in enumerate(rows, start=2):
        checkpoints, ema = {}, {}
        for side in ("better", "worse"):
            weights = (row[f"{side}_weights"] or "").strip()
            if weights not in WEIGHTS:
                raise InputError(
                    f"--pairs {path} line {line}: {side}_weights is {weights!r}; write ema or raw"
                )
            checkpoints[side] = root / (row[side] or "").strip()
            if not checkpoints[side].is_file():
                raise InputError(
                    f"--pairs {path} line {line}: {checkpoints[side]} is missing; pass as --work "
                    "the folder bench/quality.py --work trained these runs in"
                )
            ema[side] = weights == "ema"
        pairs.append(
            PersonPair(
                checkpoints["better"],
                ema["better"],
                checkpoints["worse"],
                ema["worse"],
                (row["seen"] or "").strip(),
            )
        )
    return pairs


def check_pair_weights(pairs: list[PersonPair]) -> None:
    """An :class:`InputError` where a pair's file is not a checkpoint, or asks for the EMA
    weights of a run that kept none (scoring its raw weights instead would score another grid
    than the person saw)."""
    kept_ema: dict[Path, bool] = {}
    for number, pair in enumerate(pairs, start=1):
        for checkpoint, ema in ((pair.better, pair.better_ema), (pair.worse, pair.worse_ema)):
            if checkpoint not in kept_ema:
                kept_ema[checkpoint] = load_checkpoint(checkpoint)["ema_generator"] is not None
            if ema and not kept_ema[checkpoint]:
                raise InputError(
                    f"--pairs: pair {number}'s {checkpoint} kept no EMA weights; write raw for "
                    "it, if its raw weights are what the person ranked"
                )


def rank_pairs(
    reference: RealReference, pairs: list[PersonPair], out: Path
) -> tuple[list[dict[str, Any]], int]:
    """Each pair's two scores against the val photos (a generator in several pairs is scored
    once), and how many pairs the judge puts in the person's order (the better one lower)."""
    scored: dict[tuple[Path, bool], dict[str, Any]] = {}

    def scores_of(checkpoint: Path, ema: bool) -> dict[str, Any]:
        if (checkpoint, ema) not in scored:
            grid = out / f"pair-model-{len(scored)}.png"
            scored[checkpoint, ema] = {
                "checkpoint": str(checkpoint),
                "weights": "ema" if ema else "raw",
                "grid": str(grid),
                **score_generator(reference, checkpoint, grid, seed=0, ema=ema),
            }
        return scored[checkpoint, ema]

    rows, in_order = [], 0
    for number, pair in enumerate(pairs, start=1):
        better = scores_of(pair.better, pair.better_ema)
        worse = scores_of(pair.worse, pair.worse_ema)
        right = better["judge_fd"] < worse["judge_fd"]
        in_order += right
        rows.append({"better": better, "worse": worse, "seen": pair.seen, "in_order": right})
        print(
            f"  pair {number}: better {better['judge_fd']:.2f} < worse {worse['judge_fd']:.2f}: "
            f"{'right' if right else 'WRONG'} ({pair.seen})",
            flush=True,
        )
    return rows, in_order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="photos + manifest")
    parser.add_argument("--work", type=Path, help="keep shards and reference models here")
    parser.add_argument(
        "--models", type=Path, nargs="+", help="checkpoints, worst first (default: train a pair)"
    )
    parser.add_argument(
        "--pairs",
        type=Path,
        help="also rank these pairs of generators as a person did: a CSV of "
        f"{', '.join(PAIR_COLUMNS)}, checkpoints inside --work (bench/person_pairs.csv: the "
        "recipe study's, for its --work folder)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=IMAGE_SIZE,
        help="side the judge works at: 128, or 64 for the judge of 64 px generators (the "
        "photos are scaled down to it)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_judge_cache_option(parser)
    args = parser.parse_args(argv)
    if lacks_manifest(args.images, "judge"):
        return 2
    pairs: list[PersonPair] = []
    if args.pairs:
        if args.work is None:
            print("judge: --pairs needs --work, the folder its checkpoints are in", file=sys.stderr)
            return 2
        try:
            pairs = read_pairs(args.pairs, args.work)
            check_pair_weights(pairs)
        except InputError as error:
            print(f"judge: {error}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        out = args.json.parent if args.json else work
        started = time.perf_counter()
        shards_dir, source = build_sample_shards(args.images, work, IMAGE_SIZE)
        print(f"judge: {source}", flush=True)
        judge_started = time.perf_counter()
        judge = study_judge(shards_dir, args.judge_cache, args.size)
        judge_s = time.perf_counter() - judge_started
        train_images = load_images(shards_dir, "train")
        val = load_images(shards_dir, "val")
        train_features = _features(judge, train_images)
        levels, monotone, floor = disturbance_study(judge, train_features, val, out)
        models = args.models or train_reference_models(shards_dir, work, len(train_images))
        # One reference for both: the val photos are judged once at each generator's side.
        reference = RealReference(judge, shards_dir)
        ranking, ranked = rank_models(reference, models, out)
        pair_rows, pairs_in_order = rank_pairs(reference, pairs, out)
        accuracy = judge.val_accuracy or 0.0
        figures = {
            "source": source,
            "n_train": len(train_images),
            "n_val": len(val),
            "judge_key": judge.key,
            "judge_side": judge.image_size,
            "judge_from_cache": judge.from_cache,
            "judge_train_s": judge_s,
            "accuracies": judge.accuracies,
            "classes": {label: len(names) for label, names in judge.classes.items()},
            "floor": floor,
            "levels": levels,
            "monotone_steps": monotone,
            "steps": sum(len(v) for v in LEVELS.values()),
            "models_given": bool(args.models),
            "ranking": ranking,
            "ranked_right": ranked,
            "pairs_file": str(args.pairs) if args.pairs else None,
            "pairs": pair_rows,
            "pairs_in_order": pairs_in_order,
            "total_s": time.perf_counter() - started,
        }
        if args.json:
            write_report(args.json, args, **figures)
    make = judge.accuracies.get("make")
    fds = " > ".join(f"{row['judge_fd']:.2f}" for row in ranking)
    shown_make = "n/a" if make is None else f"{make:.3f}"
    print(
        f"judge: ranking {'right' if ranked else 'WRONG'} ({fds}, worst first); "
        f"make accuracy {shown_make}"
    )
    if pairs:
        print(f"judge: pairs {pairs_in_order}/{len(pairs)} in a person's order ({args.pairs})")
    print(f"judge: monotone {monotone}/16 steps, floor {floor:.3f}, accuracy {accuracy:.3f}")
    return 0 if monotone == 16 and ranked and pairs_in_order == len(pairs) else 1


if __name__ == "__main__":
    sys.exit(main())
