"""Framework-free geometry and statistics helpers for the baseline functions (torch only).

Camera convention (threestudio's, docs/ARCHITECTURE.md): OpenGL camera looking along ``-z`` of its
frame, ``+y`` up, ``+x`` right; the ray through pixel ``(row i, column j)`` of an ``H x W`` image has
direction ``((j + 0.5 - W/2) / f, -(i + 0.5 - H/2) / f, -1)`` with focal length
``f = 0.5 H / tan(fovy / 2)`` in pixels; ``depth`` is the distance along the *unit* ray, 0 where
nothing was hit; disparity is ``1 / depth`` there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def masked_pearson(
    a: Float[Tensor, "B H W"],
    b: Float[Tensor, "B H W"],
    mask: Bool[Tensor, "B H W"],
    min_pixels: int = 16,
    rel_tol: float = 1e-6,
) -> tuple[Float[Tensor, " B"], Bool[Tensor, " B"]]:
    """Per-image Pearson correlation over the masked pixels, with its validity.

    ``r = sum_m (a - abar)(b - bbar) / sqrt(sum_m (a - abar)^2 * sum_m (b - bbar)^2)`` with means
    ``abar``, ``bbar`` over the mask. ``valid`` is False where the mask has fewer than
    ``min_pixels`` pixels or either side is constant over it (standard deviation at most
    ``rel_tol`` times its largest absolute value); ``r`` is 0 there, finite, and has a finite
    (zero) gradient, so the caller can swap in its fallback without NaNs leaking into autograd.
    Differentiable in ``a`` and ``b`` elsewhere.
    """
    _check_same_shape("a", a, "b", b)
    _check_same_shape("a", a, "mask", mask)
    m = mask.to(a.dtype).flatten(1)
    a, b = a.flatten(1), b.flatten(1)
    n = m.sum(1)
    n_safe = n.clamp_min(1.0)
    da = (a - (a * m).sum(1, keepdim=True) / n_safe[:, None]) * m
    db = (b - (b * m).sum(1, keepdim=True) / n_safe[:, None]) * m
    var_a, var_b = (da**2).sum(1) / n_safe, (db**2).sum(1) / n_safe
    scale_a = (a.abs() * m).amax(1).detach()
    scale_b = (b.abs() * m).amax(1).detach()
    valid = (
        (n >= min_pixels)
        & (var_a.detach() > (rel_tol * scale_a) ** 2)
        & (var_b.detach() > (rel_tol * scale_b) ** 2)
        & (scale_a > 0)
        & (scale_b > 0)
    )
    tiny = torch.finfo(a.dtype).tiny
    denom = torch.sqrt(torch.where(valid, var_a * var_b, torch.ones_like(var_a)).clamp_min(tiny))
    r = torch.where(valid, (da * db).sum(1) / n_safe / denom, torch.zeros_like(var_a))
    return r, valid


def scale_shift_align(
    pred: Float[Tensor, "B H W"],
    target: Float[Tensor, "B H W"],
    mask: Bool[Tensor, "B H W"],
    positive_scale: bool = True,
) -> Float[Tensor, "B H W"]:
    """Least-squares scale and shift per image: ``s * pred + c`` with
    ``(s, c) = argmin sum_mask (s * pred + c - target)^2`` (MiDaS' alignment).

    Closed form: ``s = cov(pred, target) / var(pred)``, ``c = tbar - s * pbar`` over the mask.
    With ``positive_scale`` (the default) the fit is constrained to ``s >= 0``; its optimum is then
    ``max(s, 0)`` with the same formula for ``c``, so an inverted prediction (negative correlation)
    aligns to the flat mean instead of being silently flipped back (docs/depth.md, "Signs").
    ``positive_scale=False`` is the unconstrained fit, blind to the sign.
    Where the mask is empty or ``pred`` is constant on it, ``s = 0`` and ``c`` is the target's mean
    (0 for an empty mask). Differentiable in ``pred`` (and ``target``); returned on all pixels.
    """
    _check_same_shape("pred", pred, "target", target)
    _check_same_shape("pred", pred, "mask", mask)
    m = mask.to(pred.dtype)
    n = m.sum((1, 2)).clamp_min(1.0)
    p_mean = (pred * m).sum((1, 2)) / n
    t_mean = (target * m).sum((1, 2)) / n
    dp = (pred - p_mean[:, None, None]) * m
    dt = (target - t_mean[:, None, None]) * m
    var_p = (dp**2).sum((1, 2))
    ok = var_p > torch.finfo(pred.dtype).eps * (p_mean.detach() ** 2 + 1e-30) * n
    s = torch.where(ok, (dp * dt).sum((1, 2)) / torch.where(ok, var_p, torch.ones_like(var_p)), 0.0 * var_p)
    if positive_scale:
        s = s.clamp_min(0.0)
    c = t_mean - s * p_mean
    return s[:, None, None] * pred + c[:, None, None]


def median_mad_normalize(x: Float[Tensor, "B H W"], mask: Bool[Tensor, "B H W"]) -> Float[Tensor, "B H W"]:
    """MiDaS' scale-and-shift normalisation per image: ``(x - t) / s`` with ``t`` the median of ``x``
    over the mask and ``s = mean_mask |x - t|`` (floored at ``1e-6``; an empty mask gives ``t = 0,
    s = 1e-6``). The scale is positive by construction, so comparing two normalised maps sees the
    sign of their relief (unlike the least-squares fit without ``positive_scale``). Differentiable
    in ``x``; returned on all pixels."""
    _check_same_shape("x", x, "mask", mask)
    flat = x.flatten(1)
    m = mask.flatten(1)
    med = torch.where(m, flat, torch.full_like(flat, float("nan"))).nanmedian(dim=1).values
    med = torch.nan_to_num(med, nan=0.0)
    mf = m.to(x.dtype)
    mad = ((flat - med[:, None]).abs() * mf).sum(1) / mf.sum(1).clamp_min(1.0)
    return (x - med[:, None, None]) / mad.clamp_min(1e-6)[:, None, None]


def depth_to_disparity(
    depth: Float[Tensor, "B H W"], mask: Bool[Tensor, "B H W"] | None = None
) -> Float[Tensor, "B H W"]:
    """``1 / depth`` where ``depth > 0`` (and ``mask``), 0 elsewhere (empty rays are infinitely far).

    The same map turns a metric depth estimate into disparity; it is its own inverse, so it also
    turns a (positive) disparity into depth."""
    ok = depth > 0
    if mask is not None:
        _check_same_shape("depth", depth, "mask", mask)
        ok = ok & mask
    return torch.where(ok, 1.0 / torch.where(ok, depth, torch.ones_like(depth)), torch.zeros_like(depth))


def ray_directions(
    height: int, width: int, fovy_deg: Float[Tensor, " B"], normalize: bool = True
) -> Float[Tensor, "B H W 3"]:
    """Camera-space ray directions of every pixel (threestudio's ``get_ray_directions`` convention,
    pixel centres, principal point at the image centre), unit length if ``normalize``."""
    fovy = torch.as_tensor(fovy_deg, dtype=torch.float32).reshape(-1) * (math.pi / 180.0)
    focal = 0.5 * height / torch.tan(0.5 * fovy)  # [B]
    rows = torch.arange(height, dtype=torch.float32, device=fovy.device) + 0.5
    cols = torch.arange(width, dtype=torch.float32, device=fovy.device) + 0.5
    i, j = torch.meshgrid(rows, cols, indexing="ij")
    x = (j - width / 2)[None] / focal[:, None, None]
    y = -(i - height / 2)[None] / focal[:, None, None]
    d = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
    return F.normalize(d, dim=-1) if normalize else d


def depth_to_points(depth: Float[Tensor, "B H W"], fovy_deg: Float[Tensor, " B"]) -> Float[Tensor, "B H W 3"]:
    """Camera-space points ``depth * unit_ray_direction`` (``depth`` is the ray distance)."""
    dirs = ray_directions(depth.shape[1], depth.shape[2], fovy_deg).to(depth.device, depth.dtype)
    return depth[..., None] * dirs


def depth_to_normals(
    depth: Float[Tensor, "B H W"],
    fovy_deg: Float[Tensor, " B"],
    mask: Bool[Tensor, "B H W"] | None = None,
) -> tuple[Float[Tensor, "B H W 3"], Bool[Tensor, "B H W"]]:
    """Camera-space unit normals from ray-distance depth by central finite differences.

    With camera-space points ``P = depth * d(u, v)``:
    ``n = normalize((P[i, j+1] - P[i, j-1]) x (P[i-1, j] - P[i+1, j]))`` (image right x image up),
    which points towards the camera (``+z`` for a plane facing it). ``valid`` marks pixels whose
    four neighbours and themselves have ``depth > 0`` (and ``mask``), i.e. no difference crosses a
    silhouette or the image border; normals elsewhere are finite but meaningless. Scale-invariant in
    ``depth``. Differentiable in ``depth``.
    """
    if mask is None:
        mask = depth > 0
    else:
        _check_same_shape("depth", depth, "mask", mask)
        mask = mask & (depth > 0)
    p = depth_to_points(depth, fovy_deg)  # [B, H, W, 3]
    p_pad = F.pad(p.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    dx = p_pad[:, 1:-1, 2:] - p_pad[:, 1:-1, :-2]  # towards image right
    dy = p_pad[:, :-2, 1:-1] - p_pad[:, 2:, 1:-1]  # towards image up (rows grow downwards)
    n = torch.linalg.cross(dx, dy, dim=-1)
    norm = n.norm(dim=-1, keepdim=True)
    n = n / norm.clamp_min(torch.finfo(n.dtype).tiny ** 0.5)
    # A pixel is valid when it and its 4-neighbours are all inside (zero padding = outside).
    m = F.pad(mask, (1, 1, 1, 1))
    valid = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    valid = valid & (norm[..., 0].detach() > 0)
    return n, valid


def world_to_camera_normals(
    normal_world: Float[Tensor, "B H W 3"], c2w: Float[Tensor, "B 4 4"]
) -> Float[Tensor, "B H W 3"]:
    """Rotate world-space normals into the camera frame: ``n_cam = R^T n_world`` with ``R`` the
    rotation block of ``c2w`` (columns: right, up, back)."""
    rot = c2w[:, :3, :3].to(normal_world.dtype)
    return torch.einsum("bji,bhwj->bhwi", rot, normal_world)
