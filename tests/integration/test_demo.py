"""The README's first command, ``bash scripts/demo.sh OUT``, in its quick mode against the pinned
threestudio: every promised output exists and is valid, the quick mode says so on its outputs, and a
second run resumes instead of training again."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, subprocess_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def demo(threestudio_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    cmd = ["bash", str(REPO / "scripts" / "demo.sh"), str(out), "--quick", "--no-progress"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


def test_demo_writes_every_promised_file(demo):
    from threestudio_ssd.evaluation.mesh import load_mesh
    from threestudio_ssd.evaluation.video import read_video_frames

    out, stdout = demo
    summary = json.loads((out / "summary.json").read_text())
    n_views = summary["settings"]["test_views"]
    image = np.asarray(Image.open(out / "side_by_side.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300 and image.std() > 1
    assert Image.open(out / "variance_ssd_vs_sds.png").size[0] > 100
    for arm in ("ssd", "sds"):
        frames = read_video_frames(out / arm / "turntable.mp4")
        assert frames.shape[0] == n_views and frames.std() > 1  # not a blank video
        mesh = load_mesh(out / arm / "model.obj")
        assert len(mesh.faces) > 0
        report = json.loads((out / arm / "report.json").read_text())
        assert 0.0 <= report["shapes"]["iou_mean"] <= 1.0
        assert np.isfinite(report["mesh"][0]["chamfer"]["chamfer"])
        a = summary["arms"][arm]
        assert a["iou"] == report["shapes"]["iou_mean"] and a["chamfer"] > 0
        assert Image.open(out / arm / "report.png").size[0] > 100
        assert f"{arm}/turntable.mp4" in stdout and f"{arm}/model.obj" in stdout
    assert summary["variance_monitor"]["n_estimates"] >= 1
    assert summary["models"]["shapes-lcss-32"]["path"] == "models/shapes-lcss-32"
    assert "side_by_side.png" in stdout


def test_quick_mode_says_so_on_its_outputs(demo):
    out, stdout = demo
    note = json.loads((out / "summary.json").read_text())["note"]
    assert note and "not results" in note and note in stdout
    assert note in (out / "summary.md").read_text()
    assert json.loads((out / "ssd" / "report.json").read_text())["note"] == note


def test_demo_resumes_instead_of_starting_over(demo):
    out, _ = demo
    cmd = [sys.executable, str(REPO / "scripts" / "demo_3d.py"), str(out), "--quick", "--no-progress"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already trained") == 2 and proc.stdout.count("mesh exists") == 2
    # other settings in the same folder: refused, nothing overwritten
    before = (out / "summary.json").read_text()
    proc = subprocess.run(cmd + ["--steps", "7"], env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "other settings" in proc.stderr
    assert (out / "summary.json").read_text() == before
