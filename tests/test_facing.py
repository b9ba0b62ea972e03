"""The facing model: shipped, direction-neutral, and measured against hand labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from carmodels import facing
from tests.conftest import SHARED_DATA, requires_cars_sample

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO / "tests" / "data" / "facing_labels.csv"


def test_labels_are_well_formed_and_large_enough() -> None:
    labels = pd.read_csv(LABELS)
    assert list(labels.columns) == ["image", "view"]
    assert labels["image"].is_unique
    assert set(labels["view"]) <= set(facing.VIEWS)
    assert labels["view"].isin(["left", "right"]).sum() >= 200


def test_shipped_model_loads_and_matches_the_features() -> None:
    model = facing.load_model()
    features = facing.facing_features(np.zeros((60, 128, 3), np.uint8))
    assert model.facing_weights.shape == features.shape == model.view_weights.shape


def test_model_is_direction_neutral_on_any_input() -> None:
    rng = np.random.default_rng(1)
    model = facing.load_model()
    for shape in [(62, 128, 3), (128, 128, 3), (40, 90, 3)]:
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        facing_a, confidence_a, side_a = model.predict(arr)
        facing_b, confidence_b, side_b = model.predict(np.ascontiguousarray(arr[:, ::-1]))
        assert {facing_a, facing_b} == {"left", "right"}
        assert confidence_a == confidence_b and side_a == side_b


def test_missing_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bench/facing.py --write"):
        facing.load_model(tmp_path / "absent.npz")


def test_unknown_labels_are_refused() -> None:
    features = np.zeros((2, 4))
    with pytest.raises(ValueError, match="sideways"):
        facing.fit_model(features, features, np.array(["left", "sideways"]))


@pytest.mark.slow
@requires_cars_sample
def test_cross_validated_accuracy_on_hand_labels() -> None:
    """The figure in docs/BENCHMARKS.md, recomputed: the issue's 90% goal on side and
    three-quarter views, far above the silhouette heuristic."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "facing.py"),
            "--images",
            str(SHARED_DATA / "cars-sample"),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    last = out.strip().splitlines()[-1]
    model_accuracy = float(last.split("model ")[1].split()[0])
    heuristic_accuracy = float(last.split("heuristic ")[1].split()[0])
    view_accuracy = float(last.split("view ")[1].split()[0])
    assert model_accuracy >= 0.9, out
    assert view_accuracy >= 0.9, out
    assert model_accuracy > heuristic_accuracy + 0.15, out
