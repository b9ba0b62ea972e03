"""Where tensors run: the device a setting names and the autocast dtype to use there.

Shared by training, generation, restoration and evaluation. Nothing here touches CUDA at import
time; both functions are called at run time only.
"""

from __future__ import annotations

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


__all__ = [
    "AMP_MODES",
    "NATIVE_BF16_CAPABILITIES",
    "cpu_has_native_bf16",
    "resolve_amp",
    "resolve_device",
]
