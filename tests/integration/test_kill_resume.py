"""Kill -9 a threestudio SSD run and resume it: the result is the uninterrupted run's, bit for bit.

``python -m threestudio_ssd.launch`` trains the CPU config (tiny random prior and DPT, learned mu,
depth baseline) for ``STEPS`` steps with a checkpoint every ``EVERY``. Killed runs get SIGKILL at
a seeded random moment after their first checkpoint (during a step or a checkpoint write) and are
resumed with ``resume=<trial>/ckpts/last.ckpt``; their final checkpoint must equal the
uninterrupted run's in every tensor (geometry, background, mu, optimiser moments, the guidance's
noise generator and schedule) and in step and data state, and no temporary file may remain.

The control: the same kill and resume with threestudio's own ``random-camera-datamodule`` (cameras
from the global RNG history, which no checkpoint holds) ends elsewhere, so the comparison sees a
difference when there is one.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .conftest import run_python, subprocess_env
from .tiny_models import DPT, PRIOR, SMALL_NERF, SMALL_RENDERS, launch_args

pytestmark = pytest.mark.integration

CONFIG = "custom/threestudio-ssd/configs/steindreamer-cpu-shapes.yaml"
STEPS, EVERY = 24, 4
KILL_SEEDS = (0, 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_resume_models")
    return make_tiny_prior(root / "prior", **PRIOR), make_tiny_depth_estimator(root / "dpt", **DPT)


def train_args(models, tag: str, *extra: str) -> list[str]:
    overrides = [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}"]
    overrides += [f"checkpoint.every_n_train_steps={EVERY}", "use_timestamp=false", f"tag={tag}"]
    return launch_args(CONFIG, "--train", *models, *SMALL_RENDERS, *SMALL_NERF, *overrides, *extra)


def ckpts(root: Path, tag: str) -> Path:
    return root / "outputs" / "steindreamer-cpu-shapes" / tag / "ckpts"


def kill_and_resume(root: Path, models, tag: str, seed: int, *extra: str) -> dict:
    """Start a run, SIGKILL it at a random moment after its first checkpoint, resume it from
    ``last.ckpt``; returns the final checkpoint and what the kill interrupted."""
    folder = ckpts(root, tag)
    proc = subprocess.Popen(
        [sys.executable, *train_args(models, tag, *extra)],
        cwd=root,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        rng = random.Random(seed)
        after = folder / f"epoch=0-step={EVERY * rng.randint(1, STEPS // EVERY - 2)}.ckpt"
        deadline = time.monotonic() + 240
        while not after.exists():
            assert proc.poll() is None, f"the run exited ({proc.returncode}) before {after.name}"
            assert time.monotonic() < deadline, f"no {after.name} within 240 s"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))  # a step takes ~0.1 s here: lands in a step or a write
        assert proc.poll() is None, "the run finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = sorted(p.name for p in folder.iterdir())
    assert f"epoch=0-step={STEPS}.ckpt" not in saved, f"killed after training ended: {saved}"
    run_python(train_args(models, tag, *extra, f"resume={folder / 'last.ckpt'}"), cwd=root)
    return {
        "saved_at_kill": saved,
        "final": torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False),
    }


def differences(a, b, where: str = "") -> list[str]:
    """Where two checkpoint trees differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        return [] if same and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        odd = [f"{where} keys {sorted(map(str, set(a) ^ set(b)))}"] if set(a) != set(b) else []
        return odd + [d for k in a if k in b for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def compared(ckpt: dict) -> dict:
    """What must match: weights, optimisers, LR schedulers, step, data and monitor state (callback
    bookkeeping such as the checkpoint callback's paths and best scores names files, not results)."""
    keys = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "variance_monitor")
    data = {k: v for k, v in ckpt.items() if k.endswith("DataModule")}
    return {**{k: ckpt.get(k) for k in keys}, **data}


@pytest.fixture(scope="module")
def uninterrupted(threestudio_root, models):
    run_python(train_args(models, "full"), cwd=threestudio_root)
    return torch.load(ckpts(threestudio_root, "full") / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_killed_and_resumed_run_equals_the_uninterrupted_one(threestudio_root, models, uninterrupted, seed):
    result = kill_and_resume(threestudio_root, models, f"kill{seed}", seed)
    final = result["final"]
    assert final["global_step"] == STEPS
    assert final["ResumableRandomCameraDataModule"] == {"train_batches": STEPS}
    assert "generator" in final["state_dict"]["guidance._extra_state"]  # the noise stream is compared
    assert any(k.startswith("guidance.") and "mu" in k for k in final["state_dict"]), "no learned mu"
    assert differences(compared(final), compared(uninterrupted)) == [], result["saved_at_kill"]
    leftovers = [p.name for p in ckpts(threestudio_root, f"kill{seed}").iterdir() if p.suffix != ".ckpt"]
    assert leftovers == []


def test_the_comparison_sees_threestudio_datamodule_resumes_differ(threestudio_root, models):
    """Control: threestudio's data module draws resumed cameras from a fresh RNG history."""
    other = ["data_type=random-camera-datamodule"]
    run_python(train_args(models, "ts-full", *other), cwd=threestudio_root)
    full = torch.load(
        ckpts(threestudio_root, "ts-full") / "last.ckpt", map_location="cpu", weights_only=False
    )
    final = kill_and_resume(threestudio_root, models, "ts-kill", 0, *other)["final"]
    assert final["global_step"] == full["global_step"] == STEPS
    assert any(d.startswith("/state_dict/geometry") for d in differences(compared(final), compared(full)))
