"""The one baseline interface: ``phi(image, render) -> (phi [B], valid [B])``.

A baseline function ``phi`` builds the Stein control variate ``h = eps * phi - sigma * grad phi``
(``threestudio_ssd.stein``). ``phi`` must be a function of the image (hence of ``x_t``) only, so
every rendered quantity is a detached constant here: :meth:`Baseline.__call__` detaches the render
before any subclass sees it.

Baselines are plain Python objects, not ``nn.Module``s, so a frozen depth network held by a
baseline never enters a guidance's or system's state dict or optimizer.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass(frozen=True)
class RenderOutputs:
    """What a baseline may know about the render, all ``[B, H, W, ...]`` at the image's resolution.

    Attributes:
        depth: distance from the camera centre to the surface along the *unit* ray direction, given
            that the ray hits (i.e. already divided by opacity for volume renderers, whose ``depth``
            is ``sum_i w_i t_i``); 0 where the ray is empty. Not z-depth.
        opacity: accumulated opacity in ``[0, 1]``.
        normal: world-space *unit* normals, or ``None`` (not threestudio's ``comp_normal``
            encoding: :meth:`from_threestudio` converts that).
        c2w: camera-to-world matrices (OpenGL: columns right, up, back, position), or ``None``.
        fovy_deg: vertical field of view in degrees, or ``None`` (threestudio's batch holds
            radians under ``fovy``; :meth:`from_threestudio` converts).
    """

    depth: Float[Tensor, "B H W"]
    opacity: Float[Tensor, "B H W"]
    normal: Float[Tensor, "B H W 3"] | None = None
    c2w: Float[Tensor, "B 4 4"] | None = None
    fovy_deg: Float[Tensor, " B"] | None = None

    def __post_init__(self) -> None:
        if self.depth.dim() != 3:
            raise ValueError(f"RenderOutputs.depth must be [B, H, W], got {tuple(self.depth.shape)}")
        if self.opacity.shape != self.depth.shape:
            raise ValueError(
                f"RenderOutputs.opacity has shape {tuple(self.opacity.shape)} but depth has "
                f"{tuple(self.depth.shape)}"
            )
        if self.normal is not None and self.normal.shape != (*self.depth.shape, 3):
            raise ValueError(
                f"RenderOutputs.normal must be [B, H, W, 3] = {(*self.depth.shape, 3)}, "
                f"got {tuple(self.normal.shape)}"
            )
        b = self.depth.shape[0]
        if self.c2w is not None and self.c2w.shape != (b, 4, 4):
            raise ValueError(
                f"RenderOutputs.c2w must be [B, 4, 4] = {(b, 4, 4)}, got {tuple(self.c2w.shape)}"
            )
        if self.fovy_deg is not None:
            fovy = torch.as_tensor(self.fovy_deg, dtype=self.depth.dtype, device=self.depth.device)
            object.__setattr__(self, "fovy_deg", fovy.reshape(-1).expand(b) if fovy.numel() == 1 else fovy)
            if self.fovy_deg.shape != (b,):
                raise ValueError(
                    f"RenderOutputs.fovy_deg must be [B] = ({b},), got {tuple(self.fovy_deg.shape)}"
                )

    @property
    def batch_size(self) -> int:
        return self.depth.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.depth.shape[1:])  # type: ignore[return-value]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> RenderOutputs:
        return replace(
            self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None}
        )

    def detached(self) -> RenderOutputs:
        """The same outputs with every tensor detached (constants for ``phi``)."""
        return self._map(Tensor.detach)

    def expand(self, batch_size: int) -> RenderOutputs:
        """Repeat a single render ``batch_size`` times (e.g. for several noise draws of one view)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"Cannot expand a render batch of {self.batch_size} to {batch_size}")
        return self._map(lambda v: v.expand(batch_size, *v.shape[1:]))

    def repeat(self, n: int) -> RenderOutputs:
        """The batch repeated ``n`` times in the order of ``x.repeat(n, 1, 1, 1)`` (several noise
        draws per view)."""
        return self if n == 1 else self._map(lambda v: v.repeat(n, *([1] * (v.ndim - 1))))

    def resized(self, height: int, width: int) -> RenderOutputs:
        """The render at ``height x width``, resampled bilinearly (antialiased when shrinking).

        Depth and normals are resampled *premultiplied by opacity* and divided by the resampled
        opacity: ``depth' = resize(depth * opacity) / resize(opacity)``, so silhouette pixels average
        surface depths only instead of mixing in the 0 of empty rays (which would invent near
        surfaces, i.e. huge disparities); normals are renormalised. Pixels with resampled opacity
        below 1e-6 get depth 0 and normal 0. ``fovy`` (vertical) and ``c2w`` are unchanged.
        """
        if (height, width) == self.resolution:
            return self
        shrinking = height < self.resolution[0] or width < self.resolution[1]

        def resize(x: Tensor) -> Tensor:  # [B, C, H, W]
            return F.interpolate(
                x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
            )

        opacity = resize(self.opacity[:, None])[:, 0].clamp(0.0, 1.0)
        hit = opacity > 1e-6
        safe = torch.where(hit, opacity, torch.ones_like(opacity))
        depth = torch.where(hit, resize((self.depth * self.opacity)[:, None])[:, 0] / safe, 0.0 * opacity)
        normal = None
        if self.normal is not None:
            n = resize((self.normal * self.opacity[..., None]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            normal = torch.where(hit[..., None], F.normalize(n, dim=-1), 0.0 * n)
        return replace(self, depth=depth, opacity=opacity, normal=normal)

    @classmethod
    def from_threestudio(
        cls,
        out: Mapping[str, Any],
        batch: Mapping[str, Any],
        depth_is_normalized: bool = False,
    ) -> RenderOutputs:
        """Build from a threestudio renderer output and its camera batch.

        Reads ``depth``/``opacity`` (volume renderers) or ``comp_depth``/``comp_mask`` (3DGS
        extension), all ``[B, H, W, 1]``; ``comp_normal`` if present, which threestudio encodes as
        ``(n + 1) / 2 * opacity`` in world space (decoded here as ``n = normalize(2 c / opacity - 1)``);
        ``batch["c2w"]`` and ``batch["fovy"]`` (radians). Renderer depth is ``sum_i w_i t_i``, i.e.
        ray distance times opacity; it is divided by opacity unless ``depth_is_normalized``.
        """
        depth_key = "depth" if "depth" in out else "comp_depth" if "comp_depth" in out else None
        opacity_key = "opacity" if "opacity" in out else "comp_mask" if "comp_mask" in out else None
        if depth_key is None or opacity_key is None:
            raise KeyError(
                "RenderOutputs.from_threestudio needs 'depth'/'opacity' (or 'comp_depth'/'comp_mask') in the "
                f"renderer output; it has {sorted(out)}. threestudio's nvdiff-rasterizer renders no depth (stein-mesh-rasterizer does)."
            )
        opacity = _squeeze_last(out[opacity_key]).clamp(0.0, 1.0)
        hit = opacity > 1e-6
        safe = torch.where(hit, opacity, torch.ones_like(opacity))
        depth = _squeeze_last(out[depth_key])
        if not depth_is_normalized:
            depth = torch.where(hit, depth / safe, torch.zeros_like(depth))
        normal = None
        if out.get("comp_normal") is not None:
            n = 2.0 * out["comp_normal"] / safe[..., None] - 1.0
            normal = torch.where(hit[..., None], F.normalize(n, dim=-1), torch.zeros_like(n))
        fovy = batch.get("fovy")
        return cls(
            depth=depth,
            opacity=opacity,
            normal=normal,
            c2w=batch.get("c2w"),
            fovy_deg=None if fovy is None else torch.as_tensor(fovy) * (180.0 / math.pi),
        )


def _squeeze_last(x: Tensor) -> Tensor:
    return x[..., 0] if x.dim() == 4 and x.shape[-1] == 1 else x


@dataclass
class BaselineOutput:
    """``phi [B]`` (differentiable in the image) and ``valid [B]``: where False, ``phi`` is a finite
    placeholder and the caller uses the constant (SDS) baseline for that sample and counts it."""

    phi: Float[Tensor, " B"]
    valid: Bool[Tensor, " B"]


class Baseline(abc.ABC):
    """A scalar baseline function ``phi(image; render)`` for the Stein control variate.

    ``__call__(image [B,3,H,W] in [0,1], render: RenderOutputs) -> BaselineOutput``. The render must
    have the image's batch size and resolution (use ``render.resized(H, W)`` /
    ``render.expand(B)``); it is detached before :meth:`evaluate` sees it.
    """

    name: str = ""

    def __call__(self, image: Float[Tensor, "B 3 H W"], render: RenderOutputs) -> BaselineOutput:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"Baseline {self.name!r}: image must be [B, 3, H, W], got {tuple(image.shape)}")
        b, _, h, w = image.shape
        if (render.batch_size, *render.resolution) != (b, h, w):
            raise ValueError(
                f"Baseline {self.name!r}: render outputs are [B={render.batch_size}, H={render.resolution[0]}, "
                f"W={render.resolution[1]}] but the image is [B={b}, H={h}, W={w}]; call "
                f"render.resized({h}, {w}) (and render.expand({b}) for one render) before the baseline."
            )
        out = self.evaluate(image, render.detached())
        if out.phi.shape != (b,) or out.valid.shape != (b,):
            raise RuntimeError(f"Baseline {self.name!r} returned phi {tuple(out.phi.shape)}, expected ({b},)")
        return out

    @abc.abstractmethod
    def evaluate(self, image: Float[Tensor, "B 3 H W"], render: RenderOutputs) -> BaselineOutput:
        """``phi`` of a checked image and a detached render of the same shape."""

    def to(self, device: str | torch.device) -> Baseline:
        """Move any network the baseline holds (no-op by default)."""
        return self

    def statistics(self, phi_mean: float) -> dict[str, float]:
        """Baseline-specific numbers to log, from the step's mean ``phi`` over valid samples (none by
        default; the generic ``phi_mean/<name>`` and ``valid_frac/<name>`` are logged for every baseline)."""
        return {}


_REGISTRY: dict[str, type[Baseline]] = {}


def register_baseline(name: str) -> Callable[[type[Baseline]], type[Baseline]]:
    """Class decorator: make ``build_baseline(name, ...)`` construct this baseline."""

    def decorator(cls: type[Baseline]) -> type[Baseline]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"Baseline name {name!r} is already registered to {_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def registered_baselines() -> list[str]:
    return sorted(_REGISTRY)


def build_baseline(name: str, **kwargs: Any) -> Baseline:
    """Construct the baseline registered under ``name`` with keyword arguments ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown baseline {name!r}; registered baselines: {registered_baselines()}")
    return _REGISTRY[name](**kwargs)


@register_baseline("constant")
class ConstantBaseline(Baseline):
    """``phi = value`` (default 1): the Stein term is ``h = value * eps``, so SSD with ``mu = 1``
    reduces to SDS. ``phi`` is kept on the autograd graph of the image (with zero gradient) so that
    ``baseline_value_and_grad`` treats every baseline alike."""

    def __init__(self, value: float = 1.0):
        self.value = float(value)

    def evaluate(self, image: Float[Tensor, "B 3 H W"], render: RenderOutputs) -> BaselineOutput:
        phi = self.value + 0.0 * image.flatten(1).sum(1)
        return BaselineOutput(phi=phi, valid=torch.ones_like(phi, dtype=torch.bool))
