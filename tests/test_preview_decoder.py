"""The cheap decoder for SSD's geometric baselines (``ScoreModel.decode_preview``,
``DistillationConfig.baseline_decoder``): the least-squares fit recovers a known affine map (directly
and through a Stable Diffusion folder whose decoder is made linear), the preview is a differentiable
1x1 map at latent resolution fitted once, ``"full"`` is bit-for-bit the old path, and the Stein
control variate on the preview stays zero-mean (Hotelling's T^2 on fixed projections at level 1e-4)
while the same check flags the paper's printed sign and a lost gradient.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threestudio_ssd.baselines import RenderOutputs, build_baseline
from threestudio_ssd.depth import load_depth_estimator
from threestudio_ssd.distillation import DistillationConfig, ScoreDistillation
from threestudio_ssd.score_models import LCSSPriorScoreModel, StableDiffusionScoreModel
from threestudio_ssd.score_models.stable_diffusion import (
    PREVIEW_FIT_IMAGES,
    fit_affine_map,
    synthetic_fit_images,
)
from threestudio_ssd.stein import baseline_value_and_grad, control_variates
from threestudio_ssd.testing import (
    TINY_SD_TEXT_DIM,
    hotelling_p_value,
    make_tiny_depth_estimator,
    make_tiny_prior,
    make_tiny_stable_diffusion,
)

FALSE_ALARM = 1e-4


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd(sd_path):
    return StableDiffusionScoreModel(sd_path, latent_sampling="mean")


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    estimator = load_depth_estimator(make_tiny_depth_estimator(tmp_path_factory.mktemp("dpt")))
    return build_baseline("depth", estimator=estimator)


def disk_render(size: int, batch: int = 1) -> RenderOutputs:
    """A sphere-like object: opacity 1 on a disk, depth 3 - sqrt(1 - r^2) there, 0 outside."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = xx**2 + yy**2
    inside = r2 < 0.7
    depth = torch.where(inside, 3 - torch.sqrt((1 - r2).clamp_min(0)), torch.zeros_like(r2))
    return RenderOutputs(depth=depth.expand(batch, -1, -1), opacity=inside.float().expand(batch, -1, -1))


def rand_rgb(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def sd_cond(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * batch, 5, TINY_SD_TEXT_DIM, generator=g)


# ---------------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------------


def test_fit_affine_map_recovers_a_known_map_and_matches_numpy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 6, 7, generator=g)
    weight, bias = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    rgb = torch.einsum("oc,nchw->nohw", weight, z) + bias.view(1, 3, 1, 1)
    w_fit, b_fit, r2 = fit_affine_map(z, rgb)
    assert w_fit.dtype == b_fit.dtype == torch.float64
    torch.testing.assert_close(w_fit, weight.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(b_fit, bias.double(), rtol=0, atol=1e-6)
    assert r2 == pytest.approx(1.0, abs=1e-10)

    # with noise: the same solution and R^2 as an independent (numpy) least squares
    noisy = rgb + 0.5 * torch.randn(rgb.shape, generator=g)
    w_fit, b_fit, r2 = fit_affine_map(z, noisy)
    a = np.concatenate([z.double().permute(0, 2, 3, 1).reshape(-1, 4).numpy(), np.ones((5 * 6 * 7, 1))], 1)
    y = noisy.double().permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    sol = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(w_fit.numpy(), sol[:4].T, atol=1e-10)
    np.testing.assert_allclose(b_fit.numpy(), sol[4], atol=1e-10)
    assert r2 == pytest.approx(1 - ((y - a @ sol) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), abs=1e-12)
    assert 0.0 < r2 < 1.0
    with pytest.raises(ValueError, match="must share N, h and w"):
        fit_affine_map(z, rgb[:, :, :3])


def test_synthetic_fit_images_are_deterministic_and_varied():
    a, b = synthetic_fit_images(4, 32, seed=0), synthetic_fit_images(4, 32, seed=0)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, synthetic_fit_images(4, 32, seed=1))
    # colour varies inside every image and between channels (a well-posed least squares)
    assert (a.flatten(2).std(-1) > 0.05).all()


class LinearDecoder:
    """A stand-in for ``AutoencoderKL.decode``: a known 1x1 affine map, nearest-upsampled by the
    VAE's factor (so average pooling returns it exactly); counts its calls."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, factor: int):
        self.weight, self.bias, self.factor, self.calls = weight, bias, factor, 0

    def __call__(self, z: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        image = F.conv2d(z, self.weight[:, :, None, None], self.bias)
        return SimpleNamespace(sample=F.interpolate(image, scale_factor=self.factor, mode="nearest"))


def test_fit_preview_recovers_a_linear_decoder_once_and_lazily(sd_path):
    """Through the user's loader: with a decoder ``D(u) = A u + c``, ``decode(x) = (A x / s + c + 1) / 2``,
    so the preview must be ``W = A / (2 s)``, ``b = (c + 1) / 2`` with R^2 = 1; it is fitted on the
    first ``decode_preview`` (``PREVIEW_FIT_IMAGES`` decodes) and never again."""
    model = StableDiffusionScoreModel(sd_path, latent_sampling="mean")
    g = torch.Generator().manual_seed(3)
    a, c = torch.randn(3, model.channels, generator=g), torch.randn(3, generator=g)
    decoder = LinearDecoder(a, c, model.vae_scale_factor)
    model.vae.decode = decoder
    assert model.preview_weight is None and model.preview_r2 is None
    x = torch.randn(2, model.channels, *model.resolution, generator=g)
    preview = model.decode_preview(x)
    assert decoder.calls == PREVIEW_FIT_IMAGES
    s = model.scaling_factor
    torch.testing.assert_close(model.preview_weight, a / (2 * s), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.preview_bias, (c + 1) / 2, rtol=1e-4, atol=1e-5)
    assert model.preview_r2 == pytest.approx(1.0, abs=1e-6)
    # the preview equals the pooled full decode of any latent, not only the fitted ones
    full = F.avg_pool2d(model.decode(x), model.vae_scale_factor)
    torch.testing.assert_close(preview, full, rtol=1e-4, atol=1e-4)
    model.decode_preview(x)
    assert decoder.calls == PREVIEW_FIT_IMAGES + 1  # the decode above; no refit
    assert "preview_weight" not in model.state_dict()


# ---------------------------------------------------------------------------------------------
# the preview
# ---------------------------------------------------------------------------------------------


def test_preview_is_a_differentiable_map_at_latent_resolution(sd, sd_path):
    x = torch.randn(2, sd.channels, *sd.resolution, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    preview = sd.decode_preview(x)
    assert preview.shape == (2, 3, *sd.resolution) and preview.dtype == x.dtype
    assert torch.isfinite(preview).all() and sd.preview_r2 is not None
    # vector-Jacobian product of the 1x1 map: W^T v per pixel
    v = torch.randn(preview.shape, generator=torch.Generator().manual_seed(5))
    (grad,) = torch.autograd.grad((preview * v).sum(), x)
    torch.testing.assert_close(grad, torch.einsum("oc,bohw->bchw", sd.preview_weight, v))
    assert sd.preview_weight.abs().sum() > 0
    # deterministic: the same VAE gives the same fit
    again = StableDiffusionScoreModel(sd_path, latent_sampling="mean")
    again.fit_preview()
    assert torch.equal(again.preview_weight, sd.preview_weight)
    assert torch.equal(again.preview_bias, sd.preview_bias) and again.preview_r2 == sd.preview_r2
    with pytest.raises(ValueError, match="decode_preview expects latents"):
        sd.decode_preview(torch.zeros(1, 3, *sd.resolution))


def test_pixel_prior_preview_is_its_decode(tmp_path):
    prior = LCSSPriorScoreModel(make_tiny_prior(tmp_path / "p"))
    x = torch.randn(2, prior.channels, *prior.resolution)
    assert torch.equal(prior.decode_preview(x), prior.decode(x))


def test_baseline_decoder_is_validated():
    with pytest.raises(ValueError, match=r"DistillationConfig.baseline_decoder must be one of.*'fast'"):
        DistillationConfig(baseline_decoder="fast")
    with pytest.raises(ValueError, match=r"DistillationConfig.baseline_decoder"):
        DistillationConfig.from_dict({"baseline_decoder": "vae"})
    assert DistillationConfig().baseline_decoder == "full"


# ---------------------------------------------------------------------------------------------
# in the estimator
# ---------------------------------------------------------------------------------------------


def reference_baselines(decode, baseline, x_t: torch.Tensor, render: RenderOutputs):
    """The baseline evaluation as ``_evaluate_baselines`` did before ``baseline_decoder`` existed
    (``resize_render="image"``), with ``decode`` as the image."""

    def phi_fn(x):
        image = decode(x)
        return baseline(image, render.resized(*image.shape[-2:])).phi[:, None]

    return baseline_value_and_grad(phi_fn, x_t, n_baselines=1)


def test_full_is_the_old_path_bit_for_bit_and_preview_uses_only_the_preview(sd, depth, monkeypatch):
    x_t = torch.randn(3, sd.channels, *sd.resolution, generator=torch.Generator().manual_seed(6))
    render = disk_render(16, 3)
    rgb, cond = rand_rgb(3, 16), sd_cond(3)

    def boom(x):
        raise AssertionError("the other decoder was called")

    default = ScoreDistillation(sd, [depth])
    full = ScoreDistillation(sd, [depth], baseline_decoder="full")
    preview = ScoreDistillation(sd, [depth], baseline_decoder="preview")
    sd.fit_preview()
    ref_full = reference_baselines(sd.decode, depth, x_t, render)
    ref_preview = reference_baselines(sd.decode_preview, depth, x_t, render)
    with monkeypatch.context() as m:
        m.setattr(sd, "decode_preview", boom)
        phis, grads, valid = full._evaluate_baselines(x_t, render)
        assert torch.equal(phis, ref_full[0]) and torch.equal(grads, ref_full[1]) and valid.all()
        steps = [
            d(rgb, cond, render, generator=torch.Generator().manual_seed(7), update_mu=False)
            for d in (default, full)
        ]
        assert torch.equal(steps[0].grad, steps[1].grad) and torch.equal(steps[0].loss, steps[1].loss)
    with monkeypatch.context() as m:
        m.setattr(sd, "decode", boom)
        phis, grads, valid = preview._evaluate_baselines(x_t, render)
        assert torch.equal(phis, ref_preview[0]) and torch.equal(grads, ref_preview[1]) and valid.all()
    assert phis.shape == (3, 1) and grads.shape == (3, 1, *x_t.shape[1:])
    assert not torch.allclose(phis, ref_full[0])
    out = preview(rgb, cond, render, generator=torch.Generator().manual_seed(7))
    assert out.stats["n_fallback"] == 0.0 and torch.isfinite(out.grad).all()


def test_preview_control_variate_is_zero_mean_and_wrong_forms_are_flagged(sd, depth):
    """``x_t = alpha x0 + sigma eps`` at one render and ``t``; ``h = eps phi - sigma grad phi`` from
    ``ScoreDistillation._evaluate_baselines`` with ``baseline_decoder="preview"`` and
    ``control_variates``, projected on ``grad phi(alpha x0)`` (where a bias shows) and 4 random unit
    directions, after subtracting ``phi(alpha x0) eps`` (exactly zero-mean; shrinks the standard
    error). The printed ``eps phi + grad phi`` and a lost gradient (``eps phi``) must be flagged."""
    dist = ScoreDistillation(sd, [depth], baseline_decoder="preview")
    render = disk_render(16)
    t = torch.tensor([0.3])
    alpha, sigma = sd.alpha(t).item(), sd.sigma(t).item()
    mean = alpha * sd.encode(rand_rgb(1, 16, seed=8))

    def evaluate(x_t):
        phis, grads, valid = dist._evaluate_baselines(x_t, render)
        assert valid.all()
        return phis, grads

    phi0, grad0 = evaluate(mean)
    g = torch.Generator().manual_seed(0)
    n = 192
    eps = torch.randn(n, *mean.shape[1:], generator=g)
    phis, grads = map(torch.cat, zip(*(evaluate(mean + sigma * e) for e in eps.split(64))))
    h = control_variates(eps, phis, grads, sigma, include_constant=False)[:, 0]
    d = mean[0].numel()
    u = torch.stack(
        [grad0.flatten() / grad0.norm()] + [torch.randn(d, generator=g) / d**0.5 for _ in range(4)]
    )
    p = phis.view(-1, 1, 1, 1)

    def p_value(cv: torch.Tensor) -> float:
        return hotelling_p_value((cv - phi0[0, 0] * eps).flatten(1) @ u.T)

    assert torch.allclose(h, eps * p - sigma * grads[:, 0])
    correct = p_value(h)
    paper_sign = p_value(eps * p + grads[:, 0])
    stop_gradient = p_value(eps * p)
    assert correct > FALSE_ALARM, (correct, paper_sign, stop_gradient)
    assert paper_sign < FALSE_ALARM and stop_gradient < FALSE_ALARM, (correct, paper_sign, stop_gradient)
