"""The Dagster code location: assets, resources, and their settings."""

from __future__ import annotations

import dagster as dg

from pipelines.assets import ALL_ASSETS
from pipelines.designs import DESIGN_ASSETS
from pipelines.jobs import ingest_job, retrain_job
from pipelines.promotion import PROMOTION_ASSETS, PROMOTION_CHECKS
from pipelines.resources import StorageResource, default_settings
from pipelines.schedules import retrain_schedule
from pipelines.sensors import automation_sensor, manifest_sensor

defs = dg.Definitions(
    assets=[*ALL_ASSETS, *PROMOTION_ASSETS, *DESIGN_ASSETS],
    asset_checks=PROMOTION_CHECKS,
    jobs=[retrain_job, ingest_job],
    schedules=[retrain_schedule],
    sensors=[manifest_sensor, automation_sensor],
    resources={
        "storage": StorageResource(),
        "settings": default_settings(),
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    },
)
