"""scripts/gpu_check.py, the device check, runs here as a dry run (CPU, tiny models) and says so;
scripts/device_prepare.sh carries the versions this project is tested with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_report_and_marks_it(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/gpu_check.py",
            "--out",
            str(out),
            "--dry-run",
            "--steps",
            "environment,phi_precision",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and set(report["steps"]) == {"environment", "phi_precision"}
    arms = report["steps"]["phi_precision"]["arms"]
    assert set(arms) == {"fp16-scaled", "fp16-plain", "fp32-decoder"}
    assert arms["fp16-scaled"]["cosine"] > 0.9999 and arms["fp32-decoder"]["relative_error"] == 0.0
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN ON THE CPU WITH TINY RANDOM MODELS: NOT GPU NUMBERS" in summary.splitlines()[0]


def test_carried_wheels_are_the_tested_versions():
    pinned = dict(
        line.split("==")
        for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pinned = {k.lower().replace("_", "-"): v for k, v in pinned.items()}
    script = (REPO / "scripts" / "device_prepare.sh").read_text()
    carried = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"]*)", script)
    assert len(carried) >= 8
    for name, version in carried:
        key = name.lower().replace("_", "-")
        assert pinned.get(key) == version, (name, version, pinned.get(key))
