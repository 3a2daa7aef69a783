"""Bad configuration values fail when the object is built (threestudio's ``configure``), with a
message that names the key; nothing waits for the first training step."""

from __future__ import annotations

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .tiny_models import DPT, PRIOR

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_config_models")
    return {
        "prior": make_tiny_prior(root / "prior", **PRIOR),
        "dpt": make_tiny_depth_estimator(root / "dpt", **DPT),
    }


def build_guidance(ts, models, **overrides):
    cfg = {
        "score_model": "lcss-prior",
        "prior_path": str(models["prior"]),
        "depth_estimator_path": str(models["dpt"]),
        "half_precision_weights": False,
        **overrides,
    }
    return ts.find("stein-score-distillation-guidance")(cfg)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"baselines": ["constant", "curvature"]}, r"guidance\.baselines.*'curvature'.*known"),
        ({"baselines": ["constant", "constant"]}, r"guidance\.baselines.*twice"),
        ({"baselines": []}, r"guidance\.baselines"),
        ({"score_model": "imagen"}, r"guidance\.score_model.*'imagen'"),
        ({"estimator": "gsd"}, r"guidance\.estimator.*'gsd'"),
        ({"prior_path": "/nonexistent/prior"}, r"guidance\.prior_path.*/nonexistent/prior"),
        ({"prior_path": None}, r"guidance\.prior_path.*required"),
        ({"depth_estimator_path": None}, r"guidance\.depth_estimator_path"),
        ({"mu_shape": "voxel"}, r"mu_shape.*'voxel'"),
        ({"baseline_decoder": "vae"}, r"guidance\.baseline_decoder.*'vae'"),
        ({"weighting_strategy": "fantasia3d"}, r"weighting.*fantasia3d"),
    ],
)
def test_bad_guidance_values_fail_at_configure(threestudio_ts, models, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_guidance(threestudio_ts, models, **overrides)


def test_folders_that_are_not_models_name_the_key(threestudio_ts, models, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"guidance\.prior_path.*cannot load"):
        build_guidance(threestudio_ts, models, prior_path=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"guidance\.depth_estimator_path.*cannot load"):
        build_guidance(threestudio_ts, models, depth_estimator_path=str(models["prior"]))  # not a DPT


def test_prompt_outside_the_vocabulary_lists_the_captions(threestudio_ts, models):
    find = threestudio_ts.find("stein-prior-prompt-processor")
    with pytest.raises(ValueError, match=r"(?s)prompt_processor\.prompt='a purple cube'.*a red cube") as err:
        find({"prior_path": str(models["prior"]), "prompt": "a purple cube"})
    assert "a yellow torus" in str(err.value)  # the whole vocabulary is listed
    with pytest.raises(FileNotFoundError, match="prior_path='/nonexistent'"):
        find({"prior_path": "/nonexistent", "prompt": "a red cube"})


def test_render_resolution_mismatch(threestudio_ts, models):
    guidance = build_guidance(threestudio_ts, models, estimator="sds", depth_estimator_path=None)
    guidance.check_render_resolution(16, 16)
    guidance.check_render_resolution(64, 64)  # downsampling is fine
    with pytest.raises(ValueError, match=r"data\.height/data\.width.*aspect ratio.*guidance\.prior_path"):
        guidance.check_render_resolution(16, 24)
    with pytest.raises(ValueError, match=r"too small.*16x16 prior"):
        guidance.check_render_resolution(4, 4)
    pu = threestudio_ts.find("stein-prior-prompt-processor")(
        {"prior_path": str(models["prior"]), "prompt": "a red cube"}
    )()
    camera = {"elevation": torch.zeros(1), "azimuth": torch.zeros(1), "camera_distances": torch.ones(1)}
    with pytest.raises(ValueError, match="aspect ratio"):
        guidance(torch.rand(1, 16, 24, 3), pu, **camera)


def test_depth_baseline_needs_the_rendered_depth(threestudio_ts, models):
    guidance = build_guidance(threestudio_ts, models)
    pu = threestudio_ts.find("stein-prior-prompt-processor")(
        {"prior_path": str(models["prior"]), "prompt": "a red cube"}
    )()
    camera = {"elevation": torch.zeros(1), "azimuth": torch.zeros(1), "camera_distances": torch.ones(1)}
    with pytest.raises(ValueError, match=r"rendered depth.*nvdiff-rasterizer"):
        guidance(torch.rand(1, 16, 16, 3), pu, **camera)
