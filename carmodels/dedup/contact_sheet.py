"""The contact sheet ``clusters.png``: one row per largest duplicate cluster, for a human eye.

The kept image comes first with a green border, its dropped duplicates after it in red, each
labelled with its kind and hash distance. Apart from the stage because it is presentation only:
nothing downstream reads it, and it is the one part of dedup that decodes photos at display
size and draws with Pillow.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image, ImageDraw

from carmodels.dedup.schema import PARTITION_COLUMN
from carmodels.dedup.sources import iter_photo_bytes
from carmodels.imaging import ImageDecodeError, decode_image
from carmodels.io import atomic_write

if TYPE_CHECKING:
    from carmodels.dedup.config import DedupConfig

_KEPT_COLOUR = (40, 170, 60)
_DROPPED_COLOUR = (210, 50, 50)
_BORDER_PX = 4
_LABEL_PX = 14
_CAPTION_PX = 90


def _contact_thumbnail(data: bytes, side: int) -> Image.Image | None:
    """The photo shrunk to fit ``side`` x ``side``; None if it does not decode.

    JPEGs decode at the smallest DCT scale that still covers the thumbnail: a wide listing
    photo (640 x 270) asked for a square draft of twice the side was decoded at full size.
    """
    try:
        width, height = Image.open(io.BytesIO(data)).size  # header only; EXIF turns both alike
        longest = max(width, height, 1)
        draft = (max(1, side * width // longest), max(1, side * height // longest))
        thumb = decode_image(data, draft_size=draft)
    except (ImageDecodeError, OSError):
        return None
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    return thumb


def write_contact_sheet(
    raw_dir: Path | Mapping[str, Path], members: pd.DataFrame, path: Path, config: DedupConfig
) -> Path:
    """One row per largest cluster: kept image first (green border), duplicates (red) after.

    ``members`` are the rows of ``clusters.parquet`` (sorted kept first), plus ``raw_shard``;
    with partitions (``raw_dir`` a mapping partition -> raw folder), plus ``partition`` too.
    """
    top_ids = members["cluster_id"].drop_duplicates().head(config.contact_sheet_clusters)
    shown = (
        members[members["cluster_id"].isin(top_ids)]
        .groupby("cluster_id", sort=True)
        .head(config.contact_sheet_members)
    )
    if isinstance(raw_dir, Mapping):
        sources = [
            (raw_dir[partition], set(group["raw_shard"]))
            for partition, group in shown.groupby(PARTITION_COLUMN, sort=True)
        ]
    else:
        sources = [(raw_dir, set(shown["raw_shard"]))]
    shown_bytes = iter_photo_bytes(sources, set(shown["sha256"]), config.read_batch_rows)
    with ThreadPoolExecutor(max_workers=config.workers) as pool:
        decoded = pool.map(
            lambda item: (item[1], _contact_thumbnail(item[2], config.thumbnail_px)), shown_bytes
        )
        thumbs = {sha256: thumb for sha256, thumb in decoded if thumb is not None}

    cell = config.thumbnail_px + 2 * _BORDER_PX
    row_height = cell + _LABEL_PX
    shown_per_cluster = shown["cluster_id"].value_counts()
    cluster_sizes = members["cluster_id"].value_counts()
    # As wide as the longest row shown: clusters of two get a narrow sheet, not a mostly
    # white one (which also took 4x longer to PNG-encode).
    sheet = Image.new(
        "RGB",
        (_CAPTION_PX + cell * int(shown_per_cluster.max()), row_height * len(shown_per_cluster)),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for row, (cluster_id, group) in enumerate(shown.groupby("cluster_id", sort=True)):
        top = row * row_height
        size = int(cluster_sizes[cluster_id])
        draw.text((4, top + cell // 2 - 10), f"cluster {cluster_id}\n{size} images", fill="black")
        for column, member in enumerate(group.itertuples()):
            left = _CAPTION_PX + column * cell
            colour = _KEPT_COLOUR if member.kept else _DROPPED_COLOUR
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
            thumb = thumbs.get(member.sha256)
            if thumb is not None:
                offset_x = left + _BORDER_PX + (config.thumbnail_px - thumb.width) // 2
                offset_y = top + _BORDER_PX + (config.thumbnail_px - thumb.height) // 2
                sheet.paste(thumb, (offset_x, offset_y))
            label = "kept" if member.kept else f"{member.kind} d={member.distance}"
            draw.text((left + 2, top + cell), label, fill="black")
    # zlib level 1: a third of the default level's time for a few percent more bytes on a
    # sheet that is looked at, not archived.
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG", compress_level=1))


__all__ = ["write_contact_sheet"]
