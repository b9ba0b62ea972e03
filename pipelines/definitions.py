"""The Dagster code location: assets, resources, and their settings.

The profile (``$CARMODELS_PROFILE``, `demo` or `full`) picks a set of resources here, once;
the project config file (:mod:`pipelines.project_config`) gives every asset's config its
defaults.
"""

from __future__ import annotations

import dagster as dg

from pipelines.assets import ALL_ASSETS, missing_source_reason
from pipelines.designs import DESIGN_ASSETS
from pipelines.jobs import ingest_job, retrain_job
from pipelines.pipes import pipes_subprocess_client
from pipelines.project_config import check_asset_names, registered_configs
from pipelines.promotion import PROMOTION_ASSETS, PROMOTION_CHECKS
from pipelines.resources import ListingSource, StorageResource, resources_from_environment
from pipelines.schedules import build_retrain_schedule
from pipelines.sensors import automation_sensor, manifest_sensor

check_asset_names(registered_configs())
profile = resources_from_environment()
listing_source: ListingSource = profile["listing_source"]  # type: ignore[assignment]

defs = dg.Definitions(
    assets=[*ALL_ASSETS, *PROMOTION_ASSETS, *DESIGN_ASSETS],
    asset_checks=PROMOTION_CHECKS,
    jobs=[retrain_job, ingest_job],
    schedules=[build_retrain_schedule(missing_source_reason(listing_source))],
    sensors=[manifest_sensor, automation_sensor],
    resources={
        "storage": StorageResource(),
        "pipes_subprocess_client": pipes_subprocess_client(),
        **profile,
    },
)
