"""Exact likelihood of a score-based prior through its probability-flow ODE, and bits/dim.

Along the probability-flow ODE ``dx/dt = v(x, t) = f(x, t) - 0.5 g(t)^2 s(x, t)`` the density obeys
the instantaneous change of variables ``d log p_t(x_t) / dt = -div_x v(x_t, t)``, so

    log p_{t_eps}(x) = log p_T(x_T) + int_{t_eps}^{T} div_x v(x_t, t) dt,

with ``x_T`` the ODE solution started at ``x_{t_eps} = x`` and ``log p_T`` replaced by
``sde.prior_logp``. The divergence is exact (``D`` backward passes: small ``D`` only) or
Hutchinson's estimate ``z^T (dv/dx) z`` with ``E[z z^T] = I`` (Rademacher or Gaussian probes), the
probes drawn once and held fixed along the trajectory. Because the trajectory does not depend on
the probes and the estimate is linear in ``z z^T``, the Hutchinson log-likelihood is unbiased.

Bits per dimension with uniform dequantisation (derivation in ``docs/measurement.md``): pixel level
``k in {0..n-1}`` stored as ``x_k = 2k/(n-1) - 1`` (the grid the prior was trained on) is dequantised
to ``x' = x_k + h (u - 1/2)``, ``h = 2/(n-1)``, ``u ~ U[0,1)^D``: a uniform point of the bin of
width ``h`` CENTRED on the stored value. The variable ``v = k + u`` in units of levels has density
``p_v(v) = p_x(x') h^D`` (the Jacobian of ``x' = h v - 1 - h/2``), and by Jensen
``log P(k) >= E_u log p_v(k + u)``, so

    bpd = -log p_v / (D ln 2) = -log p_x(x') / (D ln 2) + log2((n - 1) / 2)   (6.994 bits, n = 256)

is an upper bound (in expectation over ``u``) on the model's discrete code length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from lcss_prior.sampling import ScoreFn, guided_score_fn, probability_flow_drift, solve_ode

VelocityFn = Callable[[Tensor, Tensor], Tensor]

# --------------------------------------------------------------------------------------------------
# probes and divergence estimators (registries)
# --------------------------------------------------------------------------------------------------


def _rademacher(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2.0 - 1.0


def _gaussian(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator)


PROBES: dict[str, Callable[[tuple[int, ...], torch.Generator | None], Tensor]] = {
    "rademacher": _rademacher,
    "gaussian": _gaussian,
}
"""Hutchinson probe distributions, each with ``E[z] = 0`` and ``E[z z^T] = I``."""


def divergence_exact(
    v_fn: VelocityFn, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"], probes: Tensor | None = None
) -> tuple[Float[Tensor, "B ..."], Float[Tensor, " B"]]:
    """``(v(x, t), div_x v = sum_i dv_i/dx_i)`` with one backward pass per dimension (``probes``
    unused). Samples in the batch must not interact (true for any score network in eval mode)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = v_fn(x, t)
        flat_v, dims = v.flatten(1), v[0].numel()
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(dims):
            (grad,) = torch.autograd.grad(flat_v[:, i].sum(), x, retain_graph=i < dims - 1)
            div = div + grad.flatten(1)[:, i]
    return v.detach(), div.detach()


def divergence_hutchinson(
    v_fn: VelocityFn, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"], probes: Float[Tensor, "P B ..."]
) -> tuple[Float[Tensor, "B ..."], Float[Tensor, " B"]]:
    """``(v(x, t), mean_p z_p^T (dv/dx) z_p)``: Hutchinson's unbiased trace estimate with ``P``
    probes, one vector-Jacobian product each."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v = v_fn(x, t)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for p, z in enumerate(probes):
            (vjp,) = torch.autograd.grad(v, x, grad_outputs=z, retain_graph=p < len(probes) - 1)
            div = div + (vjp * z).flatten(1).sum(dim=1)
    return v.detach(), (div / len(probes)).detach()


TRACE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "exact": divergence_exact,
    "hutchinson": divergence_hutchinson,
}


def _lookup(registry: dict[str, Any], name: str, what: str) -> Any:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; choose from {sorted(registry)}") from None


class AnalyticGaussian:
    """Reference: data ``N(mean, cov)`` diffused by an affine SDE, with everything in closed form::

        p_t = N(alpha(t) mean, alpha(t)^2 cov + std(t)^2 I),
        s(x, t) = -(alpha^2 cov + std^2 I)^{-1} (x - alpha mean)

    Used to check samplers and likelihoods (and anything else that consumes a ``score_fn``)
    against exact answers. ``x`` is ``[B, D]``.
    """

    def __init__(self, sde: Any, mean: Float[Tensor, " D"], cov: Float[Tensor, "D D"]) -> None:
        if not getattr(sde, "is_affine", False):
            raise ValueError(f"AnalyticGaussian needs an affine SDE, got {sde!r}")
        self.sde = sde
        self.mean = torch.as_tensor(mean)
        self.cov = torch.as_tensor(cov, dtype=self.mean.dtype)
        if self.cov.shape != (self.mean.numel(), self.mean.numel()):
            raise ValueError(f"cov must be [D, D] for mean [D]; got {tuple(self.cov.shape)}")
        # cov = Q diag(lam) Q^T, so cov_t^{-1} = Q diag(1 / (alpha^2 lam + std^2)) Q^T for every t
        self._lam, self._q = torch.linalg.eigh(self.cov)

    def marginal(self, t: Float[Tensor, " B"]) -> tuple[Float[Tensor, "B D"], Float[Tensor, "B D D"]]:
        """Mean ``alpha(t) mean`` and covariance ``alpha(t)^2 cov + std(t)^2 I`` of ``p_t``."""
        alpha, std = self.sde.alpha(t).to(self.mean.dtype), self.sde.std(t).to(self.mean.dtype)
        eye = torch.eye(self.mean.numel(), dtype=self.mean.dtype)
        return alpha[:, None] * self.mean, alpha[:, None, None] ** 2 * self.cov + std[
            :, None, None
        ] ** 2 * eye

    def score(self, x: Float[Tensor, "B D"], t: Float[Tensor, " B"]) -> Float[Tensor, "B D"]:
        """``grad_x log p_t(x) = -cov_t^{-1} (x - mean_t)``."""
        q, lam = self._q.to(x.dtype), self._lam.to(x.dtype)
        alpha, std = self.sde.alpha(t).to(x.dtype)[:, None], self.sde.std(t).to(x.dtype)[:, None]
        r = (x - alpha * self.mean.to(x.dtype)) @ q
        return -(r / (alpha**2 * lam + std**2)) @ q.T

    def log_prob(self, x: Float[Tensor, "B D"], t: Float[Tensor, " B"] | None = None) -> Float[Tensor, " B"]:
        """``log p_t(x)`` (``log N(x; mean, cov)`` for ``t=None``)."""
        if t is None:
            mean_t, cov_t = self.mean.expand(x.shape[0], -1), self.cov.expand(x.shape[0], -1, -1)
        else:
            mean_t, cov_t = self.marginal(t)
        return torch.distributions.MultivariateNormal(mean_t, cov_t).log_prob(x.to(cov_t.dtype))


# --------------------------------------------------------------------------------------------------
# log-likelihood and bits/dim
# --------------------------------------------------------------------------------------------------


def ode_log_likelihood(
    sde: Any,
    score_fn: ScoreFn,
    x: Float[Tensor, "B ..."],
    trace: str = "hutchinson",
    probe: str | Callable = "rademacher",
    n_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[Float[Tensor, " B"], Float[Tensor, "B ..."], int]:
    """``log p_{t_eps}(x) = sde.prior_logp(x_T) + int_{t_eps}^T div v(x_t, t) dt`` (nats, per
    sample), integrated by scipy RK45 with ``rtol`` / ``atol`` on the augmented state
    ``(x_t, int div v)``.

    ``trace``: ``"exact"`` or ``"hutchinson"`` (``n_probes`` probes of kind ``probe``: a name in
    ``PROBES`` or a callable ``(shape, generator) -> z``). ``t_eps`` defaults to ``sde.t_eps``.
    Returns ``(log_likelihood [B], x_T, number of ODE function evaluations)``.
    """
    divergence = _lookup(TRACE_ESTIMATORS, trace, "trace estimator")
    probes = None
    if trace == "hutchinson":
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        draw = probe if callable(probe) else _lookup(PROBES, probe, "probe")
        probes = draw((n_probes, *x.shape), generator).to(device=x.device, dtype=x.dtype)
    t_start = float(sde.t_eps if t_eps is None else t_eps)
    if not 0.0 <= t_start < float(sde.T):
        raise ValueError(f"t_eps must lie in [0, T={sde.T}), got {t_start}")
    v_fn = probability_flow_drift(sde, score_fn)
    batch, dims = x.shape[0], x[0].numel()

    def augmented(t: float, y: Tensor) -> Tensor:
        x_t = y[:, :dims].reshape(x.shape)
        v, div = divergence(v_fn, x_t, torch.full((batch,), t, dtype=x.dtype, device=x.device), probes)
        return torch.cat([v.reshape(batch, dims), div[:, None]], dim=1)

    y0 = torch.cat(
        [x.detach().reshape(batch, dims), torch.zeros(batch, 1, dtype=x.dtype, device=x.device)], 1
    )
    y1, nfev = solve_ode(
        augmented, y0, t_start, float(sde.T), rtol=rtol, atol=atol, progress=progress, desc="likelihood ODE"
    )
    x_T = y1[:, :dims].reshape(x.shape)
    log_likelihood = sde.prior_logp(x_T).reshape(batch) + y1[:, dims]
    return log_likelihood, x_T, nfev


def bits_per_dim_offset(n_levels: int | None) -> float:
    """``log2((n - 1) / 2)``: the bits/dim offset of ``[-1, 1]`` data on the grid ``2k/(n-1) - 1``
    dequantised in bins of width ``2/(n-1)`` centred on the grid (``0`` for continuous data,
    ``n_levels=None``). See the module docstring."""
    if n_levels is None:
        return 0.0
    if int(n_levels) != n_levels or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2 (or None for continuous data), got {n_levels!r}")
    return math.log2((n_levels - 1) / 2.0)


def dequantize(
    x: Float[Tensor, "B ..."], n_levels: int, generator: torch.Generator | None = None
) -> Float[Tensor, "B ..."]:
    """Grid value ``x_k = 2k/(n-1) - 1`` (``k = round((x + 1)(n - 1)/2)``) to
    ``x' = x_k + (2/(n-1)) (u - 1/2)``, ``u ~ U[0, 1)``: a uniform point of the bin centred on it."""
    if x.min() < -1.0 - 1e-4 or x.max() > 1.0 + 1e-4:
        raise ValueError(f"data must lie in [-1, 1]; got values in [{x.min().item()}, {x.max().item()}]")
    k = torch.round((x.clamp(-1.0, 1.0) + 1.0) * (n_levels - 1) / 2.0)
    u = torch.rand(x.shape, generator=generator).to(device=x.device, dtype=x.dtype)
    h = 2.0 / (n_levels - 1)
    return (k + u - 0.5) * h - 1.0


def _batches(data: Any, batch_size: int) -> Iterable[tuple[Tensor, Tensor | None]]:
    """``(images, labels or None)`` batches from a tensor, a dataset of dicts or tensors, or an
    iterable of such batches (e.g. a ``DataLoader``)."""
    if isinstance(data, Tensor):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size], None
        return
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (list, tuple)):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        if isinstance(batch, dict):
            if "image" not in batch:
                raise KeyError(f"data batches must have an 'image' key, got keys {sorted(batch)}")
            yield batch["image"], batch.get("label")
        elif isinstance(batch, (list, tuple)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def bits_per_dim(
    prior_or_score_fn: Any,
    sde: Any | None,
    data: Any,
    n_levels: int | None = 256,
    batch_size: int = 64,
    max_samples: int | None = None,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    n_probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_eps: float | None = None,
    conditional: bool = False,
    guidance_scale: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> tuple[float, float]:
    """Mean bits/dim over ``data`` and its Monte-Carlo standard error (over data points, one
    dequantisation and one probe set each):

        bpd_i = -log p_{t_eps}(x'_i) / (D ln 2) + log2((n_levels - 1) / 2)

    with ``x'_i = dequantize(x_i)`` (no dequantisation and no offset for ``n_levels=None``).

    ``prior_or_score_fn`` is an exported prior (anything with ``eps``; unconditional through its
    null class, or conditioned on the data labels with ``conditional=True``) or a
    ``score_fn(x, t)``; ``sde`` defaults to the prior's. ``data`` is a tensor ``[N, ...]`` in
    ``[-1, 1]``, a dataset of ``{"image", "label"}`` dicts, or an iterable of batches.
    """
    is_prior = hasattr(prior_or_score_fn, "eps")
    if sde is None:
        if not is_prior:
            raise ValueError("sde is required when a score function (not a prior) is given")
        sde = prior_or_score_fn.sde
    offset = bits_per_dim_offset(n_levels)
    generator = torch.Generator().manual_seed(int(seed))
    values: list[Tensor] = []
    seen = 0
    bar = tqdm(desc="bits/dim", unit="img", total=max_samples, disable=not progress)
    for images, labels in _batches(data, batch_size):
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None:
            images = images[: max_samples - seen]
            labels = None if labels is None else labels[: max_samples - seen]
        if is_prior:
            device = next(iter(prior_or_score_fn.parameters()), torch.empty(0)).device
            images = images.to(device)
            cond = torch.as_tensor(labels) if (conditional and labels is not None) else None
            if conditional and labels is None:
                raise ValueError("conditional=True needs labels in the data")
            score_fn = guided_score_fn(prior_or_score_fn, cond, guidance_scale, sde=sde)
        else:
            score_fn = prior_or_score_fn
        x = images.float() if n_levels is None else dequantize(images.float(), n_levels, generator)
        logp, _, _ = ode_log_likelihood(
            sde,
            score_fn,
            x,
            trace=trace,
            probe=probe,
            n_probes=n_probes,
            rtol=rtol,
            atol=atol,
            t_eps=t_eps,
            generator=generator,
        )
        dims = x[0].numel()
        values.append(-logp.double().cpu() / (dims * math.log(2.0)) + offset)
        seen += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    if not values:
        raise ValueError("bits_per_dim got no data")
    bpd = torch.cat(values).numpy()
    stderr = float(np.std(bpd, ddof=1) / np.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    return float(np.mean(bpd)), stderr
