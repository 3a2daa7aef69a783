"""Calling a half-precision network inside an exact gradient: backward loss scaling per call.

SSD needs ``grad_{x_t} phi`` to be the gradient of exactly the evaluated ``phi`` (Stein's identity,
docs/ssd_math.md section 2). With Stable Diffusion in float16 (``half_precision_weights``) the VAE
decoder feeding the baselines runs in float16, and the gradient that enters its backward,
``d phi / d image``, is of order ``1 / N`` for a baseline averaging over ``N`` pixels (``N ~ 1e5``
at 512 px): values of 1e-6 to 1e-8, which float16 (smallest normal 6.1e-5, smallest subnormal
6.0e-8) rounds coarsely or flushes to zero. The backward then returns another function's gradient
and the control variate is biased.

:func:`call_in_precision` runs ``fn`` on ``x`` cast to a reduced dtype and casts the result back.
Its backward scales the incoming gradient by a power of two so that its largest magnitude is
:data:`GRAD_TARGET` before casting it down, runs ``fn``'s backward in the reduced dtype on that,
and divides the result by the same power of two in the input's dtype. Powers of two make the
scaling itself exact; the result differs from the full-precision gradient only by the reduced
dtype's rounding inside ``fn``'s backward, as its forward does. This is loss scaling (mixed
precision training's remedy for the same underflow) chosen per call from the gradient itself, so
no scale has to be tuned or carried between steps; it costs one max-abs reduction, and no memory
(a float32 copy of the decoder would double the decoder's weights and activations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: the largest gradient magnitude entering the reduced-precision backward: far below float16's
#: overflow (65504), so that the backward's growth through the network stays finite, and far above
#: its smallest normal number, so that the gradient's small entries keep their precision
GRAD_TARGET = 1.0


class _Scale:
    """The power of two chosen in the backward of the output cast, read by the input cast's."""

    value = 1.0


def _power_of_two_scale(grad: Tensor) -> float:
    largest = float(grad.detach().abs().max()) if grad.numel() else 0.0
    if not math.isfinite(largest):
        raise FloatingPointError("non-finite gradient entering a reduced-precision backward")
    if largest == 0.0:
        return 1.0
    return 2.0 ** math.floor(math.log2(GRAD_TARGET / largest))


class _CastIn(torch.autograd.Function):
    """``x -> x.to(low)``; backward: ``grad.to(x.dtype) / scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, low: torch.dtype, scale: _Scale) -> Tensor:
        ctx.dtype, ctx.scale = x.dtype, scale
        return x.to(low)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.to(ctx.dtype) / ctx.scale.value
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"a reduced-precision backward overflowed although its input gradient was scaled to a "
                f"largest magnitude of {GRAD_TARGET}; lower threestudio_ssd.precision.GRAD_TARGET or "
                "run the network in float32 (half_precision_weights: false)"
            )
        return out, None, None


class _CastOut(torch.autograd.Function):
    """``y -> y.to(high)``; backward: ``(grad * scale).to(y.dtype)``, ``scale`` a power of two
    that brings ``max |grad|`` to :data:`GRAD_TARGET` (kept for :class:`_CastIn`)."""

    @staticmethod
    def forward(ctx, y: Tensor, high: torch.dtype, scale: _Scale) -> Tensor:
        ctx.dtype, ctx.scale = y.dtype, scale
        return y.to(high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.scale.value = _power_of_two_scale(grad)
        return (grad * ctx.scale.value).to(ctx.dtype), None, None


def call_in_precision(fn: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype) -> Tensor:
    """``fn(x.to(dtype)).to(x.dtype)`` whose gradient w.r.t. ``x`` is computed with a per-call
    power-of-two scale (module docstring). ``fn`` must depend on ``x`` only through its argument and
    return one tensor. Without a dtype change this is ``fn(x)``."""
    if x.dtype == dtype:
        return fn(x)
    scale = _Scale()
    return _CastOut.apply(fn(_CastIn.apply(x, dtype, scale)), x.dtype, scale)
