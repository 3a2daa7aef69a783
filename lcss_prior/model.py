"""The noise-prediction network of an LCSS prior: a class-conditional diffusers ``UNet2DModel``.

``build_unet`` sizes the UNet for 8-64 px images on a CPU; ``EpsNetwork`` wraps it as the one
``model_fn(x_t, t, class_labels) -> eps_hat`` that every loss, sampler and the exported prior use;
``get_score_fn`` is the one place that turns its output into a score.

Conventions (docs/ARCHITECTURE.md): ``t`` is a float tensor ``[B]`` in ``[0, 1]``; the UNet's
timestep input is ``time_scale * t`` (``999 * t`` by default, the scale of a 1000-step discrete
schedule, so the sinusoidal time embedding sees the frequencies it was designed for). Class
conditioning uses ``num_class_embeds = num_classes + 1``; the last index is the NULL class that
classifier-free guidance uses as "no condition".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from jaxtyping import Float, Int
from torch import Tensor, nn

from lcss_prior.sde import generator_device

# Per-level widths, ResNet blocks per level and the largest feature size (pixels) that still gets
# self-attention. The number of levels used is what the resolution allows (smallest map >= 2 px).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "attention_max_size": 4,
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    "small": {
        "block_out_channels": (64, 128, 128, 128),
        "layers_per_block": 1,
        "attention_max_size": 8,
        "norm_num_groups": 16,
        "attention_head_dim": 32,
    },
    "base": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "attention_max_size": 16,
        "norm_num_groups": 32,
        "attention_head_dim": 64,
    },
}

INPUT_SCALINGS = ("edm", "none")
OUTPUT_SCALINGS = ("edm", "none")


def build_unet(
    resolution: int,
    channels: int,
    num_classes: int,
    preset: str = "tiny",
    *,
    block_out_channels: Sequence[int] | None = None,
    layers_per_block: int | None = None,
    attention: Sequence[bool] | None = None,
    norm_num_groups: int | None = None,
    attention_head_dim: int | None = None,
) -> UNet2DModel:
    """Build an epsilon-predicting ``UNet2DModel`` for ``channels x resolution x resolution`` images.

    ``num_classes > 0`` gives a class-conditional UNet with ``num_class_embeds = num_classes + 1``
    (index ``num_classes`` is the NULL class); ``num_classes = 0`` an unconditional one.
    ``preset`` picks widths and depth (``PRESETS``); ``block_out_channels`` (one width per level),
    ``layers_per_block``, ``attention`` (one flag per level), ``norm_num_groups`` and
    ``attention_head_dim`` override it. With a preset, the number of levels is capped so that the
    smallest feature map is at least 2 px.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose one of {sorted(PRESETS)}")
    if not isinstance(resolution, int) or resolution < 4:
        raise ValueError(f"resolution must be an integer >= 4, got {resolution!r}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels!r}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
    spec = PRESETS[preset]
    if block_out_channels is None:
        max_levels = int(math.log2(resolution)) if resolution > 0 else 1  # down to >= 2 px
        widths = tuple(spec["block_out_channels"][: max(1, min(len(spec["block_out_channels"]), max_levels))])
    else:
        widths = tuple(int(w) for w in block_out_channels)
    n_levels = len(widths)
    if resolution % 2 ** (n_levels - 1) != 0:
        raise ValueError(
            f"resolution {resolution} is not divisible by 2**{n_levels - 1}, which {n_levels} UNet levels need"
        )
    sizes = [resolution // 2**i for i in range(n_levels)]
    if attention is None:
        attention = [s <= spec["attention_max_size"] for s in sizes]
    attention = [bool(a) for a in attention]
    if len(attention) != n_levels:
        raise ValueError(f"attention needs one flag per level ({n_levels}), got {len(attention)}")
    groups = int(norm_num_groups if norm_num_groups is not None else spec["norm_num_groups"])
    bad = [w for w in widths if w % groups != 0]
    if bad:
        raise ValueError(f"block_out_channels {widths} must be divisible by norm_num_groups={groups}")
    head_dim = int(attention_head_dim if attention_head_dim is not None else spec["attention_head_dim"])
    head_dim = min(head_dim, min(widths))
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=widths,
        layers_per_block=int(layers_per_block if layers_per_block is not None else spec["layers_per_block"]),
        norm_num_groups=groups,
        attention_head_dim=head_dim,
        num_class_embeds=num_classes + 1 if num_classes > 0 else None,
    )


class EpsNetwork(nn.Module):
    """``model_fn(x_t, t, class_labels) -> eps_hat``: a UNet with continuous time and input scaling.

    ``F = unet(c_in(t) * x_t, time_scale * t, labels)`` with, for ``input_scaling="edm"``,
    ``c_in(t) = 1 / sqrt(alpha(t)^2 sigma_data^2 + std(t)^2)`` (EDM's preconditioning: unit input
    variance when the data have standard deviation ``sigma_data``; it keeps VE inputs, whose noise
    reaches tens, in the UNet's range), and ``c_in = 1`` for ``"none"``.

    ``output_scaling="none"``: ``eps_hat = F``. ``output_scaling="edm"``: EDM's skip connection
    written for a noise prediction, ``eps_hat = std c_in^2 x_t + alpha sigma_data c_in F``: the first
    term is the best *linear* guess of ``eps`` from ``x_t`` (exact for Gaussian data of variance
    ``sigma_data^2``) and the UNet predicts the normalised rest. At large ``t`` (``alpha -> 0``) the
    first term is ``~ x_t`` and the UNet's error is scaled by ``alpha``: a plain eps-network must
    output ``x_t`` there to a precision far below ``alpha`` (its error becomes ``std / alpha`` times
    larger in ``x0``), which a small network trained for minutes does not reach, and the sampler's
    first steps then drift the whole image (black or white samples). On VP with
    ``sigma_data = 1`` this is v-prediction (``eps = std x_t + alpha v``). ``class_labels=None``
    means the NULL class. Label dropout for classifier-free guidance is ``drop_labels``, applied
    by the training step once per sample *before* the loss, so that the several network calls a
    loss makes for one sample (LCSS makes two) see the same condition.
    """

    def __init__(
        self,
        unet: UNet2DModel,
        sde: Any = None,
        *,
        input_scaling: str = "edm",
        output_scaling: str = "none",
        sigma_data: float = 0.5,
        time_scale: float = 999.0,
        p_uncond: float = 0.1,
    ) -> None:
        super().__init__()
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, got {input_scaling!r}")
        if output_scaling not in OUTPUT_SCALINGS:
            raise ValueError(f"output_scaling must be one of {OUTPUT_SCALINGS}, got {output_scaling!r}")
        if "edm" in (input_scaling, output_scaling) and sde is None:
            raise ValueError("input_scaling/output_scaling 'edm' needs the SDE (its alpha(t) and std(t))")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond!r}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        self.unet = unet
        # Not a submodule: the SDE carries no trainable state and must stay out of the state dict.
        self.__dict__["sde"] = sde
        self.input_scaling = input_scaling
        self.output_scaling = output_scaling
        self.sigma_data = float(sigma_data)
        self.time_scale = float(time_scale)
        self.p_uncond = float(p_uncond)

    @property
    def num_classes(self) -> int:
        """Number of real classes (0 for an unconditional UNet)."""
        n = self.unet.config.num_class_embeds
        return 0 if n is None else int(n) - 1

    @property
    def null_class(self) -> int | None:
        """Index of the NULL (unconditional) class, ``None`` for an unconditional UNet."""
        return self.num_classes if self.num_classes > 0 else None

    @property
    def config(self) -> dict[str, Any]:
        """The wrapper's settings (the UNet has its own ``config``), as stored in ``prior.json``."""
        return {
            "input_scaling": self.input_scaling,
            "output_scaling": self.output_scaling,
            "sigma_data": self.sigma_data,
            "time_scale": self.time_scale,
        }

    def scalings(
        self, t: Float[Tensor, " B"]
    ) -> tuple[Float[Tensor, " B"], Float[Tensor, " B"], Float[Tensor, " B"]]:
        """``(c_in, c_skip, c_out)`` of ``eps_hat = c_skip x_t + c_out unet(c_in x_t, ...)``, from one
        evaluation of ``alpha(t)`` and ``std(t)``. With ``c = 1 / sqrt(alpha^2 sigma_data^2 + std^2)``:
        ``c_in = c`` (``1`` for ``input_scaling="none"``); ``(c_skip, c_out) = (std c^2, alpha
        sigma_data c)`` for ``output_scaling="edm"``, ``(0, 1)`` for ``"none"``."""
        one = torch.ones_like(t)
        if self.input_scaling == "none" and self.output_scaling == "none":
            return one, torch.zeros_like(t), one
        alpha, std = self.sde.alpha(t), self.sde.std(t)
        c = torch.rsqrt(alpha**2 * self.sigma_data**2 + std**2)
        c_in = c if self.input_scaling == "edm" else one
        if self.output_scaling == "none":
            return c_in, torch.zeros_like(t), one
        return c_in, std * c**2, alpha * self.sigma_data * c

    def c_in(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Input scale ``1 / sqrt(alpha(t)^2 sigma_data^2 + std(t)^2)`` (``1`` for ``"none"``)."""
        return self.scalings(t)[0]

    def skip_and_out(self, t: Float[Tensor, " B"]) -> tuple[Float[Tensor, " B"], Float[Tensor, " B"]]:
        """``(c_skip, c_out)`` of ``scalings``."""
        return self.scalings(t)[1:]

    def forward(
        self,
        x_t: Float[Tensor, "B C H W"],
        t: Float[Tensor, " B"],
        class_labels: Int[Tensor, " B"] | None = None,
    ) -> Float[Tensor, "B C H W"]:
        """``eps_hat = c_skip x_t + c_out unet(c_in(t) x_t, time_scale t, labels)``; ``None`` labels =
        NULL class."""
        if x_t.dim() != 4:
            raise ValueError(f"x_t must be [B, C, H, W], got shape {tuple(x_t.shape)}")
        b = x_t.shape[0]
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape [B]=({b},), got {tuple(t.shape)}")
        labels = None
        if self.null_class is not None:
            if class_labels is None:
                labels = torch.full((b,), self.null_class, dtype=torch.long, device=x_t.device)
            else:
                labels = torch.as_tensor(class_labels, device=x_t.device).long()
                if labels.shape != (b,):
                    raise ValueError(f"class_labels must have shape [B]=({b},), got {tuple(labels.shape)}")
                if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
                    raise ValueError(
                        f"class_labels must lie in [0, {self.null_class}] ({self.null_class} = NULL class), "
                        f"got values in [{int(labels.min())}, {int(labels.max())}]"
                    )
        return self.predict(x_t, t, labels)

    def predict(self, x_t: Float[Tensor, "B C H W"], t: Float[Tensor, " B"], unet_labels: Any) -> Tensor:
        """``c_skip x_t + c_out unet(c_in x_t, time_scale t, unet_labels)`` with ``t [B]`` and the
        UNet's class input passed through unchecked: ``forward`` after its checks, and the one way a
        wrapper with its own class embedding (the VSD particle's label + camera) runs this network."""
        b = x_t.shape[0]
        c_in, c_skip, c_out = (c.to(x_t.dtype).view(b, 1, 1, 1) for c in self.scalings(t))
        out = self.unet(c_in * x_t, self.time_scale * t, class_labels=unet_labels).sample
        if self.output_scaling == "none":
            return out
        return c_skip * x_t + c_out * out

    def drop_labels(
        self, class_labels: Int[Tensor, " B"], generator: torch.Generator | None = None
    ) -> Int[Tensor, " B"]:
        """Classifier-free-guidance label dropout: each label becomes NULL with prob. ``p_uncond``.

        Only in training mode (``self.training``) and only for a conditional UNet; otherwise the
        labels come back unchanged. Returns a new tensor (the caller's is not modified).
        """
        if not self.training or self.null_class is None or self.p_uncond == 0.0:
            return class_labels
        u = torch.rand(
            class_labels.shape, generator=generator, device=generator_device(generator, class_labels)
        )
        u = u.to(class_labels.device)
        return torch.where(u < self.p_uncond, torch.full_like(class_labels, self.null_class), class_labels)


def get_score_fn(sde: Any, model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``score_fn(x, t, cond) = sde.score_from_eps(model(x, t, cond), t)`` (``-eps_hat / std(t)``
    for an affine SDE): the one place that turns a noise prediction into a score."""

    def score_fn(
        x: Float[Tensor, "B C H W"], t: Float[Tensor, " B"], cond: Tensor | None = None
    ) -> Float[Tensor, "B C H W"]:
        return sde.score_from_eps(model(x, t, cond), t)

    return score_fn
