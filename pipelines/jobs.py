"""Asset jobs that schedules and sensors launch."""

import dagster as dg

#: Everything from crawling to evaluation: what a retraining run refreshes.
retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("evaluate_dcgan").upstream(),
    description="Refresh ingest (only new URLs are downloaded), then train and evaluate.",
)

#: Under partitioned ingest every manifest is ingested when it arrives (the manifest sensor),
#: and a run cannot hold every partition at once: retraining reads the partitions as they are.
partitioned_retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("train_dcgan", "evaluate_dcgan"),
    description="Train on every ingested manifest partition, then evaluate.",
)

#: Ingest only: from a manifest to training shards.
ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets("car_shards").upstream(),
    description="Read a manifest, download new images, dedup and shard them.",
)
