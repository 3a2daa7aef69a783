"""Resuming ``estimator: vsd`` through threestudio's checkpoint: the guidance's ``state_dict()`` (the
particle model's weights and ``_extra_state``: the noise generator and
``ScoreDistillation.resume_state()``, e.g. the particle generator) plus the optimiser state, loaded
strictly into a freshly configured guidance as Lightning does on ``resume=``, continue bit for bit
as the uninterrupted run; a checkpoint of an older version (no ``distillation`` in the extra state)
still loads, warning that it lacks the key, and then differs."""

from __future__ import annotations

import io

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from threestudio_ssd.testing import make_tiny_prior

from .tiny_models import PRIOR, sphere_render

pytestmark = pytest.mark.integration

STEPS, SPLIT = 4, 2
CAMERA = {
    "elevation": torch.tensor([10.0]),
    "azimuth": torch.tensor([30.0]),
    "camera_distances": torch.tensor([2.0]),
}
OPTIMIZER = {"name": "Adam", "args": {}, "params": {"image": {"lr": 0.05}, "guidance": {"lr": 1e-2}}}


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("vsd_resume") / "prior", **PRIOR)


class System(nn.Module):
    """The part of a threestudio system that the checkpoint concerns: a distilled parameter (an image
    ``[1, H, W, 3]`` standing in for the render) and the guidance, under threestudio's optimiser."""

    def __init__(self, ts, prior) -> None:
        from threestudio.systems.utils import parse_optimizer

        super().__init__()
        self.image = nn.Parameter(torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(0)))
        with torch.random.fork_rng():  # the camera MLP's initialisation draws from the global generator
            torch.manual_seed(11)
            self.guidance = ts.find("stein-score-distillation-guidance")(
                {
                    "score_model": "lcss-prior",
                    "prior_path": str(prior),
                    "estimator": "vsd",
                    "half_precision_weights": False,
                    "guidance_scale": 3.0,
                    "seed": 4,
                    "vsd_seed": 5,
                }
            )
        self.optimizer = parse_optimizer(OmegaConf.create(OPTIMIZER), self)
        self.prompt_utils = ts.find("stein-prior-prompt-processor")(
            {"prior_path": str(prior), "prompt": "a red cube"}
        )()

    def train_steps(self, steps: int) -> None:
        for _ in range(steps):
            out = self.guidance(self.image, self.prompt_utils, **CAMERA, **sphere_render(16, 16))
            self.optimizer.zero_grad()
            (out["loss_ssd"] + out["loss_vsd_particle"]).backward()
            self.optimizer.step()

    def checkpoint(self) -> dict:
        """A Lightning checkpoint's ``state_dict`` and ``optimizer_states``, through a file's bytes."""
        buffer = io.BytesIO()
        torch.save(
            {"state_dict": self.state_dict(), "optimizer_states": [self.optimizer.state_dict()]}, buffer
        )
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    def restore(self, ckpt: dict) -> None:
        self.load_state_dict(ckpt["state_dict"])  # strict, as Lightning's resume
        self.optimizer.load_state_dict(ckpt["optimizer_states"][0])


def same_state(a: System, b: System) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    tensors = [k for k in sa if not k.endswith("_extra_state")]
    return all(torch.equal(sa[k], sb[k]) for k in tensors) and torch.equal(
        a.guidance.generator.get_state(), b.guidance.generator.get_state()
    )


@pytest.fixture(scope="module")
def runs(threestudio_ts, prior):
    full = System(threestudio_ts, prior)
    full.train_steps(STEPS)
    first = System(threestudio_ts, prior)
    first.train_steps(SPLIT)
    return full, first.checkpoint()


def test_resumed_guidance_is_the_uninterrupted_run(threestudio_ts, prior, runs):
    full, ckpt = runs
    keys = set(ckpt["state_dict"])
    assert "guidance._extra_state" in keys and any(
        k.startswith("guidance.distillation.particle.") for k in keys
    )
    assert set(ckpt["state_dict"]["guidance._extra_state"]) == {"generator", "distillation"}
    resumed = System(threestudio_ts, prior)
    resumed.restore(ckpt)
    resumed.train_steps(STEPS - SPLIT)
    assert same_state(resumed, full)
    camera_out = full.guidance.distillation.particle.camera_embedding.net[2].weight
    assert camera_out.abs().sum() > 0  # the particle model trained: the comparison has teeth


def test_an_older_checkpoint_loads_with_a_warning_and_then_differs(threestudio_ts, prior, runs):
    full, ckpt = runs
    old = {**ckpt, "state_dict": dict(ckpt["state_dict"])}
    old["state_dict"]["guidance._extra_state"] = {
        "generator": ckpt["state_dict"]["guidance._extra_state"]["generator"]
    }
    resumed = System(threestudio_ts, prior)
    with pytest.warns(UserWarning, match=r"no \['distillation'\]"):
        resumed.restore(old)
    resumed.train_steps(STEPS - SPLIT)
    assert not same_state(resumed, full)  # the particle generator restarted from vsd_seed
