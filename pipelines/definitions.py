"""The Dagster code location: assets, resources, and their settings.

The profile (``$CARMODELS_PROFILE``, `demo` or `full`) picks a set of resources here, once;
the project config file (:mod:`pipelines.project_config`) gives every asset's config its
defaults.
"""

from __future__ import annotations

import dagster as dg

from pipelines.assets import ALL_ASSETS, missing_source_reason
from pipelines.designs import DESIGN_ASSETS
from pipelines.jobs import ingest_job, partitioned_retrain_job, retrain_job
from pipelines.partitioned import MANIFEST_PARTITIONS, build_partitioned_assets, partition_settings
from pipelines.pipes import pipes_subprocess_client
from pipelines.project_config import check_asset_names, registered_configs
from pipelines.promotion import PROMOTION_ASSETS, PROMOTION_CHECKS
from pipelines.resources import ListingSource, StorageResource, resources_from_environment
from pipelines.schedules import build_retrain_schedule
from pipelines.sensors import automation_sensor, build_manifest_sensor

check_asset_names(registered_configs())
profile = resources_from_environment()
listing_source: ListingSource = profile["listing_source"]  # type: ignore[assignment]
partitions = partition_settings()

if partitions.enabled:
    # Each manifest file (or batch of one) is a partition of the ingest (docs/scale.md).
    ingest_assets = build_partitioned_assets(partitions)
    ingest_keys = {asset.key for asset in ingest_assets}
    assets = [*ingest_assets, *(a for a in ALL_ASSETS if a.key not in ingest_keys)]
    retrain_schedule = build_retrain_schedule(
        None, partitioned_retrain_job, partitions=MANIFEST_PARTITIONS.name
    )
    jobs = [partitioned_retrain_job, ingest_job]
else:
    assets = list(ALL_ASSETS)
    retrain_schedule = build_retrain_schedule(missing_source_reason(listing_source))
    jobs = [retrain_job, ingest_job]

defs = dg.Definitions(
    assets=[*assets, *PROMOTION_ASSETS, *DESIGN_ASSETS],
    asset_checks=PROMOTION_CHECKS,
    jobs=jobs,
    schedules=[retrain_schedule],
    sensors=[build_manifest_sensor(partitions), automation_sensor],
    resources={
        "storage": StorageResource(),
        "pipes_subprocess_client": pipes_subprocess_client(),
        **profile,
    },
)
