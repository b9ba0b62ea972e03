"""Domain metrics: generated cars judged by a car-type classifier.

* ``type_fd``: Fréchet distance between the classifier's penultimate features of real val
  images and of generated images (FID's recipe with a car-specific network; lower is closer);
* ``type_overlap``: overlap of the type mixes the classifier predicts on generated images
  and on real val images (sum over types of the smaller share; 1 = the same mix).

The classifier is an argument (anything shaped like :class:`TypeJudge`, in practice
:class:`carmodels.classifier.TrainedClassifier`, which trains and caches it): like every
metric, this module imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from carmodels.metrics.pixel import frechet_distance


class TypeJudge(Protocol):
    """What the domain metrics need of a trained car-type classifier."""

    types: list[str]
    val_accuracy: float | None

    def features_and_predictions(
        self, images_uint8: torch.Tensor, batch_size: int = ...
    ) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (N x D) and predicted type indices (N,) of uint8 images."""
        ...


def type_distribution(predictions: np.ndarray, types: list[str]) -> dict[str, float]:
    """The share of each type among the predicted type indices."""
    counts = np.bincount(predictions, minlength=len(types))
    return {t: float(c / max(len(predictions), 1)) for t, c in zip(types, counts, strict=True)}


def domain_metrics(
    classifier: TypeJudge,
    real_val_uint8: torch.Tensor,
    generated_uint8: torch.Tensor,
    frechet: Callable[[np.ndarray, np.ndarray], float] = frechet_distance,
) -> dict[str, Any]:
    """type_fd, type_overlap and the type mixes behind them."""
    real_features, real_pred = classifier.features_and_predictions(real_val_uint8)
    gen_features, gen_pred = classifier.features_and_predictions(generated_uint8)
    real_mix = type_distribution(real_pred, classifier.types)
    gen_mix = type_distribution(gen_pred, classifier.types)
    return {
        "type_fd": frechet(real_features, gen_features),
        "type_overlap": sum(min(real_mix[t], gen_mix[t]) for t in classifier.types),
        "types_generated": int(sum(share > 0 for share in gen_mix.values())),
        "type_classifier_val_accuracy": classifier.val_accuracy,
        "type_mix_real_val": real_mix,
        "type_mix_generated": gen_mix,
    }


__all__ = ["TypeJudge", "domain_metrics", "type_distribution"]
