"""Evaluate a trained generator: pictures, memorisation check and three families of metrics.

* Pixel metrics (this module), computed offline in seconds: ``pixel_fd_16`` is a Fréchet
  distance in a fixed pixel feature space, which tracks colour and layout statistics but not
  semantics; nearest-neighbour and diversity distances flag copies and collapse.
* FID/KID (:mod:`carmodels.metrics.fid`), the published metric, when the Inception weights are on
  disk (or can be downloaded); otherwise recorded as not computed, saying how to supply them.
* Domain metrics (:mod:`carmodels.metrics.domain`), offline: the judge, a car classifier
  (:mod:`carmodels.classifier`) trained on the shards' ``type`` and ``make`` labels, scores the
  generated cars in its features (``judge_fd``, ``judge_kid``, precision/recall/density/coverage,
  ``type_overlap``).

Every comparison is against the *val* split. Pictures: sample grids of 64 fixed latents from
the EMA and the raw generator, a latent interpolation strip, a nearest-neighbour grid (each
generated image beside its closest training images) and the training loss curves.

Feature spaces (images are first quantised to uint8, as they would be saved):

* ``pixel_fd_16``: images box-downsampled to 16x16 (768 values in [0, 1]), projected onto
  the top ``fd_components`` principal components of the *training* images; Fréchet distance
  between the Gaussians fitted to validation images and to generated images.
* nearest-neighbour and diversity distances: L2 between 32x32 downsamples, divided by
  sqrt(dimensions), i.e. the root-mean-square per-pixel difference in [0, 1].

Validation images and generated images are compared at the same count (``n_samples``, the
validation set is subsampled deterministically when larger), since both the Fréchet distance
and mean distances depend on the sample size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carmodels.checkpoint import load_generator
from carmodels.classifier import ClassifierConfig, NotEnoughLabels, train_classifier
from carmodels.device import resolve_device
from carmodels.errors import EmptySplitError, ShardsError
from carmodels.generate import sample_images
from carmodels.io import atomic_write_json
from carmodels.latent import sample_noise, slerp
from carmodels.metrics.domain import domain_metrics
from carmodels.metrics.fid import FidConfig, compute_fid_kid, sha256_of
from carmodels.metrics.pixel import frechet_distance, mean_pairwise_rms, pixel_features, to_uint8
from carmodels.pictures import plot_losses, save_image_grid
from carmodels.shards import data_version_of, fit_image_size, iter_images, load_images, shard_files
from carmodels.train.artefacts import HISTORY_NAME, read_history

logger = logging.getLogger(__name__)

METRIC_DEFINITIONS = {
    "pixel_fd_16": "Frechet distance, val vs generated, 16x16 pixels -> PCA (fit on train). "
    "Not FID; lower is closer.",
    "nn_generated_to_train": "Mean RMS pixel distance (32x32) from each generated image to its "
    "nearest training image.",
    "nn_val_to_train": "Same for validation images: the distance of genuinely new cars.",
    "nn_ratio": "nn_generated_to_train / nn_val_to_train; well below 1 suggests memorisation "
    "when diversity_ratio is near 1 (blurry, collapsed samples also sit close to everything).",
    "diversity_generated": "Mean pairwise RMS pixel distance (32x32) among generated images.",
    "diversity_val": "Same among validation images, for reference.",
    "diversity_ratio": "diversity_generated / diversity_val; well below 1 suggests mode collapse.",
    "fid": "Frechet Inception Distance, val vs generated (torchmetrics, published Inception "
    "weights, TF-compatible resize); null when the weights are unavailable, see fid_record.",
    "kid_mean": "Kernel Inception Distance (mean over subsets), val vs generated.",
    "kid_std": "Standard deviation of KID over its subsets.",
    "judge_fd": "Frechet distance, val vs generated, in the features of the judge (a car "
    "classifier trained on the shards' train split, validated by bench/judge.py); lower is "
    "closer. The champion gate's default metric.",
    "judge_kid": "Kernel distance (KID, unbiased) in the judge's features; lower is closer.",
    "judge_precision": "Share of generated images among the real val images' nearest "
    "neighbours in the judge's features (fidelity; Naeem et al. 2020).",
    "judge_recall": "Share of real val images among the generated images' neighbours (diversity).",
    "judge_density": "How many real neighbourhoods hold each generated image, over k (fidelity; "
    "about 1 for real images).",
    "judge_coverage": "Share of real val images whose neighbourhood holds a generated image "
    "(diversity).",
    "type_overlap": "Overlap of the judge's predicted body-type mix on generated vs val images "
    "(sum of the smaller shares; 1 = same mix).",
    "judge_type_accuracy": "The judge's body-type accuracy on the labelled val images.",
    "judge_make_accuracy": "The judge's make accuracy on the val images (null without makes).",
}
#: The judge's numbers copied into the flat metrics (``judge_key`` says which judge scored them:
#: scores by different judges are not compared).
DOMAIN_METRICS = (
    "judge_fd",
    "judge_kid",
    "judge_precision",
    "judge_recall",
    "judge_density",
    "judge_coverage",
    "type_overlap",
    "judge_type_accuracy",
    "judge_make_accuracy",
    "judge_key",
)
#: The sample grids show this many images drawn from fixed latents (``EvalConfig.seed``).
GRID_IMAGES = 64


@dataclass
class EvalConfig:
    n_samples: int = field(
        default=256,
        metadata={"help": "generated images scored against as many validation images; >= 2"},
    )
    seed: int = field(default=0, metadata={"help": "random seed of the generated images"})
    batch_size: int = 64
    device: str = "auto"
    #: Evaluate the EMA generator when the run kept one.
    ema: bool = True
    #: Side of the downsample the pixel Fréchet distance works on (the 16 in pixel_fd_16).
    fd_size: int = 16
    fd_components: int = 32
    #: Side of the downsample for nearest-neighbour and diversity distances.
    nn_size: int = 32
    #: How many generated/nearest-training pairs ``nearest.png`` shows.
    n_nearest_shown: int = 8
    #: How many nearest training images sit beside each generated one in ``nearest.png``.
    n_neighbours: int = 3
    #: Training images are streamed from the shards in chunks of this many.
    chunk_size: int = 4096
    #: Rows and steps of the latent interpolation strip.
    interpolation_rows: int = 4
    interpolation_steps: int = 10
    fid: bool = field(
        default=True,
        metadata={
            "help": "FID/KID (recorded as not computed when the Inception weights are missing)"
        },
    )
    fid_config: FidConfig = field(default_factory=FidConfig)
    #: The judge's metrics (skipped when False or when the shards lack ``type`` labels).
    type_metrics: bool = True
    classifier_config: ClassifierConfig = field(default_factory=ClassifierConfig)
    #: Where trained classifiers are cached (by data version); None = ``<out_dir>/classifier``.
    classifier_cache_dir: str | None = None
    #: Whether the callers that record evaluations (the ``evaluate_dcgan`` asset and
    #: ``carmodels evaluate``) append this one to ``history.parquet`` (+ ``history.png``) in
    #: ``out_dir``, by :func:`carmodels.promotion.record_evaluation`. :func:`evaluate` itself
    #: never writes the history (the champion's re-scoring evaluates without recording).
    record_history: bool = True

    def __post_init__(self) -> None:
        for name in (
            "n_samples",
            "batch_size",
            "fd_size",
            "fd_components",
            "nn_size",
            "n_nearest_shown",
            "n_neighbours",
            "chunk_size",
            "interpolation_rows",
            "interpolation_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples < 2:
            raise ValueError("EvalConfig.n_samples must be >= 2 to measure diversity")


@dataclass
class EvalResult:
    #: Flat numbers (None where not computed): what dashboards and promotion compare.
    metrics: dict[str, Any]
    #: The grid of the evaluated weights (EMA when the run kept it and ``ema`` is set).
    samples_path: Path
    loss_plot_path: Path | None
    nearest_path: Path
    metrics_path: Path
    #: Grid per weights kind: {"ema": ..., "raw": ...} (no "ema" when the run kept none).
    sample_grids: dict[str, Path] = field(default_factory=dict)
    interpolation_path: Path | None = None
    #: FID/KID with library, weights checksum and settings, or why it was not computed.
    fid_record: dict[str, Any] = field(default_factory=dict)
    #: Type mixes and classifier facts behind the domain metrics, or why they were skipped.
    type_record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _TrainScan:
    """What one streaming pass over the training split gives."""

    n_train: int
    fd_mean: np.ndarray
    fd_components: np.ndarray  # d x k
    nearest_distance: torch.Tensor  # per query, RMS
    neighbour_distances: torch.Tensor  # n_generated x k, RMS, ascending (inf: too few images)
    neighbour_images: torch.Tensor  # n_generated x k x 3 x H x W, uint8


def _merge_neighbours(
    top_distances: torch.Tensor,
    top_images: torch.Tensor,
    distances: torch.Tensor,
    chunk: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k closest of (current top k, this chunk) for every generated query."""
    k = top_distances.shape[1]
    candidates = torch.cat([top_distances, distances.cpu()], dim=1)
    new_distances, pick = candidates.topk(k, dim=1, largest=False)
    rows = torch.arange(len(pick))[:, None].expand_as(pick)
    kept = top_images[rows, pick.clamp(max=k - 1)]
    from_chunk = chunk[(pick - k).clamp(min=0)]
    is_new = (pick >= k)[..., None, None, None]
    return new_distances, torch.where(is_new, from_chunk, kept)


def _scan_training_set(
    shards_dir: str | os.PathLike[str],
    queries: torch.Tensor,
    n_generated: int,
    image_size: int,
    config: EvalConfig,
    device: torch.device,
) -> _TrainScan:
    """One pass over the train split: PCA statistics, every query's nearest image, and the
    ``n_neighbours`` nearest images of each of the first ``n_generated`` (generated) queries."""
    query_features = pixel_features(queries, config.nn_size).to(device)
    best = torch.full((len(queries),), math.inf, device=device)
    k = config.n_neighbours
    top_distances = torch.full((n_generated, k), math.inf)
    top_images = torch.zeros(n_generated, k, *queries.shape[1:], dtype=torch.uint8)
    dims = 3 * config.fd_size**2
    total, outer, n_train = np.zeros(dims), np.zeros((dims, dims)), 0
    for chunk in iter_images(shards_dir, split="train", batch_size=config.chunk_size):
        chunk = fit_image_size(chunk, image_size, str(shards_dir))
        fd = pixel_features(chunk, config.fd_size).double().numpy()
        total += fd.sum(0)
        outer += fd.T @ fd
        n_train += len(chunk)
        distances = torch.cdist(query_features, pixel_features(chunk, config.nn_size).to(device))
        chunk_best = distances.min(dim=1).values
        best = torch.minimum(chunk_best, best)
        top_distances, top_images = _merge_neighbours(
            top_distances, top_images, distances[:n_generated], chunk
        )
    if n_train < 2:
        raise ShardsError(
            f"{shards_dir} has {n_train} training images; evaluation needs >= 2: rebuild the "
            "shards with `carmodels shard` from more photos."
        )
    mean = total / n_train
    covariance = (outer - n_train * np.outer(mean, mean)) / (n_train - 1)
    values, vectors = np.linalg.eigh(covariance)
    k = min(config.fd_components, n_train - 1, dims)
    components = vectors[:, np.argsort(values)[::-1][:k]]
    return _TrainScan(
        n_train=n_train,
        fd_mean=mean,
        fd_components=components,
        nearest_distance=best.cpu() / math.sqrt(3 * config.nn_size**2),
        neighbour_distances=top_distances / math.sqrt(3 * config.nn_size**2),
        neighbour_images=top_images,
    )


def _validation_images(shards_dir: str | os.PathLike[str], image_size: int) -> torch.Tensor | None:
    """All validation images at the model's size, or None when there is no val split."""
    try:
        images = load_images(shards_dir, split="val")
    except EmptySplitError:  # only that: a damaged or outdated folder must fail, not shrink
        return None
    return fit_image_size(images, image_size, str(shards_dir))


def _seeded_subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """At most ``n`` of ``images``, the same ones for the same seed (order kept)."""
    if len(images) <= n:
        return images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[pick[:n].sort().values]


def compute_metrics(
    generated: torch.Tensor,
    val: torch.Tensor | None,
    scan: _TrainScan,
    config: EvalConfig,
) -> dict[str, float | None]:
    """Metric values (None where the validation split is missing or too small)."""
    n_generated = len(generated)
    nn_generated = float(scan.nearest_distance[:n_generated].mean())
    metrics: dict[str, float | None] = {
        "nn_generated_to_train": nn_generated,
        "diversity_generated": mean_pairwise_rms(pixel_features(generated, config.nn_size)),
        "pixel_fd_16": None,
        "nn_val_to_train": None,
        "nn_ratio": None,
        "diversity_val": None,
        "diversity_ratio": None,
    }
    if val is None or len(val) < 2:
        return metrics

    def project(images: torch.Tensor) -> np.ndarray:
        features = pixel_features(images, config.fd_size).double().numpy()
        return (features - scan.fd_mean) @ scan.fd_components

    nn_val = float(scan.nearest_distance[n_generated:].mean())
    diversity_val = mean_pairwise_rms(pixel_features(val, config.nn_size))
    metrics.update(
        pixel_fd_16=frechet_distance(project(val), project(generated)),
        nn_val_to_train=nn_val,
        nn_ratio=nn_generated / nn_val if nn_val > 0 else None,
        diversity_val=diversity_val,
        diversity_ratio=metrics["diversity_generated"] / diversity_val if diversity_val else None,
    )
    return metrics


@torch.no_grad()
def interpolation_strip(
    generator: torch.nn.Module, rows: int, steps: int, seed: int, batch_size: int = 64
) -> torch.Tensor:
    """``rows`` x ``steps`` images: each row walks from one fixed latent to another along the
    great circle (:func:`carmodels.latent.slerp`, the path of ``carmodels generate``'s walks)."""
    device = next(generator.parameters()).device
    ends = sample_noise(2 * rows, generator.spec.nz, seed).view(rows, 2, -1)
    t = torch.linspace(0, 1, steps)
    z = torch.cat([slerp(a, b, t) for a, b in ends])
    return torch.cat([generator(chunk.to(device)).float().cpu() for chunk in z.split(batch_size)])


def _sample_grids(
    checkpoint_path: Path, evaluated: str, config: EvalConfig, device: torch.device, out: Path
) -> dict[str, Path]:
    """``samples_ema.png`` and ``samples_raw.png``: the same 64 latents through both weights."""
    side = math.isqrt(GRID_IMAGES)
    grids: dict[str, Path] = {}
    for use_ema in (True, False):
        generator, _, meta = load_generator(checkpoint_path, device=str(device), ema=use_ema)
        kind = "ema" if meta["weights"] == "ema" else "raw"
        if kind in grids:  # no EMA weights in this run: the raw grid is already drawn
            continue
        images = sample_images(generator, GRID_IMAGES, config.seed, config.batch_size)
        grids[kind] = save_image_grid(images, out / f"samples_{kind}.png", nrow=side)
    grids["evaluated"] = grids["ema" if evaluated == "ema" else "raw"]
    return grids


def _nearest_grid(scan: _TrainScan, generated: torch.Tensor, config: EvalConfig, out: Path) -> Path:
    """One row per generated image (the likeliest copies first), then its nearest training
    images left to right. Slots with no training image left (tiny sets) stay black."""
    n_generated = len(scan.neighbour_distances)
    n_shown = min(config.n_nearest_shown, n_generated)
    closest = scan.neighbour_distances[:, 0].argsort()[:n_shown]
    rows = torch.cat([generated[closest, None], scan.neighbour_images[closest]], dim=1)
    pictures = rows.flatten(0, 1).float().div(127.5).sub(1)
    return save_image_grid(pictures, out / "nearest.png", nrow=1 + config.n_neighbours)


def _type_metrics(
    shards_dir: Path,
    val: torch.Tensor | None,
    generated: torch.Tensor,
    config: EvalConfig,
    out: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Domain metrics from the judge, or a record of why they were skipped."""
    if not config.type_metrics:
        return {"computed": False, "reason": "disabled in EvalConfig.type_metrics"}
    if val is None or len(val) < 2:
        return {"computed": False, "reason": f"{shards_dir} has fewer than 2 val images"}
    cache_dir = Path(config.classifier_cache_dir or out / "classifier")
    try:
        classifier = train_classifier(
            shards_dir,
            cache_dir,
            data_version_of(shards_dir),
            config.classifier_config,
            log,
            judged_side=generated.shape[-1],
        )
    except NotEnoughLabels as error:
        log(f"Type metrics not computed: {error}")
        return {"computed": False, "reason": str(error)}
    return {
        "computed": True,
        **domain_metrics(classifier, val, generated, frechet_distance),
        "types": classifier.types,
        "classes": {label: len(names) for label, names in classifier.classes.items()},
        "classifier_n_train": classifier.n_train,
        "classifier_n_val": classifier.n_val,
        "classifier_cache": str(classifier.cache_path),
        "classifier_from_cache": classifier.from_cache,
        "classifier_config": asdict(config.classifier_config),
        "n_real": len(val),
        "n_generated": len(generated),
    }


def _fid_record(
    shards_dir: Path,
    val_all: torch.Tensor | None,
    generated: torch.Tensor,
    config: EvalConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """FID/KID of ``generated`` against as many validation images, or why they were not
    computed."""
    if not config.fid:
        return {"computed": False, "reason": "disabled in EvalConfig.fid"}
    if val_all is None or len(val_all) < 2:
        return {"computed": False, "reason": f"{shards_dir} has fewer than 2 val images"}
    record = compute_fid_kid(
        _seeded_subset(val_all, len(generated), config.seed),
        generated,
        config.fid_config,
        device,
        seed=config.seed,
        log=log,
    )
    record["real_split"] = "val"
    return record


def _training_losses(
    checkpoint_path: Path, meta: dict[str, Any], out: Path
) -> tuple[Path | None, dict[str, Any]]:
    """The loss plot of the run that wrote the checkpoint, and its last history row. The run's
    ``history.csv`` is preferred to the copy in the checkpoint (it has every epoch)."""
    history_csv = checkpoint_path.parent.parent / HISTORY_NAME
    history = read_history(history_csv) if history_csv.is_file() else meta["history"]
    loss_plot = plot_losses(history, out / "losses.png") if history else None
    return loss_plot, (history[-1] if history else {})


def _write_metrics(
    out: Path,
    metrics: dict[str, Any],
    fid_record: dict[str, Any],
    type_record: dict[str, Any],
    checkpoint_path: Path,
    meta: dict[str, Any],
    shards_dir: Path,
    config: EvalConfig,
) -> Path:
    """``metrics.json``: the metrics, the records behind them and what was evaluated."""
    return atomic_write_json(
        out / "metrics.json",
        {
            **metrics,
            "fid_record": fid_record,
            "type_record": type_record,
            "checkpoint": str(checkpoint_path),
            # Which bytes were evaluated: promotion refuses the file if it changed since.
            "checkpoint_sha256": sha256_of(checkpoint_path),
            "weights": meta["weights"],
            "data_version": meta["data_version"],
            "eval_data_version": data_version_of(shards_dir),
            "config": asdict(config),
            "definitions": METRIC_DEFINITIONS,
        },
    )


def _summary(metrics: dict[str, Any]) -> str:
    """The defined metrics that have a value, for the log."""
    return ", ".join(
        f"{k}={v:.4g}"
        for k, v in metrics.items()
        if isinstance(v, float) and k in METRIC_DEFINITIONS
    )


def evaluate(
    checkpoint_path: str | os.PathLike[str],
    shards_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: EvalConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Write the pictures and metrics.json for a checkpoint; see the module docstring."""
    config = config or EvalConfig()
    log = log or logger.info
    out = Path(out_dir)
    checkpoint_path = Path(checkpoint_path)
    shards_dir = Path(shards_dir)
    # The shards folder is checked (and the checkpoint loaded) before anything is written to
    # ``out``: a missing, damaged or outdated folder must not leave half an evaluation behind.
    shard_files(shards_dir)
    device = resolve_device(config.device)
    generator, spec, meta = load_generator(checkpoint_path, device=str(device), ema=config.ema)

    # One pool of generated images: the first n_samples feed the pixel metrics, the first
    # n_fid the learned-feature metrics.
    n_fid = config.fid_config.samples_for(device) if config.fid else 0
    n_pool = max(config.n_samples, n_fid if config.fid or config.type_metrics else 0)
    pool = to_uint8(sample_images(generator, n_pool, config.seed, config.batch_size))
    generated = pool[: config.n_samples]

    grids = _sample_grids(checkpoint_path, meta["weights"], config, device, out)
    strip = interpolation_strip(
        generator, config.interpolation_rows, config.interpolation_steps, config.seed + 1
    )
    interpolation_path = save_image_grid(
        strip, out / "interpolation.png", nrow=config.interpolation_steps
    )

    val_all = _validation_images(shards_dir, spec.image_size)
    if val_all is None:
        log(f"No validation split in {shards_dir}: val-based metrics are null.")
    val = None if val_all is None else _seeded_subset(val_all, config.n_samples, config.seed)
    queries = generated if val is None else torch.cat([generated, val])
    scan = _scan_training_set(shards_dir, queries, len(generated), spec.image_size, config, device)
    metrics = compute_metrics(generated, val, scan, config)
    nearest_path = _nearest_grid(scan, generated, config, out)

    fid_record = _fid_record(shards_dir, val_all, pool[:n_fid], config, device, log)
    metrics.update({name: fid_record.get(name) for name in ("fid", "kid_mean", "kid_std")})

    type_record = _type_metrics(
        shards_dir, val_all, pool[: max(n_fid, config.n_samples)], config, out, log
    )
    metrics.update({name: type_record.get(name) for name in DOMAIN_METRICS})

    loss_plot, final = _training_losses(checkpoint_path, meta, out)
    metrics.update({f"final_{k}": final.get(k) for k in ("loss_d", "loss_g", "d_x", "d_g_z")})
    metrics.update(
        n_generated=len(generated),
        n_val=0 if val is None else len(val),
        n_train=scan.n_train,
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        # The judge works at the generator's side: the gate says so when two sizes meet.
        image_size=spec.image_size,
    )
    metrics_path = _write_metrics(
        out, metrics, fid_record, type_record, checkpoint_path, meta, shards_dir, config
    )
    log("Evaluation: " + _summary(metrics))
    return EvalResult(
        metrics=metrics,
        samples_path=grids.pop("evaluated"),
        loss_plot_path=loss_plot,
        nearest_path=nearest_path,
        metrics_path=metrics_path,
        sample_grids=grids,
        interpolation_path=interpolation_path,
        fid_record=fid_record,
        type_record=type_record,
    )
