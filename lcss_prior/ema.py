"""Exponential moving average of network weights (the weights a trained prior exports).

Kept as two small functions on two modules of the same architecture, so the average lives in an
ordinary frozen module: it is saved in (and restored from) the training checkpoint with the rest of
the state dict, and exported like any other network.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """Decay used after optimiser step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``
    with warm-up, ``decay`` without. The warm-up lets early averages forget the random init."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """``p_ema <- decay * p_ema + (1 - decay) * p`` for every parameter; buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)
