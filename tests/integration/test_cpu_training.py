"""The shipped CPU config trains through ``python -m threestudio_ssd.launch`` with threestudio's own
system machinery, data module, geometry, callbacks and loggers: an exported (tiny, random) LCSS
prior and a tiny random DPT saved with ``save_pretrained``; then ``--test`` renders images and a
video from the checkpoint, and ``resume=<ckpt>`` continues training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .conftest import run_python
from .tiny_models import DPT, PRIOR, SMALL_NERF, SMALL_RENDERS

pytestmark = pytest.mark.integration

CONFIG = "custom/threestudio-ssd/configs/steindreamer-cpu-shapes.yaml"


@pytest.fixture(scope="module")
def trained(threestudio_root: Path, tmp_path_factory):
    models = tmp_path_factory.mktemp("cpu_models")
    prior, dpt = make_tiny_prior(models / "prior", **PRIOR), make_tiny_depth_estimator(models / "dpt", **DPT)
    small = [
        f"system.guidance.prior_path={prior}",
        f"system.guidance.depth_estimator_path={dpt}",
        *SMALL_RENDERS,
        "data.n_test_views=4",  # not 3: threestudio calls torch.cross without dim, [3, 3] is ambiguous
        *SMALL_NERF,
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "use_timestamp=false",
        "tag=ci",
    ]
    proc = run_python(
        ["-m", "threestudio_ssd.launch", "--config", CONFIG, "--train", "trainer.max_steps=3", *small],
        cwd=threestudio_root,
    )
    trial = threestudio_root / "outputs" / "steindreamer-cpu-shapes" / "ci"
    return {"proc": proc, "trial": trial, "small": small}


def test_train_writes_checkpoint_metrics_images_and_video(trained):
    trial = trained["trial"]
    assert (trial / "ckpts" / "last.ckpt").is_file()
    assert "threestudio_ssd registered: " in trained["proc"].stdout + trained["proc"].stderr
    metrics = (trial / "csv_logs" / "version_0" / "metrics.csv").read_text()
    for key in (
        "train/loss_ssd",
        "train/loss_mu",
        "train/depth_corr",
        "train/n_fallback",
        "train/mu/mu1_mean",
    ):
        assert key in metrics, key
    assert (trial / "save" / "it3-0.png").is_file()  # validation at step 3
    assert sorted(p.name for p in (trial / "save" / "it3-test").glob("*.png")) == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
    ]
    assert (trial / "save" / "it3-test.mp4").stat().st_size > 0
    # the variance monitor is off unless configured (system.variance_monitor.every: 0)
    assert "variance/" not in metrics and not (trial / "save" / "variance_monitor.png").exists()


def test_test_from_checkpoint_then_resume(trained, threestudio_root):
    trial, small = trained["trial"], trained["small"]
    ckpt = trial / "ckpts" / "last.ckpt"
    video = trial / "save" / "it3-test.mp4"
    video.unlink()
    run_python(
        ["-m", "threestudio_ssd.launch", "--config", CONFIG, "--test", f"resume={ckpt}", *small],
        cwd=threestudio_root,
    )
    assert video.is_file() and video.stat().st_size > 0  # rendered again, at the checkpoint's step

    run_python(
        [
            "-m",
            "threestudio_ssd.launch",
            "--config",
            CONFIG,
            "--train",
            f"resume={ckpt}",
            "trainer.max_steps=5",
            *small,
        ],
        cwd=threestudio_root,
    )
    # Lightning keeps the last.ckpt it resumed from and writes last-v1.ckpt beside it
    state = torch.load(trial / "ckpts" / "epoch=0-step=5.ckpt", map_location="cpu")  # weights_only works
    assert state["global_step"] == 5  # continued from 3, not restarted
    assert (trial / "save" / "it5-test.mp4").is_file()
    mu = [k for k in state["state_dict"] if k.startswith("guidance.distillation.mu")]
    assert mu  # the learned control-variate weights are checkpointed ...
    assert not [
        k for k in state["state_dict"] if "score_model" in k or "unet" in k or "estimator" in k
    ]  # ... the frozen nets not


def test_render_size_the_prior_cannot_use_fails_before_training(trained, threestudio_root):
    proc = run_python(
        [
            "-m",
            "threestudio_ssd.launch",
            "--config",
            CONFIG,
            "--train",
            *trained["small"],
            "data.width=24",
            "tag=bad",
        ],
        cwd=threestudio_root,
        check=False,
    )
    assert proc.returncode != 0
    assert "aspect ratio" in proc.stderr and "data.height/data.width" in proc.stderr
    assert not (threestudio_root / "outputs" / "steindreamer-cpu-shapes" / "bad" / "ckpts").exists()
