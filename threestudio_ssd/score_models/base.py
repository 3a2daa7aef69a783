"""The one score-model interface that SDS, VSD and SSD consume (docs/ARCHITECTURE.md).

A ``ScoreModel`` hides whether the prior is Stable Diffusion (latent space, discrete time) or an
LCSS prior (pixel space, continuous time). Everything else in the project -- the guidance, the
2-D playground, the benchmarks -- talks to this interface only.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lcss_prior.guidance import classifier_free_guidance  # noqa: F401  (re-exported)


def sds_weight(alpha: Float[Tensor, " B"], sigma: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
    """threestudio's ``sds`` weighting ``w(t) = sigma^2 / (alpha^2 + sigma^2)`` (``1 - alpha_bar``
    for a variance-preserving process)."""
    return sigma**2 / (alpha**2 + sigma**2)


class ScoreModel(nn.Module, abc.ABC):
    """A frozen, conditional noise predictor with its forward process
    ``x_t = alpha(t) x0 + sigma(t) eps`` and the map between rendered RGB and model space.

    ``t`` is always a float tensor ``[B]`` in ``[0, 1]``.
    """

    space: str  # "latent" or "pixel"
    channels: int
    resolution: tuple[int, int]  # model-space (H, W)

    @abc.abstractmethod
    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Signal coefficient of the forward process at ``t``."""

    @abc.abstractmethod
    def sigma(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Noise standard deviation of the forward process at ``t``."""

    @abc.abstractmethod
    def encode(
        self, rgb: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B C h w"]:
        """RGB in ``[0, 1]`` (any size) to model space ``x0``; differentiable. A stochastic encoder
        (a VAE posterior draw) takes its randomness from ``generator``; deterministic ones ignore it."""

    @abc.abstractmethod
    def decode(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """Model space to RGB in ``[0, 1]``; differentiable (the bridge to depth estimators)."""

    def decode_preview(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B 3 H W"]:
        """A cheap differentiable image of ``x`` (RGB, about ``[0, 1]``) for SSD's geometric
        baselines (``DistillationConfig.baseline_decoder="preview"``); any size, the baselines resize.

        The Stein control variate is zero-mean for every differentiable ``phi``, so a cheaper image
        keeps SSD unbiased and only changes how well ``phi`` tracks the score. Default: ``decode(x)``
        (pixel priors such as the LCSS prior: nothing to save); latent priors override it.
        """
        return self.decode(x)

    @abc.abstractmethod
    def eps(
        self, x_t: Float[Tensor, "B C h w"], t: Float[Tensor, " B"], cond: Any, guidance_scale: float
    ) -> Float[Tensor, "B C h w"]:
        """Classifier-free-guided noise prediction, without gradient."""

    @abc.abstractmethod
    def repeat_cond(self, cond: Any, n: int) -> Any:
        """The condition of a batch repeated ``n`` times, matching ``x.repeat(n, 1, 1, 1)``."""

    def add_noise(
        self, x0: Float[Tensor, "B C h w"], eps: Float[Tensor, "B C h w"], t: Float[Tensor, " B"]
    ) -> Float[Tensor, "B C h w"]:
        """``x_t = alpha(t) x0 + sigma(t) eps``."""
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.alpha(t).view(shape) * x0 + self.sigma(t).view(shape) * eps

    def weight(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """The ``sds`` weighting at ``t``."""
        return sds_weight(self.alpha(t), self.sigma(t))

    def train(self, mode: bool = True) -> ScoreModel:  # frozen: always eval
        return super().train(False)
