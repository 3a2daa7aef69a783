"""Probability-flow likelihood and bits/dim against closed forms.

* Correlated Gaussian data ``N(m, S)`` in 3-D under VP / sub-VP / VE has the analytic score of
  ``p_t``; the ODE log-likelihood with the exact trace must equal ``log p_{t_eps}(x)`` up to the ODE
  tolerance (after accounting for the known prior mismatch ``log p_T(x_T) - prior_logp(x_T)``) and
  ``log N(x; m, S)`` up to that mismatch. An ODE with the wrong probability-flow factor is flagged.
* Hutchinson's estimate (Rademacher and Gaussian probes) is unbiased: its mean over many probes is
  within a few standard errors of the exact value; probes with ``E[z z^T] != I`` are flagged.
* The dequantised bits/dim of a discretised Gaussian equal the exact value, summed numerically over
  the levels, within Monte-Carlo error, and sit just above the data's true discrete entropy; an
  implementation with the offset ``log2(n)`` instead of ``log2((n - 1) / 2)`` is flagged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from lcss_prior import likelihood
from lcss_prior.data import build_dataset
from lcss_prior.export import export_prior, load_prior
from lcss_prior.likelihood import (
    AnalyticGaussian,
    bits_per_dim,
    bits_per_dim_offset,
    dequantize,
    divergence_exact,
    divergence_hutchinson,
    ode_log_likelihood,
)
from lcss_prior.model import EpsNetwork, build_unet
from lcss_prior.sde import build_sde

N_SE = 5.0
T_EPS = 1e-5
MEAN = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
FACTOR = torch.tensor([[0.4, 0.1, 0.0], [0.15, 0.3, 0.05], [0.0, -0.1, 0.25]], dtype=torch.float64)
COV = FACTOR @ FACTOR.T  # correlated, so the Jacobian of the drift is not diagonal


def _points(n: int, seed: int = 0) -> torch.Tensor:
    return (
        MEAN
        + torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ FACTOR.T
    )


def _exact_ode_value(gauss: AnalyticGaussian, sde, x, x_T) -> torch.Tensor:
    """What the ODE computes exactly: log p_eps(x) - log p_T(x_T) + prior_logp(x_T)."""
    b = x.shape[0]
    return (
        gauss.log_prob(x, torch.full((b,), T_EPS, dtype=x.dtype))
        - gauss.log_prob(x_T, torch.full((b,), sde.T, dtype=x.dtype))
        + sde.prior_logp(x_T)
    )


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_exact_trace_log_likelihood_is_analytic(sde_name):
    sde = build_sde(sde_name, t_eps=T_EPS)
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(6)
    logp, x_T, nfev = ode_log_likelihood(sde, gauss.score, x, trace="exact", rtol=1e-6, atol=1e-6)
    assert nfev > 10
    # the ODE itself: within its tolerance
    torch.testing.assert_close(logp, _exact_ode_value(gauss, sde, x, x_T), rtol=0, atol=5e-4)
    # the data density: up to the prior mismatch p_T != prior (|alpha_T m . x_T| / var ~ 1e-2 here)
    torch.testing.assert_close(logp, gauss.log_prob(x), rtol=0, atol=0.03)


def test_exact_check_flags_wrong_probability_flow_factor():
    class WrongFactorSDE:
        def __init__(self, sde):
            self._sde = sde

        def __getattr__(self, name):
            return getattr(self._sde, name)

        def reverse(self, score_fn, probability_flow=False):
            return self._sde.reverse(score_fn, probability_flow=False)  # f - g^2 s

    sde = build_sde("vp", t_eps=T_EPS)
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(6)
    logp, _, _ = ode_log_likelihood(WrongFactorSDE(sde), gauss.score, x, trace="exact", rtol=1e-6, atol=1e-6)
    assert (logp - gauss.log_prob(x)).abs().max() > 0.5


def test_divergence_estimators_agree_with_the_jacobian_trace():
    """exact == tr(J) for a linear map; Hutchinson with the identity as the only 'probes' basis."""
    a = torch.tensor([[1.0, 2.0, 0.0], [0.5, -3.0, 1.0], [0.0, 4.0, 0.25]], dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.float64)
    v, div = divergence_exact(lambda y, _t: y @ a.T, x, t)
    torch.testing.assert_close(v, x @ a.T)
    torch.testing.assert_close(div, torch.full((4,), float(torch.trace(a)), dtype=torch.float64))
    basis = torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 4, 3)  # z = e_i: mean of diagonal
    _, div_h = divergence_hutchinson(lambda y, _t: y @ a.T, x, t, basis)
    torch.testing.assert_close(div_h * 3, div)


def _uniform_probe(shape, generator):
    """Wrong on purpose: E[z z^T] = I / 3."""
    return torch.rand(shape, generator=generator) * 2.0 - 1.0


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize(
    "probe", ["rademacher", "gaussian", _uniform_probe], ids=["rademacher", "gaussian", "wrong"]
)
def test_hutchinson_log_likelihood_is_unbiased(sde_name, probe):
    sde = build_sde(sde_name, t_eps=T_EPS)
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(1, seed=3)
    exact, _, _ = ode_log_likelihood(sde, gauss.score, x, trace="exact", rtol=1e-6, atol=1e-6)
    k = 2000  # independent probes: one copy of the point per probe, solved as one batch
    g = torch.Generator().manual_seed(11)
    est, _, _ = ode_log_likelihood(
        sde, gauss.score, x.expand(k, -1), trace="hutchinson", probe=probe, generator=g
    )
    z = float((est.mean() - exact[0]) / (est.std() / math.sqrt(k)))
    if probe is _uniform_probe:
        assert abs(z) > N_SE, f"probes with E[zz^T] = I/3 should be flagged (z = {z:.1f})"
    else:
        assert abs(z) < N_SE, f"Hutchinson ({probe}) is {z:.1f} standard errors off"
        assert est.std() > 1e-3  # the correlated covariance makes the estimate genuinely random


# ----- bits per dimension ------------------------------------------------------------------------

LEVELS, M1, S1, D1 = 256, 0.1, 0.2, 2


def _discretised_gaussian(n_points: int, seed: int) -> torch.Tensor:
    """Levels k = round((x + 1)(n - 1) / 2) of x ~ N(M1, S1^2) (bins of width 2/(n-1) centred on
    the grid), stored as 2k/(n-1) - 1 like images."""
    x = M1 + S1 * torch.randn(
        n_points, D1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    k = torch.round((x + 1) * (LEVELS - 1) / 2).clamp(0, LEVELS - 1)
    return 2 * k / (LEVELS - 1) - 1


def _exact_dequantised_bpd_and_entropy() -> tuple[float, float]:
    """Per dimension, summed over the levels: E_k E_u[-log2 N(x_k + h(u - 1/2); M1, S1^2)]
    + log2((n-1)/2) with h = 2/(n-1), and the true discrete entropy -sum_k P(k) log2 P(k)."""
    h = 2.0 / (LEVELS - 1)
    edges = h * (np.arange(LEVELS + 1) - 0.5) - 1.0
    cdf = norm.cdf((edges - M1) / S1)
    cdf[0], cdf[-1] = 0.0, 1.0  # the outer levels take the tails
    p = np.diff(cdf)
    a = edges[:-1] - M1
    # int_0^1 (a + h u)^2 du = a^2 + a h + h^2 / 3
    nats = 0.5 * np.log(2 * np.pi * S1**2) + (a**2 + a * h + h**2 / 3) / (2 * S1**2)
    bpd = float((p * nats).sum() / np.log(2) + np.log2((LEVELS - 1) / 2))
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return bpd, entropy


def _gaussian_bpd(n_points: int = 400, seed: int = 0) -> tuple[float, float]:
    sde = build_sde("vp", t_eps=T_EPS)
    gauss = AnalyticGaussian(
        sde, torch.full((D1,), M1, dtype=torch.float64), S1**2 * torch.eye(D1, dtype=torch.float64)
    )
    data = _discretised_gaussian(n_points, seed)
    return bits_per_dim(
        gauss.score, sde, data, n_levels=LEVELS, batch_size=200, trace="exact", progress=False
    )


def test_offset_is_log2_half_the_grid_intervals():
    assert bits_per_dim_offset(256) == pytest.approx(math.log2(127.5))
    assert bits_per_dim_offset(17) == 3.0
    assert bits_per_dim_offset(None) == 0.0
    with pytest.raises(ValueError, match="n_levels must be an integer >= 2"):
        bits_per_dim_offset(1)


def test_dequantised_bpd_of_discretised_gaussian_is_exact():
    exact, entropy = _exact_dequantised_bpd_and_entropy()
    assert 0.0 <= exact - entropy < 1e-3  # the dequantisation bound is tight for a smooth density
    mean, stderr = _gaussian_bpd()
    assert 0.0 < stderr < 0.1
    assert abs(mean - exact) < N_SE * stderr, f"bpd {mean:.4f} +- {stderr:.4f} vs exact {exact:.4f}"


def test_bpd_check_flags_a_wrong_offset(monkeypatch):
    exact, _ = _exact_dequantised_bpd_and_entropy()
    monkeypatch.setattr(likelihood, "bits_per_dim_offset", lambda n: math.log2(n))  # a common slip
    mean, stderr = _gaussian_bpd()
    assert abs(mean - exact) > N_SE * stderr


def test_continuous_bits_per_dim_has_no_offset():
    sde = build_sde("vp", t_eps=T_EPS)
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(300, seed=5)
    mean, stderr = bits_per_dim(gauss.score, sde, x, n_levels=None, trace="exact", progress=False)
    expected = float((-gauss.log_prob(x) / (3 * math.log(2))).mean())
    assert abs(mean - expected) < 0.01 and stderr > 0


def test_dequantize_stays_in_the_level_bin():
    k = torch.arange(17, dtype=torch.float64).repeat(50)
    x = 2 * k / 16 - 1  # the digits grid
    y = dequantize(x, 17, torch.Generator().manual_seed(0))
    h = 2 / 16
    assert torch.all((y >= x - h / 2) & (y < x + h / 2))  # the bin of width h centred on x_k
    assert torch.equal(torch.round((y + 1) / h), k)
    assert (y - x).abs().max() > 0.4 * h  # the whole bin is used, not a point
    with pytest.raises(ValueError, match=r"data must lie in \[-1, 1\]"):
        dequantize(torch.tensor([0.0, 1.5]), 17)


def test_argument_errors(tiny_prior):
    sde = build_sde("vp")
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(2)
    with pytest.raises(KeyError, match="unknown trace estimator 'skilling'"):
        ode_log_likelihood(sde, gauss.score, x, trace="skilling")
    with pytest.raises(KeyError, match="unknown probe 'sobol'.*gaussian.*rademacher"):
        ode_log_likelihood(sde, gauss.score, x, probe="sobol")
    with pytest.raises(ValueError, match="n_probes must be >= 1"):
        ode_log_likelihood(sde, gauss.score, x, n_probes=0)
    with pytest.raises(ValueError, match="sde is required"):
        bits_per_dim(gauss.score, None, x.clamp(-1, 1), progress=False)
    with pytest.raises(ValueError, match="conditional=True needs labels"):
        bits_per_dim(tiny_prior, None, torch.zeros(2, 1, 8, 8), n_levels=17, conditional=True, progress=False)


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    torch.manual_seed(0)
    sde = build_sde("vp")
    network = EpsNetwork(build_unet(8, 1, num_classes=10, preset="tiny"), sde, input_scaling="edm")
    captions = [f"digit {d}" for d in range(10)]
    folder = export_prior(
        network, sde, tmp_path_factory.mktemp("prior") / "p", captions, 8, 1, 10, n_levels=17
    )
    return load_prior(folder)


def test_bits_per_dim_of_a_prior_on_a_dataset(tiny_prior):
    """The real path: an exported prior, a data set of dicts, Hutchinson, conditional or not."""
    data = build_dataset("digits", 8, split="test")
    kwargs = {"n_levels": data.n_levels, "batch_size": 2, "rtol": 1e-2, "atol": 1e-2, "progress": False}
    mean, stderr = bits_per_dim(tiny_prior, None, data, max_samples=2, **kwargs)
    assert math.isfinite(mean) and math.isfinite(stderr) and stderr > 0
    mean_c, _ = bits_per_dim(tiny_prior, None, data, max_samples=1, conditional=True, **kwargs)
    mean_u, _ = bits_per_dim(tiny_prior, None, data, max_samples=1, **kwargs)
    assert math.isfinite(mean_c) and mean_c != mean_u  # the labels reach the network


def test_bits_per_dim_is_seeded():
    sde = build_sde("vp", t_eps=T_EPS)
    gauss = AnalyticGaussian(sde, MEAN, COV)
    x = _points(50, seed=2).clamp(-1, 1)
    runs = [bits_per_dim(gauss.score, sde, x, n_levels=256, seed=s, progress=False) for s in (0, 0, 1)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
