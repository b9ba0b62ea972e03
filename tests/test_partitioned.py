"""Partitioned ingest: manifest files as dynamic partitions (`pipelines.partitioned`).

The library side (`carmodels.watch`) cuts a manifest into batches, each a partition key; the
Dagster side ingests each partition into its own folders, dedups across all of them
incrementally, builds each partition's shards, and trains on every partition.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from carmodels import shards, watch
from carmodels.demo.server import DemoServer
from carmodels.errors import InputError, MissingInputError
from pipelines.partitioned import (
    MANIFEST_PARTITIONS,
    WATCH_DIR_ENV,
    ManifestPartitionsConfig,
    build_partitioned_assets,
)
from pipelines.resources import StorageResource, profile_resources
from pipelines.sensors import PARTITIONED_INGEST, build_manifest_sensor

# --------------------------------------------------------------------------- library: batches


def _write_manifest(path: Path, urls: list[str]) -> Path:
    pd.DataFrame({"url": urls, "make": ["m"] * len(urls)}).to_csv(path, index=False)
    return path


def test_partition_keys_name_the_file_and_batch(tmp_path: Path) -> None:
    path = _write_manifest(tmp_path / "cars.csv", [f"https://a.example/{i}.jpg" for i in range(7)])
    assert watch.manifest_partition_keys(path, batch_rows=3) == [
        "cars.csv@0000",
        "cars.csv@0001",
        "cars.csv@0002",
    ]
    assert watch.manifest_partition_keys(path, batch_rows=100) == ["cars.csv@0000"]
    assert watch.parse_partition_key("cars.csv@0002") == ("cars.csv", 2)
    # A file name holding the separator: the batch is what follows the last one.
    assert watch.parse_partition_key("a@b.csv@0001") == ("a@b.csv", 1)


@pytest.mark.parametrize("key", ["cars.csv", "cars.csv@", "@0001", "cars.csv@x1", "d/c.csv@0001"])
def test_a_key_that_is_no_batch_is_refused_in_one_line(key: str) -> None:
    with pytest.raises(InputError, match="not a manifest batch") as error:
        watch.parse_partition_key(key)
    assert "\n" not in str(error.value)


def test_batches_cover_the_distinct_urls_once_in_file_order(tmp_path: Path) -> None:
    urls = [f"https://a.example/{i}.jpg" for i in range(7)]
    _write_manifest(tmp_path / "cars.csv", [*urls, urls[0]])  # a repeated URL counts once
    parts = [
        watch.read_manifest_partition(tmp_path, f"cars.csv@{b:04d}", batch_rows=3) for b in range(3)
    ]
    assert [len(p) for p in parts] == [3, 3, 1]
    assert [u for p in parts for u in p["url"]] == urls


def test_a_batch_past_the_end_or_a_missing_file_says_what_to_do(tmp_path: Path) -> None:
    _write_manifest(tmp_path / "cars.csv", ["https://a.example/1.jpg"])
    with pytest.raises(InputError, match="shrank or batch_rows changed"):
        watch.read_manifest_partition(tmp_path, "cars.csv@0001", batch_rows=3)
    with pytest.raises(MissingInputError, match="put the manifest back"):
        watch.read_manifest_partition(tmp_path, "gone.csv@0000", batch_rows=3)


def test_partitioning_is_off_by_default_and_checked() -> None:
    assert ManifestPartitionsConfig().enabled is False
    with pytest.raises(Exception, match="batch_rows"):
        ManifestPartitionsConfig(batch_rows=0)


def test_a_partitions_kept_version_ignores_renumbered_clusters_and_moved_photos() -> None:
    from pipelines.partitioned import _kept_version

    rows = pd.DataFrame(
        {
            "sha256": ["a", "b"],
            "url": ["https://x/1.jpg", "https://x/2.jpg"],
            "raw_shard": ["raw-00000.parquet", "raw-00001.parquet"],
            "cluster_id": [0, 1],
            "cluster_size": [3, 1],
            "make": ["audi", "bmw"],
        }
    )
    # Another dedup run numbers clusters by size again; a re-download moves the photos.
    renumbered = rows.assign(cluster_id=[5, 2], cluster_size=[4, 1], raw_shard="raw-00007")
    assert _kept_version(renumbered.iloc[::-1]) == _kept_version(rows)
    # What the shards are built from changed: another image kept, or other metadata.
    assert _kept_version(rows.assign(sha256=["a", "c"])) != _kept_version(rows)
    assert _kept_version(rows.assign(make=["audi", "audi"])) != _kept_version(rows)


# --------------------------------------------------------------------------- Dagster

LISTINGS = 12


@pytest.fixture
def demo_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A demo catalog server, and a watched folder its manifests are dropped into."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    monkeypatch.setenv(WATCH_DIR_ENV, str(incoming))
    with DemoServer(n_listings=LISTINGS) as server:
        yield server, incoming


def _drop_manifest(server: DemoServer, incoming: Path, name: str, rows: slice) -> list[str]:
    frame = server.catalog.manifest_frame(server.base_url).iloc[rows]
    frame.to_csv(incoming / name, index=False)
    return list(frame["url"])


def _assets(batch_rows: int) -> list[dg.AssetsDefinition]:
    return build_partitioned_assets(
        ManifestPartitionsConfig(enabled=True, batch_rows=batch_rows, partitions_per_run=2)
    )


def _resources(tmp_path: Path, storage: StorageResource | None = None) -> dict[str, object]:
    return {
        "storage": storage or StorageResource(root=str(tmp_path / "data")),
        **profile_resources("demo", demo_listings=LISTINGS),
    }


#: The demo server listens on loopback: a manifest of its URLs needs the opt-in.
RUN_CONFIG = {"ops": {"raw_images": {"config": {"allow_private_networks": True}}}}


def _materialise(
    instance: dg.DagsterInstance,
    tmp_path: Path,
    assets: list[dg.AssetsDefinition],
    selection: list[str],
    partition: str | None = None,
    storage: StorageResource | None = None,
) -> dict[str, dg.AssetMaterialization]:
    result = dg.materialize(
        assets,
        selection=selection,
        partition_key=partition,
        resources=_resources(tmp_path, storage),
        instance=instance,
        run_config={"ops": {k: v for k, v in RUN_CONFIG["ops"].items() if k in selection}},
    )
    assert result.success
    return {
        event.asset_key.path[-1]: event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
    }


@pytest.mark.slow
def test_partitions_are_ingested_apart_deduped_together_and_trained_on_together(
    tmp_path: Path, demo_site
) -> None:
    server, incoming = demo_site
    first = _drop_manifest(server, incoming, "first.csv", slice(0, 20))
    assets = _assets(batch_rows=12)
    keys = watch.manifest_partition_keys(incoming / "first.csv", 12)
    assert keys == ["first.csv@0000", "first.csv@0001"]
    data = tmp_path / "data"
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, keys)
        for key in keys:
            done = _materialise(instance, tmp_path, assets, ["listing_manifest", "raw_images"], key)
            assert done["raw_images"].metadata["urls"].value == (12 if key.endswith("0") else 8)
        assert sorted(p.name for p in (data / "raw").iterdir()) == keys
        dedup = _materialise(instance, tmp_path, assets, ["unique_images"])["unique_images"]
        assert dedup.metadata["partitions"].value == 2
        assert dedup.metadata["partitions_new"].value == 2
        kept = pd.read_parquet(data / "unique" / "unique.parquet")
        assert set(kept["partition"]) == set(keys)
        assert set(kept["url"]) <= set(first)

        for key in keys:
            built = _materialise(instance, tmp_path, assets, ["car_shards"], key)["car_shards"]
            assert built.metadata["written"].value > 0
        # The trainer's reader sees every partition's shards as one set.
        images = shards.load_images(data / "shards")
        per_partition = [len(shards.load_images(data / "shards" / key)) for key in keys]
        assert len(images) == sum(per_partition) > 0

        # A second file: only its partition is downloaded and decided; the first file's
        # shards stand (their kept images did not change), so their step skips.
        _drop_manifest(server, incoming, "second.csv", slice(20, 30))
        instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, ["second.csv@0000"])
        _materialise(
            instance, tmp_path, assets, ["listing_manifest", "raw_images"], "second.csv@0000"
        )
        dedup = _materialise(instance, tmp_path, assets, ["unique_images"])["unique_images"]
        assert dedup.metadata["partitions_new"].value == 1
        assert dedup.metadata["partitions"].value == 3
        again = _materialise(instance, tmp_path, assets, ["car_shards"], keys[0])["car_shards"]
        assert again.metadata["skipped"].value is True
        fresh = _materialise(instance, tmp_path, assets, ["car_shards"], "second.csv@0000")
        assert fresh["car_shards"].metadata["skipped"].value is False

        # A partition deleted in the UI leaves the dedup; what is left of it is said.
        instance.delete_dynamic_partition(MANIFEST_PARTITIONS.name, keys[1])
        result = dg.materialize(
            assets,
            selection=["unique_images"],
            resources=_resources(tmp_path),
            instance=instance,
        )
        dedup = result.get_asset_materialization_events()[0].step_materialization_data
        assert dedup.materialization.metadata["partitions_removed"].value == [keys[1]]
        assert keys[1] not in set(pd.read_parquet(data / "unique" / "unique.parquet")["partition"])
        warnings = [
            record.user_message
            for record in instance.all_logs(result.run_id)
            if record.level >= 30  # logging.WARNING
        ]
        assert any("shards are still in" in w and keys[1] in w for w in warnings), warnings


def test_a_partitioned_run_refuses_a_manifest_path_in_one_line(tmp_path: Path, demo_site) -> None:
    server, incoming = demo_site
    _drop_manifest(server, incoming, "first.csv", slice(0, 5))
    assets = _assets(batch_rows=12)
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, ["first.csv@0000"])
        result = dg.materialize(
            assets,
            selection=["listing_manifest"],
            partition_key="first.csv@0000",
            resources=_resources(tmp_path),
            instance=instance,
            run_config={"ops": {"listing_manifest": {"config": {"manifest_path": str(incoming)}}}},
            raise_on_error=False,
        )
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        message = failure.step_failure_data.error.message
        assert "remove `manifest_path`" in message


# --------------------------------------------------------------------------- the sensor


def test_the_sensor_adds_a_files_partitions_and_backfills_them_once(
    tmp_path: Path, demo_site
) -> None:
    server, incoming = demo_site
    _drop_manifest(server, incoming, "first.csv", slice(0, 20))
    (incoming / "broken.csv").write_text("no,url,column\n1,2,3\n")
    settings = ManifestPartitionsConfig(enabled=True, batch_rows=8, partitions_per_run=2)
    sensor = build_manifest_sensor(settings)
    assets = build_partitioned_assets(settings)
    repository = dg.Definitions(
        assets=assets, sensors=[sensor], resources=_resources(tmp_path)
    ).get_repository_def()
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        context = dg.build_sensor_context(instance=instance, repository_def=repository)
        # As the daemon evaluates it: with the checks it makes of the requests.
        result = sensor.evaluate_tick(context)
        keys = ["first.csv@0000", "first.csv@0001", "first.csv@0002"]
        [add] = result.dynamic_partitions_requests
        assert add.partitions_def_name == MANIFEST_PARTITIONS.name
        assert list(add.partition_keys) == keys
        [request] = result.run_requests  # the broken file makes none, and stops no other
        subset = request.asset_graph_subset
        assert subset is not None  # a backfill, split into runs by the backfill policy
        wanted = {
            (k.asset_key.path[-1], k.partition_key) for k in subset.iterate_asset_partitions()
        }
        assert wanted == {
            *((asset, key) for asset in PARTITIONED_INGEST for key in keys),
            ("unique_images", None),
        }
        for asset in assets:
            if asset.partitions_def is not None:
                assert asset.backfill_policy == dg.BackfillPolicy.multi_run(2)

        # Seen once: the next tick starts nothing, and says why.
        instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, keys)
        again = sensor.evaluate_tick(
            dg.build_sensor_context(
                instance=instance, repository_def=repository, cursor=result.cursor
            )
        )
        assert not again.run_requests
        assert "no new or changed manifest" in again.skip_message


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(params=["local folder", "s3"])
def partition_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageResource]:
    """The storage root of a partitioned ingest: a folder, or a bucket of moto's S3 (the
    tasks then read and write the bucket, each in its own temporary copy)."""
    if request.param == "local folder":
        yield StorageResource(root=str(tmp_path / "data"))
        return
    from tests.test_storage import moto_s3_server

    with moto_s3_server() as s3:
        yield StorageResource(
            root=s3.url("partitioned"),
            cache_dir=str(tmp_path / "cache"),
            storage_options=s3.storage_options,
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_range_of_partitions_is_sharded_at_once_on_ray_into_the_same_bytes(
    tmp_path: Path, demo_site, partition_root: StorageResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install -e '.[ray]')")
    from pipelines.resources import RayResource
    from tests.test_cluster_ray import RAY_ENV

    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    server, incoming = demo_site
    _drop_manifest(server, incoming, "first.csv", slice(0, 20))
    assets = _assets(batch_rows=12)
    keys = ["first.csv@0000", "first.csv@0001"]
    storage = partition_root
    data = storage.layout.root  # the root itself, or its working copy here
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, keys)

        def materialise(selection: list[str], key: str | None = None):  # noqa: ANN202
            return _materialise(instance, tmp_path, assets, selection, key, storage)

        for key in keys:
            materialise(["listing_manifest", "raw_images"], key)
        materialise(["unique_images"])
        local = {key: materialise(["car_shards"], key) for key in keys}
        local_versions = {k: shards.data_version_of(data / "shards" / k) for k in keys}

        # Both partitions in one run (as a backfill's range gives it), on a local Ray head.
        result = dg.materialize(
            assets,
            selection=["car_shards"],
            resources={
                **_resources(tmp_path, storage),
                "ray_cluster": RayResource(address="local"),
            },
            instance=instance,
            run_config={"ops": {"car_shards": {"config": {"force": True}}}},
            tags={
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[1],
            },
        )
        assert result.success
        [event] = result.get_asset_materialization_events()[:1]
        metadata = event.step_materialization_data.materialization.metadata
        assert metadata["skipped"].value is False
        assert metadata["engine"].value == "ray (local)"
        assert metadata["partition_versions"].value == local_versions
        assert {k: local[k]["car_shards"].metadata["data_version"].value for k in keys} == (
            local_versions
        )
        assert metadata["partitions"].value[keys[0]]["written"] > 0
    # Each partition's folder holds one committed generation, written by its task (and, for
    # S3, pulled back here), with no sort runs left behind.
    for key in keys:
        assert shards.data_version_of(data / "shards" / key) == local_versions[key]
        assert not list((data / "shards" / key).glob(".runs-*"))
        assert shards.read_summary(data / "shards" / key)["generation"] == 2

    # Bad input inside a task comes back as the one-line error it is, not Ray's wrapper.
    from carmodels.cluster import FanoutConfig
    from carmodels.shards_fanout import build_partitions_on_ray

    with pytest.raises(InputError, match="no kept images") as error:
        build_partitions_on_ray(
            storage.storage_root.url if storage.storage_root.is_remote else str(data),
            ["gone.csv@0000"],
            shards.ShardConfig(),
            FanoutConfig(address="local"),
            local_root=data,
            storage_options=storage.storage_options or None,
        )
    assert "\n" not in str(error.value)
