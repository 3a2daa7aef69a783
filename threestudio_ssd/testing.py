"""Tiny, randomly initialised model folders for tests and smoke runs (no download, CPU, < 1 s).

Each builder writes a folder in the exact format a user's real model has, so that tests load it
through the user-facing code path (``StableDiffusionScoreModel(path)``,
``LCSSPriorScoreModel(path)``, ``load_depth_estimator(path)``). The models are random: they test
wiring and mathematics, never quality. The Stable Diffusion parts are also available as diffusers
config dicts (``tiny_sd_unet_config``, ``tiny_sd_vae_config``) for code that builds a model in
memory or from configs of its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from lcss_prior.sde import append_dims
from threestudio_ssd.baselines.base import Baseline, BaselineOutput
from threestudio_ssd.score_models.base import ScoreModel
from threestudio_ssd.score_models.image import resize_image

TINY_SD_TEXT_DIM = 32
"""``cross_attention_dim`` of the tiny Stable Diffusion UNet (text embeddings ``[2B, L, 32]``)."""


def tiny_sd_unet_config(
    latent_size: int = 8,
    block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = TINY_SD_TEXT_DIM,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments of a tiny SD-shaped UNet on 4-channel
    ``latent_size`` px latents: one level per width in ``block_out_channels`` (the first without
    cross-attention, the others with it), one layer per block."""
    n_levels = len(block_out_channels)
    return dict(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def tiny_sd_vae_config(
    resolution: int = 16, block_out_channels: Sequence[int] = (32, 64), norm_num_groups: int = 32
) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of a tiny VAE for ``resolution`` px RGB images and
    4-channel latents: one level per width in ``block_out_channels``, so a down factor of
    ``2 ** (len(block_out_channels) - 1)`` (2 levels: 2, SD's 4 levels: 8)."""
    n_levels = len(block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_levels,
        up_block_types=("UpDecoderBlock2D",) * n_levels,
        block_out_channels=tuple(block_out_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
    )


def make_tiny_stable_diffusion(
    folder: str | os.PathLike,
    prediction_type: str = "epsilon",
    seed: int = 0,
    *,
    scheduler: Literal["ddpm", "ddim"] = "ddpm",
    resolution: int = 16,
    unet_block_out_channels: Sequence[int] = (32, 64),
    vae_block_out_channels: Sequence[int] = (32, 64),
    norm_num_groups: int = 32,
) -> Path:
    """A diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``scheduler/``) with random weights:
    ``resolution`` px images, a VAE with down factor ``2 ** (len(vae_block_out_channels) - 1)``
    (default: 2, so 8x8 latents of 4 channels), cross-attention dimension ``TINY_SD_TEXT_DIM``,
    ``norm_num_groups`` in both networks, and SD's ``scaled_linear`` schedule of 1000 steps saved as
    ``scheduler`` (``"ddpm"`` or ``"ddim"``) predicting ``prediction_type``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    schedulers = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if scheduler not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}")
    down_factor = 2 ** (len(vae_block_out_channels) - 1)
    if resolution % down_factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE's down factor {down_factor}")
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **tiny_sd_unet_config(
            resolution // down_factor, unet_block_out_channels, norm_num_groups=norm_num_groups
        )
    )
    vae = AutoencoderKL(**tiny_sd_vae_config(resolution, vae_block_out_channels, norm_num_groups))
    noise_scheduler = schedulers[scheduler](
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    noise_scheduler.save_pretrained(folder / "scheduler")
    return folder


def make_tiny_prior(
    folder: str | os.PathLike,
    captions: Sequence[str] = ("a red cube", "a blue sphere"),
    resolution: int = 8,
    sde: str = "vp",
    seed: int = 0,
    *,
    block_out_channels: Sequence[int] = (32, 32),
    norm_num_groups: int | None = None,
    input_scaling: Literal["none", "edm"] = "none",
    output_scaling: Literal["none", "edm"] = "none",
) -> Path:
    """An exported class-conditional LCSS prior folder (``lcss_prior.export.export_prior``) with a
    random UNet (``lcss_prior.model.build_unet``'s ``"tiny"`` preset with one level per width in
    ``block_out_channels``, ``norm_num_groups`` when given) and the network input scaling
    ``input_scaling`` and output scaling ``output_scaling``; ``null_class = len(captions)``."""
    from lcss_prior.export import export_prior
    from lcss_prior.model import EpsNetwork, build_unet
    from lcss_prior.sde import build_sde

    torch.manual_seed(seed)
    unet = build_unet(
        resolution,
        3,
        len(captions),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
    )
    process = build_sde(sde)
    network = EpsNetwork(unet, process, input_scaling=input_scaling, output_scaling=output_scaling)
    return export_prior(network, process, folder, list(captions), resolution, 3, len(captions))


def make_tiny_depth_estimator(
    folder: str | os.PathLike,
    resolution: int = 16,
    seed: int = 0,
    *,
    hidden_size: int = 32,
    patch_size: int = 4,
    with_image_processor: bool = False,
) -> Path:
    """A transformers DPT depth checkpoint (``save_pretrained``) with a 4-layer, ``hidden_size``-wide
    ViT at ``resolution`` px, patch ``patch_size``: the trainer's own ``build_model`` (whose
    neck/head initialisation keeps a random DPT's output varying with the image), untrained. With
    ``with_image_processor``, a ``DPTImageProcessor`` config at ``resolution`` px is saved too, like
    a Hub checkpoint's (its preprocessing equals the one the loader infers without it)."""
    from threestudio_ssd.depth.train import build_model

    folder = Path(folder)
    model = build_model(
        resolution, hidden_size=hidden_size, layers=4, heads=2, patch_size=patch_size, seed=seed
    ).model
    model.save_pretrained(folder)
    if with_image_processor:
        from transformers import DPTImageProcessor

        DPTImageProcessor(size={"height": resolution, "width": resolution}).save_pretrained(folder)
    return folder


class StopGradient(Baseline):
    """A deliberately wrong baseline for tests: ``inner`` evaluated on a detached image, so the
    autograd gradient of phi is lost (the silent bias docs/ssd_math.md warns about)."""

    name = "stop-gradient"

    def __init__(self, inner: Baseline) -> None:
        self.inner = inner

    def evaluate(self, image: torch.Tensor, render: Any) -> BaselineOutput:
        out = self.inner(image.detach(), render)
        return BaselineOutput(out.phi, out.valid)


def hotelling_p_value(samples: torch.Tensor) -> float:
    """p-value of Hotelling's T^2 test of ``E[x] = 0`` for ``samples [N, ...]`` (flattened per draw):
    ``T^2 = N m^T S^-1 m`` and ``(N - p) / (p (N - 1)) T^2 ~ F(p, N - p)`` under the null (CLT,
    ``N >> p``)."""
    from scipy import stats

    x = samples.detach().double().reshape(samples.shape[0], -1)
    n, p = x.shape
    mean = x.mean(0)
    t2 = n * mean @ torch.linalg.solve(torch.cov(x.T).reshape(p, p), mean)
    return float(stats.f.sf((n - p) / (p * (n - 1)) * t2.item(), p, n - p))


def stein_samples(phi_fn, x0: torch.Tensor, sigma: float, n: int, seed: int):
    """``n`` draws of ``(eps, phi(x_t), grad phi(x_t))`` at ``x_t = x0 + sigma * eps`` (``eps`` from a
    CPU generator seeded ``seed``, moved to ``x0``'s device), and that generator."""
    from threestudio_ssd.stein import baseline_value_and_grad

    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, *x0.shape[1:], generator=g).to(x0.device)
    phis, grads = [], []
    for chunk in eps.split(64):
        phi, grad = baseline_value_and_grad(phi_fn, x0 + sigma * chunk)
        phis.append(phi)
        grads.append(grad)
    return eps, torch.cat(phis), torch.cat(grads), g


def check_zero_mean(
    phi_fn, x0: torch.Tensor, sigma: float, n: int, direction: torch.Tensor | None = None
) -> dict[str, float]:
    """p-values of the zero-mean test of the Stein control variate ``h = eps phi - sigma grad phi``
    (``x_t = x0 + sigma eps``) and of two biased variants (the paper's printed ``eps phi + grad phi``
    and ``eps phi``, i.e. a ``grad phi`` lost to a stop-gradient).

    ``h`` is projected on K = 5 fixed unit directions: ``direction`` (default ``grad phi(x0)``, where
    a bias shows) and 4 random ones. ``phi(x0) * eps`` (exactly zero-mean) is subtracted first, a
    control variate that leaves the mean alone and shrinks the standard error.
    """
    from lcss_prior.sde import append_dims
    from threestudio_ssd.stein import baseline_value_and_grad

    phi0, grad0 = baseline_value_and_grad(phi_fn, x0)
    direction = grad0 if direction is None else direction
    eps, phi, grad, g = stein_samples(phi_fn, x0, sigma, n, seed=0)
    d = eps[0].numel()
    u = torch.stack(
        [direction.flatten().cpu() / direction.norm().cpu()]
        + [torch.randn(d, generator=g) / d**0.5 for _ in range(4)]
    ).to(eps.device, eps.dtype)
    p = append_dims(phi, eps.ndim)

    def p_value(h: torch.Tensor) -> float:
        return hotelling_p_value((h - phi0 * eps).flatten(1) @ u.T)

    return {
        "correct": p_value(eps * p - sigma * grad),  # h = eps phi - sigma grad phi
        "paper_sign": p_value(eps * p + grad),  # the printed eps phi + grad phi
        "stop_gradient": p_value(eps * p),  # grad phi through a detached estimator = 0
    }


def vp_schedule(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The analytic priors' variance-preserving process: ``alpha = cos(pi t / 2)``,
    ``sigma = sin(pi t / 2)`` (``alpha^2 + sigma^2 = 1``)."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


class GaussianPrior:
    """Data ``x0 ~ N(m, diag(s^2))`` (``m``, ``s`` of the data's shape) under :func:`vp_schedule`:
    ``p_t = N(alpha m, alpha^2 s^2 + sigma^2)`` and the exact noise prediction
    ``eps_hat(x_t) = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2)``, linear in ``x_t`` (every part
    of SDS's within-``t`` variance is odd in ``eps``). ``x_t`` is ``[N, *m.shape]``."""

    def __init__(self, m: torch.Tensor, s: torch.Tensor) -> None:
        if m.shape != s.shape:
            raise ValueError(f"m and s must have one shape, got {tuple(m.shape)} and {tuple(s.shape)}")
        self.m, self.s = m, s

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sg = (append_dims(v, x_t.ndim) for v in vp_schedule(t))
        return sg * (x_t - a * self.m) / (a**2 * self.s**2 + sg**2)

    def mean_sds(self, x0: torch.Tensor, t_range: tuple[float, float], n_grid: int = 20001) -> torch.Tensor:
        """``E_{t ~ U[t_range], eps}[w (eps_hat - eps)]`` at ``x0`` (shaped like ``m``) with the
        ``sds`` weighting ``w = sigma^2``, float64: the eps-average is ``w sigma alpha (x0 - m) /
        (alpha^2 s^2 + sigma^2)`` in closed form, the t-average by the trapezoidal rule."""
        lo, hi = t_range
        t = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
        a, sg = (append_dims(v, x0.ndim + 1) for v in vp_schedule(t))
        m, s = self.m.double(), self.s.double()
        f = sg**3 * a * (x0.double() - m) / (a**2 * s**2 + sg**2)
        return torch.trapezoid(f, t, dim=0) / (hi - lo)


class MixturePrior:
    """Equal mixture of ``N(m_j, s^2 I)`` (``means [J, D]``) under :func:`vp_schedule`:
    ``eps_hat = sigma sum_j r_j(x_t) (x_t - alpha m_j) / D`` with ``D = alpha^2 s^2 + sigma^2`` and
    posterior responsibilities ``r_j``. Unlike a Gaussian, ``tr d eps_hat / d x_t`` varies with
    ``x_t`` (through ``r_1 r_2``), which is what a Stein control variate can exploit
    (docs/ssd_math.md, section 4). ``x_t`` is ``[N, D]``."""

    def __init__(self, means: torch.Tensor, s: float) -> None:
        self.means, self.s = means, s

    def _parts(self, x: torch.Tensor, t: torch.Tensor):
        a, sg = vp_schedule(t)
        var = a**2 * self.s**2 + sg**2
        diff = x[:, None, :] - a[:, None, None] * self.means[None]
        logits = -0.5 * diff.pow(2).sum(-1) / var[:, None]
        return torch.softmax(logits, 1), diff, var, sg

    def eps_hat(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r, diff, var, sg = self._parts(x_t, t)
        return sg[:, None] * (r[:, :, None] * diff).sum(1) / var[:, None]

    def ambiguity(self, t: torch.Tensor):
        """Baseline ``phi(x_t) = r_1 r_2``: how undecided the prior is about the mode of ``x_t``."""

        def phi(x: torch.Tensor) -> torch.Tensor:
            r = self._parts(x, t)[0]
            return r[:, 0] * r[:, 1]

        return phi


class GaussianScoreModel(ScoreModel):
    """:class:`GaussianPrior` as an analytic pixel-space ``ScoreModel`` for tests and benchmarks of
    the estimators (``m``, ``s`` of shape ``[C, H, W]``; unconditional: ``cond`` and the guidance
    scale are ignored). ``encode`` is ``2 rgb - 1`` (``rgb_as_latents`` skips it)."""

    space = "pixel"

    def __init__(self, m: torch.Tensor, s: torch.Tensor) -> None:
        super().__init__()
        if m.ndim != 3 or m.shape != s.shape:
            raise ValueError(f"m and s must both be [C, H, W], got {tuple(m.shape)} and {tuple(s.shape)}")
        self.register_buffer("m", m.float())
        self.register_buffer("s", s.float())
        self.channels = int(m.shape[0])
        self.resolution = (int(m.shape[1]), int(m.shape[2]))

    @property
    def prior(self) -> GaussianPrior:
        return GaussianPrior(self.m, self.s)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return vp_schedule(t)[0]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return vp_schedule(t)[1]

    def encode(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return 2 * resize_image(rgb, self.resolution) - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float) -> torch.Tensor:
        return self.prior.eps_hat(x_t, t)

    def repeat_cond(self, cond: Any, n: int) -> Any:
        return None if cond is None else torch.as_tensor(cond).repeat(n)

    def mean_sds(self, x0: torch.Tensor, t_range: tuple[float, float], n_grid: int = 20001) -> torch.Tensor:
        """:meth:`GaussianPrior.mean_sds` at the render ``x0 [C, H, W]``."""
        return self.prior.mean_sds(x0, t_range, n_grid)


# ----------------------------------------------------------------------------------------------
# analytic experiments (tests/test_stein.py and benchmarks/analytic_variance.py)
# ----------------------------------------------------------------------------------------------

#: the t range of the analytic experiments
ANALYTIC_T_RANGE = (0.02, 0.98)


def analytic_draws(prior, x0: torch.Tensor, n: int, gen: torch.Generator) -> dict:
    """``t ~ U[ANALYTIC_T_RANGE]``, ``x_t = alpha x0 + sigma eps``, exact ``eps_hat``, ``w = sigma^2``."""
    lo, hi = ANALYTIC_T_RANGE
    t = lo + (hi - lo) * torch.rand(n, generator=gen)
    eps = torch.randn(n, x0.numel(), generator=gen)
    a, sg = vp_schedule(t)
    x_t = a[:, None] * x0 + sg[:, None] * eps
    return dict(t=t, eps=eps, x_t=x_t, sigma=sg, w=sg**2, eps_hat=prior.eps_hat(x_t, t))


def gaussian_experiment():
    """The 4-D Gaussian prior of the unit-level variance numbers and its fixed render ``x0``."""
    gen = torch.Generator().manual_seed(0)
    d = 4
    prior = GaussianPrior(0.5 * torch.randn(d, generator=gen), torch.tensor([0.15, 0.4, 0.8, 1.5]))
    x0 = prior.m + 0.3 * torch.randn(d, generator=gen)  # the "render": fixed, not a data sample
    return prior, x0


def misspecified_log_density(t: torch.Tensor):
    """An informative baseline for the Gaussian prior: the log-density of a guessed isotropic
    ``N(0, 0.5^2 I)`` data model, diffused to time ``t`` (a quadratic whose gradient is a rough
    score of the prior)."""
    a, sg = (v[:, None] for v in vp_schedule(t))

    def phi(x: torch.Tensor) -> torch.Tensor:
        return -0.5 * (x**2 / (0.25 * a**2 + sg**2)).sum(1)

    return phi


def useless_baseline(x: torch.Tensor) -> torch.Tensor:
    """A baseline that carries no information about ``eps_hat``: a fast oscillation of one
    coordinate around 1 (so the paper's form gets ``h ~ eps * phi``: a randomly rescaled noise)."""
    return 1.0 + 0.9 * torch.sin(25.0 * x[:, 3])


def fitted_variance(
    prior, x0, phi_fns, include_constant=True, shape="scalar", n_fit=60000, n_eval=60000, seed=1
):
    """Fit optimal per-bin weights on one draw set, evaluate on an independent one (the weights
    never see the evaluation noise). Returns (SDS draws, SSD draws, eval dict, the fitted module)."""
    from threestudio_ssd.stein import (
        ControlVariateWeight,
        baseline_value_and_grad,
        control_variates,
        sds_gradient,
        stein_gradient,
    )

    gen = torch.Generator().manual_seed(seed)
    n_cv = len(phi_fns) + int(include_constant)
    init = None if include_constant else [1.0] * n_cv
    cvw = ControlVariateWeight(
        n_cv, shape=shape, channels=x0.numel(), mode="optimal", t_bins=10, ema=1.0, init=init
    )

    def cvs_of(b):
        phis, grads = [], []
        for make in phi_fns:
            p, g = baseline_value_and_grad(make(b["t"]), b["x_t"])
            phis.append(p)
            grads.append(g)
        if not phis:
            return b["eps"][:, None]
        return control_variates(
            b["eps"],
            torch.stack(phis, 1),
            torch.stack(grads, 1),
            b["sigma"],
            include_constant=include_constant,
        )

    fit = analytic_draws(prior, x0, n_fit, gen)
    cvw.update(fit["eps_hat"], cvs_of(fit), fit["w"], fit["t"])
    ev = analytic_draws(prior, x0, n_eval, gen)
    sds = sds_gradient(ev["eps_hat"], ev["eps"], ev["w"])
    ssd = stein_gradient(ev["eps_hat"], cvs_of(ev), ev["w"], cvw(ev["t"]))
    return sds, ssd, ev, cvw


def load_script(path: str | os.PathLike) -> Any:
    """A script of the repository (e.g. ``benchmarks/variance_2d.py``) imported as the module
    ``benchmark_<stem>``, registered in ``sys.modules`` (its dataclasses resolve their annotations
    through it), for tests and for benchmarks that reuse each other."""
    import importlib.util
    import sys

    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
