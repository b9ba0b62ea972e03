"""Turn library results into metadata a person reads in the Dagster UI."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import pandas as pd
from PIL import Image

#: Longest side of an inline preview; the full image stays on disk, linked by path.
PREVIEW_MAX_SIDE = 512


def image_preview(path: str | Path, max_side: int = PREVIEW_MAX_SIDE) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata (downscaled so the event log stays small)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"![{Path(path).name}](data:image/png;base64,{encoded})")


def counts_table(counts: Mapping[str, int], key: str = "reason") -> dg.MetadataValue:
    """A small markdown table of counts, largest first."""
    if not counts:
        return dg.MetadataValue.md("_none_")
    frame = pd.DataFrame(
        sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), columns=[key, "count"]
    )
    return dg.MetadataValue.md(frame.to_markdown(index=False))


def frame_preview(frame: pd.DataFrame, rows: int = 20) -> dg.MetadataValue:
    """The first rows of a table as markdown."""
    if frame.empty:
        return dg.MetadataValue.md("_empty_")
    return dg.MetadataValue.md(frame.head(rows).to_markdown(index=False))
