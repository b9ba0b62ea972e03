"""The trainer's process, launched by the `train_dcgan` asset through Dagster Pipes.

It reads its settings from the Pipes extras, runs `carmodels.train.train`, streams progress
and log lines back into the Dagster run, and reports the materialisation with its metadata.
"""

from __future__ import annotations

from pathlib import Path

from dagster_pipes import PipesContext, open_dagster_pipes

from carmodels import train
from pipelines.metadata import image_markdown, rate_logger


def _run(pipes: PipesContext) -> None:
    extras = pipes.extras
    config = train.TrainConfig(**extras["config"])
    result = train.train(
        extras["shards_dir"],
        extras["out_dir"],
        config,
        on_progress=rate_logger(pipes.log.info, "steps"),
        resume=extras["resume"],
        log=pipes.log.info,
    )
    metadata: dict[str, object] = {
        "preset": config.preset,
        "image_size": config.image_size,
        "epochs": result.epochs_completed,
        "steps": result.steps,
        "device": result.device,
        "amp": result.amp,
        "images_per_s": round(result.images_per_s, 1),
        **{f"final_{k}": round(float(v), 4) for k, v in result.final_losses.items()},
        "collapse_warnings": len(result.collapse_epochs),
        "checkpoint": {"raw_value": str(Path(result.checkpoint_path).resolve()), "type": "path"},
        "preview": {"raw_value": image_markdown(result.grid_path), "type": "md"},
        "losses": {"raw_value": image_markdown(result.loss_plot_path), "type": "md"},
        "dagster/uri": str(Path(extras["out_dir"]).resolve()),
    }
    if result.tensorboard_dir is not None:
        metadata["tensorboard"] = {
            "raw_value": str(Path(result.tensorboard_dir).resolve()),
            "type": "path",
        }
    if result.best_checkpoint_path is not None:
        metadata["best_checkpoint"] = {
            "raw_value": str(Path(result.best_checkpoint_path).resolve()),
            "type": "path",
        }
    for epoch in result.collapse_epochs:
        pipes.log.warning(f"sample diversity collapsed at epoch {epoch}: see history.csv")
    pipes.report_asset_materialization(metadata=metadata)


def main() -> None:
    with open_dagster_pipes() as pipes:
        _run(pipes)


if __name__ == "__main__":
    main()
