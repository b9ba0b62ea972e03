"""DCGAN architectures: the seed model exactly, sizes from one code path, init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carmodels.models import (
    PRESETS,
    ModelSpec,
    build_discriminator,
    build_generator,
    count_flops_per_image,
    forward_flops,
    spec_for,
)


def _layer_shapes(model: nn.Module) -> list[tuple[str, int, int, int, int, int]]:
    return [
        (
            type(m).__name__,
            m.in_channels,
            m.out_channels,
            m.kernel_size[0],
            m.stride[0],
            m.padding[0],
        )
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


def test_seed_generator_is_the_2019_model() -> None:
    generator = build_generator("seed")
    assert _layer_shapes(generator) == [
        ("ConvTranspose2d", 100, 1024, 4, 1, 0),
        ("ConvTranspose2d", 1024, 512, 4, 2, 1),
        ("ConvTranspose2d", 512, 256, 4, 2, 1),
        ("ConvTranspose2d", 256, 128, 4, 2, 1),
        ("ConvTranspose2d", 128, 64, 4, 2, 1),
        ("ConvTranspose2d", 64, 3, 4, 2, 1),
    ]
    assert _kinds(generator) == ["ConvTranspose2d", "SELU"] * 5 + ["ConvTranspose2d", "Tanh"]
    images = generator(torch.randn(2, 100))
    assert images.shape == (2, 3, 128, 128)
    assert images.abs().max() <= 1.0


def test_seed_discriminator_mirrors_it_and_returns_logits() -> None:
    discriminator = build_discriminator("seed")
    assert _layer_shapes(discriminator) == [
        ("Conv2d", 3, 64, 4, 2, 1),
        ("Conv2d", 64, 128, 4, 2, 1),
        ("Conv2d", 128, 256, 4, 2, 1),
        ("Conv2d", 256, 512, 4, 2, 1),
        ("Conv2d", 512, 1024, 4, 2, 1),
        ("Conv2d", 1024, 1, 4, 1, 0),
    ]
    assert _kinds(discriminator) == ["Conv2d", "SELU"] * 5 + ["Conv2d"]  # no Sigmoid
    logits = discriminator(torch.randn(3, 3, 128, 128))
    assert logits.shape == (3,)


def test_dcgan_preset_uses_batch_norm_relu_and_leaky_relu() -> None:
    preset = PRESETS["dcgan"]
    assert preset.lr_g == preset.lr_d == 2e-4 and preset.beta1 == 0.5
    generator, discriminator = build_generator("dcgan", 64), build_discriminator("dcgan", 64)
    assert {"BatchNorm2d", "ReLU"} <= set(_kinds(generator)) and "SELU" not in _kinds(generator)
    d_kinds = _kinds(discriminator)
    assert "LeakyReLU" in d_kinds and d_kinds[:2] == ["Conv2d", "LeakyReLU"]  # no BN first
    leaky = next(m for m in discriminator.modules() if isinstance(m, nn.LeakyReLU))
    assert leaky.negative_slope == 0.2
    conv = next(m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d))
    assert conv.bias is None and conv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_seed_optimiser_settings() -> None:
    seed = PRESETS["seed"]
    assert (seed.lr_g, seed.lr_d, seed.beta1, seed.beta2) == (2e-4, 3.5e-5, 0.5, 0.999)
    assert seed.spec.nz == 100 and not seed.spec.batch_norm


@pytest.mark.parametrize("size", [32, 64, 128])
@pytest.mark.parametrize("preset", ["tiny", "dcgan"])
def test_image_size_sets_the_depth(preset: str, size: int) -> None:
    generator, discriminator = build_generator(preset, size), build_discriminator(preset, size)
    images = generator(torch.randn(2, generator.spec.nz, 1, 1))
    assert images.shape == (2, 3, size, size)
    assert discriminator(images).shape == (2,)
    n_up = sum(isinstance(m, nn.ConvTranspose2d) for m in generator.modules())
    assert n_up == 1 + int(math.log2(size // 4))


def test_tiny_is_the_seed_code_with_fewer_channels() -> None:
    tiny, seed = PRESETS["tiny"].spec, PRESETS["seed"].spec
    assert tiny.base_channels * 8 == seed.base_channels
    assert (tiny.g_activation, tiny.d_activation, tiny.batch_norm) == ("selu", "selu", False)
    assert count_flops_per_image(tiny) < count_flops_per_image(seed) / 50


def test_selu_models_use_lecun_normal_init() -> None:
    generator = build_generator("seed")
    conv = generator.upsample[0]  # ConvT 1024 -> 512, stride 2: 1024 * (4/2)^2 taps per pixel
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(1024 * 4), rel=0.02)
    project = generator.project[0]  # z is 1x1: fan-in is nz
    assert project.weight.std().item() == pytest.approx(1 / math.sqrt(100), rel=0.02)
    conv_d = build_discriminator("seed").features[2]
    assert conv_d.weight.std().item() == pytest.approx(1 / math.sqrt(64 * 16), rel=0.02)
    # Self-normalisation: hidden activations stay near unit variance through the stack.
    torch.manual_seed(0)
    hidden = generator.upsample[:8](generator.project(torch.randn(64, 100, 1, 1)))
    assert 0.5 < hidden.std().item() < 2.0


def test_seed_flops_per_training_image() -> None:
    forward = forward_flops(spec_for("seed"))
    assert forward["generator"] == pytest.approx(1.102e9, rel=1e-3)
    assert forward["discriminator"] == pytest.approx(1.099e9, rel=1e-3)
    assert count_flops_per_image("seed") == pytest.approx(13.1e9, rel=0.01)
    assert count_flops_per_image(spec_for("seed", 64)) < count_flops_per_image("seed") / 4


def test_bad_specs_are_rejected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        ModelSpec(image_size=96)
    with pytest.raises(ValueError, match="g_activation"):
        ModelSpec(g_activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown model preset"):
        build_generator("huge")
