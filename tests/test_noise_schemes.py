"""Where a step puts its noise draws (``DistillationConfig.noise_draws``, ``t_sampling``,
``antithetic``): the placement is what the docs say, every scheme keeps the SDS mean (checked
against the analytic mean of a Gaussian prior, and shown to flag deliberately broken variants),
antithetic pairs cancel what is odd in ``eps``, and the schedule's state resumes bit for bit."""

from __future__ import annotations

import io
import math

import pytest
import torch

from threestudio_ssd.distillation import GOLDEN, RESUME_STATE_KEYS, ScoreDistillation
from threestudio_ssd.testing import GaussianScoreModel, hotelling_p_value

FALSE_ALARM = 1e-4  # level of every "has the SDS mean" check
T_RANGE = (0.02, 0.98)


@pytest.fixture(scope="module")
def prior() -> GaussianScoreModel:
    g = torch.Generator().manual_seed(0)
    m = 0.5 * torch.randn(1, 2, 2, generator=g)
    s = torch.tensor([0.15, 0.4, 0.8, 1.5]).reshape(1, 2, 2)
    return GaussianScoreModel(m, s)


@pytest.fixture(scope="module")
def x0(prior) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (prior.m + 0.3 * torch.randn(prior.m.shape, generator=g))[None]  # the render, model space


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def has_sds_mean(prior, x0, samples: torch.Tensor) -> tuple[bool, float]:
    p = hotelling_p_value(samples.double() - prior.mean_sds(x0[0], T_RANGE))
    return p > FALSE_ALARM, p


def draws(dist: ScoreDistillation, x0: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's ``(t, eps)`` for the renders ``x0`` without advancing the schedule."""
    return dist._draw(x0, T_RANGE, gen(seed), advance=False)


# ---------------------------------------------------------------------------------------------
# placement
# ---------------------------------------------------------------------------------------------


def test_pairs_share_t_and_negate_eps(prior, x0):
    dist = ScoreDistillation(prior, estimator="sds", noise_draws=4, antithetic="pairs")
    renders = x0.expand(3, -1, -1, -1)
    t, eps = draws(dist, renders)
    assert t.shape == (12,) and eps.shape == (12, 1, 2, 2)
    # draw j of render b at j * B + b; draw j + n/2 is draw j's antithetic partner
    torch.testing.assert_close(t[6:], t[:6], rtol=0, atol=0)
    torch.testing.assert_close(eps[6:], -eps[:6], rtol=0, atol=0)
    assert len(set(t[:6].tolist())) == 6


@pytest.mark.parametrize("n", [1, 3, 8])
def test_stratified_puts_one_t_per_stratum_of_each_render(prior, x0, n):
    dist = ScoreDistillation(prior, estimator="sds", noise_draws=n, t_sampling="stratified")
    t, _ = draws(dist, x0.expand(5, -1, -1, -1))
    u = ((t - T_RANGE[0]) / (T_RANGE[1] - T_RANGE[0])).reshape(n, 5)
    strata = (u * n).floor().clamp(max=n - 1).long()
    for b in range(5):
        assert sorted(strata[:, b].tolist()) == list(range(n))


def test_golden_follows_the_additive_recurrence_per_render_slot(prior, x0):
    dist = ScoreDistillation(prior, estimator="sds", t_sampling="golden", noise_draws=2)
    renders, g = x0.expand(3, -1, -1, -1), gen(5)
    us = []
    for _ in range(4):
        t, _ = dist._draw(renders, T_RANGE, g)
        us.append(((t.double() - T_RANGE[0]) / (T_RANGE[1] - T_RANGE[0])).reshape(2, 3))
    start = dist._schedule["golden_start"]
    for k, u in enumerate(us):
        base = (start + k * GOLDEN) % 1.0
        torch.testing.assert_close(u[0], base, atol=1e-6, rtol=0)
        torch.testing.assert_close(u[1], (base + 0.5) % 1.0, atol=1e-6, rtol=0)
    assert len(set(start.tolist())) == 3  # each slot its own random start


def test_antithetic_steps_reuse_t_and_negate_eps_every_second_step(prior, x0):
    dist = ScoreDistillation(prior, estimator="sds", antithetic="steps")
    renders, g = x0.expand(2, -1, -1, -1), gen(6)
    (t0, e0), (t1, e1), (t2, e2) = (dist._draw(renders, T_RANGE, g) for _ in range(3))
    torch.testing.assert_close(t1, t0, rtol=0, atol=0)
    torch.testing.assert_close(e1, -e0, rtol=0, atol=0)
    assert not torch.equal(t2, t0) and not torch.equal(e2.abs(), e0.abs())
    # a changed t range (threestudio's schedule) drops the partner: its t might lie outside
    t3, _ = dist._draw(renders, T_RANGE, g)
    t4, _ = dist._draw(renders, (0.5, 0.6), g)
    assert not torch.equal(t4, t3) and bool(((t4 >= 0.5) & (t4 <= 0.6)).all())


def test_step_gradient_is_the_mean_of_its_draws(prior, x0):
    dist = ScoreDistillation(prior, estimator="sds", noise_draws=3, t_sampling="stratified")
    renders = x0.expand(2, -1, -1, -1)
    out = dist(renders, None, t_range=T_RANGE, generator=gen(7), rgb_as_latents=True)
    t, eps = dist._draw(renders, T_RANGE, gen(7), advance=False)
    x_t = prior.add_noise(renders.repeat(3, 1, 1, 1), eps, t)
    per_draw = prior.weight(t).view(-1, 1, 1, 1) * (prior.eps(x_t, t, None, 1.0) - eps)
    torch.testing.assert_close(out.grad, per_draw.reshape(3, 2, 1, 2, 2).mean(0))
    torch.testing.assert_close(out.t, t[:2], rtol=0, atol=0)


def test_bad_settings_are_named():
    from threestudio_ssd.distillation import DistillationConfig

    with pytest.raises(ValueError, match="antithetic='pairs' needs an even noise_draws"):
        DistillationConfig(noise_draws=3, antithetic="pairs")
    with pytest.raises(ValueError, match="noise_draws must be an integer >= 1"):
        DistillationConfig(noise_draws=0)
    with pytest.raises(ValueError, match="t_sampling must be one of"):
        DistillationConfig(t_sampling="sobol")
    with pytest.raises(ValueError, match="antithetic='steps' with mu_mode='learned'"):
        DistillationConfig(antithetic="steps", mu_mode="learned")


# ---------------------------------------------------------------------------------------------
# unbiasedness
# ---------------------------------------------------------------------------------------------

SCHEMES = {
    "sds": dict(estimator="sds"),
    "sds-n4-stratified": dict(estimator="sds", noise_draws=4, t_sampling="stratified"),
    "sds-n2-pairs": dict(estimator="sds", noise_draws=2, antithetic="pairs"),
    "sds-n4-stratified-pairs": dict(estimator="sds", noise_draws=4, t_sampling="stratified", antithetic="pairs"),
    "sds-n4-golden-lattice": dict(estimator="sds", noise_draws=4, t_sampling="golden"),
    "ssd-constant-n4-stratified-pairs": dict(
        estimator="ssd", noise_draws=4, t_sampling="stratified", antithetic="pairs", mu_t_bins=4, mu_init=0.7
    ),
}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_keeps_the_sds_mean(prior, x0, name):
    """Per-step samples (``estimate_variance``: independent steps of the scheme) have the analytic
    SDS mean; ``mu_init=0.7`` keeps a weight away from 1 so that the constant cv is really in play."""
    dist = ScoreDistillation(prior, **SCHEMES[name])
    est = dist.estimate_variance(
        x0, None, n_draws=4000, generator=gen(11), t_range=T_RANGE, batch_size=1000, rgb_as_latents=True
    )
    ok, p = has_sds_mean(prior, x0, est.ssd)
    assert ok, f"{name}: mean differs from the analytic SDS mean (p = {p:.2e})"


def test_deterministic_strata_are_flagged_as_biased(prior, x0, monkeypatch):
    """The check has teeth: strata midpoints instead of a uniform point in each (a quadrature rule,
    not an unbiased estimate of the t-average) are flagged."""
    dist = ScoreDistillation(prior, estimator="sds", noise_draws=4, t_sampling="stratified")

    def midpoints(m, batch, generator, like, advance, independent):
        return ((torch.arange(m, dtype=torch.float32)[:, None] + 0.5) / m).expand(m, batch).reshape(-1)

    monkeypatch.setattr(dist, "_uniforms", midpoints)
    est = dist.estimate_variance(
        x0, None, n_draws=4000, generator=gen(11), t_range=T_RANGE, batch_size=1000, rgb_as_latents=True
    )
    ok, p = has_sds_mean(prior, x0, est.ssd)
    assert not ok, f"midpoint strata not flagged (p = {p:.2e})"


SEQUENCES = {
    "golden": dict(estimator="sds", t_sampling="golden"),
    "golden-n2": dict(estimator="sds", t_sampling="golden", noise_draws=2),
    "antithetic-steps": dict(estimator="sds", antithetic="steps"),
    "golden-antithetic-steps": dict(estimator="sds", t_sampling="golden", antithetic="steps"),
}


def run_slots(dist: ScoreDistillation, x0: torch.Tensor, slots: int, steps: int, seed: int = 13):
    """``steps`` steps on ``slots`` copies of the render; render slot ``b`` is an independent
    sequence (its own golden start, its own antithetic partner), so each step's gradients over the
    slots are independent draws of that step's marginal."""
    renders, g = x0.expand(slots, -1, -1, -1), gen(seed)
    return [dist(renders, None, t_range=T_RANGE, generator=g, rgb_as_latents=True).grad for _ in range(steps)]


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_every_step_of_a_sequence_keeps_the_sds_mean(prior, x0, name):
    grads = run_slots(ScoreDistillation(prior, **SEQUENCES[name]), x0, slots=4000, steps=4)
    for k, grad in enumerate(grads):
        ok, p = has_sds_mean(prior, x0, grad)
        assert ok, f"{name}, step {k}: mean differs from the analytic SDS mean (p = {p:.2e})"


def test_golden_without_a_random_start_is_flagged_as_biased(prior, x0):
    dist = ScoreDistillation(prior, estimator="sds", t_sampling="golden")
    dist._schedule["golden_start"] = torch.zeros(4000, dtype=torch.float64)  # u_0 = 0 for every slot
    grads = run_slots(dist, x0, slots=4000, steps=2)
    assert not any(has_sds_mean(prior, x0, g)[0] for g in grads)


def antithetic_ssd_second_steps(prior, x0, runs: int, broken: bool = False) -> torch.Tensor:
    """The second step of ``runs`` independent batch-1 SSD runs (constant cv, ``optimal`` scalar
    ``mu``) with ``antithetic="steps"``; ``broken`` refits ``mu`` right after the first step, so
    that a ``mu`` fitted on ``eps`` weights the next step's ``-eps``."""
    out = []
    for r in range(runs):
        dist = ScoreDistillation(prior, estimator="ssd", antithetic="steps", mu_ema=1.0)
        if broken:
            dist.config.antithetic = "none"  # only _update_optimal_mu reads it after the draws
        g = gen(1000 + r)
        for _ in range(2):
            if broken:
                dist.config.antithetic = "steps"
            t, eps = dist._draw(x0, T_RANGE, g)
            if broken:
                dist.config.antithetic = "none"
            s = dist._step(x0, t, eps, None, None)
            dist._update_optimal_mu(s, t)
        out.append(s.grad)
    return torch.cat(out)


def test_antithetic_steps_refit_mu_only_after_the_pair(prior, x0):
    ok, p = has_sds_mean(prior, x0, antithetic_ssd_second_steps(prior, x0, runs=3000))
    assert ok, f"second steps of antithetic SSD differ from the SDS mean (p = {p:.2e})"
    ok, p = has_sds_mean(prior, x0, antithetic_ssd_second_steps(prior, x0, runs=3000, broken=True))
    assert not ok, f"refitting mu between the two steps of a pair not flagged (p = {p:.2e})"


# ---------------------------------------------------------------------------------------------
# variance
# ---------------------------------------------------------------------------------------------


def test_pairs_cancel_what_is_odd_in_eps(prior, x0):
    """The Gaussian prior's ``eps_hat`` is linear in ``eps``: at a fixed ``t`` a pair's mean has no
    noise left at all, while two independent draws keep half of SDS's variance."""
    kw = dict(n_draws=256, generator=gen(17), t=0.5, rgb_as_latents=True, batch_size=256)
    pairs = ScoreDistillation(prior, estimator="sds", noise_draws=2, antithetic="pairs").estimate_variance(x0, None, **kw)
    two = ScoreDistillation(prior, estimator="sds", noise_draws=2).estimate_variance(x0, None, **kw)
    assert pairs.var_ssd < 1e-10 * pairs.var_sds
    assert two.ratio == pytest.approx(0.5, rel=0.25)  # chi-square noise of 256 draws in 4 dimensions


def test_stratified_t_removes_most_of_the_between_t_variance(prior, x0):
    """Four stratified draws against four independent ones, both with pairs (no within-t noise
    left): what remains is the spread of E[grad | t], which stratification shrinks ~n-fold more."""
    kw = dict(n_draws=2000, generator=gen(19), rgb_as_latents=True, batch_size=1000, t_range=T_RANGE)
    iid = ScoreDistillation(prior, estimator="sds", noise_draws=8, antithetic="pairs")
    strat = ScoreDistillation(prior, estimator="sds", noise_draws=8, antithetic="pairs", t_sampling="stratified")
    v_iid = iid.estimate_variance(x0, None, **kw).var_ssd
    v_strat = strat.estimate_variance(x0, None, **kw).var_ssd
    assert v_strat < 0.25 * v_iid, (v_strat, v_iid)


# ---------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------


def _scheduled(prior) -> ScoreDistillation:
    return ScoreDistillation(prior, estimator="ssd", t_sampling="golden", antithetic="steps", mu_t_bins=3)


def _train(dist, image, opt, g, steps):
    for _ in range(steps):
        out = dist(image, None, t_range=T_RANGE, generator=g, rgb_as_latents=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return out.stats


def _fresh(prior, x0):
    image = torch.nn.Parameter(x0.expand(2, -1, -1, -1).clone())
    return _scheduled(prior), image, torch.optim.Adam([image], lr=0.05), gen(23)


@pytest.mark.parametrize("split", [1, 2])  # inside a pair (held-back mu data pending) and between pairs
def test_the_schedule_resumes_bit_for_bit(prior, x0, split):
    full = _fresh(prior, x0)
    full_stats = _train(*full, steps=5)
    first = _fresh(prior, x0)
    _train(*first, steps=split)
    buffer = io.BytesIO()
    dist, image, opt, g = first
    torch.save(
        {"mu": dist.state_dict(), "image": image.detach(), "opt": opt.state_dict(), "g": g.get_state(),
         "resume": dist.resume_state()},
        buffer,
    )

    def restore(keys):
        saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        run = _fresh(prior, x0)
        run[0].load_state_dict(saved["mu"])
        with torch.no_grad():
            run[1].copy_(saved["image"])
        run[2].load_state_dict(saved["opt"])
        run[3].set_state(saved["g"])
        run[0].load_resume_state({k: v for k, v in saved["resume"].items() if k in keys})
        return run

    resumed = restore(RESUME_STATE_KEYS)
    assert _train(*resumed, steps=5 - split) == full_stats
    assert torch.equal(resumed[1], full[1])
    with pytest.warns(UserWarning, match=r"no \['schedule'\]"):
        lost = restore(tuple(k for k in RESUME_STATE_KEYS if k != "schedule"))
    _train(*lost, steps=5 - split)
    assert not torch.equal(lost[1], full[1])


def test_schedule_state_is_plain_and_validated(prior):
    dist = _scheduled(prior)
    state = dist.resume_state()["schedule"]
    assert set(state) == {"golden_start", "golden_step", "pending", "deferred"}
    with pytest.raises(ValueError, match="'schedule' lacks"):
        dist.load_resume_state({**dist.resume_state(), "schedule": {"golden_step": 3}})
    assert math.isclose(GOLDEN, 0.6180339887498949)


# ---------------------------------------------------------------------------------------------
# the linearisation control variate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", [True, False])
def test_linear_cv_keeps_the_sds_mean(prior, x0, constant):
    """SSD with the linearisation control variate, fixed weights away from SDS's, has the analytic
    SDS mean (with and without the constant cv)."""
    init = [0.6, 0.5] if constant else [0.8]
    dist = ScoreDistillation(prior, estimator="ssd", linear_cv=True, include_constant=constant, mu_init=init)
    assert dist.mu.n_cv == len(init)
    est = dist.estimate_variance(
        x0, None, n_draws=4000, generator=gen(29), t_range=T_RANGE, batch_size=1000, rgb_as_latents=True
    )
    ok, p = has_sds_mean(prior, x0, est.ssd)
    assert ok, f"linear cv (constant={constant}): mean differs from the analytic SDS mean (p = {p:.2e})"


@pytest.fixture(scope="module")
def nonlinear_prior(tmp_path_factory):
    from threestudio_ssd.score_models import LCSSPriorScoreModel
    from threestudio_ssd.testing import make_tiny_prior

    return LCSSPriorScoreModel(make_tiny_prior(tmp_path_factory.mktemp("prior") / "p", resolution=4))


def test_linear_cv_is_zero_mean_and_the_jacobian_at_x_t_is_flagged(nonlinear_prior):
    """On a nonlinear (random network) prior the central difference at ``alpha x0`` has mean zero;
    the same difference taken around ``x_t`` (the Jacobian at the noisy point, which depends on
    ``eps``) does not, and the same check says so."""
    sm, n = nonlinear_prior, 3000
    dist = ScoreDistillation(sm, estimator="ssd", linear_cv=True, guidance_scale=1.0)
    g = gen(31)
    x0 = (2 * torch.rand(1, 3, 4, 4, generator=g) - 1).expand(n, -1, -1, -1)
    t, eps = torch.full((n,), 0.8), torch.randn(n, 3, 4, 4, generator=g)
    cond = torch.zeros(n, dtype=torch.long)
    h = dist._linear_cv(x0, t, eps, cond)
    p = hotelling_p_value(h)
    assert p > FALSE_ALARM, f"linear cv not zero-mean (p = {p:.2e})"
    from threestudio_ssd.distillation import LINEAR_CV_STEP as d

    x_t = sm.add_noise(x0, eps, t)
    step = (d * sm.sigma(t)).view(-1, 1, 1, 1) * eps
    at_x_t = (sm.eps(x_t + step, t, cond, 1.0) - sm.eps(x_t - step, t, cond, 1.0)) / (2 * d)
    p = hotelling_p_value(at_x_t)
    assert p < FALSE_ALARM, f"the Jacobian at x_t not flagged as biased (p = {p:.2e})"


def test_linear_cv_settings_are_checked(prior):
    from threestudio_ssd.distillation import DistillationConfig

    with pytest.raises(ValueError, match="linear_cv is a control variate of estimator='ssd'"):
        DistillationConfig(estimator="sds", linear_cv=True)
    # the linear cv alone is a valid SSD (no baseline, no constant)
    assert ScoreDistillation(prior, estimator="ssd", include_constant=False, linear_cv=True).mu.n_cv == 1
