"""Data versions and skip-when-unchanged: rematerialising with unchanged inputs does no work."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from carmodels import versioning
from pipelines.assets import car_shards, listing_manifest, raw_images, unique_images
from pipelines.resources import StorageResource, profile_resources
from pipelines.versioning import DATA_VERSION_TAG, FINGERPRINT_KEY, SKIPPED_KEY

INGEST = [listing_manifest, raw_images, unique_images, car_shards]
NAMES = [asset.key.path[-1] for asset in INGEST]
DEMO_LISTINGS = 40


def _materialise(
    instance: dg.DagsterInstance,
    storage: StorageResource,
    settings: dict[str, dg.ConfigurableResource],
    run_config: dict | None = None,
) -> dict[str, dg.AssetMaterialization]:
    result = dg.materialize(
        INGEST,
        resources={"storage": storage, **settings},
        instance=instance,
        run_config=run_config or {},
    )
    assert result.success
    return {
        event.asset_key.path[-1]: event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
    }


def _files(folder: Path) -> dict[str, int]:
    """Name -> modification time of every file below ``folder``."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("caching")
    storage = StorageResource(root=str(root / "data"))
    settings = profile_resources("demo", demo_listings=DEMO_LISTINGS)
    (root / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        first = _materialise(instance, storage, settings)
        files_after_first = _files(root / "data")
        second = _materialise(instance, storage, settings)
        files_after_second = _files(root / "data")
        forced = _materialise(
            instance,
            storage,
            settings,
            run_config={"ops": {"car_shards": {"config": {"force": True}}}},
        )
        grown_settings = profile_resources("demo", demo_listings=DEMO_LISTINGS + 12)
        grown = _materialise(instance, storage, grown_settings)
        yield {
            "first": first,
            "second": second,
            "forced": forced,
            "grown": grown,
            "files_after_first": files_after_first,
            "files_after_second": files_after_second,
            "root": root / "data",
        }


def _version(materialization: dg.AssetMaterialization) -> str:
    return materialization.tags[DATA_VERSION_TAG]


@pytest.mark.slow
def test_every_asset_reports_a_content_data_version(ingested) -> None:
    for name in NAMES:
        version = _version(ingested["first"][name])
        assert len(version) == versioning.VERSION_LENGTH, name
    manifest = pd.read_parquet(ingested["root"] / "manifest" / "listings.parquet")
    # The manifest on disk is the last one written (the grown catalog).
    assert _version(ingested["grown"]["listing_manifest"]) == versioning.frame_version(manifest)


@pytest.mark.slow
def test_unchanged_inputs_skip_the_work_and_keep_the_versions(ingested) -> None:
    first, second = ingested["first"], ingested["second"]
    for name in NAMES:
        assert _version(second[name]) == _version(first[name]), name
    for name in ("raw_images", "unique_images", "car_shards"):
        assert second[name].metadata[SKIPPED_KEY].value is True, name
        assert first[name].metadata[SKIPPED_KEY].value is False, name
        # The skipped result repeats what was computed, so the UI still shows it.
        assert second[name].metadata["elapsed_s"] == first[name].metadata["elapsed_s"]
    # Nothing was rewritten except the (always re-read, cheap) manifest.
    changed = {
        name
        for name, mtime in ingested["files_after_second"].items()
        if ingested["files_after_first"].get(name) != mtime
    }
    assert changed <= {"manifest/listings.parquet"}, changed


@pytest.mark.slow
def test_force_reruns_and_identical_output_keeps_its_version(ingested) -> None:
    forced = ingested["forced"]["car_shards"]
    assert forced.metadata[SKIPPED_KEY].value is False
    # The shards were rewritten (a new generation), with the same content: same version, so
    # nothing downstream becomes unsynced.
    assert _version(forced) == _version(ingested["first"]["car_shards"])
    assert ingested["forced"]["raw_images"].metadata[SKIPPED_KEY].value is True


@pytest.mark.slow
def test_new_listings_change_the_versions_and_rerun_the_chain(ingested) -> None:
    first, grown = ingested["first"], ingested["grown"]
    for name in NAMES:
        assert _version(grown[name]) != _version(first[name]), name
    for name in ("raw_images", "unique_images", "car_shards"):
        assert grown[name].metadata[SKIPPED_KEY].value is False, name
        assert (
            grown[name].metadata[FINGERPRINT_KEY].value
            != first[name].metadata[FINGERPRINT_KEY].value
        )
    # Only what was not already downloaded was fetched: every image fetched before is reused.
    raw_first, raw_grown = first["raw_images"].metadata, grown["raw_images"].metadata
    assert raw_grown["skipped_existing"].value >= raw_first["ok"].value
    assert raw_grown["fetched"].value < raw_grown["urls"].value - raw_first["ok"].value + 1


def test_frame_version_ignores_row_order_but_not_content() -> None:
    frame = pd.DataFrame({"url": ["a", "b", "c"], "year": [2001, 2002, 2003]})
    assert versioning.frame_version(frame) == versioning.frame_version(frame.iloc[::-1])
    changed = frame.assign(year=[2001, 2002, 2004])
    assert versioning.frame_version(frame) != versioning.frame_version(changed)


def test_contents_version_ignores_names_but_not_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    contents, names = versioning.contents_version([a, b]), versioning.files_version([a, b])
    c = a.rename(tmp_path / "c.bin")
    assert versioning.contents_version([c, b]) == contents
    assert versioning.files_version([c, b]) != names
    b.write_bytes(b"three")
    assert versioning.contents_version([c, b]) != contents
