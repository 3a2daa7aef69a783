"""Integration tests against a real threestudio checkout.

The checkout comes from ``THREESTUDIO_SRC``. Without it every test here is skipped; with
``REQUIRE_THREESTUDIO=1`` a missing checkout or a missing dependency is a failure instead.

``threestudio_root`` builds a temporary threestudio root (``make_extension_root``): symlinks to the
checkout's ``launch.py``, ``threestudio/``, ``load/`` and ``extern/`` (imported by threestudio), and
``custom/threestudio-ssd`` pointing at this repository, exactly how a user installs the extension. Code that must see a fresh registry
(threestudio's is one global dict) or that writes ``outputs/`` runs in a subprocess there
(:func:`run_python`); the rest imports threestudio in-process through ``threestudio_ts``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIRED_MODULES = ("nerfacc", "diffusers", "transformers", "pytorch_lightning", "omegaconf", "igl", "mcubes")


def _require() -> bool:
    return os.environ.get("REQUIRE_THREESTUDIO", "") not in ("", "0")


def _unavailable(reason: str):
    if _require():
        pytest.fail(f"REQUIRE_THREESTUDIO=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def threestudio_src() -> Path:
    src = os.environ.get("THREESTUDIO_SRC")
    if not src:
        _unavailable("THREESTUDIO_SRC is not set (point it at a threestudio checkout)")
    path = Path(src)
    missing = [
        p for p in ("launch.py", "threestudio/__init__.py", "load", "extern") if not (path / p).exists()
    ]
    if missing:
        _unavailable(f"THREESTUDIO_SRC={src} is missing {missing}")
    import importlib.util

    absent = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        _unavailable(f"threestudio's dependencies are not installed: {absent}")
    return path


@pytest.fixture(scope="session")
def threestudio_root(threestudio_ts, threestudio_src: Path, tmp_path_factory) -> Path:
    """A temporary threestudio root with this repository in ``custom/threestudio-ssd``
    (``threestudio_ssd.threestudio.checkout.make_extension_root``, as the benchmarks build it)."""
    from threestudio_ssd.threestudio.checkout import make_extension_root

    return make_extension_root(threestudio_src, tmp_path_factory.mktemp("threestudio_root"), REPO)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    # ``python -m threestudio_ssd.launch`` must find the package without ``pip install -e``; these
    # are the same files that custom/threestudio-ssd points at
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env


def run_python(
    args: list[str], cwd: Path, timeout: float = 240.0, check: bool = True
) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` (a threestudio root); on failure the assertion shows the tail
    of the output."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-8000:]).strip()
        raise AssertionError(f"python {' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return proc


@pytest.fixture(scope="session")
def threestudio_ts(threestudio_src: Path):
    """threestudio imported in this process with our classes registered (CPU set-up included)."""
    if str(threestudio_src) not in sys.path:
        sys.path.insert(0, str(threestudio_src))
    # our adapter first: it installs the CPU placeholders, imports threestudio and registers
    import threestudio_ssd.threestudio  # noqa: F401

    return sys.modules["threestudio"]
