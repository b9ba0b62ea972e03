"""The ingest assets with downloads and normalising fanned out on a local Ray head, into
moto's S3.

The same demo catalog is ingested twice, into two prefixes of one bucket: once as every user
without Ray does, once with the `ray_cluster` resource set to a Ray head on 127.0.0.1. What
must agree is what the data is: the raw rows (``fetched_at`` aside: it is the clock's), the
kept images, and the car shards byte for byte, so their data version too (the shard build
writes its rows in a canonical order, whatever order the photos were downloaded in).

What does not agree, and why: the raw shards and ``unique.parquet`` record ``fetched_at`` and
where each photo landed, so their bytes, and the data versions that hash them, differ between
any two downloads, two downloads without Ray included.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from carmodels import shards
from carmodels.scrape.raw import read_raw
from pipelines.assets import car_shards, listing_manifest, raw_images, unique_images
from pipelines.resources import DemoCatalogSource, RayResource, StorageResource, profile_resources
from tests.conftest import free_port
from tests.test_cluster_ray import RAY_ENV
from tests.test_storage import moto_s3_server

pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")

INGEST = [listing_manifest, raw_images, unique_images, car_shards]
DEMO_LISTINGS = 30
#: Raw columns that must agree between the two runs (``fetched_at`` is the clock's).
RAW_COLUMNS = ["url", "outcome", "status", "sha256", "width", "height", "image_bytes"]


def _ingest(instance, storage: StorageResource, ray_cluster: RayResource, port: int) -> dict:
    resources = {
        "storage": storage,
        **profile_resources("demo", demo_listings=DEMO_LISTINGS),
        # One port for both runs: the URLs, and so the rows, name the catalog's origin.
        "listing_source": DemoCatalogSource(listings=DEMO_LISTINGS, port=port),
        "ray_cluster": ray_cluster,
    }
    result = dg.materialize(INGEST, resources=resources, instance=instance)
    assert result.success
    return {
        event.asset_key.path[-1]: event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
    }


def _raw_rows(storage: StorageResource) -> pd.DataFrame:
    frame = read_raw(storage.layout.raw_dir)
    return frame[RAW_COLUMNS].sort_values("url").reset_index(drop=True)


def _car_shard_rows(storage: StorageResource) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(storage.layout.shards_dir.glob("car-*.parquet"))]
    return pd.concat(frames).sort_values("url").reset_index(drop=True)


def _shard_bytes(storage: StorageResource) -> list[bytes]:
    return [p.read_bytes() for p in shards.shard_files(storage.layout.shards_dir)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ingest_on_a_local_ray_head_into_s3_matches_the_local_path(tmp_path, monkeypatch) -> None:
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "home").mkdir()
    with moto_s3_server() as s3, dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:

        def storage(prefix: str) -> StorageResource:
            return StorageResource(
                root=s3.url(prefix),
                cache_dir=str(tmp_path / f"cache-{prefix}"),
                storage_options=s3.storage_options,
            )

        local, on_ray = storage("local"), storage("ray")
        port = free_port()
        without = _ingest(instance, local, RayResource(address=""), port)
        # Small tasks, so the catalog's one host spans several and the coordinator is used.
        with_ray = _ingest(instance, on_ray, RayResource(address="local", urls_per_task=8), port)

        assert without["raw_images"].metadata["engine"].value == "local"
        assert with_ray["raw_images"].metadata["engine"].value == "ray (local)"
        assert without["car_shards"].metadata["engine"].value == "local"
        assert with_ray["car_shards"].metadata["engine"].value == "ray (local)"
        for key in ("urls", "fetched", "ok", "failed"):
            assert (
                with_ray["raw_images"].metadata[key].value
                == without["raw_images"].metadata[key].value
            ), key

        # The tasks wrote to S3 itself: the bucket holds their shards and done-markers, and
        # the working copy was brought level with it.
        keys = s3.keys("ray")
        assert any(k.startswith("raw/raw-") for k in keys)
        assert any(k.startswith("raw/_tasks/") for k in keys)

        assert _raw_rows(on_ray).equals(_raw_rows(local))
        rows = _car_shard_rows(local)
        assert len(rows) > 0  # not vacuous
        pd.testing.assert_frame_equal(_car_shard_rows(on_ray), rows)
        # The same shard files, byte for byte, and so the same data version.
        assert _shard_bytes(on_ray) == _shard_bytes(local)
        assert with_ray["car_shards"].metadata["data_version"].value == (
            without["car_shards"].metadata["data_version"].value
        )
        assert with_ray["unique_images"].metadata["kept"].value == (
            without["unique_images"].metadata["kept"].value
        )
