"""Smoke test of ``benchmarks/distill_3d.py --quick``: the three arms run through the real
threestudio launcher path on tiny random models, side by side, and every output (JSON, PNGs,
markdown) exists with finite numbers. The numbers themselves are the benchmark's business."""

from __future__ import annotations

import json
import math

import pytest

from threestudio_ssd.testing import load_script as load_script_module

from .conftest import REPO

pytestmark = pytest.mark.integration

SCRIPT = REPO / "benchmarks" / "distill_3d.py"


def load_script():
    return load_script_module(SCRIPT)


def test_quick_run_outputs_exist_and_are_finite(threestudio_src, tmp_path, monkeypatch):
    monkeypatch.setenv("THREESTUDIO_SRC", str(threestudio_src))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = load_script()
    out = tmp_path / "distill_3d"
    arms = [*bench.ARMS, "ssd-n4-strat-pairs"]  # the default arms and one noise-scheme arm
    result = bench.main(
        ["--quick", "--arms", ",".join(arms), "--out", str(out), "--work-dir", str(tmp_path / "work")]
    )
    for name in ("distill_3d.json", "iou_psnr.png", "variance_ratio.png"):
        assert (out / name).stat().st_size > 0, name
    markdown = (tmp_path / "distill_3d.md").read_text()
    assert all(f"| {arm.upper()} |" in markdown for arm in arms)
    saved = json.loads((out / "distill_3d.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    runs = saved["runs"]["0"]
    assert set(runs) == set(arms)
    for arm, record in runs.items():
        assert record["estimator"] == bench.ESTIMATORS[arm]
        assert [e["step"] for e in record["evals"]] == [0, 2, 4], arm
        for e in record["evals"]:
            assert len(e["iou"]) == 2 and all(0.0 <= v <= 1.0 for v in e["iou"])
            assert math.isfinite(e["psnr_foreground_mean"]) and math.isfinite(e["psnr_full_mean"])
        assert record["steps"]["step"] == [1, 2, 3, 4]  # columns: step, seconds, wall_start, ...
        assert all(s > 0 for s in record["steps"]["seconds"])
        monitor = record["variance_monitor"]
        assert [r["step"] for r in monitor] == [0, 2]
        assert all(math.isfinite(r["ratio"]) and r["var_sds"] > 0 for r in monitor)
    assert all(r["ratio"] == 1.0 for r in runs["sds"]["variance_monitor"])  # SDS against itself
    assert runs["ssd"]["variance_monitor"][0]["n_fallback"] == 0  # the depth baseline ran
    assert runs["const"]["baselines"] == ["constant"] and runs["ssd"]["baselines"] == ["constant", "depth"]
    for summary in saved["summary"]["arms"].values():
        assert math.isfinite(summary["final_iou_mean"]) and math.isfinite(
            summary["step_time_ratio_to_sds_mean"]
        )
        assert math.isfinite(summary["mean_iou_over_run"]) and math.isfinite(summary["efficiency"])
    # the scheme's keys reached the guidance: its variance monitor sees 4 draws per step, not 1
    assert runs["ssd-n4-strat-pairs"]["noise"] == {"noise_draws": 4, "t_sampling": "stratified", "antithetic": "pairs"}
    assert runs["sds"]["noise"] == {"noise_draws": 1, "t_sampling": "uniform", "antithetic": "none"}
    assert runs["ssd-n4-strat-pairs"]["variance_monitor"][1]["ratio"] < 1.0
    assert saved["summary"]["arms"]["sds"]["step_time_ratio_to_sds_mean"] == 1.0
    # --summarize-only rebuilds the same summary from the records in the work dir, running nothing
    again = bench.main(
        [
            "--quick",
            "--summarize-only",
            "--arms",
            ",".join(arms),
            "--out",
            str(tmp_path / "again"),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert again["summary"] == result["summary"] and again["load"] == json.loads(json.dumps(result["load"]))


def test_summary_helpers():
    bench = load_script()
    evals = [{"step": 0, "iou_mean": 0.2}, {"step": 10, "iou_mean": 0.6}, {"step": 20, "iou_mean": 0.5}]
    assert bench.first_step_reaching(evals, 0.55) == 10
    assert bench.first_step_reaching(evals, 0.7) is None
    curve = bench.mean_curve(
        [evals, [{"step": 0, "iou_mean": 0.4}, {"step": 10, "iou_mean": 0.8}]], "iou_mean"
    )
    assert [c["step"] for c in curve] == [0, 10]  # only steps evaluated in every run
    assert curve[1] == {"step": 10, "mean": pytest.approx(0.7), "min": 0.6, "max": 0.8}
    # step times only while every arm was running: b finished at wall 2, so a's steps after it are out
    records = {
        "a": {"steps": [{"wall_start": w, "seconds": w} for w in (0.0, 1.0, 2.0, 3.0)]},
        "b": {"steps": [{"wall_start": w, "seconds": 9.0} for w in (0.0, 2.0)]},
    }
    assert bench.overlap_step_times(records) == ({"a": [0.0, 1.0, 2.0], "b": [9.0, 9.0]}, True)
    # an arm that started after another finished has no shared window: all steps, flagged
    records["c"] = {"steps": [{"wall_start": w, "seconds": 5.0} for w in (4.0, 5.0)]}
    times, shared = bench.overlap_step_times(records)
    assert not shared and times["c"] == [5.0, 5.0] and times["a"] == [0.0, 1.0, 2.0, 3.0]


def test_bad_arguments_are_named(tmp_path):
    bench = load_script()
    settings, _ = bench.parse_args(["--out", str(tmp_path)])  # default: the shipped models
    assert settings.prior.endswith("models/shapes-lcss-32") and settings.depth_model.endswith("depth-shapes-64")
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--arms", "sds,ssd-typo", "--out", str(tmp_path)])
    settings, _ = bench.parse_args(["--quick", "--arms", "vsd", "--out", str(tmp_path)])
    assert settings.arms == ["sds", "vsd"] and settings.seeds == [0]  # SDS is always there
