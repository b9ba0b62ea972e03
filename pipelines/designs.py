"""Assets that use the trained generator: new designs with latent walks, and restoration.

Both read the generator checkpoint from the storage layout, like `evaluate_dcgan`, and write
under the storage root: ``designs/`` and ``restoration/``.
"""

from pathlib import Path

import dagster as dg

from carmodels import generate, promotion, restoration_eval, restore
from carmodels.errors import InputError
from carmodels.layout import CHAMPION_DIR, SHARDS_DIR, DataLayout
from carmodels.versioning import files_version, source_version
from pipelines.assets import FOLLOW_UPSTREAM, GPU_POOL
from pipelines.config_fields import library_field, library_kwargs
from pipelines.metadata import image_preview, rate_logger
from pipelines.project_config import defaults_from_file
from pipelines.resources import StorageResource
from pipelines.versioning import CachedConfig, Step, StepOutput, library_settings, run_step

GROUP = "carmodels"
#: Folders under the storage root.
DESIGNS_DIR = "designs"
RESTORATION_DIR = "restoration"
#: The asset whose checkpoint these assets read: the generator in use.
GENERATOR_ASSET = "champion_generator"


def _generator_checkpoint(layout: DataLayout) -> Path:
    """The champion's checkpoint: the generator that won its evaluation."""
    checkpoint = promotion.champion_checkpoint(layout.champion_dir)
    if checkpoint is None or not checkpoint.is_file():
        raise dg.Failure(
            description=(
                f"No champion generator under {layout.champion_dir}: materialise "
                f"`{GENERATOR_ASSET}` (it promotes the evaluated `train_dcgan` checkpoint "
                "when it beats the champion, or when there is none yet) with this storage "
                "root first, e.g. `dagster asset materialize --select '*champion_generator'`."
            ),
            allow_retries=False,
        )
    return checkpoint


# --------------------------------------------------------------------------- design_samples


@defaults_from_file("design_samples")
class DesignSamplesConfig(CachedConfig):
    n: int = library_field(generate.GenerateConfig, "n")
    seed: int = library_field(generate.GenerateConfig, "seed")
    truncation: float | None = library_field(generate.GenerateConfig, "truncation")
    #: The latent walk goes from the first design of one seed to the first of the other.
    interpolate_seeds: list[int] = [0, 1]
    interpolation_steps: int = library_field(generate.GenerateConfig, "interpolation_steps")
    # The asset runs on the pipeline's GPU when there is one; the library's default is the CPU.
    device: str = library_field(generate.GenerateConfig, "device", default="auto")


@dg.asset(
    group_name=GROUP,
    code_version=source_version(["carmodels.generate"]),
    deps=[GENERATOR_ASSET],
    kinds={"pytorch"},
    pool=GPU_POOL,
    automation_condition=FOLLOW_UPSTREAM,
)
def design_samples(
    context: dg.AssetExecutionContext, config: DesignSamplesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """New car designs from the generator: a grid, one PNG each, and latent-space walks."""

    def work(layout: DataLayout) -> StepOutput:
        if len(config.interpolate_seeds) != 2:
            raise InputError(
                f"design_samples config: interpolate_seeds must hold two seeds, got "
                f"{config.interpolate_seeds}."
            )
        settings = generate.GenerateConfig(**library_kwargs(config, generate.GenerateConfig))
        checkpoint = _generator_checkpoint(layout)
        out = layout.root / DESIGNS_DIR
        designs = generate.generate(
            checkpoint,
            n=settings.n,
            seed=settings.seed,
            out_dir=out,
            truncation=settings.truncation,
            device=settings.device,
        )
        seed_a, seed_b = config.interpolate_seeds
        walk = generate.interpolate(
            checkpoint,
            seed_a,
            seed_b,
            steps=settings.interpolation_steps,
            out_dir=out,
            truncation=settings.truncation,
            device=settings.device,
        )
        context.log.info(f"{designs.n} designs and {len(walk.strip_paths)} latent walks in {out}")
        return StepOutput(
            data_version=files_version([designs.grid_path, *walk.strip_paths.values()]),
            metadata={
                "n_designs": designs.n,
                "seed": designs.seed,
                "truncation": str(designs.truncation),
                "weights": designs.weights,
                "checkpoint_epoch": designs.epoch,
                "checkpoint": dg.MetadataValue.path(str(Path(checkpoint).resolve())),
                "preview": image_preview(designs.grid_path),
                "walk_linear": image_preview(walk.strip_paths["linear"], max_side=1024),
                "walk_spherical": image_preview(walk.strip_paths["spherical"], max_side=1024),
                "dagster/uri": storage.uri(DESIGNS_DIR),
            },
        )

    return run_step(
        context,
        storage,
        Step(
            requires=None,  # _generator_checkpoint says what to materialise when it is missing
            upstream=[GENERATOR_ASSET],
            output=f"{DESIGNS_DIR}/{generate.GRID_FILE}",
            pull=[CHAMPION_DIR],
            push=[DESIGNS_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


# --------------------------------------------------------------------------- restoration


@defaults_from_file("restoration_examples")
class RestorationExamplesConfig(CachedConfig):
    n_images: int = library_field(restoration_eval.RestorationEvalConfig, "n_images")
    seed: int = library_field(restoration_eval.RestorationEvalConfig, "seed")
    restarts: int = library_field(restore.RestoreConfig, "restarts")
    steps: int = library_field(restore.RestoreConfig, "steps")
    finetune_steps: int = restore.DEFAULT_FINETUNE_STEPS
    device: str = library_field(restore.RestoreConfig, "device")


@dg.asset(
    group_name=GROUP,
    code_version=source_version(["carmodels.restoration_eval", "carmodels.restore"]),
    deps=[GENERATOR_ASSET, "car_shards"],
    kinds={"pytorch"},
    pool=GPU_POOL,
    automation_condition=FOLLOW_UPSTREAM,
)
def restoration_examples(
    context: dg.AssetExecutionContext, config: RestorationExamplesConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Inpainting, denoising and upscaling of validation photos, scored against baselines."""

    def work(layout: DataLayout) -> StepOutput:
        eval_config = library_settings(
            "restoration_examples",
            lambda: restoration_eval.RestorationEvalConfig(
                n_images=config.n_images,
                seed=config.seed,
                restore=restore.RestoreConfig(
                    restarts=config.restarts,
                    steps=config.steps,
                    finetune_steps=config.finetune_steps,
                    device=config.device,
                ),
            ),
        )
        checkpoint = _generator_checkpoint(layout)
        result = restoration_eval.evaluate_restoration(
            checkpoint,
            layout.shards_dir,
            layout.root / RESTORATION_DIR,
            eval_config,
            on_progress=rate_logger(context.log.info, "restoration cases"),
        )
        return StepOutput(
            data_version=files_version([result.preview_path]),
            metadata={
                "table": dg.MetadataValue.md(restoration_eval.format_table(result.table)),
                "n_images": result.n_images,
                "image_size": result.image_size,
                "model_image_size": result.model_size,
                "elapsed_s": round(result.elapsed_s, 1),
                "columns": ", ".join(restoration_eval.PREVIEW_COLUMNS),
                "preview": image_preview(result.preview_path, max_side=1024),
                "checkpoint": dg.MetadataValue.path(str(Path(checkpoint).resolve())),
                "dagster/uri": storage.uri(RESTORATION_DIR),
            },
        )

    return run_step(
        context,
        storage,
        Step(
            requires=None,  # _generator_checkpoint says what to materialise when it is missing
            upstream=[GENERATOR_ASSET, "car_shards"],
            output=RESTORATION_DIR,
            pull=[CHAMPION_DIR, SHARDS_DIR],
            push=[RESTORATION_DIR],
        ),
        settings=config.fingerprint_settings(),
        force=config.force,
        work=work,
    )


DESIGN_ASSETS = [design_samples, restoration_examples]
