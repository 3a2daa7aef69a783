"""lcss_prior.sde: closed forms against simulation and against the Fokker-Planck equation, priors,
reverse-time drifts, the config round trip and bad input.

Statistical checks use fixed generators and tolerances of a few Monte-Carlo standard errors (SE);
each is shown, in the same test, to flag a deliberately wrong alternative.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import solve_banded

from lcss_prior.sde import SDES, VPSDE, TanhSDE, build_sde

F64 = torch.float64


AFFINE = ("vp", "subvp", "ve")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(values, dtype=F64) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# closed forms agree with the SDE coefficients (deterministic, finite differences)
# --------------------------------------------------------------------------------------------------


def _moment_odes_residual(sde, t: torch.Tensor, h: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """For an affine SDE with ``f = f_lin(t) x``: ``d log alpha / dt = f_lin`` and, for the kernel
    variance ``V = std^2``, ``dV/dt = 2 f_lin V + g^2``. Returns both residuals."""
    one = torch.ones(t.shape[0], 1, dtype=F64)
    f_lin = sde.sde(one, t)[0][:, 0]
    g = sde.diffusion(t)
    dlog_alpha = (torch.log(sde.alpha(t + h)) - torch.log(sde.alpha(t - h))) / (2 * h)
    dvar = (sde.std(t + h) ** 2 - sde.std(t - h) ** 2) / (2 * h)
    return dlog_alpha - f_lin, dvar - (2 * f_lin * sde.std(t) ** 2 + g**2)


@pytest.mark.parametrize("name", AFFINE)
def test_alpha_std_solve_the_moment_odes_of_drift_and_diffusion(name):
    sde = build_sde(name)
    t = _t(np.linspace(0.01, 0.99, 25))
    r_mean, r_var = _moment_odes_residual(sde, t)
    assert r_mean.abs().max() < 1e-6, r_mean
    assert (r_var.abs() / (sde.std(t) ** 2 + 1e-3)).max() < 1e-5, r_var


def test_moment_odes_flag_a_wrong_diffusion():
    """The sub-VP closed form with the VP diffusion coefficient is inconsistent."""

    class WrongSubVP(SDES["subvp"]):
        def diffusion(self, t):
            return VPSDE.diffusion(self, t)

    _, r_var = _moment_odes_residual(WrongSubVP(), _t(np.linspace(0.05, 0.95, 10)))
    assert r_var.abs().max() > 1e-2


def test_ve_std_is_the_exact_kernel_std():
    sde = build_sde("ve", sigma_min=0.01, sigma_max=50.0)
    t = _t([0.0, 1e-5, 0.3, 1.0])
    sigma = 0.01 * (50.0 / 0.01) ** t
    assert torch.allclose(sde.std(t), (sigma**2 - 0.01**2).sqrt(), rtol=1e-10, atol=1e-14)
    assert sde.std(_t([0.0]))[0] == 0.0


def test_tanh_with_k0_is_the_vp_sde():
    tanh, vp = build_sde("tanh", k=0.0), build_sde("vp")
    t = _t(np.linspace(0.0, 1.0, 11))
    x = torch.randn(11, 3, generator=_gen(0), dtype=F64)
    assert torch.allclose(tanh.alpha(t), vp.alpha(t)) and torch.allclose(tanh.std(t), vp.std(t))
    assert torch.allclose(tanh.sde(x, t)[0], vp.sde(x, t)[0])
    assert torch.allclose(tanh.sde(x, t)[1], vp.sde(x, t)[1])
    assert torch.allclose(tanh.prior_logp(x), vp.prior_logp(x))


# --------------------------------------------------------------------------------------------------
# simulation against closed forms (affine) and against the Fokker-Planck equation (non-affine)
# --------------------------------------------------------------------------------------------------


def _kernel_residual_check(sim_sde, ref_sde, n: int = 6000, steps: int = 200) -> list[float]:
    """Simulate ``sim_sde`` from random ``x0`` to ``t in {0.1, 0.5, 1}``; return, per time, the
    largest |z-score| of ``r = x_t - alpha x0`` against ``ref_sde``'s kernel (mean 0, var std^2).

    The tolerance adds Heun's weak error to the SE: for an OU rate ``r`` the stationary variance is
    off by ``(r dtau)^2 / 4``, here ``<= (20 / 200)^2 / 4 = 0.25 %``.
    """
    g = _gen(1)
    times = (0.1, 0.5, 1.0)
    x0 = 0.5 * torch.randn(n * len(times), 2, generator=g, dtype=F64) + 0.3
    t = torch.cat([torch.full((n,), s, dtype=F64) for s in times])
    x_t = sim_sde.simulate_marginal(x0, t, steps=steps, generator=g)
    mean, std = ref_sde.marginal_prob(x0, t)
    r = (x_t - mean).reshape(len(times), n * 2)
    var = std.reshape(len(times), n)[:, 0] ** 2
    z = []
    for i in range(len(times)):
        se_mean = math.sqrt(float(var[i]) / r.shape[1])
        se_var = float(var[i]) * math.sqrt(2.0 / (r.shape[1] - 1)) + 0.0025 * float(var[i])
        z.append(max(abs(float(r[i].mean())) / se_mean, abs(float(r[i].var()) - float(var[i])) / se_var))
    return z


@pytest.mark.parametrize("name", AFFINE)
def test_simulated_marginals_match_closed_forms(name):
    sde = build_sde(name)
    z = _kernel_residual_check(sde, sde)
    assert max(z) < 5.0, f"{name}: z-scores per t in (0.1, 0.5, 1): {z}"


def test_simulated_marginal_check_flags_a_wrong_closed_form():
    """Simulated sub-VP against the VP kernel (a std that is wrong for sub-VP) is flagged."""
    z = _kernel_residual_check(build_sde("subvp"), build_sde("vp"))
    assert max(z) > 10.0, z


def test_euler_maruyama_is_also_consistent_but_first_order():
    """Both schemes converge; with few steps Euler's variance bias is visibly larger than Heun's."""
    sde = build_sde("vp")
    n = 20000
    x0 = torch.zeros(n, 1, dtype=F64)
    t = torch.ones(n, dtype=F64)
    var = float(sde.std(t[:1])[0] ** 2)
    out = {}
    for method in ("euler", "heun"):
        x = sde.simulate_marginal(x0, t, steps=40, generator=_gen(2), method=method)
        out[method] = float(x.var()) - var
    se = var * math.sqrt(2.0 / n)
    # Euler: stationary bias ~ r dtau / 4 * V with r = beta ~ 20, dtau = 1/40: about +12 %
    assert out["euler"] > 10 * se, out
    assert abs(out["heun"]) < abs(out["euler"]) / 3, out


def _fokker_planck_1d(means, weights, std0, times, k, beta_min=0.1, beta_max=20.0, dt=1e-3):
    """Densities of ``dx = -0.5 beta (x + k tanh x) dt + sqrt(beta) dw`` at ``times`` by
    Crank-Nicolson on ``dp/dt = -d(f p)/dx + 0.5 beta d^2 p/dx^2`` (central differences, p = 0 at
    +-7), started from a Gaussian mixture. Written here from the formula, independent of the code."""
    x = np.linspace(-7.0, 7.0, 1401)
    dx = x[1] - x[0]
    p = sum(w * np.exp(-0.5 * ((x - m) / std0) ** 2) / (std0 * math.sqrt(2 * math.pi)) for m, w in zip(means, weights))
    f0 = -0.5 * (x + k * np.tanh(x))
    out, t_now = {}, 0.0
    for t_end in sorted(times):
        n_steps = int(round((t_end - t_now) / dt))
        h = (t_end - t_now) / n_steps
        for i in range(n_steps):
            beta = beta_min + (t_now + (i + 0.5) * h) * (beta_max - beta_min)
            f, d = beta * f0, 0.5 * beta
            up = -f[1:] / (2 * dx) + d / dx**2  # coefficient of p[i+1] in row i
            low = f[:-1] / (2 * dx) + d / dx**2  # coefficient of p[i-1] in row i
            diag = np.full_like(x, -2 * d / dx**2)
            lp = diag * p
            lp[:-1] += up * p[1:]
            lp[1:] += low * p[:-1]
            ab = np.zeros((3, x.size))
            ab[0, 1:], ab[1], ab[2, :-1] = -0.5 * h * up, 1 - 0.5 * h * diag, -0.5 * h * low
            p = solve_banded((1, 1), ab, p + 0.5 * h * lp)
        t_now = t_end
        out[t_end] = (float((x * p).sum() * dx), float((x * x * p).sum() * dx))
    return out


def test_fokker_planck_reference_solver_reproduces_the_vp_closed_form():
    """The reference solver is itself checked: with k = 0 it must give the VP mixture moments."""
    sde = build_sde("vp")
    ref = _fokker_planck_1d([1.0, -0.5], [0.7, 0.3], 0.2, [0.3, 1.0], k=0.0)
    for t, (m1, m2) in ref.items():
        a, s = float(sde.alpha(_t([t]))[0]), float(sde.std(_t([t]))[0])
        exact_m1 = a * (0.7 * 1.0 + 0.3 * -0.5)
        exact_m2 = sum(w * ((a * m) ** 2 + (a * 0.2) ** 2 + s**2) for m, w in ((1.0, 0.7), (-0.5, 0.3)))
        assert abs(m1 - exact_m1) < 1e-5 and abs(m2 - exact_m2) < 1e-5, (t, m1, exact_m1, m2, exact_m2)


def test_non_affine_simulated_marginal_matches_fokker_planck_on_a_2d_toy():
    """2-D data (two Gaussians, means (1, -0.5) and (-0.5, 1.5), weights 0.7 / 0.3, std 0.2) pushed
    through the tanh SDE. The drift acts per coordinate, so each coordinate's marginal solves the
    1-D Fokker-Planck equation from that coordinate's data marginal; compare E x and E x^2."""
    sde = build_sde("tanh", k=1.0)
    g = _gen(3)
    times, n = (0.1, 0.3, 1.0), 8000
    centers = torch.tensor([[1.0, -0.5], [-0.5, 1.5]], dtype=F64)
    comp = (torch.rand(n * len(times), generator=g) >= 0.7).long()
    x0 = centers[comp] + 0.2 * torch.randn(n * len(times), 2, generator=g, dtype=F64)
    t = torch.cat([torch.full((n,), s, dtype=F64) for s in times])
    x_t, eps = sde.sample_marginal(x0, t, generator=g)
    assert eps is None
    x_t = x_t.reshape(len(times), n, 2)
    z_right, z_wrong = [], []
    vp = build_sde("vp")
    for d in range(2):
        ref = _fokker_planck_1d(centers[:, d].tolist(), [0.7, 0.3], 0.2, times, k=1.0)
        for i, s in enumerate(times):
            xs = x_t[i, :, d]
            se1, se2 = float(xs.std()) / math.sqrt(n), float((xs**2).std()) / math.sqrt(n)
            m1, m2 = ref[s]
            z_right.append(max(abs(float(xs.mean()) - m1) / se1, abs(float((xs**2).mean()) - m2) / se2))
            # wrong reference: the VP (k = 0) marginal, as if the tanh term were absent
            a, sd = float(vp.alpha(_t([s]))[0]), float(vp.std(_t([s]))[0])
            w_m2 = sum(w * ((a * m) ** 2 + (a * 0.2) ** 2 + sd**2) for m, w in zip(centers[:, d].tolist(), (0.7, 0.3)))
            z_wrong.append(abs(float((xs**2).mean()) - w_m2) / se2)
    assert max(z_right) < 5.0, z_right
    assert max(z_wrong) > 10.0, z_wrong
    # by T = 1 the marginal is the stationary density p_inf that prior_sampling / prior_logp use
    grid = torch.linspace(-8, 8, 16001, dtype=F64)
    dens = sde.prior_logp(grid[:, None]).exp()
    m2_inf = float(torch.trapezoid(grid**2 * dens, grid))
    assert abs(ref[1.0][1] - m2_inf) < 1e-3, (ref[1.0][1], m2_inf)


def test_sample_marginal_closed_form_returns_its_noise_and_is_seeded():
    sde = build_sde("vp")
    x0 = torch.randn(5, 3, 4, 4, generator=_gen(4))
    x0_copy = x0.clone()
    t = torch.rand(5, generator=_gen(5))
    x_t, eps = sde.sample_marginal(x0, t, generator=_gen(6))
    mean, std = sde.marginal_prob(x0, t)
    assert torch.allclose(x_t, mean + std.view(5, 1, 1, 1) * eps)
    assert torch.equal(x0, x0_copy)
    again, _ = sde.sample_marginal(x0, t, generator=_gen(6))
    assert torch.equal(x_t, again)
    sim1 = build_sde("tanh").sample_marginal(x0, t, generator=_gen(6))[0]
    sim2 = build_sde("tanh").sample_marginal(x0, t, generator=_gen(6))[0]
    assert torch.equal(sim1, sim2) and torch.equal(x0, x0_copy)


# --------------------------------------------------------------------------------------------------
# priors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,scale", [("vp", 1.0), ("subvp", 1.0), ("ve", 50.0)])
def test_gaussian_prior_logp_matches_torch_distributions(name, scale):
    sde = build_sde(name)
    z = sde.prior_sampling((7, 3, 2, 2), generator=_gen(7), dtype=F64)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(scale, dtype=F64))
    expected = normal.log_prob(z).flatten(1).sum(1)
    assert torch.allclose(sde.prior_logp(z), expected, rtol=1e-10, atol=1e-8)
    assert abs(float(z.std()) - scale) < 0.3 * scale


def test_tanh_prior_logp_is_normalised_and_factorises():
    sde = build_sde("tanh", k=1.5)
    grid = torch.linspace(-12, 12, 48001, dtype=F64)
    assert abs(float(torch.trapezoid(sde.prior_logp(grid[:, None]).exp(), grid)) - 1.0) < 1e-8
    z = torch.randn(6, 2, 3, generator=_gen(8), dtype=F64)
    per_coord = sde.prior_logp(z.reshape(-1, 1)).reshape(6, 6).sum(1)
    assert torch.allclose(sde.prior_logp(z), per_coord)


def test_tanh_prior_sampling_draws_the_prior_density():
    """Moments of the rejection sampler's draws against quadrature of ``exp(prior_logp)``; an
    ``N(0, 1)`` sample (the proposal, i.e. forgetting the rejection) is flagged."""
    sde = build_sde("tanh", k=1.0)
    n = 100000
    z = sde.prior_sampling((n,), generator=_gen(9), dtype=F64)
    grid = torch.linspace(-12, 12, 24001, dtype=F64)
    dens = sde.prior_logp(grid[:, None]).exp()

    def z_scores(sample):
        out = []
        for fn in (lambda v: v**2, lambda v: v**4, lambda v: (v.abs() < 0.5).to(F64)):
            exact = float(torch.trapezoid(fn(grid) * dens, grid))
            out.append(abs(float(fn(sample).mean()) - exact) / (float(fn(sample).std()) / math.sqrt(n)))
        return out

    assert max(z_scores(z)) < 5.0, z_scores(z)
    assert max(z_scores(torch.randn(n, generator=_gen(10), dtype=F64))) > 10.0


# --------------------------------------------------------------------------------------------------
# reverse-time SDE and probability-flow ODE
# --------------------------------------------------------------------------------------------------


def _reverse_checks(sde, probability_flow: bool, v: float = 0.3, h: float = 1e-6):
    """Data ``N(0, v I)``: ``p_t = N(0, V(t) I)``, ``V = alpha^2 v + std^2``, exact score ``-x / V``.
    A linear drift ``a(t) x`` transports ``p_t`` iff ``dV/dt = 2 a V`` (ODE) or, run backwards with
    noise ``g``, ``dV/dt = 2 a V - g^2`` (reverse SDE). Returns the relative residual of that
    identity and the diffusion coefficient."""

    def var(t):
        return sde.alpha(t) ** 2 * v + sde.std(t) ** 2

    t = _t(np.linspace(0.05, 0.95, 10))
    x = torch.randn(10, 3, generator=_gen(11), dtype=F64)
    rsde = sde.reverse(lambda y, s: -y / var(s).view(-1, 1), probability_flow=probability_flow)
    drift, diffusion = rsde.sde(x, t)
    a = drift / x
    assert torch.allclose(a, a[:, :1].expand_as(a))  # linear in x
    dvar = (var(t + h) - var(t - h)) / (2 * h)
    predicted = 2 * a[:, 0] * var(t) - (0 if probability_flow else diffusion**2)
    return (predicted - dvar) / dvar.abs().clamp_min(1e-3), diffusion


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_drift_transports_the_exact_marginals(name, probability_flow):
    sde = build_sde(name)
    residual, diffusion = _reverse_checks(sde, probability_flow)
    assert residual.abs().max() < 1e-5
    t = _t(np.linspace(0.05, 0.95, 10))
    assert torch.equal(diffusion, torch.zeros_like(diffusion) if probability_flow else sde.diffusion(t))
    # the drift formula itself: f - g^2 s (SDE), f - 0.5 g^2 s (ODE)
    x, t = torch.randn(4, 2, generator=_gen(12), dtype=F64), _t([0.2, 0.4, 0.6, 0.8])
    score = torch.randn(4, 2, generator=_gen(13), dtype=F64)
    f, g = sde.sde(x, t)
    factor = 0.5 if probability_flow else 1.0
    drift = sde.reverse(lambda y, s: score, probability_flow).sde(x, t)[0]
    assert torch.allclose(drift, f - factor * g.view(-1, 1) ** 2 * score)


def test_reverse_transport_check_flags_swapped_factors():
    """Using the reverse-SDE drift as the ODE velocity (factor 1 instead of 0.5) breaks transport."""
    sde = build_sde("vp")

    class Swapped:
        def __init__(self, inner):
            self.inner = inner

        def alpha(self, t):
            return self.inner.alpha(t)

        def std(self, t):
            return self.inner.std(t)

        def diffusion(self, t):
            return self.inner.diffusion(t)

        def reverse(self, score_fn, probability_flow):
            return self.inner.reverse(score_fn, not probability_flow)

    assert _reverse_checks(Swapped(sde), probability_flow=True)[0].abs().max() > 0.1


def test_score_from_eps_is_minus_eps_over_std():
    sde = build_sde("subvp")
    eps = torch.randn(3, 2, 4, 4, generator=_gen(14))
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(sde.score_from_eps(eps, t), -eps / sde.std(t).view(3, 1, 1, 1))


# --------------------------------------------------------------------------------------------------
# configuration and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vp", {"beta_min": 0.2, "beta_max": 15.0}),
        ("subvp", {"t_eps": 1e-4}),
        ("ve", {"sigma_min": 0.02, "sigma_max": 80.0, "sim_method": "euler"}),
        ("tanh", {"k": 2.0, "sim_steps": 50}),
    ],
)
def test_config_round_trips_through_json(name, kwargs):
    sde = build_sde(name, **kwargs)
    config = json.loads(json.dumps(sde.config))
    rebuilt = build_sde(**config)
    assert rebuilt == sde and type(rebuilt) is type(sde) and rebuilt.config == sde.config
    assert config["name"] == name and all(config[k] == v for k, v in kwargs.items())
    assert sde.T == 1.0 and 0 < sde.t_eps < 1


def test_registry_has_the_four_sdes():
    assert set(SDES) >= {"vp", "subvp", "ve", "tanh"}
    assert SDES["tanh"] is TanhSDE and not TanhSDE.is_affine
    assert all(SDES[n].is_affine for n in AFFINE)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: build_sde("vpp"), "'vpp'"),
        (lambda: build_sde("vp", sigma_max=3.0), "sigma_max"),
        (lambda: build_sde("vp", beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: build_sde("vp", beta_min=-1.0), "beta_min"),
        (lambda: build_sde("ve", sigma_min=1.0, sigma_max=1.0), "sigma_max"),
        (lambda: build_sde("tanh", k=-1.0), "k must"),
        (lambda: build_sde("subvp", t_eps=0.0), "t_eps"),
        (lambda: build_sde("vp", sim_method="rk4"), "'rk4'"),
        (lambda: build_sde("vp", sim_steps=0), "sim_steps"),
    ],
)
def test_bad_arguments_raise_errors_that_name_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_marginal_prob_refuses_a_non_affine_sde_by_name():
    sde = build_sde("tanh")
    with pytest.raises(NotImplementedError, match="'tanh'.*sample_marginal"):
        sde.marginal_prob(torch.zeros(2, 2), torch.ones(2))


def test_time_shape_is_checked():
    sde = build_sde("vp")
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        sde.sde(torch.zeros(3, 2), torch.ones(2))
    drift, g = sde.sde(torch.ones(3, 2), 0.5)  # a scalar t is broadcast
    assert drift.shape == (3, 2) and g.shape == (3,)


def test_append_dims_is_the_one_left_aligned_broadcast():
    from lcss_prior.sde import append_dims

    v, x = torch.arange(3.0), torch.zeros(3, 2, 4, 5)
    assert append_dims(v, x.ndim).shape == (3, 1, 1, 1) and torch.equal((append_dims(v, x.ndim) + x)[:, 1, 2, 3], v)
    assert append_dims(torch.zeros(3, 2), 5).shape == (3, 2, 1, 1, 1)
    assert append_dims(v, 1) is not None and append_dims(v, 1).shape == (3,)
    with pytest.raises(ValueError, match="cannot be viewed with 1 dimensions"):
        append_dims(torch.zeros(3, 2), 1)
