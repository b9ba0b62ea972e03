"""The six pipeline assets, from listings to an evaluated generator.

Each one wires its Dagster Config to one library call inside the envelope of
:func:`pipelines.versioning.run_step` (fingerprint, skip, storage working copy, metadata).
Big artefacts (shards, checkpoints, grids) are written by the library under the storage
root and announced here with metadata; nothing is pickled through an IO manager, so the
assets declare their lineage with ``deps`` and read their upstream from the storage layout.

Config classes take their defaults from the project configuration file
(:mod:`pipelines.project_config`); what differs between the profiles comes in as resources
(:mod:`pipelines.resources`). Each asset's code version is a hash of the library code it runs
(:func:`carmodels.versioning.source_version`), so an upgrade re-runs exactly the steps whose
code changed.
"""

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from carmodels import dedup, evaluate, promotion, scrape, shards, train
from carmodels.errors import InputError
from carmodels.io import atomic_write_json
from carmodels.layout import (
    EVAL_DIR,
    MANIFEST_DIR,
    MANIFEST_FILE,
    RAW_DIR,
    SHARDS_DIR,
    TRAIN_DIR,
    UNIQUE_DIR,
    DataLayout,
)
from carmodels.scrape.raw import raw_shard_files
from carmodels.versioning import files_version, frame_version, source_version
from pipelines.config_fields import library_field, library_kwargs
from pipelines.metadata import counts_table, frame_preview, image_preview, previews, rate_logger
from pipelines.project_config import CONFIG_ENV, DEFAULT_CONFIG_NAME, defaults_from_file
from pipelines.resources import (
    DemoOrigin,
    ListingSource,
    RayResource,
    StorageResource,
    TrainingDefaults,
    serve_demo,
)
from pipelines.versioning import (
    CachedConfig,
    Requires,
    Step,
    StepOutput,
    input_errors_fail_the_step,
    library_settings,
    run_step,
)

#: Asset group shown in the UI.
GROUP = "carmodels"
#: Concurrency pools (one slot each, see dagster_home/dagster.yaml): training, evaluation and
#: restoration never share a GPU, and no two runs scrape at once, so the per-host limits and
#: request rates of one scraping step hold for the whole instance.
GPU_POOL = "gpu"
SCRAPE_POOL = "scrape"
#: Declarative automation of the steps after training: run as soon as what they read changes
#: (and nothing upstream is still running or missing). Evaluated only while the automation
#: sensor runs (`pipelines.sensors.automation_sensor`, on with CARMODELS_AUTOMATION=on).
FOLLOW_UPSTREAM = dg.AutomationCondition.eager()
#: Outputs whose presence under the storage root says a step's result is still there.
SHARDS_SUMMARY = f"{SHARDS_DIR}/summary.json"
LATEST_CHECKPOINT = f"{TRAIN_DIR}/{train.CHECKPOINT_DIR}/{train.LATEST_NAME}"
EVAL_METRICS = f"{EVAL_DIR}/metrics.json"
#: Where `listing_manifest` records its source: which demo catalog served the listings, and
#: so which private origin the downloader may fetch from (none for any other source).
MANIFEST_SOURCE = "source.json"


def _progress_logger(context: dg.AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    return rate_logger(context.log.info, what)


# --------------------------------------------------------------------------- listing_manifest


@defaults_from_file("listing_manifest")
class ListingManifestConfig(dg.Config):
    """Where listings come from: a manifest file or listing pages. With neither, the
    profile's default source (the `demo` profile's built-in catalog; none under `full`)."""

    manifest_path: str | None = None
    start_urls: list[str] = []
    max_pages: int = scrape.DEFAULT_MAX_PAGES
    url_column: str | None = None
    row_filter: str | None = None
    #: Crawl private and loopback addresses (your own servers only): off by default, since a
    #: listing page could otherwise point the crawler at services inside your network.
    allow_private_networks: bool = False


@dg.asset(
    group_name=GROUP,
    code_version=source_version(["carmodels.scrape"]),
    kinds={"python", "parquet"},
    pool=SCRAPE_POOL,
)
def listing_manifest(
    context: dg.AssetExecutionContext,
    config: ListingManifestConfig,
    storage: StorageResource,
    listing_source: ListingSource,
) -> dg.MaterializeResult:
    """A table of listings, one row per distinct image URL, with the listing's metadata."""
    started = time.monotonic()

    def work(layout: DataLayout) -> StepOutput:
        record: dict[str, object] = {}
        if config.manifest_path:
            frame = scrape.read_manifest(
                config.manifest_path, url_column=config.url_column, row_filter=config.row_filter
            )
            source = config.manifest_path
        elif config.start_urls:
            frame = scrape.crawl_listings(
                config.start_urls,
                max_pages=config.max_pages,
                allow_private_networks=config.allow_private_networks,
            )
            source = ", ".join(config.start_urls)
        else:
            previous = _demo_origin(layout)
            with listing_source.serving(previous.port if previous else None) as demo:
                if demo is None:
                    raise InputError(_NO_SOURCE)
                frame = scrape.crawl_listings(
                    [demo.start_url],
                    max_pages=config.max_pages,
                    allowed_private_origins=[demo.origin],
                )
            source = f"{demo.start_url} (built-in demo catalog)"
            record = demo.to_record()
        return write_listings(frame, layout, MANIFEST_DIR, source, record, storage, started)

    return run_step(
        context,
        storage,
        Step(requires=None, upstream=(), output=MANIFEST_DIR, push=[MANIFEST_DIR], cached=False),
        settings=config.model_dump(),
        force=False,  # not cached: the step re-reads its source every run
        work=work,
    )


_NO_SOURCE = (
    "listing_manifest has no source: set `manifest_path` (CSV, Parquet or JSONL) or "
    "`start_urls` (listing pages) under `listing_manifest: config:` in the project config file "
    f"(${CONFIG_ENV}, default $DAGSTER_HOME/{DEFAULT_CONFIG_NAME}) or in the run config, or "
    "use the `demo` profile."
)


def missing_source_reason(listing_source: ListingSource) -> str | None:
    """Why a run with the configured defaults could not read any listings, or None."""
    defaults = ListingManifestConfig()
    if defaults.manifest_path or defaults.start_urls or listing_source.has_default:
        return None
    return _NO_SOURCE


def write_listings(
    frame: pd.DataFrame,
    layout: DataLayout,
    folder: str,
    source: str,
    record: dict[str, object],
    storage: StorageResource,
    started: float,
) -> StepOutput:
    """Store the listings table in ``folder`` (under the root) with where it came from; its
    metadata for the UI."""
    relative = f"{folder}/{MANIFEST_FILE}"
    path = scrape.write_manifest(frame, layout.root / relative)
    _write_json(path.parent / MANIFEST_SOURCE, {"source": source, **record})
    summary = scrape.manifest_summary(frame)
    return StepOutput(
        # The source is re-read on every run (it is cheap), but the version is the content
        # of the table as stored: an unchanged source leaves everything downstream in sync.
        data_version=frame_version(pd.read_parquet(path)),
        metadata={
            "source": source,
            "rows": summary["rows"],
            "distinct_urls": summary["distinct_urls"],
            "hosts": summary["hosts"],
            "top_hosts": dg.MetadataValue.json(summary["top_hosts"]),
            "elapsed_s": round(time.monotonic() - started, 2),
            "preview": frame_preview(frame.drop(columns=["url"], errors="ignore")),
            "dagster/uri": storage.uri(relative),
            "dagster/row_count": summary["rows"],
        },
    )


def _demo_origin(layout: DataLayout, folder: str = MANIFEST_DIR) -> DemoOrigin | None:
    """The demo catalog the manifest in ``folder`` was crawled from, if it was."""
    path = layout.root / folder / MANIFEST_SOURCE
    if not path.is_file():
        return None
    try:
        return DemoOrigin.from_record(json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # an unreadable record: the manifest is then treated as a plain one


def _write_json(path: Path, value: object) -> None:
    """Write ``value`` unless the file already holds it (a re-run changes nothing on disk)."""
    try:
        if json.loads(path.read_text()) == value:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, value)


# --------------------------------------------------------------------------- raw_images


@defaults_from_file("raw_images")
class RawImagesConfig(CachedConfig):
    """The downloader's settings (`carmodels.scrape.ScrapeConfig`)."""

    concurrency: int = library_field(scrape.ScrapeConfig, "concurrency")
    per_host_limit: int = library_field(scrape.ScrapeConfig, "per_host_limit")
    total_timeout_s: float = library_field(scrape.ScrapeConfig, "total_timeout_s")
    max_retries: int = library_field(scrape.ScrapeConfig, "max_retries")
    retry_failed: bool = library_field(scrape.ScrapeConfig, "retry_failed")
    revalidate: bool = library_field(scrape.ScrapeConfig, "revalidate")
    respect_robots: bool = library_field(scrape.ScrapeConfig, "respect_robots")
    per_host_rate: float = library_field(scrape.ScrapeConfig, "per_host_rate")
    max_crawl_delay_s: float = library_field(scrape.ScrapeConfig, "max_crawl_delay_s")
    fetch_processes: int = library_field(scrape.ScrapeConfig, "fetch_processes")
    #: Download from private and loopback addresses (your own servers only): off by default,
    #: since a manifest could otherwise point the downloader at services inside your network.
    #: The demo catalog needs no opt-in: exactly its own origin is let through.
    allow_private_networks: bool = library_field(
        scrape.ScrapeConfig, "allow_private_networks", default=False
    )


#: What `raw_images` is, partitioned or not (`pipelines.partitioned` builds the other one).
RAW_IMAGES_SPEC: dict[str, Any] = {
    "group_name": GROUP,
    "code_version": source_version(["carmodels.scrape"]),
    "kinds": {"python", "parquet"},
    "retry_policy": dg.RetryPolicy(max_retries=2, delay=10),
    "pool": SCRAPE_POOL,
}


@dg.asset(deps=[listing_manifest], **RAW_IMAGES_SPEC)
def raw_images(
    context: dg.AssetExecutionContext,
    config: RawImagesConfig,
    storage: StorageResource,
    ray_cluster: RayResource,
) -> dg.MaterializeResult:
    """Downloaded image bytes in raw Parquet shards, one row per URL with its outcome
    (fanned out on a Ray cluster when `ray_cluster` has an address)."""

    def work(layout: DataLayout) -> StepOutput:
        return download_listings(
            context, config, storage, ray_cluster, layout, MANIFEST_DIR, RAW_DIR
        )

    return run_step(
        context,
        storage,
        Step(
            requires=Requires("listing_manifest", MANIFEST_DIR, "The listing manifest"),
            upstream=["listing_manifest"],
            output=RAW_DIR,
            pull=[MANIFEST_DIR],
            push=[RAW_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


def download_listings(
    context: dg.AssetExecutionContext,
    config: RawImagesConfig,
    storage: StorageResource,
    ray_cluster: RayResource,
    layout: DataLayout,
    manifest_folder: str,
    raw_folder: str,
) -> StepOutput:
    """Download the listings of ``manifest_folder`` into ``raw_folder`` (both under the
    root); the step's data version and metadata."""
    manifest = scrape.read_manifest(layout.root / manifest_folder / MANIFEST_FILE)
    demo = _demo_origin(layout, manifest_folder)
    scrape_config = library_settings(
        "raw_images",
        lambda: scrape.ScrapeConfig(
            **library_kwargs(config, scrape.ScrapeConfig),
            allowed_private_origins=(demo.origin,) if demo else (),
        ),
    )
    on_progress = _progress_logger(context, "downloaded")

    def download() -> scrape.ScrapeResult:
        return ray_cluster.download(
            manifest, storage, layout, scrape_config, on_progress, raw_folder=raw_folder
        )

    if demo is None:
        result = download()
    else:
        # The demo catalog lives only while a step serves it: serve the one the manifest
        # was crawled from, on the port its URLs name.
        with serve_demo(demo):
            result = download()
    ok = result.outcome_counts.get("ok", 0)
    return StepOutput(
        data_version=files_version(raw_shard_files(layout.root / raw_folder)),
        metadata={
            "urls": result.n_urls,
            "fetched": result.n_fetched,
            "skipped_existing": result.n_skipped_existing,
            "ok": ok,
            "failed": result.n_fetched - ok,
            "outcomes": counts_table(result.outcome_counts, key="outcome"),
            "revalidated": counts_table(result.revalidation_counts, key="result"),
            "failures": frame_preview(result.failures),
            "images_per_s": round(result.images_per_s, 1),
            "elapsed_s": round(result.elapsed_s, 2),
            "engine": ray_cluster.engine,
            "dagster/uri": storage.uri(raw_folder),
        },
    )


# --------------------------------------------------------------------------- unique_images


@defaults_from_file("unique_images")
class UniqueImagesConfig(CachedConfig):
    """The duplicate search's settings (`carmodels.dedup.DedupConfig`)."""

    hash_method: str = library_field(dedup.DedupConfig, "hash_method")
    threshold: int = library_field(dedup.DedupConfig, "threshold")
    flip_aware: bool = library_field(dedup.DedupConfig, "flip_aware")


UNIQUE_IMAGES_SPEC: dict[str, Any] = {
    "group_name": GROUP,
    "code_version": source_version(["carmodels.dedup"]),
    "kinds": {"python", "parquet"},
}


@dg.asset(deps=[raw_images], **UNIQUE_IMAGES_SPEC)
def unique_images(
    context: dg.AssetExecutionContext, config: UniqueImagesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Images left after removing exact (sha256) and near (perceptual hash) duplicates."""

    def work(layout: DataLayout) -> StepOutput:
        result = dedup.deduplicate(
            layout.raw_dir,
            layout.unique_dir,
            dedup_settings(config),
            on_progress=_progress_logger(context, "hashed"),
        )
        return dedup_output(result, storage)

    return run_step(
        context,
        storage,
        Step(
            requires=Requires("raw_images", RAW_DIR, "Raw image shards"),
            upstream=["raw_images"],
            output=UNIQUE_DIR,
            pull=[RAW_DIR],
            push=[UNIQUE_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


def dedup_settings(config: UniqueImagesConfig) -> dedup.DedupConfig:
    return library_settings(
        "unique_images", lambda: dedup.DedupConfig(**library_kwargs(config, dedup.DedupConfig))
    )


def dedup_output(result: dedup.DedupResult, storage: StorageResource) -> StepOutput:
    """The data version and metadata of a dedup run."""
    metadata: dict[str, object] = {
        "input_images": result.n_input,
        "kept": result.n_kept,
        "exact_duplicates": result.n_exact_duplicates,
        "near_duplicates": result.n_near_duplicates,
        # Photos that downloaded but cannot be decoded are dropped here: counted, not lost
        # silently.
        "undecodable": result.n_undecodable,
        "undecodable_reasons": counts_table(result.undecodable_by_reason),
        "clusters": result.n_clusters,
        "cluster_sizes": counts_table(
            {str(k): v for k, v in result.cluster_size_histogram.items()}, key="size"
        ),
        "elapsed_s": round(result.elapsed_s, 2),
        "dagster/uri": storage.uri(f"{UNIQUE_DIR}/{Path(result.unique_path).name}"),
        "dagster/row_count": result.n_kept,
    }
    if result.contact_sheet_path is not None and Path(result.contact_sheet_path).exists():
        metadata["preview"] = image_preview(result.contact_sheet_path)
    return StepOutput(data_version=files_version([result.unique_path]), metadata=metadata)


# --------------------------------------------------------------------------- car_shards


@defaults_from_file("car_shards")
class CarShardsConfig(CachedConfig):
    """How photos become training images (`carmodels.shards.ImagingConfig`) and the split
    (`carmodels.shards.ShardConfig`)."""

    framing: str = library_field(shards.ImagingConfig, "framing")
    face: str = library_field(shards.ImagingConfig, "face")
    drop_front_rear: bool = library_field(shards.ImagingConfig, "drop_front_rear")
    min_side: int = library_field(shards.ImagingConfig, "min_side")
    val_fraction: float = library_field(shards.ShardConfig, "val_fraction")


CAR_SHARDS_SPEC: dict[str, Any] = {
    "group_name": GROUP,
    "code_version": source_version(["carmodels.shards"]),
    "kinds": {"python", "parquet"},
}


@dg.asset(deps=[unique_images], **CAR_SHARDS_SPEC)
def car_shards(
    context: dg.AssetExecutionContext,
    config: CarShardsConfig,
    storage: StorageResource,
    ray_cluster: RayResource,
) -> dg.MaterializeResult:
    """128x128 RGB uint8 images in Parquet shards, facing-normalised, split train/val
    (normalised on a Ray cluster when `ray_cluster` has an address)."""

    def work(layout: DataLayout) -> StepOutput:
        result = ray_cluster.build_shards(
            layout.unique_dir,
            layout.raw_dir,
            layout.shards_dir,
            shard_settings(config),
            on_progress=_progress_logger(context, "normalised"),
        )
        return shards_output(result, storage, layout, SHARDS_DIR, ray_cluster.engine)

    return run_step(
        context,
        storage,
        Step(
            requires=Requires("unique_images", UNIQUE_DIR, "The de-duplicated image index"),
            upstream=["unique_images", "raw_images"],
            output=SHARDS_SUMMARY,
            pull=[UNIQUE_DIR, RAW_DIR],
            push=[SHARDS_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


def shard_settings(config: CarShardsConfig) -> shards.ShardConfig:
    return library_settings(
        "car_shards",
        lambda: shards.ShardConfig(
            imaging=shards.ImagingConfig(**library_kwargs(config, shards.ImagingConfig)),
            **library_kwargs(config, shards.ShardConfig),
        ),
    )


def shards_output(
    result: shards.ShardResult,
    storage: StorageResource,
    layout: DataLayout,
    folder: str,
    engine: str,
) -> StepOutput:
    """The data version and metadata of the shards written into ``folder`` (under the root)."""
    return StepOutput(
        # The same content version the trainer records in its checkpoints.
        data_version=train.data_version_of(layout.root / folder),
        metadata={
            "input_images": result.n_input,
            "written": result.n_written,
            "train": result.n_train,
            "val": result.n_val,
            "rejected": sum(result.rejects_by_reason.values()),
            "rejects": counts_table(result.rejects_by_reason),
            "facing": counts_table(result.facing_counts, key="facing"),
            "elapsed_s": round(result.elapsed_s, 2),
            "preview": image_preview(result.preview_path),
            "engine": engine,
            "dagster/uri": storage.uri(folder),
            "dagster/row_count": result.n_written,
        },
    )


# --------------------------------------------------------------------------- train_dcgan


@defaults_from_file("train_dcgan")
class TrainDcganConfig(CachedConfig):
    """Training settings. Left unset, the model, the augmentation and the schedule come from
    the profile's `training` resource: under `full` the measured recipe (`dcgan` preset at lr
    8e-4 with adaptive DiffAugment, 128 px, 170 epochs, batch 128; docs/benchmarks/quality.md);
    under `demo` the `small` preset at 64 px for 120 epochs (`$CARMODELS_DEMO_EPOCHS`)."""

    # None: the profile's (the `training` resource), not the library's default.
    preset: str | None = library_field(train.TrainConfig, "preset", default=None)
    image_size: int | None = library_field(train.TrainConfig, "image_size", default=None)
    epochs: int | None = library_field(train.TrainConfig, "epochs", default=None)
    batch_size: int | None = library_field(train.TrainConfig, "batch_size", default=None)
    lr_g: float | None = library_field(train.TrainConfig, "lr_g", default=None)
    lr_d: float | None = library_field(train.TrainConfig, "lr_d", default=None)
    label_smoothing: float = library_field(train.TrainConfig, "label_smoothing")
    diffaugment: str | None = library_field(train.TrainConfig, "diffaugment", default=None)
    diffaugment_target: float | None = library_field(
        train.TrainConfig, "diffaugment_target", default=None
    )
    loss: str = library_field(train.TrainConfig, "loss")
    r1_gamma: float = library_field(train.TrainConfig, "r1_gamma")
    spectral_norm: bool | None = library_field(train.TrainConfig, "spectral_norm")
    base_channels: int | None = library_field(train.TrainConfig, "base_channels")
    generator_channels: int | None = library_field(train.TrainConfig, "generator_channels")
    batch_norm: bool | None = library_field(train.TrainConfig, "batch_norm")
    seed: int = library_field(train.TrainConfig, "seed")
    memory_budget_mb: int | None = library_field(train.TrainConfig, "memory_budget_mb")
    resume: bool = False


def _learning_rate(
    configured: float | None, profile: float | None, preset: str | None, profile_preset: str
) -> float | None:
    """The asset's learning rate where set; else the profile's, which belongs to the profile's
    preset: another preset chosen in the asset's config brings its own (None)."""
    if configured is not None:
        return configured
    return profile if preset in (None, profile_preset) else None


def _diffaugment_target(
    config: TrainDcganConfig, base: train.TrainConfig, diffaugment: str
) -> float | None:
    """The asset's target where set; else the profile's, which adapts the profile's policy
    and so none when the asset's config turns DiffAugment off."""
    if config.diffaugment_target is not None:
        return config.diffaugment_target
    return base.diffaugment_target if diffaugment else None


def training_config(config: TrainDcganConfig, defaults: TrainingDefaults) -> train.TrainConfig:
    """The trainer's settings: the asset's config where set, else the profile's defaults.

    Raises InputError, naming the setting, for values the trainer refuses."""

    def build() -> train.TrainConfig:
        base = defaults.train_config()
        diffaugment = base.diffaugment if config.diffaugment is None else config.diffaugment
        return replace(
            base,
            preset=config.preset or base.preset,
            image_size=config.image_size or base.image_size,
            epochs=config.epochs or base.epochs,
            batch_size=config.batch_size or base.batch_size,
            lr_g=_learning_rate(config.lr_g, base.lr_g, config.preset, base.preset),
            lr_d=_learning_rate(config.lr_d, base.lr_d, config.preset, base.preset),
            label_smoothing=config.label_smoothing,
            diffaugment=diffaugment,
            diffaugment_target=_diffaugment_target(config, base, diffaugment),
            loss=config.loss,
            r1_gamma=config.r1_gamma,
            spectral_norm=config.spectral_norm,
            base_channels=config.base_channels,
            generator_channels=config.generator_channels,
            batch_norm=config.batch_norm,
            seed=config.seed,
            memory_budget_mb=config.memory_budget_mb,
        )

    return library_settings("train_dcgan", build)


@dg.asset(
    group_name=GROUP,
    code_version=source_version(["carmodels.train"]),
    deps=[car_shards],
    kinds={"pytorch"},
    pool=GPU_POOL,
)
def train_dcgan(
    context: dg.AssetExecutionContext,
    config: TrainDcganConfig,
    storage: StorageResource,
    training: TrainingDefaults,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A DCGAN trained on the shards' train split: checkpoints and per-epoch sample grids."""
    with input_errors_fail_the_step():
        train_config = training_config(config, training)

    def work(layout: DataLayout) -> StepOutput:
        context.log.info(f"training {train_config}")
        # Missing shards or shards of another schema version fail here, in one line, rather
        # than as a crash of the trainer's process.
        shards.shard_files(layout.shards_dir)
        # The trainer runs in its own process through Dagster Pipes: it can use torchrun, its
        # logs and progress stream into this run, and a crash there fails this step cleanly (so
        # the step can be retried) instead of taking the run worker down with it.
        reported = pipes_subprocess_client.run(
            command=[sys.executable, "-m", "pipelines.train_process"],
            context=context,
            extras={
                "shards_dir": str(layout.shards_dir),
                "out_dir": str(layout.train_dir),
                "config": asdict(train_config),
                "resume": config.resume,
            },
        ).get_materialize_result()
        checkpoint = train.latest_checkpoint(layout.train_dir)
        if checkpoint is None:
            raise dg.Failure(f"The trainer finished without a checkpoint in {layout.train_dir}.")
        return StepOutput(
            data_version=files_version([checkpoint]),
            metadata={**(reported.metadata or {}), "dagster/uri": storage.uri(TRAIN_DIR)},
        )

    return run_step(
        context,
        storage,
        Step(
            # A folder: under partitioned ingest it holds one shards folder per partition.
            requires=Requires("car_shards", SHARDS_DIR, "The training shards"),
            upstream=["car_shards"],
            output=LATEST_CHECKPOINT,
            pull=[SHARDS_DIR],
            push=[TRAIN_DIR],
        ),
        settings={"train": asdict(train_config), "resume": config.resume},
        force=config.force,
        work=work,
    )


# --------------------------------------------------------------------------- evaluate_dcgan


@defaults_from_file("evaluate_dcgan")
class EvaluateDcganConfig(CachedConfig):
    n_samples: int = library_field(evaluate.EvalConfig, "n_samples")
    seed: int = library_field(evaluate.EvalConfig, "seed")
    # FidConfig's weights_path and n_samples, named as `carmodels evaluate` names them.
    inception_weights: str | None = library_field(evaluate.FidConfig, "weights_path")
    fid_samples: int | None = library_field(evaluate.FidConfig, "n_samples")
    #: Never try to download the Inception weights (FidConfig's download, turned off).
    offline: bool = False


@dg.asset(
    group_name=GROUP,
    # The asset records the evaluation in the promotion history too.
    code_version=source_version(["carmodels.evaluate", "carmodels.promotion"]),
    deps=[train_dcgan],
    kinds={"pytorch"},
    pool=GPU_POOL,
    # Whenever a new generator is trained (by the schedule, a sensor or by hand), evaluate it.
    automation_condition=FOLLOW_UPSTREAM,
)
def evaluate_dcgan(
    context: dg.AssetExecutionContext, config: EvaluateDcganConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Sample grid, loss curves and metrics of the latest trained generator."""

    def work(layout: DataLayout) -> StepOutput:
        checkpoint = train.latest_checkpoint(layout.train_dir)
        if checkpoint is None:
            raise InputError(f"No checkpoint in {layout.train_dir}: materialise `train_dcgan`.")
        eval_config = library_settings(
            "evaluate_dcgan",
            lambda: evaluate.EvalConfig(
                **library_kwargs(config, evaluate.EvalConfig),
                fid_config=evaluate.FidConfig(
                    weights_path=config.inception_weights,
                    n_samples=config.fid_samples,
                    download=not config.offline,
                ),
            ),
        )
        result = evaluate.evaluate(
            checkpoint, layout.shards_dir, layout.eval_dir, eval_config, log=context.log.info
        )
        if eval_config.record_history:  # evaluating writes no history: the callers record it
            promotion.record_evaluation(result.metrics_path, layout.eval_dir)
        numeric = {
            k: round(float(v), 4) for k, v in result.metrics.items() if isinstance(v, int | float)
        }
        return StepOutput(
            data_version=files_version([layout.eval_dir / "metrics.json"]),
            metadata={
                **numeric,
                "fid_computed": bool(result.fid_record.get("computed")),
                "fid_record": dg.MetadataValue.json(result.fid_record),
                "type_mix": dg.MetadataValue.json(
                    {
                        k: result.type_record.get(k)
                        for k in ("type_mix_real_val", "type_mix_generated")
                    }
                ),
                "metrics": dg.MetadataValue.json(result.metrics),
                "checkpoint": dg.MetadataValue.path(str(Path(checkpoint).resolve())),
                **previews(
                    preview=result.samples_path,
                    losses=result.loss_plot_path,
                    nearest=result.nearest_path,
                    interpolation=result.interpolation_path,
                    history=layout.eval_dir / "history.png",
                ),
                "dagster/uri": storage.uri(EVAL_DIR),
            },
        )

    return run_step(
        context,
        storage,
        Step(
            requires=Requires("train_dcgan", LATEST_CHECKPOINT, "A trained checkpoint"),
            upstream=["train_dcgan", "car_shards"],
            output=EVAL_METRICS,
            pull=[TRAIN_DIR, SHARDS_DIR],
            push=[EVAL_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


ALL_ASSETS = [listing_manifest, raw_images, unique_images, car_shards, train_dcgan, evaluate_dcgan]
