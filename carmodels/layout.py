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
    """The local storage root: ``$CARMODELS_DATA`` if set, else ``./data``."""
    root = default_data_root_url()
    if "://" in root and not root.startswith("file://"):
        raise ValueError(
            f"${DATA_ROOT_ENV}={root} is a remote URL; the CLI works on local folders. Pass "
            "--out/--shards paths, or run the pipeline through Dagster, which syncs a working "
            "copy of remote roots (see carmodels.storage)."
        )
    return Path(root.removeprefix("file://"))


def default_data_root_url() -> str:
    """The storage root as given: ``$CARMODELS_DATA`` (a path or an fsspec URL) or ``data``."""
    return os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT


#: Folder of each stage below the storage root (also the unit a remote root is synced in).
MANIFEST_DIR = "manifest"
RAW_DIR = "raw"
UNIQUE_DIR = "unique"
SHARDS_DIR = "shards"
TRAIN_DIR = "train"
EVAL_DIR = "eval"
CHAMPION_DIR = "champion"
#: The listings table in a manifest folder.
MANIFEST_FILE = "listings.parquet"


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
        return self.root / MANIFEST_DIR / MANIFEST_FILE

    @property
    def raw_dir(self) -> Path:
        """Raw Parquet shards of downloaded bytes, one row per URL with its outcome."""
        return self.root / RAW_DIR

    @property
    def unique_dir(self) -> Path:
        """Index of images that survived de-duplication, plus the cluster table."""
        return self.root / UNIQUE_DIR

    @property
    def shards_dir(self) -> Path:
        """128x128 RGB uint8 training shards with a train/val split."""
        return self.root / SHARDS_DIR

    @property
    def train_dir(self) -> Path:
        """Checkpoints, sample grids and loss history of the trainer."""
        return self.root / TRAIN_DIR

    @property
    def eval_dir(self) -> Path:
        """Evaluation grids, plots, metrics and the history of every evaluation."""
        return self.root / EVAL_DIR

    @property
    def champion_dir(self) -> Path:
        """The generator in use (replaced only when a new one beats it) and its record."""
        return self.root / CHAMPION_DIR
