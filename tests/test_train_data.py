"""The training images an epoch sees (carmodels.train.data): the in-memory path's order, and
the streamed path's coverage (every image at most once per epoch, exactly once when the split
divides into the ranks' batches; disjoint across ranks; reproducible from the seed)."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from carmodels.distributed import SINGLE_PROCESS, DistContext
from carmodels.errors import InputError
from carmodels.shards import (
    fit_image_size,
    iter_row_group_images,
    load_images,
    split_row_groups,
)
from carmodels.train import TrainConfig, TrainStep, epoch_batches, epoch_permutation, train
from carmodels.train.data import (
    MIB,
    InMemoryImages,
    StreamedImages,
    available_memory,
    load_training_data,
    memory_budget,
    rank_segments,
)

CPU = torch.device("cpu")
SIZE = 32


def write_row_group_shards(
    folder: Path, n_images: int, size: int = SIZE, files: int = 2, row_group_size: int = 16
) -> Path:
    """Random-block images over ``files`` shard files of several row groups each; every 5th
    image is in the val split, so row groups hold both splits."""
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (n_images, 4, 4, 3), dtype=np.uint8)
    images = blocks.repeat(size // 4, axis=1).repeat(size // 4, axis=2)
    splits = ["val" if i % 5 == 0 else "train" for i in range(n_images)]
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_images, files + 1).astype(int)
    for number, (low, high) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        table = pa.table(
            {
                "image": [image.tobytes() for image in images[low:high]],
                "height": [size] * (high - low),
                "width": [size] * (high - low),
                "split": splits[low:high],
                "sha256": [hashlib.sha256(i.tobytes()).hexdigest() for i in images[low:high]],
            }
        )
        pq.write_table(table, folder / f"car-{number:05d}.parquet", row_group_size=row_group_size)
    return folder


def image_keys(batch: torch.Tensor) -> list[bytes]:
    """One key per image of an N x 3 x H x W uint8 batch: its bytes' digest."""
    return [hashlib.sha256(image.contiguous().numpy().tobytes()).digest() for image in batch]


def train_keys(shards: Path, size: int = SIZE) -> set[bytes]:
    images = fit_image_size(load_images(shards, split="train"), size, str(shards))
    keys = image_keys(images)
    assert len(set(keys)) == len(keys)  # the random images are all different
    return set(keys)


def streamed(
    shards: Path, rank: int, world: int, rank_batch: int, window: int, seed: int = 5
) -> StreamedImages:
    groups, _ = split_row_groups(shards, "train")
    return StreamedImages(
        groups=groups,
        image_size=SIZE,
        source=str(shards),
        seed=seed,
        rank=rank,
        world=world,
        rank_batch=rank_batch,
        window=window,
        read_rows=7,  # not a divisor of anything here: pieces straddle windows
        device=CPU,
    )


def epoch_keys(source: StreamedImages, epoch: int) -> list[bytes]:
    steps = (source.n_images // source.world) // source.rank_batch
    batches = list(source.batches(epoch, steps))
    assert len(batches) == steps and all(len(b) == source.rank_batch for b in batches)
    return [key for batch in batches for key in image_keys(batch)]


# -- the epoch plan --------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_segments_are_equal_disjoint_and_cover_all_but_the_remainder(world: int) -> None:
    counts = [13, 1, 40, 7, 7, 22, 5]
    total = sum(counts)
    seen: Counter[tuple[int, int]] = Counter()
    for rank in range(world):
        segments = rank_segments(counts, seed=3, epoch=2, world=world, rank=rank)
        assert sum(s.stop - s.start for s in segments) == total // world
        for segment in segments:
            assert 0 <= segment.start < segment.stop <= counts[segment.group]
            seen.update((segment.group, i) for i in range(segment.start, segment.stop))
    assert max(seen.values()) == 1  # disjoint
    assert len(seen) == total - total % world
    assert rank_segments(counts, 3, 2, world, 0) == rank_segments(counts, 3, 2, world, 0)


def test_the_row_group_order_changes_with_the_epoch_and_the_seed() -> None:
    counts = [10] * 12

    def order(seed: int, epoch: int) -> list[int]:
        return [s.group for s in rank_segments(counts, seed, epoch, world=1, rank=0)]

    assert sorted(order(0, 1)) == list(range(12))
    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


# -- the reader ------------------------------------------------------------------------------


def test_row_groups_and_their_images_are_the_split_in_load_images_order(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=70)
    groups, (height, width) = split_row_groups(shards, "train")
    assert (height, width) == (SIZE, SIZE)
    assert len(groups) == 6  # 35 rows a file, row groups of 16: 16 + 16 + 3, twice
    assert sum(g.n_images for g in groups) == 56
    everything = torch.cat(
        [chunk for g in groups for chunk in iter_row_group_images(g, "train", batch_rows=5)]
    )
    assert torch.equal(everything, load_images(shards, split="train"))
    # A window into one row group, read 4 rows at a time.
    part = torch.cat(list(iter_row_group_images(groups[1], "train", start=3, stop=9, batch_rows=4)))
    first = torch.cat(list(iter_row_group_images(groups[1], "train")))
    assert torch.equal(part, first[3:9])
    assert list(iter_row_group_images(groups[1], "train", start=5, stop=5)) == []


# -- the streamed epoch ----------------------------------------------------------------------


def test_streamed_epoch_sees_every_image_once_across_ranks(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=120)  # 96 train images
    everything = train_keys(shards)
    assert len(everything) == 96
    # 2 ranks x batches of 8 divide 96: each rank 48 images in windows of 24, 24.
    ranks = [streamed(shards, rank, 2, rank_batch=8, window=24) for rank in (0, 1)]
    for epoch in (1, 2):
        seen = [epoch_keys(source, epoch) for source in ranks]
        assert len(seen[0]) == len(seen[1]) == 48
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        assert Counter(seen[0] + seen[1]) == Counter(everything)  # each exactly once
    # Reproducible from the seed; another epoch or seed reorders.
    assert epoch_keys(ranks[0], 1) == epoch_keys(streamed(shards, 0, 2, 8, 24), 1)
    assert epoch_keys(ranks[0], 1) != epoch_keys(ranks[0], 2)
    assert epoch_keys(ranks[0], 1) != epoch_keys(streamed(shards, 0, 2, 8, 24, seed=6), 1)


def test_streamed_epoch_drops_only_the_remainder(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=129)  # 103 train images
    everything = train_keys(shards)
    world, batch = 3, 4
    per_rank = len(everything) // world  # 34: 8 steps of 4, 2 images left over per rank
    dropped_by_epoch = []
    for epoch in (1, 2, 3):
        seen = [k for r in range(world) for k in epoch_keys(streamed(shards, r, 3, 4, 8), epoch)]
        assert len(seen) == len(set(seen)) == world * (per_rank // batch) * batch
        assert set(seen) <= everything
        dropped = everything - set(seen)
        assert len(dropped) == len(everything) % world + world * (per_rank % batch)
        dropped_by_epoch.append(dropped)
    assert dropped_by_epoch[0] != dropped_by_epoch[1] or dropped_by_epoch[1] != dropped_by_epoch[2]


def test_a_window_is_shuffled_and_holds_consecutive_images(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=120)
    source = streamed(shards, 0, 1, rank_batch=8, window=32)
    sequence = torch.cat(
        list(
            source._pieces(rank_segments([g.n_images for g in source.groups], source.seed, 1, 1, 0))
        )
    )
    in_order = image_keys(sequence)
    seen = epoch_keys(source, 1)
    for start in range(0, 96, 32):  # window by window: the same images, in another order
        assert set(seen[start : start + 32]) == set(in_order[start : start + 32])
        assert seen[start : start + 32] != in_order[start : start + 32]


def test_capped_epochs_take_the_first_batches(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=120)
    source = streamed(shards, 1, 2, rank_batch=8, window=16)
    full = [image_keys(b) for b in source.batches(4, 6)]
    capped = [image_keys(b) for b in source.batches(4, 3)]
    assert capped == full[:3]


# -- choosing the path -----------------------------------------------------------------------


def config(**overrides: object) -> TrainConfig:
    base = TrainConfig(preset="tiny", image_size=SIZE, batch_size=8, device="cpu", seed=7)
    return replace(base, **overrides)


def test_the_budget_chooses_the_path_and_both_monitors_agree(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=500)  # 400 train images, 1.2 MB
    spec = config().model_spec()

    def load(budget_mb: int | None):
        return load_training_data(
            shards, config(memory_budget_mb=budget_mb), spec, SINGLE_PROCESS, CPU, 8, 64
        )

    in_memory, streamed_data = load(2), load(1)
    assert isinstance(load(None).images, InMemoryImages)  # 1.2 MB is far below the default
    assert isinstance(in_memory.images, InMemoryImages)
    assert isinstance(streamed_data.images, StreamedImages)
    assert in_memory.images.n_images == streamed_data.images.n_images == 400
    assert streamed_data.images.window == 80  # a quarter of 1 MiB / 3 KiB, whole batches
    assert in_memory.data_version == streamed_data.data_version
    # The same reference images: the sample signals do not depend on the path.
    samples = torch.rand(64, 3, SIZE, SIZE) * 2 - 1
    assert in_memory.monitor is not None and streamed_data.monitor is not None
    assert in_memory.monitor.measure(samples) == streamed_data.monitor.measure(samples)


def test_a_budget_below_two_windows_of_batches_names_the_setting(tmp_path: Path) -> None:
    shards = write_row_group_shards(tmp_path, n_images=500, size=64)  # 4.8 MB
    spec = config(image_size=64).model_spec()
    with pytest.raises(InputError, match=r"memory_budget_mb=1 .* at least 6\b"):
        load_training_data(
            shards, config(image_size=64, memory_budget_mb=1, batch_size=128), spec,
            SINGLE_PROCESS, CPU, 128, 64,
        )  # fmt: skip


def test_the_default_budget_is_half_the_available_memory_shared_by_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert available_memory() > 0
    monkeypatch.setattr("carmodels.train.data.available_memory", lambda: 8 << 30)
    assert memory_budget(config(), CPU, SINGLE_PROCESS) == 4 << 30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    # Under torchrun the ranks take the smallest budget (a collective: here, of one).
    smallest: list[int] = []
    monkeypatch.setattr(
        DistContext, "min_over_ranks", lambda self, value, device: smallest.append(value) or 7
    )
    assert memory_budget(config(), CPU, DistContext(rank=1, world_size=8)) == 7
    assert smallest == [1 << 30]  # this rank's: half of 8 GiB over the node's 4 processes
    assert memory_budget(config(memory_budget_mb=300), CPU, SINGLE_PROCESS) == 300 * MIB
    with pytest.raises(ValueError, match="memory_budget_mb"):
        config(memory_budget_mb=0)


def test_in_memory_batches_keep_the_original_order(tmp_path: Path) -> None:
    """The in-memory path is the trainer's original one: rank r's every world-th image,
    indexed by epoch_permutation(seed, epoch, rank), the last partial batch dropped."""
    images = torch.randint(0, 256, (45, 3, 8, 8), dtype=torch.uint8)
    for rank in (0, 1):
        mine = images[rank::2]
        source = InMemoryImages(mine, 45, seed=4, rank=rank, rank_batch=5, device=CPU)
        permutation = epoch_permutation(len(mine), 4, 3, CPU, rank=rank)
        expected = list(epoch_batches(mine, permutation, 5, 4))
        actual = list(source.batches(3, 4))
        assert len(actual) == 4 and all(
            torch.equal(a, e) for a, e in zip(actual, expected, strict=True)
        )


# -- end to end ------------------------------------------------------------------------------


def record_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    """Every batch a TrainStep trains on from now on, as image keys."""
    seen: list[list[bytes]] = []
    step = TrainStep.__call__

    def recording(self: TrainStep, real_uint8: torch.Tensor) -> None:
        seen.append(image_keys(real_uint8.cpu()))
        step(self, real_uint8)

    monkeypatch.setattr(TrainStep, "__call__", recording)
    return seen


def test_streamed_training_sees_every_image_once_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 64 px shards trained at 32 px: 120 train images are 1.4 MiB at the shards' size, over a
    # 1 MiB budget, so the trainer streams them (and downscales as it reads).
    shards = write_row_group_shards(tmp_path / "shards", n_images=150, size=64)
    everything = train_keys(shards, size=SIZE)
    assert len(everything) == 120
    seen = record_batches(monkeypatch)
    run = config(epochs=2, memory_budget_mb=1, log_every_steps=5)
    logged: list[str] = []
    first = train(shards, tmp_path / "a", run, log=logged.append)
    assert any("streamed from 10 row groups" in line for line in logged)
    assert first.steps == 30  # 120 images / 8 a step, twice
    epochs = [[k for batch in seen[:15] for k in batch], [k for batch in seen[15:] for k in batch]]
    for keys in epochs:
        assert Counter(keys) == Counter(everything)  # every image exactly once
    assert epochs[0] != epochs[1]  # in another order
    # The same seed trains on the same batches, to the same weights.
    recorded, seen[:] = list(seen), []
    second = train(shards, tmp_path / "b", run)
    assert seen == recorded
    a, b = (torch.load(r.checkpoint_path, weights_only=True) for r in (first, second))
    for name, tensor in a["generator"].items():
        assert torch.equal(tensor, b["generator"][name]), name
