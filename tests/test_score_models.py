"""Score models: tiny random Stable Diffusion and LCSS-prior folders are built here, saved with
``save_pretrained`` / ``export_prior`` and loaded through the same constructors a user calls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from threestudio_ssd.score_models import (
    SCORE_MODELS,
    LCSSPriorScoreModel,
    StableDiffusionScoreModel,
    build_score_model,
)
from threestudio_ssd.score_models.image import resize_image
from threestudio_ssd.testing import TINY_SD_TEXT_DIM, make_tiny_prior, make_tiny_stable_diffusion

TEXT_DIM = TINY_SD_TEXT_DIM
TEXT_LEN = 5


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def sd(sd_path):
    return StableDiffusionScoreModel(sd_path, latent_sampling="mean")


def text_pair(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(
        batch, TEXT_LEN, TEXT_DIM, generator=g
    )


# ---------------------------------------------------------------------------------------------
# Stable Diffusion
# ---------------------------------------------------------------------------------------------


def test_sd_loads_frozen_through_registry(sd_path):
    model = build_score_model("stable-diffusion", pretrained_model_name_or_path=sd_path)
    assert isinstance(model, StableDiffusionScoreModel)
    assert model.space == "latent" and model.channels == 4
    assert model.resolution == (8, 8) and model.image_size == 16 and model.vae_scale_factor == 2
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.unet.training and not model.vae.training
    # the schedule buffer is not checkpoint state
    assert "alphas_cumprod" not in model.state_dict()


def test_registry_names_and_unknown():
    assert set(SCORE_MODELS) == {"stable-diffusion", "lcss-prior"}
    with pytest.raises(ValueError, match="unknown score model 'sd'.*lcss-prior"):
        build_score_model("sd")


def test_sd_missing_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="'unet'.*nowhere"):
        StableDiffusionScoreModel(tmp_path / "nowhere", local_files_only=True)


def test_sd_schedule_matches_scheduler(sd, sd_path):
    scheduler = DDPMScheduler.from_pretrained(sd_path, subfolder="scheduler")
    t = torch.tensor([0.0, 0.25, 0.5004, 1.0])
    idx = torch.round(t.double() * 999).long()
    assert idx.tolist() == [0, 250, 500, 999]
    a_bar = scheduler.alphas_cumprod[idx]
    torch.testing.assert_close(sd.alpha(t), a_bar.sqrt(), rtol=0, atol=0)
    torch.testing.assert_close(sd.sigma(t), (1 - a_bar).sqrt(), rtol=0, atol=0)
    torch.testing.assert_close(sd.alpha(t) ** 2 + sd.sigma(t) ** 2, torch.ones(4), rtol=0, atol=1e-6)
    torch.testing.assert_close(sd.weight(t), 1 - a_bar, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        sd.alpha(torch.tensor([1.5]))


def test_sd_encode_is_the_scaled_vae_posterior(sd, sd_path):
    vae = AutoencoderKL.from_pretrained(sd_path, subfolder="vae")
    rgb = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    z = sd.encode(rgb)
    assert z.shape == (2, 4, 8, 8)
    x = F.interpolate(rgb, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    expected = vae.encode(2 * x - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(z, expected.detach(), rtol=1e-5, atol=1e-5)
    # sampling mode: reparameterised, reproducible with a generator, different without
    sampler = StableDiffusionScoreModel(sd_path, latent_sampling="sample")
    z1 = sampler.encode(rgb, generator=torch.Generator().manual_seed(7))
    z2 = sampler.encode(rgb, generator=torch.Generator().manual_seed(7))
    z3 = sampler.encode(rgb, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    assert not torch.equal(z1, z3)
    post = vae.encode(2 * x - 1).latent_dist
    n = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, ((post.mean + post.std * n) * vae.config.scaling_factor).detach())


def test_sd_encode_decode_differentiable(sd, sd_path):
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    z = sd.encode(rgb)
    (z**2).sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    image = sd.decode(latents)
    assert image.shape == (2, 3, 16, 16)
    vae = AutoencoderKL.from_pretrained(sd_path, subfolder="vae")
    expected = (vae.decode(latents.detach() / vae.config.scaling_factor).sample + 1) / 2
    torch.testing.assert_close(image.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    image.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    # frozen weights receive nothing
    assert all(p.grad is None for p in sd.parameters())


def _raw_unet(sd_path, x, idx, text):
    unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
    with torch.no_grad():
        return unet(x, idx, encoder_hidden_states=text).sample


def test_sd_cfg_order_cond_first(sd, sd_path):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    idx = torch.round(t * 999).long()
    c, u = text_pair(2)
    eps_c = _raw_unet(sd_path, x, idx, c)
    eps_u = _raw_unet(sd_path, x, idx, u)
    assert (eps_c - eps_u).abs().max() > 1e-3  # the two embeddings really differ
    cond = torch.cat([c, u])
    s = 7.5
    out = sd.eps(x, t, cond, s)
    torch.testing.assert_close(out, eps_u + s * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sd.eps(x, t, cond, 1.0), eps_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sd.eps(x, t, cond, 0.0), eps_u, rtol=1e-5, atol=1e-5)
    # the wrong order (uncond first) is detectably different
    swapped = sd.eps(x, t, torch.cat([u, c]), s)
    assert (swapped - out).abs().max() > 1e-2
    assert not out.requires_grad
    with pytest.raises(ValueError, match=r"\[2B, L, 32\] with 2B=4"):
        sd.eps(x, t, c, s)


def test_sd_repeat_cond_keeps_order(sd):
    c, u = text_pair(1)
    rep = sd.repeat_cond(torch.cat([c, u]), 3)
    assert rep.shape == (6, TEXT_LEN, TEXT_DIM)
    assert all(torch.equal(rep[i], c[0]) for i in range(3))
    assert all(torch.equal(rep[i], u[0]) for i in range(3, 6))


def test_sd_v_prediction_is_converted_to_eps(tmp_path, sd_path):
    folder = make_tiny_stable_diffusion(tmp_path / "vpred", prediction_type="v_prediction")
    model = StableDiffusionScoreModel(folder)
    assert model.prediction_type == "v_prediction"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([0.2, 0.9])
    c, u = text_pair(2)
    v = _raw_unet(folder, x, torch.round(t * 999).long(), c)
    alpha, sigma = model.alpha(t).view(-1, 1, 1, 1), model.sigma(t).view(-1, 1, 1, 1)
    expected = sigma * x + alpha * v  # eps from v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps
    out = model.eps(x, t, torch.cat([c, u]), 1.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out - v).abs().max() > 1e-2  # not the raw output


# ---------------------------------------------------------------------------------------------
# LCSS prior
# ---------------------------------------------------------------------------------------------

CAPTIONS = ["a red cube", "a blue sphere"]


@pytest.fixture(scope="module")
def prior_path(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny", captions=CAPTIONS)


@pytest.fixture(scope="module")
def lcss(prior_path):
    return LCSSPriorScoreModel(prior_path)


def test_lcss_loads_through_registry(prior_path):
    from lcss_prior.export import load_prior

    model = build_score_model("lcss-prior", prior=prior_path)
    assert model.space == "pixel" and model.channels == 3 and model.resolution == (8, 8)
    assert model.captions == CAPTIONS and model.null_class == 2
    assert model.caption_to_label("a blue sphere") == 1
    with pytest.raises(KeyError, match="a green cone.*a red cube"):
        model.caption_to_label("a green cone")
    assert not any(p.requires_grad for p in model.parameters())
    # a loaded Prior object is accepted as well
    assert LCSSPriorScoreModel(load_prior(prior_path)).resolution == (8, 8)
    with pytest.raises(TypeError, match="prior folder path or a Prior"):
        LCSSPriorScoreModel(3)


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve", "tanh"])
def test_lcss_refuses_a_prior_whose_sde_is_not_affine(tmp_path, sde):
    """Distillation noises renders as ``alpha x0 + sigma eps``: only an affine SDE has that marginal.
    A ``tanh`` prior exports and loads fine, but the score model must refuse it."""
    from lcss_prior.export import load_prior

    folder = make_tiny_prior(tmp_path / sde, sde=sde)
    prior = load_prior(folder)
    assert prior.sde.is_affine == (sde != "tanh")
    if sde == "tanh":
        with pytest.raises(ValueError, match="'tanh' is not affine.*--sde vp"):
            LCSSPriorScoreModel(folder)
    else:
        assert LCSSPriorScoreModel(folder).resolution == (8, 8)


def test_lcss_encode_decode(lcss):
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x0 = lcss.encode(rgb)
    assert x0.shape == (2, 3, 8, 8)
    expected = 2 * F.interpolate(rgb, size=(8, 8), mode="bilinear", align_corners=False, antialias=True) - 1
    torch.testing.assert_close(x0, expected, rtol=0, atol=0)
    x0.sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    # decode inverts the affine map exactly and is not clamped (smooth outside [-1, 1])
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]).view(1, 1, 1, 5).expand(1, 3, 8, 5).reshape(1, 3, 8, 5)
    x = F.pad(x, (0, 3))
    rgb_out = lcss.decode(x)
    torch.testing.assert_close(rgb_out, (x + 1) / 2, rtol=0, atol=0)
    assert rgb_out.min() < 0 and rgb_out.max() > 1
    torch.testing.assert_close(
        lcss.decode(lcss.encode(rgb.detach()[:, :, :8, :8])), rgb.detach()[:, :, :8, :8]
    )


def test_lcss_schedule_and_eps_match_prior(lcss, prior_path):
    from lcss_prior.export import load_prior

    prior = load_prior(prior_path)
    t = torch.tensor([0.1, 0.7])
    torch.testing.assert_close(lcss.alpha(t), prior.alpha(t))
    torch.testing.assert_close(lcss.sigma(t), prior.sigma(t))
    assert torch.all(lcss.sigma(t) > 0) and torch.all(lcss.alpha(t) > 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 1])
    out = lcss.eps(x, t, labels, 3.0)
    with torch.no_grad():
        eps_c = prior.network(x, t, labels)
        eps_u = prior.network(x, t, torch.full_like(labels, 2))
    assert (eps_c - eps_u).abs().max() > 1e-4
    torch.testing.assert_close(out, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    assert not out.requires_grad
    torch.testing.assert_close(lcss.repeat_cond(labels, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="holds label 5"):
        lcss.eps(x, t, torch.tensor([0, 5]), 3.0)
    with pytest.raises(ValueError, match=r"shape \[B\] = \(2,\)"):
        lcss.eps(x, t, torch.tensor([0]), 3.0)


def test_resize_image_antialias_only_when_shrinking():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert resize_image(x, (16, 16)) is x
    up = resize_image(x, (32, 32))
    torch.testing.assert_close(up, F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    # antialiased when shrinking: white noise is averaged over the footprint of each output pixel
    # (variance ~ 1/12 / footprint), while plain bilinear only mixes the 2x2 nearest pixels
    noise = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    down = resize_image(noise, (4, 4))
    plain = F.interpolate(noise, size=(4, 4), mode="bilinear", align_corners=False)
    assert down.var() < 0.25 * plain.var()
    assert math.isfinite(down.sum().item())
