"""``stein-dense-volume-renderer`` with threestudio's real geometries, against analytic scenes.

A geometry whose MLP is zeroed is exactly its bias: ``implicit-volume`` with a float
``density_bias`` is a constant-density box, ``implicit-sdf`` with ``sdf_bias: sphere`` is the exact
SDF of a sphere. Both have closed-form renders to compare with.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.integration

ENC = {"otype": "ProgressiveBandFrequency", "n_frequencies": 2}
MLP = {
    "otype": "VanillaMLP",
    "activation": "ReLU",
    "output_activation": "none",
    "n_neurons": 8,
    "n_hidden_layers": 1,
}


def zero_networks(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def make_renderer(ts, geometry_type: str, geometry: dict, renderer: dict | None = None):
    geo = ts.find(geometry_type)(
        {"radius": 1.0, "pos_encoding_config": ENC, "mlp_network_config": MLP, **geometry}
    )
    zero_networks(geo)
    geo.do_update_step(0, 0)
    mat = ts.find("no-material")({"n_output_dims": 3, "color_activation": "sigmoid"})
    bg = ts.find("solid-color-background")({"color": (1.0, 1.0, 1.0)})
    cfg = {"radius": 1.0, "num_samples_per_ray": 64, **(renderer or {})}
    return ts.find("stein-dense-volume-renderer")(cfg, geometry=geo, material=mat, background=bg)


def camera_rays(height: int = 12, width: int = 12, distance: float = 2.0, fovy_deg: float = 40.0):
    """threestudio's rays for a camera on the +z axis looking at the origin."""
    from threestudio.utils.ops import get_ray_directions, get_rays

    focal = 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
    directions = get_ray_directions(height, width, focal)
    c2w = torch.eye(4)[None]
    c2w[0, 2, 3] = distance  # looks along -z, +y up
    rays_o, rays_d = get_rays(directions[None], c2w[:, :3], keepdim=True)
    return rays_o, rays_d, torch.zeros(1, 3)


def test_constant_density_box_matches_closed_form(threestudio_ts):
    """Constant density ``s`` between entry ``t0`` and exit ``t1``: opacity ``1 - exp(-s L)``
    exactly (the product of transmittances telescopes), depth ``int t s exp(-s (t - t0)) dt``
    up to the midpoint rule's O(1/n^2)."""
    sigma = 1.3
    bias = math.log(math.expm1(sigma))  # softplus^{-1}
    r = make_renderer(threestudio_ts, "implicit-volume", {"density_bias": bias, "normal_type": None})
    r.eval()
    rays_o, rays_d, light = camera_rays(fovy_deg=30.0)
    with torch.no_grad():
        out = r(rays_o, rays_d, light)
    # with tan(15 deg) * 3 < 1 every ray from (0, 0, 2) enters the face z = 1 and leaves by z = -1
    dz = -rays_d[..., 2]
    t0, t1 = 1.0 / dz, 3.0 / dz
    length = t1 - t0
    expected_opacity = 1.0 - torch.exp(-sigma * length)
    expected_depth = (
        t0 * (1 - torch.exp(-sigma * length))
        + (1 - (1 + sigma * length) * torch.exp(-sigma * length)) / sigma
    )
    torch.testing.assert_close(out["opacity"][..., 0], expected_opacity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["depth"][..., 0], expected_depth, atol=2e-3, rtol=0)
    # background blends with the remaining transmittance, foreground colour is sigmoid(0) = 0.5
    expected_rgb = 0.5 * expected_opacity + (1 - expected_opacity)
    torch.testing.assert_close(out["comp_rgb"], expected_rgb[..., None].expand(-1, -1, -1, 3))


def test_sdf_sphere_depth_and_silhouette(threestudio_ts):
    """NeuS opacity of the exact sphere SDF: depth at the first intersection, silhouette sharp."""
    radius = 0.5
    r = make_renderer(
        threestudio_ts,
        "implicit-sdf",
        {"sdf_bias": "sphere", "sdf_bias_params": radius, "normal_type": "finite_difference"},
        {"num_samples_per_ray": 128, "learned_variance_init": 0.7},  # inv_std = e^7
    )
    r.eval()
    rays_o, rays_d, light = camera_rays(height=16, width=16)
    with torch.no_grad():
        out = r(rays_o, rays_d, light)
    # analytic first hit of |o + t d| = radius
    o, d = rays_o[0], rays_d[0]
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius**2
    disc = b * b - c
    hit = disc > 0
    t_hit = -b - disc.clamp_min(0).sqrt()
    closest = (o + (-b)[..., None] * d).norm(dim=-1)  # distance of the ray to the centre
    clear_hit = closest < radius - 0.05
    clear_miss = closest > radius + 0.05
    assert clear_hit.sum() > 10 and clear_miss.sum() > 10
    opacity, depth = out["opacity"][0, ..., 0], out["depth"][0, ..., 0]
    assert (opacity[clear_hit] > 0.98).all()
    assert (opacity[clear_miss] < 0.02).all()
    bin_width = 2.0 * 1.0 / 128 * 2  # box chord <= 2 sqrt(3); generous one-bin tolerance
    assert (depth[clear_hit] / opacity[clear_hit] - t_hit[clear_hit]).abs().max() < bin_width
    assert hit[clear_hit].all()
    # normals point out of the sphere: at the image centre, towards the camera (+z)
    n = out["comp_normal"][0, 8, 8] * 2 - opacity[8, 8]
    assert n[2] > 0.95


def test_training_outputs_match_nerf_renderer_contract(threestudio_ts):
    """Training returns nerf-volume-renderer's per-point keys, with gradients to the geometry."""
    r = make_renderer(
        threestudio_ts,
        "implicit-volume",
        {"density_bias": "blob_magic3d", "normal_type": "analytic"},
        {"return_comp_normal": True},
    )
    for p in r.geometry.parameters():
        torch.nn.init.normal_(p, std=0.1)
    r.train()
    r.geometry.train()
    rays_o, rays_d, light = camera_rays(height=6, width=5)
    out = r(rays_o, rays_d, light)
    n_points = 6 * 5 * 64
    image_keys = {
        "comp_rgb": 3,
        "comp_rgb_fg": 3,
        "comp_rgb_bg": 3,
        "opacity": 1,
        "depth": 1,
        "z_variance": 1,
        "comp_normal": 3,  # in training only with return_comp_normal, as nerf-volume-renderer
    }
    for key, c in image_keys.items():
        assert out[key].shape == (1, 6, 5, c), key
    for key, c in {
        "weights": 1,
        "t_points": 1,
        "t_intervals": 1,
        "t_dirs": 3,
        "points": 3,
        "density": 1,
        "normal": 3,
    }.items():
        assert out[key].shape == (n_points, c), key
    assert out["ray_indices"].shape == (n_points,)
    out["comp_rgb"].sum().backward()
    grads = [p.grad for p in r.geometry.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # stratified: two training renders of the same rays differ, eval renders do not
    with torch.no_grad():
        a, b = r(rays_o, rays_d, light)["t_points"], r(rays_o, rays_d, light)["t_points"]
        assert not torch.equal(a, b)
        r.eval()
        a, b = r(rays_o, rays_d, light)["depth"], r(rays_o, rays_d, light)["depth"]
        assert torch.equal(a, b)


def test_chunked_evaluation_equals_one_pass_and_empty_rays(threestudio_ts):
    r = make_renderer(
        threestudio_ts, "implicit-volume", {"density_bias": "blob_magic3d", "normal_type": None}
    )
    for p in r.geometry.parameters():
        torch.nn.init.normal_(p, std=0.1)
    r.eval()
    rays_o, rays_d, light = camera_rays(height=8, width=8)
    with torch.no_grad():
        whole = r(rays_o, rays_d, light)
        r.cfg.eval_chunk_size = 97  # not a divisor of anything
        chunked = r(rays_o, rays_d, light)
    for key in ("comp_rgb", "opacity", "depth"):
        torch.testing.assert_close(whole[key], chunked[key])
    # rays that miss the bounding box render nothing: opacity 0, depth 0, pure background
    away = rays_d.clone()
    away[..., 2] = -away[..., 2]  # pointing away from the box, from outside it
    with torch.no_grad():
        empty = r(rays_o, away, light)
    assert empty["opacity"].abs().max() == 0 and empty["depth"].abs().max() == 0
    torch.testing.assert_close(empty["comp_rgb"], torch.ones_like(empty["comp_rgb"]))
