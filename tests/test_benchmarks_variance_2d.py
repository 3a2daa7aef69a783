"""Smoke test of the 2-D variance playground (benchmarks/variance_2d.py) in ``--quick`` mode: every
arm runs through the user-facing loaders on tiny random models, and every output is produced and
finite. The numbers themselves are the benchmark's business, not the test's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import load_script as load_script_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "variance_2d.py"


def load_script():
    return load_script_module(SCRIPT)


def test_quick_run_produces_finite_outputs_for_every_arm(tmp_path):
    bench = load_script()
    n_threads = torch.get_num_threads()
    try:
        result = bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n_threads)
    for name in ("variance_2d.json", "variance_ratio.png", "prior_loss.png", "images.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "variance_2d.json").read_text())
    assert saved["complete"] and set(saved["arms"]) == set(bench.ARMS)
    steps = saved["settings"]["steps"]
    for name, arm in saved["arms"].items():
        assert [e["step"] for e in arm["evals"]] == [0, 2, 4], name
        assert len(arm["step_times_s"]) == steps
        for e in arm["evals"]:
            for key in ("var", "var_sds", "ratio", "between_share_sds", "floor_ratio", "prior_loss"):
                assert math.isfinite(e[key]), (name, key, e)
            assert e["var_sds"] > 0
    summary = result["summary"]
    assert summary["sds"]["ratio_mean"] == 1.0 and summary["sds"]["step_time_ratio_to_sds"] == 1.0
    assert all(math.isfinite(v) for v in summary["depth_contribution"].values())
    # SSD starts as SDS (mu = [1, 0]): its first ratio is exactly 1; the arms then move apart
    assert saved["arms"]["ssd-optimal-bins"]["evals"][0]["ratio"] == pytest.approx(1.0)
    assert saved["arms"]["ssd-optimal-bins"]["evals"][-1]["ratio"] != pytest.approx(1.0)
    # the depth baseline was actually evaluated (the object covers enough pixels), not skipped
    assert summary["ssd-optimal"]["n_fallback_total"] == 0.0


def test_bad_arguments_are_named(tmp_path):
    bench = load_script()
    settings, _ = bench.parse_args(["--out", str(tmp_path)])  # default: the shipped models
    assert settings.prior.endswith("models/shapes-lcss-32") and settings.depth_model.endswith("depth-shapes-64")
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--arms", "sds,ssd-typo", "--out", str(tmp_path)])
    settings, _ = bench.parse_args(["--quick", "--arms", "vsd", "--out", str(tmp_path)])
    assert settings.arms == ["sds", "vsd"]  # SDS is always there: every ratio is to it
