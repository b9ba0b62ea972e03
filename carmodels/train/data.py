"""The images each epoch trains on: the train split in memory, or streamed from the shards'
Parquet row groups when it is larger than the memory budget (``TrainConfig.memory_budget_mb``).

**In memory**, when the split's decoded size (at the shards' resolution) is at most the
budget: what the trainer has always done, bit for bit. Every rank loads the split, keeps
every ``W``-th image (``W`` ranks) on its device and takes each epoch's batches from a
permutation of its images seeded with ``(seed, epoch, rank)`` (:func:`.step.epoch_permutation`);
the last partial batch is dropped.

**Streamed**, above the budget. Each epoch, with ``N`` training images and ``B`` images per
rank and step:

1. The row groups holding training images are put in an order seeded with ``(seed, epoch)``;
   within a row group the images keep their file order. That is the epoch's sequence of all
   ``N`` images (:func:`rank_segments`).
2. Rank ``r`` takes the positions ``[r * m, (r + 1) * m)`` of that sequence, ``m = N // W``:
   the ranks' parts are disjoint and of equal size, so every rank takes the same number of
   steps, ``m // B`` (DDP needs that; it is the in-memory path's count too). The last
   ``N mod W`` images of the sequence sit the epoch out.
3. A rank cuts its part into windows of consecutive images (a multiple of ``B``, as many as
   fit in a quarter of the budget: two windows are held at once, the one being trained on and
   the next being read in a thread), shuffles each window with a generator seeded with
   ``(seed, epoch, rank, window)`` (:func:`window_order`) and takes its batches in that order.
   The last ``m mod B`` images of the part do not fill a batch and are dropped, as the
   in-memory path drops its last partial batch.

So in an epoch every training image is seen at most once by at most one rank, and exactly
once when ``N`` is a multiple of ``W * B``; otherwise ``N mod W + W * (m mod B)`` images sit
it out, and which ones changes from epoch to epoch with the row group order. The order is a
pure function of the seed, the epoch, ``W``, ``B``, the budget and the shards. The shuffle is
window-local, not global: a batch mixes the images of the few row groups its window spans
(the seeded row group order changes which ones every epoch). ``max_steps_per_epoch`` takes
the first steps of this order and reads only the windows they need.

What the budget bounds when streaming: the two windows (half of it) and the piece being read
(an eighth). On top come rank 0's 512 reference images of the sample monitor (25 MB at
128 px) and pyarrow's reading buffers, about two Parquet pages of the shards
(``carmodels.shards.iter_row_group_images``: about 200 MB with today's shards at 128 px,
whatever the budget).

The two paths order the images differently, so a run trains bit-identically again only on
the same path: the log names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from carmodels.distributed import DistContext
from carmodels.errors import InputError
from carmodels.models import ModelSpec
from carmodels.train.config import TrainConfig
from carmodels.train.monitor import SampleMonitor
from carmodels.train.step import epoch_batches, epoch_permutation

if TYPE_CHECKING:
    from carmodels.shards import RowGroup

MIB = 1 << 20
#: The split the trainer reads.
TRAIN_SPLIT = "train"
#: Rows read from a shard at a time, at most: enough to amortise pyarrow's per-call cost.
MAX_READ_ROWS = 512


# -- the memory budget -----------------------------------------------------------------------


def memory_budget(config: TrainConfig, device: torch.device, dist: DistContext) -> int:
    """Bytes the training images may take in this process (``TrainConfig.memory_budget_mb``).

    Unset: half the memory available now, divided among this node's processes, and on a GPU
    at most half its memory (the in-memory path keeps the split on the GPU, beside the models
    and activations). Half, because loading the split whole briefly holds it twice: pyarrow's
    table and the tensor. Under torchrun, the smallest of the ranks' budgets: every rank must
    take the same path, or their parts of the epoch would overlap. (A collective, so every
    rank measures before any rank loads.)
    """
    if config.memory_budget_mb is not None:
        return config.memory_budget_mb * MIB
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.enabled else 1
    budget = available_memory() // 2 // max(1, local_processes)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 2)
    return dist.min_over_ranks(budget, device)


def available_memory() -> int:
    """Bytes that new allocations can take: Linux's MemAvailable, within a cgroup v2 memory
    limit (a container's) when there is one; elsewhere the physical memory."""
    available = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            available = 8 << 30  # no way to ask (Windows): assume a small machine
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, max(0, int(limit) - used))
    return available


# -- the two paths ---------------------------------------------------------------------------


@dataclass
class InMemoryImages:
    """This rank's slice of the train split on its device: the trainer's original path."""

    #: Every ``world``-th training image from ``rank`` on, uint8.
    images: torch.Tensor
    n_images: int
    seed: int
    rank: int
    rank_batch: int
    device: torch.device

    def batches(self, epoch: int, n_steps: int) -> Iterator[torch.Tensor]:
        """The first ``n_steps`` batches of this rank's epoch."""
        permutation = epoch_permutation(
            self.images.shape[0], self.seed, epoch, self.device, rank=self.rank
        )
        return epoch_batches(self.images, permutation, self.rank_batch, n_steps)

    def describe(self) -> str:
        return "in memory"


@dataclass(frozen=True)
class Segment:
    """The images ``start:stop`` (counted among its training images) of row group ``group``."""

    group: int
    start: int
    stop: int


def seeded_permutation(n: int, key: str) -> torch.Tensor:
    """A permutation of ``range(n)``, a pure function of ``key``."""
    digest = hashlib.sha256(key.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator)


def rank_segments(
    counts: Sequence[int], seed: int, epoch: int, world: int, rank: int
) -> list[Segment]:
    """Rank ``rank``'s part of an epoch's image sequence, in reading order: steps 1 and 2 of
    the module's docstring. ``counts`` are the row groups' numbers of training images."""
    order = seeded_permutation(len(counts), f"carmodels-stream:{seed}:{epoch}")
    per_rank = sum(counts) // world
    first, last = rank * per_rank, (rank + 1) * per_rank
    segments, position = [], 0
    for group in order.tolist():
        low, high = max(first, position), min(last, position + counts[group])
        if low < high:
            segments.append(Segment(group, low - position, high - position))
        position += counts[group]
        if position >= last:
            break
    return segments


def window_order(n: int, seed: int, epoch: int, rank: int, window: int) -> torch.Tensor:
    """The order in which a window of ``n`` images is trained on: step 3."""
    return seeded_permutation(n, f"carmodels-window:{seed}:{epoch}:{rank}:{window}")


@dataclass
class StreamedImages:
    """This rank's share of each epoch, read from the shards' row groups as it trains (see
    the module's docstring for the order and what each epoch covers)."""

    groups: list[RowGroup]
    #: The model's image side; the shards' may be larger (downscaled as they are read).
    image_size: int
    #: The shards folder, for messages.
    source: str
    seed: int
    rank: int
    world: int
    rank_batch: int
    #: Images per window, a multiple of ``rank_batch``.
    window: int
    #: Rows read from a shard at a time.
    read_rows: int
    device: torch.device

    @property
    def n_images(self) -> int:
        return sum(group.n_images for group in self.groups)

    def batches(self, epoch: int, n_steps: int) -> Iterator[torch.Tensor]:
        """The first ``n_steps`` batches of this rank's epoch."""
        segments = rank_segments(
            [group.n_images for group in self.groups], self.seed, epoch, self.world, self.rank
        )
        n_windows = math.ceil(n_steps * self.rank_batch / self.window)
        step = 0
        with contextlib.closing(_one_ahead(self._windows(segments, n_windows))) as windows:
            for index, window in enumerate(windows):
                order = window_order(len(window), self.seed, epoch, self.rank, index)
                for start in range(0, len(window) - self.rank_batch + 1, self.rank_batch):
                    if step == n_steps:
                        return
                    yield window[order[start : start + self.rank_batch]].to(self.device)
                    step += 1

    def _windows(self, segments: list[Segment], n_windows: int) -> Iterator[torch.Tensor]:
        """The part's first ``n_windows`` windows of consecutive images (the last may be
        short), each filled into its own buffer as the shards are read."""
        pieces = self._pieces(segments)
        piece: torch.Tensor | None = None
        for _ in range(n_windows):
            side = self.image_size
            buffer = torch.empty((self.window, 3, side, side), dtype=torch.uint8)
            filled = 0
            while filled < self.window:
                if piece is None or not len(piece):
                    piece = next(pieces, None)
                    if piece is None:
                        break
                taken = min(len(piece), self.window - filled)
                buffer[filled : filled + taken] = piece[:taken]
                piece, filled = piece[taken:], filled + taken
            if not filled:
                return
            yield buffer[:filled]

    def _pieces(self, segments: list[Segment]) -> Iterator[torch.Tensor]:
        """The segments' images at the model's size, ``read_rows`` at most at a time."""
        from carmodels.shards import fit_image_size, iter_row_group_images

        for segment in segments:
            for images in iter_row_group_images(
                self.groups[segment.group],
                TRAIN_SPLIT,
                start=segment.start,
                stop=segment.stop,
                batch_rows=self.read_rows,
            ):
                yield fit_image_size(images, self.image_size, self.source)

    def describe(self) -> str:
        return (
            f"streamed from {len(self.groups)} row groups in shuffled windows of "
            f"{self.window} images"
        )


def _one_ahead(items: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``items``, the next one read in a thread while the caller trains on the current one
    (pyarrow's reading and the copies release the GIL)."""
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="carmodels-shards") as pool:
            pending = pool.submit(next, items, None)
            while (item := pending.result()) is not None:
                pending = pool.submit(next, items, None)
                yield item
    finally:
        if hasattr(items, "close"):
            items.close()


# -- loading ---------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What :func:`load_training_data` hands the loop."""

    images: InMemoryImages | StreamedImages
    data_version: str
    #: Rank 0 only: the per-epoch sample signals, against the same reference images on
    #: either path.
    monitor: SampleMonitor | None


def load_training_data(
    shards_dir: str | os.PathLike[str],
    config: TrainConfig,
    spec: ModelSpec,
    dist: DistContext,
    device: torch.device,
    rank_batch: int,
    n_samples: int,
) -> TrainingData:
    """This rank's training images, in memory or streamed (the module's docstring), the data
    version, and on rank 0 the sample monitor."""
    # carmodels.shards pulls in the image pipeline (Pillow, pandas, the dedup stage); importing
    # it only here keeps the trainer importable where only torch/numpy/pyarrow exist
    # (bench/train_gpu.py).
    from carmodels.shards import (
        check_image_size,
        data_version_of,
        fit_image_size,
        load_images,
        split_row_groups,
    )

    source = str(shards_dir)
    groups, (height, width) = split_row_groups(shards_dir, TRAIN_SPLIT)
    check_image_size(height, width, spec.image_size, source)
    n_images = sum(group.n_images for group in groups)
    if n_images < config.batch_size:
        raise ValueError(
            f"Only {n_images} training images in {shards_dir}, fewer than batch_size="
            f"{config.batch_size}; lower batch_size or add images."
        )
    data_version = config.data_version or data_version_of(shards_dir)
    budget = memory_budget(config, device, dist)
    shard_image_bytes = 3 * height * width
    if n_images * shard_image_bytes <= budget:
        images = load_images(shards_dir, split=TRAIN_SPLIT)
        images = fit_image_size(images, spec.image_size, source)
        monitor = SampleMonitor(images, n_samples, config.seed) if dist.is_main else None
        in_memory = InMemoryImages(
            # Once: every step indexes this rank's slice on the device.
            images=images[dist.rank :: dist.world_size].to(device),
            n_images=n_images,
            seed=config.seed,
            rank=dist.rank,
            rank_batch=rank_batch,
            device=device,
        )
        return TrainingData(in_memory, data_version, monitor)

    streamed = StreamedImages(
        groups=groups,
        image_size=spec.image_size,
        source=source,
        seed=config.seed,
        rank=dist.rank,
        world=dist.world_size,
        rank_batch=rank_batch,
        window=_window_size(budget, spec.image_size, rank_batch, config.memory_budget_mb),
        # A piece being read is held as pyarrow's batch, its tensor and, when the shards are
        # larger than the model, the float copy the downscale works on: at most 6 times its
        # size at the shards' resolution; an eighth of the budget for it.
        read_rows=max(1, min(MAX_READ_ROWS, budget // 8 // (6 * shard_image_bytes))),
        device=device,
    )
    monitor = None
    if dist.is_main:
        monitor = SampleMonitor.from_reference(_reference_images(streamed), n_samples)
    return TrainingData(streamed, data_version, monitor)


def _window_size(budget: int, image_size: int, rank_batch: int, budget_mb: int | None) -> int:
    """Images per window: two windows in a quarter of the budget, whole batches only."""
    image_bytes = 3 * image_size * image_size
    window = budget // 4 // image_bytes // rank_batch * rank_batch
    if window < rank_batch:
        needed = math.ceil(4 * rank_batch * image_bytes / MIB)
        given = (
            f"memory_budget_mb={budget_mb}"
            if budget_mb is not None
            else f"The memory budget ({budget // MIB} MiB, half the available memory)"
        )
        raise InputError(
            f"{given} is too small to stream batches of {rank_batch} {image_size}px images "
            f"per process; set memory_budget_mb to at least {needed} or lower batch_size."
        )
    return window


def _reference_images(streamed: StreamedImages) -> torch.Tensor:
    """The training images `SampleMonitor.reference_indices` picks, in its order (the ones
    the in-memory path's monitor uses), reading only the row groups that hold them."""
    from carmodels.shards import fit_image_size, iter_row_group_images

    pick = SampleMonitor.reference_indices(streamed.n_images, streamed.seed).tolist()
    wanted, found = sorted(pick), {}
    offset = 0  # of the row group's first image in the split's order
    for group in streamed.groups:
        positions = [i - offset for i in wanted if offset <= i < offset + group.n_images]
        start = 0
        if positions:
            chunks = iter_row_group_images(
                group, TRAIN_SPLIT, stop=positions[-1] + 1, batch_rows=streamed.read_rows
            )
            for chunk in chunks:
                for position in positions:
                    if start <= position < start + len(chunk):
                        found[offset + position] = chunk[position - start].clone()
                start += len(chunk)
        offset += group.n_images
    reference = torch.stack([found[i] for i in pick])
    return fit_image_size(reference, streamed.image_size, streamed.source)
