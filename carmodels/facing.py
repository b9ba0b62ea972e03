"""Which way a car faces, and whether the photo shows its side at all: a small linear model.

Features (`facing_features`): the photo's content (no letterbox bars) stretched to 128x64,
histograms of oriented gradients at two cell sizes (8 and 16 px), and a coarse grid of colour
means including "redness" (tail lights sit at the rear). Two logistic regressions use them:

- Facing: the score is ``w . (f(x) - f(mirror x))``, with no intercept, so mirroring a photo
  negates the score exactly: a mirrored photo always gets the opposite facing with the same
  confidence, and the model cannot prefer a direction. Positive means facing left.
- View: side or three-quarter against front or rear, on the mirror-symmetric part
  ``f(x) + f(mirror x)``, so both facings of a car get the same answer.

Trained on the hand labels in ``tests/data/facing_labels.csv`` (473 photos of
``cars-sample``) by ``bench/facing.py``, which also measures the accuracy by 5-fold
cross-validation (see docs/BENCHMARKS.md) and writes ``carmodels/data/facing_model.npz``.

``estimate_facing`` is the entry point the imaging step calls: it answers with this model or
with the older silhouette heuristic (``estimate_facing_silhouette``), kept as the baseline.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Size the content is stretched to before the features are computed (width, height).
FEATURE_SIZE = (128, 64)
#: HOG cell sizes in pixels and orientation bins (unsigned, 0-180 degrees).
HOG_CELLS = (8, 16)
HOG_BINS = 9
#: HOG block normalisation clip (Dalal and Triggs' L2-Hys).
HOG_CLIP = 0.2
#: Colour grid (rows, columns) of the colour-mean features.
COLOUR_GRID = (4, 8)
#: The model shipped with the package.
MODEL_PATH = Path(__file__).parent / "data" / "facing_model.npz"
#: Labels of the hand-labelled photos, and what they mean.
VIEWS = ("left", "right", "front", "rear")


def _hog(gray: np.ndarray, cell: int) -> np.ndarray:
    """Histograms of oriented gradients with 2x2-cell blocks, L2-Hys normalised."""
    gx = np.zeros_like(gray)
    gy = np.zeros_like(gray)
    gx[:, 1:-1] = gray[:, 2:] - gray[:, :-2]
    gy[1:-1] = gray[2:] - gray[:-2]
    magnitude = np.hypot(gx, gy)
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    bins = np.minimum((angle * (HOG_BINS / 180.0)).astype(np.int64), HOG_BINS - 1)
    rows, cols = gray.shape[0] // cell, gray.shape[1] // cell
    cell_index = (np.arange(rows * cell)[:, None] // cell) * cols + (
        np.arange(cols * cell)[None, :] // cell
    )
    flat = cell_index * HOG_BINS + bins[: rows * cell, : cols * cell]
    hist = np.bincount(
        flat.ravel(),
        weights=magnitude[: rows * cell, : cols * cell].ravel(),
        minlength=rows * cols * HOG_BINS,
    ).reshape(rows, cols, HOG_BINS)
    blocks = np.concatenate([hist[:-1, :-1], hist[1:, :-1], hist[:-1, 1:], hist[1:, 1:]], axis=2)
    blocks = blocks / np.sqrt((blocks**2).sum(axis=2, keepdims=True) + 1e-6)
    blocks = np.minimum(blocks, HOG_CLIP)
    blocks = blocks / np.sqrt((blocks**2).sum(axis=2, keepdims=True) + 1e-6)
    return blocks.ravel().astype(np.float32)


def _colour_grid(rgb: np.ndarray) -> np.ndarray:
    """Mean redness, brightness and R, G, B per cell of a coarse grid."""
    grid_rows, grid_cols = COLOUR_GRID
    redness = np.clip(rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]), 0.0, None)
    maps = (redness, rgb.max(axis=2), rgb[..., 0], rgb[..., 1], rgb[..., 2])
    height, width = rgb.shape[:2]
    return np.concatenate(
        [
            m.reshape(grid_rows, height // grid_rows, grid_cols, width // grid_cols)
            .mean(axis=(1, 3))
            .ravel()
            for m in maps
        ]
    ).astype(np.float32)


def facing_features(content: np.ndarray) -> np.ndarray:
    """Feature vector of a photo's content (HxWx3 uint8, without letterbox bars)."""
    if content.ndim != 3 or content.shape[2] != 3:
        raise ValueError(f"facing_features expects an HxWx3 array, got shape {content.shape}")
    resized = Image.fromarray(np.ascontiguousarray(content)).resize(
        FEATURE_SIZE, Image.Resampling.BILINEAR
    )
    rgb = np.asarray(resized, dtype=np.float32)
    # Per pixel, the gradient of the channel where it is strongest (as in Dalal and Triggs).
    gray = rgb.max(axis=2)
    parts = [_hog(gray, cell) for cell in HOG_CELLS]
    parts.append(_colour_grid(rgb / 255.0))
    return np.concatenate(parts)


def paired_features(content: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features of the photo and of its mirror image."""
    return facing_features(content), facing_features(content[:, ::-1])


@dataclass(frozen=True)
class FacingModel:
    """The two linear models (see the module docstring)."""

    facing_weights: np.ndarray
    view_weights: np.ndarray
    view_bias: float

    def predict(self, content: np.ndarray) -> tuple[str, float, float]:
        """(``left``/``right``, facing confidence in [0, 1], probability of a side view)."""
        features, mirrored = paired_features(content)
        return self.predict_features(features, mirrored)

    def predict_features(
        self, features: np.ndarray, mirrored: np.ndarray
    ) -> tuple[str, float, float]:
        # Computed as s(x) - s(mirror x) rather than w . (f(x) - f(mirror x)): floating-point
        # subtraction is exactly antisymmetric, so a mirrored photo gets exactly -score.
        score = float(features @ self.facing_weights) - float(mirrored @ self.facing_weights)
        # The same sum for a photo and its mirror: add in a fixed order of the two.
        symmetric = np.minimum(features, mirrored) + np.maximum(features, mirrored)
        view_logit = float(symmetric @ self.view_weights) + self.view_bias
        p_side = 1.0 / (1.0 + np.exp(-view_logit))
        facing = "left" if score > 0 else "right"
        # |2 sigmoid(score) - 1|, computed from |score| so both facings get the same bits.
        confidence = float(np.tanh(abs(score) / 2.0))
        return facing, confidence, float(p_side)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            facing_weights=self.facing_weights.astype(np.float32),
            view_weights=self.view_weights.astype(np.float32),
            view_bias=np.float32(self.view_bias),
            feature_size=np.array(FEATURE_SIZE),
        )
        return path


@functools.cache
def load_model(path: str | os.PathLike[str] = MODEL_PATH) -> FacingModel:
    """The model at ``path`` (default: the one shipped with the package)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No facing model at {path}: reinstall carmodels, or train one with "
            "`python bench/facing.py --write` (needs ../shared/data/cars-sample)."
        )
    with np.load(path) as data:
        if tuple(data["feature_size"]) != FEATURE_SIZE:
            raise ValueError(
                f"The facing model at {path} was trained on {tuple(data['feature_size'])} "
                f"features, this code computes {FEATURE_SIZE}: retrain it with "
                "`python bench/facing.py --write`."
            )
        return FacingModel(
            facing_weights=data["facing_weights"].astype(np.float64),
            view_weights=data["view_weights"].astype(np.float64),
            view_bias=float(data["view_bias"]),
        )


def fit_model(
    features: np.ndarray, mirrored: np.ndarray, views: np.ndarray, regularisation: float = 0.03
) -> FacingModel:
    """Fit both models on labelled features (``views`` from `VIEWS`).

    The facing model sees every side photo twice, as it is and mirrored with the opposite
    label, which is what makes it direction-neutral.
    """
    from sklearn.linear_model import LogisticRegression  # only needed to train

    views = np.asarray(views)
    unknown = set(views) - set(VIEWS)
    if unknown:
        raise ValueError(f"Unknown view labels {sorted(unknown)}; expected one of {VIEWS}.")
    side = np.isin(views, ("left", "right"))
    difference = (features - mirrored)[side]
    faces_left = (views[side] == "left").astype(int)
    facing = LogisticRegression(C=regularisation, fit_intercept=False, max_iter=5000).fit(
        np.concatenate([difference, -difference]),
        np.concatenate([faces_left, 1 - faces_left]),
    )
    symmetric = np.minimum(features, mirrored) + np.maximum(features, mirrored)
    view = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=5000).fit(
        symmetric, side.astype(int)
    )
    return FacingModel(
        facing_weights=facing.coef_[0].astype(np.float64),
        view_weights=view.coef_[0].astype(np.float64),
        view_bias=float(view.intercept_[0]),
    )


# ------------------------------------------------- the silhouette heuristic, and the choice


@dataclass(frozen=True)
class FacingHeuristic:
    """Constants of ``estimate_facing``'s silhouette heuristic (see its docstring)."""

    #: Thickness of the image border whose colours define "background".
    border_px: int = 4
    #: A pixel is foreground when its largest per-channel difference from the background
    #: colour exceeds max(min_contrast, spread_factor * border spread).
    min_contrast: int = 28
    spread_factor: float = 1.5
    #: Columns with fewer foreground pixels than this fraction of the height are background.
    min_column_fraction: float = 0.08
    #: Below this many car columns (fraction of the width) the silhouette is not trusted.
    min_car_width_fraction: float = 0.25
    #: Offset of the roof mass from the car's centre (fraction of the car's length, summed over
    #: the photo and its mirror image) that counts as full confidence.
    full_confidence_offset: float = 0.3
    #: A silhouette narrower than this (length / height) and this left-right symmetric is a
    #: front or rear view; side views are 2-3x as long as high, three-quarter views ~1.6-2.
    frontal_max_aspect: float = 1.5
    frontal_max_asymmetry: float = 0.12


FACING_HEURISTIC = FacingHeuristic()


#: How `estimate_facing` decides: the linear model of `carmodels.facing` (measured on
#: hand-labelled photos, see docs/benchmarks/facing.md) or the older silhouette heuristic.
FACING_METHODS: tuple[str, ...] = ("model", "silhouette")


def estimate_facing(arr: np.ndarray, method: str = "model") -> tuple[str, float]:
    """Which way the car in ``arr`` (HxWx3 uint8) points: ``left``, ``right`` or ``front_or_rear``.

    Returns the answer and a confidence in [0, 1]. Either method is exactly antisymmetric: the
    mirrored photo gets the opposite facing with the same confidence. ``model`` (the default)
    scored 0.93 facing accuracy on real side and three-quarter photos by cross-validation, the
    silhouette heuristic 0.6 (near chance) on the same photos; the heuristic is kept for clean
    silhouettes on plain backgrounds (drawn cars) and as the baseline.
    """
    if method == "silhouette":
        return estimate_facing_silhouette(arr)
    if method != "model":
        raise ValueError(f"Unknown facing method {method!r}; expected one of {FACING_METHODS}.")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"estimate_facing expects an HxWx3 array, got shape {arr.shape}")
    facing, confidence, p_side = load_model().predict(arr)
    if p_side < 0.5:
        return "front_or_rear", float(1.0 - 2.0 * p_side)
    return facing, confidence


def estimate_facing_silhouette(
    arr: np.ndarray, heuristic: FacingHeuristic = FACING_HEURISTIC
) -> tuple[str, float]:
    """Which way the car in ``arr`` (HxWx3 uint8) points, from its silhouette.

    Heuristic (at chance on real listing photos, whose backgrounds are cluttered; good on
    clean silhouettes):

    1. Silhouette: each side of the image border gives a background colour (its median; sky
       above, road below) and the border's spread (75th percentile of its distances to the
       nearest of them); pixels clearly farther than that from every side colour are the car.
       Pass the photo's content, not letterbox bars (``normalise`` does).
    2. Upper profile: per column, the silhouette's height above the car's bottom row.
    3. Seen from the side, the cabin and roof sit toward the rear and the hood is long and low
       at the front, so the mass of the profile above its median height ("roof mass") lies
       behind the car's centre. Roof mass right of centre means the car faces left.
    4. A front or rear view is short (length / height small) and left-right symmetric.

    The direction score is computed as ``g(arr) - g(mirror(arr))``. Since floating-point
    subtraction is exactly antisymmetric, mirroring the input gives exactly the opposite
    facing with exactly the same confidence; the frontal test uses only quantities that are
    exactly mirror-invariant (integer counts, medians, percentiles).
    """
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"estimate_facing expects an HxWx3 array, got shape {arr.shape}")
    if min(arr.shape[:2]) < 4 * heuristic.border_px:
        return "front_or_rear", 0.0  # too small to tell a border from a car
    mask = _foreground_mask(arr, heuristic)
    mirrored_mask = mask[:, ::-1]
    profile = _upper_profile(mask, heuristic)
    if profile is None:
        return "front_or_rear", 0.0
    heights, length = profile
    tallest = int(heights.max())
    aspect = length / max(tallest, 1)
    # |h(x) - h(mirror x)| summed in integers: exact, and the same for the mirrored photo.
    asymmetry = int(np.abs(heights - heights[::-1]).sum()) / max(int(heights.sum()), 1)
    if aspect < heuristic.frontal_max_aspect and asymmetry < heuristic.frontal_max_asymmetry:
        confidence = 1.0 - asymmetry / heuristic.frontal_max_asymmetry
        return "front_or_rear", float(np.clip(confidence, 0.0, 1.0))

    score = _roof_offset(heights) - _roof_offset(_upper_profile(mirrored_mask, heuristic)[0])
    if score == 0.0:
        return "front_or_rear", 0.0
    confidence = float(min(1.0, abs(score) / heuristic.full_confidence_offset))
    return ("left" if score > 0 else "right"), confidence


def _foreground_mask(arr: np.ndarray, heuristic: FacingHeuristic) -> np.ndarray:
    pixels = arr.astype(np.int16)
    b = heuristic.border_px
    sides = [
        pixels[:b].reshape(-1, 3),  # usually sky or wall
        pixels[-b:].reshape(-1, 3),  # usually road or floor
        pixels[b:-b, :b].reshape(-1, 3),
        pixels[b:-b, -b:].reshape(-1, 3),
    ]
    # One background colour per side (median: robust to the car touching the border). Medians
    # and percentiles depend on the multiset of values only, not their order, and the minimum
    # over the sides does not care that mirroring swaps left and right, so the mask of a
    # mirrored photo is exactly the mirrored mask.
    backgrounds = np.stack([np.median(side, axis=0) for side in sides])

    def distance_to_background(values: np.ndarray) -> np.ndarray:
        per_side = [np.abs(values - colour).max(axis=-1) for colour in backgrounds]
        return np.minimum.reduce(per_side)

    border_distance = distance_to_background(np.concatenate(sides))
    threshold = max(
        heuristic.min_contrast, heuristic.spread_factor * np.percentile(border_distance, 75)
    )
    return distance_to_background(pixels) > threshold


def _upper_profile(mask: np.ndarray, heuristic: FacingHeuristic) -> tuple[np.ndarray, int] | None:
    """Silhouette height per car column (integers) and the car's length in columns."""
    height, width = mask.shape
    column_counts = mask.sum(axis=0)
    car_columns = np.flatnonzero(column_counts >= heuristic.min_column_fraction * height)
    if len(car_columns) < heuristic.min_car_width_fraction * width:
        return None
    first, last = int(car_columns[0]), int(car_columns[-1])
    car = mask[:, first : last + 1]
    rows = np.flatnonzero(car.sum(axis=1) >= heuristic.min_column_fraction * car.shape[1])
    if len(rows) == 0:
        return None
    bottom = int(rows[-1])
    has_pixels = car.any(axis=0)
    top = np.where(has_pixels, car.argmax(axis=0), bottom + 1)
    heights = np.clip(bottom + 1 - top, 0, None).astype(np.int64)
    return heights, last - first + 1


def _roof_offset(heights: np.ndarray) -> float:
    """Centroid of the profile above its median, minus the car's centre, in car lengths."""
    roof = np.clip(heights - np.median(heights), 0, None)
    total = roof.sum()
    if total <= 0 or len(heights) < 2:
        return 0.0
    position = np.linspace(0.0, 1.0, len(heights))
    return float((roof * position).sum() / total - 0.5)
