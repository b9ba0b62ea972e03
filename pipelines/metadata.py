"""Turn library results into metadata a person reads in the Dagster UI."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import dagster as dg
import pandas as pd
from PIL import Image

#: Seconds between progress lines in the run log.
PROGRESS_LOG_INTERVAL_S = 5.0
#: Longest side of an inline preview; the full image stays on disk, linked by path.
PREVIEW_MAX_SIDE = 512


def image_markdown(path: str | Path, max_side: int = PREVIEW_MAX_SIDE) -> str:
    """Markdown embedding a PNG (downscaled so the event log stays small)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", optimize=True)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"![{Path(path).name}](data:image/png;base64,{encoded})"


def image_preview(path: str | Path, max_side: int = PREVIEW_MAX_SIDE) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata."""
    return dg.MetadataValue.md(image_markdown(path, max_side))


def previews(**paths: str | Path | None) -> dict[str, dg.MetadataValue]:
    """Inline previews of the images that exist (a stage may skip a picture it cannot draw)."""
    return {
        key: image_preview(path) for key, path in paths.items() if path and Path(path).is_file()
    }


def rate_logger(
    log: Callable[[str], None], what: str, interval_s: float = PROGRESS_LOG_INTERVAL_S
) -> Callable[[int, int], None]:
    """An ``on_progress(done, total)`` callback that logs the count and rate every few seconds."""
    started = time.monotonic()
    last_logged = started

    def on_progress(done: int, total: int) -> None:
        nonlocal last_logged
        now = time.monotonic()
        if now - last_logged < interval_s and done < total:
            return
        last_logged = now
        rate = done / max(now - started, 1e-9)
        log(f"{what}: {done}/{total} ({rate:.1f}/s)")

    return on_progress


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
