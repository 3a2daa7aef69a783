"""An exported LCSS prior (``lcss_prior.export``) as a pixel-space ``ScoreModel``."""

from __future__ import annotations

import os

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lcss_prior.export import Prior, load_prior
from threestudio_ssd.score_models.base import ScoreModel
from threestudio_ssd.score_models.image import resize_image


class LCSSPriorScoreModel(ScoreModel):
    """A frozen pixel-space prior trained by ``lcss_prior`` (``space="pixel"``).

    ``x0 = 2 * resize(rgb) - 1`` in ``[-1, 1]`` at the prior's resolution; ``alpha``, ``sigma`` and
    the guided noise prediction come from the prior's SDE and network. ``cond`` is a ``[B]``
    integer tensor of caption ids (``caption_to_label``), or ``None`` for the unconditional model.

    Args:
        prior: a prior folder (``lcss_prior.export.export_prior``) or a loaded ``Prior``.
        device, dtype: where and in what precision a folder is loaded (a ``Prior`` is moved).
    """

    space = "pixel"

    def __init__(
        self,
        prior: str | os.PathLike | Prior,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if isinstance(prior, Prior):
            prior = prior.to(device=device, dtype=dtype)
        elif isinstance(prior, str | os.PathLike):
            prior = load_prior(prior, device=device, dtype=dtype)
        else:
            raise TypeError(f"prior must be a prior folder path or a Prior, got {type(prior).__name__}")
        if not prior.sde.is_affine:
            # score distillation noises a render as x_t = alpha(t) x0 + sigma(t) eps; for a
            # non-affine SDE that is not the marginal the network was trained on, so eps_hat would
            # not be E[eps | x_t] and SDS/SSD/VSD would distil something else without a word
            raise ValueError(
                f"the prior's forward SDE {prior.sde.name!r} is not affine: x_t = alpha x0 + sigma eps "
                "is not its marginal, so it cannot be distilled; train the prior with --sde vp, "
                "subvp or ve"
            )
        self.prior = prior.requires_grad_(False)
        self.channels = int(prior.channels)
        self.resolution = (int(prior.resolution), int(prior.resolution))
        self.eval()

    @property
    def captions(self) -> list[str]:
        """The prior's captions; label ``i`` is ``captions[i]``."""
        return self.prior.captions

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional (NULL) class, or ``None`` for an unconditional prior."""
        return self.prior.null_class

    def caption_to_label(self, text: str) -> int:
        """The label of caption ``text`` (``KeyError`` listing the known captions otherwise)."""
        return self.prior.caption_to_label(text)

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """The prior SDE's signal coefficient ``alpha(t)``."""
        return self.prior.alpha(t)

    def sigma(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """The prior SDE's noise standard deviation ``sigma(t)``."""
        return self.prior.sigma(t)

    def encode(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B C h w"]:
        """``x0 = 2 * resize(rgb) - 1`` (deterministic: ``generator`` is unused): bilinear to the prior's resolution (antialiased when
        shrinking), differentiable. A 1-channel prior gets the mean of the RGB channels."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"encode expects rgb of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        x = resize_image(rgb, self.resolution)
        if self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif self.channels != 3:
            raise ValueError(f"cannot encode RGB for a prior with {self.channels} channels")
        return 2 * x - 1

    def decode(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 h w"]:
        """``rgb = (x + 1) / 2``, not clamped: ``x_t`` leaves ``[-1, 1]`` and the baselines need
        ``phi(x_t)`` smooth with its true gradient everywhere (a clamp would zero it outside).
        A 1-channel prior's grey image is repeated to 3 channels."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"decode expects [B, {self.channels}, h, w], got {tuple(x.shape)}")
        rgb = (x + 1) / 2
        return rgb.expand(-1, 3, -1, -1) if self.channels == 1 else rgb

    def repeat_cond(self, cond: Int[Tensor, " B"] | None, n: int) -> Int[Tensor, " Bn"] | None:
        """The labels for a batch repeated ``n`` times (``x.repeat(n, 1, 1, 1)``)."""
        return None if cond is None else torch.as_tensor(cond).repeat(n)

    @torch.no_grad()
    def eps(
        self,
        x_t: Float[Tensor, "B C h w"],
        t: Float[Tensor, " B"],
        cond: Int[Tensor, " B"] | None,
        guidance_scale: float,
    ) -> Float[Tensor, "B C h w"]:
        """Guided noise prediction ``eps_u + s (eps_c - eps_u)`` of the prior (``Prior.eps``), no
        gradient. ``cond``: caption ids ``[B]`` or ``None`` (unconditional)."""
        if x_t.ndim != 4 or x_t.shape[1] != self.channels or tuple(x_t.shape[2:]) != self.resolution:
            raise ValueError(
                f"eps expects x_t [B, {self.channels}, {self.resolution[0]}, {self.resolution[1]}], "
                f"got {tuple(x_t.shape)}"
            )
        if cond is not None:
            cond = torch.as_tensor(cond, device=x_t.device)
            if cond.shape != (x_t.shape[0],):
                raise ValueError(
                    f"cond must be caption ids of shape [B] = ({x_t.shape[0]},), got {tuple(cond.shape)}"
                )
            n_labels = len(self.captions)
            bad = cond[(cond < 0) | (cond > n_labels)]
            if bad.numel():
                raise ValueError(
                    f"cond holds label {int(bad[0])}; valid labels are 0..{n_labels - 1} (captions) "
                    f"and {self.null_class} (NULL)"
                )
        return self.prior.eps(x_t, t, cond, guidance_scale)
