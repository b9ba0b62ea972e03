"""Start ingest when a manifest file is added to (or changed in) a watched folder."""

import json

import dagster as dg

from carmodels import watch
from carmodels.errors import InputError
from carmodels.watch import changed_manifests, scan_manifests
from pipelines.assets import ListingManifestConfig
from pipelines.jobs import ingest_job
from pipelines.partitioned import (
    INCOMING_DIR,
    MANIFEST_PARTITIONS,
    WATCH_DIR_ENV,
    ManifestPartitionsConfig,
    watched_folder,
)
from pipelines.schedules import automation_enabled

__all__ = [
    "INCOMING_DIR",
    "WATCH_DIR_ENV",
    "automation_sensor",
    "build_manifest_sensor",
    "manifest_sensor",
    "watched_folder",
]

#: Seconds between folder scans.
SENSOR_INTERVAL_S = 60


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=(
        dg.DefaultSensorStatus.RUNNING if automation_enabled() else dg.DefaultSensorStatus.STOPPED
    ),
    description="Ingests each manifest (CSV, Parquet, JSONL) added to or changed in the folder "
    f"${WATCH_DIR_ENV} (default: <data>/incoming).",
)
def manifest_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = scan_manifests(watched_folder())
    run_requests = [
        dg.RunRequest(
            # One run per version of a file: a rescan never starts the same ingest twice.
            run_key=f"{path}:{state.token()}",
            run_config={"ops": {"listing_manifest": {"config": {"manifest_path": path}}}},
            tags={"carmodels/manifest": path},
        )
        for path, state in changed_manifests(current, previous)
    ]
    cursor = json.dumps({path: state.token() for path, state in current.items()}, sort_keys=True)
    if not run_requests:
        return dg.SensorResult(
            skip_reason=f"no new or changed manifest in {watched_folder()}", cursor=cursor
        )
    return dg.SensorResult(run_requests=run_requests, cursor=cursor)


#: Evaluates the assets' automation conditions (evaluation, promotion and designs follow a new
#: generator). Off by default like the schedule; on with CARMODELS_AUTOMATION=on.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=(
        dg.DefaultSensorStatus.RUNNING if automation_enabled() else dg.DefaultSensorStatus.STOPPED
    ),
    description="Runs evaluation, promotion and design sampling after each newly trained model.",
)


#: The assets a manifest's partitions are ingested through, in the order they run.
PARTITIONED_INGEST = ("listing_manifest", "raw_images", "car_shards")
DEDUP_ASSET = "unique_images"


def build_manifest_sensor(settings: ManifestPartitionsConfig) -> dg.SensorDefinition:
    """The manifest sensor for the ingest in force: without partitions, one ingest run per new
    or changed file (`manifest_sensor`); with them, the file's partitions are added and
    ingested by one backfill, which its backfill policy splits into runs of
    ``partitions_per_run`` partitions."""
    if not settings.enabled:
        return manifest_sensor

    @dg.sensor(
        name="manifest_sensor",
        # A sensor that asks for backfills names the assets they may cover.
        asset_selection=dg.AssetSelection.assets(*PARTITIONED_INGEST, DEDUP_ASSET),
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=(
            dg.DefaultSensorStatus.RUNNING
            if automation_enabled()
            else dg.DefaultSensorStatus.STOPPED
        ),
        description="Adds a partition per batch of each manifest (CSV, Parquet, JSONL) added "
        f"to or changed in the folder ${WATCH_DIR_ENV} (default: <data>/incoming) and "
        "backfills them.",
    )
    def partitioned_manifest_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        folder = watched_folder()
        current = scan_manifests(folder)
        listing = ListingManifestConfig()  # url_column and row_filter, from the config file
        existing = set(context.instance.get_dynamic_partitions(MANIFEST_PARTITIONS.name))
        added: list[str] = []
        requests: list[dg.RunRequest] = []
        problems: list[str] = []
        for path, _ in changed_manifests(current, previous):
            try:
                keys = watch.manifest_partition_keys(
                    path,
                    settings.batch_rows,
                    url_column=listing.url_column,
                    row_filter=listing.row_filter,
                )
            except InputError as exc:
                # One bad file does not hold up the others; it is tried again once it changes.
                context.log.warning(str(exc))
                problems.append(str(exc))
                continue
            added += [key for key in keys if key not in existing]
            requests.append(_backfill_request(context, keys, manifest=path))
        cursor = json.dumps(
            {path: state.token() for path, state in current.items()}, sort_keys=True
        )
        if not requests:
            reason = f"no new or changed manifest in {folder}"
            return dg.SensorResult(
                skip_reason="; ".join([reason, *problems]) if problems else reason, cursor=cursor
            )
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=(
                [MANIFEST_PARTITIONS.build_add_request(added)] if added else []
            ),
            cursor=cursor,
        )

    return partitioned_manifest_sensor


def _backfill_request(
    context: dg.SensorEvaluationContext, keys: list[str], manifest: str
) -> dg.RunRequest:
    """A request the sensor daemon turns into a backfill of ``keys`` through the ingest assets
    and the dedup (which runs once, after every download of the backfill)."""
    # AssetGraphSubset is not public API, but a backfill from a sensor has no other door.
    from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
    from dagster._core.definitions.events import AssetKeyPartitionKey

    wanted = {
        AssetKeyPartitionKey(dg.AssetKey(asset), key)
        for asset in PARTITIONED_INGEST
        for key in keys
    } | {AssetKeyPartitionKey(dg.AssetKey(DEDUP_ASSET), None)}
    subset = AssetGraphSubset.from_asset_partition_set(
        wanted, context.repository_def.asset_graph, validate_time_range=False
    )
    return dg.RunRequest.for_asset_graph_subset(subset, tags={"carmodels/manifest": manifest})
