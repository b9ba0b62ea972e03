"""A small car-type classifier: an offline, domain-specific judge of generated cars.

Trained on the shards' ``type`` labels (train split) and scored on the val split, it is the
judge behind two metrics that need no download, ``type_fd`` and ``type_overlap``
(:mod:`carmodels.metrics.domain`, which takes the trained classifier as an argument).

The trained network is cached by the shards' data version and the classifier settings, so
re-evaluating another checkpoint on the same data does not retrain it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import torch
import torch.nn.functional as F
from torch import nn

from carmodels.io import atomic_write
from carmodels.shards import _images_to_tensor, shard_files

logger = logging.getLogger(__name__)

#: Shard column holding the label.
LABEL_COLUMN = "type"
#: Bump when the network or the training recipe changes: old cache entries are then ignored.
CLASSIFIER_FORMAT = 1


@dataclass
class ClassifierConfig:
    #: Measured on the demo shards (330 train / 31 val images, 5 types): 0.74 val accuracy;
    #: width 16 at 48 px trained 4x faster but reached only 0.48.
    image_size: int = 64
    width: int = 32
    feature_dim: int = 128
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    #: A type needs this many labelled training images to be learnt; rarer ones are dropped.
    min_images_per_type: int = 5

    def __post_init__(self) -> None:
        for name in ("image_size", "width", "feature_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 16:
            raise ValueError(
                f"ClassifierConfig.image_size must be a multiple of 16, got {self.image_size}"
            )


class TypeClassifier(nn.Module):
    """Four conv blocks (each halves the side), global average pool, embedding, linear head."""

    def __init__(self, n_types: int, width: int, feature_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(channels[-1], feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, n_types))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1]."""
        return self.embed(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class TrainedClassifier:
    model: TypeClassifier
    types: list[str]
    image_size: int
    val_accuracy: float | None
    n_train: int
    n_val: int
    cache_path: Path
    from_cache: bool

    def _prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float()
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        return x.div_(127.5).sub_(1)

    @torch.no_grad()
    def features_and_predictions(
        self, images_uint8: torch.Tensor, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (N x D float64) and predicted type indices (N,)."""
        self.model.eval()
        feats, preds = [], []
        for batch in images_uint8.split(batch_size):
            f = self.model.features(self._prepare(batch))
            feats.append(f.double().numpy())
            preds.append(self.model.head(f).argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)


def labelled_images(
    shards_dir: str | os.PathLike[str], split: str
) -> tuple[torch.Tensor, list[str | None]]:
    """Images of one split and their ``type`` labels (None where missing)."""
    dataset = ds.dataset([str(p) for p in shard_files(shards_dir)], format="parquet")
    if LABEL_COLUMN not in dataset.schema.names:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), []
    table = dataset.to_table(
        columns=["image", "height", "width", LABEL_COLUMN], filter=ds.field("split") == split
    )
    if table.num_rows == 0:
        return torch.empty(0, 3, 0, 0, dtype=torch.uint8), []
    height = table.column("height")[0].as_py()
    width = table.column("width")[0].as_py()
    images = _images_to_tensor(table.column("image"), height, width)
    labels = [
        None if v in (None, "") else str(v).strip().lower()
        for v in table.column(LABEL_COLUMN).to_pylist()
    ]
    return images, labels


def _cache_key(data_version: str, config: ClassifierConfig) -> str:
    settings = json.dumps({"format": CLASSIFIER_FORMAT, **asdict(config)}, sort_keys=True)
    return f"{data_version}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


class NotEnoughLabels(ValueError):
    """The shards cannot train a classifier (no ``type`` column or too few labelled types)."""


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (reflect-padded) and brightness jitter.

    No horizontal flips: the shards are facing-normalised, and so are generated cars.
    """
    pad = x.shape[-1] // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    scale = 1 + 0.2 * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5)
    return (x * scale).clamp(-1, 1)


def _load_cached(cache_path: Path, config: ClassifierConfig) -> TrainedClassifier:
    saved = torch.load(cache_path, map_location="cpu", weights_only=True)
    model = TypeClassifier(len(saved["types"]), config.width, config.feature_dim)
    model.load_state_dict(saved["state_dict"])
    return TrainedClassifier(
        model.eval(),
        saved["types"],
        config.image_size,
        saved["val_accuracy"],
        saved["n_train"],
        saved["n_val"],
        cache_path,
        from_cache=True,
    )


def _learnable_types(
    labels: list[str | None], config: ClassifierConfig, shards_dir: str | os.PathLike[str]
) -> list[str]:
    """The types with enough labelled training images, sorted; at least two of them."""
    counts: dict[str, int] = {}
    for label in labels:
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    types = sorted(t for t, n in counts.items() if n >= config.min_images_per_type)
    if len(types) < 2:
        raise NotEnoughLabels(
            f"the train split of {shards_dir} has {len(types)} car types with >= "
            f"{config.min_images_per_type} labelled images (counts: {counts or 'no type column'}); "
            f"the classifier needs at least 2. Fill the listings' `{LABEL_COLUMN}` field."
        )
    return types


def _fit(
    model: TypeClassifier, x: torch.Tensor, y: torch.Tensor, n_types: int, config: ClassifierConfig
) -> None:
    """Train ``model`` in place on images ``x`` (in [-1, 1]) labelled with type indices ``y``."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, -(-len(x) // config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    # Weight classes by inverse frequency so the majority type does not win by default.
    class_weights = len(y) / (n_types * torch.bincount(y, minlength=n_types).float())
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(config.batch_size):
            loss = F.cross_entropy(
                model(_augment(x[batch], generator)), y[batch], weight=class_weights
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
    model.eval()


def _validate(
    trained: TrainedClassifier, shards_dir: str | os.PathLike[str], index: dict[str, int]
) -> None:
    """Set ``trained``'s accuracy on the val split's images of the learnt types."""
    val_images, val_labels = labelled_images(shards_dir, "val")
    val_keep = [i for i, label in enumerate(val_labels) if label in index]
    if val_keep:
        _, predicted = trained.features_and_predictions(val_images[val_keep])
        truth = np.array([index[val_labels[i]] for i in val_keep])
        trained.val_accuracy = float((predicted == truth).mean())
    trained.n_val = len(val_keep)


def train_classifier(
    shards_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    data_version: str,
    config: ClassifierConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainedClassifier:
    """The type classifier for these shards: loaded from the cache, or trained and cached."""
    config = config or ClassifierConfig()
    log = log or logger.info
    cache_path = Path(cache_dir) / f"classifier-{_cache_key(data_version, config)}.pt"
    if cache_path.is_file():
        return _load_cached(cache_path, config)

    images, labels = labelled_images(shards_dir, "train")
    types = _learnable_types(labels, config, shards_dir)
    index = {t: i for i, t in enumerate(types)}
    keep = [i for i, label in enumerate(labels) if label in index]
    y = torch.tensor([index[labels[i]] for i in keep])
    trained = TrainedClassifier(
        TypeClassifier(len(types), config.width, config.feature_dim),
        types,
        config.image_size,
        None,
        len(keep),
        0,
        cache_path,
        from_cache=False,
    )
    _fit(trained.model, trained._prepare(images[keep]), y, len(types), config)
    _validate(trained, shards_dir, index)
    log(
        f"type classifier: {len(types)} types, {len(keep)} train images, "
        f"val accuracy {trained.val_accuracy} on {trained.n_val} images"
    )
    payload = {
        "state_dict": trained.model.state_dict(),
        "types": types,
        "val_accuracy": trained.val_accuracy,
        "n_train": trained.n_train,
        "n_val": trained.n_val,
        "data_version": data_version,
        "config": asdict(config),
    }
    atomic_write(cache_path, lambda tmp: torch.save(payload, tmp))
    return trained
