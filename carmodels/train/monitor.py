"""Cheap per-epoch signals of sample quality: ``sample_fd`` (picks ``best.pt``) and
``sample_diversity`` (warns of mode collapse)."""

from __future__ import annotations

import torch

from carmodels.metrics.pixel import frechet_distance, mean_pairwise_rms, pixel_features, to_uint8


class SampleMonitor:
    """Two cheap per-epoch signals from the fixed-noise samples, against the training images.

    * ``sample_fd``: Fréchet distance between the samples and a fixed subset of training
      images in the evaluate stage's pixel feature space (16x16 pixels projected onto the
      training images' top principal components): the ``pixel_fd_16`` yardstick, at the
      sample grid's size. It picks ``best.pt``. It is preferred to the discriminator's
      D(x) - D(G(z)) gap because that gap is measured by a judge that changes every step
      (a strong D and a weak G can show the same gap as a weak D and a strong G), whereas
      the pixel statistics of the data are a fixed reference across epochs.
    * ``sample_diversity``: mean pairwise RMS distance (32x32) among the samples divided by
      the same for as many training images: near 1 is as varied as the data, a sharp fall
      means the generator maps different noise to the same image (mode collapse).

    Both use the same 64 noise vectors every epoch, so their changes come from the model.
    """

    #: Training images the reference statistics come from.
    N_REFERENCE = 512
    FD_SIZE = 16
    FD_COMPONENTS = 32
    DIVERSITY_SIZE = 32

    def __init__(self, images_uint8: torch.Tensor, n_samples: int, seed: int) -> None:
        """Against the reference images `reference_indices` picks from ``images_uint8``."""
        pick = self.reference_indices(len(images_uint8), seed)
        self._fit(images_uint8[pick].cpu(), n_samples)

    @classmethod
    def reference_indices(cls, n_images: int, seed: int) -> torch.Tensor:
        """Which of ``n_images`` training images the reference statistics come from."""
        pick = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
        return pick[: cls.N_REFERENCE]

    @classmethod
    def from_reference(cls, reference: torch.Tensor, n_samples: int) -> SampleMonitor:
        """Against ``reference``, the images `reference_indices` picked (in its order): for
        training images streamed from the shards, never all in memory at once."""
        monitor = cls.__new__(cls)
        monitor._fit(reference.cpu(), n_samples)
        return monitor

    def _fit(self, reference: torch.Tensor, n_samples: int) -> None:
        features = pixel_features(reference, self.FD_SIZE).double()
        self._mean = features.mean(0)
        centred = features - self._mean
        k = max(1, min(self.FD_COMPONENTS, len(reference) - 1, n_samples - 1))
        # Right singular vectors = principal axes of the reference images.
        self._components = torch.linalg.svd(centred, full_matrices=False).Vh[:k].T
        self._reference = (centred @ self._components).numpy()
        diversity_pick = reference[: max(2, n_samples)]
        self._reference_diversity = mean_pairwise_rms(
            pixel_features(diversity_pick, self.DIVERSITY_SIZE)
        )

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        """``sample_fd`` and ``sample_diversity`` of images in [-1, 1]."""
        generated = to_uint8(samples.detach().float().cpu())
        projected = (pixel_features(generated, self.FD_SIZE).double() - self._mean) @ (
            self._components
        )
        diversity = mean_pairwise_rms(pixel_features(generated, self.DIVERSITY_SIZE))
        return {
            "sample_fd": frechet_distance(self._reference, projected.numpy()),
            "sample_diversity": diversity / self._reference_diversity
            if self._reference_diversity > 0
            else 0.0,
        }


def is_collapse(diversity: float, history: list[dict[str, float]], fraction: float) -> bool:
    """Diversity fell below ``fraction`` of the highest earlier value in the run."""
    earlier = [row["sample_diversity"] for row in history if "sample_diversity" in row]
    return bool(earlier) and diversity < fraction * max(earlier)
