"""Where each pipeline stage keeps its outputs under one storage root.

One source of truth for the on-disk layout, shared by the CLI, the Dagster assets and the
tests, so that a stage can find its upstream without being told every path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Environment variable that overrides the default storage root.
DATA_ROOT_ENV = "CARMODELS_DATA"
#: Default storage root, relative to the current directory (the repo root for `make`).
DEFAULT_DATA_ROOT = "data"


def default_data_root() -> Path:
    """The storage root: ``$CARMODELS_DATA`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_ROOT_ENV, DEFAULT_DATA_ROOT))


@dataclass(frozen=True)
class DataLayout:
    """Paths of every stage's outputs below ``root``."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> DataLayout:
        return cls(Path(root) if root is not None else default_data_root())

    @property
    def manifest_path(self) -> Path:
        """Parquet table of listings (one row per image URL)."""
        return self.root / "manifest" / "listings.parquet"

    @property
    def raw_dir(self) -> Path:
        """Raw Parquet shards of downloaded bytes, one row per URL with its outcome."""
        return self.root / "raw"

    @property
    def unique_dir(self) -> Path:
        """Index of images that survived de-duplication, plus the cluster table."""
        return self.root / "unique"

    @property
    def shards_dir(self) -> Path:
        """128x128 RGB uint8 training shards with a train/val split."""
        return self.root / "shards"

    @property
    def train_dir(self) -> Path:
        """Checkpoints, sample grids and loss history of the trainer."""
        return self.root / "train"

    @property
    def eval_dir(self) -> Path:
        """Evaluation grids, plots, metrics and the history of every evaluation."""
        return self.root / "eval"

    @property
    def champion_dir(self) -> Path:
        """The generator in use (replaced only when a new one beats it) and its record."""
        return self.root / "champion"
