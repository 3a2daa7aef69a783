"""``stein-mesh-rasterizer``: threestudio's ``nvdiff-rasterizer`` that also renders depth.

The mesh stages (DMTet geometry and texture refinement) render with ``nvdiff-rasterizer``, which
returns ``opacity``, ``comp_normal`` and ``comp_rgb`` but no depth, so SSD's ``depth`` and ``normal``
baselines had nothing to compare the estimate with there. This renderer runs threestudio's own
forward unchanged and adds

    ``depth = antialias(|p - camera| * mask)``  ``[B, H, W, 1]``

where ``p`` is the surface point of each pixel (the mesh's vertex positions interpolated with the
rasterizer's perspective-correct barycentrics), i.e. the distance along the unit ray times the
(antialiased) coverage: the volume renderers' encoding (``sum_i w_i t_i``), which
``RenderOutputs.from_threestudio`` divides by ``opacity``. It reuses the forward's rasterization
(no second pass) and is computed without gradient: the baselines use the render as a constant.

``context_type``: nvdiffrast's ``gl`` or ``cuda``, or ``torch``: :class:`TorchRasterizerContext`,
a plain-PyTorch rasterizer (CPU or GPU, no nvdiffrast) for small images, e.g. mesh stages on a CPU
and the tests. It has nvdiffrast's interface and conventions but no antialiasing and no gradient
through visibility (silhouettes): gradients reach the mesh through the interpolated attributes
(normals, positions) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from threestudio.models.renderers.base import Rasterizer
from threestudio.models.renderers.nvdiff_rasterizer import NVDiffRasterizer
from threestudio.utils.misc import get_device
from torch import Tensor

from threestudio_ssd.threestudio.registry import register


class TorchRasterizerContext:
    """nvdiffrast's rasterizer interface (as threestudio's ``NVDiffRasterizerContext`` wraps it) in
    plain PyTorch.

    ``rasterize`` returns ``rast [B, H, W, 4] = (u, v, z / w, triangle id + 1)`` (0 where no triangle
    covers the pixel centre): ``(u, v, 1 - u - v)`` are the perspective-correct barycentric weights
    of the triangle's vertices 0, 1, 2, the nearest triangle (smallest ``z / w``) wins, and row 0 is
    normalised device coordinate ``y = -1`` (nvdiffrast's OpenGL convention, which threestudio's
    projection matrix flips). Triangles are processed ``chunk`` at a time against a z-buffer, so
    memory is ``O(pixels x chunk)``.
    """

    def __init__(self, context_type: str = "torch", device: torch.device | str = "cpu", chunk: int = 1024):
        self.device, self.chunk = torch.device(device), int(chunk)

    def vertex_transform(self, verts: Tensor, mvp_mtx: Tensor) -> Tensor:
        homogeneous = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=-1)
        return homogeneous[None] @ mvp_mtx.transpose(-1, -2)

    @torch.no_grad()
    def rasterize(self, pos: Tensor, tri: Tensor, resolution: tuple[int, int]) -> tuple[Tensor, None]:
        height, width = int(resolution[0]), int(resolution[1])
        rows = (torch.arange(height, device=pos.device, dtype=pos.dtype) + 0.5) * (2.0 / height) - 1.0
        cols = (torch.arange(width, device=pos.device, dtype=pos.dtype) + 0.5) * (2.0 / width) - 1.0
        py, px = torch.meshgrid(rows, cols, indexing="ij")
        px, py = px.reshape(-1, 1), py.reshape(-1, 1)  # [P, 1]
        tri = tri.long()
        out = []
        for clip in pos:  # one view at a time
            w = clip[:, 3]
            ndc = clip[:, :3] / w[:, None]
            best_z = torch.full((height * width,), float("inf"), device=pos.device, dtype=pos.dtype)
            rast = torch.zeros(height * width, 4, device=pos.device, dtype=pos.dtype)
            for start in range(0, tri.shape[0], self.chunk):
                t = tri[start : start + self.chunk]
                corner = ndc[t]  # [T, 3 vertices, xyz]
                (x0, x1, x2), (y0, y1, y2) = corner[..., 0].T, corner[..., 1].T  # each [T]
                area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
                usable = (area.abs() > 1e-12) & (w[t] > 0).all(dim=1)  # no degenerate or behind-camera ones
                safe = torch.where(usable, area, torch.ones_like(area))
                # screen-space barycentrics of every pixel centre in every triangle: [P, T]
                b0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / safe
                b1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / safe
                b2 = 1.0 - b0 - b1
                inside = (b0 >= 0) & (b1 >= 0) & (b2 >= 0) & usable
                z = b0 * corner[:, 0, 2] + b1 * corner[:, 1, 2] + b2 * corner[:, 2, 2]  # z/w: screen-linear
                z = torch.where(inside & (z >= -1) & (z <= 1), z, torch.full_like(z, float("inf")))
                z_min, k = z.min(dim=1)
                closer = z_min < best_z
                if not closer.any():
                    continue
                bary = torch.stack([b.gather(1, k[:, None])[:, 0] for b in (b0, b1, b2)], dim=1)  # [P, 3]
                # perspective correction: weights b_i / w_i, renormalised
                p0, p1, p2 = (bary / w[t][k]).unbind(dim=1)
                total = p0 + p1 + p2
                new = torch.stack([p0 / total, p1 / total, z_min, (start + k + 1).to(pos.dtype)], dim=1)
                rast = torch.where(closer[:, None], new, rast)
                best_z = torch.where(closer, z_min, best_z)
            out.append(rast.reshape(height, width, 4))
        return torch.stack(out), None

    def antialias(self, color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor) -> Tensor:
        """No antialiasing (nvdiffrast's analytic antialiasing is what gives silhouette gradients)."""
        return color

    def interpolate_one(self, attr: Tensor, rast: Tensor, tri: Tensor) -> tuple[Tensor, None]:
        """``attr [Nv, C]`` at every pixel: ``u a_0 + v a_1 + (1 - u - v) a_2`` of the pixel's
        triangle, 0 where there is none; differentiable in ``attr``."""
        ids = rast[..., 3].long()
        hit = ids > 0
        corners = attr[tri.long()[(ids - 1).clamp_min(0)]]  # [B, H, W, 3, C]
        u, v = rast[..., 0:1], rast[..., 1:2]
        value = u * corners[..., 0, :] + v * corners[..., 1, :] + (1 - u - v) * corners[..., 2, :]
        return torch.where(hit[..., None], value, torch.zeros_like(value)), None

    def interpolate(
        self, attr: Tensor, rast: Tensor, tri: Tensor, rast_db: Any = None, diff_attrs: Any = None
    ):
        """nvdiffrast's batched form: ``attr [1, Nv, C]``."""
        return self.interpolate_one(attr[0], rast, tri)


class _KeepRasterization:
    """A rasterizer context that forwards every call and keeps the last ``rasterize`` result."""

    def __init__(self, ctx: Any) -> None:
        self.ctx, self.last = ctx, None

    def rasterize(self, pos: Tensor, tri: Tensor, resolution: Any, *args: Any, **kwargs: Any):
        self.last = (self.ctx.rasterize(pos, tri, resolution, *args, **kwargs), pos, tri)
        return self.last[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)


@register("stein-mesh-rasterizer")
class SteinMeshRasterizer(NVDiffRasterizer):
    """``nvdiff-rasterizer`` plus ``depth`` (module docstring); ``context_type`` also ``torch``."""

    @dataclass
    class Config(NVDiffRasterizer.Config):
        context_type: str = "gl"  # gl | cuda (nvdiffrast) | torch (TorchRasterizerContext)

    cfg: Config

    def configure(self, geometry: Any, material: Any, background: Any) -> None:
        if self.cfg.context_type == "torch":
            Rasterizer.configure(self, geometry, material, background)
            ctx: Any = TorchRasterizerContext("torch", get_device())
        else:
            super().configure(geometry, material, background)
            ctx = self.ctx
        self.ctx = _KeepRasterization(ctx)

    def forward(self, mvp_mtx: Tensor, camera_positions: Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = super().forward(mvp_mtx, camera_positions, *args, **kwargs)
        (rast, _), v_pos_clip, t_pos_idx = self.ctx.last
        with torch.no_grad():
            mask = (rast[..., 3:] > 0).float()
            surface, _ = self.ctx.interpolate_one(out["mesh"].v_pos, rast, t_pos_idx)
            distance = (surface - camera_positions[:, None, None, :]).norm(dim=-1, keepdim=True)
            out["depth"] = self.ctx.antialias(distance * mask, rast, v_pos_clip, t_pos_idx)
        return out
