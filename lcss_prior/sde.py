"""Forward SDEs of score-based diffusion priors (the score_sde interface; our own code).

Every SDE here is an Ito process on continuous time ``t in [t_eps, T]`` with ``T = 1``::

    dx = f(x, t) dt + g(t) dw,        x_0 ~ p_data,

whose marginals ``p_t`` move the data to a simple prior ``p_T`` (``prior_sampling``,
``prior_logp``). ``t_eps > 0`` is the smallest time that training and sampling use (the score
blows up as ``t -> 0``); it is part of each SDE's ``config``.

Affine SDEs (``is_affine``: ``f`` linear in ``x``) have a Gaussian transition kernel::

    x_t = alpha(t) x_0 + std(t) eps,   eps ~ N(0, I)        (``marginal_prob(x0, t) -> (mean, std)``)

For a non-affine SDE there is no closed form: ``sample_marginal`` simulates the forward SDE
(Euler-Maruyama), which is all LCSS needs (it uses samples of ``p_t``, never the kernel), whereas
DSM cannot be used. ``alpha(t)`` and ``std(t)`` still exist there as a *reference scale* (see
``TanhSDE``): they set the epsilon parameterisation ``score = -eps_hat / std(t)``
(``score_from_eps``, the one place in the project that turns network output into a score) and the
LCSS smoothing radius ``c std(t)``.

The reverse-time SDE (Anderson 1982) and the probability-flow ODE (Song et al. 2021) are formed by
``reverse(score_fn, probability_flow)``::

    dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar           (reverse SDE)
    dx/dt = f(x, t) - 0.5 g(t)^2 s(x, t)                          (probability-flow ODE)

SDEs are built by name from a registry (``SDES``, ``build_sde``); ``build_sde(**sde.config)``
rebuilds an equal SDE (the exported prior stores ``config`` in its JSON).
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score_fn(x [B, ...], t [B]) -> grad_x log p_t(x) [B, ...]``."""

SIM_METHODS = ("heun", "euler")
"""Forward-simulation schemes of ``SDE.simulate_marginal`` (stochastic Heun, Euler-Maruyama)."""

SDES: dict[str, type[SDE]] = {}
"""Registry: SDE name -> class (filled by ``register_sde``)."""


def register_sde(name: str) -> Callable[[type[SDE]], type[SDE]]:
    """Class decorator that adds an ``SDE`` subclass to ``SDES`` under ``name``."""

    def wrap(cls: type[SDE]) -> type[SDE]:
        if name in SDES:
            raise ValueError(f"SDE name {name!r} is already registered (by {SDES[name].__name__})")
        cls.name = name
        SDES[name] = cls
        return cls

    return wrap


def build_sde(name: str, **kwargs: Any) -> SDE:
    """Build a registered SDE by ``name`` with constructor ``kwargs``; ``build_sde(**sde.config)``
    rebuilds ``sde``."""
    if name not in SDES:
        raise ValueError(f"unknown SDE name {name!r}; registered SDEs: {sorted(SDES)}")
    cls = SDES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"SDE {name!r} got unknown argument(s) {unknown}; it accepts {accepted}")
    return cls(**kwargs)


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """``x`` with singleton dimensions appended up to ``ndim``, so that it broadcasts against a tensor
    of ``ndim`` dimensions aligned from the LEFT: a per-sample ``[B]`` against ``[B, C, H, W]``, a
    ``[B, K]`` against ``[B, K, C, H, W]`` (k-diffusion's ``append_dims``). The project's one
    broadcast helper."""
    if ndim < x.ndim:
        raise ValueError(f"append_dims: a {x.ndim}-dim tensor cannot be viewed with {ndim} dimensions")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def generator_device(generator: torch.Generator | None, like: Tensor | None = None) -> torch.device | None:
    """Where ``generator`` draws: its own device, else ``like``'s (else the default device)."""
    if generator is not None:
        return generator.device
    return like.device if like is not None else None


def draw(
    kind: str,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    like: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``torch.randn`` (``kind="normal"``) or ``torch.rand`` (``"uniform"``) of ``shape``, drawn on
    ``generator``'s device in ``dtype`` (default ``like``'s) and moved to ``like``'s device and dtype:
    the one way this project seeds noise, so a CPU generator also seeds GPU runs and a draw does not
    depend on the device the result lives on. (Drawing in float32 and casting after is not the same
    stream as drawing in the target dtype: callers that need the former pass ``dtype``.)"""
    sample = {"normal": torch.randn, "uniform": torch.rand}[kind]
    draw_dtype = dtype if dtype is not None else (like.dtype if like is not None else None)
    out = sample(
        tuple(shape), generator=generator, device=generator_device(generator, like), dtype=draw_dtype
    )
    return out.to(device=like.device, dtype=like.dtype) if like is not None else out


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, I)`` noise shaped like ``x`` (:func:`draw` in ``x``'s dtype)."""
    return draw("normal", x.shape, generator, like=x)


def _check_time(t: Tensor | float, x: Tensor | None = None) -> Tensor:
    """``t`` as a float tensor ``[B]``; with ``x`` given, on ``x``'s device and dtype, and a scalar
    ``t`` broadcast to ``x``'s batch."""
    if x is None:
        return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.get_default_dtype())
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    t = torch.as_tensor(t, dtype=dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B]=({x.shape[0]},), got {tuple(t.shape)}")
    return t


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def _check_t_eps(t_eps: float) -> float:
    t_eps = float(t_eps)
    if not 0.0 < t_eps < 1.0:
        raise ValueError(f"t_eps must lie in (0, T=1), got {t_eps!r}")
    return t_eps


def _gaussian_logp(z: Tensor, var: float) -> Tensor:
    """``log N(z; 0, var I)`` summed over all non-batch dimensions -> ``[B]``."""
    d = z[0].numel()
    return -0.5 * d * math.log(2 * math.pi * var) - 0.5 * z.flatten(1).pow(2).sum(1) / var


class SDE(abc.ABC):
    """A forward SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [t_eps, T=1]``.

    Subclasses implement ``drift``, ``diffusion``, ``alpha``, ``std``, ``prior_sampling``,
    ``prior_logp`` and ``config``; affine ones also set ``is_affine = True``.
    """

    name: str = "sde"
    is_affine: bool = False
    """True iff the transition kernel is ``N(alpha(t) x0, std(t)^2 I)`` (``marginal_prob`` exists)."""

    def __init__(self, t_eps: float = 1e-3, sim_steps: int = 200, sim_method: str = "heun") -> None:
        self.t_eps = _check_t_eps(t_eps)
        if int(sim_steps) != sim_steps or sim_steps < 1:
            raise ValueError(f"sim_steps must be a positive integer, got {sim_steps!r}")
        self.sim_steps = int(sim_steps)
        if sim_method not in SIM_METHODS:
            raise ValueError(f"unknown sim_method {sim_method!r}; choose one of {list(SIM_METHODS)}")
        self.sim_method = sim_method

    def _sim_config(self) -> dict[str, Any]:
        return {"t_eps": self.t_eps, "sim_steps": self.sim_steps, "sim_method": self.sim_method}

    # ----- the process ---------------------------------------------------------------------------
    @property
    def T(self) -> float:
        """End time of the forward process (always 1)."""
        return 1.0

    @abc.abstractmethod
    def drift(self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]) -> Float[Tensor, "B ..."]:
        """``f(x, t)``."""

    @abc.abstractmethod
    def diffusion(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """``g(t)`` (a scalar per sample: every SDE here has state-independent, isotropic noise)."""

    def sde(
        self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]
    ) -> tuple[Float[Tensor, "B ..."], Float[Tensor, " B"]]:
        """``(f(x, t), g(t))`` of ``dx = f dt + g dw``."""
        t = _check_time(t, x)
        return self.drift(x, t), self.diffusion(t)

    @abc.abstractmethod
    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Signal scale of ``x_t = alpha(t) x0 + std(t) eps`` (a reference scale if not affine)."""

    @abc.abstractmethod
    def std(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """Noise scale of ``x_t = alpha(t) x0 + std(t) eps`` (a reference scale if not affine)."""

    # ----- marginals -----------------------------------------------------------------------------
    def marginal_prob(
        self, x0: Float[Tensor, "B ..."], t: Float[Tensor, " B"]
    ) -> tuple[Float[Tensor, "B ..."], Float[Tensor, " B"]]:
        """Mean ``alpha(t) x0`` ``[B, ...]`` and std ``std(t)`` ``[B]`` of the Gaussian kernel
        ``p_{0t}(x_t | x0)``; only for affine SDEs."""
        if not self.is_affine:
            raise NotImplementedError(
                f"SDE {self.name!r} is not affine: its transition kernel has no closed form; "
                "use sample_marginal (simulation) instead of marginal_prob"
            )
        t = _check_time(t, x0)
        return append_dims(self.alpha(t), x0.ndim) * x0, self.std(t)

    def sample_marginal(
        self,
        x0: Float[Tensor, "B ..."],
        t: Float[Tensor, " B"],
        generator: torch.Generator | None = None,
    ) -> tuple[Float[Tensor, "B ..."], Float[Tensor, "B ..."] | None]:
        """Draw ``x_t ~ p_{0t}(. | x0)`` per sample.

        Affine: ``x_t = alpha(t) x0 + std(t) eps`` in closed form, returns ``(x_t, eps)``.
        Otherwise: ``simulate_marginal`` (``sim_method``, ``sim_steps`` steps), returns ``(x_t, None)``.
        """
        if self.is_affine:
            mean, std = self.marginal_prob(x0, t)
            eps = randn_like(x0, generator)
            return mean + append_dims(std, x0.ndim) * eps, eps
        return self.simulate_marginal(x0, t, generator=generator), None

    def simulate_marginal(
        self,
        x0: Float[Tensor, "B ..."],
        t: Float[Tensor, " B"],
        steps: int | None = None,
        generator: torch.Generator | None = None,
        method: str | None = None,
    ) -> Float[Tensor, "B ..."]:
        """Simulate the forward SDE from ``0`` to ``t_i`` for each sample, each on its own uniform
        grid of ``steps`` steps ``dtau = t_i / steps`` (so all samples run in one batch).

        With ``dW = sqrt(dtau) z`` and the noise increment ``n = g(tau + dtau/2) dW`` (midpoint in
        time: ``sum g^2 dtau`` is then a second-order rule for ``int g^2``)::

            "euler" (Euler-Maruyama):  x <- x + f(x, tau + dtau/2) dtau + n
            "heun"  (stochastic Heun): x' = x + f(x, tau) dtau + n
                                       x <- x + 0.5 (f(x, tau) + f(x', tau + dtau)) dtau + n

        For additive noise (every SDE here: ``g`` depends on ``t`` only) Euler-Maruyama has weak
        order 1 and Heun weak order 2. Measured on ``TanhSDE`` at ``t = 1`` (tests/test_sde.py):
        with 400 steps Euler-Maruyama overestimates ``E x^2`` by about 2 %, Heun is within Monte-Carlo
        error; for an OU process of rate ``r`` the stationary variance is off by ``r dtau / 2``
        (Euler) against ``(r dtau)^2 / 4`` (Heun). Works for every SDE; the only way to get ``x_t``
        for a non-affine one. ``steps``/``method`` default to ``sim_steps``/``sim_method``.
        """
        steps = self.sim_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        method = self.sim_method if method is None else method
        if method not in SIM_METHODS:
            raise ValueError(f"unknown simulation method {method!r}; choose one of {list(SIM_METHODS)}")
        t = _check_time(t, x0)
        dt = t / steps
        dt_x = append_dims(dt, x0.ndim)
        sqrt_dt = dt_x.sqrt()
        x = x0.clone()
        for k in range(steps):
            noise = append_dims(self.diffusion(dt * (k + 0.5)), x0.ndim) * sqrt_dt * randn_like(x0, generator)
            if method == "euler":
                x = x + self.drift(x, dt * (k + 0.5)) * dt_x + noise
            else:
                f0 = self.drift(x, dt * k)
                x_pred = x + f0 * dt_x + noise
                x = x + 0.5 * (f0 + self.drift(x_pred, dt * (k + 1))) * dt_x + noise
        return x

    # ----- prior ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Draw ``x_T ~ p_T`` of shape ``shape`` (batch first), on the generator's device."""

    @abc.abstractmethod
    def prior_logp(self, z: Float[Tensor, "B ..."]) -> Float[Tensor, " B"]:
        """``log p_T(z)`` in nats, summed over all non-batch dimensions."""

    # ----- scores --------------------------------------------------------------------------------
    def score_from_eps(
        self, eps_hat: Float[Tensor, "B ..."], t: Float[Tensor, " B"]
    ) -> Float[Tensor, "B ..."]:
        """``s(x_t, t) = -eps_hat / std(t)``: the one conversion of a noise prediction to a score
        (exact for affine SDEs, where ``grad log p_{0t}(x_t | x0) = -eps / std(t)``)."""
        t = _check_time(t, eps_hat)
        return -eps_hat / append_dims(self.std(t), eps_hat.ndim)

    def likelihood_weighting(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """``g(t)^2``, the weighting under which the score-matching loss bounds the negative
        log-likelihood (Song et al. 2021, "maximum likelihood training")."""
        return self.diffusion(_check_time(t)) ** 2

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or, with ``probability_flow``, the probability-flow ODE) for
        ``score_fn(x, t) ~ grad_x log p_t(x)``."""
        return ReverseSDE(self, score_fn, probability_flow)

    # ----- configuration -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments plus ``"name"``: ``build_sde(**sde.config)`` rebuilds it."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SDE) and self.config == other.config

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config.items())))


class ReverseSDE:
    """Reverse-time process of ``forward`` given a score, integrated from ``T`` down to ``t_eps``::

        drift = f(x, t) - g(t)^2 s(x, t),       diffusion = g(t)      (reverse SDE)
        drift = f(x, t) - 0.5 g(t)^2 s(x, t),   diffusion = 0         (probability-flow ODE)

    With ``dt < 0`` an Euler-Maruyama step is ``x + drift dt + diffusion sqrt(|dt|) z``.
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        self.forward_sde = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.T = forward.T
        self.t_eps = forward.t_eps

    def sde(
        self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]
    ) -> tuple[Float[Tensor, "B ..."], Float[Tensor, " B"]]:
        """``(drift, diffusion)`` of the reverse SDE / probability-flow ODE at ``(x, t)``."""
        t = _check_time(t, x)
        f, g = self.forward_sde.sde(x, t)
        factor = 0.5 if self.probability_flow else 1.0
        drift = f - factor * append_dims(g**2, x.ndim) * self.score_fn(x, t)
        return drift, torch.zeros_like(g) if self.probability_flow else g


# --------------------------------------------------------------------------------------------------
# affine SDEs
# --------------------------------------------------------------------------------------------------


class _LinearBeta:
    """``beta(t) = beta_min + t (beta_max - beta_min)`` and ``B(t) = int_0^t beta``."""

    beta_min: float
    beta_max: float

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _set_betas(self, beta_min: float, beta_max: float) -> None:
        self.beta_min = _positive("beta_min", beta_min)
        self.beta_max = _positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max ({beta_max}) must be >= beta_min ({beta_min})")


@register_sde("vp")
class VPSDE(_LinearBeta, SDE):
    """Variance-preserving SDE (DDPM in continuous time)::

        dx = -0.5 beta(t) x dt + sqrt(beta(t)) dw,    beta(t) = beta_min + t (beta_max - beta_min)
        alpha(t) = exp(-B(t) / 2),   std(t) = sqrt(1 - exp(-B(t))),   B(t) = int_0^t beta
        p_T = N(0, I)
    """

    is_affine = True

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_eps: float = 1e-3,
        sim_steps: int = 200,
        sim_method: str = "heun",
    ) -> None:
        super().__init__(t_eps=t_eps, sim_steps=sim_steps, sim_method=sim_method)
        self._set_betas(beta_min, beta_max)

    def drift(self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]) -> Float[Tensor, "B ..."]:
        return -0.5 * append_dims(self.beta(t), x.ndim) * x

    def diffusion(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return self.beta(t).sqrt()

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return torch.exp(-0.5 * self.beta_integral(_check_time(t)))

    def std(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return (-torch.expm1(-self.beta_integral(_check_time(t)))).sqrt()

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``x_T ~ N(0, I)``."""
        device = generator.device if generator is not None else None
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Float[Tensor, "B ..."]) -> Float[Tensor, " B"]:
        """``log N(z; 0, I)``."""
        return _gaussian_logp(z, 1.0)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            **self._sim_config(),
        }


@register_sde("subvp")
class SubVPSDE(VPSDE):
    """Sub-VP SDE (Song et al. 2021): the VP drift with less noise, so ``Var`` stays below VP's::

        dx = -0.5 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 B(t)))) dw
        alpha(t) = exp(-B(t) / 2),   std(t) = 1 - exp(-B(t))
        p_T = N(0, I)
    """

    def diffusion(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return (self.beta(t) * -torch.expm1(-2.0 * self.beta_integral(t))).sqrt()

    def std(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return -torch.expm1(-self.beta_integral(_check_time(t)))


@register_sde("ve")
class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN in continuous time)::

        dx = sqrt(d sigma(t)^2 / dt) dw,    sigma(t) = sigma_min (sigma_max / sigma_min)^t
        g(t) = sigma(t) sqrt(2 log(sigma_max / sigma_min))
        alpha(t) = 1,   std(t) = sqrt(sigma(t)^2 - sigma_min^2)
        p_T = N(0, sigma_max^2 I)

    ``std`` is the exact kernel std from ``x_0`` (score_sde uses ``sigma(t)``, i.e. treats the data
    as already smoothed by ``sigma_min``; the two differ by less than ``sigma_min^2`` in variance).
    ``t_eps`` defaults to ``1e-5`` as in score_sde's VE setups.
    """

    is_affine = True

    def __init__(
        self,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        t_eps: float = 1e-5,
        sim_steps: int = 200,
        sim_method: str = "heun",
    ) -> None:
        super().__init__(t_eps=t_eps, sim_steps=sim_steps, sim_method=sim_method)
        self.sigma_min = _positive("sigma_min", sigma_min)
        self.sigma_max = _positive("sigma_max", sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({sigma_max}) must be > sigma_min ({sigma_min})")
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def noise_level(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        """The VE schedule's ``sigma_min (sigma_max / sigma_min)^t`` (score_sde's ``sigma(t)``; the
        marginal standard deviation is ``std(t)``, which starts at 0)."""
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def drift(self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]) -> Float[Tensor, "B ..."]:
        return torch.zeros_like(x)

    def diffusion(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return self.noise_level(t) * math.sqrt(2.0 * self._log_ratio)

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return torch.ones_like(_check_time(t))

    def std(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        # sigma_min^2 (exp(2 t log r) - 1), written with expm1 for accuracy at small t
        return self.sigma_min * torch.expm1(2.0 * _check_time(t) * self._log_ratio).sqrt()

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``x_T ~ N(0, sigma_max^2 I)``."""
        device = generator.device if generator is not None else None
        return self.sigma_max * torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z: Float[Tensor, "B ..."]) -> Float[Tensor, " B"]:
        """``log N(z; 0, sigma_max^2 I)``."""
        return _gaussian_logp(z, self.sigma_max**2)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            **self._sim_config(),
        }


# --------------------------------------------------------------------------------------------------
# a non-affine SDE
# --------------------------------------------------------------------------------------------------


def _log_cosh(x: Tensor) -> Tensor:
    """``log cosh x = |x| + log1p(exp(-2|x|)) - log 2`` (no overflow)."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


@register_sde("tanh")
class TanhSDE(_LinearBeta, SDE):
    """A non-affine VP-like SDE with a saturating extra pull toward the origin::

        dx = -0.5 beta(t) (x + k tanh(x)) dt + sqrt(beta(t)) dw,    beta as in ``VPSDE``, k >= 0

    The drift is ``-0.5 beta grad U`` with ``U(x) = sum_i x_i^2 / 2 + k log cosh x_i``, so the
    process is an overdamped Langevin diffusion (time-changed by ``beta``) whose stationary density
    is ``p_inf(x) = prod_i exp(-x_i^2 / 2) cosh(x_i)^(-k) / Z_k``. The drift is globally Lipschitz
    (constant ``0.5 beta (1 + k)``), so the SDE is well posed and Euler-Maruyama is stable for
    ``beta dt (1 + k) < 4``. Its contraction rate at the origin is ``(1 + k) / 2 beta``, so by
    ``T = 1`` (``B(1) = 10.05`` with the default betas) ``p_T`` is ``p_inf`` up to ``exp(-10)``.
    ``p_T := p_inf``: ``prior_sampling`` draws it exactly by rejection (proposal ``N(0, 1)``,
    acceptance ``cosh(x)^(-k)``), ``prior_logp`` uses ``Z_k`` by quadrature.

    ``k = 0`` is the VP SDE. For ``k > 0`` the transition kernel has no closed form:
    ``sample_marginal`` simulates. ``alpha(t)``, ``std(t)`` are the *reference scale* of the
    linearisation at the origin (``tanh x ~ x``), the OU process
    ``dx = -0.5 (1 + k) beta x dt + sqrt(beta) dw``::

        alpha(t) = exp(-(1 + k) B(t) / 2),   std(t) = sqrt((1 - exp(-(1 + k) B(t))) / (1 + k))

    so ``std(t) ~ sqrt(B(t))``, the true conditional std, as ``t -> 0`` and ``std(T)`` is the width
    of ``p_inf`` at its mode. They scale the network's output (``score = -eps_hat / std``) and the
    LCSS smoothing radius; no identity is claimed for them (``marginal_prob`` raises).
    """

    is_affine = False

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        k: float = 1.0,
        t_eps: float = 1e-3,
        sim_steps: int = 200,
        sim_method: str = "heun",
    ) -> None:
        super().__init__(t_eps=t_eps, sim_steps=sim_steps, sim_method=sim_method)
        self._set_betas(beta_min, beta_max)
        self.k = float(k)
        if not (math.isfinite(self.k) and self.k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k!r}")
        # log Z_k = log int exp(-x^2/2) cosh(x)^-k dx by the trapezoid rule on [-12, 12] (the
        # integrand is below 1e-31 outside; 24001 nodes give ~1e-12 relative error).
        grid = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
        dens = torch.exp(-0.5 * grid**2 - self.k * _log_cosh(grid))
        self._log_z = float(torch.log(torch.trapezoid(dens, grid)))

    def drift(self, x: Float[Tensor, "B ..."], t: Float[Tensor, " B"]) -> Float[Tensor, "B ..."]:
        return -0.5 * append_dims(self.beta(t), x.ndim) * (x + self.k * torch.tanh(x))

    def diffusion(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return self.beta(t).sqrt()

    def alpha(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        return torch.exp(-0.5 * (1.0 + self.k) * self.beta_integral(_check_time(t)))

    def std(self, t: Float[Tensor, " B"]) -> Float[Tensor, " B"]:
        lam = 1.0 + self.k
        return (-torch.expm1(-lam * self.beta_integral(_check_time(t))) / lam).sqrt()

    def prior_sampling(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Exact draws of ``p_inf`` by rejection: ``x ~ N(0, 1)`` accepted w.p. ``cosh(x)^(-k)``
        (valid since ``cosh^(-k) <= 1``), elementwise until every entry is accepted."""
        device = generator.device if generator is not None else None
        dtype = dtype or torch.get_default_dtype()
        out = torch.empty(tuple(shape), device=device, dtype=dtype)
        todo = torch.ones(tuple(shape), dtype=torch.bool, device=device)
        while bool(todo.any()):
            n = int(todo.sum())
            prop = torch.randn(n, generator=generator, device=device, dtype=dtype)
            u = torch.rand(n, generator=generator, device=device, dtype=dtype)
            accept = torch.log(u) < -self.k * _log_cosh(prop)
            idx = todo.nonzero(as_tuple=True)
            sel = tuple(i[accept] for i in idx)
            out[sel] = prop[accept]
            todo[sel] = False
        return out

    def prior_logp(self, z: Float[Tensor, "B ..."]) -> Float[Tensor, " B"]:
        """``log p_inf(z) = sum_i [-z_i^2 / 2 - k log cosh z_i] - D log Z_k``."""
        d = z[0].numel()
        zf = z.flatten(1)
        return (-0.5 * zf**2 - self.k * _log_cosh(zf)).sum(1) - d * self._log_z

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "k": self.k,
            **self._sim_config(),
        }
