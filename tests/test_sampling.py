"""Samplers recover a known Gaussian through its exact score; registry, guidance, prior and CLI.

Statistical checks: data ``N(m, s^2 I)`` in 2-D, diffused by VP/sub-VP/VE, has the analytic score
``-(x - alpha m) / (alpha^2 s^2 + std^2)``. A correct sampler followed by Tweedie's denoising step
at ``t_eps`` produces ``N(m, alpha^2 s^4 / (alpha^2 s^2 + std^2))`` exactly (up to time
discretisation), so the sample mean and standard deviation must agree within a few Monte-Carlo
standard errors. The same check is shown to flag a deliberately wrong sampler.
"""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lcss_prior.export import export_prior, load_prior
from lcss_prior.guidance import classifier_free_guidance
from lcss_prior.likelihood import AnalyticGaussian
from lcss_prior.model import EpsNetwork, build_unet
from lcss_prior.sampling import (
    SAMPLERS,
    add_cli_arguments,
    cli_main,
    get_sampler,
    guided_score_fn,
    pc_sampler,
    register_sampler,
    resolve_class_labels,
    sample,
    sample_prior,
    save_grid,
    time_grid,
    tweedie_denoise,
)
from lcss_prior.sde import build_sde

MEAN, STD, DIM, N = 0.5, 0.3, 2, 4000
N_SE = 5.0  # tolerance in Monte-Carlo standard errors


def _gaussian(sde):
    return AnalyticGaussian(sde, torch.full((DIM,), MEAN), STD**2 * torch.eye(DIM))


def _target(sde) -> tuple[float, float]:
    """Mean and std of Tweedie's E[x0 | x_{t_eps}] for x_{t_eps} ~ p_{t_eps}."""
    t = torch.tensor([sde.t_eps])
    a2, var_t = float(sde.alpha(t)) ** 2, float(sde.alpha(t)) ** 2 * STD**2 + float(sde.std(t)) ** 2
    return MEAN, math.sqrt(a2 * STD**4 / var_t)


def _z_scores(x: torch.Tensor, mean: float, std: float) -> tuple[float, float]:
    """(mean error, std error) in standard errors, pooling the independent coordinates."""
    v = x.reshape(-1).double()
    n = v.numel()
    return float((v.mean() - mean) / (std / math.sqrt(n))), float((v.std() - std) / (std / math.sqrt(2 * n)))


SAMPLER_CASES = [
    ("euler_maruyama", 500, {}),
    ("pc", 500, {"snr": 0.16}),
    ("ode", 100, {"solver": "heun"}),
    ("ode", 50, {"solver": "rk4"}),
    ("ode", 1, {"solver": "rk45", "rtol": 1e-5, "atol": 1e-5}),
]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,steps,kwargs", SAMPLER_CASES, ids=lambda c: str(c))
def test_samplers_recover_gaussian(sde_name, method, steps, kwargs):
    sde = build_sde(sde_name)
    g = torch.Generator().manual_seed(1)
    x = sample(
        sde, _gaussian(sde).score, (N, DIM), method=method, steps=steps, generator=g, progress=False, **kwargs
    )
    z_mean, z_std = _z_scores(x, *_target(sde))
    assert abs(z_mean) < N_SE, f"{method} {kwargs} on {sde_name}: mean off by {z_mean:.1f} SE"
    assert abs(z_std) < N_SE, f"{method} {kwargs} on {sde_name}: std off by {z_std:.1f} SE"


@pytest.fixture
def wrong_sampler():
    """A plausible bug: the reverse SDE's drift (full g^2 score) integrated without its noise."""

    @register_sampler("_test_noiseless_reverse_sde")
    def noiseless(sde, score_fn, x, steps, generator, progress):
        rsde = sde.reverse(score_fn, probability_flow=False)
        grid = time_grid(sde, steps)
        for t, t_next in zip(grid[:-1], grid[1:]):
            x = x + rsde.sde(x, torch.full((x.shape[0],), t))[0] * (t_next - t)
        return x

    yield "_test_noiseless_reverse_sde"
    SAMPLERS.pop("_test_noiseless_reverse_sde")


def test_gaussian_check_flags_wrong_sampler(wrong_sampler):
    sde = build_sde("vp")
    x = sample(sde, _gaussian(sde).score, (N, DIM), method=wrong_sampler, steps=200, progress=False)
    z_mean, z_std = _z_scores(x, *_target(sde))
    assert abs(z_std) > N_SE, "the Gaussian check should flag a sampler that drops the reverse-SDE noise"


def test_gaussian_check_flags_probability_flow_with_wrong_factor():
    """The 'ode' sampler with a reverse SDE whose probability-flow factor is 1 instead of 1/2."""

    class WrongFactorSDE:
        def __init__(self, sde):
            self._sde = sde

        def __getattr__(self, name):
            return getattr(self._sde, name)

        def reverse(self, score_fn, probability_flow=False):
            return self._sde.reverse(score_fn, probability_flow=False)  # drift f - g^2 s

    sde = build_sde("vp")
    x = sample(WrongFactorSDE(sde), _gaussian(sde).score, (N, DIM), method="ode", steps=100, progress=False)
    assert abs(_z_scores(x, *_target(sde))[1]) > N_SE


def test_tweedie_denoise_is_the_gaussian_posterior_mean():
    """E[x0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + std^2) (x_t - alpha m) for Gaussian data."""
    sde = build_sde("vp")
    t = torch.full((5,), 0.4)
    x_t = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    a, sd = sde.alpha(t)[:, None], sde.std(t)[:, None]
    expected = MEAN + a * STD**2 / (a**2 * STD**2 + sd**2) * (x_t - a * MEAN)
    torch.testing.assert_close(tweedie_denoise(sde, _gaussian(sde).score, x_t, t), expected)


def test_denoise_false_returns_the_noisy_marginal():
    """Without Tweedie's step the output follows p_{t_eps} itself; check with a large t_eps."""
    sde = build_sde("vp", t_eps=0.3)
    x = sample(sde, _gaussian(sde).score, (N, DIM), method="ode", steps=60, progress=False, denoise=False)
    mean_t, cov_t = _gaussian(sde).marginal(torch.tensor([0.3]))
    z_mean, z_std = _z_scores(x, float(mean_t[0, 0]), math.sqrt(float(cov_t[0, 0, 0])))
    assert abs(z_mean) < N_SE and abs(z_std) < N_SE
    denoised = sample(sde, _gaussian(sde).score, (N, DIM), method="ode", steps=60, progress=False)
    assert abs(_z_scores(denoised, float(mean_t[0, 0]), math.sqrt(float(cov_t[0, 0, 0])))[0]) > N_SE


def test_samplers_are_deterministic_given_the_generator():
    sde = build_sde("ve")
    runs = [
        sample(sde, _gaussian(sde).score, (8, DIM), "pc", 20, torch.Generator().manual_seed(3), False)
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# ----- registry and argument errors -------------------------------------------------------------


def test_registry_lists_methods_and_rejects_unknown():
    assert {"pc", "euler_maruyama", "ode"} <= set(SAMPLERS)
    assert get_sampler("pc") is pc_sampler
    with pytest.raises(KeyError, match="unknown sampling method 'ddim'.*euler_maruyama.*ode.*pc"):
        get_sampler("ddim")
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("pc")(pc_sampler)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "nope"}, KeyError, "unknown sampling method"),
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"method": "ode", "solver": "midpoint"}, KeyError, "unknown ODE solver 'midpoint'"),
        ({"method": "pc", "n_corrector": -1}, ValueError, "n_corrector"),
        ({"method": "pc", "colour": 1}, TypeError, "colour"),
    ],
)
def test_sample_argument_errors(kwargs, error, match):
    sde = build_sde("vp")
    args = {"method": "pc", "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        sample(sde, _gaussian(sde).score, (2, DIM), progress=False, **args)


# ----- priors: guidance, labels, grids, CLI -------------------------------------------------------

CAPTIONS = ["digit zero", "digit one"]


@pytest.fixture(scope="module")
def tiny_prior_dir(tmp_path_factory):
    torch.manual_seed(0)
    sde = build_sde("vp")
    unet = build_unet(8, 1, num_classes=len(CAPTIONS), preset="tiny")
    network = EpsNetwork(unet, sde, input_scaling="edm")
    path = tmp_path_factory.mktemp("prior") / "tiny"
    return export_prior(network, sde, path, CAPTIONS, resolution=8, channels=1, null_class=len(CAPTIONS))


def test_guided_score_fn_uses_cfg_and_score_from_eps(tiny_prior_dir):
    prior = load_prior(tiny_prior_dir)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    labels = torch.tensor([0, 1, 0])
    std = prior.sde.std(t).view(3, 1, 1, 1)
    net = prior.network
    expected = -classifier_free_guidance(net(x, t, labels), net(x, t, None), 3.0) / std
    torch.testing.assert_close(guided_score_fn(prior, labels, 3.0)(x, t), expected)
    # the raw network (no Prior.eps) is guided by the same formula
    torch.testing.assert_close(guided_score_fn(net, labels, 3.0, sde=prior.sde)(x, t), expected)
    torch.testing.assert_close(guided_score_fn(prior, None)(x, t), -net(x, t, None) / std)
    with pytest.raises(ValueError, match="class_labels has 2 entries but x has batch 3"):
        guided_score_fn(prior, labels[:2], 3.0)(x, t)


def test_resolve_class_labels(tiny_prior_dir):
    prior = load_prior(tiny_prior_dir)
    assert resolve_class_labels(prior, None, 4) is None
    assert resolve_class_labels(prior, "digit one", 3).tolist() == [1, 1, 1]
    assert resolve_class_labels(prior, ["digit one", 0], 2).tolist() == [1, 0]
    with pytest.raises(KeyError, match="unknown caption 'a red cube'.*0: digit zero.*1: digit one"):
        resolve_class_labels(prior, "a red cube", 2)
    with pytest.raises(ValueError, match=r"label 5 out of range \[0, 2\)"):
        resolve_class_labels(prior, [5], 2)
    with pytest.raises(ValueError, match="give one or exactly n"):
        resolve_class_labels(prior, [0, 1], 3)


def test_sample_prior_shape_range_and_seed(tiny_prior_dir):
    prior = load_prior(tiny_prior_dir)
    kwargs = {"guidance_scale": 2.0, "method": "pc", "steps": 4, "progress": False, "batch_size": 3}
    a = sample_prior(prior, ["digit zero", "digit one"] * 2 + ["digit zero"], 5, seed=7, **kwargs)
    b = sample_prior(prior, ["digit zero", "digit one"] * 2 + ["digit zero"], 5, seed=7, **kwargs)
    c = sample_prior(prior, ["digit zero", "digit one"] * 2 + ["digit zero"], 5, seed=8, **kwargs)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


@pytest.fixture(scope="module")
def unconditional_prior_dir(tmp_path_factory):
    torch.manual_seed(1)
    sde = build_sde("vp")
    unet = build_unet(8, 1, num_classes=0, preset="tiny")
    network = EpsNetwork(unet, sde, input_scaling="edm")
    path = tmp_path_factory.mktemp("prior") / "unconditional"
    return export_prior(network, sde, path, [], resolution=8, channels=1, null_class=None)


def test_unconditional_prior_samples_and_refuses_labels(unconditional_prior_dir):
    prior = load_prior(unconditional_prior_dir)
    assert prior.null_class is None and prior.network.unet.config.num_class_embeds is None
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    expected = -prior.network(x, t, None) / prior.sde.std(t).view(3, 1, 1, 1)
    for scale in (1.0, 3.0):  # no conditional branch: the guidance scale has nothing to act on
        torch.testing.assert_close(guided_score_fn(prior, None, scale)(x, t), expected)
        torch.testing.assert_close(guided_score_fn(prior.network, None, scale, sde=prior.sde)(x, t), expected)
    kwargs = {"method": "pc", "steps": 3, "progress": False}
    a = sample_prior(prior, None, 3, seed=4, **kwargs)
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, sample_prior(prior, None, 3, seed=4, **kwargs), rtol=0, atol=0)
    assert not torch.equal(a, sample_prior(prior, None, 3, seed=5, **kwargs))
    # labels would be silently ignored by the network: they are an error instead
    for model in (prior, prior.network):
        with pytest.raises(ValueError, match="unconditional prior"):
            guided_score_fn(model, torch.tensor([0, 0, 0]), sde=prior.sde)
    for item in ("digit zero", 0, [0, 0, 0]):
        with pytest.raises(ValueError, match="this prior is unconditional"):
            resolve_class_labels(prior, item, 3)
        with pytest.raises(ValueError, match="this prior is unconditional"):
            sample_prior(prior, item, 3, **kwargs)


def test_save_grid_writes_png(tmp_path):
    images = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 4 + 4 * 2, 2 * 4 + 3 * 2)  # padding 2
        pixels = np.asarray(im)
    assert pixels.max() == 255  # x = 1 maps to white
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_grid(images[0], tmp_path / "bad.png")


def _cli_args(*argv: str) -> argparse.Namespace:
    return add_cli_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_sample_writes_grid(tiny_prior_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = _cli_args(
        "--prior", str(tiny_prior_dir), "--caption", "digit one", "--n", "4", "--guidance-scale", "3",
        "--method", "ode", "--solver", "heun", "--steps", "3", "--out", str(out),
    )  # fmt: skip
    assert cli_main(args) == out and out.is_file()
    assert "wrote 4 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--caption", "a red cube"],
            r"unknown caption 'a red cube'; this prior knows:\n  0: digit zero\n  1: digit one",
        ),
        (["--method", "ddim"], "unknown sampling method 'ddim'"),
        (["--caption", "digit one", "--label", "1"], "not both"),
        (["--label", "7"], r"label 7 out of range \[0, 2\)"),
    ],
)
def test_cli_sample_errors(tiny_prior_dir, tmp_path, capsys, argv, message):
    args = _cli_args("--prior", str(tiny_prior_dir), "--steps", "2", "--out", str(tmp_path / "g.png"), *argv)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lcss-prior sample: error: ") and re.search(message, err), err
    assert not (tmp_path / "g.png").exists()


def test_cli_sample_unconditional_prior(unconditional_prior_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ("--prior", str(unconditional_prior_dir), "--n", "2", "--steps", "2", "--out", str(out))
    assert cli_main(_cli_args(*args)) == out and out.is_file()
    assert "wrote 2 samples" in capsys.readouterr().out
    out.unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(_cli_args(*args, "--label", "0"))
    assert exit_info.value.code == 2 and not out.exists()
    assert "lcss-prior sample: error: this prior is unconditional" in capsys.readouterr().err


def test_cli_sample_missing_prior_and_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(_cli_args("--prior", str(tmp_path / "missing")))
    err = capsys.readouterr().err
    assert err.startswith("lcss-prior sample: error: ") and "missing does not exist" in err, err
    with pytest.raises(SystemExit):
        _cli_args("--caption", "digit one")  # --prior is required
