"""Resuming VSD distillation exactly: a run checkpointed at step ``k`` (the image, the particle
model's weights through ``state_dict()``, the optimiser, the caller's noise generator and
``ScoreDistillation.resume_state()``) and restored into fresh objects ends bit for bit where the
uninterrupted run ends; without ``load_resume_state`` (or with a part of it missing) it does not.
The same through threestudio's guidance checkpoint is in integration/test_vsd_resume.py."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from threestudio_ssd.distillation import RESUME_STATE_KEYS, ScoreDistillation
from threestudio_ssd.score_models import LCSSPriorScoreModel
from threestudio_ssd.testing import make_tiny_prior

LABELS = torch.tensor([0, 1])
STEPS, SPLIT = 5, 2  # the interrupted run stops after SPLIT steps and resumes for STEPS - SPLIT


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return LCSSPriorScoreModel(make_tiny_prior(tmp_path_factory.mktemp("prior") / "p"))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cameras(batch: int) -> torch.Tensor:
    from lcss_prior.data.shapes import camera_c2w

    return camera_c2w(torch.full((batch,), 15.0), torch.linspace(0, 90, batch), torch.full((batch,), 1.8))


@dataclass
class Run:
    """What a 3-D system holds: the distilled parameter (an image here), the estimator, one optimiser
    over both (as threestudio's ``optimizer.params``) and the caller's noise generator."""

    image: nn.Parameter
    vsd: ScoreDistillation
    opt: torch.optim.Optimizer
    noise: torch.Generator


def make_vsd(prior, **overrides) -> ScoreDistillation:
    """A VSD estimator whose particle model starts the same every time (the camera MLP's and LoRA's
    initialisation draws from the global generator)."""
    with torch.random.fork_rng():
        torch.manual_seed(11)
        return ScoreDistillation(prior, estimator="vsd", **overrides)


def new_run(prior, lora_rank: int | None) -> Run:
    image = nn.Parameter(torch.rand(2, 3, 8, 8, generator=gen(0)))
    vsd = make_vsd(prior, guidance_scale=2.0, vsd_lora_rank=lora_rank, vsd_seed=3)
    particle = [p for p in vsd.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": [image], "lr": 0.05}, {"params": particle, "lr": 1e-2}])
    return Run(image, vsd, opt, gen(7))


def train(run: Run, steps: int) -> dict[str, float]:
    """``steps`` distillation steps (the image by ``loss``, the particle model by its own loss);
    returns the last step's statistics."""
    stats: dict[str, float] = {}
    for _ in range(steps):
        out = run.vsd(run.image, LABELS, c2w=cameras(2), t_range=(0.1, 0.9), generator=run.noise)
        run.opt.zero_grad()
        (out.loss + out.loss_vsd_particle).backward()
        run.opt.step()
        stats = out.stats
    return stats


def checkpoint(run: Run) -> bytes:
    """Everything a checkpoint holds, serialised as a checkpoint file is."""
    buffer = io.BytesIO()
    torch.save(
        {
            "image": run.image.detach(),
            "state_dict": run.vsd.state_dict(),
            "optimizer": run.opt.state_dict(),
            "noise": run.noise.get_state(),
            "resume": run.vsd.resume_state(),
        },
        buffer,
    )
    return buffer.getvalue()


def restore(data: bytes, prior, lora_rank: int | None, resume_keys=RESUME_STATE_KEYS) -> Run:
    """A fresh run loaded from ``checkpoint``; only ``resume_keys`` of the resume state are loaded
    (``None``: ``load_resume_state`` is not called at all)."""
    saved = torch.load(io.BytesIO(data), weights_only=True)
    run = new_run(prior, lora_rank)
    with torch.no_grad():
        run.image.copy_(saved["image"])
    run.vsd.load_state_dict(saved["state_dict"])
    run.opt.load_state_dict(saved["optimizer"])
    run.noise.set_state(saved["noise"])
    if resume_keys is not None:
        run.vsd.load_resume_state({k: v for k, v in saved["resume"].items() if k in resume_keys})
    return run


def particle_equal(a: ScoreDistillation, b: ScoreDistillation) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(k.startswith("particle.") for k in sa)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module", params=[None, 2], ids=["full", "lora"])
def runs(request, prior):
    """The uninterrupted run and the checkpoint of the interrupted one at step SPLIT."""
    lora_rank = request.param
    full = new_run(prior, lora_rank)
    full_stats = train(full, STEPS)
    first = new_run(prior, lora_rank)
    train(first, SPLIT)
    return {"lora_rank": lora_rank, "full": full, "stats": full_stats, "ckpt": checkpoint(first)}


def test_resumed_vsd_run_is_the_uninterrupted_run(prior, runs):
    resumed = restore(runs["ckpt"], prior, runs["lora_rank"])
    stats = train(resumed, STEPS - SPLIT)
    full = runs["full"]
    assert torch.equal(resumed.image, full.image)
    assert particle_equal(resumed.vsd, full.vsd)
    assert torch.equal(resumed.vsd._particle_generator.get_state(), full.vsd._particle_generator.get_state())
    assert stats == runs["stats"]  # the particle loss and the variance proxy's moments too
    # the particle model did train (its camera embedding left zero), so the comparison has teeth
    assert full.vsd.particle.camera_embedding.net[2].weight.abs().sum() > 0


def test_without_the_resume_state_the_run_differs(prior, runs):
    """Not restoring the particle generator restarts its draws from ``vsd_seed``: the particle model,
    and through it the image, leave the uninterrupted run."""
    full = runs["full"]
    skipped = restore(runs["ckpt"], prior, runs["lora_rank"], resume_keys=None)
    train(skipped, STEPS - SPLIT)
    assert not particle_equal(skipped.vsd, full.vsd)
    assert not torch.equal(skipped.image, full.image)


@pytest.mark.parametrize("lost", ["particle_generator", "moments"])  # "schedule": tests/test_noise_schemes.py
def test_a_missing_key_warns_naming_it_and_that_part_starts_fresh(prior, runs, lost):
    """An older state without one key still loads, with a warning naming the key. Without the
    generator the trajectory differs; without the moments it is the same but the logged variance
    proxy is not."""
    kept = tuple(k for k in RESUME_STATE_KEYS if k != lost)
    with pytest.warns(UserWarning, match=rf"no \['{lost}'\]"):
        run = restore(runs["ckpt"], prior, runs["lora_rank"], resume_keys=kept)
    stats = train(run, STEPS - SPLIT)
    full = runs["full"]
    if lost == "particle_generator":
        assert not particle_equal(run.vsd, full.vsd) and not torch.equal(run.image, full.image)
    else:
        assert particle_equal(run.vsd, full.vsd) and torch.equal(run.image, full.image)
        assert stats["var_proxy_ratio"] != runs["stats"]["var_proxy_ratio"]


def test_resume_state_before_any_step_and_for_other_estimators(prior):
    """Before the first particle draw (and for SSD/SDS, which have none) the generator is ``None``
    and restores as fresh: the first step after the restore draws from ``vsd_seed``."""
    fresh = make_vsd(prior)
    state = fresh.resume_state()
    assert state["particle_generator"] is None and state["moments"]["steps"] == 0
    assert ScoreDistillation(prior, estimator="sds").resume_state()["particle_generator"] is None
    used = make_vsd(prior)
    rgb = torch.rand(2, 3, 8, 8, generator=gen(1))
    used(rgb, LABELS, c2w=cameras(2), generator=gen(2))
    used.load_resume_state(state)
    assert used._moments == {"steps": 0, "grad_sq": 0.0, "sds_sq": 0.0}
    a = used(rgb, LABELS, c2w=cameras(2), generator=gen(2)).loss_vsd_particle
    b = fresh(rgb, LABELS, c2w=cameras(2), generator=gen(2)).loss_vsd_particle
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"'moments' lacks \['sds_sq'\]"):
        fresh.load_resume_state({**fresh.resume_state(), "moments": {"steps": 1, "grad_sq": 0.0}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_generator_of_a_missing_device_restarts_with_a_warning(prior):
    vsd = ScoreDistillation(prior, estimator="vsd")
    saved = {"device": "cuda:0", "state": torch.zeros(16, dtype=torch.uint8)}
    with pytest.warns(UserWarning, match="cannot restore the particle generator of device 'cuda:0'"):
        vsd.load_resume_state({**vsd.resume_state(), "particle_generator": saved})
    assert vsd._particle_generator is None
