"""Where tensors run: the device a setting names and the autocast dtype to use there.

Shared by training, generation, restoration and evaluation. Nothing here touches CUDA at import
time; both functions are called at run time only.
"""

from __future__ import annotations

import torch

#: TrainConfig.amp settings: "auto" = bf16 autocast on CUDA and off on CPU; "bf16" forces it;
#: "off" is plain fp32.
AMP_MODES = ("auto", "bf16", "off")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU. Only called at run time, never at import."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use 'cpu'.")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a TrainConfig.amp setting (None = full fp32)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


__all__ = ["AMP_MODES", "resolve_amp", "resolve_device"]
