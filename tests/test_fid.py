"""FID/KID: Fréchet code against scipy, the weights loading path, and the offline record."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from carmodels.evaluate import frechet_distance
from carmodels.metrics import fid as fid_module
from carmodels.metrics.fid import (
    FidConfig,
    compute_fid_kid,
    fid_kid_from_features,
    locate_weights,
    not_computed_record,
)


def _reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The pytorch-fid formula with scipy.linalg.sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.mark.parametrize("dim", [8, 64])
def test_frechet_implementations_agree_with_scipy_reference(dim: int) -> None:
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(500, dim))
    b = rng.normal(size=(400, dim)) @ rng.normal(size=(dim, dim)) * 0.3 + 0.5
    reference = _reference_frechet(a, b)
    assert reference > 1  # the sets really differ
    assert frechet_distance(a, b) == pytest.approx(reference, abs=1e-3)
    scores = fid_kid_from_features(
        torch.from_numpy(a), torch.from_numpy(b), FidConfig(kid_subsets=5, kid_subset_size=100)
    )
    assert scores["fid"] == pytest.approx(reference, abs=1e-3)
    assert scores["kid_mean"] > 0


def test_kid_subset_size_shrinks_to_small_sets() -> None:
    rng = np.random.default_rng(0)
    real, fake = (
        torch.from_numpy(rng.normal(size=(12, 4))),
        torch.from_numpy(rng.normal(size=(30, 4))),
    )
    scores = fid_kid_from_features(real, fake, FidConfig(kid_subsets=3))
    assert scores["kid_subset_size"] == 12


def test_offline_and_missing_gives_a_clear_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    missing = tmp_path / "nowhere" / "inception.pth"

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(fid_module.urllib.request, "urlopen", offline)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    record = compute_fid_kid(
        images,
        images,
        FidConfig(weights_path=str(missing)),
        torch.device("cpu"),
        log=lambda _: None,
    )
    assert record["computed"] is False
    assert str(missing) in record["reason"] and "download failed" in record["reason"]
    cache = tmp_path / "hub" / "checkpoints" / fid_module.INCEPTION_FILENAME
    assert record["looked_for"] == [str(missing), str(cache)]
    assert (
        str(cache) in record["how_to_supply"]
        and fid_module.INCEPTION_URL in record["how_to_supply"]
    )
    assert "fid" not in record
    assert not cache.exists()  # nothing half-downloaded left behind


def test_download_disabled_does_not_touch_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv(fid_module.INCEPTION_WEIGHTS_ENV, raising=False)
    with mock.patch.object(fid_module.urllib.request, "urlopen") as urlopen:
        weights = locate_weights(FidConfig(download=False))
    urlopen.assert_not_called()
    assert weights.path is None
    assert "downloading is disabled" in not_computed_record(weights)["reason"]


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception architecture with random weights, saved as a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    # Skip the constructor's download/load: keep PyTorch's random initialisation.
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = cls("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # keep activations alive through 90 layers
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_configured_weights_give_fid_and_kid_with_provenance(random_inception: Path) -> None:
    torch.set_num_threads(1)  # shared CI cores: oversubscription makes Inception crawl
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=generator)
    config = FidConfig(weights_path=str(random_inception), download=False, kid_subsets=4)
    same = compute_fid_kid(real, real, config, torch.device("cpu"), log=lambda _: None)
    dark = compute_fid_kid(real, real // 4, config, torch.device("cpu"), log=lambda _: None)
    assert same["computed"] and dark["computed"]
    assert same["fid"] == pytest.approx(0, abs=1e-3)
    assert dark["fid"] > 1e-3 and np.isfinite(dark["kid_mean"])
    assert dark["weights"]["source"] == "configured"
    assert dark["weights"]["published"] is False  # random weights are not the published file
    assert len(dark["weights"]["sha256"]) == 64
    assert dark["settings"]["antialias"] is False
    assert set(dark["library"]) == {"torchmetrics", "torch-fidelity", "torch"}
    assert dark["n_real"] == dark["n_generated"] == 4


def test_a_file_that_is_not_inception_weights_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pth"
    torch.save({"weight": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="Inception-v3 weights"):
        fid_module.load_inception(bogus, antialias=False)


def test_sample_count_defaults_follow_the_device() -> None:
    config = FidConfig()
    assert config.samples_for(torch.device("cuda")) == 10_000
    assert config.samples_for(torch.device("cpu")) == config.cpu_samples < 10_000
    assert FidConfig(n_samples=123).samples_for(torch.device("cuda")) == 123
    with pytest.raises(ValueError, match="n_samples"):
        FidConfig(n_samples=1)
