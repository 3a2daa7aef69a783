"""Tests of threestudio_ssd.baselines: helpers (Pearson, alignment, normals), RenderOutputs, the
depth/normal/constant baselines, and -- the property SSD rests on -- zero mean of the Stein control
variate ``h = eps * phi - sigma * grad phi`` with the real depth baseline, through a pixel path and
through a VAE decode, each shown to flag a biased variant.

Statistical checks: Hotelling's T^2 on K fixed projections of ``h`` at family-wise level 1e-4;
every check is also run on a deliberately wrong ``h`` that must be flagged.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lcss_prior.data.shapes import ShapesDataset
from threestudio_ssd.baselines import (
    Baseline,
    BaselineOutput,
    RenderOutputs,
    build_baseline,
    depth_to_disparity,
    depth_to_normals,
    masked_pearson,
    register_baseline,
    registered_baselines,
    scale_shift_align,
    world_to_camera_normals,
)
from threestudio_ssd.depth import DepthEstimator
from threestudio_ssd.depth.estimator import Preprocessing
from threestudio_ssd.stein import baseline_value_and_grad
from threestudio_ssd.testing import check_zero_mean, tiny_sd_vae_config

FALSE_ALARM = 1e-4


@pytest.fixture(scope="module")
def views() -> dict:
    """Eight exact 32 px shapes renders (spheres and cubes, 4 colours)."""
    ds = ShapesDataset(size=8, resolution=32, seed=0, supersample=1)
    items = [ds[i] for i in range(8)]
    out = {
        k: torch.stack([it[k] for it in items]) for k in ("image", "depth", "mask", "normal", "c2w", "fovy")
    }
    out["captions"] = [it["caption"] for it in items]
    return out


def render_of(views, idx=slice(None)) -> RenderOutputs:
    return RenderOutputs(
        depth=views["depth"][idx],
        opacity=views["mask"][idx].float(),
        normal=views["normal"][idx],
        c2w=views["c2w"][idx],
        fovy_deg=views["fovy"][idx],
    )


class _Oracle(nn.Module):
    """A stand-in network whose 'prediction' is a fixed map (plus a path to the input, so that
    gradients exist): lets the tests set the estimate exactly."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.register_buffer("maps", maps)
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values):
        return SimpleNamespace(predicted_depth=self.maps + self.w * pixel_values.mean(1))


def oracle(maps: torch.Tensor, kind: str = "relative_inverse_depth") -> DepthEstimator:
    h, w = maps.shape[-2:]
    pre = Preprocessing((0.5,) * 3, (0.5,) * 3, (h, w), False, 1, "bilinear")
    return DepthEstimator(_Oracle(maps), pre, kind)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def test_masked_pearson_matches_numpy_and_is_affine_invariant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, 7, generator=g), torch.randn(3, 9, 7, generator=g)
    b = b + 0.8 * a
    mask = torch.rand(3, 9, 7, generator=g) > 0.4
    r, valid = masked_pearson(a, b, mask)
    assert valid.all()
    for i in range(3):
        ref = np.corrcoef(a[i][mask[i]].numpy(), b[i][mask[i]].numpy())[0, 1]
        assert abs(r[i].item() - ref) < 1e-5
    torch.testing.assert_close(masked_pearson(3 * a + 2, 0.1 * b - 5, mask)[0], r, atol=1e-5, rtol=0)
    torch.testing.assert_close(masked_pearson(-a, b, mask)[0], -r, atol=1e-6, rtol=0)


def test_masked_pearson_invalid_cases_are_finite_with_zero_gradient():
    a = torch.randn(3, 8, 8, requires_grad=True)
    b = torch.randn(3, 8, 8)
    mask = torch.ones(3, 8, 8, dtype=torch.bool)
    mask[0] = False  # empty mask
    b[1] = 2.0  # constant target
    mask[2, 1:] = False  # 8 pixels < min_pixels=16
    r, valid = masked_pearson(a, b, mask)
    assert not valid.any() and torch.isfinite(r).all()
    r.sum().backward()
    assert torch.isfinite(a.grad).all() and (a.grad == 0).all()


def test_scale_shift_align_recovers_the_affine_map():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(2, 6, 6, generator=g) + 0.5
    mask = torch.rand(2, 6, 6, generator=g) > 0.3
    pred = (target - 0.3) / 4.0
    pred_out = pred.clone()
    pred_out[~mask] = 50.0  # outside the mask: ignored by the fit
    torch.testing.assert_close(scale_shift_align(pred_out, target, mask)[mask], target[mask])
    noisy = pred + 0.05 * torch.randn(2, 6, 6, generator=g)
    aligned = scale_shift_align(noisy, target, mask)
    for i in range(2):  # ordinary least squares, as numpy.polyfit
        s, c = np.polyfit(noisy[i][mask[i]].numpy(), target[i][mask[i]].numpy(), 1)
        np.testing.assert_allclose(aligned[i].numpy(), s * noisy[i].numpy() + c, rtol=1e-4, atol=1e-4)


def test_depth_to_normals_plane_facing_and_tilted():
    h = w = 24
    for fovy in (30.0, 60.0):
        from threestudio_ssd.baselines import ray_directions

        dirs = ray_directions(h, w, torch.tensor([fovy]))  # unit rays
        # Plane z = -2 (facing the camera): ray distance t = 2 / (-d_z).
        n, valid = depth_to_normals(2.0 / (-dirs[..., 2]), torch.tensor([fovy]))
        assert valid[0, 1:-1, 1:-1].all() and not valid[0, 0].any()
        torch.testing.assert_close(
            n[valid], torch.tensor([0.0, 0.0, 1.0]).expand_as(n[valid]), atol=1e-4, rtol=0
        )
        # Tilted plane n . p = -2 with n = normalize(0.3, -0.2, 1): t = -2 / (n . d).
        normal = torch.nn.functional.normalize(torch.tensor([0.3, -0.2, 1.0]), dim=0)
        n, valid = depth_to_normals(-2.0 / (dirs @ normal), torch.tensor([fovy]))
        torch.testing.assert_close(n[valid], normal.expand_as(n[valid]), atol=1e-4, rtol=0)


def test_normals_from_rendered_depth_match_rendered_normals_in_camera_space(views):
    """The conventions (rays, fovy, c2w rotation) agree with the shapes renderer's exact normals;
    skipping the world-to-camera rotation is flagged."""
    n_est, valid = depth_to_normals(views["depth"], views["fovy"], views["mask"])
    n_cam = world_to_camera_normals(views["normal"], views["c2w"])
    cos = (n_est * n_cam).sum(-1)[valid]
    assert cos.median() > 0.995 and cos.mean() > 0.95
    wrong = (n_est * views["normal"]).sum(-1)[valid]  # world-space normals, not rotated
    assert wrong.mean() < 0.8


def test_depth_to_disparity():
    depth = torch.tensor([[[2.0, 0.0], [0.5, 4.0]]])
    torch.testing.assert_close(depth_to_disparity(depth), torch.tensor([[[0.5, 0.0], [2.0, 0.25]]]))
    mask = torch.tensor([[[True, True], [False, True]]])
    torch.testing.assert_close(depth_to_disparity(depth, mask), torch.tensor([[[0.5, 0.0], [0.0, 0.25]]]))


# ----------------------------------------------------------------------------------------------
# RenderOutputs
# ----------------------------------------------------------------------------------------------


def test_resized_does_not_invent_near_surfaces_at_silhouettes(views):
    r = render_of(views)
    small = r.resized(16, 16)
    assert small.resolution == (16, 16) and small.batch_size == 8
    hit = small.depth > 0
    # Premultiplied resampling: silhouette depths stay within the object's true depth range.
    lo = torch.stack([d[d > 0].min() for d in r.depth])
    assert (small.depth >= lo[:, None, None] - 1e-4)[hit].all()
    torch.testing.assert_close(small.normal[hit].norm(dim=-1), torch.ones(int(hit.sum())))
    # Naive bilinear resizing of depth averages in the zeros of empty rays: the trap this avoids.
    naive = torch.nn.functional.interpolate(r.depth[:, None], size=(16, 16), mode="bilinear", antialias=True)[
        :, 0
    ]
    assert ((naive < lo[:, None, None] - 1e-2) & (naive > 0)).any()


def test_from_threestudio_decodes_the_renderer_conventions(views):
    r = render_of(views)
    opacity = r.opacity.clone()
    opacity[:, ::3] *= 0.6  # partial opacity somewhere
    out = {
        "depth": (r.depth * opacity)[..., None],  # volume renderer: sum_i w_i t_i
        "opacity": opacity[..., None],
        "comp_normal": (r.normal + 1.0) / 2.0 * opacity[..., None],  # threestudio's encoding
    }
    batch = {"c2w": r.c2w, "fovy": torch.deg2rad(r.fovy_deg)}
    back = RenderOutputs.from_threestudio(out, batch)
    hit = views["mask"]
    torch.testing.assert_close(back.depth[hit], r.depth[hit])
    torch.testing.assert_close(back.normal[hit], r.normal[hit], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.fovy_deg, r.fovy_deg)
    with pytest.raises(KeyError, match="depth"):
        RenderOutputs.from_threestudio({"comp_rgb": out["opacity"]}, batch)


def test_render_outputs_validate_shapes():
    with pytest.raises(ValueError, match="opacity"):
        RenderOutputs(depth=torch.ones(2, 4, 4), opacity=torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match="normal"):
        RenderOutputs(depth=torch.ones(2, 4, 4), opacity=torch.ones(2, 4, 4), normal=torch.ones(2, 4, 4))


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------


def test_depth_baseline_sign_and_invariance(views):
    render = render_of(views)
    image = (views["image"] + 1) / 2
    disparity = depth_to_disparity(render.depth)
    for mode in ("object", "scene"):
        # Estimate == rendered disparity (any positive scale, any shift): phi = 0.
        out = build_baseline("depth", estimator=oracle(3.0 * disparity + 0.2), mode=mode)(image, render)
        assert out.valid.all()
        torch.testing.assert_close(out.phi, torch.zeros(8), atol=1e-5, rtol=0)
    # The sign trap: an "estimate" equal to rendered depth anti-correlates with disparity: phi > 1.
    trap = build_baseline("depth", estimator=oracle(render.depth.clone()))(image, render)
    assert (trap.phi > 1.9).all()
    # A metric-depth estimator is converted to disparity first: its true depth gives phi = 0.
    metric = build_baseline("depth", estimator=oracle(render.depth.clone(), "metric_depth"))(image, render)
    torch.testing.assert_close(metric.phi, torch.zeros(8), atol=1e-5, rtol=0)
    # Invariance to positive scale and shift of either side, for an arbitrary estimate.
    g = torch.Generator().manual_seed(2)
    est = disparity + 0.3 * torch.rand(disparity.shape, generator=g)
    phi = build_baseline("depth", estimator=oracle(est))(image, render).phi
    assert (phi > 0.01).all()
    phi2 = build_baseline("depth", estimator=oracle(7 * est - 1))(image, render).phi
    scaled = RenderOutputs(depth=render.depth / 3.0, opacity=render.opacity)  # disparity x 3
    phi3 = build_baseline("depth", estimator=oracle(est))(image, scaled).phi
    torch.testing.assert_close(phi2, phi, atol=1e-5, rtol=0)
    torch.testing.assert_close(phi3, phi, atol=1e-5, rtol=0)


def test_depth_baseline_empty_mask_is_invalid_and_falls_back(views):
    render = render_of(views, slice(0, 2))
    empty = RenderOutputs(
        depth=render.depth, opacity=render.opacity * torch.tensor([0.0, 1.0])[:, None, None]
    )
    image = ((views["image"][:2] + 1) / 2).requires_grad_(True)
    est = oracle(depth_to_disparity(render.depth))
    est.model.w.data.fill_(0.1)  # a real dependence on the image
    out = build_baseline("depth", estimator=est)(image, empty)
    assert out.valid.tolist() == [False, True]
    assert out.phi[0] == 1.0 and torch.isfinite(out.phi).all()
    out.phi.sum().backward()
    assert (image.grad[0] == 0).all() and image.grad[1].abs().sum() > 0


def test_mismatched_render_and_image_is_one_clear_error(views):
    render = render_of(views)
    base = build_baseline("depth", estimator=oracle(torch.zeros(8, 32, 32)))
    with pytest.raises(ValueError, match=r"render outputs are .*H=32.*image is .*H=16.*resized\(16, 16\)"):
        base(torch.rand(8, 3, 16, 16), render)
    with pytest.raises(ValueError, match=r"B=8.*B=4"):
        base(torch.rand(4, 3, 32, 32), render)
    # The fix the message names works.
    assert base(torch.rand(8, 3, 16, 16), render.resized(16, 16)).phi.shape == (8,)


def test_rendered_quantities_are_constants_inside_phi(views):
    depth = views["depth"][:2].clone().requires_grad_(True)
    render = RenderOutputs(depth=depth, opacity=views["mask"][:2].float())
    image = torch.rand(2, 3, 32, 32, requires_grad=True)
    est = oracle(torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0)))
    est.model.w.data.fill_(1.0)
    out = build_baseline("depth", estimator=est)(image, render)
    out.phi.sum().backward()
    assert depth.grad is None and image.grad.abs().sum() > 0


def test_normal_baseline(views):
    render = render_of(views)
    image = (views["image"] + 1) / 2
    disparity = depth_to_disparity(render.depth)
    # The rendered geometry itself (as relative disparity, or as metric depth) agrees: phi ~ 0, up to
    # finite differences across cube edges at 32 px.
    good = build_baseline("normal", estimator=oracle(5 * disparity + 1))(image, render)
    assert good.valid.all() and (good.phi < 0.08).all()
    spheres = [i for i, c in enumerate(views["captions"]) if "sphere" in c]
    assert (good.phi[spheres] < 1e-3).all()
    metric = build_baseline("normal", estimator=oracle(render.depth.clone(), "metric_depth"))(image, render)
    torch.testing.assert_close(metric.phi, good.phi, atol=2e-3, rtol=0)
    # A wrong geometry (the previous view's disparity) disagrees.
    bad = build_baseline("normal", estimator=oracle(disparity.roll(1, 0)))(image, render)
    assert bad.phi.mean() > 5 * good.phi.mean() and bad.phi.mean() > 0.1
    with pytest.raises(ValueError, match="c2w"):
        build_baseline("normal", estimator=oracle(disparity))(
            image, RenderOutputs(render.depth, render.opacity)
        )


def test_constant_baseline_and_registry():
    image = torch.rand(3, 3, 8, 8)
    render = RenderOutputs(depth=torch.ones(3, 8, 8), opacity=torch.ones(3, 8, 8))
    phi, grad = baseline_value_and_grad(lambda x: build_baseline("constant")(x, render).phi, image)
    torch.testing.assert_close(phi, torch.ones(3))
    assert (grad == 0).all()
    assert {"constant", "depth", "normal"} <= set(registered_baselines())
    with pytest.raises(ValueError, match=r"Unknown baseline 'midas'.*'constant', 'depth', 'normal'"):
        build_baseline("midas")

    @register_baseline("test-half")
    class Half(Baseline):
        def evaluate(self, image, render):
            phi = 0.5 + 0 * image.mean((1, 2, 3))
            return BaselineOutput(phi, torch.ones_like(phi, dtype=torch.bool))

    assert build_baseline("test-half")(image, render).phi.tolist() == [0.5] * 3
    with pytest.raises(ValueError, match="already registered"):
        register_baseline("test-half")(type("Other", (Half,), {}))


# ----------------------------------------------------------------------------------------------
# Zero mean of the Stein control variate with the real depth baseline
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_net():
    from threestudio_ssd.depth.train import build_model

    return build_model(32, hidden_size=32, layers=4, heads=2, patch_size=8, seed=0)  # a random tiny DPT with healthy output scale


def test_stein_control_variate_zero_mean_pixel_path(views, depth_net):
    """Pixel prior: the estimator sees ``(x_t + 1) / 2`` -- a smooth map, not a clamp (a clamp would
    zero the gradient where it saturates; it is fine only because phi and grad phi would use the
    same clamped function, but it wastes the signal)."""
    render = render_of(views, slice(4, 5))  # a cube
    base = build_baseline("depth", estimator=depth_net)

    def phi_fn(x):
        return base((x + 1) / 2, render.expand(x.shape[0])).phi

    p = check_zero_mean(phi_fn, views["image"][4:5], sigma=0.3, n=192)
    assert p["correct"] > FALSE_ALARM, p
    assert p["paper_sign"] < FALSE_ALARM and p["stop_gradient"] < FALSE_ALARM, p


def test_normal_baseline_is_continuous_where_the_estimate_changes_sign(views):
    """Moving one object pixel of the estimated depth from just above to just below zero must move
    phi by next to nothing. The baseline used to drop the pixel and its neighbours from the average
    the moment the estimate left the positive range: a jump of ~1/N per pixel (0.015 here) that
    grad phi never sees, i.e. a biased Stein control variate. (A metric estimate, so that the value
    the baseline inverts is set directly; a relative one goes through the same fade-out after the
    alignment.)"""
    render = render_of(views, slice(4, 5))
    image = (views["image"][4:5] + 1) / 2
    on = torch.nonzero(render.opacity[0] > 0.5)
    i, j = on[len(on) // 2].tolist()  # a pixel inside the object
    phis = []
    for value in (1e-5, -1e-5):
        est_map = render.depth.clone()
        est_map[0, i, j] = value
        phis.append(build_baseline("normal", estimator=oracle(est_map, "metric_depth"))(image, render).phi)
    assert abs(float(phis[0] - phis[1])) < 1e-4, phis


@pytest.mark.parametrize("sigma", [0.3, 1.5])
def test_stein_control_variate_zero_mean_normal_baseline(views, depth_net, sigma):
    """The normal baseline on noisy images, up to large ``t`` (sigma 1.5 on images in [-1, 1]),
    where the aligned disparity of a random estimator often collapses below zero: phi must stay
    continuous for Stein's identity to hold (its pixel set comes from the render, collapsed pixels
    fade out continuously)."""
    render = render_of(views, slice(4, 5))
    base = build_baseline("normal", estimator=depth_net)

    def phi_fn(x):
        return base((x + 1) / 2, render.expand(x.shape[0])).phi

    p = check_zero_mean(phi_fn, views["image"][4:5], sigma=sigma, n=192)
    assert p["correct"] > FALSE_ALARM, p
    assert p["paper_sign"] < FALSE_ALARM and p["stop_gradient"] < FALSE_ALARM, p


def test_stein_control_variate_zero_mean_latent_path(views, depth_net):
    """Latent prior: ``x_t`` is a VAE latent; phi decodes it, then estimates depth; the gradient
    flows through decoder and estimator."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny_sd_vae_config(32, block_out_channels=(8, 16), norm_num_groups=4)).eval()
    vae.requires_grad_(False)
    render = render_of(views, slice(4, 5))
    base = build_baseline("depth", estimator=depth_net)
    with torch.no_grad():
        z0 = vae.encode(views["image"][4:5]).latent_dist.mean  # [1, 4, 16, 16]

    def phi_fn(z):
        return base((vae.decode(z).sample + 1) / 2, render.expand(z.shape[0])).phi

    p = check_zero_mean(phi_fn, z0, sigma=0.3, n=192)
    assert p["correct"] > FALSE_ALARM, p
    assert p["paper_sign"] < FALSE_ALARM and p["stop_gradient"] < FALSE_ALARM, p
