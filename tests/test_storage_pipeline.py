"""The ingest assets with their storage root on S3 (moto's server on 127.0.0.1).

Each run works in its own local working copy; a second machine (a fresh cache folder) picks
up from what the first pushed, and a skipped step does not even need the data locally.
"""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from carmodels.shards import load_images
from pipelines.assets import car_shards, listing_manifest, raw_images, unique_images
from pipelines.resources import StorageResource, profile_resources
from pipelines.versioning import DATA_VERSION_TAG, SKIPPED_KEY
from tests.test_storage import moto_s3_server

INGEST = [listing_manifest, raw_images, unique_images, car_shards]
DEMO_LISTINGS = 30


def _materialise(instance, storage, settings, selection=None, run_config=None):
    result = dg.materialize(
        INGEST,
        selection=selection,
        resources={"storage": storage, **settings},
        instance=instance,
        run_config=run_config or {},
    )
    assert result.success
    return {
        event.asset_key.path[-1]: event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
    }


@pytest.mark.slow
def test_ingest_writes_to_s3_and_a_fresh_working_copy_reads_it(tmp_path) -> None:
    settings = profile_resources("demo", demo_listings=DEMO_LISTINGS)
    (tmp_path / "home").mkdir()
    with moto_s3_server() as s3, dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        url = s3.url("pipeline")
        first_machine = StorageResource(
            root=url, cache_dir=str(tmp_path / "cache-a"), storage_options=s3.storage_options
        )
        first = _materialise(instance, first_machine, settings)

        keys = s3.keys("pipeline")
        for expected in (
            "manifest/listings.parquet",
            "unique/unique.parquet",
            "shards/summary.json",
        ):
            assert expected in keys, sorted(keys)
        assert any(k.startswith("raw/raw-") for k in keys)
        assert any(k.startswith("shards/car-") for k in keys)
        assert first["car_shards"].metadata["dagster/uri"].value == f"{url}/shards"

        # Another machine: an empty cache. Unchanged inputs skip without pulling anything.
        second_machine = StorageResource(
            root=url, cache_dir=str(tmp_path / "cache-b"), storage_options=s3.storage_options
        )
        second = _materialise(instance, second_machine, settings)
        assert second["car_shards"].metadata[SKIPPED_KEY].value is True
        assert not (second_machine.layout.shards_dir / "summary.json").exists()

        # Forcing the shards on that machine pulls their inputs from S3 and rebuilds the same
        # content, so the data version is unchanged.
        forced = _materialise(
            instance,
            second_machine,
            settings,
            selection=[car_shards],
            run_config={"ops": {"car_shards": {"config": {"force": True}}}},
        )
        assert forced["car_shards"].metadata[SKIPPED_KEY].value is False
        assert (
            forced["car_shards"].tags[DATA_VERSION_TAG]
            == first["car_shards"].tags[DATA_VERSION_TAG]
        )
        images_a = load_images(first_machine.layout.shards_dir)
        images_b = load_images(second_machine.layout.shards_dir)
        assert images_a.shape == images_b.shape and bool((images_a == images_b).all())

        # What S3 holds is what the first machine wrote.
        manifest = pd.read_parquet(
            f"{url}/manifest/listings.parquet", storage_options=s3.storage_options
        )
        assert len(manifest) == first["listing_manifest"].metadata["dagster/row_count"].value


def test_bad_remote_root_fails_before_any_work(tmp_path) -> None:
    settings = profile_resources("demo", demo_listings=DEMO_LISTINGS)
    (tmp_path / "home").mkdir()
    with moto_s3_server() as s3, dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        storage = StorageResource(
            root="s3://no-such-bucket/data",
            cache_dir=str(tmp_path / "cache"),
            storage_options=s3.storage_options,
        )
        with pytest.raises(dg.DagsterResourceFunctionError) as raised:
            dg.materialize(
                [listing_manifest],
                resources={"storage": storage, **settings},
                instance=instance,
            )
        # The cause names the root and what to do.
        assert "s3://no-such-bucket/data does not exist" in str(raised.value.__cause__)
