"""Properties of the repository itself: CI runs the README's test command; no tracked file names a
folder of the machine it was written on; the root ``__init__.py`` refuses old Pythons in one line."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (REPO / "README.md").read_text()
    commands = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
        for line in block.splitlines()
        if "pytest" in line
    ]
    assert len(commands) == 1, f"README.md should give exactly one test command, found {commands}"
    return commands[0]


def test_ci_runs_the_readme_test_command_verbatim():
    command = _readme_test_command()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f".ci/run does not run {command!r}"
    assert "REQUIRE_THREESTUDIO=1" in command and "threestudio_ssd.checkout" in command
    assert "-c constraints-cpu.txt" in command


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot list tracked files")
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


MACHINE_PATH = re.compile(r"(?<![\w<.])/(work|tmp|root|home)/[\w.+-]")


def test_no_tracked_file_names_an_absolute_machine_path():
    """Code, docs and results record paths relative to the repository (or a ``<label>``); a user or
    CI has no ``/work/...``. Lines that create a temporary folder (``mktemp``) are allowed."""
    offenders = []
    for rel in _tracked_files():
        path = REPO / rel
        if not path.is_file() or path.suffix in {".png", ".jpg", ".mp4", ".safetensors", ".bin", ".pt"}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line) and "mktemp" not in line:
                offenders.append(f"{rel}:{number}: {line.strip()[:120]}")
    assert not offenders, "absolute machine paths in tracked files:\n" + "\n".join(offenders[:20])


def test_machine_path_pattern_flags_what_it_should():
    work, tmp = "/wo" + "rk/", "/t" + "mp/"  # spelled apart, so that this file passes its own test
    assert MACHINE_PATH.search(f'"prior": "{work}artifacts/shapes"')
    assert MACHINE_PATH.search(f"--out {tmp}x")
    assert not MACHINE_PATH.search('"prior": "models/shapes-lcss-32"')
    assert not MACHINE_PATH.search('"<unshipped>/shapes-lcss-v2"')


def test_old_python_gets_one_line_naming_the_version(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    with pytest.raises(ImportError, match=r"needs Python >= 3\.10.*NOT registered"):
        runpy.run_path(str(REPO / "__init__.py"))
