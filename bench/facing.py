"""Facing and view accuracy of `carmodels.facing` against hand-labelled photos.

Usage: ``python bench/facing.py [--images DIR] [--labels CSV] [--folds 5] [--write]``

The labels (``tests/data/facing_labels.csv``: image, view in left/right/front/rear) were made
by looking at 480 photos drawn at random from ``../shared/data/cars-sample`` in two rounds
(7 too unclear to call were left out). "left" means the front of the car points to the left
of the image, for side and three-quarter views alike, whichever side of the car the camera
sees; every label was checked a second time against that rule (38 corrected, see
docs/BENCHMARKS.md, "Facing labels audited").

The script computes the features of every labelled photo as the shard builder sees it (the
letterboxed content without its bars), scores the model by k-fold cross-validation (each photo
predicted by a model that never saw it), compares with the silhouette heuristic it replaces,
and with ``--write`` fits the model on all labels and saves it as the package's model.
Last line: ``facing: model A (n=N side/three-quarter), view B (n=M), heuristic C``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from carmodels import facing  # noqa: E402
from carmodels.imaging import _fit, estimate_facing_silhouette  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "cars-sample"
DEFAULT_LABELS = REPO / "tests" / "data" / "facing_labels.csv"
#: The size the shard builder fits photos into before judging their facing.
CONTENT_SIZE = 128


def load_content(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.draft("RGB", (CONTENT_SIZE * 2, CONTENT_SIZE * 2))
        return _fit(img.convert("RGB"), CONTENT_SIZE, "letterbox")


def cross_validate(
    features: np.ndarray, mirrored: np.ndarray, views: np.ndarray, folds: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold predictions: facing ("left"/"right") and P(side view) per photo."""
    assignment = np.random.default_rng(seed).permutation(len(views)) % folds
    predicted = np.empty(len(views), dtype=object)
    p_side = np.zeros(len(views))
    for fold in range(folds):
        train, test = assignment != fold, assignment == fold
        model = facing.fit_model(features[train], mirrored[train], views[train])
        for i in np.flatnonzero(test):
            predicted[i], _, p_side[i] = model.predict_features(features[i], mirrored[i])
    return predicted, p_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--labels", type=Path, default=DEFAULT_LABELS)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="save the model fitted on all labels")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not args.images.is_dir():
        print(f"facing: skipped, no photos at {args.images} (needs ../shared/data/cars-sample)")
        return
    labels = pd.read_csv(args.labels)
    started = time.perf_counter()
    contents = [load_content(args.images / name) for name in labels["image"]]
    pairs = [facing.paired_features(content) for content in contents]
    features = np.stack([p[0] for p in pairs])
    mirrored = np.stack([p[1] for p in pairs])
    feature_s = (time.perf_counter() - started) / len(labels)
    views = labels["view"].to_numpy()
    side = np.isin(views, ("left", "right"))

    predicted, p_side = cross_validate(features, mirrored, views, args.folds)
    facing_accuracy = float((predicted[side] == views[side]).mean())
    view_accuracy = float(((p_side > 0.5) == side).mean())
    frontal_recall = float((p_side[~side] <= 0.5).mean())
    heuristic = [estimate_facing_silhouette(content)[0] for content in contents]
    heuristic_accuracy = float((np.array(heuristic, dtype=object)[side] == views[side]).mean())

    n_side, n_frontal = int(side.sum()), int((~side).sum())
    print(f"labelled photos: {len(labels)} ({n_side} side/three-quarter, {n_frontal} front/rear)")
    print(f"features: {feature_s * 1000:.1f} ms per photo (photo and its mirror)")
    print(f"{args.folds}-fold cross-validation:")
    print(f"  facing accuracy on side/three-quarter views: {facing_accuracy:.3f}")
    print(f"  view accuracy (side vs front/rear): {view_accuracy:.3f}")
    print(f"  front/rear views recognised: {frontal_recall:.3f}")
    print(f"  silhouette heuristic facing accuracy: {heuristic_accuracy:.3f}")
    if args.write:
        path = facing.fit_model(features, mirrored, views).save(facing.MODEL_PATH)
        print(f"model fitted on all {len(labels)} labels written to {path.relative_to(REPO)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": date.today().isoformat(),
                    "labels": len(labels),
                    "side_views": int(side.sum()),
                    "folds": args.folds,
                    "facing_accuracy": facing_accuracy,
                    "view_accuracy": view_accuracy,
                    "front_rear_recall": frontal_recall,
                    "heuristic_facing_accuracy": heuristic_accuracy,
                    "feature_ms_per_photo": feature_s * 1000,
                },
                indent=2,
            )
        )
    print(
        f"facing: model {facing_accuracy:.3f} (n={side.sum()} side/three-quarter), "
        f"view {view_accuracy:.3f} (n={len(labels)}), heuristic {heuristic_accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
