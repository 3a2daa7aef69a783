"""Integration tests against a real threestudio checkout.

The checkout comes from ``THREESTUDIO_SRC``, else from ``threestudio_ssd.checkout.get_threestudio``
(the pinned commit, extracted from the vendored snapshot into the cache). Only when neither exists
is every test here skipped; with ``REQUIRE_THREESTUDIO=1`` (CI, the README's test command) a missing
checkout or a missing dependency is a failure instead.

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
    """``$THREESTUDIO_SRC``, else the pinned checkout of ``threestudio_ssd.checkout.get_threestudio``
    (the cache, or the vendored snapshot extracted into it; never a network clone in tests). The
    path is exported as ``THREESTUDIO_SRC`` so that subprocesses use the same checkout."""
    from threestudio_ssd.checkout import get_threestudio, missing_entries

    try:
        path = get_threestudio(allow_clone=False)
    except (OSError, RuntimeError) as err:
        _unavailable(f"no threestudio checkout: {err}")
    missing = missing_entries(path)
    if missing:
        _unavailable(f"{path} is missing {missing}")
    import importlib.util

    absent = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        _unavailable(f"threestudio's dependencies are not installed: {absent}")
    os.environ["THREESTUDIO_SRC"] = str(path)
    return path


@pytest.fixture(scope="session")
def threestudio_root(threestudio_ts, threestudio_src: Path, tmp_path_factory) -> Path:
    """A temporary threestudio root with this repository in ``custom/threestudio-ssd``
    (``threestudio_ssd.checkout.make_extension_root``, as the benchmarks build it)."""
    from threestudio_ssd.checkout import make_extension_root

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
