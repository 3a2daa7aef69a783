"""The estimator on a CUDA device, with Stable Diffusion in float16 and float32 (``-m cuda``).

Skipped without CUDA (``scripts/gpu_check.sh`` runs them on the device machine).
``CUDA_TESTS_DEVICE=cpu`` runs the same code on the CPU, to check the module itself where no GPU is.

* a full SSD step (tiny random SD: encode, guided UNet, VAE decode, tiny DPT, depth baseline,
  learned mu) on the device: finite loss, a float32 gradient on the render, mu trained;
* the Stein control variate of the depth baseline through the device's (half-precision) VAE
  decode has zero mean (Hotelling at level 1e-4), and a lost ``grad phi`` is flagged;
* SSD's mean equals SDS's: on the same draws their difference, a combination of zero-mean control
  variates, has a t-statistic ~N(0, 1) along the direction a lost ``grad phi`` would bias it, and
  the stop-gradient baseline is flagged.
"""

from __future__ import annotations

import os

import pytest
import torch

from threestudio_ssd.baselines import Baseline, RenderOutputs, build_baseline
from threestudio_ssd.depth import load_depth_estimator
from threestudio_ssd.distillation import ScoreDistillation
from threestudio_ssd.score_models import build_score_model
from threestudio_ssd.testing import (
    TINY_SD_TEXT_DIM,
    StopGradient,
    check_zero_mean,
    make_tiny_depth_estimator,
    make_tiny_stable_diffusion,
)

DEVICE = os.environ.get("CUDA_TESTS_DEVICE", "cuda")
FALSE_ALARM = 1e-4
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_models")
    sd = make_tiny_stable_diffusion(
        root / "sd",
        scheduler="ddim",
        unet_block_out_channels=(16, 32),
        vae_block_out_channels=(8, 16),
        norm_num_groups=8,
    )
    return sd, make_tiny_depth_estimator(root / "dpt", resolution=32, hidden_size=16, patch_size=8)


def models(folders, half: bool):
    sd, dpt = folders
    sm = build_score_model(
        "stable-diffusion", pretrained_model_name_or_path=str(sd), half_precision=half, device=DEVICE
    )
    depth = build_baseline("depth", estimator=load_depth_estimator(dpt, device=DEVICE))
    return sm, depth


def disk_render(size: int = 16) -> RenderOutputs:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    r2 = xx**2 + yy**2
    inside = r2 < 0.7
    depth = torch.where(inside, 3 - torch.sqrt((1 - r2).clamp_min(0)), torch.zeros_like(r2))
    return RenderOutputs(depth=depth[None].to(DEVICE), opacity=inside.float()[None].to(DEVICE))


def cond(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, TINY_SD_TEXT_DIM, generator=g).to(DEVICE)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_ssd_step_on_the_device(folders, half):
    sm, depth = models(folders, half)
    dist = ScoreDistillation(sm, [depth], guidance_scale=3.0, mu_mode="learned").to(DEVICE)
    rgb = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_(True)
    before = dist.mu.mu.detach().clone()
    out = dist(rgb, cond(), disk_render(), generator=torch.Generator(device=DEVICE).manual_seed(3))
    (out.loss + out.loss_mu).backward()
    assert torch.isfinite(out.loss) and rgb.grad.dtype == torch.float32 and torch.isfinite(rgb.grad).all()
    assert rgb.grad.abs().sum() > 0 and dist.mu.mu.grad is not None
    assert torch.equal(dist.mu.mu.detach(), before)  # the step itself changes no weight


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_depth_control_variate_is_zero_mean_through_the_devices_decoder(folders, half):
    sm, depth = models(folders, half)
    render = disk_render()

    def phi_fn(x):
        return depth(sm.decode(x), render.expand(x.shape[0])).phi

    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    p = check_zero_mean(phi_fn, x0, sigma=0.5, n=192)
    assert p["correct"] > FALSE_ALARM, p
    assert p["stop_gradient"] < FALSE_ALARM and p["paper_sign"] < FALSE_ALARM, p


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_ssd_mean_equals_sds_mean_on_the_device(folders, half):
    """On the same draws SSD - SDS = -w (mu_0 - 1) eps - w mu_1 h_1 must have zero mean: its
    t-statistic along the direction a lost grad phi would bias it (from a pilot run against the
    stop-gradient baseline, as tests/test_distillation.py on the CPU) is ~N(0, 1); the
    stop-gradient baseline's is flagged. mu_0 = 1 - mean(phi) cancels most of eps phi."""
    sm, depth = models(folders, half)
    rgb = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    render, c_text, t = disk_render(), cond(), 0.3
    probe = ScoreDistillation(sm, [depth], guidance_scale=3.0).to(DEVICE)
    gen = lambda seed: torch.Generator(device=DEVICE).manual_seed(seed)  # noqa: E731
    c = probe(rgb, c_text, render, t_range=(t, t), generator=gen(20), update_mu=False).stats["phi_mean/depth"]

    def draws(baseline: Baseline, seed: int, n_draws: int):
        dist = ScoreDistillation(sm, [baseline], guidance_scale=3.0, mu_init=[1.0 - c, 1.0]).to(DEVICE)
        est = dist.estimate_variance(
            rgb, c_text, render, n_draws=n_draws, t=t, generator=gen(seed), batch_size=64
        )
        assert est.n_fallback == 0
        return est

    wrong = StopGradient(depth)
    v = (draws(depth, 30, 64).ssd - draws(wrong, 30, 64).ssd).mean(0).flatten().double()

    def z_score(baseline: Baseline) -> float:
        est = draws(baseline, 31, 192)
        s = (est.ssd - est.sds).flatten(1).double() @ v
        return (s.mean() / (s.std() / s.shape[0] ** 0.5)).item()

    assert abs(z_score(depth)) < 4.0
    assert abs(z_score(wrong)) > 4.0
