"""One DCGAN update and the order the images are seen in.

:class:`TrainStep` (one D + one G update, EMA included) is shared with ``bench/train_gpu.py``
so the benchmark times exactly the code that trains. The step never calls ``.item()``: losses
are summed on the device and read by :meth:`TrainStep.drain`, the only host sync.

The losses are :func:`discriminator_loss` and :func:`generator_loss` (``bce``, the DCGAN's
non-saturating loss, or ``hinge``) and, optionally, the R1 penalty :func:`r1_penalty`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carmodels.augment import DiffAugment, adapt_probability
from carmodels.conv_gemm import native_convolutions
from carmodels.distributed import SINGLE_PROCESS, DistContext, no_buffer_sync_each_forward
from carmodels.models import (
    Discriminator,
    Generator,
    ModelSpec,
    build_discriminator,
    build_generator,
)

#: The GAN losses the step trains with (``TrainConfig.loss``).
LOSSES: tuple[str, ...] = ("bce", "hinge")


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, loss: str = "bce", real_label: float = 1.0
) -> torch.Tensor:
    """D's loss on the logits of real and (detached) fake images.

    ``bce``: binary cross-entropy with targets ``real_label`` (1 - label smoothing) and 0.
    ``hinge`` (Lim & Ye 2017; Miyato et al. 2018): ``mean(relu(1 - D(x))) + mean(relu(1 +
    D(G(z))))``, computed in fp32; ``real_label`` does not apply.
    """
    if loss == "hinge":
        return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()
    # One-sided label smoothing: real targets 1 - s, fake targets stay 0.
    return F.binary_cross_entropy_with_logits(
        logits_real, torch.full_like(logits_real, real_label)
    ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))


def generator_loss(logits_gen: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """G's loss on D's logits of its images: ``-mean(D(G(z)))`` for ``hinge``; for ``bce``
    the non-saturating loss (maximise log D(G(z)) rather than minimise log(1 - D(G(z))))."""
    if loss == "hinge":
        return -logits_gen.float().mean()
    return F.binary_cross_entropy_with_logits(logits_gen, torch.ones_like(logits_gen))


def r1_penalty(logits_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al., 2018): ``E ||grad_x D(x)||^2`` over the real batch, in fp32.

    ``real`` is the tensor that required grad before D (and any augmentation) saw it; the
    gradient keeps its graph (``create_graph``) so that the penalty trains D. It is taken
    outside autocast: the backward of an autocast forward runs each op in its forward dtype.
    D's forward must have run inside ``carmodels.conv_gemm.native_convolutions()`` on the CPU
    (the matrix-multiply convolutions raise on a double backward).
    """
    (grad,) = torch.autograd.grad(logits_real.float().sum(), real, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean()


@dataclass(frozen=True)
class StepStats:
    """Means over the steps since the last read."""

    loss_d: float
    loss_g: float
    d_x: float
    d_g_z: float
    n_steps: int
    #: Mean of sign(D(real)) over those steps: ADA's measure of D's overfitting.
    real_sign: float = float("nan")
    #: DiffAugment's probability after this read (adaptive augmentation), else None.
    augment_p: float | None = None

    def losses(self) -> dict[str, float]:
        return {"loss_d": self.loss_d, "loss_g": self.loss_g, "d_x": self.d_x, "d_g_z": self.d_g_z}

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.losses().values())


#: Latents per pass, passes and seed of the EMA generator's standing batch-norm statistics
#: (:meth:`EmaGenerator.refresh_statistics`; BigGAN's "standing statistics", Brock et al.
#: 2019). 256 latents: on the recipe study's checkpoints 64 to 4,096 scored alike (within 0.5
#: judge_fd), and each refresh costs a G forward per latent, about 0.1 s for the `small`
#: preset at 64 px on one core, at every sampled or saved epoch. A fixed seed, so the same
#: weights get the same statistics.
STANDING_STATISTICS_BATCH = 64
STANDING_STATISTICS_PASSES = 4
STANDING_STATISTICS_SEED = 0


class EmaGenerator:
    """Exponential moving average of the generator's weights (sharper, steadier samples).

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))`` so that short runs are not
    dominated by the random initialisation.

    Batch norm's running statistics are not weights to average: those the training generator
    keeps describe its own activations, not the averaged weights'. Before the module is read
    (:meth:`refresh_statistics`), a generator with batch norm gets statistics of its own, from
    a fixed set of latents. In the recipe study this took the chosen recipe's ``judge_fd`` from
    35.3 to 30.5 at 33,000 images (docs/benchmarks/quality.md).
    """

    def __init__(self, generator: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self._norms = [
            m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self._statistics_fresh = not self._norms

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.module.parameters())
        torch._foreach_lerp_(ema_params, list(generator.parameters()), 1.0 - decay)
        # The generator's only buffers are its batch norms' statistics, which every read
        # recomputes (refresh_statistics), so none are copied from the training generator.
        self._statistics_fresh = not self._norms

    @torch.no_grad()
    def refresh_statistics(self) -> None:
        """Give every batch norm the mean and variance of its inputs under the current weights
        over the standing latents (a cumulative average over the passes). Does nothing when
        they are already fresh or the generator has no batch norm. Draws its latents from a
        generator of its own: the global RNG, and so training, is untouched."""
        if self._statistics_fresh:
            return
        device = next(self.module.parameters()).device
        latents = torch.Generator().manual_seed(STANDING_STATISTICS_SEED)
        momenta = [norm.momentum for norm in self._norms]
        for norm in self._norms:
            norm.reset_running_stats()
            norm.momentum = None  # None: a cumulative average, every pass weighted alike
        self.module.train()
        try:
            for _ in range(STANDING_STATISTICS_PASSES):
                z = torch.randn(STANDING_STATISTICS_BATCH, self.module.spec.nz, generator=latents)
                self.module(z.to(device))
        finally:
            self.module.eval()
            for norm, momentum in zip(self._norms, momenta, strict=True):
                norm.momentum = momentum
        self._statistics_fresh = True

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights with their own batch-norm statistics."""
        self.refresh_statistics()
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
        self._statistics_fresh = not self._norms


class TrainStep:
    """One DCGAN update (D on real + detached fake, then G with the non-saturating loss).

    Losses and the mean discriminator outputs are accumulated on the device; :meth:`drain`
    reads them (one host sync) and resets the sums. ``d_x`` and ``d_g_z`` are the means of
    ``sigmoid(logits)`` whatever the loss (with ``hinge`` too), and ``loss_d`` is the
    adversarial loss without the R1 penalty.

    With ``r1_gamma > 0`` every ``r1_every``-th D step (steps 0, r1_every, 2 r1_every, ...)
    adds ``r1_every * r1_gamma / 2 * r1_penalty`` to D's loss (lazy regularisation, Karras et
    al. 2020). The gradient is taken with respect to the real images before DiffAugment, so it
    flows through the augmentation, as in DiffAugment's and stylegan2-ada's code. That step
    runs D uncompiled (``torch.compile`` does not support the double backward) and, on the
    CPU, with torch's own convolutions (see ``carmodels.conv_gemm.native_convolutions``).

    Work is saved only where the result is mathematically unchanged:

    * without batch norm, D sees real and fake images as one concatenated batch (one larger
      convolution per layer instead of two; with batch norm the batch statistics would mix,
      so BN models keep two calls);
    * in the G step D's parameters are frozen, so backward computes the gradient that flows
      into G but not D's weight gradients, which the old loop computed and then discarded;
    * on the CPU the models' convolutions on small feature maps run as im2col + matrix
      multiply (see ``carmodels.models.CPU_GEMM_MAX_SIDE``), where oneDNN is slowest; under
      CPU bf16 autocast every convolution takes its weight gradient as a bf16 matrix multiply
      (``carmodels.conv_gemm._ConvBf16``), where oneDNN's bf16 kernels stall.
    """

    def __init__(
        self,
        generator: Generator,
        discriminator: Discriminator,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compile: bool,
        ema: EmaGenerator | None,
        noise: torch.Generator,
        seed: int = 0,
        label_smoothing: float = 0.0,
        diffaugment: str = "",
        loss: str = "bce",
        r1_gamma: float = 0.0,
        r1_every: int = 16,
        dist_context: DistContext = SINGLE_PROCESS,
        diffaugment_target: float | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.generator, self.discriminator = generator, discriminator
        self.opt_g, self.opt_d = opt_g, opt_d
        self.device, self.amp_dtype, self.channels_last = device, amp_dtype, channels_last
        self.ema, self.noise = ema, noise
        self.nz = generator.spec.nz
        self.seed, self.dist = seed, dist_context
        self.real_label = 1.0 - label_smoothing
        self.augment = DiffAugment(diffaugment)
        # Adaptive (a target set): p starts at 0 and follows D's overfitting (carmodels.augment).
        self.augment_target = diffaugment_target if self.augment else None
        if self.augment_target is not None:
            self.augment.probability = 0.0
        self.loss = loss
        self.r1_gamma, self.r1_every = r1_gamma, r1_every
        self.concat_d_batches = not discriminator.spec.batch_norm
        g_train: nn.Module = generator
        d_train: nn.Module = discriminator
        if dist_context.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Buffers (BN running stats) only matter for sampling; broadcasting them before
            # every forward would add a collective per call.
            buffers = no_buffer_sync_each_forward()
            g_train = DistributedDataParallel(generator, device_ids=ids, **buffers)
            d_train = DistributedDataParallel(discriminator, device_ids=ids, **buffers)
        # Compiled wrappers share parameters with the plain modules, which are what we save.
        self._g = torch.compile(g_train) if compile else g_train
        self._d = torch.compile(d_train) if compile else d_train
        # The G step needs no gradient synchronisation of D (it is frozen), so it calls the
        # plain (possibly compiled) module, not the DDP wrapper.
        self._d_frozen = torch.compile(discriminator) if compile else discriminator
        # The R1 step's D: never compiled (no double backward in torch.compile).
        self._d_r1 = d_train
        self.step = 0
        self._sums: torch.Tensor | None = None
        self._pending = 0
        self._pending_images = 0

    @classmethod
    def create(
        cls,
        spec: ModelSpec,
        *,
        lr_g: float,
        lr_d: float,
        beta1: float,
        beta2: float,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compile: bool,
        ema_decay: float | None,
        seed: int,
        label_smoothing: float = 0.0,
        diffaugment: str = "",
        loss: str = "bce",
        r1_gamma: float = 0.0,
        r1_every: int = 16,
        dist_context: DistContext = SINGLE_PROCESS,
        diffaugment_target: float | None = None,
    ) -> TrainStep:
        """Fresh models (initialised on the CPU, so identical on every device and rank) and Adam."""
        torch.manual_seed(seed)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        generator = build_generator(spec).to(device, memory_format=memory_format)
        if channels_last:
            # z is 1x1, so channels_last buys nothing in the first layer, and Inductor
            # (torch 2.11) mispredicts the strides of that layer's weight gradient.
            generator.project.to(memory_format=torch.contiguous_format)
        discriminator = build_discriminator(spec).to(device, memory_format=memory_format)
        # One multi-tensor kernel per optimiser step (CUDA and, since torch 2.4, CPU).
        adam = {"betas": (beta1, beta2), "fused": True}
        opt_g = torch.optim.Adam(generator.parameters(), lr=lr_g, **adam)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr_d, **adam)
        ema = EmaGenerator(generator, ema_decay) if ema_decay is not None else None
        noise = torch.Generator(device=device)
        return cls(
            generator,
            discriminator,
            opt_g,
            opt_d,
            device=device,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            compile=compile,
            ema=ema,
            noise=noise,
            seed=seed,
            label_smoothing=label_smoothing,
            diffaugment=diffaugment,
            loss=loss,
            r1_gamma=r1_gamma,
            r1_every=r1_every,
            dist_context=dist_context,
            diffaugment_target=diffaugment_target,
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _seed_noise(self) -> None:
        """Noise and augmentation draws are a pure function of (seed, rank, step).

        So a resumed run draws exactly what a straight run draws, on every rank, without
        saving one generator state per rank; reseeding costs no host sync.
        """
        self.noise.manual_seed((self.seed * 1_000_003 + self.dist.rank) * 1_000_003 + self.step)

    def r1_due(self) -> bool:
        """Whether the next step adds the R1 penalty (a Python int test: no host sync)."""
        return self.r1_gamma > 0.0 and self.step % self.r1_every == 0

    def __call__(self, real_uint8: torch.Tensor) -> None:
        """Train on one batch of N x 3 x S x S uint8 images already on the device."""
        real = real_uint8.float().div_(127.5).sub_(1.0)
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        r1 = self.r1_due()
        if r1:
            real.requires_grad_(True)
        n = real.shape[0]
        self._seed_noise()
        z = torch.randn(n, self.nz, 1, 1, device=self.device, generator=self.noise)
        augment, noise = self.augment, self.noise
        d = self._d_r1 if r1 else self._d
        # The CPU matrix-multiply convolutions are differentiable once only; R1 needs twice.
        d_kernels = native_convolutions() if r1 else contextlib.nullcontext()
        with self._autocast():
            fake = self._g(z)
            seen_real, seen_fake = augment(real, noise), augment(fake.detach(), noise)
            with d_kernels:
                if self.concat_d_batches:
                    logits_real, logits_fake = d(torch.cat([seen_real, seen_fake])).split(n)
                else:
                    logits_real, logits_fake = d(seen_real), d(seen_fake)
            loss_d = discriminator_loss(logits_real, logits_fake, self.loss, self.real_label)
        d_objective = loss_d
        if r1:
            # Lazy regularisation: r1_every times the weight, every r1_every steps.
            weight = self.r1_gamma / 2.0 * self.r1_every
            d_objective = loss_d + weight * r1_penalty(logits_real, real)
        self.opt_d.zero_grad(set_to_none=True)
        d_objective.backward()
        self.opt_d.step()

        self.discriminator.requires_grad_(False)
        try:
            with self._autocast():
                logits_gen = self._d_frozen(augment(fake, noise))
                loss_g = generator_loss(logits_gen, self.loss)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            self.discriminator.requires_grad_(True)
        self.opt_g.step()

        self.step += 1
        if self.ema is not None:
            self.ema.update(self.generator, self.step)
        stats = torch.stack(
            [
                loss_d.detach(),
                loss_g.detach(),
                torch.sigmoid(logits_real.detach()).mean(),
                torch.sigmoid(logits_fake.detach()).mean(),
                torch.sign(logits_real.detach()).float().mean(),
            ]
        ).float()
        self._sums = stats if self._sums is None else self._sums.add_(stats)
        self._pending += 1
        self._pending_images += n

    def drain(self) -> StepStats | None:
        """Mean stats since the last drain (None if no step ran); the only host sync."""
        if self._sums is None:
            return None
        # Averaged over the ranks too, so every rank sees (and stops on) the same numbers.
        means = self.dist.all_reduce_mean_(self._sums / self._pending)
        loss_d, loss_g, d_x, d_g_z, real_sign = means.tolist()
        augment_p = None
        if self.augment_target is not None:
            # Every rank read the same means, so every rank moves p alike.
            images = self._pending_images * self.dist.world_size
            augment_p = adapt_probability(
                self.augment.probability, real_sign, images, self.augment_target
            )
            self.augment.probability = augment_p
        stats = StepStats(loss_d, loss_g, d_x, d_g_z, self._pending, real_sign, augment_p)
        self._sums, self._pending, self._pending_images = None, 0, 0
        return stats

    def sampling_generator(self) -> nn.Module:
        """The generator to draw samples from: the EMA one when enabled (with batch-norm
        statistics of its own weights, see :class:`EmaGenerator`)."""
        if self.ema is None:
            return self.generator
        self.ema.refresh_statistics()
        return self.ema.module

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "ema_generator": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "augment_probability": self.augment.probability,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            # A checkpoint trained without EMA starts the average from the current weights.
            self.ema.load_state_dict(state["ema_generator"] or state["generator"])
        self.step = int(state["step"])
        if self.augment_target is not None:
            # A checkpoint from before p was saved starts it at 0, where ADA starts.
            self.augment.probability = float(state.get("augment_probability") or 0.0)

    def set_hyperparameters(self, lr_g: float, lr_d: float, beta1: float, beta2: float) -> None:
        """Apply the config's settings over those restored from a checkpoint."""
        for optimizer, lr in ((self.opt_g, lr_g), (self.opt_d, lr_d)):
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = lr, (beta1, beta2)


def epoch_permutation(
    n: int, seed: int, epoch: int, device: torch.device, rank: int = 0
) -> torch.Tensor:
    """The order of the training images in an epoch, a pure function of (seed, epoch, rank)."""
    key = f"carmodels-epoch:{seed}:{epoch}" + (f":{rank}" if rank else "")
    digest = hashlib.sha256(key.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator).to(device)


def epoch_batches(
    images: torch.Tensor, permutation: torch.Tensor, batch_size: int, n_steps: int
) -> Iterator[torch.Tensor]:
    """Batches of a device-resident image tensor (the last partial batch is dropped)."""
    for i in range(n_steps):
        yield images[permutation[i * batch_size : (i + 1) * batch_size]]
