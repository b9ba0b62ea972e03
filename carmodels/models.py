"""DCGAN generator and discriminator, built from a small declarative spec.

One pair of classes covers every preset: the number of up/down-sampling layers follows from
the image size (4x4 -> ... -> image_size, doubling each time), so 64 and 128 pixel models share
the same code.

The ``seed`` preset reproduces the 2019 model: a 128x128 DCGAN with SELU activations and no
batch norm. One deliberate difference in form, not in maths: the discriminator returns
*logits* and the trainer uses ``BCEWithLogitsLoss``, which equals ``Sigmoid`` followed by
``BCELoss`` but is computed with the log-sum-exp trick, so it cannot overflow or produce
``log(0)`` when the discriminator becomes confident. Apply ``torch.sigmoid`` to the output to
get the seed's probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

# The CPU matrix-multiply layers live in carmodels.conv_gemm; these names stay importable here.
from carmodels.conv_gemm import CPU_GEMM_MAX_SIDE as CPU_GEMM_MAX_SIDE
from carmodels.conv_gemm import Conv2d, ConvTranspose2d
from carmodels.conv_gemm import _ConvGemm as _ConvGemm
from carmodels.conv_gemm import _ConvTransposeGemm as _ConvTransposeGemm
from carmodels.conv_gemm import set_cpu_gemm as set_cpu_gemm
from carmodels.errors import InputError

Activation = Literal["selu", "relu", "leakyrelu"]
ACTIVATIONS: tuple[str, ...] = ("selu", "relu", "leakyrelu")

#: Kernel size of every (transposed) convolution, as in Radford et al. (2015).
KERNEL_SIZE = 4
#: Spatial size of the generator's first feature map and the discriminator's last one.
BASE_RESOLUTION = 4
#: Standard deviation of the N(0, std) init used by pytorch/examples/dcgan for BN models.
DCGAN_INIT_STD = 0.02


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a generator/discriminator pair.

    ``base_channels`` is the channel count at the highest resolution (ngf = ndf in the DCGAN
    paper); it doubles at every halving of the resolution, so a 128 px model with 64 base
    channels has 1024 channels at 4x4.

    ``spectral_norm`` (Miyato et al., 2018) divides every convolution weight of the
    discriminator by its largest singular value (one power iteration per forward in training
    mode, ``torch.nn.utils.parametrizations.spectral_norm``); the generator is unaffected.
    It changes D's state dict (``<layer>.parametrizations.weight.original``, ``..._u``,
    ``..._v``), so it is part of the spec.
    """

    nz: int = 100
    base_channels: int = 64
    image_size: int = 128
    g_activation: Activation = "selu"
    d_activation: Activation = "selu"
    batch_norm: bool = False
    #: Negative slope of LeakyReLU (only used by the ``leakyrelu`` activation).
    leaky_slope: float = 0.2
    image_channels: int = 3
    spectral_norm: bool = False
    #: The generator's channels at its highest resolution where they differ from the
    #: discriminator's ``base_channels`` (unset = the same). Why: at the recipe study's
    #: ``cpu64`` budget a generator twice as wide as its discriminator drew wheels in more
    #: cells for a third more seconds (docs/benchmarks/quality.md).
    generator_channels: int | None = None

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 2 * BASE_RESOLUTION or size & (size - 1):
            raise ValueError(
                f"image_size must be a power of two >= {2 * BASE_RESOLUTION}, got {size}"
            )
        for field in ("g_activation", "d_activation"):
            if getattr(self, field) not in ACTIVATIONS:
                raise ValueError(
                    f"{field} must be one of {ACTIVATIONS}, got {getattr(self, field)!r}"
                )
        if self.nz < 1 or self.base_channels < 1:
            raise ValueError(
                f"nz and base_channels must be positive, got {self.nz}, {self.base_channels}"
            )
        if self.generator_channels is not None and self.generator_channels < 1:
            raise ValueError(
                f"generator_channels must be positive or None, got {self.generator_channels}"
            )

    @property
    def n_resamplings(self) -> int:
        """Number of stride-2 layers between 4x4 and ``image_size``."""
        return int(math.log2(self.image_size // BASE_RESOLUTION))

    def channel_plan(self) -> list[int]:
        """The discriminator's channels at 4x4, 8x8, ..., image_size/2 (coarse to fine)."""
        return self._plan(self.base_channels)

    def generator_channel_plan(self) -> list[int]:
        """The generator's channels at 4x4, 8x8, ..., image_size/2 (coarse to fine)."""
        return self._plan(self.generator_channels or self.base_channels)

    def _plan(self, finest: int) -> list[int]:
        n = self.n_resamplings
        return [finest * 2 ** (n - 1 - i) for i in range(n)]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.spectral_norm:
            # Left out at its default, so a model without it is stored as before the field
            # existed and older carmodels versions can still read the checkpoint.
            del data["spectral_norm"]
        if self.generator_channels is None:
            del data["generator_channels"]  # likewise
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    """A named architecture plus the optimiser settings it was designed with."""

    name: str
    spec: ModelSpec
    lr_g: float
    lr_d: float
    beta1: float = 0.5
    beta2: float = 0.999
    description: str = ""


PRESETS: dict[str, Preset] = {
    "seed": Preset(
        name="seed",
        spec=ModelSpec(nz=100, base_channels=64, g_activation="selu", d_activation="selu"),
        # The 2019 model slowed the discriminator down rather than adding batch norm.
        lr_g=2e-4,
        lr_d=3.5e-5,
        description="2019 model: 128 px DCGAN, SELU, no batch norm, slower D (170 epochs).",
    ),
    "dcgan": Preset(
        name="dcgan",
        spec=ModelSpec(
            nz=100,
            base_channels=64,
            g_activation="relu",
            d_activation="leakyrelu",
            batch_norm=True,
        ),
        lr_g=2e-4,
        lr_d=2e-4,
        description="Radford et al. (2015): batch norm, ReLU in G, LeakyReLU(0.2) in D.",
    ),
    "tiny": Preset(
        name="tiny",
        # The seed's code with 1/8 of its channels (1/64 of its FLOPs): a CPU epoch over a
        # few hundred 128 px images takes seconds. For demos and tests.
        spec=ModelSpec(nz=100, base_channels=8, g_activation="selu", d_activation="selu"),
        lr_g=2e-4,
        lr_d=3.5e-5,
        description="Seed architecture with 1/8 of the channels, for CPU demos and tests.",
    ),
    "small": Preset(
        name="small",
        # Radford's recipe with 1/4 of the channels. Measured on the 300-listing demo catalog
        # at 64 px on 2 CPU cores: about 0.1 s per step of 32 images, and sky, road and a car
        # shaped blob after 600 steps, where the seed's SELU recipe (slow D, no batch norm)
        # still draws noise after the same number of steps. What the demo profile trains.
        spec=ModelSpec(
            nz=100,
            base_channels=16,
            image_size=64,
            g_activation="relu",
            d_activation="leakyrelu",
            batch_norm=True,
        ),
        lr_g=2e-4,
        lr_d=2e-4,
        description="Radford DCGAN with 1/4 of the channels at 64 px: quick CPU demos.",
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None


def spec_for(preset: str | Preset | ModelSpec, image_size: int | None = None) -> ModelSpec:
    """The spec of a preset (by name) or spec, optionally at another image size."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    spec = preset.spec if isinstance(preset, Preset) else preset
    return spec if image_size is None else replace(spec, image_size=image_size)


def _activation(kind: str, leaky_slope: float) -> nn.Module:
    if kind == "selu":
        return nn.SELU(inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    return nn.LeakyReLU(leaky_slope, inplace=True)


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """LeCun normal init, N(0, 1/fan_in): keeps SELU activations at zero mean, unit variance."""
    nn.init.normal_(weight, mean=0.0, std=1.0 / math.sqrt(fan_in))


class Generator(nn.Module):
    """z (N x nz or N x nz x 1 x 1) -> image (N x 3 x S x S) in [-1, 1]."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        plan = spec.generator_channel_plan()
        bias = not spec.batch_norm  # a bias before batch norm is cancelled by its mean

        def block(conv: nn.Module, channels: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(channels)] if spec.batch_norm else []
            return [conv, *norm, _activation(spec.g_activation, spec.leaky_slope)]

        # 1x1 -> 4x4: a dense projection of z written as a transposed convolution.
        self.project = nn.Sequential(
            *block(ConvTranspose2d(spec.nz, plan[0], KERNEL_SIZE, 1, 0, bias=bias), plan[0])
        )
        layers: list[nn.Module] = []
        for c_in, c_out in zip(plan, plan[1:], strict=False):
            layers += block(ConvTranspose2d(c_in, c_out, KERNEL_SIZE, 2, 1, bias=bias), c_out)
        # The output layer has no norm and always a bias (as in DCGAN), then Tanh.
        layers += [
            ConvTranspose2d(plan[-1], spec.image_channels, KERNEL_SIZE, 2, 1, bias=True),
            nn.Tanh(),
        ]
        self.upsample = nn.Sequential(*layers)
        _init_weights(self, spec, first_fan_in=spec.nz)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.upsample(self.project(z))


class Discriminator(nn.Module):
    """Image (N x 3 x S x S) in [-1, 1] -> real/fake logit (N,). No sigmoid: see module doc."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        plan = list(reversed(spec.channel_plan()))  # fine to coarse: 64, 128, ..., 1024
        bias = not spec.batch_norm
        act = spec.d_activation
        # DCGAN leaves the first discriminator layer without batch norm.
        layers: list[nn.Module] = [
            Conv2d(spec.image_channels, plan[0], KERNEL_SIZE, 2, 1, bias=True),
            _activation(act, spec.leaky_slope),
        ]
        for c_in, c_out in zip(plan, plan[1:], strict=False):
            layers.append(Conv2d(c_in, c_out, KERNEL_SIZE, 2, 1, bias=bias))
            if spec.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(_activation(act, spec.leaky_slope))
        self.features = nn.Sequential(*layers)
        # 4x4 -> 1x1 logit.
        self.classify = Conv2d(plan[-1], 1, KERNEL_SIZE, 1, 0, bias=True)
        _init_weights(self, spec, first_fan_in=None)
        if spec.spectral_norm:
            # After the init, which writes the raw weights the parametrization then wraps.
            for conv in [m for m in self.modules() if isinstance(m, nn.Conv2d)]:
                nn.utils.parametrizations.spectral_norm(conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images)).flatten()


def _init_weights(model: nn.Module, spec: ModelSpec, first_fan_in: int | None) -> None:
    """DCGAN init (N(0, 0.02), BN gamma N(1, 0.02)) for BN models; LeCun normal for SELU ones.

    Non-SELU models without batch norm also get LeCun normal: it is the variance-preserving
    choice when nothing re-normalises the activations.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    for index, conv in enumerate(convs):
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        if spec.batch_norm:
            nn.init.normal_(conv.weight, 0.0, DCGAN_INIT_STD)
            continue
        k_h, k_w = conv.kernel_size
        if isinstance(conv, nn.ConvTranspose2d):
            if index == 0 and first_fan_in is not None:
                # z is 1x1: each output pixel sees exactly one tap per input channel.
                fan_in = first_fan_in
            else:
                # A stride-s transposed conv feeds each output pixel from (k/s)^2 taps per
                # input channel (torch's default fan-in, out_channels*k*k, is not that).
                s_h, s_w = conv.stride
                fan_in = conv.in_channels * (k_h // s_h) * (k_w // s_w)
        else:
            fan_in = conv.in_channels * k_h * k_w
        _lecun_normal_(conv.weight, fan_in)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, DCGAN_INIT_STD)
            nn.init.zeros_(module.bias)


def build_generator(spec: ModelSpec | Preset | str, image_size: int | None = None) -> Generator:
    """A freshly initialised generator for a spec or preset (optionally at another size)."""
    return Generator(spec_for(spec, image_size))


def build_discriminator(
    spec: ModelSpec | Preset | str, image_size: int | None = None
) -> Discriminator:
    """A freshly initialised discriminator for a spec or preset (optionally at another size)."""
    return Discriminator(spec_for(spec, image_size))


def _conv_macs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, int]]:
    """Multiply-accumulates of each conv layer for one sample, in forward order.

    Runs the model on the ``meta`` device, which infers shapes without allocating or
    computing anything, so even the 128 px seed model costs microseconds.
    """
    macs: list[tuple[nn.Module, int]] = []

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        k_h, k_w = module.kernel_size
        if isinstance(module, nn.ConvTranspose2d):
            # Every input element is scattered into out_channels x k x k outputs.
            per_sample = inputs[0][0].numel() * module.out_channels * k_h * k_w
        else:
            # Every output element gathers in_channels x k x k inputs.
            per_sample = output[0].numel() * module.in_channels * k_h * k_w
        macs.append((module, per_sample // module.groups))

    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return macs


def forward_flops(spec: ModelSpec) -> dict[str, int]:
    """Forward FLOPs (2 x multiply-accumulates of the convolutions) of G and D for one image."""
    with torch.device("meta"):
        generator, discriminator = Generator(spec), Discriminator(spec)
        g_macs = _conv_macs(generator, torch.empty(1, spec.nz))
        d_macs = _conv_macs(
            discriminator, torch.empty(1, spec.image_channels, spec.image_size, spec.image_size)
        )
    return {
        "generator": 2 * sum(m for _, m in g_macs),
        "discriminator": 2 * sum(m for _, m in d_macs),
        "g_first_layer": 2 * g_macs[0][1],
        "d_first_layer": 2 * d_macs[0][1],
    }


def count_flops_per_image(spec: ModelSpec | Preset | str) -> int:
    """Forward + backward FLOPs of one training image through one DCGAN step (G and D).

    Counted analytically from the convolution shapes (activations, biases, norms and the
    optimiser are < 1% and left out). A conv layer costs F forward, F for its weight
    gradient and F for its input gradient, except that no input gradient is needed for the
    network's own input (images, detached fakes, noise). One step per image is:

    * D step: D forward on a real and on a detached fake image, D backward on both
      (weight gradients only at the first layer): ``2 * (3 D - D_first)``;
    * G forward once: ``G``;
    * G step: D forward + full backward on the fake (the gradient flows into G), then G
      backward without the noise gradient: ``3 D + 2 G - G_first``.

    For the seed (G = 1.102, D = 1.099 GFLOP forward) this is 13.14 GFLOP, matching the
    ~13.1 GFLOP per training image quoted for the 2019 model.
    """
    f = forward_flops(spec_for(spec))
    g, d = f["generator"], f["discriminator"]
    d_step = 2 * (3 * d - f["d_first_layer"])
    g_step = 3 * d + 2 * g - f["g_first_layer"]
    return d_step + g + g_step
