"""The whole asset graph, end to end, against a small demo catalog served on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from PIL import Image

from carmodels.layout import DataLayout
from carmodels.promotion import HISTORY_FILE, read_history
from carmodels.shards import load_images
from pipelines.assets import ALL_ASSETS
from pipelines.pipes import pipes_subprocess_client
from pipelines.resources import StorageResource, profile_resources

REPO = Path(__file__).resolve().parents[1]
DEMO_LISTINGS = 120


@pytest.fixture(scope="module")
def materialised(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("e2e")
    home = root / "dagster_home"
    home.mkdir()
    storage = StorageResource(root=str(root / "data"))
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        result = dg.materialize(
            ALL_ASSETS,
            resources={
                "storage": storage,
                **profile_resources("demo", demo_listings=DEMO_LISTINGS),
                "pipes_subprocess_client": pipes_subprocess_client(),
            },
            instance=instance,
            run_config={
                "ops": {
                    "train_dcgan": {"config": {"epochs": 2}},
                    "evaluate_dcgan": {"config": {"offline": True}},
                }
            },
        )
        assert result.success
        metadata = {
            event.asset_key.path[-1]: event.step_materialization_data.materialization.metadata
            for event in result.get_asset_materialization_events()
        }
    return DataLayout.at(storage.root), metadata


@pytest.mark.slow
def test_every_asset_materialises_with_metadata(materialised) -> None:
    _, metadata = materialised
    assert set(metadata) == {asset.key.path[-1] for asset in ALL_ASSETS}
    for name in ("unique_images", "car_shards", "train_dcgan", "evaluate_dcgan"):
        assert "preview" in metadata[name], f"{name} has no preview image"


@pytest.mark.slow
def test_planted_defects_are_counted_with_their_reasons(materialised) -> None:
    from carmodels.demo import build_catalog

    layout, metadata = materialised
    catalog = build_catalog(seed=0, n_listings=DEMO_LISTINGS)
    raw = pd.concat(pd.read_parquet(p) for p in sorted(layout.raw_dir.glob("raw-*.parquet")))
    assert raw["url"].is_unique
    outcome = dict(zip(raw["url"].str.rsplit("/", n=1).str[-1], raw["outcome"], strict=True))
    for name in catalog.defects.dead_links:
        assert outcome[Path(name).name] == "http_404"
    assert outcome[Path(catalog.defects.non_image).name] == "not_image"
    assert outcome[Path(catalog.defects.truncated).name] == "corrupt"
    assert metadata["raw_images"]["ok"].value == (raw["outcome"] == "ok").sum()


@pytest.mark.slow
def test_planted_duplicates_are_removed(materialised) -> None:
    from carmodels.demo import build_catalog

    layout, _ = materialised
    catalog = build_catalog(seed=0, n_listings=DEMO_LISTINGS)
    kept = pd.read_parquet(layout.unique_dir / "unique.parquet")
    kept_names = set(kept["url"].str.rsplit("/", n=1).str[-1])
    assert catalog.defects.duplicate_of, "the demo catalog planted no duplicates"
    for copy, original in catalog.defects.duplicate_of.items():
        # Exactly one of each planted pair survives.
        assert (Path(copy).name in kept_names) != (Path(original).name in kept_names)


@pytest.mark.slow
def test_shards_checkpoint_and_grid(materialised) -> None:
    from carmodels.train import load_generator

    layout, metadata = materialised
    train_images = load_images(layout.shards_dir, split="train")
    val_images = load_images(layout.shards_dir, split="val")
    assert train_images.dtype == torch.uint8
    assert tuple(train_images.shape[1:]) == (3, 128, 128)
    assert len(train_images) + len(val_images) == metadata["car_shards"]["written"].value
    summary = json.loads((layout.shards_dir / "summary.json").read_text())
    assert summary["image_size"] == {"channels": 3, "height": 128, "width": 128}

    checkpoint = Path(metadata["train_dcgan"]["checkpoint"].value)
    generator, spec, _ = load_generator(checkpoint)
    with torch.no_grad():
        sample = generator(torch.randn(2, spec.nz, 1, 1))
    # The demo profile trains the `small` preset at 64 px on the 128 px shards.
    assert tuple(sample.shape) == (2, 3, 64, 64)

    with Image.open(layout.eval_dir / "samples_ema.png") as grid:
        # 8 x 8 generated images with torchvision's 2 px padding.
        side = 8 * spec.image_size + 9 * 2
        assert grid.size == (side, side)
    metrics = json.loads((layout.eval_dir / "metrics.json").read_text())
    assert metrics, "evaluation wrote no metrics"
    # The asset, not the evaluation itself, records it in the promotion history.
    history = read_history(layout.eval_dir / HISTORY_FILE)
    assert history["checkpoint"].tolist()[-1] == metrics["checkpoint"]


def _dagster_cli(args: list[str], home: Path, data: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CARMODELS_DATA": str(data),
    }
    dagster = str(Path(sys.executable).with_name("dagster"))
    return subprocess.run(
        [dagster, "asset", "materialize", "-m", "pipelines.definitions", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_train_alone_on_fresh_home_names_the_missing_upstream(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    proc = _dagster_cli(["--select", "train_dcgan"], home, tmp_path / "data")
    assert proc.returncode != 0
    assert "car_shards" in proc.stdout + proc.stderr
