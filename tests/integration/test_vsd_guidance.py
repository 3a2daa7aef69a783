"""``estimator: vsd`` in ``stein-score-distillation-guidance``: the camera reaches the particle model,
its denoising loss comes back as ``loss_vsd_particle`` and trains only the particle model (never
the frozen prior), through threestudio's own optimizer construction; bad uses fail naming the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from threestudio_ssd.testing import make_tiny_prior, make_tiny_stable_diffusion

from .tiny_models import CAMERA, PRIOR, SD, sphere_render

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return make_tiny_prior(tmp_path_factory.mktemp("vsd_models") / "prior", **PRIOR)


def vsd_guidance(ts, prior, **overrides):
    cfg = {
        "score_model": "lcss-prior",
        "prior_path": str(prior),
        "estimator": "vsd",
        "half_precision_weights": False,
        "guidance_scale": 3.0,
        **overrides,
    }
    return ts.find("stein-score-distillation-guidance")(cfg)


def prompt(ts, prior):
    return ts.find("stein-prior-prompt-processor")({"prior_path": str(prior), "prompt": "a red cube"})()


def test_vsd_step_trains_only_the_particle_model(threestudio_ts, prior):
    guidance = vsd_guidance(threestudio_ts, prior)
    frozen = guidance.score_model.prior.network
    assert not any(p.requires_grad for p in frozen.parameters())
    names = [n for n, _ in guidance.named_parameters()]
    assert names and all(n.startswith("distillation.particle.") for n in names), names
    rgb = torch.rand(1, 16, 16, 3, requires_grad=True)
    out = guidance(rgb, prompt(threestudio_ts, prior), **CAMERA, **sphere_render(16, 16))
    assert {"loss_ssd", "loss_vsd_particle", "grad_norm"} <= set(out) and "loss_mu" not in out
    assert isinstance(out["loss_vsd_particle"], torch.Tensor) and out["loss_vsd_particle"].requires_grad
    assert torch.isfinite(out["loss_ssd"]) and torch.isfinite(out["loss_vsd_particle"])
    out["loss_ssd"].backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    assert all(p.grad is None for p in guidance.parameters())  # the 3-D loss never trains the particle
    out["loss_vsd_particle"].backward()
    camera_out = guidance.distillation.particle.camera_embedding.net[2].weight
    assert camera_out.grad is not None and camera_out.grad.abs().sum() > 0  # the camera path trains
    assert all(p.grad is None for p in frozen.parameters())
    # the checkpoint holds the particle model and the generator, not the frozen prior
    keys = set(guidance.state_dict())
    assert all(k.startswith("distillation.particle.") or k.endswith("_extra_state") for k in keys)


def test_particle_parameters_reach_threestudio_optimizer(threestudio_ts, prior):
    """``optimizer.params.guidance`` (threestudio's ``parse_optimizer``) holds exactly the particle
    model's trainable parameters, and one optimiser step moves the camera embedding off zero."""
    from threestudio.systems.utils import parse_optimizer

    holder = torch.nn.Module()
    holder.guidance = vsd_guidance(threestudio_ts, prior)
    config = OmegaConf.create(
        {"name": "AdamW", "args": {"betas": [0.9, 0.99]}, "params": {"guidance": {"lr": 1e-3}}}
    )
    optim = parse_optimizer(config, holder)
    in_optim = {id(p) for group in optim.param_groups for p in group["params"]}
    particle = holder.guidance.distillation.particle
    assert in_optim == {id(p) for p in particle.parameters()}
    assert not in_optim & {id(p) for p in holder.guidance.score_model.prior.network.parameters()}
    camera_out = particle.camera_embedding.net[2].weight
    assert camera_out.abs().sum() == 0  # starts as the prior's conditional network
    out = holder.guidance(
        torch.rand(1, 16, 16, 3), prompt(threestudio_ts, prior), **CAMERA, **sphere_render(16, 16)
    )
    out["loss_vsd_particle"].backward()
    optim.step()
    assert camera_out.abs().sum() > 0


def test_vsd_uses_the_camera(threestudio_ts, prior):
    """Same noise, another camera: a trained particle model (camera MLP off zero) gives another
    gradient; VSD without a camera is refused, naming the key."""
    pu = prompt(threestudio_ts, prior)
    rgb = torch.rand(1, 16, 16, 3)
    render = sphere_render(16, 16)
    a, b = vsd_guidance(threestudio_ts, prior, seed=5), vsd_guidance(threestudio_ts, prior, seed=5)
    for g in (a, b):
        torch.nn.init.normal_(g.distillation.particle.camera_embedding.net[2].weight, std=0.5)
    b.load_state_dict(a.state_dict())
    other = {**render, "c2w": render["c2w"].clone()}
    other["c2w"][:, 0, 3] += 1.0
    loss_a, loss_b = a(rgb, pu, **CAMERA, **render)["loss_ssd"], b(rgb, pu, **CAMERA, **other)["loss_ssd"]
    assert not torch.allclose(loss_a, loss_b)
    with pytest.raises(ValueError, match=r"guidance\.estimator.*c2w"):
        a(rgb, pu, **CAMERA)


def test_vsd_needs_a_pixel_prior(threestudio_ts, prior, tmp_path):
    with pytest.raises(ValueError, match=r"guidance\.estimator.*'vsd'.*lcss-prior"):
        threestudio_ts.find("stein-score-distillation-guidance")(
            {
                "score_model": "stable-diffusion",
                "pretrained_model_name_or_path": str(make_tiny_stable_diffusion(tmp_path / "sd", **SD)),
                "half_precision_weights": False,
                "estimator": "vsd",
            }
        )
    with pytest.raises(ValueError, match="vsd_camera_dropout"):
        vsd_guidance(threestudio_ts, prior, vsd_camera_dropout=1.5)
