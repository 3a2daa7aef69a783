"""ScoreDistillation wiring: SDS/SSD identities, gradients, what is (not) state, mu updates,
fallbacks, variance estimates, and the unbiasedness of the full latent SSD pipeline (tiny SD + tiny
DPT depth baseline through the VAE decoder). The statistical properties of the estimator itself
are tested in test_stein.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from threestudio_ssd.baselines import Baseline, RenderOutputs, build_baseline
from threestudio_ssd.depth import load_depth_estimator
from threestudio_ssd.distillation import DistillationConfig, ScoreDistillation
from threestudio_ssd.score_models import LCSSPriorScoreModel, StableDiffusionScoreModel
from threestudio_ssd.testing import (
    TINY_SD_TEXT_DIM,
    StopGradient,
    make_tiny_depth_estimator,
    make_tiny_prior,
    make_tiny_stable_diffusion,
)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    path = make_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))
    return StableDiffusionScoreModel(path, latent_sampling="mean")


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return LCSSPriorScoreModel(make_tiny_prior(tmp_path_factory.mktemp("prior") / "p"))


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    estimator = load_depth_estimator(make_tiny_depth_estimator(tmp_path_factory.mktemp("dpt")))
    return build_baseline("depth", estimator=estimator)


def disk_render(size: int, batch: int = 1, empty: bool = False) -> RenderOutputs:
    """A sphere-like object: opacity 1 on a disk, depth 3 - sqrt(1 - r^2) there, 0 outside."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = xx**2 + yy**2
    inside = (r2 < 0.7) & (not empty)
    depth = torch.where(inside, 3 - torch.sqrt((1 - r2).clamp_min(0)), torch.zeros_like(r2))
    return RenderOutputs(depth=depth.expand(batch, -1, -1), opacity=inside.float().expand(batch, -1, -1))


def sd_cond(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(batch, 5, TINY_SD_TEXT_DIM, generator=g)
    u = torch.randn(batch, 5, TINY_SD_TEXT_DIM, generator=g)
    return torch.cat([c, u])


def rand_rgb(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


LABELS = torch.tensor([0, 1])


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_config_errors_name_the_bad_key(prior, depth):
    with pytest.raises(ValueError, match="DistillationConfig.estimator.*'vds'"):
        DistillationConfig(estimator="vds")
    with pytest.raises(ValueError, match="DistillationConfig.vsd_camera_dropout"):
        DistillationConfig(estimator="vsd", vsd_camera_dropout=1.5)
    with pytest.raises(ValueError, match="estimator='vsd' uses no baselines"):
        ScoreDistillation(prior, [depth], estimator="vsd")
    with pytest.raises(ValueError, match=r"estimator='vsd' needs the cameras: pass c2w"):
        ScoreDistillation(prior, estimator="vsd")(rand_rgb(2, 8), LABELS)
    with pytest.raises(ValueError, match=r"c2w must be \[B=2, 4, 4\]"):
        ScoreDistillation(prior, estimator="vsd")(rand_rgb(2, 8), LABELS, c2w=torch.eye(4).expand(3, 4, 4))
    with pytest.raises(ValueError, match=r"unknown DistillationConfig keys \['mu_sahpe'\]"):
        ScoreDistillation(prior, [depth], {"mu_sahpe": "scalar"})
    with pytest.raises(ValueError, match="estimator='sds' uses no baselines"):
        ScoreDistillation(prior, [depth], estimator="sds")
    with pytest.raises(ValueError, match="constant baseline is already included"):
        ScoreDistillation(prior, [build_baseline("constant"), depth])
    with pytest.raises(ValueError, match="needs at least one baseline"):
        ScoreDistillation(prior, [], include_constant=False)
    with pytest.raises(ValueError, match="needs the render outputs"):
        ScoreDistillation(prior, [depth])(rand_rgb(2, 8), LABELS, None)
    with pytest.raises(ValueError, match="t_range"):
        ScoreDistillation(prior, estimator="sds")(rand_rgb(2, 8), LABELS, t_range=(0.5, 0.2))


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------


def test_sds_is_exactly_w_times_eps_hat_minus_eps(sd):
    dist = ScoreDistillation(sd, estimator="sds", guidance_scale=5.0)
    rgb, cond = rand_rgb(2, 16), sd_cond(2)
    out = dist(rgb, cond, t_range=(0.1, 0.9), generator=gen(3))
    # the same draws, by hand: t first, then eps, from the same generator
    g = gen(3)
    t = 0.1 + 0.8 * torch.rand(2, generator=g)
    x0 = sd.encode(rgb)
    eps = torch.randn(x0.shape, generator=g)
    x_t = sd.alpha(t).view(-1, 1, 1, 1) * x0 + sd.sigma(t).view(-1, 1, 1, 1) * eps
    expected = sd.weight(t).view(-1, 1, 1, 1) * (sd.eps(x_t, t, cond, 5.0) - eps)
    torch.testing.assert_close(out.t, t, rtol=0, atol=0)
    torch.testing.assert_close(out.grad, expected, rtol=0, atol=0)
    assert out.loss_mu is None and dist.mu is None
    assert out.stats["var_proxy_ratio"] == 1.0 and out.stats["n_fallback"] == 0.0
    # another generator gives another estimate (the comparison above is not vacuous)
    assert not torch.equal(dist(rgb, cond, t_range=(0.1, 0.9), generator=gen(4)).grad, expected)


def test_ssd_with_initial_weights_is_sds_then_moves_away(prior, depth):
    render = disk_render(8, 2)
    rgb = rand_rgb(2, 8)
    sds = ScoreDistillation(prior, estimator="sds", guidance_scale=2.0)
    ssd = ScoreDistillation(prior, [depth], guidance_scale=2.0, mu_mode="optimal")
    ref = sds(rgb, LABELS, generator=gen(5))
    out = ssd(rgb, LABELS, render, generator=gen(5))  # mu = [1, 0] (init) is used, then refit
    torch.testing.assert_close(out.grad, ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    assert out.stats["n_fallback"] == 0.0 and math.isfinite(out.stats["phi_mean/depth"])
    assert out.stats["depth_corr"] == pytest.approx(1.0 - out.stats["phi_mean/depth"])
    assert out.stats["mu/mu1_mean"] != 0.0  # the update moved the depth weight
    # variance proxy: after one step the bias-corrected EMAs are that step's second moments
    assert out.stats["grad_sq"] == out.stats["grad_sq_sds"] > 0
    assert out.stats["var_proxy_diff"] == pytest.approx(0.0, abs=1e-9) and out.stats["var_proxy_ratio"] == 1.0
    # with the refit weights the same draws give a different gradient
    again = ssd(rgb, LABELS, render, generator=gen(5))
    assert (again.grad - ref.grad).abs().max() > 1e-6
    d = 0.98  # stats_ema: bias-corrected EMA over the two steps
    ema = (d * (1 - d) * out.stats["grad_sq"] + (1 - d) * again.stats["grad_sq"]) / (1 - d**2)
    ema_sds = (d * (1 - d) * out.stats["grad_sq_sds"] + (1 - d) * again.stats["grad_sq_sds"]) / (1 - d**2)
    assert again.stats["var_proxy_ratio"] == pytest.approx(ema / ema_sds, rel=1e-9)
    frozen = ssd(rgb, LABELS, render, generator=gen(6), update_mu=False)  # evaluation: no EMA step
    assert frozen.stats["var_proxy_ratio"] == pytest.approx(again.stats["var_proxy_ratio"], rel=1e-12)


def test_loss_gradient_is_grad_over_batch_through_the_encoder(sd):
    dist = ScoreDistillation(sd, estimator="sds", guidance_scale=5.0)
    rgb = rand_rgb(2, 24).requires_grad_(True)
    out = dist(rgb, sd_cond(2), generator=gen(6))
    assert out.loss.item() == pytest.approx(0.5 * out.grad.pow(2).sum().item() / 2, rel=1e-5)
    out.loss.backward()
    # d loss / d x0 = grad / B, so d loss / d rgb = J_encode^T (grad / B)
    x0 = sd.encode(rgb)
    (expected,) = torch.autograd.grad(x0, rgb, grad_outputs=out.grad / 2)
    torch.testing.assert_close(rgb.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert rgb.grad.abs().sum() > 0
    # a mean-reduced loss (a common slip) would scale the gradient by 1 / numel
    assert not torch.allclose(rgb.grad, expected / x0[0].numel())


def test_grad_clip_and_nan_to_num(prior):
    class NaNPrior(LCSSPriorScoreModel):
        def eps(self, x_t, t, cond, guidance_scale):
            out = super().eps(x_t, t, cond, guidance_scale).clone()
            out[0, 0, 0, 0] = float("nan")
            return out

    plain = ScoreDistillation(prior, estimator="sds")(rand_rgb(2, 8), LABELS, generator=gen(7))
    clipped = ScoreDistillation(prior, estimator="sds", grad_clip=0.05)(
        rand_rgb(2, 8), LABELS, generator=gen(7)
    )
    torch.testing.assert_close(clipped.grad, plain.grad.clamp(-0.05, 0.05), rtol=0, atol=0)
    assert plain.grad.abs().max() > 0.05
    nan_model = NaNPrior(prior.prior)
    out = ScoreDistillation(nan_model, estimator="sds")(rand_rgb(2, 8), LABELS, generator=gen(7))
    assert torch.isfinite(out.grad).all() and torch.isfinite(out.loss)
    assert out.grad[0, 0, 0, 0] == 0.0
    torch.testing.assert_close(out.grad.flatten()[1:], plain.grad.flatten()[1:], rtol=0, atol=0)


def test_rgb_as_latents_matches_encoded_input(prior):
    dist = ScoreDistillation(prior, estimator="sds")
    rgb = rand_rgb(2, 8)
    a = dist(rgb, LABELS, generator=gen(8))
    b = dist(prior.encode(rgb), LABELS, generator=gen(8), rgb_as_latents=True)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rgb_as_latents expects x0 of shape \[B, 3, h, w\]"):
        dist(torch.zeros(2, 4, 8, 8), LABELS, rgb_as_latents=True)


# ---------------------------------------------------------------------------------------------
# state: what trains and what does not
# ---------------------------------------------------------------------------------------------


def test_frozen_models_are_not_state_or_parameters(sd, depth):
    dist = ScoreDistillation(sd, [depth], mu_mode="learned", mu_shape="channel")
    keys = list(dist.state_dict())
    assert keys == ["mu.mu"]
    params = list(dist.parameters())
    assert len(params) == 1 and params[0] is dist.mu.mu and params[0].shape == (1, 2, 4)
    assert [name for name, _ in dist.named_modules()] == ["", "mu"]
    optimal = ScoreDistillation(sd, [depth], mu_mode="optimal")
    assert list(optimal.parameters()) == []
    assert all(k.startswith("mu.") for k in optimal.state_dict())
    assert dist.score_model is sd and dist.baselines == (depth,)

    # the counterexample: holding the score model as a plain Module attribute leaks its weights
    class Naive(nn.Module):
        def __init__(self):
            super().__init__()
            self.score_model = sd

    assert any(k.startswith("score_model.unet.") for k in Naive().state_dict())


def test_learned_mu_gets_gradient_only_from_loss_mu(prior, depth):
    dist = ScoreDistillation(prior, [depth], mu_mode="learned", mu_shape="scalar", mu_t_bins=4)
    rgb = rand_rgb(2, 8).requires_grad_(True)
    out = dist(rgb, LABELS, disk_render(8, 2), generator=gen(9))
    assert out.loss_mu is not None and out.loss_mu.requires_grad
    out.loss.backward(retain_graph=True)
    assert dist.mu.mu.grad is None and rgb.grad is not None
    rgb_grad = rgb.grad.clone()
    out.loss_mu.backward()
    assert dist.mu.mu.grad is not None
    bins = torch.div(out.t * 4, 1, rounding_mode="floor").long().clamp_max(3)
    touched = dist.mu.mu.grad.abs().sum(dim=(1, 2)) > 0
    assert touched.tolist() == [i in bins.tolist() for i in range(4)]  # only the bins of this step's t
    torch.testing.assert_close(rgb.grad, rgb_grad, rtol=0, atol=0)  # loss_mu does not reach the render
    # update_mu=False (evaluation) gives no loss_mu
    assert dist(rgb, LABELS, disk_render(8, 2), generator=gen(9), update_mu=False).loss_mu is None


def test_optimal_mu_changes_only_after_update(prior, depth):
    dist = ScoreDistillation(prior, [depth], mu_mode="optimal", mu_shape="channel")
    render = disk_render(8, 2)
    before = {k: v.clone() for k, v in dist.state_dict().items()}
    dist(rand_rgb(2, 8), LABELS, render, generator=gen(10), update_mu=False)
    dist.estimate_variance(rand_rgb(1, 8), LABELS[:1], disk_render(8), n_draws=4, generator=gen(11))
    for k, v in dist.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    dist(rand_rgb(2, 8), LABELS, render, generator=gen(10))
    assert not torch.equal(dist.mu.mu_opt, before["mu.mu_opt"])
    assert dist.mu.statistics()["bins_updated"] == 1.0


def test_invalid_baseline_falls_back_and_is_counted(prior, depth):
    dist = ScoreDistillation(prior, [depth, build_baseline("normal", estimator=depth.estimator)])

    def with_camera(render: RenderOutputs) -> RenderOutputs:  # zero normals: 'normal' is never valid
        return RenderOutputs(
            depth=render.depth,
            opacity=render.opacity,
            normal=torch.zeros(2, 8, 8, 3),
            c2w=torch.eye(4).expand(2, 4, 4),
            fovy_deg=torch.tensor(40.0),
        )

    # an empty foreground: every sample of both baselines falls back to the constant control variate
    out = dist(rand_rgb(2, 8), LABELS, with_camera(disk_render(8, 2, empty=True)), generator=gen(12))
    assert out.stats["n_fallback"] == 4.0
    assert out.stats["valid_frac/depth"] == 0.0 and out.stats["valid_frac/normal"] == 0.0
    assert math.isnan(out.stats["phi_mean/depth"])
    sds = ScoreDistillation(prior, estimator="sds")(rand_rgb(2, 8), LABELS, generator=gen(12))
    torch.testing.assert_close(out.grad, sds.grad, rtol=0, atol=0)  # mu = [1, 0, 0]
    # a visible object: depth is valid, the normal baseline (no normals) still falls back, per sample
    mixed = dist(rand_rgb(2, 8), LABELS, with_camera(disk_render(8, 2)), generator=gen(12), update_mu=False)
    assert mixed.stats["valid_frac/depth"] == 1.0 and mixed.stats["valid_frac/normal"] == 0.0
    assert mixed.stats["n_fallback"] == 2.0


def test_resize_render_policies(prior, depth):
    big = disk_render(32, 2)
    to_image = ScoreDistillation(prior, [depth], resize_render="image")(
        rand_rgb(2, 8), LABELS, big, generator=gen(13)
    )
    to_render = ScoreDistillation(prior, [depth], resize_render="render")(
        rand_rgb(2, 8), LABELS, big, generator=gen(13)
    )
    for out in (to_image, to_render):
        assert out.stats["n_fallback"] == 0.0 and math.isfinite(out.stats["phi_mean/depth"])
    assert to_image.stats["phi_mean/depth"] != to_render.stats["phi_mean/depth"]


# ---------------------------------------------------------------------------------------------
# variance
# ---------------------------------------------------------------------------------------------


def test_estimate_variance_pixel_prior(prior, depth):
    rgb, render = rand_rgb(1, 8), disk_render(8)
    dist = ScoreDistillation(prior, [depth], mu_init=[0.5, 2.0])
    est = dist.estimate_variance(rgb, LABELS[:1], render, n_draws=11, generator=gen(14), batch_size=4)
    assert est.ssd.shape == est.sds.shape == (11, 3, 8, 8) and est.t.shape == (11,)
    assert math.isfinite(est.var_ssd) and math.isfinite(est.var_sds) and est.var_sds > 0
    assert est.ratio == pytest.approx(est.var_ssd / est.var_sds)
    assert est.n_fallback == 0 and not torch.equal(est.ssd, est.sds)
    # the same draws are reproducible and do not depend on the chunking
    again = dist.estimate_variance(rgb, LABELS[:1], render, n_draws=11, generator=gen(14), batch_size=11)
    torch.testing.assert_close(again.sds, est.sds, rtol=1e-4, atol=1e-5 * est.sds.abs().max().item())
    fixed = dist.estimate_variance(rgb, LABELS[:1], render, n_draws=3, t=0.4, generator=gen(14))
    assert torch.all(fixed.t == 0.4)
    sds_only = ScoreDistillation(prior, estimator="sds").estimate_variance(
        rgb, LABELS[:1], n_draws=5, generator=gen(15)
    )
    assert torch.equal(sds_only.ssd, sds_only.sds) and sds_only.ratio == 1.0
    with pytest.raises(ValueError, match="one render"):
        dist.estimate_variance(rand_rgb(2, 8), LABELS, disk_render(8, 2), n_draws=4)


def test_ssd_mean_equals_sds_mean_on_the_latent_pipeline(sd, depth):
    """At one render and ``t``: SSD (tiny SD, VAE decode, tiny DPT, Pearson depth baseline) and SDS
    on the same draws differ by ``D = -w (mu_0 - 1) eps - w mu_1 h_1``, which must have zero mean.

    ``mu_0 = 1 - c`` with ``c`` ~ the mean of ``phi`` cancels most of ``eps * phi`` (still a zero-mean
    combination), so the gradient term ``sigma grad phi`` is measurable. The test statistic is the
    t-statistic of ``v . D`` over independent draws, ``v`` a fixed direction from a separate pilot
    run: ``v = mean(SSD - SSD_stop-gradient) = w sigma mean(grad phi)`` (the direction in which a
    lost gradient would bias SSD). Under a zero mean it is ~N(0, 1); the stop-gradient baseline,
    whose control variate has mean ``sigma E[grad phi]``, must be flagged by the same statistic.
    Measured: z of the correct pipeline ~N(0, 1) over six generators; stop-gradient z ~ -5 at 128
    draws (it grows like sqrt(draws)).
    """
    rgb, render, cond, t = rand_rgb(1, 16), disk_render(16), sd_cond(1), 0.3
    probe = ScoreDistillation(sd, [depth], guidance_scale=3.0)
    c = probe(rgb, cond, render, t_range=(t, t), generator=gen(20), update_mu=False).stats["phi_mean/depth"]
    wrong_baseline = StopGradient(depth)

    def draws(baseline: Baseline, seed: int, n_draws: int) -> torch.Tensor:
        dist = ScoreDistillation(sd, [baseline], guidance_scale=3.0, mu_init=[1.0 - c, 1.0])
        est = dist.estimate_variance(
            rgb, cond, render, n_draws=n_draws, t=t, generator=gen(seed), batch_size=64
        )
        assert est.n_fallback == 0
        return est

    pilot_ok, pilot_wrong = draws(depth, 30, 64), draws(wrong_baseline, 30, 64)
    v = (pilot_ok.ssd - pilot_wrong.ssd).mean(0).flatten().double()
    assert v.norm() > 0

    def z_score(baseline: Baseline) -> float:
        est = draws(baseline, 31, 192)
        s = (est.ssd - est.sds).flatten(1).double() @ v
        return (s.mean() / (s.std() / math.sqrt(s.shape[0]))).item()

    correct, wrong = z_score(depth), z_score(wrong_baseline)
    assert abs(correct) < 4.0, correct
    assert abs(wrong) > 4.0, wrong


# ---------------------------------------------------------------------------------------------
# VSD: the same step with a trained, camera-conditioned particle model in place of the noise
# ---------------------------------------------------------------------------------------------


def cameras(batch: int) -> torch.Tensor:
    from lcss_prior.data.shapes import camera_c2w

    return camera_c2w(torch.full((batch,), 15.0), torch.linspace(0, 90, batch), torch.full((batch,), 1.8))


def test_vsd_uses_the_sds_draws_and_starts_at_w_times_guided_minus_conditional(prior):
    """Same generator, same ``t``/``eps`` as SDS. At initialisation the particle model is the prior's
    conditional network for every camera (zero camera embedding), so, on those draws,
    ``VSD = w (eps_cfg(s) - eps_cond)`` and ``VSD - SDS = w (eps - eps_cond)``. After one optimiser
    step on ``loss_vsd_particle`` the identity no longer holds (the particle model trains)."""
    rgb, c2w, s = rand_rgb(2, 8), cameras(2), 2.5
    vsd = ScoreDistillation(prior, estimator="vsd", guidance_scale=s)
    sds = ScoreDistillation(prior, estimator="sds", guidance_scale=s)
    out = vsd(rgb, LABELS, c2w=c2w, t_range=(0.1, 0.9), generator=gen(40))
    ref = sds(rgb, LABELS, t_range=(0.1, 0.9), generator=gen(40))
    torch.testing.assert_close(out.t, ref.t, rtol=0, atol=0)
    g = gen(40)
    t = 0.1 + 0.8 * torch.rand(2, generator=g)
    x0 = prior.encode(rgb)
    eps = torch.randn(x0.shape, generator=g)
    x_t = prior.add_noise(x0, eps, t)
    w = prior.weight(t).view(-1, 1, 1, 1)
    eps_cond = prior.eps(x_t, t, LABELS, 1.0)
    expected = w * (prior.eps(x_t, t, LABELS, s) - eps_cond)
    torch.testing.assert_close(out.grad, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad - ref.grad, w * (eps - eps_cond), rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3 and out.loss_mu is None
    assert out.loss.item() == pytest.approx(0.5 * out.grad.pow(2).sum().item() / 2, rel=1e-5)
    # the particle trains: one step later the same draws give another gradient
    opt = torch.optim.Adam(vsd.parameters(), lr=1e-2)
    out.loss_vsd_particle.backward()
    opt.step()
    again = vsd(rgb, LABELS, c2w=c2w, t_range=(0.1, 0.9), generator=gen(40))
    assert (again.grad - expected).abs().max() > 1e-4
    # the camera may come with the render outputs instead
    via_render = vsd(
        rgb,
        LABELS,
        RenderOutputs(depth=torch.ones(2, 8, 8), opacity=torch.ones(2, 8, 8), c2w=c2w),
        t_range=(0.1, 0.9),
        generator=gen(40),
        update_mu=False,
    )
    torch.testing.assert_close(via_render.grad, again.grad, rtol=0, atol=0)
    assert via_render.loss_vsd_particle is None  # evaluation: no particle loss


def test_vsd_particle_is_state_and_trains_while_the_prior_and_render_stay_apart(prior):
    vsd = ScoreDistillation(prior, estimator="vsd", guidance_scale=2.0)
    keys = list(vsd.state_dict())
    assert keys and all(k.startswith("particle.network.") for k in keys)
    assert any(".class_embedding.camera." in k for k in keys)
    assert [n for n, _ in vsd.named_modules()][:2] == ["", "particle"] and vsd.mu is None
    assert {id(p) for p in vsd.parameters()}.isdisjoint(id(p) for p in prior.parameters())
    rgb = rand_rgb(2, 8).requires_grad_(True)
    out = vsd(rgb, LABELS, c2w=cameras(2), generator=gen(41))
    assert out.loss_vsd_particle is not None and out.loss_vsd_particle.requires_grad
    assert out.stats["loss_vsd_particle"] == pytest.approx(out.loss_vsd_particle.item())
    out.loss.backward(retain_graph=True)  # the target trick reaches the render only
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in vsd.parameters())
    rgb_grad = rgb.grad.clone()
    out.loss_vsd_particle.backward()  # the particle loss reaches the particle model only
    torch.testing.assert_close(rgb.grad, rgb_grad, rtol=0, atol=0)
    assert all(p.grad is None for p in prior.parameters())
    with_grad = [n for n, p in vsd.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert "particle.network.unet.conv_out.weight" in with_grad
    assert "particle.network.unet.class_embedding.camera.net.2.weight" in with_grad
    # LoRA: the same wiring with only the adapters and the camera MLP trainable
    lora = ScoreDistillation(prior, estimator="vsd", vsd_lora_rank=2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".camera." in n for n in trainable)


def test_vsd_particle_draws_do_not_consume_the_callers_generator(prior):
    """Training the particle model uses its own generator (``vsd_seed``): after a VSD step the
    caller's generator is where an SDS step leaves it, so every arm sees the same t/eps stream."""
    g_vsd, g_sds = gen(42), gen(42)
    vsd = ScoreDistillation(prior, estimator="vsd")
    sds = ScoreDistillation(prior, estimator="sds")
    for _ in range(2):
        a = vsd(rand_rgb(2, 8), LABELS, c2w=cameras(2), generator=g_vsd)
        b = sds(rand_rgb(2, 8), LABELS, generator=g_sds)
        torch.testing.assert_close(a.t, b.t, rtol=0, atol=0)
    assert torch.equal(g_vsd.get_state(), g_sds.get_state())
    # the particle loss is reproducible from vsd_seed
    fresh = ScoreDistillation(prior, estimator="vsd")
    first = fresh(rand_rgb(2, 8), LABELS, c2w=cameras(2), generator=gen(42)).loss_vsd_particle
    other = ScoreDistillation(prior, estimator="vsd", vsd_seed=1)
    assert first.item() == pytest.approx(
        ScoreDistillation(prior, estimator="vsd")(
            rand_rgb(2, 8), LABELS, c2w=cameras(2), generator=gen(42)
        ).loss_vsd_particle.item()
    )
    assert (
        first.item()
        != other(rand_rgb(2, 8), LABELS, c2w=cameras(2), generator=gen(42)).loss_vsd_particle.item()
    )


def test_vsd_variance_estimate_on_the_sds_draws(prior):
    """``estimate_variance`` of VSD: the same draws as SDS, the particle model left untrained; at
    initialisation with guidance 1 the particle model equals the prior, so every draw is 0."""
    rgb, c2w = rand_rgb(1, 8), cameras(1)
    vsd = ScoreDistillation(prior, estimator="vsd", guidance_scale=2.0)
    sds = ScoreDistillation(prior, estimator="sds", guidance_scale=2.0)
    before = {k: v.clone() for k, v in vsd.state_dict().items()}
    est = vsd.estimate_variance(rgb, LABELS[:1], c2w=c2w, n_draws=6, generator=gen(43), batch_size=4)
    ref = sds.estimate_variance(rgb, LABELS[:1], n_draws=6, generator=gen(43), batch_size=4)
    torch.testing.assert_close(est.sds, ref.sds, rtol=0, atol=0)
    torch.testing.assert_close(est.t, ref.t, rtol=0, atol=0)
    assert math.isfinite(est.ratio) and est.ratio == pytest.approx(est.var_ssd / est.var_sds)
    for k, v in vsd.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    plain = ScoreDistillation(prior, estimator="vsd", guidance_scale=1.0)
    zero = plain.estimate_variance(rgb, LABELS[:1], c2w=c2w, n_draws=4, generator=gen(43))
    assert zero.ssd.abs().max() < 1e-5 and zero.sds.abs().max() > 1e-2
