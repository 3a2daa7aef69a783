"""The VSD particle model (``threestudio_ssd.vsd``): a camera-conditioned, trainable copy of a pixel
prior's network. Its use inside ``ScoreDistillation`` (same draws as SDS, what is state, gradient
flow) is tested in test_distillation.py."""

from __future__ import annotations

import pytest
import torch

from threestudio_ssd.score_models import LCSSPriorScoreModel, StableDiffusionScoreModel
from threestudio_ssd.testing import make_tiny_prior, make_tiny_stable_diffusion
from threestudio_ssd.vsd import LoRALinear, ParticleScoreModel, pack_condition


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return LCSSPriorScoreModel(make_tiny_prior(tmp_path_factory.mktemp("prior") / "p"))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def camera(azimuth: float, batch: int = 1) -> torch.Tensor:
    from lcss_prior.data.shapes import camera_c2w

    return camera_c2w(20.0, azimuth, 1.8).expand(batch, 4, 4)


def noisy(prior, batch: int, seed: int):
    g = gen(seed)
    x0 = 2 * torch.rand(batch, 3, 8, 8, generator=g) - 1
    t = 0.05 + 0.9 * torch.rand(batch, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return prior.add_noise(x0, eps, t), t


def test_pack_condition_and_errors(prior):
    c2w = camera(30.0, 2)
    packed = pack_condition(torch.tensor([1, 0]), c2w, null_class=2)
    assert packed.shape == (2, 17) and packed[:, 0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(packed[:, 1:], c2w.reshape(2, 16), rtol=0, atol=0)
    assert pack_condition(None, c2w, null_class=2)[:, 0].tolist() == [2.0, 2.0]  # None = NULL class
    with pytest.raises(ValueError, match=r"c2w must be \[B, 4, 4\]"):
        pack_condition(torch.tensor([0]), torch.eye(4), null_class=2)
    with pytest.raises(ValueError, match=r"labels must be caption ids of shape \[B\]"):
        pack_condition(torch.tensor([0, 1, 1]), c2w, null_class=2)
    with pytest.raises(ValueError, match="camera_dropout"):
        ParticleScoreModel(prior, camera_dropout=1.0)
    with pytest.raises(ValueError, match="lora_rank"):
        ParticleScoreModel(prior, lora_rank=0)


def test_stable_diffusion_is_refused_with_a_pointer(tmp_path):
    sd = StableDiffusionScoreModel(make_tiny_stable_diffusion(tmp_path / "sd"))
    with pytest.raises(TypeError, match="stable-diffusion-vsd-guidance"):
        ParticleScoreModel(sd)


@pytest.fixture(scope="module")
def skip_prior(tmp_path_factory):
    """A prior with the skip connection ``output_scaling="edm"`` (the training default)."""
    folder = tmp_path_factory.mktemp("skip_prior") / "p"
    return LCSSPriorScoreModel(make_tiny_prior(folder, input_scaling="edm", output_scaling="edm"))


@pytest.mark.parametrize("prior_fixture", ["prior", "skip_prior"])
@pytest.mark.parametrize("lora_rank", [None, 2])
def test_starts_as_the_prior_for_every_camera_and_leaves_the_prior_alone(request, prior_fixture, lora_rank):
    """Zero-initialised camera MLP (and LoRA up-projections): at initialisation the particle model
    is the prior's conditional network, whatever the camera and the camera guidance scale, and
    whatever the prior network's input/output scalings."""
    prior = request.getfixturevalue(prior_fixture)
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    particle = ParticleScoreModel(prior, guidance_scale=3.0, lora_rank=lora_rank)
    x_t, t = noisy(prior, 4, 0)
    labels = torch.tensor([0, 1, 0, 1])
    expected = prior.eps(x_t, t, labels, 1.0)
    for az in (0.0, 120.0):
        torch.testing.assert_close(
            particle.eps(x_t, t, labels, camera(az, 4)), expected, rtol=1e-5, atol=1e-5
        )
    # not vacuous: the prior's guided prediction differs, and a perturbed camera MLP changes the output
    assert (prior.eps(x_t, t, labels, 3.0) - expected).abs().max() > 1e-3
    with torch.no_grad():
        particle.camera_embedding.net[2].bias.add_(0.5)
    assert (particle.eps(x_t, t, labels, camera(0.0, 4)) - expected).abs().max() > 1e-3
    # the prior is untouched and still frozen
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not any(p.requires_grad for p in prior.parameters())


def test_full_and_lora_trainable_sets(prior):
    full = ParticleScoreModel(prior)
    trainable = {n for n, p in full.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in full.named_parameters()}
    assert any(n.startswith("network.unet.down_blocks") for n in trainable)
    lora = ParticleScoreModel(prior, lora_rank=2)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (".camera." in n) for n in trainable)
    assert any(isinstance(m, LoRALinear) for m in lora.modules())
    assert sum(p.numel() for n, p in lora.named_parameters() if n in trainable) < 0.2 * sum(
        p.numel() for p in full.parameters()
    )
    # the denoising loss reaches exactly the trainable parameters (camera MLP's last layer included)
    x0 = 2 * torch.rand(3, 3, 8, 8, generator=gen(1)) - 1
    loss = lora.loss(x0, torch.tensor([0, 1, 0]), camera(10.0, 3), generator=gen(2))
    assert loss.shape == (3,)
    loss.mean().backward()
    for n, p in lora.named_parameters():
        if n in trainable and n.endswith(("lora_down", "net.0.weight", "net.0.bias")):
            continue  # zero-initialised partners: their gradient is 0 until lora_up / net.2 move
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (n in trainable), n


def test_camera_dropout_draws_from_the_generator(prior):
    """With dropout the same generator gives the same loss; without, the loss depends on the camera;
    with dropout ~1, every sample sees the null camera."""
    x0 = 2 * torch.rand(8, 3, 8, 8, generator=gen(3)) - 1
    labels = torch.zeros(8, dtype=torch.long)
    particle = ParticleScoreModel(prior, camera_dropout=0.0)
    with torch.no_grad():
        particle.camera_embedding.net[2].weight.normal_(0, 1.0, generator=gen(4))
    a = particle.loss(x0, labels, camera(0.0, 8), generator=gen(5))
    b = particle.loss(x0, labels, camera(90.0, 8), generator=gen(5))
    assert not torch.allclose(a, b)
    particle.camera_dropout = 0.999999
    a = particle.loss(x0, labels, camera(0.0, 8), generator=gen(5))
    b = particle.loss(x0, labels, camera(90.0, 8), generator=gen(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_online_training_fits_the_particles_and_never_touches_the_prior(prior):
    """A few Adam steps of the denoising loss on one render lower the particle model's loss on
    held-out draws (common random numbers) well below the prior's, which stays bit-identical."""
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    x0 = 2 * torch.rand(1, 3, 8, 8, generator=gen(3)) - 1
    labels, cams = torch.zeros(8, dtype=torch.long), camera(0.0, 8)
    particle = ParticleScoreModel(prior, camera_dropout=0.1)

    def held_out() -> float:
        with torch.no_grad():
            return (
                particle.loss(x0.expand(64, -1, -1, -1), labels.repeat(8), camera(0.0, 64), gen(8))
                .mean()
                .item()
            )

    start = held_out()
    opt = torch.optim.Adam(particle.parameters(), lr=2e-3)
    g = gen(6)
    for _ in range(20):
        loss = particle.loss(x0.expand(8, -1, -1, -1), labels, cams, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = held_out()
    assert end < 0.8 * start, (end, start)
    for k, v in prior.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
