"""Smoke test of ``benchmarks/efficiency_2d.py --quick``: every arm is measured on tiny random models
through the user-facing loaders, the outputs exist, the ratios are finite and SDS is 1 against
itself. The numbers themselves are the benchmark's business (BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import load_script as load_script_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "efficiency_2d.py"


def load_script():
    return load_script_module(SCRIPT)


def test_quick_run_measures_every_arm(tmp_path):
    bench = load_script()
    n_threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--threads", "1", "--out", str(tmp_path / "eff")])
    finally:
        torch.set_num_threads(n_threads)
    assert (tmp_path / "eff" / "efficiency.png").stat().st_size > 0
    markdown = (tmp_path / "eff.md").read_text()
    assert "QUICK MODE: tiny RANDOM prior" in markdown  # random-model numbers say so on the output
    saved = json.loads((tmp_path / "eff" / "efficiency_2d.json").read_text())
    assert saved["quick_mode_random_models"] is True
    summary = result["summary"]["arms"]
    assert set(summary) == set(bench.ARMS)
    for name, arm in summary.items():
        assert all(math.isfinite(v) for v in arm.values()), name
    assert summary["sds"]["var_ratio"] == 1.0 and summary["sds"]["cost_calls"] == 1.0
    assert summary["sds-n8"]["cost_calls"] == 8.0
    for name in bench.SEQUENCE_ARMS:  # m_hat measured by running sequences
        assert "var_mhat" in saved["results"][0]["arms"][name]
    split = result["summary"]["split_mean"]
    assert split["odd_share"] > 0 and split["odd_share"] + split["even_within_share"] <= 1.0 + 1e-6


def test_ema_factor_matches_a_direct_simulation():
    bench = load_script()
    g = torch.Generator().manual_seed(0)
    beta, steps, n = 0.9, 20, 20000
    x = torch.randn(steps, n, generator=g, dtype=torch.float64)
    m = torch.zeros(n, dtype=torch.float64)
    for k in range(steps):
        m = beta * m + (1 - beta) * x[k]
    measured = (m / (1 - beta**steps)).var().item()
    assert measured == pytest.approx(bench.ema_factor(beta, steps), rel=0.05)  # se of a variance: ~1%


def test_unknown_arm_is_named(tmp_path, capsys):
    bench = load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--arms", "sds,sds-n3", "--out", str(tmp_path)])
    assert "sds-n3" in capsys.readouterr().err
