"""DCGAN architectures: the seed model exactly, sizes from one code path, init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carmodels import models
from carmodels.models import (
    PRESETS,
    ModelSpec,
    build_discriminator,
    build_generator,
    count_flops_per_image,
    forward_flops,
    set_cpu_gemm,
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


# The CPU matrix-multiply path (carmodels.models.Conv2d / ConvTranspose2d): same maths as
# torch's convolutions, checked in float64 against them for the geometries the models use and
# a few others (odd sizes, taps falling outside the image, no padding, stride 1).
GEOMETRIES = [(4, 2, 1), (4, 1, 0), (3, 1, 1), (4, 2, 0), (3, 2, 1)]


GEMM_CASES = [
    (transposed, kernel, stride, padding, size)
    for transposed in (False, True)
    for kernel, stride, padding in GEOMETRIES
    for size in (1, 4, 5, 8)
    # A plain convolution needs an input at least as large as its kernel.
    if transposed or size + 2 * padding >= kernel
]


@pytest.mark.parametrize("transposed,kernel,stride,padding,size", GEMM_CASES)
def test_gemm_convolution_equals_torch(
    transposed: bool, kernel: int, stride: int, padding: int, size: int
) -> None:
    torch.manual_seed(size)
    torch_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    function = models._ConvTransposeGemm if transposed else models._ConvGemm
    for channels_last, bias in [(True, True), (False, False)]:
        reference = torch_cls(6, 5, kernel, stride, padding, bias=bias).double()
        x = torch.randn(3, 6, size, size, dtype=torch.float64)
        weight = reference.weight.detach().clone()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            weight = weight.contiguous(memory_format=torch.channels_last)
        weight.requires_grad_(True)
        b = reference.bias.detach().clone().requires_grad_(True) if bias else None
        x_ref, x_gemm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        expected = reference(x_ref)
        # The output is modified in place afterwards, as the SELU that follows does.
        got = function.apply(x_gemm, weight, b, stride, padding)
        assert got.shape == expected.shape
        assert not got._is_view()
        grad = torch.randn_like(expected)
        torch.selu(expected).backward(grad)
        torch.selu_(got).backward(grad)
        torch.testing.assert_close(got, torch.selu(expected))
        torch.testing.assert_close(x_gemm.grad, x_ref.grad)
        torch.testing.assert_close(weight.grad, reference.weight.grad)
        if bias:
            torch.testing.assert_close(b.grad, reference.bias.grad)


@pytest.mark.parametrize("preset", ["tiny", "dcgan"])
def test_models_take_the_gemm_path_on_small_maps_and_agree_with_torch(preset: str) -> None:
    spec = spec_for(preset, 32)
    torch.manual_seed(0)
    generator, discriminator = build_generator(spec), build_discriminator(spec)
    z = torch.randn(4, spec.nz)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for model in (generator, discriminator):
            model.zero_grad(set_to_none=True)
        logits = discriminator(generator(z))
        logits.sum().backward()
        grads = [p.grad.clone() for m in (generator, discriminator) for p in m.parameters()]
        return logits.detach(), grads

    assert generator.project[0](z[:, :, None, None]).grad_fn.name() == "_ConvTransposeGemmBackward"
    assert discriminator.classify(torch.randn(2, spec.base_channels * 4, 4, 4)).grad_fn.name() == (
        "_ConvGemmBackward"
    )
    logits_gemm, grads_gemm = run()
    set_cpu_gemm(generator, False)
    set_cpu_gemm(discriminator, False)
    assert discriminator.classify(torch.randn(2, spec.base_channels * 4, 4, 4)).grad_fn.name() == (
        "ConvolutionBackward0"
    )
    logits_torch, grads_torch = run()
    torch.testing.assert_close(logits_gemm, logits_torch, rtol=1e-4, atol=1e-5)
    for got, expected in zip(grads_gemm, grads_torch, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_gemm_layers_keep_torch_state_dicts() -> None:
    """Checkpoints written before the GEMM layers (plain nn layers) load unchanged."""
    generator = build_generator("tiny")
    plain = nn.ConvTranspose2d(100, 64, 4, 1, 0)
    assert generator.project[0].state_dict().keys() == plain.state_dict().keys()
    assert isinstance(generator.project[0], nn.ConvTranspose2d)
    with pytest.raises(ValueError, match="square, ungrouped"):
        models.Conv2d(4, 4, 3, groups=2)
