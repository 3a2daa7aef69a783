"""``stein-dense-volume-renderer``: a volume renderer that runs without CUDA.

threestudio's ``nerf-volume-renderer`` and ``neus-volume-renderer`` sample with nerfacc
estimators and composite in nerfacc's *packed* layout; both need nerfacc's CUDA kernels. This
renderer samples every ray densely inside the bounding box (``num_samples_per_ray`` bins between
the ray's entry and exit, stratified -- one uniform jitter per bin -- while training) and
composites in the *batched* ``[n_rays, n_samples]`` layout, where nerfacc's functions are pure
torch. It returns the same keys and shapes as ``nerf-volume-renderer`` so that every threestudio
system and our SteinDreamer system can use it unchanged.

Quadrature. With bins ``[s_k, e_k]`` and a sample ``t_k`` in each, a density field gives
``alpha_k = 1 - exp(-sigma(t_k) (e_k - s_k))``; an SDF field (``implicit-sdf``) gives NeuS'
discrete opacity ``alpha_k = max((Phi(f_prev) - Phi(f_next)) / Phi(f_prev), 0)`` with
``Phi(x) = sigmoid(inv_std * x)`` and ``f_prev/next`` the SDF extrapolated half a bin backwards/
forwards along the ray with the (annealed) cosine between ray and normal (Wang et al., NeuS,
2021, eq. 13). ``inv_std = exp(10 v)`` with a learned ``v`` (initialised to
``learned_variance_init``). Then ``w_k = alpha_k prod_{j<k} (1 - alpha_j)``, ``opacity = sum w``,
``depth = sum w t`` (distance along the unit ray direction), ``rgb = sum w c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import nerfacc
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from threestudio.models.background.base import BaseBackground
from threestudio.models.geometry.base import BaseImplicitGeometry
from threestudio.models.materials.base import BaseMaterial
from threestudio.models.renderers.base import VolumeRenderer
from threestudio.utils.ops import chunk_batch
from torch import Tensor, nn

from threestudio_ssd.threestudio.registry import register


def ray_box_intersection(
    rays_o: Float[Tensor, "N 3"], rays_d: Float[Tensor, "N 3"], bbox: Float[Tensor, "2 3"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"], Bool[Tensor, " N"]]:
    """Slab test: the ray ``o + t d`` is inside the box for ``t_near <= t <= t_far``;
    ``hit = t_far > max(t_near, 0)``. ``t_near`` is clamped at 0 (cameras inside the box)."""
    safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    t0 = (bbox[0] - rays_o) / safe_d
    t1 = (bbox[1] - rays_o) / safe_d
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    return t_near, t_far, t_far > t_near


class LearnedInverseStd(nn.Module):
    """NeuS' learned sharpness ``inv_std = exp(10 v)`` of the logistic density (scalar ``v``)."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.tensor(float(init)))

    @property
    def inv_std(self) -> Tensor:
        return torch.exp(10.0 * self.v).clamp(1.0e-6, 1.0e6)


def neus_alpha(
    sdf: Float[Tensor, "N S"],
    cos: Float[Tensor, "N S"],
    dists: Float[Tensor, "N S"],
    inv_std: Tensor,
    cos_anneal_ratio: float,
) -> Float[Tensor, "N S"]:
    """NeuS' discrete opacity (module docstring) from the SDF at bin centres.

    ``cos`` is the cosine between ray direction and surface normal; early in training (ratio < 1)
    it is blended with ``(cos - 1) / 2`` so that back-facing samples still receive gradient
    (NeuS' cosine annealing). The ``1e-5`` terms keep the ratio finite where ``Phi`` vanishes.
    """
    slope = -(F.relu(-cos * 0.5 + 0.5) * (1.0 - cos_anneal_ratio) + F.relu(-cos) * cos_anneal_ratio)
    sdf_prev = sdf - slope * dists * 0.5
    sdf_next = sdf + slope * dists * 0.5
    cdf_prev = torch.sigmoid(sdf_prev * inv_std)
    cdf_next = torch.sigmoid(sdf_next * inv_std)
    return ((cdf_prev - cdf_next + 1e-5) / (cdf_prev + 1e-5)).clamp(0.0, 1.0)


@register("stein-dense-volume-renderer")
class DenseVolumeRenderer(VolumeRenderer):
    """Dense stratified volume rendering with nerfacc's batched (pure-torch) functions."""

    @dataclass
    class Config(VolumeRenderer.Config):
        num_samples_per_ray: int = 64
        randomized: bool = True
        # points per geometry call outside training (bigger renders are split into chunks)
        eval_chunk_size: int = 160000
        near_plane: float = 0.0
        far_plane: float = 1e10
        return_comp_normal: bool = False
        # implicit-sdf only (NeuS): initial log-sharpness / 10 and cosine annealing length
        learned_variance_init: float = 0.3
        cos_anneal_end_steps: int = 0

    cfg: Config

    def configure(
        self, geometry: BaseImplicitGeometry, material: BaseMaterial, background: BaseBackground
    ) -> None:
        super().configure(geometry, material, background)
        if self.cfg.num_samples_per_ray < 1:
            raise ValueError(f"renderer.num_samples_per_ray must be >= 1, got {self.cfg.num_samples_per_ray}")
        self.is_sdf = hasattr(geometry, "forward_sdf")
        if self.is_sdf:
            self.variance = LearnedInverseStd(self.cfg.learned_variance_init)
        self.cos_anneal_ratio = 1.0

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        end = self.cfg.cos_anneal_end_steps
        self.cos_anneal_ratio = 1.0 if end == 0 else min(1.0, global_step / end)

    def _needs_normal(self) -> bool:
        if self.is_sdf:
            return True  # NeuS opacity uses the normal
        has_normals = getattr(self.geometry.cfg, "normal_type", None) is not None
        return has_normals and (self.material.requires_normal or self.cfg.return_comp_normal)

    def _sample(
        self, rays_o: Float[Tensor, "N 3"], rays_d: Float[Tensor, "N 3"]
    ) -> tuple[Float[Tensor, "N S"], Float[Tensor, "N S"], Float[Tensor, "N S"], Bool[Tensor, " N"]]:
        """Bins ``[t_starts, t_ends]`` between entry and exit, and one sample ``t_points`` per bin
        (the bin centre, or uniformly jittered inside the bin while training)."""
        near, far, hit = ray_box_intersection(rays_o, rays_d, self.bbox)
        near = near.clamp_min(self.cfg.near_plane)
        far = far.clamp_max(self.cfg.far_plane)
        hit = hit & (far > near)
        far = torch.where(hit, far, near)  # empty rays get zero-length bins, hence zero weight
        n_samples = self.cfg.num_samples_per_ray
        u = torch.linspace(0.0, 1.0, n_samples + 1, device=rays_o.device, dtype=rays_o.dtype)
        edges = near[:, None] + (far - near)[:, None] * u[None, :]
        t_starts, t_ends = edges[:, :-1], edges[:, 1:]
        if self.training and self.cfg.randomized:
            jitter = torch.rand_like(t_starts)
        else:
            jitter = torch.full_like(t_starts, 0.5)
        t_points = t_starts + (t_ends - t_starts) * jitter
        return t_starts, t_ends, t_points, hit

    def forward(
        self,
        rays_o: Float[Tensor, "B H W 3"],
        rays_d: Float[Tensor, "B H W 3"],
        light_positions: Float[Tensor, "B 3"],
        bg_color: Tensor | None = None,
        **kwargs,
    ) -> dict[str, Tensor]:
        batch_size, height, width = rays_o.shape[:3]
        rays_o_flat = rays_o.reshape(-1, 3)
        rays_d_flat = rays_d.reshape(-1, 3)
        n_rays = rays_o_flat.shape[0]
        n_samples = self.cfg.num_samples_per_ray

        t_starts, t_ends, t_points, hit = self._sample(rays_o_flat, rays_d_flat)
        t_intervals = t_ends - t_starts
        t_dirs = rays_d_flat[:, None, :].expand(-1, n_samples, -1)
        positions = rays_o_flat[:, None, :] + t_dirs * t_points[..., None]
        t_light = light_positions.reshape(-1, 1, 1, 3).expand(-1, height, width, -1).reshape(-1, 1, 3)
        t_light = t_light.expand(-1, n_samples, -1)

        points = positions.reshape(-1, 3)
        dirs = t_dirs.reshape(-1, 3)
        lights = t_light.reshape(-1, 3)
        output_normal = self._needs_normal()
        if self.training:
            geo_out = self.geometry(points, output_normal=output_normal)
            rgb_all = self.material(
                viewdirs=dirs, positions=points, light_positions=lights, **geo_out, **kwargs
            )
            comp_rgb_bg = self.background(dirs=rays_d)
        else:
            chunk = self.cfg.eval_chunk_size
            geo_out = chunk_batch(self.geometry, chunk, points, output_normal=output_normal)
            rgb_all = chunk_batch(
                self.material, chunk, viewdirs=dirs, positions=points, light_positions=lights, **geo_out
            )
            comp_rgb_bg = chunk_batch(self.background, chunk, dirs=rays_d)

        hit_f = hit.to(t_points.dtype)[:, None]
        if self.is_sdf:
            sdf = geo_out["sdf"].reshape(n_rays, n_samples)
            cos = (dirs * geo_out["normal"]).sum(-1).reshape(n_rays, n_samples)
            alphas = neus_alpha(sdf, cos, t_intervals, self.variance.inv_std, self.cos_anneal_ratio)
            weights, _ = nerfacc.render_weight_from_alpha(alphas * hit_f)
        else:
            sigmas = geo_out["density"].reshape(n_rays, n_samples)
            weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas * hit_f)

        opacity = weights.sum(dim=-1, keepdim=True)
        depth = nerfacc.accumulate_along_rays(weights, values=t_points[..., None])
        comp_rgb_fg = nerfacc.accumulate_along_rays(weights, values=rgb_all.reshape(n_rays, n_samples, -1))
        # HiFA's z-variance: spread of the normalised weights along the ray, on opaque rays only
        weights_normalized = weights / opacity.clamp_min(1e-5)
        z_mean = (weights_normalized * t_points).sum(-1, keepdim=True)
        z_variance = (weights_normalized * (t_points - z_mean) ** 2).sum(-1, keepdim=True)
        z_variance = z_variance * (opacity > 0.5).to(z_variance.dtype)

        if bg_color is None:
            bg_color = comp_rgb_bg
        elif bg_color.shape[:-1] == (batch_size,):  # one colour per image, e.g. Zero123's
            bg_color = bg_color[:, None, None, :].expand(-1, height, width, -1)
        if bg_color.shape[:-1] == (batch_size, height, width):
            bg_color = bg_color.reshape(n_rays, -1)
        comp_rgb = comp_rgb_fg + bg_color * (1.0 - opacity)

        def image(x: Tensor) -> Tensor:
            return x.reshape(batch_size, height, width, -1)

        out = {
            "comp_rgb": image(comp_rgb),
            "comp_rgb_fg": image(comp_rgb_fg),
            "comp_rgb_bg": image(comp_rgb_bg),
            "opacity": image(opacity),
            "depth": image(depth),
            "z_variance": image(z_variance),
        }
        if "normal" in geo_out and (not self.training or self.cfg.return_comp_normal):
            normal = nerfacc.accumulate_along_rays(
                weights, values=geo_out["normal"].reshape(n_rays, n_samples, 3)
            )
            out["comp_normal"] = image((F.normalize(normal, dim=-1) + 1.0) / 2.0 * opacity)
        if self.training:
            ray_indices = torch.arange(n_rays, device=rays_o.device)[:, None].expand(-1, n_samples)
            out.update(
                {
                    "weights": weights.reshape(-1, 1),
                    "t_points": t_points.reshape(-1, 1),
                    "t_intervals": t_intervals.reshape(-1, 1),
                    "t_dirs": dirs,
                    "ray_indices": ray_indices.reshape(-1),
                    "points": points,
                    **geo_out,
                }
            )
        if self.is_sdf:
            out["inv_std"] = self.variance.inv_std
        return out
