"""What a run leaves for people to look at, and the log it keeps while it runs.

Under ``out_dir``: ``samples/epoch-NNNN.png`` (the fixed-noise grid), ``history.csv`` (one row
per log point), ``losses.png``, ``progress.gif`` and ``tensorboard/`` events; the checkpoints
are :mod:`carmodels.checkpoint`'s and the pictures are drawn by :mod:`carmodels.pictures`.
:class:`RunLog` holds the history, the TensorBoard writer and the throughput of a run in
progress.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carmodels.checkpoint import CHECKPOINT_DIR
from carmodels.io import atomic_write_bytes
from carmodels.pictures import tensor_to_pil

SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
HISTORY_NAME = "history.csv"
LOSS_PLOT_NAME = "losses.png"
GIF_NAME = "progress.gif"
HISTORY_COLUMNS = (
    "epoch",
    "step",
    "loss_d",
    "loss_g",
    "d_x",
    "d_g_z",
    "images_per_s",
    # Filled on the last row of each sampled epoch (see SampleMonitor), empty elsewhere.
    "sample_fd",
    "sample_diversity",
    "collapse_warning",
    # DiffAugment's probability, with adaptive augmentation (diffaugment_target); else empty.
    "augment_p",
)
#: The per-epoch sample grid is GRID_SIDE x GRID_SIDE images from fixed noise.
GRID_SIDE = 8


def read_history(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of history.csv as floats; empty cells (epoch-only columns) are left out."""
    with open(path, newline="") as f:
        return [
            {key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(f)
        ]


def write_history(path: str | os.PathLike[str], history: list[dict[str, float]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    return atomic_write_bytes(path, buffer.getvalue().encode())


def clear_previous_run(run_dir: Path, log: Callable[[str], None]) -> None:
    """A fresh run replaces the artefacts of an earlier one in the same folder."""
    stale = [
        *(run_dir / CHECKPOINT_DIR).glob("*.pt"),
        *(run_dir / SAMPLES_DIR).glob("epoch-*.png"),
        *[run_dir / name for name in (HISTORY_NAME, LOSS_PLOT_NAME, GIF_NAME)],
        *(run_dir / TENSORBOARD_DIR).glob("events.out.tfevents.*"),
    ]
    stale = [p for p in stale if p.exists()]
    if stale:
        log(f"Starting a fresh run in {run_dir}: removing {len(stale)} files of the previous run.")
        for path in stale:
            path.unlink()


@dataclass
class Throughput:
    """Images per second between log points (each log point syncs, so timings are real)."""

    images: int = 0
    seconds: float = 0.0
    _since: float = field(default_factory=time.perf_counter)
    _images_since: int = 0

    def add(self, n_images: int) -> None:
        self._images_since += n_images

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed = now - self._since
        rate = self._images_since / elapsed if elapsed > 0 else 0.0
        self.images += self._images_since
        self.seconds += elapsed
        self._since, self._images_since = now, 0
        return rate

    def pause_until_now(self) -> None:
        """Exclude time spent outside the training steps (checkpoints, samples)."""
        self._since = time.perf_counter()

    @property
    def mean(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def tensorboard_writer(run_dir: Path, purge_step: int | None) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # lazily: pulls in tensorboard

    # purge_step drops events a crashed run wrote after the checkpoint we resume from.
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)


class RunLog:
    """A run's records while it trains: the history rows (also saved in every checkpoint),
    the TensorBoard writer (None when off, or on ranks other than 0) and the throughput."""

    def __init__(
        self, history_path: Path, history: list[dict[str, float]], writer: Any | None
    ) -> None:
        self.history_path, self.history, self.writer = history_path, history, writer
        self.throughput = Throughput()

    def append(self, epoch: int, step: int, losses: dict[str, float]) -> dict[str, float]:
        """A history row for the steps since the last one, with their images per second."""
        row = {
            "epoch": float(epoch),
            "step": float(step),
            **losses,
            "images_per_s": self.throughput.lap(),
        }
        self.history.append(row)
        return row

    def save_history(self) -> Path:
        return write_history(self.history_path, self.history)

    def add_scalars(self, group: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{group}/{key}", value, step)

    def add_sample_grid(self, samples: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(
                "samples/fixed_noise",
                np.asarray(tensor_to_pil(samples, GRID_SIDE)),
                step,
                dataformats="HWC",
            )

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
