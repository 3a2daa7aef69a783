"""Variational score distillation (VSD, ProlificDreamer) for custom pixel priors: the
camera-conditioned particle score model.

VSD replaces the noise that SDS subtracts by the prediction of a second network that is trained,
online, on the current renders (the "particles")::

    Delta_VSD = w(t) * (eps_hat_prior(x_t; y, t) - eps_hat_particle(x_t; y, c, t))

with ``eps_hat_prior`` the frozen prior's classifier-free-guided prediction and
``eps_hat_particle`` the particle model's, camera-guided ``e_u + s_c (e_c - e_u)`` (``e_c``: with
the camera ``c``, ``e_u``: with the null camera; ``s_c = 1`` is camera-conditioned only). The
particle model is trained with the denoising loss on the detached renders,
``0.5 mean ||eps_hat_particle(alpha x0 + sigma eps'; y, c, t') - eps'||^2`` at fresh
``t' ~ U[t_eps, 1]`` and ``eps'`` (``lcss_prior.losses.SDELoss``, method ``dsm``), with the camera
replaced by the null camera for a fraction ``camera_dropout`` of the samples (so that ``e_u`` is
trained too).

VSD is NOT an unbiased estimator of the SDS mean. ``E_eps[eps] = 0`` is what makes SDS's
subtraction a zero-mean control variate; ``E_eps[eps_hat_particle(x_t)]`` is not zero: it is the
(learned) noise prediction of the distribution of the renders, so VSD follows another gradient
(the KL between the noised render distribution and the prior, ProlificDreamer's eq. 9) and its
variance is not comparable to SDS's at equal mean. Where the particle model is perfect for a single
deterministic render, ``eps_hat_particle(x_t) = (x_t - alpha x0) / sigma = eps`` and VSD is SDS.

Camera conditioning. The particle network is a copy of the prior's ``EpsNetwork`` (its diffusers
``UNet2DModel``) whose class-embedding slot -- added to the time embedding inside the UNet -- is
replaced by :class:`LabelCameraEmbedding`: ``emb(y) + MLP(vec(c2w))``. The UNet receives one
``class_labels`` tensor ``[B, 1 + 16]`` holding the caption id (as a float; exact below 2^24)
followed by the flattened ``c2w`` (:func:`pack_condition`); the null camera is ``c2w = 0``. The
MLP's last layer starts at zero, so at initialisation the particle model is exactly the prior's
conditional network (guidance scale 1) for every camera.

Training modes: full fine-tune of the copy (default; right for our small pixel priors) or LoRA
(``lora_rank``): every ``nn.Linear`` of the copied UNet (attention projections, time-embedding and
ResNet time projections) gets a zero-initialised low-rank update ``W + (alpha / r) B A`` and only
``A``, ``B`` and the camera MLP train.

Pure torch + ``lcss_prior``; only pixel priors (``LCSSPriorScoreModel``) are supported. For Stable
Diffusion use threestudio's own ``stable-diffusion-vsd-guidance``.
"""

from __future__ import annotations

import copy
import math

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from lcss_prior.guidance import classifier_free_guidance
from lcss_prior.losses import SDELoss
from lcss_prior.model import EpsNetwork
from lcss_prior.sde import generator_device
from threestudio_ssd.score_models.base import ScoreModel

__all__ = [
    "CameraEmbedding",
    "LabelCameraEmbedding",
    "LoRALinear",
    "ParticleScoreModel",
    "pack_condition",
]

CAMERA_DIM = 16  # a flattened 4x4 c2w


def pack_condition(
    labels: Int[Tensor, " B"] | None, c2w: Float[Tensor, "B 4 4"], null_class: int | None
) -> Float[Tensor, "B 17"]:
    """The particle UNet's ``class_labels``: ``[label, vec(c2w)]`` per sample (``label`` as a float;
    ``None`` labels mean the NULL class, or 0 for an unconditional network, where it is ignored)."""
    if c2w.ndim != 3 or tuple(c2w.shape[1:]) != (4, 4):
        raise ValueError(f"c2w must be [B, 4, 4] camera-to-world matrices, got {tuple(c2w.shape)}")
    b = c2w.shape[0]
    if labels is None:
        labels = torch.full((b,), 0 if null_class is None else null_class, device=c2w.device)
    labels = torch.as_tensor(labels, device=c2w.device)
    if labels.shape != (b,):
        raise ValueError(f"labels must be caption ids of shape [B] = ({b},), got {tuple(labels.shape)}")
    return torch.cat([labels.to(c2w.dtype)[:, None], c2w.reshape(b, CAMERA_DIM)], dim=1)


class CameraEmbedding(nn.Module):
    """``MLP(vec(c2w)) = W2 silu(W1 vec(c2w) + b1) + b2`` into the UNet's time-embedding space;
    ``W2``, ``b2`` start at zero (the embedding starts as exactly 0 for every camera)."""

    def __init__(self, embed_dim: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(CAMERA_DIM, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, embed_dim)
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, camera: Float[Tensor, "B 16"]) -> Float[Tensor, "B D"]:
        """The camera's embedding ``[B, embed_dim]``."""
        return self.net(camera)


class LabelCameraEmbedding(nn.Module):
    """The particle UNet's class embedding: ``emb(label) + CameraEmbedding(vec(c2w))`` from a packed
    ``[B, 17]`` condition (:func:`pack_condition`); ``label_embedding=None`` for an unconditional
    network (the label column is ignored)."""

    def __init__(self, label_embedding: nn.Embedding | None, camera: CameraEmbedding) -> None:
        super().__init__()
        self.label_embedding = label_embedding
        self.camera = camera

    def forward(self, packed: Float[Tensor, "B 17"]) -> Float[Tensor, "B D"]:
        if packed.ndim != 2 or packed.shape[1] != 1 + CAMERA_DIM:
            raise ValueError(f"expected a packed [B, 17] (label, c2w) condition, got {tuple(packed.shape)}")
        out = self.camera(packed[:, 1:])
        if self.label_embedding is not None:
            out = out + self.label_embedding(packed[:, 0].round().long())
        return out


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * x A^T B^T`` with a frozen ``base`` ``nn.Linear``, ``A`` ``[r, in]``
    (Kaiming-uniform) and ``B`` ``[out, r]`` (zeros): the update starts at exactly zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base.requires_grad_(False)
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        p = base.weight
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=p.device, dtype=p.dtype))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=p.device, dtype=p.dtype))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    def forward(self, x: Float[Tensor, "... I"]) -> Float[Tensor, "... O"]:
        return self.base(x) + self.scale * (x @ self.lora_down.T) @ self.lora_up.T


def _add_lora(module: nn.Module, rank: int) -> int:
    """Replace every ``nn.Linear`` below ``module`` by a :class:`LoRALinear`; returns the count."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, LoRALinear(child, rank))
            count += 1
        elif not isinstance(child, LoRALinear):
            count += _add_lora(child, rank)
    return count


class ParticleScoreModel(nn.Module):
    """VSD's camera-conditioned, trainable copy of a pixel prior's noise predictor (module docstring).

    Args:
        score_model: the frozen prior (an ``LCSSPriorScoreModel``); its network is copied, never
            modified.
        guidance_scale: camera guidance ``s_c`` in ``e_u + s_c (e_c - e_u)`` (1: camera-conditioned
            only, ProlificDreamer's default).
        camera_dropout: probability that a training sample sees the null camera.
        lora_rank: ``None`` for a full fine-tune, else the LoRA rank.
        camera_hidden_dim: width of the camera MLP.
    """

    def __init__(
        self,
        score_model: ScoreModel,
        guidance_scale: float = 1.0,
        camera_dropout: float = 0.1,
        lora_rank: int | None = None,
        camera_hidden_dim: int = 64,
    ) -> None:
        super().__init__()
        network = getattr(getattr(score_model, "prior", None), "network", None)
        if score_model.space != "pixel" or not isinstance(network, EpsNetwork):
            raise TypeError(
                f"VSD here needs a pixel prior with an lcss_prior EpsNetwork (LCSSPriorScoreModel), got "
                f"{type(score_model).__name__}; for Stable Diffusion use threestudio's stable-diffusion-vsd-guidance"
            )
        if not 0.0 <= camera_dropout < 1.0:
            raise ValueError(f"camera_dropout must be in [0, 1), got {camera_dropout!r}")
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"lora_rank must be None (full fine-tune) or >= 1, got {lora_rank!r}")
        self.guidance_scale = float(guidance_scale)
        self.camera_dropout = float(camera_dropout)
        self.lora_rank = lora_rank
        self.null_class = network.null_class
        net = copy.deepcopy(network)
        net.p_uncond = 0.0  # the caption is never dropped: only the camera is (below)
        net.requires_grad_(True)
        unet = net.unet
        ref = next(unet.parameters())
        camera = CameraEmbedding(unet.time_embedding.linear_2.out_features, camera_hidden_dim).to(
            device=ref.device, dtype=ref.dtype
        )
        if lora_rank is not None:
            net.requires_grad_(False)
            if _add_lora(unet, lora_rank) == 0:
                raise ValueError("the prior's UNet has no nn.Linear layers to adapt with LoRA")
        unet.class_embedding = LabelCameraEmbedding(unet.class_embedding, camera)
        self.network = net
        self.__dict__["sde"] = network.sde  # plain attribute: no state of its own
        self._loss = SDELoss(network.sde, method="dsm", reduction="mean")

    @property
    def camera_embedding(self) -> CameraEmbedding:
        return self.network.unet.class_embedding.camera

    def model_fn(
        self, x_t: Float[Tensor, "B C H W"], t: Float[Tensor, " B"], packed: Float[Tensor, "B 17"]
    ) -> Float[Tensor, "B C H W"]:
        """``eps_hat`` of the prior network's own prediction path (``EpsNetwork.predict``: its input
        and output scalings and time scale) with the packed condition ``[label, vec(c2w)]`` as the
        UNet's class input; differentiable."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device).expand(x_t.shape[0])
        return self.network.predict(x_t, t, packed)

    @torch.no_grad()
    def eps(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Float[Tensor, " B"],
        cond: Int[Tensor, " B"] | None,
        c2w: Float[Tensor, "B 4 4"],
    ) -> Float[Tensor, "B C H W"]:
        """Camera-guided particle prediction ``e_u + s_c (e_c - e_u)`` (one batched call of ``2B``;
        ``s_c = 1`` skips ``e_u``), no gradient. ``cond``: caption ids ``[B]`` (or ``None``)."""
        c2w = c2w.to(x_t)
        packed = pack_condition(cond, c2w, self.null_class)
        if self.guidance_scale == 1.0:
            return self.model_fn(x_t, t, packed)
        null = pack_condition(cond, torch.zeros_like(c2w), self.null_class)
        both = self.model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([packed, null]))
        e_c, e_u = both.chunk(2)
        return classifier_free_guidance(e_c, e_u, self.guidance_scale)

    def loss(
        self,
        x0: Float[Tensor, "B C H W"],
        cond: Int[Tensor, " B"] | None,
        c2w: Float[Tensor, "B 4 4"],
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, " B"]:
        """Per-sample denoising loss ``0.5 mean ||eps_hat_particle(x_t'; y, c', t') - eps'||^2`` of the
        particles ``x0`` (detached here), ``t' ~ U[t_eps, 1]``, ``c' = 0`` (null camera) with
        probability ``camera_dropout``; all randomness from ``generator``."""
        x0 = x0.detach()
        c2w = c2w.detach().to(x0)
        if c2w.shape[0] != x0.shape[0]:
            raise ValueError(f"c2w has batch {c2w.shape[0]} but x0 has {x0.shape[0]}")
        if self.camera_dropout > 0:
            device = generator_device(generator, x0)
            drop = (
                torch.rand(x0.shape[0], generator=generator, device=device).to(x0.device)
                < self.camera_dropout
            )
            c2w = torch.where(drop[:, None, None], torch.zeros_like(c2w), c2w)
        packed = pack_condition(cond, c2w, self.null_class)
        return self._loss(self.model_fn, x0, packed, generator)
