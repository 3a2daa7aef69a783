"""The variance ratios quoted in BENCHMARKS.md's unit-level table and docs/ssd_math.md, on analytic
priors where ``eps_hat`` is exact (``threestudio_ssd.testing``: the 4-D Gaussian experiment and a
two-mode mixture), with the seeds tests/test_stein.py uses for its assertions.

SSD's variance over SDS's on the same evaluation draws, with optimal weights per ``t`` bin fitted
on independent draws (``fitted_variance``): the Gaussian with a constant + log-density baseline
(scalar and per-channel ``mu``), constant only, constant + a useless baseline, the paper's form
(no constant) with the useless baseline, and the between-timestep share of SDS's variance (the
floor no noise control variate reaches); the mixture with constant + the ambiguity baseline
``r_1 r_2``.

Usage::

    python benchmarks/analytic_variance.py [--out benchmarks/results/analytic_variance.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without ``pip install -e``
    sys.path.insert(0, str(REPO))

from threestudio_ssd.stein import between_timestep_variance, gradient_variance  # noqa: E402
from threestudio_ssd.testing import (  # noqa: E402
    MixturePrior,
    fitted_variance,
    gaussian_experiment,
    misspecified_log_density,
    useless_baseline,
)


def ratios() -> dict[str, float]:
    rows: dict[str, float] = {}
    prior, x0 = gaussian_experiment()
    sds, ssd, ev, cvw = fitted_variance(prior, x0, [misspecified_log_density])
    v = gradient_variance(sds)
    rows["gaussian: constant + log-density baseline, scalar mu"] = gradient_variance(ssd) / v
    channel = fitted_variance(prior, x0, [misspecified_log_density], shape="channel")[1]
    rows["gaussian: constant + log-density baseline, channel mu"] = gradient_variance(channel) / v
    rows["gaussian: constant only, scalar mu"] = gradient_variance(fitted_variance(prior, x0, [])[1]) / v
    useless = [lambda t: useless_baseline]
    rows["gaussian: constant + useless, scalar mu"] = gradient_variance(fitted_variance(prior, x0, useless)[1]) / v
    paper = fitted_variance(prior, x0, useless, include_constant=False)[1]
    rows["gaussian: paper form, useless, scalar mu"] = gradient_variance(paper) / v
    rows["gaussian: between-timestep share of SDS"] = between_timestep_variance(sds, ev["t"], 10).between_share
    stats = cvw.statistics()
    rows["gaussian: baseline weight mu_1 min"], rows["gaussian: baseline weight mu_1 max"] = (
        stats["mu1_min"],
        stats["mu1_max"],
    )
    mix = MixturePrior(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]), 0.3)
    x0 = torch.tensor([0.2, 0.5])
    for shape in ("scalar", "channel"):
        kw = dict(shape=shape, n_fit=40000, n_eval=40000)
        sds, ssd, ev, _ = fitted_variance(mix, x0, [mix.ambiguity], **kw)
        v = gradient_variance(sds)
        rows[f"mixture: constant + ambiguity, {shape} mu"] = gradient_variance(ssd) / v
        rows[f"mixture: constant only, {shape} mu"] = gradient_variance(fitted_variance(mix, x0, [], **kw)[1]) / v
    rows["mixture: between-timestep share of SDS"] = between_timestep_variance(sds, ev["t"], 10).between_share
    return {k: float(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "analytic_variance.json"))
    args = p.parse_args(argv)
    rows = ratios()
    for name, value in rows.items():
        label = "SSD/SDS variance" if "share" not in name and "mu_1" not in name else "value"
        print(f"{name:58s} {label} = {value:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/analytic_variance.py", "rows": rows}, indent=1))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return rows


if __name__ == "__main__":
    main()
