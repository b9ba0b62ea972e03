"""The six pipeline assets. Each one wires a Dagster Config to one library call.

Big artefacts (shards, checkpoints, grids) are written by the library under the storage
root and announced here with metadata; nothing is pickled through an IO manager, so the
assets declare their lineage with ``deps`` and read their upstream from the storage layout.
"""

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import dagster as dg
import pandas as pd

from carmodels import dedup, evaluate, scrape, shards, train
from carmodels.layout import (
    EVAL_DIR,
    MANIFEST_DIR,
    RAW_DIR,
    SHARDS_DIR,
    TRAIN_DIR,
    UNIQUE_DIR,
)
from carmodels.versioning import files_version, frame_version
from pipelines.metadata import counts_table, frame_preview, image_preview, previews, rate_logger
from pipelines.resources import PipelineSettings, StorageResource
from pipelines.versioning import (
    CachedConfig,
    Requires,
    require_upstream,
    start_step,
    versioned_result,
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


def _progress_logger(context: dg.AssetExecutionContext, what: str) -> Callable[[int, int], None]:
    return rate_logger(context.log.info, what)


# --------------------------------------------------------------------------- listing_manifest


class ListingManifestConfig(dg.Config):
    """Where listings come from. With neither set, the `demo` profile crawls the demo catalog."""

    manifest_path: str | None = None
    start_urls: list[str] = []
    max_pages: int = scrape.DEFAULT_MAX_PAGES
    url_column: str | None = None
    row_filter: str | None = None
    allow_private_networks: bool = False


@dg.asset(group_name=GROUP, code_version="1", kinds={"python", "parquet"}, pool=SCRAPE_POOL)
def listing_manifest(
    context: dg.AssetExecutionContext,
    config: ListingManifestConfig,
    storage: StorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    """A table of listings, one row per distinct image URL, with the listing's metadata."""
    started = time.monotonic()
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
    elif settings.is_demo:
        with settings.serving_demo_catalog() as base_url:
            source = f"{base_url}/listings?page=1 (built-in demo catalog)"
            frame = scrape.crawl_listings(
                [f"{base_url}/listings?page=1"],
                max_pages=config.max_pages,
                allow_private_networks=True,
            )
    else:
        raise dg.Failure(
            description=(
                "listing_manifest has no source: set `manifest_path` (CSV, Parquet or JSONL) or "
                "`start_urls` (listing pages) in its config, or use the `demo` profile."
            ),
            allow_retries=False,
        )
    with storage.working_copy(push=[MANIFEST_DIR]) as layout:
        path = scrape.write_manifest(frame, layout.manifest_path)
        # The source is re-read on every run (it is cheap), but the version is the content of
        # the table as stored: an unchanged source leaves everything downstream in sync.
        version = frame_version(pd.read_parquet(path))
    summary = scrape.manifest_summary(frame)
    return dg.MaterializeResult(
        data_version=dg.DataVersion(version),
        metadata={
            "data_version": version,
            "source": source,
            "rows": summary["rows"],
            "distinct_urls": summary["distinct_urls"],
            "hosts": summary["hosts"],
            "top_hosts": dg.MetadataValue.json(summary["top_hosts"]),
            "elapsed_s": round(time.monotonic() - started, 2),
            "preview": frame_preview(frame.drop(columns=["url"], errors="ignore")),
            "dagster/uri": storage.uri(f"{MANIFEST_DIR}/{layout.manifest_path.name}"),
            "dagster/row_count": summary["rows"],
        },
    )


# --------------------------------------------------------------------------- raw_images


class RawImagesConfig(CachedConfig):
    concurrency: int = scrape.ScrapeConfig.concurrency
    per_host_limit: int = scrape.ScrapeConfig.per_host_limit
    total_timeout_s: float = scrape.ScrapeConfig.total_timeout_s
    max_retries: int = scrape.ScrapeConfig.max_retries
    retry_failed: bool = False
    revalidate: bool = False
    respect_robots: bool = scrape.ScrapeConfig.respect_robots
    per_host_rate: float = scrape.ScrapeConfig.per_host_rate
    max_crawl_delay_s: float = scrape.ScrapeConfig.max_crawl_delay_s
    fetch_processes: int = scrape.ScrapeConfig.fetch_processes
    allow_private_networks: bool = False


@dg.asset(
    group_name=GROUP,
    code_version="1",
    deps=[listing_manifest],
    kinds={"python", "parquet"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=10),
    pool=SCRAPE_POOL,
)
def raw_images(
    context: dg.AssetExecutionContext,
    config: RawImagesConfig,
    storage: StorageResource,
    settings: PipelineSettings,
) -> dg.MaterializeResult:
    """Downloaded image bytes in raw Parquet shards, one row per URL with its outcome."""
    fingerprint, skipped = start_step(
        context,
        storage,
        requires=Requires("listing_manifest", MANIFEST_DIR, "The listing manifest"),
        upstream=["listing_manifest"],
        settings={**config.fingerprint_settings(), "profile": settings.profile},
        force=config.force,
        output=RAW_DIR,
    )
    if skipped:
        return skipped
    scrape_config = scrape.ScrapeConfig(
        concurrency=config.concurrency,
        per_host_limit=config.per_host_limit,
        total_timeout_s=config.total_timeout_s,
        max_retries=config.max_retries,
        retry_failed=config.retry_failed,
        revalidate=config.revalidate,
        respect_robots=config.respect_robots,
        per_host_rate=config.per_host_rate,
        max_crawl_delay_s=config.max_crawl_delay_s,
        fetch_processes=config.fetch_processes,
        allow_private_networks=config.allow_private_networks or settings.is_demo,
    )
    on_progress = _progress_logger(context, "downloaded")
    with storage.working_copy(pull=[MANIFEST_DIR], push=[RAW_DIR]) as layout:
        manifest = scrape.read_manifest(layout.manifest_path)
        if settings.is_demo and not config.allow_private_networks:
            with settings.serving_demo_catalog():
                result = scrape.download_images(
                    manifest, layout.raw_dir, scrape_config, on_progress
                )
        else:
            result = scrape.download_images(manifest, layout.raw_dir, scrape_config, on_progress)
        version = files_version(dedup.raw_shard_files(layout.raw_dir))
    ok = result.outcome_counts.get("ok", 0)
    return versioned_result(
        context,
        {
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
            "dagster/uri": storage.uri(RAW_DIR),
        },
        data_version=version,
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- unique_images


class UniqueImagesConfig(CachedConfig):
    hash_method: str = dedup.DedupConfig.hash_method
    threshold: int = dedup.DedupConfig.threshold
    flip_aware: bool = dedup.DedupConfig.flip_aware


@dg.asset(group_name=GROUP, code_version="1", deps=[raw_images], kinds={"python", "parquet"})
def unique_images(
    context: dg.AssetExecutionContext, config: UniqueImagesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Images left after removing exact (sha256) and near (perceptual hash) duplicates."""
    fingerprint, skipped = start_step(
        context,
        storage,
        requires=Requires("raw_images", RAW_DIR, "Raw image shards"),
        upstream=["raw_images"],
        settings=config.fingerprint_settings(),
        force=config.force,
        output=UNIQUE_DIR,
    )
    if skipped:
        return skipped
    with storage.working_copy(pull=[RAW_DIR], push=[UNIQUE_DIR]) as layout:
        result = dedup.deduplicate(
            layout.raw_dir,
            layout.unique_dir,
            dedup.DedupConfig(
                hash_method=config.hash_method,
                threshold=config.threshold,
                flip_aware=config.flip_aware,
            ),
            on_progress=_progress_logger(context, "hashed"),
        )
        version = files_version([result.unique_path])
        metadata: dict[str, object] = {
            "input_images": result.n_input,
            "kept": result.n_kept,
            "exact_duplicates": result.n_exact_duplicates,
            "near_duplicates": result.n_near_duplicates,
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
    return versioned_result(context, metadata, data_version=version, fingerprint=fingerprint)


# --------------------------------------------------------------------------- car_shards


class CarShardsConfig(CachedConfig):
    framing: str = shards.ImagingConfig.framing
    face: str = shards.ImagingConfig.face
    drop_front_rear: bool = shards.ImagingConfig.drop_front_rear
    min_side: int = shards.ImagingConfig.min_side
    val_fraction: float = shards.ShardConfig.val_fraction


@dg.asset(group_name=GROUP, code_version="1", deps=[unique_images], kinds={"python", "parquet"})
def car_shards(
    context: dg.AssetExecutionContext, config: CarShardsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """128x128 RGB uint8 images in Parquet shards, facing-normalised, split train/val."""
    fingerprint, skipped = start_step(
        context,
        storage,
        requires=Requires("unique_images", UNIQUE_DIR, "The de-duplicated image index"),
        upstream=["unique_images", "raw_images"],
        settings=config.fingerprint_settings(),
        force=config.force,
        output=SHARDS_SUMMARY,
    )
    if skipped:
        return skipped
    with storage.working_copy(pull=[UNIQUE_DIR, RAW_DIR], push=[SHARDS_DIR]) as layout:
        result = shards.build_shards(
            layout.unique_dir,
            layout.raw_dir,
            layout.shards_dir,
            shards.ShardConfig(
                imaging=shards.ImagingConfig(
                    framing=config.framing,
                    face=config.face,
                    drop_front_rear=config.drop_front_rear,
                    min_side=config.min_side,
                ),
                val_fraction=config.val_fraction,
            ),
            on_progress=_progress_logger(context, "normalised"),
        )
        # The same content version the trainer records in its checkpoints.
        version = train.data_version_of(layout.shards_dir)
        preview = image_preview(result.preview_path)
    return versioned_result(
        context,
        {
            "input_images": result.n_input,
            "written": result.n_written,
            "train": result.n_train,
            "val": result.n_val,
            "rejects": counts_table(result.rejects_by_reason),
            "facing": counts_table(result.facing_counts, key="facing"),
            "elapsed_s": round(result.elapsed_s, 2),
            "preview": preview,
            "dagster/uri": storage.uri(SHARDS_DIR),
            "dagster/row_count": result.n_written,
        },
        data_version=version,
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- train_dcgan


class TrainDcganConfig(CachedConfig):
    """Training settings. Left unset, the model and schedule follow the profile.

    The `full` profile trains the seed's model (`seed` preset, 128 px, 170 epochs, batch 128);
    the `demo` profile the `small` preset at 64 px for 120 epochs (`$CARMODELS_DEMO_EPOCHS`).
    """

    preset: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr_g: float | None = None
    lr_d: float | None = None
    label_smoothing: float = train.TrainConfig.label_smoothing
    diffaugment: str = train.TrainConfig.diffaugment
    seed: int = train.TrainConfig.seed
    resume: bool = False


#: What the demo profile trains: the trainer's full code path with a model small enough to
#: learn recognisable scenes on a laptop CPU in a few minutes (see `carmodels.models.PRESETS`).
DEMO_PRESET = "small"
DEMO_IMAGE_SIZE = 64
DEMO_BATCH_SIZE = 32
#: A short run logs, samples and checkpoints less often per epoch than a long one needs to.
DEMO_LOG_EVERY_STEPS = 20
DEMO_CHECKPOINT_EVERY = 10
DEMO_SAMPLE_EVERY = 4


@dg.asset(group_name=GROUP, code_version="1", deps=[car_shards], kinds={"pytorch"}, pool=GPU_POOL)
def train_dcgan(
    context: dg.AssetExecutionContext,
    config: TrainDcganConfig,
    storage: StorageResource,
    settings: PipelineSettings,
    pipes_subprocess_client: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    """A DCGAN trained on the shards' train split: checkpoints and per-epoch sample grids."""
    require_upstream(storage, Requires("car_shards", SHARDS_SUMMARY, "The training shards"))
    demo = settings.is_demo
    defaults = (
        train.TrainConfig(
            preset=DEMO_PRESET,
            image_size=DEMO_IMAGE_SIZE,
            epochs=settings.demo_epochs,
            batch_size=DEMO_BATCH_SIZE,
            log_every_steps=DEMO_LOG_EVERY_STEPS,
            checkpoint_every=DEMO_CHECKPOINT_EVERY,
            sample_every=DEMO_SAMPLE_EVERY,
        )
        if demo
        else train.TrainConfig()
    )
    train_config = replace(
        defaults,
        preset=config.preset or defaults.preset,
        image_size=config.image_size or defaults.image_size,
        epochs=config.epochs or defaults.epochs,
        batch_size=config.batch_size or defaults.batch_size,
        lr_g=config.lr_g,
        lr_d=config.lr_d,
        label_smoothing=config.label_smoothing,
        diffaugment=config.diffaugment,
        seed=config.seed,
        device=settings.device,
    )
    fingerprint, skipped = start_step(
        context,
        storage,
        requires=None,  # checked above, before the settings that need the shards' profile
        upstream=["car_shards"],
        settings={"train": asdict(train_config), "resume": config.resume},
        force=config.force,
        output=LATEST_CHECKPOINT,
    )
    if skipped:
        return skipped
    context.log.info(f"training {train_config}")
    with storage.working_copy(pull=[SHARDS_DIR], push=[TRAIN_DIR]) as layout:
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
        version = files_version([checkpoint])
    return versioned_result(
        context,
        {**(reported.metadata or {}), "dagster/uri": storage.uri(TRAIN_DIR)},
        data_version=version,
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- evaluate_dcgan


class EvaluateDcganConfig(CachedConfig):
    n_samples: int = evaluate.EvalConfig.n_samples
    seed: int = evaluate.EvalConfig.seed
    #: Inception weights for FID/KID (default: $CARMODELS_INCEPTION_WEIGHTS, then the torch cache).
    inception_weights: str | None = None
    #: Images per side for FID/KID (default: 10,000 on a GPU, fewer on a CPU).
    fid_samples: int | None = None
    #: Never try to download the Inception weights.
    offline: bool = False


@dg.asset(
    group_name=GROUP,
    code_version="1",
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
    fingerprint, skipped = start_step(
        context,
        storage,
        requires=Requires("train_dcgan", LATEST_CHECKPOINT, "A trained checkpoint"),
        upstream=["train_dcgan", "car_shards"],
        settings=config.fingerprint_settings(),
        force=config.force,
        output=EVAL_METRICS,
    )
    if skipped:
        return skipped
    fid_config = replace(
        evaluate.FidConfig(),
        weights_path=config.inception_weights,
        n_samples=config.fid_samples,
        download=not config.offline,
    )
    with storage.working_copy(pull=[TRAIN_DIR, SHARDS_DIR], push=[EVAL_DIR]) as layout:
        checkpoint = train.latest_checkpoint(layout.train_dir)
        if checkpoint is None:
            raise dg.Failure(
                description=f"No checkpoint in {layout.train_dir}: materialise `train_dcgan`.",
                allow_retries=False,
            )
        result = evaluate.evaluate(
            checkpoint,
            layout.shards_dir,
            layout.eval_dir,
            evaluate.EvalConfig(
                n_samples=config.n_samples, seed=config.seed, fid_config=fid_config
            ),
            log=context.log.info,
        )
        version = files_version([layout.eval_dir / "metrics.json"])
        numeric = {
            k: round(float(v), 4) for k, v in result.metrics.items() if isinstance(v, int | float)
        }
        metadata = {
            **numeric,
            "fid_computed": bool(result.fid_record.get("computed")),
            "fid_record": dg.MetadataValue.json(result.fid_record),
            "type_mix": dg.MetadataValue.json(
                {k: result.type_record.get(k) for k in ("type_mix_real_val", "type_mix_generated")}
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
        }
    return versioned_result(context, metadata, data_version=version, fingerprint=fingerprint)


ALL_ASSETS = [listing_manifest, raw_images, unique_images, car_shards, train_dcgan, evaluate_dcgan]
