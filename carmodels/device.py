"""Where tensors run: the device a setting names, the autocast dtype to use there, and how
freed CPU memory is kept for reuse.

Shared by training, generation, restoration and evaluation. Nothing here touches CUDA or the
allocator at import time; every function is called at run time only.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

#: TrainConfig.amp settings: "auto" = bf16 autocast on CUDA; on a CPU, fp32 unless it computes
#: in bf16 natively and a start-up probe measures bf16 faster (carmodels.train.cpu_amp);
#: "bf16" forces it; "off" is plain fp32.
AMP_MODES = ("auto", "bf16", "off")

#: torch.cpu.get_capabilities() keys of native bf16 arithmetic: AVX512-BF16 and AMX-BF16 on
#: x86, the BF16 extension (BFMMLA/BFDOT) and SVE BF16 on Arm. Without them torch's CPU bf16
#: kernels convert to fp32 and back, slower than fp32.
NATIVE_BF16_CAPABILITIES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. Only called at run time, never at import."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'.")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (see NATIVE_BF16_CAPABILITIES)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:  # torch before 2.10: the x86 checks only
        return bool(
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        )
    capabilities = get_capabilities()
    return any(bool(capabilities.get(name, False)) for name in NATIVE_BF16_CAPABILITIES)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a TrainConfig.amp setting (None = full fp32), without measuring:
    "auto" is fp32 on a CPU here; the trainer asks ``carmodels.train.cpu_amp.choose_amp``,
    which may pick bf16 there."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


#: glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Freed blocks up to this size stay in the process's heap (see retain_freed_cpu_memory).
RETAINED_BLOCK_BYTES = 1 << 30
#: The environment's own say on glibc's thresholds, or another allocator, wins over ours.
_USER_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def retain_freed_cpu_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to :data:`RETAINED_BLOCK_BYTES` for reuse,
    instead of giving them back to the kernel; process-wide, for the rest of the process.

    Why: with glibc's default thresholds, tensors of more than 128 KiB (up to 32 MiB, as the
    thresholds adapt) are mapped fresh when allocated and unmapped when freed, so a CPU training
    step page-faults its activations in again at every step: about 1,700 faults a step for the
    seed preset at 64 px, width 16, batch 16, where this saved about a tenth of the step
    (docs/benchmarks/train-cpu.md#freed-memory-kept-for-reuse). The results are unchanged, and
    the process's resident memory stays at its peak instead of falling between steps. The
    PyTorch tuning guide's remedy is another allocator (jemalloc, tcmalloc) through
    ``LD_PRELOAD``; this is the same effect without one.

    Returns whether it took effect: not off glibc, and not where the environment sets glibc's
    thresholds itself (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) or preloads
    another allocator.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, RETAINED_BLOCK_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, RETAINED_BLOCK_BYTES)
    )


__all__ = [
    "AMP_MODES",
    "NATIVE_BF16_CAPABILITIES",
    "RETAINED_BLOCK_BYTES",
    "cpu_has_native_bf16",
    "resolve_amp",
    "resolve_device",
    "retain_freed_cpu_memory",
]
