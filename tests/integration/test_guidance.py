"""``stein-score-distillation-guidance`` built by threestudio's registry from tiny saved models:
an exported LCSS prior (pixel path) and a Stable-Diffusion-shaped folder (latent path: the depth
baseline sees the VAE decode of ``x_t``), with a tiny DPT as depth estimator."""

from __future__ import annotations

import pytest
import torch

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior, make_tiny_stable_diffusion

from .tiny_models import CAMERA, DPT, PRIOR, SD, sd_prompt_utils, sphere_render

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "prior": make_tiny_prior(root / "prior", **PRIOR),
        "dpt": make_tiny_depth_estimator(root / "dpt", **DPT),
        "sd": make_tiny_stable_diffusion(root / "sd", **SD),
    }


def lcss_guidance(ts, models, **overrides):
    cfg = {
        "score_model": "lcss-prior",
        "prior_path": str(models["prior"]),
        "depth_estimator_path": str(models["dpt"]),
        "baselines": ["constant", "depth"],
        "half_precision_weights": False,
        "guidance_scale": 3.0,
        **overrides,
    }
    return ts.find("stein-score-distillation-guidance")(cfg)


def prior_prompt(ts, models, prompt="a red cube"):
    return ts.find("stein-prior-prompt-processor")({"prior_path": str(models["prior"]), "prompt": prompt})()


def mu_parameter(guidance) -> torch.nn.Parameter:
    params = list(guidance.parameters())
    assert len(params) == 1, [n for n, _ in guidance.named_parameters()]
    return params[0]


def test_lcss_prior_step_losses_gradients_and_state(threestudio_ts, models):
    guidance = lcss_guidance(threestudio_ts, models, mu_mode="learned")
    pu = prior_prompt(threestudio_ts, models)
    assert pu.label == pu.captions.index("a red cube")
    rgb = torch.rand(1, 16, 16, 3, requires_grad=True)
    out = guidance(rgb, pu, **CAMERA, **sphere_render(16, 16))
    for key in ("loss_ssd", "loss_mu", "grad_norm", "depth_corr", "n_fallback", "min_step", "max_step"):
        assert key in out, key
    assert torch.isfinite(out["loss_ssd"]) and torch.isfinite(out["loss_mu"])
    assert out["n_fallback"] == 0 and out["valid_frac/depth"] == 1.0
    out["loss_ssd"].backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    mu = mu_parameter(guidance)
    assert mu.grad is None  # the distillation loss does not train mu ...
    out["loss_mu"].backward()
    assert mu.grad is not None and (mu.grad.abs().flatten() > 0).all()  # ... loss_mu trains both weights
    # checkpoints hold mu and the noise generator, never the frozen prior or depth network
    keys = set(guidance.state_dict())
    assert keys and all(k.startswith("distillation.mu") or k.endswith("_extra_state") for k in keys), keys


def test_perp_neg_and_guidance_eval_are_refused_by_name(threestudio_ts, models):
    """threestudio systems may ask for Perp-Neg (prompt processor) or guidance_eval images; this
    guidance implements neither and says so instead of ignoring the request."""
    from dataclasses import replace

    guidance = lcss_guidance(threestudio_ts, models, estimator="sds", depth_estimator_path=None, baselines=["constant"])
    pu = prior_prompt(threestudio_ts, models)
    rgb = torch.rand(1, 16, 16, 3)
    with pytest.raises(NotImplementedError, match="freq.guidance_eval: 0"):
        guidance(rgb, pu, **CAMERA, guidance_eval=True)
    sd = sd_prompt_utils()
    with pytest.raises(NotImplementedError, match="use_perp_neg: false"):
        guidance(rgb, replace(sd, use_perp_neg=True), **CAMERA)
    assert "loss_ssd" in guidance(rgb, pu, **CAMERA, guidance_eval=False)


@pytest.mark.parametrize("score_model", ["lcss-prior", "stable-diffusion"])
def test_autocast_does_not_change_the_step(threestudio_ts, models, score_model):
    """Under ``trainer.precision: 16-mixed`` the system's forward runs in autocast; the guidance
    turns it off, so the loss and the gradient equal those of the full-precision step (CPU bf16
    here; without the guard the depth network and the prior run in bf16 and differ by ~1e-2)."""
    if score_model == "lcss-prior":
        pu, size, extra = prior_prompt(threestudio_ts, models), 16, {}
    else:
        pu, size = sd_prompt_utils(), 32
        extra = {"score_model": "stable-diffusion", "pretrained_model_name_or_path": str(models["sd"]), "prior_path": None}
    results = []
    for autocast in (False, True):
        guidance = lcss_guidance(threestudio_ts, models, seed=3, **extra)
        rgb = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = guidance(rgb, pu, **CAMERA, **sphere_render(size, size))
        out["loss_ssd"].backward()
        results.append((out["loss_ssd"].detach(), rgb.grad.clone()))
    (loss, grad), (loss_ac, grad_ac) = results
    torch.testing.assert_close(loss_ac, loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_ac, grad, rtol=1e-4, atol=1e-7)
    # a half-precision render (autocast's output) is accepted and cast, its graph kept
    guidance = lcss_guidance(threestudio_ts, models, seed=3, **extra)
    rgb16 = torch.rand(1, size, size, 3).to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = guidance(rgb16, pu, **CAMERA, **sphere_render(size, size))
    out["loss_ssd"].backward()
    assert out["loss_ssd"].dtype == torch.float32 and torch.isfinite(rgb16.grad.float()).all()


def test_schedules_follow_C(threestudio_ts, models):
    guidance = lcss_guidance(
        threestudio_ts,
        models,
        estimator="sds",
        depth_estimator_path=None,
        max_step_percent=[5, 0.98, 0.5, 6],
        grad_clip=[0, 1.0, 2.0, 10],
    )
    guidance.update_step(0, 0)
    assert guidance.max_t == pytest.approx(0.98) and guidance.distillation.config.grad_clip == pytest.approx(
        1.0
    )
    guidance.update_step(0, 5)
    assert guidance.distillation.config.grad_clip == pytest.approx(1.5)
    guidance.update_step(0, 10)
    assert guidance.max_t == pytest.approx(0.5) and guidance.distillation.config.grad_clip == pytest.approx(
        2.0
    )
    out = guidance(torch.rand(1, 16, 16, 3), prior_prompt(threestudio_ts, models), **CAMERA)
    assert out["max_step"] == pytest.approx(0.5)
    assert out["grad_norm"] <= 2.0 * (3 * 16 * 16) ** 0.5 + 1e-4  # element-wise clip at 2
    with pytest.raises(ValueError, match="min_step_percent"):
        lcss_guidance(
            threestudio_ts,
            models,
            estimator="sds",
            depth_estimator_path=None,
            min_step_percent=0.9,
            max_step_percent=0.5,
        ).update_step(0, 0)


def test_constant_baseline_with_unit_weight_is_sds_and_noise_state_is_checkpointed(threestudio_ts, models):
    """Through the whole threestudio path: SSD with only the constant baseline and mu = 1 gives
    SDS's loss on the same noise; a guidance loaded from another's state dict continues its noise."""
    pu = prior_prompt(threestudio_ts, models)
    rgb = torch.rand(1, 16, 16, 3)
    sds = lcss_guidance(threestudio_ts, models, estimator="sds", depth_estimator_path=None, seed=3)
    ssd = lcss_guidance(
        threestudio_ts, models, baselines=["constant"], depth_estimator_path=None, mu_init=1.0, seed=3
    )
    a, b = sds(rgb, pu, **CAMERA), ssd(rgb, pu, **CAMERA)
    torch.testing.assert_close(a["loss_ssd"], b["loss_ssd"])
    assert "loss_mu" not in a and "loss_mu" in b
    assert list(sds.parameters()) == []
    # a different weight is not SDS on the same draw (the comparison above can fail)
    ssd_half = lcss_guidance(
        threestudio_ts, models, baselines=["constant"], depth_estimator_path=None, mu_init=0.5, seed=3
    )
    assert not torch.allclose(ssd_half(rgb, pu, **CAMERA)["loss_ssd"], a["loss_ssd"])
    # resume: the generator state travels in the state dict
    fresh = lcss_guidance(threestudio_ts, models, estimator="sds", depth_estimator_path=None, seed=99)
    fresh.load_state_dict(sds.state_dict())
    torch.testing.assert_close(fresh(rgb, pu, **CAMERA)["loss_ssd"], sds(rgb, pu, **CAMERA)["loss_ssd"])


def test_stable_diffusion_latent_path(threestudio_ts, models):
    """SD score model: text embeddings from threestudio's PromptProcessorOutput, latents from the
    VAE, the depth baseline evaluated on the VAE decode of x_t (gradient through decoder and DPT)."""
    guidance = threestudio_ts.find("stein-score-distillation-guidance")(
        {
            "score_model": "stable-diffusion",
            "pretrained_model_name_or_path": str(models["sd"]),
            "half_precision_weights": False,
            "depth_estimator_path": str(models["dpt"]),
            "baselines": ["constant", "depth"],
            "mu_mode": "learned",
            "mu_shape": "channel",
        }
    )
    assert guidance.score_model.space == "latent"
    rgb = torch.rand(1, 16, 16, 3, requires_grad=True)
    out = guidance(rgb, sd_prompt_utils(), **CAMERA, **sphere_render(16, 16))
    assert torch.isfinite(out["loss_ssd"]) and torch.isfinite(out["loss_mu"])
    assert out["n_fallback"] == 0 and out["valid_frac/depth"] == 1.0
    # min_step / max_step as threestudio's SD guidances log them: integer timesteps
    steps = guidance.score_model.num_train_timesteps
    assert (out["min_step"], out["max_step"]) == (int(steps * 0.02), int(steps * 0.98))
    assert isinstance(out["min_step"], int)
    (out["loss_ssd"] + out["loss_mu"]).backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    mu = mu_parameter(guidance)
    assert mu.grad is not None and (mu.grad.abs().sum(dim=-1) > 0).all()  # both cv weights, every bin
    with pytest.raises(TypeError, match="prompt processor"):
        guidance(rgb, prior_prompt(threestudio_ts, models), **CAMERA, **sphere_render(16, 16))


def test_prompt_processor_view_dependent_captions(threestudio_ts, tmp_path):
    captions = [
        "a red cube",
        "a red cube, front view",
        "a red cube, back view",
        "a red cube, overhead view",
        "a ball",
    ]
    from threestudio_ssd.testing import make_tiny_prior

    prior = make_tiny_prior(tmp_path / "prior", captions=captions, resolution=8)
    pu = threestudio_ts.find("stein-prior-prompt-processor")(
        {"prior_path": str(prior), "prompt": "A Red  Cube"}
    )()
    elevation = torch.tensor([0.0, 0.0, 0.0, 80.0, 0.0])
    azimuth = torch.tensor([0.0, 90.0, 180.0, 0.0, -170.0])
    labels = pu.get_labels(elevation, azimuth, None, view_dependent_prompting=True)
    assert labels.tolist() == [1, 0, 2, 3, 2]  # front, side (no side caption: base), back, overhead, back
    assert pu.get_labels(elevation, azimuth, None, view_dependent_prompting=False).tolist() == [0] * 5


def test_text_embedding_prompt_output_picks_threestudio_directions(threestudio_ts):
    """The same cameras as above through threestudio's own ``get_text_embeddings``: each view gets
    the embedding of its direction (side 0, front 1, back 2, overhead 3), azimuth wrapped."""
    from threestudio_ssd.threestudio.prompt_processor import text_embedding_prompt_output

    vd = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3)
    out = text_embedding_prompt_output(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), vd, -vd, "a red cube")
    elevation = torch.tensor([0.0, 0.0, 0.0, 80.0, 0.0, 0.0])
    azimuth = torch.tensor([0.0, 90.0, 180.0, 0.0, -170.0, 350.0])
    emb = out.get_text_embeddings(elevation, azimuth, torch.ones(6), view_dependent_prompting=True)
    assert emb[:6, 0, 0].tolist() == [1.0, 0.0, 2.0, 3.0, 2.0, 1.0]  # conditional rows first
    assert emb[6:, 0, 0].tolist() == [-1.0, -0.0, -2.0, -3.0, -2.0, -1.0]
    assert out.prompts_vd == [f"a red cube, {d} view" for d in ("side", "front", "back", "overhead")]


def test_noise_schemes_reach_the_estimator_and_their_state_is_checkpointed(threestudio_ts, models):
    """``noise_draws``/``t_sampling``/``antithetic`` keys configure the estimator; with SSD and the
    depth baseline each draw sees the render; the schedule's state (golden start, the antithetic
    partner) travels in the guidance's extra state, so a loaded guidance continues the pair."""
    pu = prior_prompt(threestudio_ts, models)
    rgb = torch.rand(1, 16, 16, 3)
    kw = dict(mu_mode="optimal", noise_draws=4, t_sampling="stratified", antithetic="pairs", seed=5)
    guidance = lcss_guidance(threestudio_ts, models, **kw)
    config = guidance.distillation.config
    assert (config.noise_draws, config.t_sampling, config.antithetic) == (4, "stratified", "pairs")
    out = guidance(rgb, pu, **CAMERA, **sphere_render(16, 16))
    assert torch.isfinite(out["loss_ssd"]) and out["n_fallback"] == 0 and out["valid_frac/depth"] == 1.0
    with pytest.raises(ValueError, match="guidance: DistillationConfig.antithetic='pairs' needs an even"):
        lcss_guidance(threestudio_ts, models, noise_draws=3, antithetic="pairs")
    steps = dict(estimator="sds", depth_estimator_path=None, t_sampling="golden", antithetic="steps", seed=5)
    first = lcss_guidance(threestudio_ts, models, **steps)
    first(rgb, pu, **CAMERA)  # opens a pair
    resumed = lcss_guidance(threestudio_ts, models, **{**steps, "seed": 77})
    resumed.load_state_dict(first.state_dict())
    torch.testing.assert_close(resumed(rgb, pu, **CAMERA)["loss_ssd"], first(rgb, pu, **CAMERA)["loss_ssd"])


def test_every_estimator_setting_is_a_guidance_key_or_derived(threestudio_ts):
    """The guidance builds ``DistillationConfig`` from its own keys of the same names: every field is
    such a key, derived from the guidance's keys, or deliberately left at its default -- a new
    estimator setting fails here until it is placed in one of the three."""
    import dataclasses

    from threestudio_ssd.distillation import DistillationConfig
    from threestudio_ssd.threestudio import guidance as module

    fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    shared, derived, defaults = set(module.SHARED_KEYS), set(module.DERIVED_KEYS), set(module.ESTIMATOR_DEFAULTS)
    assert shared | derived | defaults == fields and not (derived & defaults)
    keys = {f.name for f in dataclasses.fields(module.SteinScoreDistillationGuidance.Config)}
    assert shared <= keys, sorted(shared - keys)
    assert not (keys & defaults), sorted(keys & defaults)  # a guidance key would be silently ignored
