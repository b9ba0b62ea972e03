"""Convolutions that run small CPU feature maps as one im2col + matrix multiply.

:class:`Conv2d` and :class:`ConvTranspose2d` are drop-in ``torch.nn`` layers (same parameters
and state dict) used by the networks of :mod:`carmodels.models`; on the CPU, in fp32, layers
whose low-resolution side is at most :data:`CPU_GEMM_MAX_SIDE` go through MKL's matrix
multiply instead of oneDNN, with hand-written backward passes (:class:`_ConvGemm`,
:class:`_ConvTransposeGemm`). :func:`set_cpu_gemm` turns the path off.

Those backward passes are differentiable once only (what they save is cut from the graph), so
they refuse ``create_graph=True`` rather than silently drop the second-order terms; code that
needs a double backward (a gradient penalty such as R1) runs the layers inside
:func:`native_convolutions`, which sends them to torch's kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: On the CPU, a (transposed) convolution whose low-resolution side is at most this many pixels
#: runs as one im2col + matrix multiply (MKL) instead of through oneDNN, whose AVX2 kernels are
#: slow on small feature maps. 8: the fastest two-thread training step of the thresholds tried
#: (docs/benchmarks/train-cpu.md#small-feature-maps-as-matrix-multiplies).
CPU_GEMM_MAX_SIDE = 8

#: Set inside :func:`native_convolutions`.
_native_only = False


def _refuse_double_backward() -> None:
    """Raise under ``create_graph=True``, the only time autograd runs a backward with grad
    mode on: the gradients the hand-written backward passes return have no graph to their
    saved tensors, so a double backward would silently miss terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "The CPU matrix-multiply convolutions are differentiable once only; run the "
            "forward inside carmodels.conv_gemm.native_convolutions() to differentiate twice."
        )


@contextlib.contextmanager
def native_convolutions() -> Iterator[None]:
    """Inside, every :class:`Conv2d` and :class:`ConvTranspose2d` runs through torch's own
    kernels, whose backward is differentiable again (for a gradient penalty)."""
    global _native_only
    previous, _native_only = _native_only, True
    try:
        yield
    finally:
        _native_only = previous


def _im2col(x_nhwc: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """N x H x W x C -> (N * Ho * Wo) x (k * k * C) patches, each ordered (kh, kw, C)."""
    n, height, width, channels = x_nhwc.shape
    if padding:
        x_nhwc = torch.nn.functional.pad(x_nhwc, (0, 0, padding, padding, padding, padding))
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    s_n, s_h, s_w, s_c = x_nhwc.stride()
    patches = x_nhwc.as_strided(
        (n, out_h, out_w, kernel, kernel, channels),
        (s_n, stride * s_h, stride * s_w, s_h, s_w, s_c),
    )
    return patches.reshape(n * out_h * out_w, kernel * kernel * channels)


def _tap_range(tap: int, n_in: int, n_out: int, stride: int, padding: int) -> tuple[int, int]:
    """Patch positions p in [first, last) whose kernel tap ``tap`` lands inside the image
    (0 <= p * stride - padding + tap < n_out)."""
    first = max(0, -((tap - padding) // stride))
    last = min(n_in, (n_out - 1 + padding - tap) // stride + 1)
    return first, max(first, last)


def _col2im(
    cols: torch.Tensor,
    patches_hw: tuple[int, int],
    kernel: int,
    out_hwc: tuple[int, int, int],
    stride: int,
    padding: int,
) -> torch.Tensor:
    """The adjoint of :func:`_im2col`: sum each patch's taps back into an image, returned as
    N x C x H x W in channels_last."""
    (p_h, p_w), (height, width, channels) = patches_hw, out_hwc
    n = cols.shape[0] // (p_h * p_w)
    taps = cols.view(n, p_h, p_w, kernel, kernel, channels)
    # Allocated as N x C x H x W channels_last (its N x H x W x C permutation is contiguous),
    # so that the result can be returned from an autograd.Function without being a view.
    image = torch.empty(
        n, channels, height, width, dtype=cols.dtype, memory_format=torch.channels_last
    ).zero_()
    out = image.permute(0, 2, 3, 1)
    for kh in range(kernel):
        h0, h1 = _tap_range(kh, p_h, height, stride, padding)
        if h0 == h1:
            continue
        rows = slice(h0 * stride - padding + kh, (h1 - 1) * stride - padding + kh + 1, stride)
        for kw in range(kernel):
            w0, w1 = _tap_range(kw, p_w, width, stride, padding)
            if w0 == w1:
                continue
            cols_ = slice(w0 * stride - padding + kw, (w1 - 1) * stride - padding + kw + 1, stride)
            out[:, rows, cols_, :] += taps[:, h0:h1, w0:w1, kh, kw, :]
    return image


class _ConvGemm(torch.autograd.Function):
    """conv2d (square kernel, groups 1, dilation 1) as im2col + GEMM, channels_last output."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
    ) -> torch.Tensor:
        n, channels, height, width = x.shape
        out_channels, kernel = weight.shape[0], weight.shape[-1]
        out_h = (height + 2 * padding - kernel) // stride + 1
        out_w = (width + 2 * padding - kernel) // stride + 1
        cols = _im2col(x.permute(0, 2, 3, 1), kernel, stride, padding)
        # (kh, kw, C) order: a view of a channels_last weight, a copy of a contiguous one.
        w2 = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)
        # Written through its N x Ho x Wo x O view, so the output is channels_last and not a
        # view (autograd forbids in-place ops, such as the SELU that follows, on those).
        out = torch.empty(
            n, out_channels, out_h, out_w, dtype=x.dtype, memory_format=torch.channels_last
        )
        out_2d = out.permute(0, 2, 3, 1).view(-1, out_channels)
        if bias is not None:
            torch.addmm(bias, cols, w2.t(), out=out_2d)
        else:
            torch.mm(cols, w2.t(), out=out_2d)
        ctx.save_for_backward(cols, w2)
        ctx.geometry = (channels, height, width, out_h, out_w, kernel, stride, padding)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _refuse_double_backward()
        cols, w2 = ctx.saved_tensors
        channels, height, width, out_h, out_w, kernel, stride, padding = ctx.geometry
        g2 = grad.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _col2im(
                g2 @ w2, (out_h, out_w), kernel, (height, width, channels), stride, padding
            )
        if ctx.needs_input_grad[1]:
            grad_w = (g2.t() @ cols).view(-1, kernel, kernel, channels).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None


class _ConvTransposeGemm(torch.autograd.Function):
    """conv_transpose2d (square kernel, groups 1, no output padding) as GEMM + col2im."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
    ) -> torch.Tensor:
        n, in_channels, height, width = x.shape
        out_channels, kernel = weight.shape[1], weight.shape[-1]
        out_h = (height - 1) * stride - 2 * padding + kernel
        out_w = (width - 1) * stride - 2 * padding + kernel
        x2 = x.permute(0, 2, 3, 1).reshape(-1, in_channels)
        w2 = weight.permute(0, 2, 3, 1).reshape(in_channels, -1)
        out = _col2im(
            x2 @ w2, (height, width), kernel, (out_h, out_w, out_channels), stride, padding
        )
        if bias is not None:
            out += bias[:, None, None]
        ctx.save_for_backward(x2, w2)
        ctx.geometry = (height, width, kernel, stride, padding)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _refuse_double_backward()
        x2, w2 = ctx.saved_tensors
        height, width, kernel, stride, padding = ctx.geometry
        # The transposed convolution's adjoint is the plain convolution of the gradient.
        grad_cols = _im2col(grad.permute(0, 2, 3, 1), kernel, stride, padding)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_cols @ w2.t()).view(-1, height, width, x2.shape[1]).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            grad_w = (x2.t() @ grad_cols).view(x2.shape[1], kernel, kernel, -1).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _use_cpu_gemm(x: torch.Tensor, low_res_side: int) -> bool:
    """Whether a layer runs as im2col + GEMM (see CPU_GEMM_MAX_SIDE): fp32 on the CPU, outside
    autocast, torch.compile (Inductor picks its own kernels) and native_convolutions."""
    return (
        low_res_side <= CPU_GEMM_MAX_SIDE
        and not _native_only
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _ConvBf16(torch.autograd.Function):
    """A (transposed) convolution under CPU bf16 autocast: forward and input gradient through
    torch's kernels (oneDNN's AMX / avx512_bf16 ones), the weight gradient as im2col + one bf16
    matrix multiply.

    Why: oneDNN's bf16 weight-gradient kernels (``brgconv_bwd_w``) took 200-580 ms per layer of
    the seed model on a 2-core Xeon with AMX (torch 2.14, oneDNN 3.12), whatever the layer's
    size (530 ms for the 1024 -> 1 convolution on 4x4 maps), against 7-140 ms as a matrix
    multiply, while its bf16 forward and input gradients take 12-100 ms
    (docs/benchmarks/train-cpu.md#bf16-autocast-on-avx-512-cpus). Inputs are in bf16 already
    (the caller casts, as autocast would); the results equal autocast's up to the order of the
    fp32 sums inside the weight gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        padding: int,
        transposed: bool,
    ) -> torch.Tensor:
        conv = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, transposed)
        ctx.has_bias = bias is not None
        return conv(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        _refuse_double_backward()
        x, weight = ctx.saved_tensors
        stride, padding, transposed = ctx.geometry
        kernel = weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], transposed,
                [0, 0], 1, [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            if transposed:  # the adjoint of a transposed convolution is a plain one
                x2 = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                grad_cols = _im2col(grad.permute(0, 2, 3, 1), kernel, stride, padding)
                grad_w = (x2.t() @ grad_cols).view(x.shape[1], kernel, kernel, -1)
            else:
                cols = _im2col(x.permute(0, 2, 3, 1), kernel, stride, padding)
                g2 = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
                grad_w = (g2.t() @ cols).view(-1, kernel, kernel, x.shape[1])
            grad_w = grad_w.permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None


def _use_bf16_weight_gemm(x: torch.Tensor) -> bool:
    """Whether a layer runs as :class:`_ConvBf16`: on the CPU under bf16 autocast, outside
    torch.compile and native_convolutions."""
    return (
        not _native_only
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
    )


def _conv_bf16(
    x: torch.Tensor, conv: nn.Conv2d | nn.ConvTranspose2d, transposed: bool
) -> torch.Tensor:
    """``conv`` on ``x`` as :class:`_ConvBf16`, with autocast's casts made here (autograd
    records them, so the fp32 parameters get fp32 gradients, as under autocast)."""
    weight = conv.weight.to(torch.bfloat16)
    bias = conv.bias.to(torch.bfloat16) if conv.bias is not None else None
    with torch.autocast("cpu", enabled=False):
        return _ConvBf16.apply(
            x.to(torch.bfloat16), weight, bias, conv.stride[0], int(conv.padding[0]), transposed
        )


def _check_gemm_compatible(conv: nn.Conv2d | nn.ConvTranspose2d) -> None:
    square = conv.kernel_size[0] == conv.kernel_size[1]
    uniform = conv.stride[0] == conv.stride[1] and conv.padding[0] == conv.padding[1]
    plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    no_output_padding = getattr(conv, "output_padding", (0, 0)) == (0, 0)
    if not (square and uniform and plain and no_output_padding):
        raise ValueError(f"{type(conv).__name__} supports square, ungrouped kernels only: {conv}")


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) that runs small feature maps on the
    CPU as a matrix multiply; see :data:`CPU_GEMM_MAX_SIDE` and :func:`set_cpu_gemm`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_gemm_compatible(self)
        self.cpu_gemm = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, padding = self.stride[0], int(self.padding[0])
        out_side = (x.shape[-1] + 2 * padding - self.kernel_size[0]) // stride + 1
        if self.cpu_gemm and _use_cpu_gemm(x, min(x.shape[-1], out_side)):
            return _ConvGemm.apply(x, self.weight, self.bias, stride, padding)
        if self.cpu_gemm and _use_bf16_weight_gemm(x):
            return _conv_bf16(x, self, transposed=False)
        return super().forward(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters and state dict) that runs small feature maps
    on the CPU as a matrix multiply; see :data:`CPU_GEMM_MAX_SIDE` and :func:`set_cpu_gemm`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _check_gemm_compatible(self)
        self.cpu_gemm = True

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.cpu_gemm and output_size is None and _use_cpu_gemm(x, x.shape[-1]):
            return _ConvTransposeGemm.apply(
                x, self.weight, self.bias, self.stride[0], int(self.padding[0])
            )
        if self.cpu_gemm and output_size is None and _use_bf16_weight_gemm(x):
            return _conv_bf16(x, self, transposed=True)
        return super().forward(x, output_size)


def set_cpu_gemm(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch the matrix-multiply path of every layer of ``model`` on or off (it is on by
    default); off, every convolution runs through torch's own kernels, as the 2019 code did.
    Returns ``model``."""
    for module in model.modules():
        if isinstance(module, Conv2d | ConvTranspose2d):
            module.cpu_gemm = enabled
    return model


__all__ = ["CPU_GEMM_MAX_SIDE", "Conv2d", "ConvTranspose2d", "native_convolutions", "set_cpu_gemm"]
