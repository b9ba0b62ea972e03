"""Car-type classifier: learns separable types, caches by data version, domain metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carmodels.classifier import ClassifierConfig, NotEnoughLabels, train_classifier
from carmodels.evaluate import frechet_distance
from carmodels.metrics.domain import domain_metrics

SIZE = 16
#: Each type is a flat colour plus noise: trivially separable, so accuracy must be high.
COLOURS = {"sedan": (200, 40, 40), "suv": (40, 200, 40), "pickup": (40, 40, 200)}
TINY = ClassifierConfig(image_size=16, width=8, feature_dim=16, epochs=15, batch_size=16)


def _images(colour: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.broadcast_to(np.array(colour, dtype=np.int16), (n, SIZE, SIZE, 3))
    return np.clip(base + rng.integers(-30, 31, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def write_labelled_shards(shards_dir: Path, per_type: int = 16, with_type: bool = True) -> Path:
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"image": [], "height": [], "width": [], "split": [], "type": []}
    for kind, colour in COLOURS.items():
        for i, image in enumerate(_images(colour, per_type, rng)):
            rows["image"].append(image.tobytes())
            rows["height"].append(SIZE)
            rows["width"].append(SIZE)
            rows["split"].append("val" if i % 4 == 0 else "train")
            rows["type"].append(kind.upper() if i == 1 else kind)  # labels are normalised
    if not with_type:
        del rows["type"]
    shards_dir.mkdir(parents=True)
    pq.write_table(pa.table(rows), shards_dir / "car-00000.parquet")
    return shards_dir


def test_learns_separable_types_and_caches(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards")
    trained = train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)
    assert trained.types == sorted(COLOURS) and not trained.from_cache
    assert trained.n_val == 12 and trained.val_accuracy is not None and trained.val_accuracy >= 0.9
    assert trained.cache_path.is_file()
    again = train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)
    assert again.from_cache and again.val_accuracy == trained.val_accuracy
    # A new data version trains (and caches) a new classifier.
    other = train_classifier(shards, tmp_path / "cache", "v2", TINY, log=lambda _: None)
    assert not other.from_cache and other.cache_path != trained.cache_path


def test_domain_metrics_separate_matching_and_collapsed_generators(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards")
    trained = train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)
    rng = np.random.default_rng(5)
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    real = to_tensor(np.concatenate([_images(c, 10, rng) for c in COLOURS.values()]))
    matching = to_tensor(np.concatenate([_images(c, 10, rng) for c in COLOURS.values()]))
    collapsed = to_tensor(_images(COLOURS["suv"], 30, rng))
    good = domain_metrics(trained, real, matching, frechet_distance)
    bad = domain_metrics(trained, real, collapsed, frechet_distance)
    assert good["type_overlap"] > 0.8 and good["types_generated"] == 3
    assert bad["type_overlap"] < 0.5 and bad["types_generated"] == 1
    assert bad["type_mix_generated"]["suv"] > 0.9
    assert bad["type_fd"] > good["type_fd"] >= 0


def test_shards_without_labels_raise_a_clear_error(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards", with_type=False)
    with pytest.raises(NotEnoughLabels, match="type"):
        train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)


def test_config_rejects_sizes_the_network_cannot_halve_four_times() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        ClassifierConfig(image_size=40)
