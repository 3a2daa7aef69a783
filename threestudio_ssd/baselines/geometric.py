"""SteinDreamer's geometric baselines: agreement of a monocular depth estimate of the (noisy) image
with the rendered geometry.

* ``depth``: ``phi = 1 - Pearson(estimated disparity, rendered disparity)`` (the project page's
  ``1 - PearsonCorr(NeRF_depth, MiDaS(x_t))``). The sign trap: MiDaS-like estimators output
  *inverse* depth, so it is correlated with rendered *disparity* ``1 / depth``; correlating it with
  depth would flip the sign (perfect agreement would give ``phi`` near 2, not 0). A metric-depth
  estimator's output is converted to disparity the same way.
* ``normal``: ``phi = 1 - mean cos(n_est, n_render)`` in camera space, ``n_est`` from the
  estimated depth by finite differences (:func:`~threestudio_ssd.baselines.ops.depth_to_normals`).

The estimator path is differentiable; the render is a constant.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from threestudio_ssd.baselines.base import Baseline, BaselineOutput, RenderOutputs, register_baseline
from threestudio_ssd.baselines.ops import (
    depth_to_disparity,
    depth_to_normals,
    masked_pearson,
    scale_shift_align,
    world_to_camera_normals,
)
from threestudio_ssd.depth.estimator import DepthEstimator, load_depth_estimator

MODES = ("object", "scene")


class _EstimatorBaseline(Baseline):
    """Shared set-up: the depth estimator (instance or checkpoint path) and the pixel mask."""

    def __init__(
        self,
        estimator: DepthEstimator | str | os.PathLike,
        mode: str = "object",
        threshold: float = 0.5,
        min_pixels: int = 16,
        **estimator_kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"Baseline {self.name!r}: mode must be one of {MODES}, got {mode!r}")
        if isinstance(estimator, DepthEstimator):
            if estimator_kwargs:
                raise ValueError(
                    f"estimator options {sorted(estimator_kwargs)} need a checkpoint path, not a model"
                )
            self.estimator = estimator
        else:
            self.estimator = load_depth_estimator(estimator, **estimator_kwargs)
        self.mode = mode
        self.threshold = float(threshold)
        self.min_pixels = int(min_pixels)

    def to(self, device: str | torch.device) -> _EstimatorBaseline:
        self.estimator.to(device)
        return self

    def mask(self, render: RenderOutputs) -> Bool[Tensor, "B H W"]:
        """Foreground ``opacity > threshold`` with a hit (objects), or every pixel (scenes)."""
        if self.mode == "scene":
            return torch.ones_like(render.depth, dtype=torch.bool)
        return (render.opacity > self.threshold) & (render.depth > 0)

    def estimated_disparity(self, image: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B H W"]:
        """The estimator's output as (relative) disparity, differentiable in ``image``."""
        est = self.estimator(image)
        return est if self.estimator.output_kind == "relative_inverse_depth" else depth_to_disparity(est)


@register_baseline("depth")
class DepthBaseline(_EstimatorBaseline):
    """``phi = 1 - Pearson_mask(disp_est(image), 1 / depth_render)``; ``phi`` is in ``[0, 2]``,
    0 for a perfect (affine) agreement. Invalid (``phi = 1``) where the mask has fewer than
    ``min_pixels`` pixels or either disparity is constant on it.

    Args:
        estimator: a :class:`DepthEstimator` or a checkpoint folder / Hub id for
            :func:`load_depth_estimator` (``estimator_kwargs`` go to it).
        mode: ``"object"`` (pixels with ``opacity > threshold``) or ``"scene"`` (all pixels, empty
            rays at disparity 0).
    """

    def evaluate(self, image: Float[Tensor, "B 3 H W"], render: RenderOutputs) -> BaselineOutput:
        mask = self.mask(render)
        target = depth_to_disparity(render.depth)
        r, valid = masked_pearson(self.estimated_disparity(image), target, mask, min_pixels=self.min_pixels)
        return BaselineOutput(phi=torch.where(valid, 1.0 - r, torch.ones_like(r)), valid=valid)

    def statistics(self, phi_mean: float) -> dict[str, float]:
        """``depth_corr``: the mean Pearson correlation of estimated and rendered disparity."""
        return {"depth_corr": 1.0 - phi_mean}


@register_baseline("normal")
class NormalBaseline(_EstimatorBaseline):
    """``phi = 1 - sum_p w_p c_p cos(n_est, R^T n_render) / sum_p w_p`` in camera space; ``phi`` in ``[0, 2]``.

    ``n_est`` comes from the estimated depth by finite differences with the camera's ``fovy``. A
    relative-inverse-depth estimate is first aligned to the rendered disparity (least-squares scale
    ``>= 0`` and shift over the mask; normals need depth up to scale only, but disparity's unknown
    shift bends surfaces), then inverted; a metric estimate is used as is.

    ``phi`` is a continuous function of the image, as Stein's identity needs (a jump in ``phi``
    is a term ``grad phi`` never sees): the pixel set ``w_p`` (object pixels whose 4-neighbours are
    on the object and have a rendered normal) comes from the render alone, and where the estimate
    collapses (aligned disparity or metric depth near or below 0, common for noisy images at large
    ``t``) a pixel fades out continuously, ``c_p = prod_{p and its 4 neighbours} clamp(d / floor, 0,
    1)`` with ``floor`` 5% of the mean rendered disparity (depth), and the depth is inverted as
    ``1 / max(d, floor)``. Needs ``render.normal``, ``render.c2w`` and ``render.fovy_deg``. Invalid
    (``phi = 1``) with fewer than ``min_pixels`` such pixels, which depends on the render only.
    """

    FLOOR_FRACTION = 0.05

    def evaluate(self, image: Float[Tensor, "B 3 H W"], render: RenderOutputs) -> BaselineOutput:
        missing = [k for k in ("normal", "c2w", "fovy_deg") if getattr(render, k) is None]
        if missing:
            raise ValueError(f"Baseline 'normal' needs RenderOutputs fields {missing}, which are None")
        mask = self.mask(render)
        _, on_object = depth_to_normals(render.depth, render.fovy_deg, mask)  # from the render only
        w = (on_object & (render.normal.norm(dim=-1) > 0.5)).to(image.dtype)
        est = self.estimator(image)
        m = mask.to(est.dtype)
        count = m.sum((1, 2)).clamp_min(1.0)
        if self.estimator.output_kind == "relative_inverse_depth":
            target = depth_to_disparity(render.depth)
            aligned = scale_shift_align(est, target, mask & (render.depth > 0))
            floor = self.FLOOR_FRACTION * ((target * m).sum((1, 2)) / count).clamp_min(1e-6)[:, None, None]
            confidence = (aligned / floor).clamp(0.0, 1.0)
            est_depth = 1.0 / torch.maximum(aligned, floor)
        else:
            floor = self.FLOOR_FRACTION * ((render.depth * m).sum((1, 2)) / count).clamp_min(1e-6)[:, None, None]
            confidence = (est / floor).clamp(0.0, 1.0)
            est_depth = torch.maximum(est, floor)
        c = F.pad(confidence, (1, 1, 1, 1))  # a finite difference uses the 4 neighbours too
        confidence = c[:, 1:-1, 1:-1] * c[:, :-2, 1:-1] * c[:, 2:, 1:-1] * c[:, 1:-1, :-2] * c[:, 1:-1, 2:]
        n_est, _ = depth_to_normals(est_depth, render.fovy_deg)
        n_ren = world_to_camera_normals(render.normal, render.c2w)
        cos = (n_est * n_ren).sum(-1)
        total = w.sum((1, 2))
        valid = total >= self.min_pixels
        mean_cos = (w * confidence * cos).sum((1, 2)) / total.clamp_min(1.0)
        return BaselineOutput(phi=torch.where(valid, 1.0 - mean_cos, torch.ones_like(mean_cos)), valid=valid)
