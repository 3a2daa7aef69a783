"""Stein Score Distillation: the estimator, framework-free (pure torch).

Notation (docs/ssd_math.md has the derivations): the render ``x0`` is noised as
``x_t = alpha_t * x0 + sigma_t * eps`` with ``eps ~ N(0, I)``; the frozen score model predicts
``eps_hat(x_t)``; ``w(t)`` weights the timesteps.

* SDS:  ``Delta = w * (eps_hat - eps)``.
* A baseline ``phi(x_t)`` (one scalar per sample) gives the Stein control variate
  ``h = eps * phi(x_t) - sigma_t * grad_{x_t} phi(x_t)``, which has zero mean over ``eps`` by
  Stein's identity ``E[eps f(eps)] = E[grad_eps f(eps)]`` (with ``f(eps) = phi(alpha x0 + sigma eps)``).
  The constant baseline ``phi = 1`` gives ``h = eps``.
* SSD with baselines ``phi_1..phi_K``: ``Delta = w * (eps_hat - sum_k mu_k * h_k)``; the weights
  ``mu_k`` (scalar, per channel or per pixel, optionally per timestep bin) must not depend on the
  current ``eps`` (``ControlVariateWeight`` uses only earlier steps), so ``E[Delta]`` is the SDS mean
  for every choice of ``mu``, and ``mu`` is chosen to minimise the variance.

Non-finite or invalid baselines fall back, per sample, to the constant control variate ``eps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from lcss_prior.sde import append_dims

__all__ = [
    "WEIGHT_MODES",
    "WEIGHT_SHAPES",
    "ControlVariateWeight",
    "LearnedWeights",
    "OptimalWeights",
    "VarianceDecomposition",
    "baseline_value_and_grad",
    "between_timestep_variance",
    "control_variates",
    "gradient_variance",
    "sds_gradient",
    "ssd_gradient",
    "stein_control_variate",
    "stein_gradient",
    "timestep_bin",
]

Scalar = float | Tensor


# ----------------------------------------------------------------------------------------------
# shape helpers (private)
# ----------------------------------------------------------------------------------------------


def _per_sample(value: Scalar, name: str, batch: int, ndim: int, like: Tensor) -> Tensor | float:
    """A python number, a 0-dim tensor or a ``[B]`` tensor, reshaped to broadcast over a tensor of
    ``ndim`` dimensions whose first one is the batch."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.ndim == 0:
        return value.to(like.dtype)
    if value.shape != (batch,):
        raise ValueError(
            f"`{name}` must be a number, a 0-dim tensor or a [B] tensor with B={batch}, "
            f"got shape {tuple(value.shape)}"
        )
    return append_dims(value.to(like.dtype), ndim)


def _left_aligned(value: Scalar, name: str, ref: Tensor) -> Tensor | float:
    """Broadcast ``value`` against ``ref`` aligning dimensions from the LEFT: a ``[B, K]`` tensor
    against ``[B, K, C, H, W]`` gets trailing singleton dimensions appended."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.ndim > ref.ndim:
        raise ValueError(f"`{name}` has shape {tuple(value.shape)}, more dimensions than {tuple(ref.shape)}")
    value = append_dims(value, ref.ndim)
    try:
        torch.broadcast_shapes(value.shape, ref.shape)
    except RuntimeError as err:
        raise ValueError(
            f"`{name}` of shape {tuple(value.shape)} (left-aligned) does not broadcast to {tuple(ref.shape)}"
        ) from err
    return value.to(ref.dtype)


def _check_same_shape(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{a_name}` and `{b_name}` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def timestep_bin(t: Float[Tensor, " B"], n_bins: int) -> Tensor:
    """Index of the timestep bin of each ``t`` in ``[0, 1]``: ``min(floor(t * n_bins), n_bins - 1)``
    (equal-width bins; ``t = 1`` belongs to the last one)."""
    if t.ndim != 1:
        raise ValueError(f"`t` must be a [B] tensor, got shape {tuple(t.shape)}")
    if n_bins < 1:
        raise ValueError(f"`n_bins` must be >= 1, got {n_bins}")
    if not torch.all((t >= 0) & (t <= 1)):
        raise ValueError(f"`t` must lie in [0, 1], got min {t.min().item()} max {t.max().item()}")
    return (t.detach().double() * n_bins).floor().long().clamp_(0, n_bins - 1)


# ----------------------------------------------------------------------------------------------
# control variates
# ----------------------------------------------------------------------------------------------


def control_variates(
    eps: Float[Tensor, "B ..."],
    phis: Float[Tensor, "B K"],
    grad_phis: Float[Tensor, "B K ..."],
    sigma: Scalar,
    include_constant: bool = True,
    valid: Bool[Tensor, "B K"] | None = None,
    return_fallback: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Stein control variates of ``K`` baselines, stacked along dimension 1:
    ``h_k = eps * phi_k(x_t) - sigma * grad_{x_t} phi_k(x_t)``, each with ``E_eps[h_k] = 0``.

    With ``include_constant`` the constant baseline ``phi = 1`` (``h_0 = eps`` exactly, the noise
    that SDS subtracts) comes first, so the result is ``[B, K + 1, *D]``; otherwise ``[B, K, *D]``
    (the paper's form when ``K = 1``).

    Fallback: where ``phi_k`` or any element of ``grad phi_k`` of a sample is non-finite, or where
    ``valid[b, k]`` is False (e.g. an empty foreground mask), ``h_k`` of that sample is replaced by
    the constant baseline's ``eps`` (``phi = 1``, ``grad = 0``). This keeps ``E[h_k] = 0`` and never
    lets NaN/Inf through. With ``return_fallback`` the result is ``(cvs, fallback)``, ``fallback``
    a ``[B, K]`` bool mask of the replaced entries (its sum is the count to log).

    ``sigma`` is a number, a 0-dim tensor or ``[B]``. ``eps`` is the SAME noise that built ``x_t``.
    """
    ok = _usable_baselines(eps, phis, grad_phis, valid)  # [B, K]
    phi, grad = _rejected_as_zero(phis, grad_phis, ok, eps)  # so that 0 * inf cannot make a NaN
    e, s = eps.unsqueeze(1), _per_sample(sigma, "sigma", eps.shape[0], eps.ndim + 1, eps)
    h = e * append_dims(phi, eps.ndim + 1) - s * grad  # h_k = eps phi_k(x_t) - sigma grad phi_k(x_t)
    h = torch.where(append_dims(ok, eps.ndim + 1), h, e)  # a rejected baseline is the constant one: h = eps
    if include_constant:
        h = torch.cat([e, h], dim=1)
    return (h, ~ok) if return_fallback else h


def _usable_baselines(eps: Tensor, phis: Tensor, grad_phis: Tensor, valid: Tensor | None) -> Tensor:
    """Check the shapes of ``control_variates``' inputs; return ``[B, K]``: baseline ``k`` of sample
    ``b`` is usable (finite ``phi`` and ``grad phi``, and ``valid`` where given)."""
    if phis.ndim != 2 or phis.shape[0] != eps.shape[0]:
        raise ValueError(f"`phis` must have shape [B, K] with B={eps.shape[0]}, got {tuple(phis.shape)}")
    batch, k = phis.shape
    expected = (batch, k, *eps.shape[1:])
    if tuple(grad_phis.shape) != expected:
        raise ValueError(
            f"`grad_phis` must have shape [B, K, *eps.shape[1:]] = {expected}, got {tuple(grad_phis.shape)}"
        )
    if valid is not None and tuple(valid.shape) != (batch, k):
        raise ValueError(f"`valid` must have shape [B, K] = {(batch, k)}, got {tuple(valid.shape)}")
    ok = torch.isfinite(phis) & torch.isfinite(grad_phis).reshape(batch, k, eps[0].numel()).all(dim=-1)
    return ok if valid is None else ok & valid.to(torch.bool)


def _rejected_as_zero(phis: Tensor, grad_phis: Tensor, ok: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """``phi`` and ``grad phi`` with the unusable entries set to 0, in ``eps``'s dtype."""
    zero = torch.zeros((), dtype=phis.dtype, device=phis.device)
    phi = torch.where(ok, phis, zero).to(eps.dtype)
    grad = torch.where(append_dims(ok, eps.ndim + 1), grad_phis, zero.to(grad_phis.dtype)).to(eps.dtype)
    return phi, grad


def stein_control_variate(
    eps: Float[Tensor, "B ..."],
    phi: Float[Tensor, " B"],
    grad_phi: Float[Tensor, "B ..."],
    sigma: Scalar,
    return_fallback: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """One baseline's Stein control variate ``h = eps * phi(x_t) - sigma * grad_{x_t} phi(x_t)``
    (zero mean over ``eps`` for any differentiable ``phi``; the paper's printed ``eps*phi + grad phi``
    is not). Samples with non-finite ``phi``/``grad_phi`` get ``h = eps`` (see ``control_variates``);
    with ``return_fallback`` also returns the ``[B]`` bool mask of those samples."""
    if phi.ndim != 1 or phi.shape[0] != eps.shape[0]:
        raise ValueError(
            f"`phi` must have shape [B] with B={eps.shape[0]} (one scalar per sample), got {tuple(phi.shape)}"
        )
    _check_same_shape(grad_phi, "grad_phi", eps, "eps")
    h, fallback = control_variates(
        eps, phi[:, None], grad_phi[:, None], sigma, include_constant=False, return_fallback=True
    )
    return (h[:, 0], fallback[:, 0]) if return_fallback else h[:, 0]


def baseline_value_and_grad(
    phi_fn: Callable[[Tensor], Tensor],
    x_t: Float[Tensor, "B ..."],
    n_baselines: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Evaluate baseline(s) ``phi = phi_fn(x_t)`` and their exact gradient ``grad_{x_t} phi`` by
    autograd -- the only sanctioned way to obtain ``grad_phi`` (Stein's identity needs the true
    gradient of exactly the evaluated ``phi``; a stop-gradient inside ``phi_fn`` biases SSD).

    ``phi_fn`` maps ``[B, *D]`` to ``[B]`` (``n_baselines=None``) or to ``[B, K]``
    (``n_baselines=K``: K baselines sharing one forward pass, e.g. one VAE decode); returns
    ``(phi [B], grad [B, *D])`` or ``(phi [B, K], grad [B, K, *D])``, both detached.

    Assumption: samples are independent -- ``phi[b]`` depends on ``x_t[b]`` only (no batch
    statistics such as BatchNorm in training mode); the gradient is taken of ``phi.sum(0)``.
    ``x_t`` is detached and copied (the caller's tensor is untouched), and gradients are enabled
    inside, so this works under the caller's ``torch.no_grad()``. Constants inside ``phi_fn``
    (rendered depth, camera, ``t``) must be detached by the caller.
    """
    if not isinstance(x_t, Tensor) or x_t.ndim < 1:
        raise ValueError("`x_t` must be a tensor with a leading batch dimension")
    if n_baselines is not None and n_baselines < 1:
        raise ValueError(f"`n_baselines` must be None or >= 1, got {n_baselines}")
    batch = x_t.shape[0]
    x = x_t.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        phi = phi_fn(x)
        if not isinstance(phi, Tensor):
            raise ValueError(f"`phi_fn` must return a tensor, got {type(phi).__name__}")
        expected = (batch,) if n_baselines is None else (batch, n_baselines)
        if tuple(phi.shape) != expected:
            hint = "[B]" if n_baselines is None else f"[B, K] with K={n_baselines}"
            raise ValueError(
                f"`phi_fn` must return one scalar per sample and baseline, shape {hint} = {expected}; "
                f"got {tuple(phi.shape)} (pass n_baselines=K for several baselines at once)"
            )
        cols = phi[:, None] if n_baselines is None else phi
        k = cols.shape[1]
        grads = []
        for j in range(k):
            if cols.requires_grad:
                (g,) = torch.autograd.grad(cols[:, j].sum(), x, retain_graph=j < k - 1, allow_unused=True)
            else:
                g = None
            grads.append(torch.zeros_like(x) if g is None else g)
    grad = torch.stack(grads, dim=1)
    if n_baselines is None:
        return phi.detach(), grad[:, 0]
    return phi.detach(), grad


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


def sds_gradient(
    eps_hat: Float[Tensor, "B ..."], eps: Float[Tensor, "B ..."], weight: Scalar
) -> Float[Tensor, "B ..."]:
    """Score Distillation Sampling: ``Delta_SDS = w(t) * (eps_hat - eps)``; ``weight`` is a number,
    a 0-dim or a ``[B]`` tensor."""
    _check_same_shape(eps_hat, "eps_hat", eps, "eps")
    w = _per_sample(weight, "weight", eps.shape[0], eps.ndim, eps)
    return w * (eps_hat - eps)


def stein_gradient(
    eps_hat: Float[Tensor, "B ..."],
    cvs: Float[Tensor, "B K ..."],
    weight: Scalar,
    mu: Scalar,
) -> Float[Tensor, "B ..."]:
    """Stein Score Distillation with several control variates:
    ``Delta = w(t) * (eps_hat - sum_k mu_k * h_k)``.

    ``cvs`` comes from ``control_variates``; ``mu`` is a number or a tensor aligned from the LEFT
    with ``cvs`` (``[B, K]``, ``[B, K, C]``, ``[B, K, 1, H, W]``, ... -- missing trailing
    dimensions are appended), as returned by ``ControlVariateWeight``. With only the constant
    control variate and ``mu = 1`` this is ``sds_gradient`` exactly.
    """
    if cvs.ndim != eps_hat.ndim + 1 or cvs.shape[0] != eps_hat.shape[0] or cvs.shape[2:] != eps_hat.shape[1:]:
        raise ValueError(
            f"`cvs` must have shape [B, K, *eps_hat.shape[1:]], got {tuple(cvs.shape)} for eps_hat "
            f"{tuple(eps_hat.shape)}"
        )
    m = _left_aligned(mu, "mu", cvs)
    w = _per_sample(weight, "weight", eps_hat.shape[0], eps_hat.ndim, eps_hat)
    return w * (eps_hat - (m * cvs).sum(dim=1))


def ssd_gradient(
    eps_hat: Float[Tensor, "B ..."],
    eps: Float[Tensor, "B ..."],
    phi: Float[Tensor, " B"],
    grad_phi: Float[Tensor, "B ..."],
    sigma: Scalar,
    weight: Scalar,
    mu: Scalar,
) -> Float[Tensor, "B ..."]:
    """The paper's single-baseline SSD, with the sign corrected:
    ``Delta = w(t) * (eps_hat - mu * (eps * phi - sigma * grad phi))``.

    ``mu`` is a number or a tensor aligned from the left with ``eps`` (``[B]``, ``[B, C]``,
    ``[B, C, H, W]``, ...). Non-finite samples fall back to ``h = eps`` (``stein_control_variate``).
    With ``phi = 1``, ``grad_phi = 0`` and ``mu = 1`` this is ``sds_gradient``.
    """
    h = stein_control_variate(eps, phi, grad_phi, sigma)
    m = _left_aligned(mu, "mu", h)
    return stein_gradient(eps_hat, h[:, None], weight, m[:, None] if isinstance(m, Tensor) else m)


# ----------------------------------------------------------------------------------------------
# weights mu
# ----------------------------------------------------------------------------------------------


WEIGHT_SHAPES = ("scalar", "channel", "pixel")
WEIGHT_MODES = ("learned", "optimal")


class _WeightTable(nn.Module):
    """What both kinds of weights share: a table ``[t_bins, n_cv, S]`` of weights ``mu_k`` for ``n_cv``
    control variates (the constant one included), ``S`` elements per bin by ``shape``, and
    ``forward(t)``, the DETACHED weights of the steps before this one (so the step that uses them
    stays unbiased), ``[B, n_cv]`` (scalar), ``[B, n_cv, C]`` (channel) or ``[B, n_cv, 1, H, W]``
    (pixel), for ``stein_gradient``.

    ``shape``: ``"scalar"`` (one number per cv), ``"channel"`` (per channel, dimension 1 of the data,
    ``channels`` of them) or ``"pixel"`` (per spatial location of ``[B, C, H, W]`` data, shared over
    channels; ``resolution=(H, W)``). ``t_bins=n``: each of ``n`` equal-width bins of ``t`` in
    ``[0, 1]`` has its own weights (beyond the paper: the variance-optimal weights depend on ``t``).
    ``init``: a number (every cv) or ``n_cv`` numbers; default ``[1, 0, ..., 0]`` (SDS, the constant
    cv first; pass ``init`` for the paper's form without constant).
    """

    mode: str

    def __init__(
        self,
        n_cv: int,
        shape: str = "scalar",
        channels: int | None = None,
        resolution: Sequence[int] | None = None,
        init: float | Sequence[float] | None = None,
        t_bins: int | None = None,
    ) -> None:
        super().__init__()
        if n_cv < 1:
            raise ValueError(f"`n_cv` must be >= 1, got {n_cv}")
        if shape not in WEIGHT_SHAPES:
            raise ValueError(f"`shape` must be one of {WEIGHT_SHAPES}, got {shape!r}")
        if t_bins is not None and t_bins < 1:
            raise ValueError(f"`t_bins` must be None or >= 1, got {t_bins}")
        if shape == "channel" and (channels is None or channels < 1):
            raise ValueError(f"shape='channel' needs `channels` >= 1, got {channels}")
        if shape == "pixel" and (resolution is None or len(resolution) != 2 or min(resolution) < 1):
            raise ValueError(f"shape='pixel' needs `resolution` = (H, W), got {resolution}")
        self.n_cv, self.shape, self.channels = n_cv, shape, channels
        self.resolution = tuple(int(r) for r in resolution) if resolution is not None else None
        self.n_bins = t_bins or 1
        self.n_el = {"scalar": 1, "channel": channels or 0, "pixel": 0}[shape]
        if shape == "pixel":
            self.n_el = self.resolution[0] * self.resolution[1]
        if init is None:
            init = [1.0] + [0.0] * (n_cv - 1)
        elif isinstance(init, int | float):
            init = [float(init)] * n_cv
        init = [float(v) for v in init]
        if len(init) != n_cv:
            raise ValueError(f"`init` must have n_cv={n_cv} entries, got {len(init)}")
        self._init = init

    def initial_table(self) -> Tensor:
        return torch.tensor(self._init).reshape(1, self.n_cv, 1).expand(self.n_bins, self.n_cv, self.n_el).clone()

    def extra_repr(self) -> str:
        return f"n_cv={self.n_cv}, shape={self.shape!r}, mode={self.mode!r}, t_bins={self.n_bins}"

    def table(self) -> Tensor:
        """The weights ``[t_bins, n_cv, S]`` (a parameter or a buffer)."""
        raise NotImplementedError

    def forward(self, t: Float[Tensor, " B"]) -> Tensor:
        """Detached weights for timesteps ``t`` (from the steps before this one)."""
        return self._gather(t, self.table()).detach()

    def statistics(self) -> dict[str, float]:
        """Mean / min / max of each cv's weight over bins and elements, for logging."""
        table = self.table().detach()
        stats: dict[str, float] = {}
        for k in range(self.n_cv):
            stats[f"mu{k}_mean"] = table[:, k].mean().item()
            stats[f"mu{k}_min"] = table[:, k].min().item()
            stats[f"mu{k}_max"] = table[:, k].max().item()
        return stats

    def _gather(self, t: Tensor, table: Tensor) -> Tensor:
        mu = table[timestep_bin(t, self.n_bins).to(table.device)]  # [B, K, S]
        if self.shape == "scalar":
            return mu[..., 0]
        if self.shape == "channel":
            return mu
        return mu.reshape(mu.shape[0], self.n_cv, 1, *self.resolution)

    def _check_data(self, eps_hat: Tensor, cvs: Tensor, t: Tensor) -> None:
        batch = eps_hat.shape[0]
        if tuple(cvs.shape) != (batch, self.n_cv, *eps_hat.shape[1:]):
            raise ValueError(
                f"`cvs` must have shape [B, n_cv={self.n_cv}, *eps_hat.shape[1:]], got {tuple(cvs.shape)} "
                f"for eps_hat {tuple(eps_hat.shape)}"
            )
        if tuple(t.shape) != (batch,):
            raise ValueError(f"`t` must have shape [B] = ({batch},), got {tuple(t.shape)}")
        if self.shape == "channel" and (eps_hat.ndim < 2 or eps_hat.shape[1] != self.channels):
            raise ValueError(
                f"shape='channel' expects data [B, {self.channels}, ...], got {tuple(eps_hat.shape)}"
            )
        if self.shape == "pixel" and (eps_hat.ndim != 4 or tuple(eps_hat.shape[2:]) != self.resolution):
            raise ValueError(
                f"shape='pixel' expects data [B, C, {self.resolution[0]}, {self.resolution[1]}], "
                f"got {tuple(eps_hat.shape)}"
            )

    def _elements(self, x: Tensor) -> Tensor:
        """``[B, K, *D]`` to ``[B, K, S, R]``: S weight elements, R entries that share a weight."""
        b, k = x.shape[:2]
        if self.shape == "scalar":
            return x.reshape(b, k, 1, -1)
        if self.shape == "channel":
            return x.reshape(b, k, self.channels, -1)
        return x.movedim(2, -1).reshape(b, k, self.n_el, -1)


class LearnedWeights(_WeightTable):
    """The paper's weights: parameters trained by ``min_mu ||Delta||^2`` (``loss``, stepped by the
    caller's optimiser AFTER the step used ``forward(t)``). Since ``E[Delta]`` does not depend on
    ``mu``, this minimises the variance."""

    mode = "learned"

    def __init__(self, n_cv: int, **kwargs: Any) -> None:
        super().__init__(n_cv, **kwargs)
        self.mu = nn.Parameter(self.initial_table())

    def table(self) -> Tensor:
        return self.mu

    def loss(
        self,
        eps_hat: Float[Tensor, "B ..."],
        cvs: Float[Tensor, "B K ..."],
        weight: Scalar,
        t: Float[Tensor, " B"],
    ) -> Float[Tensor, ""]:
        """``mean ||w * (eps_hat - sum_k mu_k h_k)||^2`` (mean over the batch and the elements), with
        everything but ``mu`` detached -- its gradient reaches only ``mu``."""
        self._check_data(eps_hat, cvs, t)
        w = weight.detach() if isinstance(weight, Tensor) else weight
        return stein_gradient(eps_hat.detach(), cvs.detach(), w, self._gather(t, self.mu)).pow(2).mean()


class OptimalWeights(_WeightTable):
    """Least-squares weights from earlier steps: running second moments ``A_kl = E<w h_k, w h_l>``,
    ``b_k = E<w eps_hat, w h_k>`` per bin (and per channel/pixel, summed over the other dimensions),
    and ``mu* = (A + ridge * tr(A)/K * I)^{-1} b`` solved in float64 after each ``update``. ``ema``
    is the decay of the moments per update of a bin (``1.0``: the plain average of all updates);
    bins never updated keep ``init``."""

    mode = "optimal"

    def __init__(self, n_cv: int, ema: float = 0.99, ridge: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(n_cv, **kwargs)
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"`ema` must be in (0, 1], got {ema}")
        if ridge < 0:
            raise ValueError(f"`ridge` must be >= 0, got {ridge}")
        self.ema, self.ridge = float(ema), float(ridge)
        self.register_buffer("mu_opt", self.initial_table())
        self.register_buffer("moment_A", torch.zeros(self.n_bins, self.n_el, n_cv, n_cv, dtype=torch.float64))
        self.register_buffer("moment_b", torch.zeros(self.n_bins, self.n_el, n_cv, dtype=torch.float64))
        self.register_buffer("moment_n", torch.zeros(self.n_bins, dtype=torch.float64))

    def table(self) -> Tensor:
        return self.mu_opt

    @torch.no_grad()
    def update(
        self,
        eps_hat: Float[Tensor, "B ..."],
        cvs: Float[Tensor, "B K ..."],
        weight: Scalar,
        t: Float[Tensor, " B"],
    ) -> None:
        """Fold this batch into the running moments of its bins and re-solve
        ``mu* = argmin E||w (eps_hat - sum_k mu_k h_k)||^2`` (used from the next ``forward`` on)."""
        self._check_data(eps_hat, cvs, t)
        batch = eps_hat.shape[0]
        w = _per_sample(weight, "weight", batch, eps_hat.ndim, eps_hat)
        target = self._elements((w * eps_hat).unsqueeze(1)).double()[:, 0]  # [B, S, R]
        wh = self._elements(w.unsqueeze(1) * cvs if isinstance(w, Tensor) else w * cvs).double()  # [B, K, S, R]
        bins = timestep_bin(t, self.n_bins).to(self.moment_A.device)
        hit = torch.zeros(self.n_bins, dtype=torch.bool, device=bins.device)
        hit[bins] = True
        decay = torch.where(hit, self.ema, 1.0).double()
        a_batch = torch.einsum("bksr,blsr->bskl", wh, wh).to(self.moment_A.device)
        b_batch = torch.einsum("bsr,bksr->bsk", target, wh).to(self.moment_b.device)
        self.moment_A.mul_(decay.reshape(-1, 1, 1, 1)).index_add_(0, bins, a_batch)
        self.moment_b.mul_(decay.reshape(-1, 1, 1)).index_add_(0, bins, b_batch)
        self.moment_n.mul_(decay).index_add_(0, bins, torch.ones(batch, dtype=torch.float64, device=bins.device))
        self._solve(hit)

    def _solve(self, bins: Tensor) -> None:
        a, b = self.moment_A[bins], self.moment_b[bins]  # [n, S, K, K], [n, S, K]
        scale = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)  # tr(A) / K
        eye = torch.eye(self.n_cv, dtype=a.dtype, device=a.device)
        reg = (self.ridge * scale).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None] * eye
        mu = torch.linalg.solve(a + reg, b.unsqueeze(-1))[..., 0]  # [n, S, K]
        old = self.mu_opt[bins].transpose(1, 2).double()
        mu = torch.where((scale <= 0)[..., None], old, mu)  # a degenerate bin keeps its weights
        self.mu_opt[bins] = mu.transpose(1, 2).to(self.mu_opt.dtype)

    def statistics(self) -> dict[str, float]:
        return {**super().statistics(), "bins_updated": float((self.moment_n > 0).sum().item())}


def ControlVariateWeight(  # noqa: N802 - the public name of the weights, kept for callers and configs
    n_cv: int,
    shape: str = "scalar",
    channels: int | None = None,
    resolution: Sequence[int] | None = None,
    mode: str = "learned",
    init: float | Sequence[float] | None = None,
    t_bins: int | None = None,
    ema: float = 0.99,
    ridge: float = 1e-6,
) -> LearnedWeights | OptimalWeights:
    """The weights ``mu_k`` of ``n_cv`` control variates: :class:`LearnedWeights` (``mode="learned"``,
    the paper) or :class:`OptimalWeights` (``mode="optimal"``; ``ema``, ``ridge``). Use per step:
    ``mu = weights(t)``; ``grad = stein_gradient(..., mu)``; then ``weights.loss(...)`` (learned) or
    ``weights.update(...)`` (optimal). ``shape``, ``channels``, ``resolution``, ``init`` and
    ``t_bins`` as in :class:`_WeightTable`."""
    common = dict(shape=shape, channels=channels, resolution=resolution, init=init, t_bins=t_bins)
    if mode == "learned":
        return LearnedWeights(n_cv, **common)
    if mode == "optimal":
        return OptimalWeights(n_cv, ema=ema, ridge=ridge, **common)
    raise ValueError(f"`mode` must be one of {WEIGHT_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# variance measurements
# ----------------------------------------------------------------------------------------------


def gradient_variance(samples: Float[Tensor, "K ..."]) -> Float[Tensor, ""]:
    """Total variance ``E||Delta - E Delta||^2`` (the trace of the covariance, i.e. summed over all
    elements) from ``K`` independent draws of ``Delta``, with the unbiased estimator
    ``1/(K-1) sum_i ||Delta_i - mean||^2``. Returned as a 0-dim float64 tensor; divide by the
    number of elements for a per-element variance."""
    if samples.ndim < 1 or samples.shape[0] < 2:
        raise ValueError(f"`samples` must be [K, ...] with K >= 2 draws, got shape {tuple(samples.shape)}")
    x = samples.detach().double().reshape(samples.shape[0], -1)
    return (x - x.mean(0)).pow(2).sum() / (x.shape[0] - 1)


class VarianceDecomposition(NamedTuple):
    """Total variance (trace, as ``gradient_variance``) split by the law of total variance."""

    total: float
    between: float  # Var_t E[Delta | t-bin]: no noise control variate can remove it
    within: float  # E_t Var[Delta | t-bin]: what control variates can reduce
    between_share: float  # between / total


def between_timestep_variance(
    samples: Float[Tensor, "K ..."], t: Float[Tensor, " K"], n_bins: int
) -> VarianceDecomposition:
    """Split ``Var = E||Delta - E Delta||^2`` into ``Var_t E[Delta|t] + E_t Var[Delta|t]`` with
    ``t`` grouped into ``n_bins`` equal-width bins of ``[0, 1]`` (``timestep_bin``).

    Any control variate with ``E[h | t] = 0`` leaves ``E[Delta | t]`` unchanged, so the between
    part is a floor for SSD (and VSD) at a fixed render. With bins, ``between`` estimates the
    variance of the bin means, a lower bound of ``Var_t E[Delta|t]`` that tightens as bins shrink.
    Estimator: with ``n_i`` draws, mean ``m_i`` and unbiased variance ``s_i^2`` in bin ``i``,
    ``between = (sum_i n_i ||m_i - m||^2 - sum_i (1 - n_i/K) s_i^2) / K`` (the ANOVA correction for
    the noise in the bin means; unbiased for ``sum_i (n_i/K) ||mu_i - mu||^2``, may be slightly
    negative by chance), ``total = gradient_variance``, ``within = total - between``.
    Every non-empty bin needs at least two draws.
    """
    if samples.ndim < 1 or tuple(t.shape) != (samples.shape[0],):
        raise ValueError(f"`t` must have shape [K] = ({samples.shape[0]},), got {tuple(t.shape)}")
    x = samples.detach().double().reshape(samples.shape[0], -1)
    k = x.shape[0]
    bins = timestep_bin(t, n_bins).to(x.device)
    counts = torch.bincount(bins, minlength=n_bins).double()
    if torch.any((counts > 0) & (counts < 2)):
        raise ValueError(
            f"every non-empty t bin needs >= 2 samples; counts per bin: {counts.long().tolist()}"
        )
    sums = torch.zeros(n_bins, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, bins, x)
    used = counts > 0
    means = sums[used] / counts[used, None]
    grand = x.mean(0)
    ss_between = (counts[used] * (means - grand).pow(2).sum(-1)).sum()
    sq_within = (x - (sums / counts.clamp_min(1)[:, None])[bins]).pow(2).sum(-1)
    ss_within_bins = torch.zeros(n_bins, dtype=x.dtype, device=x.device).index_add_(0, bins, sq_within)[used]
    s2 = ss_within_bins / (counts[used] - 1)
    between = ((ss_between - ((1 - counts[used] / k) * s2).sum()) / k).item()
    total = gradient_variance(samples).item()
    return VarianceDecomposition(total, between, total - between, between / total if total > 0 else 0.0)
