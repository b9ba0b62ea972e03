"""The design and restoration assets materialise from the champion and report tables."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from carmodels import promotion
from carmodels.layout import DataLayout
from carmodels.train import TrainConfig, train
from pipelines.designs import (
    DESIGNS_DIR,
    RESTORATION_DIR,
    design_samples,
    restoration_examples,
)
from pipelines.resources import StorageResource
from tests.test_restore import SIZE, write_shards


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> StorageResource:
    layout = DataLayout.at(tmp_path_factory.mktemp("designs"))
    write_shards(layout.shards_dir)
    config = TrainConfig(
        preset="tiny", image_size=SIZE, epochs=1, batch_size=8, max_steps_per_epoch=2, device="cpu"
    )
    result = train(layout.shards_dir, layout.train_dir, config)
    # The design assets read the champion: crown this checkpoint, as `champion_generator`
    # does for a first evaluation when there is no champion yet.
    first = promotion.decide({"judge_fd": 1.0}, None, promotion.PromotionConfig(metric="judge_fd"))
    assert first.promote, first.reason
    promotion.promote(result.checkpoint_path, {"judge_fd": 1.0}, first, layout.champion_dir)
    return StorageResource(root=str(layout.root))


def test_design_samples(storage: StorageResource) -> None:
    result = dg.materialize(
        [design_samples],
        resources={"storage": storage},
        run_config={"ops": {"design_samples": {"config": {"n": 4, "device": "cpu"}}}},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("design_samples")[0].metadata
    assert metadata["n_designs"].value == 4
    out = Path(storage.root) / DESIGNS_DIR
    assert (out / "grid.png").exists() and (out / "interpolation-0-1-spherical.png").exists()


def test_restoration_examples(storage: StorageResource) -> None:
    config = {"n_images": 1, "restarts": 2, "steps": 3, "finetune_steps": 2, "device": "cpu"}
    result = dg.materialize(
        [restoration_examples],
        resources={"storage": storage},
        run_config={"ops": {"restoration_examples": {"config": config}}},
    )
    assert result.success
    metadata = result.asset_materializations_for_node("restoration_examples")[0].metadata
    assert "baseline: OpenCV Telea" in metadata["table"].value
    assert (Path(storage.root) / RESTORATION_DIR / "preview.png").exists()


def test_missing_checkpoint_names_the_upstream_asset(tmp_path: Path) -> None:
    with pytest.raises(dg.Failure, match="champion_generator"):
        dg.materialize([design_samples], resources={"storage": StorageResource(root=str(tmp_path))})
