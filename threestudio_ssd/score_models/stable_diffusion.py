"""Stable Diffusion (diffusers) as a latent-space ``ScoreModel``.

Only the VAE, the UNet and the scheduler's noise schedule are loaded -- no text encoder, tokenizer
or safety checker: the text embeddings come from threestudio's prompt processor. Every module is
frozen and in eval mode.

Time: ``t`` in ``[0, 1]`` maps to the discrete training step ``idx = round(t * (T - 1))``;
``alpha(t) = sqrt(alpha_bar[idx])``, ``sigma(t) = sqrt(1 - alpha_bar[idx])`` and the UNet sees the
same ``idx``, so ``x_t = alpha x0 + sigma eps`` is exactly the process the UNet was trained on.

Preview decoder (``decode_preview``, SSD's ``baseline_decoder="preview"``): a per-pixel affine map
latent (4) -> RGB (3) at the latent resolution, fitted to this VAE by least squares once, on first
use (``fit_preview``), from synthetic images (``synthetic_fit_images``): no files, no network, no
constants from elsewhere.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from jaxtyping import Float
from torch import Tensor

from lcss_prior.sde import generator_device
from threestudio_ssd.precision import call_in_precision
from threestudio_ssd.score_models.base import ScoreModel, classifier_free_guidance
from threestudio_ssd.score_models.image import resize_image

LATENT_SAMPLING = ("sample", "mean")
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: how many synthetic images, and from which seed, ``fit_preview`` fits the preview map on
PREVIEW_FIT_IMAGES = 4
PREVIEW_FIT_SEED = 0

logger = logging.getLogger(__name__)


def _load(cls: Any, path: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, subfolder=...)`` with an error that names the folder."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        local = os.path.join(path, subfolder)
        raise FileNotFoundError(
            f"cannot load the Stable Diffusion {subfolder!r} ({cls.__name__}) from {path!r} "
            f"(looked for {local!r} or a Hub repository with that subfolder; offline runs need a "
            f"local copy of the model folder): {err}"
        ) from err


class StableDiffusionScoreModel(ScoreModel):
    """Frozen Stable Diffusion UNet + VAE behind the ``ScoreModel`` interface (``space="latent"``).

    Args:
        pretrained_model_name_or_path: a diffusers model folder (or Hub id) with ``unet/``, ``vae/``
            and ``scheduler/`` subfolders.
        half_precision: load the UNet and VAE in float16 (inputs are cast, outputs come back in the
            caller's dtype).
        device: where the modules live.
        latent_sampling: ``"sample"`` (``encode`` draws ``z ~ q(z | rgb)``, reparameterised, as
            threestudio does) or ``"mean"`` (the posterior mean: deterministic).
        image_size: the side the render is resized to before the VAE; default
            ``unet.sample_size * vae_scale_factor`` (512 for SD 1.x/2.x-base).
        local_files_only: never try the network (also implied by ``HF_HUB_OFFLINE=1``).

    The noise schedule (``alphas_cumprod``) and the prediction type are read from
    ``scheduler/scheduler_config.json`` (through ``DDPMScheduler``, as threestudio does).
    ``v_prediction`` UNets are converted to noise predictions with ``eps = sigma x_t + alpha v``.

    ``decode_preview`` is the cheap image for SSD's baselines: ``preview_weight [3, C]`` and
    ``preview_bias [3]`` (non-persistent buffers, ``None`` until ``fit_preview`` runs) and the
    fit's ``preview_r2``.
    """

    space = "latent"

    def __init__(
        self,
        pretrained_model_name_or_path: str | os.PathLike,
        half_precision: bool = False,
        device: str | torch.device = "cpu",
        latent_sampling: str = "sample",
        image_size: int | None = None,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"latent_sampling must be one of {LATENT_SAMPLING}, got {latent_sampling!r}")
        path = str(pretrained_model_name_or_path)
        dtype = torch.float16 if half_precision else torch.float32
        kwargs = {"local_files_only": local_files_only}
        unet = _load(UNet2DConditionModel, path, "unet", torch_dtype=dtype, **kwargs)
        vae = _load(AutoencoderKL, path, "vae", torch_dtype=dtype, **kwargs)
        scheduler = _load(DDPMScheduler, path, "scheduler", **kwargs)
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"{path}/scheduler: prediction_type {prediction!r} is not supported (one of {PREDICTION_TYPES})"
            )
        if unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"{path}: the UNet takes {unet.config.in_channels} channels but the VAE has "
                f"{vae.config.latent_channels} latent channels"
            )
        self.unet = unet.requires_grad_(False)
        self.vae = vae.requires_grad_(False)
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.detach().clone().float(), persistent=False
        )
        self.pretrained_model_name_or_path = path
        self.prediction_type = prediction
        self.latent_sampling = latent_sampling
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.scaling_factor = float(vae.config.scaling_factor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = int(unet.config.sample_size)
        self.channels = int(unet.config.in_channels)
        self.resolution = (size, size)
        self.image_size = int(image_size) if image_size is not None else size * self.vae_scale_factor
        if self.image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of the VAE's factor {self.vae_scale_factor}"
            )
        self.cross_attention_dim = int(unet.config.cross_attention_dim)
        self.register_buffer("preview_weight", None, persistent=False)
        self.register_buffer("preview_bias", None, persistent=False)
        self.preview_r2: float | None = None
        self.to(device)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- schedule ------------------------------------------------------------------------------

    def timestep_index(self, t: Float[Tensor, " B"]) -> Tensor:
        """The discrete training step of ``t``: ``round(t * (T - 1))``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        if not torch.all((t >= 0) & (t <= 1)):
            raise ValueError(f"t must lie in [0, 1], got min {t.min().item()} max {t.max().item()}")
        return torch.round(t.double() * (self.num_train_timesteps - 1)).long()

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """``sqrt(alpha_bar[round(t (T - 1))])``."""
        return self.alphas_cumprod[self.timestep_index(t)].sqrt().to(torch.as_tensor(t).device)

    def sigma(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """``sqrt(1 - alpha_bar[round(t (T - 1))])``."""
        return (1 - self.alphas_cumprod[self.timestep_index(t)]).sqrt().to(torch.as_tensor(t).device)

    # -- image <-> latent ----------------------------------------------------------------------

    def encode(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B C h w"]:
        """``z = scaling * E(2 resize(rgb) - 1)``, differentiable in ``rgb``.

        ``resize`` is bilinear to ``image_size`` (antialiased when shrinking). ``E`` is a draw of the
        VAE posterior ``mean + std * n`` (``latent_sampling="sample"``; ``n`` from ``generator``, the
        global RNG if None) or its mean. Returned in ``rgb``'s dtype.
        """
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"encode expects rgb of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        x = resize_image(rgb, (self.image_size, self.image_size))
        posterior = self.vae.encode((2 * x - 1).to(self.dtype)).latent_dist
        if self.latent_sampling == "mean":
            z = posterior.mean
        else:
            n = torch.randn(posterior.mean.shape, generator=generator, device=generator_device(generator, rgb))
            z = posterior.mean + posterior.std * n.to(device=rgb.device, dtype=posterior.mean.dtype)
        return (z * self.scaling_factor).to(rgb.dtype)

    def decode(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """``rgb = (D(x / scaling) + 1) / 2``, differentiable in ``x``.

        Not clamped to ``[0, 1]`` (threestudio clamps for display): a decoded noisy latent may leave
        the range slightly, and the baselines downstream need ``phi(x_t)`` smooth with its true
        gradient everywhere. Returned in ``x``'s dtype. With half-precision weights the backward
        is scaled per call (``threestudio_ssd.precision.call_in_precision``), so that ``grad phi``
        of a baseline, whose entries at the image are ~1/N, is not flushed by float16.
        """
        self._check_latents(x, "decode")
        image = call_in_precision(lambda z: self.vae.decode(z).sample, x / self.scaling_factor, self.vae.dtype)
        return (image + 1) / 2

    def decode_preview(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 h w"]:
        """``rgb = W x + b`` per latent pixel (a 1x1 convolution), differentiable in ``x``.

        ``W [3, C]`` and ``b [3]`` approximate ``avg_pool(decode(x))`` (the decoded image averaged
        over each latent pixel's ``vae_scale_factor``-square footprint); they are fitted to this VAE
        by ``fit_preview`` on the first call. The image stays at the latent resolution (64x64 for
        512 px renders), not upsampled: the depth estimator resizes its input to its own size
        anyway (DPT: 384 px), so upsampling here would add work and no information, and the render
        outputs are resized to the preview (``resize_render="image"``). The cost is one 1x1
        convolution, against the VAE decoder's forward and backward. Fitted on clean latents, the
        map extrapolates linearly to noisy ``x_t``; SSD stays unbiased either way (the control
        variate is zero-mean for every differentiable ``phi``). Returned in ``x``'s dtype.
        """
        self._check_latents(x, "decode_preview")
        if self.preview_weight is None or self.preview_bias is None:
            self.fit_preview()
        weight = self.preview_weight.to(device=x.device, dtype=x.dtype)
        bias = self.preview_bias.to(device=x.device, dtype=x.dtype)
        return F.conv2d(x, weight[:, :, None, None], bias)

    @torch.no_grad()
    def fit_preview(self, n_images: int = PREVIEW_FIT_IMAGES, seed: int = PREVIEW_FIT_SEED) -> float:
        """Fit ``decode_preview``'s affine map to this VAE and return the fit's ``R^2`` (logged).

        ``n_images`` synthetic ``image_size`` px images (``synthetic_fit_images``) are encoded to
        their posterior-mean latents (scaled, as ``encode`` returns them), decoded with the real
        decoder (``decode``), the decodes average-pooled to the latent resolution, and
        latents -> pooled RGB solved by least squares in float64 (``fit_affine_map``). Deterministic;
        one VAE encode and decode per image (on a CPU, about half a minute per 512 px image).
        """
        if n_images < 1:
            raise ValueError(f"fit_preview needs n_images >= 1, got {n_images}")
        device = self.alphas_cumprod.device
        latents, pooled = [], []
        for image in synthetic_fit_images(n_images, self.image_size, seed).split(1):  # memory: one at a time
            rgb = image.to(device=device, dtype=self.dtype)
            z = self.vae.encode(2 * rgb - 1).latent_dist.mean * self.scaling_factor
            latents.append(z.float().cpu())
            pooled.append(F.avg_pool2d(self.decode(z).float(), self.vae_scale_factor).cpu())
        weight, bias, r2 = fit_affine_map(torch.cat(latents), torch.cat(pooled))
        self.preview_weight = weight.float().to(device)
        self.preview_bias = bias.float().to(device)
        self.preview_r2 = r2
        logger.info(
            "decode_preview of %s: latent -> RGB affine map fitted on %d synthetic %d px images, R^2 = %.4f",
            self.pretrained_model_name_or_path,
            n_images,
            self.image_size,
            r2,
        )
        return r2

    # -- noise prediction ----------------------------------------------------------------------

    def repeat_cond(self, cond: Float[Tensor, "twoB L D"], n: int) -> Float[Tensor, "twoBn L D"]:
        """The text embeddings for a batch repeated ``n`` times (``x.repeat(n, 1, 1, 1)``), keeping
        the order (all conditional rows, then all unconditional rows)."""
        c, u = cond.chunk(2)
        return torch.cat([c.repeat(n, 1, 1), u.repeat(n, 1, 1)])

    @torch.no_grad()
    def eps(
        self,
        x_t: Float[Tensor, "B C h w"],
        t: Float[Tensor, " B"],
        cond: Float[Tensor, "twoB L D"],
        guidance_scale: float,
    ) -> Float[Tensor, "B C h w"]:
        """Guided noise prediction ``eps_u + s (eps_c - eps_u)`` (``classifier_free_guidance``).

        ``cond`` is threestudio's text embeddings ``[2B, L, D]``: the ``B`` conditional rows first,
        then the ``B`` unconditional ones. Conditional and unconditional predictions are one UNet
        call on ``cat([x_t, x_t])``; ``s = 1`` uses only the conditional half and ``s = 0`` only the
        unconditional half. No gradient; returned in ``x_t``'s dtype.
        """
        self._check_latents(x_t, "eps")
        batch = x_t.shape[0]
        if cond.ndim != 3 or cond.shape[0] != 2 * batch or cond.shape[2] != self.cross_attention_dim:
            raise ValueError(
                f"cond must be text embeddings [2B, L, {self.cross_attention_dim}] with 2B={2 * batch} "
                f"(conditional rows first, then unconditional), got {tuple(cond.shape)}"
            )
        idx = self.timestep_index(t).to(x_t.device)
        if idx.shape != (batch,):
            raise ValueError(f"t must have shape [B] = ({batch},), got {tuple(idx.shape)}")
        x = x_t.to(self.dtype)
        cond = cond.to(device=x.device, dtype=self.dtype)
        if guidance_scale == 1.0:
            out = self._predict(x, idx, cond[:batch])
        elif guidance_scale == 0.0:
            out = self._predict(x, idx, cond[batch:])
        else:
            both = self._predict(torch.cat([x, x]), torch.cat([idx, idx]), cond)
            eps_c, eps_u = both.chunk(2)
            out = classifier_free_guidance(eps_c, eps_u, guidance_scale)
        return out.to(x_t.dtype)

    def _predict(self, x: Tensor, idx: Tensor, text: Tensor) -> Tensor:
        """UNet output converted to a noise prediction."""
        out = self.unet(x, idx, encoder_hidden_states=text).sample
        if self.prediction_type == "v_prediction":
            shape = (-1, 1, 1, 1)
            a_bar = self.alphas_cumprod[idx.to(self.alphas_cumprod.device)].to(x.device, torch.float32)
            alpha, sigma = a_bar.sqrt().view(shape), (1 - a_bar).sqrt().view(shape)
            out = (sigma * x.float() + alpha * out.float()).to(x.dtype)
        return out

    def _check_latents(self, x: Tensor, where: str) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{where} expects latents [B, {self.channels}, h, w], got {tuple(x.shape)}")


def synthetic_fit_images(n: int, size: int, seed: int = PREVIEW_FIT_SEED) -> Float[Tensor, "n 3 size size"]:
    """``n`` deterministic RGB images in ``[0, 1]`` to fit the preview decoder on (no files): a
    smooth random colour field (a random ``k x k`` grid, ``k`` in 2..5, bicubically upsampled and
    clamped) under four uniformly coloured discs and rectangles at random places and sizes, so that
    the fit sees both smooth colour ranges and edges. Drawn from a CPU generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(n):
        cells = 2 + i % 4
        field = torch.rand(1, 3, cells, cells, generator=g)
        image = F.interpolate(field, size=(size, size), mode="bicubic", align_corners=True)[0].clamp(0, 1)
        for j in range(4):
            colour = torch.rand(3, 1, 1, generator=g)
            cx, cy, r = torch.rand(3, generator=g).tolist()
            r = 0.08 + 0.22 * r
            if j % 2 == 0:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < 0.6 * r)
            image = torch.where(mask, colour, image)
        images.append(image)
    return torch.stack(images)


def fit_affine_map(
    latents: Float[Tensor, "N C h w"], rgb: Float[Tensor, "N 3 h w"]
) -> tuple[Float[Tensor, "3 C"], Float[Tensor, " 3"], float]:
    """Least squares, in float64 on the CPU, of the per-pixel affine map ``rgb = weight z + bias``
    over every pixel of every image: ``(weight [3, C], bias [3], R^2)`` with
    ``R^2 = 1 - SS_res / SS_tot``, ``SS_tot`` about each channel's mean, both summed over channels."""
    if latents.ndim != 4 or rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(
            f"fit_affine_map expects latents [N, C, h, w] and rgb [N, 3, h, w], got "
            f"{tuple(latents.shape)} and {tuple(rgb.shape)}"
        )
    if latents.shape[0] != rgb.shape[0] or latents.shape[2:] != rgb.shape[2:]:
        raise ValueError(f"latents {tuple(latents.shape)} and rgb {tuple(rgb.shape)} must share N, h and w")
    channels = latents.shape[1]
    z = latents.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, channels)
    y = rgb.detach().double().cpu().permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [C + 1, 3]
    ss_res = (y - design @ solution).pow(2).sum()
    ss_tot = (y - y.mean(0)).pow(2).sum()
    r2 = (1 - ss_res / ss_tot).item() if ss_tot > 0 else float("nan")
    return solution[:channels].T.contiguous(), solution[channels].contiguous(), r2


