"""Score-matching objectives: LCSS and, to compare with it, DSM, SSM and FD-SSM.

All losses return per-sample, un-reduced values ``[B]``; the caller reduces over the batch. Over the
data dimensions each loss is a **sum** (``reduction="sum"``, the score_sde / Hyvarinen convention,
with the ``1/2`` in front of the squared norm) or that sum divided by the number of data dimensions
``D`` (``reduction="mean"``, the per-dimension scale of EDM-style ``mean`` losses). Nothing else
changes between the two.

Plain forms act on a score function ``score_fn(x [N, ...]) -> S(x) [N, ...]`` (no time):

* ``lcss_loss``  (local curvature smoothing with Stein's identity, reconstructed; docs/lcss_math.md)::

      l(x) = 0.5 ||S(x)||^2 + (1/s) eps . (S(x + s eps) - S(x)),   eps ~ N(0, I)

  By Stein's identity ``E_eps[(1/s) eps . S(x + s eps)] = E_eps[tr grad S(x + s eps)]``: the
  Jacobian trace of implicit score matching (ISM), Gaussian-smoothed, without any Jacobian. The
  ``-S(x)`` term has zero mean (``E eps = 0``) and cancels the ``(1/s) eps . S(x)`` part of the
  Stein term (Taylor: ``(1/s) eps . S(x + s eps) = (1/s) eps . S(x) + eps^T grad S(x) eps + O(s)``),
  whose variance is ``O(1/s^2)``; with it the variance stays bounded as ``s -> 0`` (the control
  variate). Minimiser over all functions: ``S* = grad p_s / p`` with ``p_s = p * N(0, s^2 I)``,
  which tends to the score as ``s -> 0``.
* ``dsm_loss`` (denoising score matching, Vincent 2011)::

      l(x) = 0.5 ||S(x + s eps) + eps / s||^2

  Minimiser: ``S* = grad log p_s``, the score of the *noised* density.
* ``ssm_loss`` (sliced score matching, Song et al. 2019), ``v ~ N(0, I)``::

      l(x) = 0.5 ||S(x)||^2 + v^T grad S(x) v          (variance reduced, default)
      l(x) = 0.5 (v . S(x))^2 + v^T grad S(x) v         (plain)

  ``v^T grad S v = v . grad_x (v . S(x))`` by double backprop.
* ``fdssm_loss`` (finite-difference SSM, Pang et al. 2020): the same with the directional
  derivative by central differences, ``u`` uniform on the unit sphere, ``h`` the step length::

      v^T grad S v  ~  D u . (S(x + h u) - S(x - h u)) / (2 h),    S(x) ~ (S(x + h u) + S(x - h u)) / 2

  (``sqrt(D) u`` has ``E[v v^T] = I``); one batched call of ``2N``, no double backprop, bias
  ``O(h^2)``.

The expectation of every one of these is ISM, ``E[0.5 ||S||^2 + tr grad S]`` (up to a constant),
in the limit ``s, h -> 0`` (exactly, for SSM).

Time-conditioned: ``SDELoss`` trains an epsilon-predicting network ``model_fn(x_t, t, cond)`` on an
SDE of ``lcss_prior.sde`` (``score = -eps_hat / std(t)``), with the weighting ``lambda(t)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lcss_prior.sde import SDE, append_dims, draw, randn_like

ScoreFn = Callable[[Tensor], Tensor]
"""``score_fn(x [N, ...]) -> S(x) [N, ...]``."""

ModelFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``model_fn(x_t [B, ...], t [B], cond) -> eps_hat [B, ...]`` (an epsilon-predicting network)."""

REDUCTIONS = ("sum", "mean")


def _reduce(v: Float[Tensor, "B ..."], reduction: str) -> Float[Tensor, " B"]:
    """Sum (``"sum"``) or mean (``"mean"``) over all non-batch dimensions."""
    if reduction == "sum":
        return v.flatten(1).sum(1)
    if reduction == "mean":
        return v.flatten(1).mean(1)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")


def _dot(a: Float[Tensor, "B ..."], b: Float[Tensor, "B ..."]) -> Float[Tensor, " B"]:
    return (a * b).flatten(1).sum(1)


def _scale(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """A positive per-sample scale (``value`` a float or ``[B]``) as a ``[B, 1, ...]`` tensor."""
    s = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a float or have shape [B]=({x.shape[0]},), got {tuple(s.shape)}")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"{name} must be positive and finite, got values in [{float(s.min())}, {float(s.max())}]"
        )
    return append_dims(s, x.ndim)


def _unit_directions(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``u`` uniform on the unit sphere of the data space, one per sample."""
    u = randn_like(x, generator)
    return u / append_dims(u.flatten(1).norm(dim=1), x.ndim)


LCSS_BIAS_WARNING = 0.01
"""``SDELoss`` warns once when ``lcss_relative_bias(smoothing, D)`` exceeds this."""


def lcss_relative_bias(smoothing: float, dim: int) -> float:
    """Relative squared error of LCSS's minimiser ``grad p_s / p`` as a score in ``dim`` dimensions.

    On ``p = N(0, v I_D)`` with radius ``s = c sqrt(v)`` (in the time-conditioned form ``s = c std(t)``
    and ``p_t`` has variance ``>= std(t)^2`` in every direction off the data)::

        E_p ||S* - grad log p||^2 / E_p ||grad log p||^2 = (1 - c^4)^(-(D/2 + 1)) - 1  ~  c^4 D / 2

    (docs/lcss_math.md section 4). It grows with the dimension: ``c = 0.1`` costs 0.3% at ``D = 64``
    (8x8 digits) but 17% at ``D = 3072`` (32x32 RGB), where the objective then *prefers* the biased
    minimiser to the true score.
    """
    c, d = float(smoothing), int(dim)
    if not 0.0 < c < 1.0:
        raise ValueError(f"smoothing c must lie in (0, 1), got {smoothing!r}")
    if d < 1:
        raise ValueError(f"dim must be >= 1, got {dim!r}")
    return math.expm1(-(d / 2 + 1) * math.log1p(-(c**4)))


def lcss_max_smoothing(dim: int, tolerance: float = LCSS_BIAS_WARNING) -> float:
    """The largest ``c`` with ``lcss_relative_bias(c, dim) <= tolerance`` (inverse of that formula)."""
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    return (-math.expm1(-math.log1p(tolerance) / (int(dim) / 2 + 1))) ** 0.25


# --------------------------------------------------------------------------------------------------
# plain (time-free) forms
# --------------------------------------------------------------------------------------------------


def lcss_loss(
    score_fn: ScoreFn,
    x: Float[Tensor, "B ..."],
    radius: float | Float[Tensor, " B"],
    control_variate: bool = True,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
) -> Float[Tensor, " B"]:
    """LCSS: ``0.5 ||S(x)||^2 + (1/s) eps . (S(x + s eps) - S(x))``, ``eps ~ N(0, I)``, ``s = radius``
    (the smoothing radius, a float or ``[B]``; not a noise level).

    One batched call ``score_fn(cat[x, x + s eps])`` of ``2B``. ``control_variate=False`` drops the
    ``- S(x)`` term (the plain Stein form; same expectation, variance ``O(1/s^2)``).

    Expected loss and its minimiser (Stein: ``E[eps f(x + s eps)] = s E[grad f(x + s eps)]``)::

        J(S) = E_p[0.5 ||S||^2] + E_{p_s}[tr grad S] = int p 0.5 ||S||^2 - int S . grad p_s + const
             = int p 0.5 ||S - grad p_s / p||^2 + const   =>   S* = grad p_s / p.

    For ``p = N(0, v I)`` and ``S = -a x``: ``J(a) = 0.5 a^2 v D - a D``, minimised at ``a = 1/v`` for
    every ``s`` (a linear score has a constant Jacobian trace, untouched by smoothing).
    """
    s = _scale(radius, x, "radius (the LCSS smoothing radius)")
    eps = randn_like(x, generator)
    both = score_fn(torch.cat([x, x + s * eps]))
    s_x, s_shift = both.chunk(2)
    stein = s_shift - s_x if control_variate else s_shift
    return _reduce(0.5 * s_x**2 + eps * stein / s, reduction)


def dsm_loss(
    score_fn: ScoreFn,
    x: Float[Tensor, "B ..."],
    sigma: float | Float[Tensor, " B"],
    generator: torch.Generator | None = None,
    reduction: str = "sum",
) -> Float[Tensor, " B"]:
    """DSM: ``0.5 ||S(x + s eps) + eps / s||^2``, ``eps ~ N(0, I)``, ``s = sigma``.

    ``-eps / s = grad log N(x + s eps; x, s^2 I)``, so the minimiser is ``grad log p_s``, the score of
    the noised density ``p_s = p * N(0, s^2 I)`` (for ``p = N(0, v I)``, ``S = -a x``:
    ``a = 1 / (v + s^2)``), not the score of ``p``.
    """
    s = _scale(sigma, x, "sigma")
    eps = randn_like(x, generator)
    return _reduce(0.5 * (score_fn(x + s * eps) + eps / s) ** 2, reduction)


def ssm_loss(
    score_fn: ScoreFn,
    x: Float[Tensor, "B ..."],
    n_projections: int = 1,
    variance_reduced: bool = True,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
) -> Float[Tensor, " B"]:
    """Sliced score matching with ``M = n_projections`` Gaussian projections ``v_m ~ N(0, I)``::

        l(x) = 0.5 ||S(x)||^2 + (1/M) sum_m v_m^T grad S(x) v_m          (variance_reduced)
        l(x) = (1/M) sum_m [0.5 (v_m . S(x))^2 + v_m^T grad S(x) v_m]     (plain)

    ``E[v v^T] = I`` makes both unbiased for ISM ``0.5 ||S||^2 + tr grad S``. The vector-Jacobian
    products ``v . grad_x (v . S(x))`` use double backprop (``create_graph=True``), so the loss is
    differentiable in the parameters of ``score_fn``. ``x`` is not modified.
    """
    if int(n_projections) != n_projections or n_projections < 1:
        raise ValueError(f"n_projections must be a positive integer, got {n_projections!r}")
    m = int(n_projections)
    # The fused CPU attention kernels have no double backward; the math kernel does (same values).
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        xr = x.detach().repeat(m, *([1] * (x.dim() - 1))).requires_grad_(True)
        score = score_fn(xr)
        v = randn_like(xr, generator)
        (vjp,) = torch.autograd.grad(_dot(v, score).sum(), xr, create_graph=True)
    trace = v * vjp  # per-element contributions of v^T grad S v
    quad = 0.5 * score**2 if variance_reduced else 0.5 * append_dims(_dot(v, score), v.ndim) * v * score
    # the plain term 0.5 (v.S)^2 is written per element as 0.5 (v.S) v_i S_i so that "mean" divides by D
    per_elem = (quad + trace).reshape(m, x.shape[0], *x.shape[1:]).mean(0)
    return _reduce(per_elem, reduction)


def fdssm_loss(
    score_fn: ScoreFn,
    x: Float[Tensor, "B ..."],
    step: float | Float[Tensor, " B"] = 0.1,
    variance_reduced: bool = True,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
) -> Float[Tensor, " B"]:
    """Finite-difference sliced score matching (Pang et al. 2020), one batched call of ``2B``::

        S_pm = S(x +- h u),   u uniform on the unit sphere,   h = step (float or [B]),   D = dim
        trace term  = D u . (S_+ - S_-) / (2 h)            (~ v^T grad S v with v = sqrt(D) u)
        l(x) = 0.5 ||S_bar||^2 + trace term                (variance_reduced, default)
        l(x) = 0.5 D (u . S_bar)^2 + trace term            (plain, Pang et al.'s sliced form)

    with ``S_bar = (S_+ + S_-) / 2 = S(x) + O(h^2)``. No double backprop; bias ``O(h^2)`` against
    SSM / ISM.
    """
    h = _scale(step, x, "step (the finite-difference step)")
    d = x[0].numel()
    u = _unit_directions(x, generator)
    s_plus, s_minus = score_fn(torch.cat([x + h * u, x - h * u])).chunk(2)
    s_bar = 0.5 * (s_plus + s_minus)
    trace = d * u * (s_plus - s_minus) / (2.0 * h)
    quad = 0.5 * s_bar**2 if variance_reduced else 0.5 * d * append_dims(_dot(u, s_bar), u.ndim) * u * s_bar
    return _reduce(quad + trace, reduction)


# --------------------------------------------------------------------------------------------------
# time-conditioned objective on an SDE
# --------------------------------------------------------------------------------------------------


def _repeat(v: Any, n: int) -> Any:
    """``v`` (``None`` or a batch-first tensor) repeated ``n`` times along the batch."""
    if v is None or n == 1:
        return v
    return torch.cat([v] * n)


def _eps_fn(model_fn: ModelFn, t: Tensor, cond: Any) -> Callable[[Tensor], Tensor]:
    """``x [nB, ...] -> model_fn(x, t, cond)`` with ``t`` and ``cond`` repeated ``n`` times."""
    b = t.shape[0]

    def fn(x: Tensor) -> Tensor:
        n, rem = divmod(x.shape[0], b)
        if rem:
            raise ValueError(f"batch {x.shape[0]} is not a multiple of the time batch {b}")
        return model_fn(x, _repeat(t, n), _repeat(cond, n))

    return fn


class SDELoss:
    """Per-sample score-matching loss of an epsilon-predicting network on a forward SDE.

    ``loss(model_fn, x0, cond=None, generator=None) -> [B]`` draws ``t ~ U[t_eps, 1]`` and
    ``x_t ~ p_{0t}(. | x0)`` (``sde.sample_marginal``: closed form for affine SDEs, simulated
    otherwise) and evaluates, with ``S(x) = -eps_hat(x) / std(t)``::

        lcss:  0.5 ||eps_hat(x_t)||^2 + (1/c) eps' . (eps_hat(x_t) - eps_hat(x_t + c std(t) eps'))
        dsm:   0.5 ||eps_hat(x_t) - eps||^2                      (eps: the forward noise of x_t)
        ssm:   std(t)^2 ssm_loss(S, x_t)
        fdssm: std(t)^2 fdssm_loss(S, x_t, h = fd_eps std(t))

    each of which is ``std(t)^2`` times the score-form loss (``lcss_loss`` with
    ``s = c std(t)``, ``dsm_loss`` with ``s = std(t)`` on ``x_t = alpha x0 + std eps``): the
    ``weighting="std2"`` form, ``lambda(t) = std(t)^2``. It is scale-free: ``eps_hat`` is O(1) at
    every ``t``, and no ``1/std`` appears. ``eps'`` is fresh noise for the LCSS smoothing,
    independent of the forward noise. ``weighting="likelihood"`` uses ``lambda(t) = g(t)^2``
    (score_sde's likelihood weighting), i.e. multiplies the ``std2`` form by ``g(t)^2 / std(t)^2``.

    DSM needs the Gaussian transition kernel, so it refuses a non-affine SDE; LCSS, SSM and FD-SSM
    need only samples of ``p_t``. ``cond`` (e.g. class labels ``[B]``) is passed to ``model_fn``
    unchanged (``None``: unconditional).
    """

    def __init__(
        self,
        sde: SDE,
        method: str = "lcss",
        smoothing: float = 0.01,
        weighting: str = "std2",
        t_eps: float | None = None,
        control_variate: bool = True,
        n_projections: int = 1,
        variance_reduced: bool = True,
        fd_eps: float = 0.1,
        reduction: str = "sum",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown score-matching method {method!r}; choose one of {sorted(METHODS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {sorted(WEIGHTINGS)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
        if method == "dsm" and not sde.is_affine:
            raise ValueError(
                f"method 'dsm' needs a Gaussian transition kernel, but SDE {sde.name!r} "
                f"({type(sde).__name__}) is not affine; use 'lcss', 'ssm' or 'fdssm'"
            )
        self.sde = sde
        self.method = method
        self.smoothing = float(smoothing)
        if not (math.isfinite(self.smoothing) and self.smoothing > 0):
            raise ValueError(
                f"smoothing (c, the LCSS radius in units of std(t)) must be > 0, got {smoothing!r}"
            )
        self.weighting = weighting
        self.t_eps = float(sde.t_eps if t_eps is None else t_eps)
        if not 0.0 < self.t_eps < sde.T:
            raise ValueError(f"t_eps must lie in (0, T={sde.T}), got {self.t_eps!r}")
        self.control_variate = bool(control_variate)
        self.n_projections = int(n_projections)
        self.variance_reduced = bool(variance_reduced)
        self.fd_eps = float(fd_eps)
        if not (math.isfinite(self.fd_eps) and self.fd_eps > 0):
            raise ValueError(f"fd_eps (the FD-SSM step in units of std(t)) must be > 0, got {fd_eps!r}")
        if self.n_projections < 1:
            raise ValueError(f"n_projections must be >= 1, got {n_projections!r}")
        self.reduction = reduction
        self._bias_checked = False

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments except the SDE (JSON-able; stored in a prior's training info)."""
        return {
            "method": self.method,
            "smoothing": self.smoothing,
            "weighting": self.weighting,
            "t_eps": self.t_eps,
            "control_variate": self.control_variate,
            "n_projections": self.n_projections,
            "variance_reduced": self.variance_reduced,
            "fd_eps": self.fd_eps,
            "reduction": self.reduction,
        }

    def sample_time(
        self, batch: int, generator: torch.Generator | None = None, like: Tensor | None = None
    ) -> Float[Tensor, " B"]:
        """``t ~ U[t_eps, T]``, ``[batch]``, on ``like``'s device and dtype."""
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        u = draw("uniform", (batch,), generator, dtype=dtype)  # on the generator's device, then moved
        t = self.t_eps + (self.sde.T - self.t_eps) * u
        return t.to(like.device) if like is not None else t

    def weight(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """``lambda(t) / std(t)^2``: the factor applied to the ``std2``-weighted form."""
        return WEIGHTINGS[self.weighting](self.sde, t)

    def loss_at(
        self,
        model_fn: ModelFn,
        x_t: Float[Tensor, "B ..."],
        t: Float[Tensor, " B"],
        cond: Any = None,
        noise: Float[Tensor, "B ..."] | None = None,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, " B"]:
        """The weighted loss at given ``(x_t, t)``; ``noise`` is the forward noise (DSM only)."""
        raw = METHODS[self.method](self, model_fn, x_t, t, cond, noise, generator)
        return self.weight(t) * raw

    def __call__(
        self,
        model_fn: ModelFn,
        x0: Float[Tensor, "B ..."],
        cond: Any = None,
        generator: torch.Generator | None = None,
    ) -> Float[Tensor, " B"]:
        """Per-sample loss ``[B]`` at ``t ~ U[t_eps, 1]``, ``x_t ~ p_{0t}(. | x0)``."""
        if self.method == "lcss" and not self._bias_checked:
            self._bias_checked = True
            dim = x0[0].numel()
            bias = lcss_relative_bias(self.smoothing, dim) if self.smoothing < 1 else math.inf
            if bias > LCSS_BIAS_WARNING:
                warnings.warn(
                    f"LCSS smoothing c={self.smoothing:g} on {dim}-dimensional data: the minimiser "
                    f"grad p_s / p deviates from the score by ~{bias:.1%} (relative squared error, "
                    f"docs/lcss_math.md section 4); use c <= {lcss_max_smoothing(dim):.3g} for <= "
                    f"{LCSS_BIAS_WARNING:.0%}",
                    stacklevel=2,
                )
        t = self.sample_time(x0.shape[0], generator, like=x0)
        x_t, noise = self.sde.sample_marginal(x0, t, generator=generator)
        return self.loss_at(model_fn, x_t, t, cond, noise, generator)


# Each method: (loss, model_fn, x_t, t, cond, forward noise, generator) -> std(t)^2-weighted loss [B].
MethodFn = Callable[
    [SDELoss, ModelFn, Tensor, Tensor, Any, "Tensor | None", "torch.Generator | None"], Tensor
]


def _lcss_eps(
    loss: SDELoss,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``0.5 ||eps_hat(x_t)||^2 + (1/c) eps' . (eps_hat(x_t) - eps_hat(x_t + c std eps'))``, one call
    of ``2B`` (``cv=False``: without the ``eps_hat(x_t)`` in the Stein term)."""
    c = loss.smoothing
    e = randn_like(x_t, generator)
    s = append_dims(c * loss.sde.std(t), x_t.ndim)
    e_x, e_shift = _eps_fn(model_fn, t, cond)(torch.cat([x_t, x_t + s * e])).chunk(2)
    stein = e_x - e_shift if loss.control_variate else -e_shift
    return _reduce(0.5 * e_x**2 + e * stein / c, loss.reduction)


def _dsm_eps(
    loss: SDELoss,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``0.5 ||eps_hat(x_t) - eps||^2`` with the forward noise ``eps`` of ``x_t``."""
    if noise is None:
        raise ValueError(f"DSM needs the forward noise of x_t; SDE {loss.sde.name!r} gave none (not affine?)")
    return _reduce(0.5 * (model_fn(x_t, t, cond) - noise) ** 2, loss.reduction)


def _score_fn(loss: SDELoss, model_fn: ModelFn, t: Tensor, cond: Any) -> ScoreFn:
    eps_fn = _eps_fn(model_fn, t, cond)
    b = t.shape[0]
    return lambda x: loss.sde.score_from_eps(eps_fn(x), _repeat(t, x.shape[0] // b))


def _ssm_eps(
    loss: SDELoss,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``std(t)^2 ssm_loss(-eps_hat / std, x_t)``."""
    raw = ssm_loss(
        _score_fn(loss, model_fn, t, cond),
        x_t,
        n_projections=loss.n_projections,
        variance_reduced=loss.variance_reduced,
        generator=generator,
        reduction=loss.reduction,
    )
    return loss.sde.std(t) ** 2 * raw


def _fdssm_eps(
    loss: SDELoss,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``std(t)^2 fdssm_loss(-eps_hat / std, x_t, h)`` with the step ``h = fd_eps std(t)`` (scale-free
    like the LCSS radius: a fixed ``h`` would be huge against the noise scale at small ``t``)."""
    raw = fdssm_loss(
        _score_fn(loss, model_fn, t, cond),
        x_t,
        step=loss.fd_eps * loss.sde.std(t),
        variance_reduced=loss.variance_reduced,
        generator=generator,
        reduction=loss.reduction,
    )
    return loss.sde.std(t) ** 2 * raw


METHODS: dict[str, MethodFn] = {"lcss": _lcss_eps, "dsm": _dsm_eps, "ssm": _ssm_eps, "fdssm": _fdssm_eps}
"""Registry: method name -> ``std(t)^2``-weighted per-sample loss."""

WEIGHTINGS: dict[str, Callable[[SDE, Tensor], Tensor]] = {
    "std2": lambda sde, t: torch.ones_like(t),
    "likelihood": lambda sde, t: sde.likelihood_weighting(t) / sde.std(t) ** 2,
}
"""Registry: weighting name -> ``lambda(t) / std(t)^2`` (the std2 form is the base)."""
