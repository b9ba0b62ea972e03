"""128x128 RGB uint8 training shards: schema, train/val split, and fast loading.

A shard is a zstd Parquet file whose ``image`` column holds each picture as raw
``height * width * 3`` uint8 bytes in HWC order, so loading is a single ``np.frombuffer``
over the column's data buffer rather than one decode per image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch

#: Bumped whenever a column is added, removed or changes meaning.
SHARD_SCHEMA_VERSION = 1
#: File name pattern of image shards inside a shards folder.
SHARD_GLOB = "car-*.parquet"
#: Fraction of images assigned to the validation split by default.
DEFAULT_VAL_FRACTION = 0.1
SPLITS = ("train", "val")


def split_for(sha256: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> str:
    """Deterministic split from the image's content hash: stable across runs and machines."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    bucket = int(hashlib.sha256(f"split:{sha256}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    return "val" if bucket < val_fraction else "train"


def shard_files(path: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a shards folder (or a single shard file), sorted by name."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"No shards at {path}: materialise `car_shards` (or run `carmodels shard`) first."
        )
    files = sorted(path.glob(SHARD_GLOB))
    if not files:
        raise FileNotFoundError(
            f"{path} holds no {SHARD_GLOB} files: materialise `car_shards` "
            "(or run `carmodels shard`) first."
        )
    return files


def _dataset(path: str | os.PathLike[str]) -> ds.Dataset:
    return ds.dataset([str(p) for p in shard_files(path)], format="parquet")


def _split_filter(split: str | None) -> ds.Expression | None:
    if split is None:
        return None
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return ds.field("split") == split


def _images_to_tensor(images: pa.ChunkedArray | pa.Array, height: int, width: int) -> torch.Tensor:
    """Turn a binary column of HWC uint8 buffers into an N x 3 x H x W uint8 tensor (one copy)."""
    chunks = images.chunks if isinstance(images, pa.ChunkedArray) else [images]
    per_image = height * width * 3
    parts = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        chunk = chunk.cast(pa.large_binary()) if chunk.type == pa.binary() else chunk
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        if np.any(np.diff(offsets) != per_image):
            raise ValueError(
                f"Shard images are not all {height}x{width}x3 bytes; rebuild the shards."
            )
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        parts.append(data.reshape(-1, height, width, 3))
    if not parts:
        return torch.empty((0, 3, height, width), dtype=torch.uint8)
    hwc = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
    # NCHW view of the HWC buffer; .contiguous() makes the one real copy.
    return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()


def _image_size(table: pa.Table, path: str | os.PathLike[str]) -> tuple[int, int]:
    heights = set(table.column("height").unique().to_pylist())
    widths = set(table.column("width").unique().to_pylist())
    if len(heights) != 1 or len(widths) != 1:
        raise ValueError(f"Shards in {path} mix image sizes {heights}x{widths}; rebuild them.")
    return heights.pop(), widths.pop()


def load_images(path: str | os.PathLike[str], split: str | None = None) -> torch.Tensor:
    """All images of a shards folder (optionally one split) as an N x 3 x H x W uint8 tensor."""
    table = _dataset(path).to_table(
        columns=["image", "height", "width"], filter=_split_filter(split)
    )
    if table.num_rows == 0:
        raise ValueError(
            f"No images{f' in split {split!r}' if split else ''} under {path}; "
            "check the shards were built from enough photos."
        )
    height, width = _image_size(table, path)
    return _images_to_tensor(table.column("image"), height, width)


def iter_images(
    path: str | os.PathLike[str], split: str | None = None, batch_size: int = 4096
) -> Iterator[torch.Tensor]:
    """Stream images in batches (N x 3 x H x W uint8) for data larger than memory."""
    scanner = _dataset(path).scanner(
        columns=["image", "height", "width"], filter=_split_filter(split), batch_size=batch_size
    )
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        height, width = _image_size(table, path)
        yield _images_to_tensor(table.column("image"), height, width)
