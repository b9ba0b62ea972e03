"""DCGAN training: a fast on-device loop, exact resume, and the artefacts people look at.

Speed follows nanoGPT / stylegan2-ada rather than a ``DataLoader``: the whole uint8 training
set is moved to the device once (60,000 128 px images are 2.9 GB), every step indexes a batch
from a per-epoch permutation and normalises it on the device, and the step never calls
``.item()``: losses are summed on the device and read every ``log_every_steps`` steps, which
is also when divergence (NaN/inf) is detected. A training set larger than the memory budget
(``TrainConfig.memory_budget_mb``) is streamed from the shards' row groups instead.

Exact resume: each epoch's permutation comes from a generator seeded with ``(seed, epoch)``,
the noise of the step has its own generator, and checkpoints hold the state of every random
number generator, both optimisers and the EMA generator. On the CPU, 2 epochs straight and
1 epoch + resume + 1 epoch give bit-identical weights.

Outputs under ``out_dir``: ``checkpoints/epoch-NNNN.pt`` (+ ``latest.pt``),
``samples/epoch-NNNN.png``, ``history.csv``, ``losses.png`` and ``progress.gif``.

The package, read in this order:

* :mod:`.config`: :class:`TrainConfig`, :class:`TrainResult`, :class:`TrainingDiverged`;
* :mod:`.step`: :class:`TrainStep` (one D + one G update), shared with ``bench/train_gpu.py``
  so the benchmark times exactly the code that trains, and the epoch order;
* :mod:`.loop`: :func:`train`, prepare -> resume -> epochs -> checkpoint -> finish;
* :mod:`.data`: the images each epoch trains on, in memory or, above the memory budget,
  streamed from the shards' row groups (what each epoch covers is stated there);
* :mod:`.cpu_amp`: what ``amp="auto"`` means on a CPU (a measured fp32 / bf16 probe);
* :mod:`.monitor` (per-epoch sample quality), :mod:`.artefacts` (history, TensorBoard),
  :mod:`.state` (the global RNGs);
* checkpoints are :mod:`carmodels.checkpoint`'s and devices :mod:`carmodels.device`'s; the
  grids, ``losses.png`` and ``progress.gif`` are drawn by :mod:`carmodels.pictures`. Their
  names are re-exported here for the callers that know them as ``carmodels.train.*``.
"""

from __future__ import annotations

from typing import Any

from carmodels.checkpoint import (
    BEST_NAME,
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEYS,
    LATEST_NAME,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_generator,
)
from carmodels.device import AMP_MODES, resolve_amp, resolve_device
from carmodels.pictures import plot_losses, save_image_grid, save_progress_gif, tensor_to_pil
from carmodels.train.artefacts import (
    GIF_NAME,
    GRID_SIDE,
    HISTORY_COLUMNS,
    HISTORY_NAME,
    LOSS_PLOT_NAME,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    read_history,
    write_history,
)
from carmodels.train.config import MEASURED_RECIPE, TrainConfig, TrainingDiverged, TrainResult
from carmodels.train.cpu_amp import AmpChoice, choose_amp
from carmodels.train.loop import train
from carmodels.train.monitor import SampleMonitor, is_collapse
from carmodels.train.step import (
    EmaGenerator,
    StepStats,
    TrainStep,
    epoch_batches,
    epoch_permutation,
)

#: Re-exported lazily from carmodels.shards, which owns the shard format: importing it pulls
#: in the image pipeline, which the trainer's step (bench/train_gpu.py) must not need.
_FROM_SHARDS = ("data_version_of", "fit_image_size")


def __getattr__(name: str) -> Any:
    if name in _FROM_SHARDS:
        from carmodels import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AMP_MODES",
    "BEST_NAME",
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEYS",
    "GIF_NAME",
    "GRID_SIDE",
    "HISTORY_COLUMNS",
    "HISTORY_NAME",
    "LATEST_NAME",
    "LOSS_PLOT_NAME",
    "SAMPLES_DIR",
    "TENSORBOARD_DIR",
    "AmpChoice",
    "EmaGenerator",
    "SampleMonitor",
    "StepStats",
    "MEASURED_RECIPE",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "TrainingDiverged",
    "best_checkpoint",
    "choose_amp",
    "data_version_of",
    "epoch_batches",
    "epoch_permutation",
    "fit_image_size",
    "is_collapse",
    "latest_checkpoint",
    "load_checkpoint",
    "load_generator",
    "plot_losses",
    "read_history",
    "resolve_amp",
    "resolve_device",
    "save_image_grid",
    "save_progress_gif",
    "tensor_to_pil",
    "train",
    "write_history",
]
