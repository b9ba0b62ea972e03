"""Asset jobs that schedules and sensors launch."""

import dagster as dg

#: Everything from crawling to evaluation: what a retraining run refreshes.
retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("evaluate_dcgan").upstream(),
    description="Refresh ingest (only new URLs are downloaded), then train and evaluate.",
)

#: Ingest only: from a manifest to training shards.
ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets("car_shards").upstream(),
    description="Read a manifest, download new images, dedup and shard them.",
)
