"""Scheduled retraining and the manifest-folder sensor."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import dagster as dg
import pytest

from carmodels.watch import changed_manifests, scan_manifests
from pipelines import schedules, sensors
from pipelines.definitions import defs


def _evaluate(cursor: str | None) -> dg.SensorResult:
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(cursor=cursor, instance=instance)
        return sensors.manifest_sensor(context)


def _touch(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_scan_ignores_hidden_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "listings.csv").write_text("url\nhttps://a/x.jpg\n")
    (tmp_path / ".listings.csv.swp").write_text("partial")
    (tmp_path / "notes.txt").write_text("not a manifest")
    assert [Path(p).name for p in scan_manifests(tmp_path)] == ["listings.csv"]
    assert scan_manifests(tmp_path / "missing") == {}


def test_changed_manifests_compares_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _touch(path, '{"url": "https://a/x.jpg"}\n', 1_000)
    current = scan_manifests(tmp_path)
    previous = {p: s.token() for p, s in current.items()}
    assert changed_manifests(current, previous) == []
    _touch(path, '{"url": "https://a/y.jpg"}\n', 2_000)
    assert [Path(p).name for p, _ in changed_manifests(scan_manifests(tmp_path), previous)] == [
        "a.jsonl"
    ]


def test_sensor_requests_one_ingest_per_new_or_changed_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sensors.WATCH_DIR_ENV, str(tmp_path))
    first = _evaluate(None)
    assert not first.run_requests
    assert "no new or changed manifest" in first.skip_reason.skip_message

    manifest = tmp_path / "week1.csv"
    _touch(manifest, "url\nhttps://a/x.jpg\n", 1_000)
    added = _evaluate(first.cursor)
    assert len(added.run_requests) == 1
    request = added.run_requests[0]
    config = request.run_config["ops"]["listing_manifest"]["config"]
    assert config["manifest_path"] == str(manifest.resolve())

    unchanged = _evaluate(added.cursor)
    assert not unchanged.run_requests

    _touch(manifest, "url\nhttps://a/x.jpg\nhttps://a/y.jpg\n", 2_000)
    changed = _evaluate(unchanged.cursor)
    assert len(changed.run_requests) == 1
    assert changed.run_requests[0].run_key != request.run_key


def test_sensor_targets_the_ingest_job() -> None:
    sensor = defs.resolve_sensor_def("manifest_sensor")
    assert sensor.job_name == "ingest"
    ingest = defs.resolve_job_def("ingest")
    keys = {key.path[-1] for key in ingest.asset_layer.executable_asset_keys}
    assert keys == {"listing_manifest", "raw_images", "unique_images", "car_shards"}


def test_retrain_schedule_refreshes_ingest_then_trains_and_evaluates() -> None:
    schedule = defs.resolve_schedule_def("weekly_retrain")
    assert schedule.cron_schedule == schedules.DEFAULT_RETRAIN_CRON
    retrain = defs.resolve_job_def(schedule.job_name)
    keys = {key.path[-1] for key in retrain.asset_layer.executable_asset_keys}
    assert keys == {
        "listing_manifest",
        "raw_images",
        "unique_images",
        "car_shards",
        "train_dcgan",
        "evaluate_dcgan",
    }


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, dg.DefaultScheduleStatus.STOPPED), ("on", dg.DefaultScheduleStatus.RUNNING)],
)
def test_automation_is_off_by_default_and_on_with_one_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, expected: dg.DefaultScheduleStatus
) -> None:
    if setting is None:
        monkeypatch.delenv(schedules.AUTOMATION_ENV, raising=False)
    else:
        monkeypatch.setenv(schedules.AUTOMATION_ENV, setting)
    monkeypatch.setenv(schedules.RETRAIN_CRON_ENV, "30 2 * * 0")
    reloaded = importlib.reload(schedules)
    try:
        schedule = reloaded.build_retrain_schedule(missing_source=None)
        assert schedule.default_status == expected
        assert schedule.cron_schedule == "30 2 * * 0"
        sensor_module = importlib.reload(sensors)
        assert sensor_module.manifest_sensor.default_status.value == expected.value
        assert sensor_module.automation_sensor.default_status.value == expected.value
    finally:
        monkeypatch.undo()
        importlib.reload(schedules)
        importlib.reload(sensors)


AFTER_TRAINING = ["evaluate_dcgan", "champion_generator", "design_samples", "restoration_examples"]


def _requested(result: dg.EvaluateAutomationConditionsResult) -> set[str]:
    return {
        key.path[-1]
        for key in (dg.AssetKey(name) for name in AFTER_TRAINING + ["train_dcgan", "car_shards"])
        if result.get_num_requested(key) > 0
    }


def test_steps_after_training_follow_a_new_generator_declaratively() -> None:
    assets = defs.resolve_asset_graph()
    for name in AFTER_TRAINING:
        assert assets.get(dg.AssetKey(name)).automation_condition is not None, name
    # Ingest and training stay with their schedule, sensor and people: never automatic.
    for name in ("listing_manifest", "raw_images", "unique_images", "car_shards", "train_dcgan"):
        assert assets.get(dg.AssetKey(name)).automation_condition is None, name

    with dg.instance_for_test() as instance:
        for name in ["listing_manifest", "raw_images", "unique_images", "car_shards"]:
            instance.report_runless_asset_event(dg.AssetMaterialization(name))
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        # Nothing was trained yet: nothing after training runs.
        assert _requested(first) == set()

        instance.report_runless_asset_event(dg.AssetMaterialization("train_dcgan"))
        trained = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=first.cursor
        )
        # A new generator: evaluate it, and in the same run decide on promotion and redraw
        # the designs and restorations (each waits for the step before it).
        assert _requested(trained) == set(AFTER_TRAINING)

        again = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, cursor=trained.cursor
        )
        assert _requested(again) == set()


def test_gpu_and_scraping_steps_sit_in_one_slot_pools() -> None:
    assets = defs.resolve_asset_graph()
    pools = {key.path[-1]: assets.get(key).pools for key in assets.get_all_asset_keys()}
    for name in ("train_dcgan", "evaluate_dcgan", "design_samples", "restoration_examples"):
        assert pools[name] == {"gpu"}, name
    for name in ("listing_manifest", "raw_images"):
        assert pools[name] == {"scrape"}, name
    instance_config = Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml"
    assert "default_limit: 1" in instance_config.read_text()
