"""Atomic file writes: a reader never sees a half-written file, a crash never corrupts one."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)``, then rename ``tmp`` onto ``path``.

    The temporary file sits in the same folder, so the rename is atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def atomic_write_parquet(
    path: str | os.PathLike[str], table: pa.Table, compression: str = "zstd"
) -> Path:
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression=compression))


def atomic_save_image(path: str | os.PathLike[str], image: Any, format: str = "PNG") -> Path:
    """Save a PIL image atomically (the format is explicit because the temp name has no suffix)."""
    return atomic_write(path, lambda tmp: image.save(tmp, format=format))


def atomic_save_figure(path: str | os.PathLike[str], figure: Any, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically, then close it (figures hold memory)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())
