"""FID and KID with the standard Inception features, computed through torchmetrics.

The feature extractor is torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow
FID Inception, converted) as wrapped by torchmetrics' ``NoTrainInceptionV3``. It runs once
over the real and the generated images; ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` are then fed those 2048-d pool features through an identity
"feature extractor", so both scores come from the same single pass.

Comparability with published FIDs: images go in as uint8, are resized to 299x299 with
TensorFlow-1.x-compatible bilinear interpolation (torchmetrics ``antialias=False``), and
the weights are the published ones (checked by SHA-256 prefix, as ``torch.hub`` does).
Each score is stored with the library versions, the weights' checksum and these settings.

Weights are looked for, in order: the configured path, then the torch hub cache
(``$TORCH_HOME/hub/checkpoints``, where torch-fidelity itself caches them). Only if both are
missing and downloading is allowed is a download attempted; offline, the metrics are
recorded as not computed with the exact paths looked for and how to supply the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carmodels.io import atomic_write

logger = logging.getLogger(__name__)

#: torch-fidelity's published conversion of the TF Inception used by the original FID code.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = INCEPTION_URL.rsplit("/", 1)[1]
#: torch.hub convention: the file name carries the first hex digits of its SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
#: Environment variable naming a local copy of the weights (used when no path is configured).
INCEPTION_WEIGHTS_ENV = "CARMODELS_INCEPTION_WEIGHTS"
FEATURE_DIM = 2048
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass
class FidConfig:
    """How FID/KID are computed. ``None`` sample counts mean "the device's default"."""

    weights_path: str | None = field(
        default=None,
        metadata={
            "help": "local Inception weights file for FID/KID; unset = "
            "$CARMODELS_INCEPTION_WEIGHTS, then the torch hub cache"
        },
    )
    download: bool = field(
        default=True,
        metadata={
            "help": "download the Inception weights into the torch hub cache when they are "
            "nowhere on disk"
        },
    )
    n_samples: int | None = field(
        default=None,
        metadata={
            "help": "generated images scored for FID/KID; unset = gpu_samples on CUDA, "
            "cpu_samples on other devices"
        },
    )
    gpu_samples: int = field(
        default=10_000,
        metadata={"help": "generated images scored for FID/KID on CUDA when n_samples is unset"},
    )
    # Fewer on a CPU: the Inception pass is slow there (docs/benchmarks/evaluation.md#history).
    cpu_samples: int = field(
        default=500,
        metadata={
            "help": "generated images scored for FID/KID on other devices when n_samples is unset"
        },
    )
    batch_size: int = 64
    #: KID: polynomial-kernel MMD averaged over random subsets (the KID paper's settings).
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    #: False = TF-compatible bilinear resize, as in the published FID code.
    antialias: bool = False

    def __post_init__(self) -> None:
        for name in ("gpu_samples", "cpu_samples", "batch_size", "kid_subsets", "kid_subset_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FidConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_samples is not None and self.n_samples < 2:
            raise ValueError(f"FidConfig.n_samples must be >= 2 or None, got {self.n_samples}")

    def samples_for(self, device: torch.device) -> int:
        if self.n_samples is not None:
            return self.n_samples
        return self.gpu_samples if device.type == "cuda" else self.cpu_samples


@dataclass
class InceptionWeights:
    """Where the weights were found (``path``), or every place looked (``looked_for``)."""

    path: Path | None
    looked_for: list[Path]
    source: str  # "configured", "environment", "torch_hub_cache", "downloaded" or "missing"
    error: str | None = None


def hub_cache_path() -> Path:
    """Where torch.hub (and torch-fidelity) keep the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def sha256_of(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, path: Path, timeout_s: float) -> None:
    """Fetch ``url`` to ``path`` atomically; refuse a file that is not the published one."""

    def fetch(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        if not sha256_of(tmp).startswith(INCEPTION_SHA256_PREFIX):
            raise ValueError(f"{url} downloaded with an unexpected SHA-256; not using it.")

    atomic_write(path, fetch)


def locate_weights(config: FidConfig) -> InceptionWeights:
    """Find the Inception weights on disk, downloading them only when allowed and online."""
    candidates: list[tuple[str, Path]] = []
    if config.weights_path:
        candidates.append(("configured", Path(config.weights_path).expanduser()))
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        candidates.append(("environment", Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser()))
    cache = hub_cache_path()
    candidates.append(("torch_hub_cache", cache))
    looked_for = [path for _, path in candidates]
    for source, path in candidates:
        if path.is_file():
            return InceptionWeights(path=path, looked_for=looked_for, source=source)
    if not config.download:
        return InceptionWeights(None, looked_for, "missing", "downloading is disabled")
    try:
        _download(INCEPTION_URL, cache, DOWNLOAD_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as error:
        return InceptionWeights(None, looked_for, "missing", f"download failed: {error}")
    return InceptionWeights(path=cache, looked_for=looked_for, source="downloaded")


def not_computed_record(weights: InceptionWeights) -> dict[str, Any]:
    """What is stored instead of FID/KID when the weights cannot be had."""
    looked = ", ".join(str(p) for p in weights.looked_for)
    return {
        "computed": False,
        "reason": f"Inception weights not found ({weights.error}); looked for: {looked}",
        "looked_for": [str(p) for p in weights.looked_for],
        "how_to_supply": (
            f"Download {INCEPTION_URL} on a machine with internet and copy it to "
            f"{hub_cache_path()}, or point {INCEPTION_WEIGHTS_ENV} (or the `inception_weights` "
            "setting) at the file."
        ),
    }


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": lets torchmetrics score features computed once."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def load_inception(weights_path: str | os.PathLike[str], antialias: bool) -> nn.Module:
    """torchmetrics' Inception (torch-fidelity architecture) with the given weights file.

    The file is first opened with ``weights_only=True`` so that a configured path can only
    ever hold tensors (torch-fidelity itself unpickles it unrestricted).
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"{weights_path} is not a loadable Inception state dict ({error}); replace it with "
            f"{INCEPTION_URL}."
        ) from error
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(
            f"{weights_path} does not hold torch-fidelity Inception-v3 weights; replace it with "
            f"{INCEPTION_URL}."
        )
    return NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=[str(FEATURE_DIM)],
        feature_extractor_weights_path=str(weights_path),
        antialias=antialias,
    )


@torch.no_grad()
def inception_features(
    inception: nn.Module,
    images_uint8: torch.Tensor,
    batch_size: int,
    device: torch.device,
    on_progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """N x 2048 float64 pool features of uint8 images (N x 3 x H x W), on the CPU."""
    inception.to(device)
    parts, done = [], 0
    for batch in images_uint8.split(batch_size):
        parts.append(inception(batch.to(device)).double().cpu())
        done += len(batch)
        if on_progress:
            on_progress(done, len(images_uint8))
    return torch.cat(parts)


def fid_kid_from_features(
    real: torch.Tensor, generated: torch.Tensor, config: FidConfig, seed: int = 0
) -> dict[str, float | int]:
    """FID and KID (mean, std) of two feature sets, through torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if min(len(real), len(generated)) < 2:
        raise ValueError(
            f"FID needs >= 2 real and generated images, got {len(real)} and {len(generated)}"
        )
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(dim))
    fid.update(real, real=True)
    fid.update(generated, real=False)
    # KID's subsets cannot be larger than either set (small validation splits).
    subset_size = min(config.kid_subset_size, len(real), len(generated))
    with warnings.catch_warnings():  # "KID keeps all features in memory": 2048 x n is small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_PrecomputedFeatures(dim), subsets=config.kid_subsets, subset_size=subset_size
        )
    kid.update(real, real=True)
    kid.update(generated, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global RNG
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset_size,
    }


def compute_fid_kid(
    real_uint8: torch.Tensor,
    generated_uint8: torch.Tensor,
    config: FidConfig,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """FID/KID of real vs generated uint8 images, or a "not computed" record.

    Either way the result says what was used: library versions, weights and settings.
    """
    log = log or logger.info
    weights = locate_weights(config)
    if weights.path is None:
        record = not_computed_record(weights)
        log(f"FID not computed: {record['reason']}. {record['how_to_supply']}")
        return record
    checksum = sha256_of(weights.path)
    inception = load_inception(weights.path, config.antialias)
    real = inception_features(inception, real_uint8, config.batch_size, device)
    generated = inception_features(inception, generated_uint8, config.batch_size, device)
    scores = fid_kid_from_features(real, generated, config, seed)
    return {
        "computed": True,
        **scores,
        "n_real": len(real),
        "n_generated": len(generated),
        "image_size": int(generated_uint8.shape[-1]),
        "library": {
            "torchmetrics": version("torchmetrics"),
            "torch-fidelity": version("torch-fidelity"),
            "torch": torch.__version__,
        },
        "weights": {
            "path": str(weights.path),
            "source": weights.source,
            "sha256": checksum,
            "published": checksum.startswith(INCEPTION_SHA256_PREFIX),
        },
        "settings": {
            "feature": FEATURE_DIM,
            "antialias": config.antialias,
            "resize": "bilinear 299x299, TF1-compatible" if not config.antialias else "antialias",
            "kid_subsets": config.kid_subsets,
            "kid_subset_size": scores["kid_subset_size"],
            "kid_degree": 3,
        },
        "config": asdict(config),
    }
