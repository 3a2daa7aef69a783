"""benchmarks/score_matching.py: the quick mode produces every output, finite; the measuring tools
(peak memory, interleaved timing) measure what they claim, shown against wrong variants."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from threestudio_ssd.testing import load_script as load_script_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "score_matching.py"
METHODS = ("lcss", "dsm", "ssm", "fdssm")


def _load_module():
    return load_script_module(SCRIPT)


bench = _load_module()
harness_marker = load_script_module(Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py").KEEP_MARKER


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One ``--quick`` run (about a minute on one core) shared by the output checks."""
    tmp = tmp_path_factory.mktemp("score_matching")
    out, report = tmp / "sm", tmp / "sm.md"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out)]
    cmd += ["--report", str(report), "--work-dir", str(tmp / "runs")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, report, json.loads((out / "results.json").read_text())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def test_quick_cost_outputs_are_finite(quick_run):
    _, _, result = quick_run
    assert set(result["timing"]) == {"digits-quality", "shapes-quality"}
    for name, timing in result["timing"].items():
        assert timing["params"] > 0
        for m in METHODS:
            r = timing["methods"][m]
            assert _finite(r["step_s"]) and r["step_s"] > 0, (name, m)
            assert _finite(r["ratio_to_dsm"]) and r["ratio_to_dsm"] > 0, (name, m)
            assert set(r["phases_s"]) == {"loss", "backward", "optimizer"}
            assert all(_finite(v) and v >= 0 for v in r["phases_s"].values())
            assert timing["profile"][m] and all(_finite(op["self_cpu_ms"]) for op in timing["profile"][m])
            mem = result["memory"][name][m]
            assert _finite(mem["peak_delta_mib"]) and mem["peak_delta_mib"] >= 0, (name, m)
        assert timing["methods"]["dsm"]["ratio_to_dsm"] == 1.0
        assert _finite(timing["lcss_over_ssm"])


def test_quick_quality_outputs_are_finite(quick_run):
    out, _, result = quick_run
    assert set(result["quality"]) == {"digits", "shapes"}
    for data, q in result["quality"].items():
        assert _finite(q["feature_extractor"]["eval_accuracy"])
        for budget in ("equal_steps", "equal_wall_time"):
            for m in METHODS:
                r = q[budget][m]
                assert not r.get("diverged"), (data, budget, m)
                assert r["steps"] >= 1
                for key in ("bpd", "bpd_stderr", "fid", "kid_mean", "kid_std", "accuracy"):
                    assert _finite(r[key]), (data, budget, m, key)
        assert q["equal_steps"]["dsm"]["steps"] == q["budget"]["equal_steps"]
        for m in METHODS:
            run = q["runs"][m]
            assert run["nonfinite_logged"] == 0 and not run["diverged"]
            assert run["curve"]["step"] and all(_finite(v) for v in run["curve"]["loss"])
            assert run["curve"]["grad_norm"] and _finite(run["final_grad_norm"])
            # the equal-wall-time prior is the first segment of the same run
            assert q["equal_wall_time"][m]["steps"] == q["budget"]["equal_wall_time_steps"][m]
        for png in (f"curves_{data}.png", f"samples_{data}.png"):
            assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "timing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 cost targets per timed configuration, 3 quality targets per data set
    assert len(result["targets"]) == 2 * len(result["timing"]) + 3 * len(result["quality"])
    assert all(t["verdict"].split()[0] in ("yes", "NO") for t in result["targets"])


def test_quick_markdown_names_command_machine_and_tables(quick_run, tmp_path):
    out, report, result = quick_run
    text = report.read_text()
    assert result["command"] in text and "--quick" in text
    assert result["machine"]["torch"] in text
    for heading in (
        "### Cost per optimiser step",
        "### Quality on digits",
        "### Quality on shapes",
        "### Targets",
    ):
        assert heading in text
    assert "| nan" not in text and "nan +-" not in text  # every reported number is finite
    # a hand-written reading below the marker survives regeneration
    copy = tmp_path / "sm.md"
    copy.write_text(text + "My reading: LCSS is cheap.\n")
    bench.write_markdown(result, copy, out)
    regenerated = copy.read_text()
    assert regenerated.count(harness_marker) == 1 and regenerated.endswith("My reading: LCSS is cheap.\n")
    assert "### Targets" in regenerated


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        bench.parse_args(["--datasets", "digits,cifar"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--timing-rounds", "0"])
    args = bench.parse_args(["--quick", "--digits-steps", "9"])
    assert args.digits_steps == 9 and args.shapes_steps == bench.QUICK["shapes_steps"]
