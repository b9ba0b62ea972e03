"""Whether ``TrainConfig.amp="auto"`` trains in bf16 on a CPU: a measured start-up probe.

On CUDA "auto" is bf16 autocast. On a CPU, bf16 pays only where the CPU computes in bf16
natively (:func:`carmodels.device.cpu_has_native_bf16`: AVX512-BF16 / AMX on x86, BF16 on
Arm); elsewhere torch converts to fp32 and back, so such CPUs stay fp32 and nothing is
measured. Where it is native, whether bf16 is faster depends on the model, the batch and the
machine (its load included), so :func:`choose_amp` times the run's own generator and
discriminator, forward + backward, in fp32 and in bf16, and picks bf16 only when it is clearly
faster (:data:`PROBE_MARGIN`). The measurement is made once per process and (model spec,
batch size, memory format); under ``torchrun`` the ranks average their timings, so that all
of them decide alike.

Under CPU bf16 autocast the models' convolutions run as :class:`carmodels.conv_gemm._ConvBf16`
(oneDNN's bf16 forward and input gradient, the weight gradient as a bf16 matrix multiply), and
the probe times exactly that. Measured: docs/benchmarks/train-cpu.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from carmodels.device import cpu_has_native_bf16, resolve_amp
from carmodels.distributed import SINGLE_PROCESS, DistContext
from carmodels.models import ModelSpec, build_discriminator, build_generator, count_flops_per_image

#: bf16 is chosen when its probe time is at most this fraction of fp32's, i.e. at least ~18%
#: faster: on a loaded 2-core machine the ratio moved by up to 0.15 between probes (0.46-0.61
#: at batch 16), so a smaller lead could be noise, and bf16 keeps 8 bits of mantissa, which a
#: gain within the noise does not pay for.
PROBE_MARGIN = 0.85

#: One pass of each mode decides unless their bf16 / fp32 ratio lies within this of
#: PROBE_MARGIN; then a second pass of each is timed and the best of two compared.
PROBE_NOISE = 0.1

#: Below this many GFLOP per training step (FLOPs per image x batch) the step is per-operation
#: overhead rather than arithmetic and bf16's casts cannot pay: the tiny preset at 64 px and
#: batch 8 (0.37 GFLOP) ran 1.2x slower in bf16 on an AMX Xeon. Such runs (tests, smoke runs)
#: stay fp32 without a probe, which also keeps them deterministic.
MIN_PROBE_GFLOP = 2.0

#: The probe runs on at most as many images as a training step of about this many GFLOP
#: (16 images of the seed model at 128 px). Its batch matters: on a loaded machine a pass has
#: a fixed cost (threads waiting for a core) that hides bf16's lead at small batches. Seed,
#: 128 px, 2-core AMX Xeon under load, bf16 / fp32 per probe: 1.08 at batch 2, 0.8-1.0 at 4,
#: 0.55-1.2 at 8, 0.46-0.61 at 16, 0.44-0.54 at 32; while one fp32 pass over a batch of 32
#: takes 3-4 s there. At 16, one pass of each takes 3-4.6 s under that load, 1.1 s without.
PROBE_PASS_GFLOP = 210.0

#: (spec, batch size, channels_last) -> (probe batch, fp32 seconds, bf16 seconds).
_probe_cache: dict[tuple[ModelSpec, int, bool], tuple[int, float, float]] = {}


@dataclass(frozen=True)
class AmpChoice:
    """The autocast dtype a run trains with, and why."""

    #: The TrainConfig.amp setting: "auto", "bf16" or "off".
    setting: str
    #: The device type, "cpu" or "cuda".
    device_type: str
    #: torch.bfloat16, or None for fp32.
    dtype: torch.dtype | None
    #: Why, for "auto" on a CPU: the probe's timings or why there was none; else "".
    reason: str = ""
    #: The probe's forward + backward times and batch, when it ran.
    probe_fp32_ms: float | None = None
    probe_bf16_ms: float | None = None
    probe_batch: int | None = None

    @property
    def mode(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def describe(self) -> str:
        """E.g. ``amp auto -> bf16 on CPU (probe: fp32 812 ms, bf16 401 ms, batch 8)``."""
        text = f"amp {self.setting} -> {self.mode} on {self.device_type.upper()}"
        return f"{text} ({self.reason})" if self.reason else text

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (checkpoints load with ``weights_only=True``)."""
        return {
            "setting": self.setting,
            "mode": self.mode,
            "device": self.device_type,
            "reason": self.reason,
            "probe_fp32_ms": self.probe_fp32_ms,
            "probe_bf16_ms": self.probe_bf16_ms,
            "probe_batch": self.probe_batch,
        }


def choose_amp(
    amp: str,
    device: torch.device,
    spec: ModelSpec,
    batch_size: int,
    channels_last: bool = True,
    dist: DistContext = SINGLE_PROCESS,
) -> AmpChoice:
    """The autocast dtype for ``TrainConfig.amp`` on ``device``, training ``spec`` on batches
    of ``batch_size`` (per rank). Only "auto" on a CPU with native bf16 measures anything."""
    if amp != "auto" or device.type != "cpu":
        return AmpChoice(amp, device.type, resolve_amp(amp, device))
    if not cpu_has_native_bf16():
        return AmpChoice(amp, "cpu", None, "no native bf16 on this CPU")
    image_gflop = count_flops_per_image(spec) / 1e9
    if image_gflop * batch_size < MIN_PROBE_GFLOP:
        step_gflop = image_gflop * batch_size
        return AmpChoice(amp, "cpu", None, f"{step_gflop:.2g} GFLOP per step, too small to probe")
    probe_batch, fp32_s, bf16_s = _probe(spec, batch_size, channels_last, dist, image_gflop)
    dtype = torch.bfloat16 if bf16_s <= PROBE_MARGIN * fp32_s else None
    fp32_ms, bf16_ms = fp32_s * 1e3, bf16_s * 1e3
    reason = f"probe: fp32 {fp32_ms:.0f} ms, bf16 {bf16_ms:.0f} ms, batch {probe_batch}"
    return AmpChoice(amp, "cpu", dtype, reason, round(fp32_ms, 1), round(bf16_ms, 1), probe_batch)


def probe_batch_size(image_gflop: float, batch_size: int) -> int:
    """The batch the probe times: the run's, capped by :data:`PROBE_PASS_GFLOP`
    (``image_gflop``: a training step's GFLOP per image)."""
    return max(1, min(batch_size, round(PROBE_PASS_GFLOP / image_gflop)))


def clear_probe_cache() -> None:
    """Forget every measurement (tests; a process whose load changed a lot)."""
    _probe_cache.clear()


def _probe(
    spec: ModelSpec, batch_size: int, channels_last: bool, dist: DistContext, image_gflop: float
) -> tuple[int, float, float]:
    key = (spec, batch_size, channels_last)
    if key not in _probe_cache:
        batch = probe_batch_size(image_gflop, batch_size)
        fp32_s, bf16_s = measure_fwd_bwd(spec, batch, channels_last)
        # Every rank decides on the same (mean) numbers.
        times = torch.tensor([fp32_s, bf16_s], dtype=torch.float64)
        fp32_s, bf16_s = dist.all_reduce_mean_(times).tolist()
        _probe_cache[key] = (batch, fp32_s, bf16_s)
    return _probe_cache[key]


class _FwdBwd:
    """One forward + backward of fresh G and D (D on real + generated images, as in the D
    step), timed; built as :meth:`TrainStep.create` builds them, leaving the global RNG as it
    was."""

    def __init__(self, spec: ModelSpec, batch: int, channels_last: bool) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.generator = build_generator(spec).to(memory_format=memory_format)
            if channels_last:
                self.generator.project.to(memory_format=torch.contiguous_format)
            self.discriminator = build_discriminator(spec).to(memory_format=memory_format)
            self.z = torch.randn(batch, spec.nz, 1, 1)
            side = spec.image_size
            real = torch.rand(batch, spec.image_channels, side, side).mul_(2).sub_(1)
            self.real = real.contiguous(memory_format=memory_format)

    def __call__(self, bf16: bool) -> float:
        """Seconds of one pass, in bf16 autocast or fp32."""
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = self.discriminator(torch.cat([self.real, self.generator(self.z)]))
        logits.float().mean().backward()
        seconds = time.perf_counter() - start
        self.generator.zero_grad(set_to_none=True)
        self.discriminator.zero_grad(set_to_none=True)
        return seconds


def measure_fwd_bwd(spec: ModelSpec, batch: int, channels_last: bool) -> tuple[float, float]:
    """Seconds of one forward + backward of the models in fp32 and in bf16 autocast.

    One pass of each, bf16 first (so that bf16, not fp32, pays for anything a first pass
    builds); when that is too close to call (within PROBE_NOISE of PROBE_MARGIN), one more of
    each in the other order (so that a change in the machine's load hits both alike) and the
    best of two."""
    run = _FwdBwd(spec, batch, channels_last)
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (True, False):
        times[bf16].append(run(bf16))
    if abs(times[True][0] / times[False][0] - PROBE_MARGIN) < PROBE_NOISE:
        for bf16 in (False, True):
            times[bf16].append(run(bf16))
    return min(times[False]), min(times[True])


__all__ = [
    "MIN_PROBE_GFLOP",
    "PROBE_MARGIN",
    "PROBE_NOISE",
    "PROBE_PASS_GFLOP",
    "AmpChoice",
    "choose_amp",
    "clear_probe_cache",
    "measure_fwd_bwd",
    "probe_batch_size",
]
