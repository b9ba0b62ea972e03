"""Start ingest when a manifest file is added to (or changed in) a watched folder."""

import json
import os
from pathlib import Path

import dagster as dg

from carmodels.layout import default_data_root_url
from carmodels.watch import changed_manifests, scan_manifests
from pipelines.jobs import ingest_job
from pipelines.schedules import automation_enabled

#: Folder watched for manifests; default `<data root>/incoming`.
WATCH_DIR_ENV = "CARMODELS_WATCH_DIR"
#: Seconds between folder scans.
SENSOR_INTERVAL_S = 60


#: Default watched folder below a local data root (or the current folder for a remote root).
INCOMING_DIR = "incoming"


def watched_folder() -> Path:
    if os.environ.get(WATCH_DIR_ENV):
        return Path(os.environ[WATCH_DIR_ENV])
    root = default_data_root_url()
    if "://" in root and not root.startswith("file://"):
        return Path(INCOMING_DIR)  # manifests arrive on this machine even when data is remote
    return Path(root.removeprefix("file://")) / INCOMING_DIR


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
