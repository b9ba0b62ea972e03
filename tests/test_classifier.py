"""The judge: learns separable types (and makes), caches by data version and side, and its
domain metrics."""

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
TINY = ClassifierConfig(image_size=16, width=8, epochs=15, batch_size=16, min_images_seen=1)


def _images(colour: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    base = np.broadcast_to(np.array(colour, dtype=np.int16), (n, SIZE, SIZE, 3))
    return np.clip(base + rng.integers(-30, 31, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def write_labelled_shards(
    shards_dir: Path, per_type: int = 16, with_type: bool = True, with_make: bool = False
) -> Path:
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"image": [], "height": [], "width": [], "split": [], "type": []}
    makes: list[str | None] = []
    for kind, colour in COLOURS.items():
        for i, image in enumerate(_images(colour, per_type, rng)):
            rows["image"].append(image.tobytes())
            rows["height"].append(SIZE)
            rows["width"].append(SIZE)
            rows["split"].append("val" if i % 4 == 0 else "train")
            rows["type"].append(kind.upper() if i == 1 else kind)  # labels are normalised
            makes.append(None if i == 2 else f"maker of {kind}")
    if not with_type:
        del rows["type"]
    if with_make:
        rows["make"] = makes
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


def test_learns_the_make_beside_the_type_when_the_shards_have_it(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards", with_make=True)
    trained = train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)
    assert trained.classes["make"] == sorted(f"maker of {kind}" for kind in COLOURS)
    assert trained.accuracies["make"] is not None and trained.accuracies["make"] >= 0.9
    reloaded = train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)
    assert reloaded.from_cache and reloaded.classes == trained.classes
    without = ClassifierConfig(**{**TINY.__dict__, "use_make": False})
    assert "make" not in train_classifier(shards, tmp_path / "c2", "v1", without).classes


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
    assert bad["judge_fd"] > good["judge_fd"] >= 0
    assert bad["judge_kid"] > good["judge_kid"]
    # The collapsed generator draws real-looking cars of one type: fidelity stays, the
    # coverage of the real set falls.
    assert bad["judge_coverage"] < good["judge_coverage"]
    assert good["judge_key"] == trained.key


def test_shards_without_labels_raise_a_clear_error(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards", with_type=False)
    with pytest.raises(NotEnoughLabels, match="type"):
        train_classifier(shards, tmp_path / "cache", "v1", TINY, log=lambda _: None)


def test_config_rejects_sizes_the_network_cannot_halve() -> None:
    with pytest.raises(ValueError, match="image_size must be >= 8"):
        ClassifierConfig(image_size=6)


def test_judges_at_the_side_of_the_images_it_judges(tmp_path: Path) -> None:
    shards = write_labelled_shards(tmp_path / "shards")
    config = ClassifierConfig(width=8, epochs=5, batch_size=16, min_images_seen=1)
    own = train_classifier(shards, tmp_path / "cache", "v1", config, log=lambda _: None)
    small = train_classifier(
        shards, tmp_path / "cache", "v1", config, log=lambda _: None, judged_side=8
    )
    assert own.image_size == SIZE and small.image_size == 8
    assert small.cache_path != own.cache_path  # one judge per side, both cached
    features, _ = small.features_and_predictions(torch.zeros(3, 3, SIZE, SIZE, dtype=torch.uint8))
    assert features.shape[0] == 3


def test_epochs_follow_the_images_seen_budget() -> None:
    config = ClassifierConfig(epochs=30, min_images_seen=15_000, max_images_seen=120_000)
    assert config.epochs_for(4_755) == 25  # a large set: capped by max_images_seen
    assert config.epochs_for(330) == 46  # a small one: raised to min_images_seen
    assert config.epochs_for(1_000) == 30


def test_kid_from_the_whole_kernel_matrices_equals_kid_per_subset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carmodels.metrics import domain

    rng = np.random.default_rng(3)
    real, generated = rng.normal(size=(300, 16)), rng.normal(0.3, 1.2, size=(280, 16))
    whole = domain.kernel_distance(real, generated, subsets=20, subset_size=200)
    monkeypatch.setattr(domain, "KID_WHOLE_KERNEL_MAX_IMAGES", 100)  # per subset: the old way
    per_subset = domain.kernel_distance(real, generated, subsets=20, subset_size=200)
    assert whole[0] > 0.01  # the two sets differ
    np.testing.assert_allclose(whole, per_subset, rtol=1e-10)
