"""Image metrics against the true object of a ``shapes`` prompt, rendered from the same cameras.

For a prompt of the ``shapes`` vocabulary (``"a red cube"``) the object is known exactly
(``lcss_prior.data.shapes``), so a run's test views can be compared with renders of the true
object from the run's test cameras (``TestCameras``):

* IoU of foreground masks, per view: ``|P & T| / |P | T|`` with ``P = opacity > threshold``
  (threshold 0.5 by default) and ``T`` the true mask; ``1`` when both masks are empty.
* PSNR, per view: ``10 log10(1 / MSE)`` for RGB in ``[0, 1]``, with ``MSE`` the mean squared error
  over the three channels of the pixels in a mask: the true object's mask (``"foreground"``: the
  object's colour and shading, independent of the run's background) or every pixel (``"full"``:
  also penalises a background that differs from the true render's, white by default, and mass
  outside the object). ``inf`` when the images agree exactly.

Functions return per-view values; the caller reduces (the report gives the mean over views).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lcss_prior.data.shapes import parse_caption, render_scene

from .views import TestCameras

__all__ = ["mask_iou", "psnr", "shapes_metrics", "true_views"]


def mask_iou(pred: Bool[Tensor, "N H W"], target: Bool[Tensor, "N H W"]) -> Float[Tensor, " N"]:
    """Per-view IoU ``|P & T| / |P | T|`` of boolean masks (``1`` where both are empty)."""
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).double()
    union = (pred | target).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def psnr(
    pred: Float[Tensor, "N C H W"],
    target: Float[Tensor, "N C H W"],
    mask: Bool[Tensor, "N H W"] | None = None,
    data_range: float = 1.0,
) -> Float[Tensor, " N"]:
    """Per-view ``10 log10(data_range^2 / MSE)``, ``MSE`` averaged over channels and the pixels in
    ``mask`` (all pixels without one). ``inf`` for ``MSE = 0``; ``nan`` for an empty mask."""
    if pred.shape != target.shape:
        raise ValueError(f"image shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    sq = (pred.double() - target.double()).square().mean(1)  # [N, H, W]
    if mask is None:
        mse = sq.flatten(1).mean(1)
    else:
        if mask.shape != sq.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the images {tuple(sq.shape)}")
        m = mask.bool().flatten(1).double()
        count = m.sum(1)
        mse = torch.where(count > 0, (sq.flatten(1) * m).sum(1) / count.clamp(min=1), math.nan)
    return 10.0 * torch.log10(data_range**2 / mse)


def true_views(
    caption: str,
    cameras: TestCameras,
    indices: list[int],
    resolution: tuple[int, int],
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    supersample: int = 1,
) -> dict[str, Tensor]:
    """Renders of the caption's true object from the test cameras ``indices``:
    ``rgb [N, 3, H, W]`` in ``[0, 1]`` and ``mask [N, H, W]`` (``render_scene``; pixel-centre rays
    as threestudio's renderers use with ``supersample=1``)."""
    shape, color = parse_caption(caption)
    out = render_scene(
        shape, color, cameras.c2w(indices), cameras.fovy_deg, resolution, background, supersample
    )
    return {"rgb": out["rgb"].permute(0, 3, 1, 2).contiguous(), "mask": out["mask"]}


def shapes_metrics(
    rgb: Float[Tensor, "N 3 H W"],
    opacity: Float[Tensor, "N H W"] | None,
    truth: dict[str, Tensor],
    mask_threshold: float = 0.5,
) -> dict[str, Tensor | None]:
    """Per-view ``iou`` (``None`` without an opacity panel), ``psnr_foreground`` and ``psnr_full``
    of a run's views against ``truth`` (``true_views`` of the same cameras)."""
    if rgb.shape != truth["rgb"].shape:
        raise ValueError(
            f"views {tuple(rgb.shape)} and true renders {tuple(truth['rgb'].shape)} differ in size"
        )
    return {
        "iou": None if opacity is None else mask_iou(opacity > mask_threshold, truth["mask"]),
        "psnr_foreground": psnr(rgb, truth["rgb"], truth["mask"]),
        "psnr_full": psnr(rgb, truth["rgb"]),
    }
