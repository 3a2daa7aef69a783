"""The one image resize used between renders and score-model space (torch only)."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def resize_image(x: Float[Tensor, "B C H W"], size: tuple[int, int]) -> Float[Tensor, "B C h w"]:
    """Bilinear resize to ``size = (h, w)`` (``align_corners=False``), antialiased when either side
    shrinks so that a large render is averaged rather than aliased; differentiable; returns ``x``
    itself at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
