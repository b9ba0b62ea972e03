"""Partitioned ingest: each manifest file, or each fixed-size batch of a large one, is a Dagster
partition. Opt-in (`manifest_partitions: config: enabled: true` in the project config file);
off, the assets are the unpartitioned ones of :mod:`pipelines.assets`.

The graph keeps its assets and their names; what changes:

- `listing_manifest` and `raw_images` are partitioned by `manifests`. Partition
  ``listings.csv@0000`` is the first ``batch_rows`` distinct URLs of ``listings.csv`` in the
  watched folder (`carmodels.watch`); its files live in ``manifest/<key>/`` and ``raw/<key>/``,
  so partitions never touch each other's files and a failed one is retried alone.
- `unique_images` stays one asset over every partition, and decides only the photos it has not
  decided before (`carmodels.dedup.deduplicate_incremental`).
- `car_shards` is partitioned again: partition P normalises the images of P that the dedup
  kept, into ``shards/<P>/``; the trainer reads every partition's folder. On a Ray cluster,
  a run's partitions are built at once, one task each (`carmodels.shards_fanout`).
- A backfill of many partitions runs as few runs: each partitioned asset has
  ``BackfillPolicy.multi_run(partitions_per_run)``, so one run covers a range of partitions.

The manifest sensor adds a file's partitions when the file appears (or changes) and starts
runs over them, ``partitions_per_run`` at a time (:mod:`pipelines.sensors`).
"""

import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pydantic

from carmodels import dedup, watch
from carmodels.dedup.schema import PARTITION_COLUMN
from carmodels.errors import InputError
from carmodels.layout import (
    MANIFEST_DIR,
    RAW_DIR,
    SHARDS_DIR,
    UNIQUE_DIR,
    DataLayout,
    default_data_root_url,
)
from carmodels.scrape.raw import RAW_SHARD_GLOB
from carmodels.versioning import frame_version, source_version
from pipelines.assets import (
    CAR_SHARDS_SPEC,
    GROUP,
    RAW_IMAGES_SPEC,
    UNIQUE_IMAGES_SPEC,
    CarShardsConfig,
    ListingManifestConfig,
    RawImagesConfig,
    UniqueImagesConfig,
    _progress_logger,
    dedup_output,
    dedup_settings,
    download_listings,
    shard_settings,
    shards_output,
    write_listings,
)
from pipelines.project_config import defaults_from_file
from pipelines.resources import RayResource, StorageResource
from pipelines.versioning import (
    PARTITION_VERSIONS_KEY,
    Requires,
    Step,
    StepOutput,
    partition_data_version,
    run_partitioned_step,
    run_step,
)

#: Folder watched for manifests; default `<data root>/incoming`.
WATCH_DIR_ENV = "CARMODELS_WATCH_DIR"
#: Default watched folder below a local data root (or the current folder for a remote root).
INCOMING_DIR = "incoming"


def watched_folder() -> Path:
    """Where manifests arrive: ``$CARMODELS_WATCH_DIR``, else ``<data root>/incoming``."""
    if os.environ.get(WATCH_DIR_ENV):
        return Path(os.environ[WATCH_DIR_ENV])
    root = default_data_root_url()
    if "://" in root and not root.startswith("file://"):
        return Path(INCOMING_DIR)  # manifests arrive on this machine even when data is remote
    return Path(root.removeprefix("file://")) / INCOMING_DIR


#: The partitions: added by the manifest sensor (or by hand in the UI), one per batch.
MANIFEST_PARTITIONS = dg.DynamicPartitionsDefinition(name="manifests")


@defaults_from_file("manifest_partitions")
class ManifestPartitionsConfig(dg.Config):
    """Partitioned ingest (docs/scale.md): each manifest file in the watched folder
    ($CARMODELS_WATCH_DIR, default <data>/incoming) becomes one partition per `batch_rows` of
    its distinct URLs. Off by default: one listing source, no partitions. Read when the code
    location loads."""

    enabled: bool = False
    #: 1M URLs: about an hour of downloading at img2dataset-like rates on one machine, a
    #: unit worth retrying alone, and few enough partitions for 50M URLs (50) to list in the UI.
    batch_rows: int = pydantic.Field(
        default=1_000_000, ge=1, description="distinct URLs per partition of a manifest file"
    )
    #: A backfill starts about one run per second; several partitions per run keep the runs few.
    partitions_per_run: int = pydantic.Field(
        default=8, ge=1, description="partitions one backfill or sensor run covers at most"
    )


def partition_settings() -> ManifestPartitionsConfig:
    """The partitioning in force (the project config file's, else the defaults)."""
    return ManifestPartitionsConfig()


def build_partitioned_assets(settings: ManifestPartitionsConfig) -> list[dg.AssetsDefinition]:
    """The four ingest assets of a partitioned ingest (see the module docstring)."""
    partitioned = {
        "partitions_def": MANIFEST_PARTITIONS,
        "backfill_policy": dg.BackfillPolicy.multi_run(settings.partitions_per_run),
    }

    @dg.asset(
        name="listing_manifest",
        group_name=GROUP,
        code_version=source_version(["carmodels.scrape", "carmodels.watch"]),
        kinds={"python", "parquet"},
        **partitioned,
    )
    def listing_manifest(
        context: dg.AssetExecutionContext, config: ListingManifestConfig, storage: StorageResource
    ) -> dg.MaterializeResult:
        """A batch of a manifest file's listings, one row per distinct image URL."""
        if config.manifest_path or config.start_urls:
            raise dg.Failure(
                description=(
                    "listing_manifest: with manifest_partitions enabled, each partition is a "
                    f"batch of a manifest file in {watched_folder()}; remove `manifest_path` "
                    "and `start_urls` from its config (or disable manifest_partitions)."
                ),
                allow_retries=False,
            )
        folder = watched_folder()

        def work(layout: DataLayout, partition: str) -> StepOutput:
            started = time.monotonic()
            frame = watch.read_manifest_partition(
                folder,
                partition,
                settings.batch_rows,
                url_column=config.url_column,
                row_filter=config.row_filter,
            )
            file_name, batch = watch.parse_partition_key(partition)
            source = f"{folder / file_name} (batch {batch} of {settings.batch_rows} URLs)"
            return write_listings(
                frame, layout, f"{MANIFEST_DIR}/{partition}", source, {}, storage, started
            )

        return run_partitioned_step(
            context,
            storage,
            lambda p: Step(
                requires=None,
                upstream=(),
                output=f"{MANIFEST_DIR}/{p}",
                push=[f"{MANIFEST_DIR}/{p}"],
                cached=False,  # the file may change without the config changing
            ),
            settings_for=lambda p: config.model_dump(),
            force=False,
            work=work,
        )

    @dg.asset(name="raw_images", deps=[listing_manifest], **RAW_IMAGES_SPEC, **partitioned)
    def raw_images(
        context: dg.AssetExecutionContext,
        config: RawImagesConfig,
        storage: StorageResource,
        ray_cluster: RayResource,
    ) -> dg.MaterializeResult:
        """A partition's downloaded image bytes in raw Parquet shards, one row per URL with
        its outcome (fanned out on a Ray cluster when `ray_cluster` has an address)."""
        return run_partitioned_step(
            context,
            storage,
            lambda p: Step(
                requires=Requires(
                    "listing_manifest", f"{MANIFEST_DIR}/{p}", f"The listings of partition {p}"
                ),
                upstream=["listing_manifest"],
                output=f"{RAW_DIR}/{p}",
                pull=[f"{MANIFEST_DIR}/{p}"],
                push=[f"{RAW_DIR}/{p}"],
            ),
            settings_for=lambda p: config.fingerprint_settings(),
            force=config.force,
            work=lambda layout, p: download_listings(
                context,
                config,
                storage,
                ray_cluster,
                layout,
                f"{MANIFEST_DIR}/{p}",
                f"{RAW_DIR}/{p}",
            ),
        )

    @dg.asset(
        name="unique_images",
        deps=[raw_images],
        **UNIQUE_IMAGES_SPEC,
        # Runs over different partitions may end at once: one dedup at a time, since each
        # extends the record the previous one wrote.
        pool=DEDUP_POOL,
    )
    def unique_images(
        context: dg.AssetExecutionContext, config: UniqueImagesConfig, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Images left after removing exact and near duplicates across every partition;
        each run decides only the photos of partitions it has not seen (or that changed)."""
        partitions = context.instance.get_dynamic_partitions(MANIFEST_PARTITIONS.name)
        raw_versions = {
            p: partition_data_version(context.instance, "raw_images", p) for p in partitions
        }
        downloaded = sorted(p for p, version in raw_versions.items() if version is not None)

        def work(layout: DataLayout) -> StepOutput:
            present = {p: layout.raw_dir / p for p in downloaded if _has_raw_shards(layout, p)}
            if not present:
                raise InputError(
                    "unique_images: no manifest partition has been downloaded yet; "
                    "materialise `raw_images` for a partition first (the manifest sensor "
                    "does, for each file dropped into the watched folder)."
                )
            result = dedup.deduplicate_incremental(
                present,
                layout.unique_dir,
                dedup_settings(config),
                on_progress=_progress_logger(context, "hashed"),
            )
            output = dedup_output(result, storage)
            stale = [p for p in result.partitions_removed if storage.exists(f"{SHARDS_DIR}/{p}")]
            if stale:
                # Shards are the trainer's input: it reads every partition folder it finds.
                context.log.warning(
                    f"Partitions {', '.join(stale)} were removed, so their images left the "
                    f"dedup, but their shards are still in {storage.uri(SHARDS_DIR)}: delete those "
                    "folders before training, or training still reads them."
                )
            kept = pd.read_parquet(result.unique_path)
            output.metadata |= {
                "partitions": len(present),
                "partitions_new": len(result.partitions_new),
                "partitions_changed": len(result.partitions_changed),
                "partitions_removed": dg.MetadataValue.json(list(result.partitions_removed)),
                # Added but not downloaded yet: they join the next dedup after their download.
                "partitions_waiting": dg.MetadataValue.json(sorted(set(partitions) - set(present))),
                "decided": result.n_decided,
                # What each partition's shards are built from: car_shards[P] is redone only
                # when P's kept images change, not whenever another partition arrives.
                PARTITION_VERSIONS_KEY: {
                    str(p): _kept_version(rows)
                    for p, rows in kept.groupby(PARTITION_COLUMN, sort=True)
                },
            }
            return output

        return run_step(
            context,
            storage,
            Step(
                requires=Requires("raw_images", RAW_DIR, "Raw image shards"),
                upstream=(),  # the partitions' versions are in the settings below
                output=UNIQUE_DIR,
                pull=[RAW_DIR],
                push=[UNIQUE_DIR],
            ),
            settings={
                **config.fingerprint_settings(),
                "raw_partitions": {p: raw_versions[p] for p in downloaded},
            },
            force=config.force,
            work=work,
        )

    @dg.asset(name="car_shards", deps=[unique_images], **CAR_SHARDS_SPEC, **partitioned)
    def car_shards(
        context: dg.AssetExecutionContext,
        config: CarShardsConfig,
        storage: StorageResource,
        ray_cluster: RayResource,
    ) -> dg.MaterializeResult:
        """A partition's kept images, normalised to 128x128 RGB uint8 Parquet shards in
        ``shards/<partition>/`` (on a Ray cluster when `ray_cluster` has an address)."""

        def work_together(layout: DataLayout, partitions: list[str]) -> dict[str, StepOutput]:
            # On a cluster, every partition of the run is built at once, one task each.
            built = ray_cluster.build_partitions(
                storage, layout, partitions, shard_settings(config)
            )
            return {
                p: shards_output(r, storage, layout, f"{SHARDS_DIR}/{p}", ray_cluster.engine)
                for p, r in built.items()
            }

        def work(layout: DataLayout, partition: str) -> StepOutput:
            result = ray_cluster.build_shards(
                layout.unique_dir,
                layout.raw_dir,
                layout.shards_dir / partition,
                shard_settings(config),
                on_progress=_progress_logger(context, "normalised"),
                partition=partition,
            )
            return shards_output(
                result, storage, layout, f"{SHARDS_DIR}/{partition}", ray_cluster.engine
            )

        return run_partitioned_step(
            context,
            storage,
            lambda p: Step(
                requires=Requires("unique_images", UNIQUE_DIR, "The de-duplicated image index"),
                upstream=["unique_images"],  # P's kept images (see unique_images' metadata)
                output=f"{SHARDS_DIR}/{p}/summary.json",
                pull=[UNIQUE_DIR, f"{RAW_DIR}/{p}"],
                push=[f"{SHARDS_DIR}/{p}"],
            ),
            settings_for=lambda p: config.fingerprint_settings(),
            force=config.force,
            work=work,
            work_together=work_together if ray_cluster.enabled else None,
        )

    return [listing_manifest, raw_images, unique_images, car_shards]


#: Concurrency pool of the partitioned dedup (one slot, see dagster_home/dagster.yaml).
DEDUP_POOL = "dedup"


#: Columns of `unique.parquet` that may change while a partition's kept images do not:
#: where a photo sits, and cluster numbers (renumbered by size on every run).
_NOT_SHARDED = ["raw_shard", "cluster_id", "cluster_size"]


def _kept_version(rows: pd.DataFrame) -> str:
    """The version of what a partition's shards are built from: its kept images and their
    listing metadata (in any row order)."""
    return frame_version(rows.drop(columns=_NOT_SHARDED, errors="ignore"))


def _has_raw_shards(layout: DataLayout, partition: str) -> bool:
    return any((layout.raw_dir / partition).glob(RAW_SHARD_GLOB))
