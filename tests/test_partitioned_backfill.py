"""A backfill of manifest partitions, run by the real Dagster daemon on a PostgreSQL instance.

Four partitions (one manifest of the demo catalog in batches of 4 URLs) are backfilled through
`listing_manifest` and `raw_images`, whose backfill policy puts at most 2 partitions in a run:
the daemon must launch 2 runs, not 4, and every partition must be downloaded. The code location
is the project's own (`workspace.yaml` → `pipelines.definitions`), with partitioning switched on
by a project config file, as a user switches it on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.execution.backfill import BulkActionStatus

from carmodels import shards, watch
from carmodels.demo.server import DemoServer
from pipelines.partitioned import (
    MANIFEST_PARTITIONS,
    ManifestPartitionsConfig,
    build_partitioned_assets,
)
from tests import test_postgres
from tests.conftest import stop_process_group

# The throwaway PostgreSQL server, as tests/test_postgres.py starts it (once per module).
postgres_server = test_postgres.postgres_server


@pytest.fixture
def postgres_home(
    postgres_server: test_postgres.PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A DAGSTER_HOME holding the documented PostgreSQL example, on a database of its own: the
    tests here read back every backfill and partition the instance holds, so one test's must
    not show in the next."""
    database = f"dagster_{uuid.uuid4().hex[:8]}"
    connection = postgres_server.connect()
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {database}")
    finally:
        connection.close()
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(test_postgres.EXAMPLE_CONFIG, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": postgres_server.host,
        "DAGSTER_PG_PORT": str(postgres_server.port),
        "DAGSTER_PG_USERNAME": postgres_server.username,
        "DAGSTER_PG_PASSWORD": postgres_server.password,
        "DAGSTER_PG_DB": database,
    }.items():
        monkeypatch.setenv(name, value)
    return home


REPO = Path(__file__).resolve().parents[1]
BATCH_ROWS = 4
PARTITIONS_PER_RUN = 2
N_PARTITIONS = 4
#: The backfill daemon looks at backfills every 30 s: a backfill takes a look per stage
#: (launch, then see its runs done) plus the runs, 1.5-4 min on 2 busy cores; this leaves
#: room for a slower machine rather than fail a run that is merely slow.
BACKFILL_TIMEOUT_S = 480


def _backfill(instance: dg.DagsterInstance, settings: ManifestPartitionsConfig, keys: list[str]):
    """Request the backfill as the UI's "Materialize selected partitions" does."""
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
    from dagster._core.execution.backfill import PartitionBackfill

    asset_graph = AssetGraph.from_assets(build_partitioned_assets(settings))
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=uuid.uuid4().hex[:8],
        asset_graph=asset_graph,
        partition_names=keys,
        asset_selection=[dg.AssetKey("listing_manifest"), dg.AssetKey("raw_images")],
        backfill_timestamp=time.time(),
        tags={},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=None,
        description=None,
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


@contextlib.contextmanager
def _daemon_on_partitions(
    tmp_path: Path, settings: ManifestPartitionsConfig, automation: bool
) -> Iterator[tuple[DemoServer, Path, subprocess.Popen, Path]]:
    """The demo catalog served, a watched folder, and `dagster-daemon run` on the project's
    workspace with partitioning switched on by a project config file."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    project_config = tmp_path / "carmodels.yaml"
    project_config.write_text(
        yaml.safe_dump(
            {
                "manifest_partitions": {"config": settings.model_dump()},
                # The demo server listens on loopback: its URLs need the opt-in.
                "raw_images": {"config": {"allow_private_networks": True}},
            }
        )
    )
    log_path = tmp_path / "daemon.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CARMODELS_", "RAY_"))
    }
    env.update(
        CARMODELS_PROFILE="demo",
        CARMODELS_CONFIG=str(project_config),
        CARMODELS_DATA=str(tmp_path / "data"),
        CARMODELS_WATCH_DIR=str(incoming),
        CARMODELS_AUTOMATION="on" if automation else "off",
    )
    with DemoServer(n_listings=12) as server:
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("dagster-daemon")),
                    "run",
                    "-w",
                    "workspace.yaml",
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield server, incoming, daemon, log_path
        finally:
            stop_process_group(daemon)


def _drop_manifest(server: DemoServer, incoming: Path) -> list[str]:
    frame = server.catalog.manifest_frame(server.base_url).iloc[: BATCH_ROWS * N_PARTITIONS]
    frame.to_csv(incoming / "cars.csv", index=False)
    keys = watch.manifest_partition_keys(incoming / "cars.csv", BATCH_ROWS)
    assert len(keys) == N_PARTITIONS
    return keys


def _wait(what: str, done, daemon: subprocess.Popen, log_path: Path):  # noqa: ANN001, ANN202
    """Poll ``done()`` until it returns something, failing with the daemon's log."""
    deadline = time.monotonic() + BACKFILL_TIMEOUT_S
    while True:
        value = done()
        if value:
            return value
        if daemon.poll() is not None:
            pytest.fail(f"the daemon exited:\n{log_path.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what} not done after {BACKFILL_TIMEOUT_S} s:\n{log_path.read_text()[-5000:]}"
            )
        time.sleep(2)


def _wait_for_success(
    instance: dg.DagsterInstance, backfill_id: str, daemon: subprocess.Popen, log_path: Path
) -> None:
    def finished():  # noqa: ANN202
        backfill = instance.get_backfill(backfill_id)
        return None if backfill.status == BulkActionStatus.REQUESTED else backfill

    backfill = _wait("the backfill", finished, daemon, log_path)
    assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS, (
        backfill.status,
        log_path.read_text()[-5000:],
    )


SETTINGS = ManifestPartitionsConfig(
    enabled=True, batch_rows=BATCH_ROWS, partitions_per_run=PARTITIONS_PER_RUN
)


@pytest.mark.slow
@pytest.mark.timeout(BACKFILL_TIMEOUT_S + 120)
def test_a_daemon_backfill_of_four_partitions_makes_two_runs(
    postgres_home: Path, tmp_path: Path
) -> None:
    with _daemon_on_partitions(tmp_path, SETTINGS, automation=False) as (
        server,
        incoming,
        daemon,
        log_path,
    ):
        keys = _drop_manifest(server, incoming)
        with dg.DagsterInstance.from_config(str(postgres_home)) as instance:
            instance.add_dynamic_partitions(MANIFEST_PARTITIONS.name, keys)
            backfill_id = _backfill(instance, SETTINGS, keys)
            _wait_for_success(instance, backfill_id, daemon, log_path)
            runs = instance.get_runs(filters=dg.RunsFilter.for_backfill(backfill_id))
            assert len(runs) == N_PARTITIONS // PARTITIONS_PER_RUN
            assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
            ranges = sorted(
                (
                    run.tags["dagster/asset_partition_range_start"],
                    run.tags["dagster/asset_partition_range_end"],
                )
                for run in runs
            )
            assert ranges == [(keys[0], keys[1]), (keys[2], keys[3])]
            for asset in ("listing_manifest", "raw_images"):
                done = instance.get_materialized_partitions(dg.AssetKey(asset))
                assert done == set(keys), asset
    # Each partition downloaded into its own folder.
    for key in keys:
        assert any((tmp_path / "data" / "raw" / key).glob("raw-*.parquet")), key


@pytest.mark.slow
@pytest.mark.timeout(BACKFILL_TIMEOUT_S + 120)
def test_a_dropped_manifest_is_ingested_by_the_sensors_backfill_to_training_shards(
    postgres_home: Path, tmp_path: Path
) -> None:
    """Automation on: the sensor adds the file's partitions and its backfill runs them through
    download (2 runs), one dedup, and the shards (2 runs)."""
    with _daemon_on_partitions(tmp_path, SETTINGS, automation=True) as (
        server,
        incoming,
        daemon,
        log_path,
    ):
        keys = _drop_manifest(server, incoming)
        with dg.DagsterInstance.from_config(str(postgres_home)) as instance:

            def backfill_ids() -> list[str]:
                return [
                    b.backfill_id
                    for b in instance.get_backfills()
                    if b.tags.get("carmodels/manifest") == str((incoming / "cars.csv").resolve())
                ]

            [backfill_id] = _wait("the sensor's backfill", backfill_ids, daemon, log_path)
            _wait_for_success(instance, backfill_id, daemon, log_path)
            assert sorted(instance.get_dynamic_partitions(MANIFEST_PARTITIONS.name)) == keys
            for asset in ("listing_manifest", "raw_images", "car_shards"):
                done = instance.get_materialized_partitions(dg.AssetKey(asset))
                assert done == set(keys), asset
            runs = instance.get_runs(filters=dg.RunsFilter.for_backfill(backfill_id))
            assert len(runs) == 5, [run.asset_selection for run in runs]
            assert instance.get_latest_materialization_event(dg.AssetKey("unique_images"))
    # Every partition's shards, read as one set, as the trainer reads them.
    assert len(shards.load_images(tmp_path / "data" / "shards")) > 0
