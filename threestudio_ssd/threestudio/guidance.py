"""``stein-score-distillation-guidance``: Stein Score Distillation as a threestudio guidance.

The estimator itself is :class:`threestudio_ssd.distillation.ScoreDistillation` (framework-free);
this module speaks threestudio: a nested ``Config``, ``configure()``, ``update_step()`` with
``C()`` schedules, and ``forward`` returning ``loss_ssd`` (threestudio's target trick, weighted by
``system.loss.lambda_ssd``), ``loss_mu`` (the learned control-variate weights' loss,
``lambda_mu``) and scalars for logging.

Per step: ``x0 = encode(rgb)``, ``t ~ U[min_step_percent, max_step_percent]``,
``x_t = alpha_t x0 + sigma_t eps``, and

    grad = w(t) (eps_hat(x_t; y, t) - sum_k mu_k h_k),   h_k = eps phi_k(x_t) - sigma_t grad phi_k(x_t)

with ``h = eps`` for the ``constant`` baseline (so ``baselines: [constant]`` with ``mu = 1`` is SDS)
and ``phi = 1 - Pearson(depth estimate of x_t, rendered disparity)`` for ``depth`` (SteinDreamer).
``estimator: sds`` is plain SDS through the same code (the matching ``sds-*.yaml`` configs).
``estimator: vsd`` (pixel priors only) is ProlificDreamer's variational score distillation through
the same code, ``grad = w(t) (eps_hat - eps_hat_particle(x_t; y, c2w, t))`` with a camera-conditioned
particle copy of the prior (``threestudio_ssd.vsd``) that trains on the renders through
``loss_vsd_particle`` (weight ``lambda_vsd_particle``); it needs the batch's ``c2w``.

Classifier-free guidance uses the project's convention ``eps = eps_u + s (eps_c - eps_u)``;
threestudio's SD guidances write ``eps_c + s' (eps_c - eps_u)``, so ``guidance_scale: 100`` here is
threestudio's ``99`` (and threestudio's ``100`` is ``101`` here).

Like ProlificDreamer's VSD guidance, this is a ``BaseModule`` built in the system's
``configure()``: its learnable weights ``mu`` (SSD) or particle model (VSD) are its only parameters
(list ``guidance`` under ``system.optimizer.params``), while the frozen score model, depth network
and baselines live in a non-module container, out of the state dict and the optimiser.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from threestudio.models.prompt_processors.base import PromptProcessorOutput
from threestudio.utils.base import BaseModule
from threestudio.utils.misc import C, get_rank

from threestudio_ssd.baselines import RenderOutputs, build_baseline, registered_baselines
from threestudio_ssd.distillation import (
    BASELINE_DECODERS,
    ESTIMATORS,
    DistillationConfig,
    ScoreDistillation,
    VarianceEstimate,
)
from threestudio_ssd.threestudio.prompt_processor import PriorPromptProcessorOutput
from threestudio_ssd.threestudio.registry import register

SCORE_MODELS = ("stable-diffusion", "lcss-prior")
GEOMETRIC_BASELINES = ("depth", "normal")  # need a depth estimator and the render
#: a pixel-space prior is not fed renders smaller than this fraction of its resolution
MIN_RENDER_FRACTION = 0.5
#: the keys of the guidance's checkpointed extra state (``get_extra_state``)
EXTRA_STATE_KEYS = ("generator", "distillation")
#: ``DistillationConfig`` fields the guidance derives from its own keys instead of exposing them
DERIVED_KEYS = ("include_constant", "weighting", "grad_clip", "vsd_seed")
#: ``DistillationConfig`` fields left at their defaults (internal to the estimator and its logging)
ESTIMATOR_DEFAULTS = ("mu_ema", "resize_render", "stats_ema")


def _first_view(value: Any) -> Any:
    """The first sample of a batched tensor (``None`` and scalars unchanged)."""
    return value[:1] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def _config_error(key: str, message: str) -> ValueError:
    return ValueError(f"guidance.{key}: {message}")


@register("stein-score-distillation-guidance")
class SteinScoreDistillationGuidance(BaseModule):
    """SSD (or SDS) from a Stable Diffusion or LCSS-prior score model (module docstring)."""

    @dataclass
    class Config(BaseModule.Config):
        # the prior: "stable-diffusion" (latent, text) or "lcss-prior" (pixel, caption ids)
        score_model: str = "stable-diffusion"
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-2-1-base"
        prior_path: str | None = None
        half_precision_weights: bool = True
        # "ssd", "sds" or "vsd" (pixel priors: score_model lcss-prior)
        estimator: str = "ssd"
        # any of constant | depth | normal; list constant to include SDS's control variate
        baselines: list[str] = field(default_factory=lambda: ["constant", "depth"])
        depth_estimator_path: str | None = None
        mask_threshold: float = 0.5
        scene_mode: bool = False  # depth correlation over all pixels instead of the foreground
        # image the baselines see: full (VAE decode) | preview (score model's cheap decode_preview)
        baseline_decoder: str = "full"
        # control-variate weights mu (threestudio_ssd.stein.ControlVariateWeight)
        mu_shape: str = "scalar"  # scalar | channel | pixel
        mu_mode: str = "learned"  # learned (the paper) | optimal (least squares, no optimiser)
        mu_init: Any = None  # a number or one per control variate; default [1, 0, ...] (= SDS)
        mu_t_bins: int | None = None
        # our CFG convention eps_u + s (eps_c - eps_u), i.e. threestudio's value + 1
        guidance_scale: float = 100.0
        min_step_percent: Any = 0.02  # t range, schedulable with C()
        max_step_percent: Any = 0.98
        weighting_strategy: str = "sds"  # sds (w = 1 - alpha_bar) | uniform
        grad_clip: Any | None = None  # element-wise clip of the gradient, schedulable
        view_dependent_prompting: bool = True
        seed: int = 0  # noise generator (t, eps), seeded seed + rank; its state is checkpointed per rank
        # where a step's noise goes (DistillationConfig): draws per render (the gradient is their
        # mean), t placement uniform | stratified | golden, antithetic none | pairs | steps
        noise_draws: int = 1
        t_sampling: str = "uniform"
        antithetic: str = "none"
        linear_cv: bool = False  # SSD: add the linearisation control variate (ssd_math.md section 6)
        # VSD only (threestudio_ssd.vsd.ParticleScoreModel): camera guidance of the particle model
        # (1: camera-conditioned only), share of its training samples with the null camera, LoRA
        # rank (null: full fine-tune of the copy), camera-MLP width, seed of its training noise (checkpointed)
        vsd_guidance_scale: float = 1.0
        vsd_camera_dropout: float = 0.1
        vsd_lora_rank: int | None = None
        vsd_camera_hidden_dim: int = 64
        vsd_seed: int = 0

    cfg: Config

    def configure(self) -> None:
        cfg = self.cfg
        # threestudio's convention (launch.py seeds seed + rank): each data-parallel process draws its
        # own (t, eps), else averaging the ranks' gradients would remove no noise
        self.rank = get_rank()
        self._validate()
        self.distillation = ScoreDistillation(
            self._build_score_model(), self._build_baselines(), self._distillation_config()
        )
        self.generator = torch.Generator(device=self.device).manual_seed(int(cfg.seed) + self.rank)
        self.min_t = float(C(cfg.min_step_percent, 0, 0))
        self.max_t = float(C(cfg.max_step_percent, 0, 0))

    # -- configure-time checks and construction -------------------------------------------------

    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.score_model not in SCORE_MODELS:
            raise _config_error("score_model", f"{cfg.score_model!r} is not one of {list(SCORE_MODELS)}")
        if cfg.estimator not in ESTIMATORS:
            raise _config_error("estimator", f"{cfg.estimator!r} is not one of {list(ESTIMATORS)}")
        known = registered_baselines()
        unknown = [b for b in cfg.baselines if b not in known]
        if unknown:
            raise _config_error("baselines", f"unknown baseline(s) {unknown}; known: {known}")
        if len(set(cfg.baselines)) != len(cfg.baselines):
            raise _config_error("baselines", f"{list(cfg.baselines)} lists a baseline twice")
        if cfg.estimator == "vsd" and cfg.score_model != "lcss-prior":
            raise _config_error(
                "estimator",
                "'vsd' needs a pixel prior (score_model: lcss-prior); for Stable Diffusion use "
                "threestudio's stable-diffusion-vsd-guidance",
            )
        if cfg.estimator == "ssd" and not cfg.baselines:
            raise _config_error("baselines", "SSD needs at least one baseline (e.g. [constant, depth])")
        if self._needs_depth_network() and not cfg.depth_estimator_path:
            raise _config_error(
                "depth_estimator_path",
                f"baselines {[b for b in cfg.baselines if b in GEOMETRIC_BASELINES]} need a monocular "
                "depth model (a transformers checkpoint folder or Hub id, e.g. Intel/dpt-hybrid-midas)",
            )
        if cfg.baseline_decoder not in BASELINE_DECODERS:
            raise _config_error(
                "baseline_decoder", f"{cfg.baseline_decoder!r} is not one of {list(BASELINE_DECODERS)}"
            )
        if not 0.0 <= cfg.mask_threshold < 1.0:
            raise _config_error("mask_threshold", f"must be in [0, 1), got {cfg.mask_threshold}")
        if cfg.score_model == "lcss-prior":
            if not cfg.prior_path:
                raise _config_error(
                    "prior_path", "required with score_model: lcss-prior (an lcss_prior export)"
                )
            if not os.path.isdir(cfg.prior_path):
                raise _config_error(
                    "prior_path", f"{cfg.prior_path!r} is not a folder (an lcss_prior export)"
                )

    def _needs_depth_network(self) -> bool:
        return self.cfg.estimator == "ssd" and any(b in GEOMETRIC_BASELINES for b in self.cfg.baselines)

    def _build_score_model(self):
        from threestudio_ssd.score_models import build_score_model

        cfg = self.cfg
        if cfg.score_model == "stable-diffusion":
            return build_score_model(
                "stable-diffusion",
                pretrained_model_name_or_path=cfg.pretrained_model_name_or_path,
                half_precision=cfg.half_precision_weights,
                device=self.device,
            )
        try:
            return build_score_model("lcss-prior", prior=cfg.prior_path, device=self.device)
        except (OSError, ValueError, KeyError) as err:
            raise _config_error("prior_path", f"cannot load the prior at {cfg.prior_path!r}: {err}") from err

    def _build_baselines(self) -> list:
        cfg = self.cfg
        if cfg.estimator != "ssd":  # SDS and VSD use no baselines (guidance.baselines is ignored)
            return []
        estimator = None
        if self._needs_depth_network():
            from threestudio_ssd.depth import load_depth_estimator

            try:
                estimator = load_depth_estimator(cfg.depth_estimator_path, device=self.device)
            except (OSError, ValueError) as err:
                raise _config_error(
                    "depth_estimator_path", f"cannot load {cfg.depth_estimator_path!r}: {err}"
                ) from err
        mode = "scene" if cfg.scene_mode else "object"
        return [
            build_baseline(name, estimator=estimator, mode=mode, threshold=cfg.mask_threshold)
            for name in cfg.baselines
            if name != "constant"
        ]

    def _distillation_config(self) -> DistillationConfig:
        """The estimator's settings: every ``DistillationConfig`` field that is also a guidance key
        (the same name and meaning) is taken as it is; the rest is derived here (``DERIVED_KEYS``)
        or keeps ``DistillationConfig``'s default (``ESTIMATOR_DEFAULTS``)."""
        cfg = self.cfg
        derived = {
            "include_constant": "constant" in cfg.baselines or cfg.estimator == "sds",
            "weighting": cfg.weighting_strategy,
            "grad_clip": None,  # set per step by update_step (schedulable)
            "vsd_seed": int(cfg.vsd_seed) + self.rank,
        }
        shared = {name: getattr(cfg, name) for name in SHARED_KEYS}
        try:
            return DistillationConfig(**shared, **derived)
        except ValueError as err:  # names DistillationConfig.<key>; ours are the same but for weighting
            raise ValueError(f"guidance: {err} (weighting is guidance.weighting_strategy)") from err

    @staticmethod
    def _check_unsupported(prompt_utils: Any, kwargs: dict[str, Any]) -> None:
        """threestudio features a caller may ask for that this guidance does not implement: refused
        by name rather than silently ignored."""
        if getattr(prompt_utils, "use_perp_neg", False):
            raise NotImplementedError(
                "stein-score-distillation-guidance does not implement Perp-Neg: set "
                "system.prompt_processor.use_perp_neg: false"
            )
        if kwargs.get("guidance_eval"):
            raise NotImplementedError(
                "stein-score-distillation-guidance does not return guidance_eval images: set the "
                "system's freq.guidance_eval: 0"
            )

    def _check_camera(self, c2w: torch.Tensor | None) -> None:
        if self.cfg.estimator == "vsd" and c2w is None:
            raise ValueError(
                "guidance.estimator: 'vsd' conditions its particle model on the camera: pass the batch's "
                "c2w [B, 4, 4] (threestudio's data modules provide it)"
            )

    # -- threestudio hooks ----------------------------------------------------------------------

    @property
    def score_model(self):
        return self.distillation.score_model

    def check_render_resolution(self, height: int, width: int) -> None:
        """Raise when renders of ``height x width`` cannot sensibly feed the prior: a pixel-space
        prior of another aspect ratio, or renders smaller than ``MIN_RENDER_FRACTION`` of its side.
        (Latent models resize every render to their image size, as threestudio does.)"""
        if self.score_model.space != "pixel":
            return
        ph, pw = self.score_model.resolution
        if abs(height * pw - width * ph) > 0.01 * height * pw:
            raise ValueError(
                f"renders of {height}x{width} (data.height/data.width) have another aspect ratio than the "
                f"prior at guidance.prior_path={self.cfg.prior_path!r} ({ph}x{pw}); render at {ph}x{pw}"
            )
        if height < MIN_RENDER_FRACTION * ph:
            raise ValueError(
                f"renders of {height}x{width} (data.height/data.width) are too small for the {ph}x{pw} prior "
                f"at guidance.prior_path={self.cfg.prior_path!r}: upsampling by more than "
                f"{1 / MIN_RENDER_FRACTION:g}x gives it no detail to judge; render at >= {ph}x{pw}"
            )

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.min_t = float(C(self.cfg.min_step_percent, epoch, global_step))
        self.max_t = float(C(self.cfg.max_step_percent, epoch, global_step))
        if not 0.0 <= self.min_t <= self.max_t <= 1.0:
            raise ValueError(
                f"guidance.min_step_percent={self.min_t} / max_step_percent={self.max_t} at step "
                f"{global_step}: need 0 <= min <= max <= 1"
            )
        clip = None if self.cfg.grad_clip is None else float(C(self.cfg.grad_clip, epoch, global_step))
        self.distillation.config.grad_clip = clip if clip is not None and clip > 0 else None

    def get_extra_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond the parameters and buffers, so that it continues as an
        uninterrupted one: ``generator``, the noise generator's state (``t``, ``eps``), and
        ``distillation``, the estimator's ``ScoreDistillation.resume_state()`` (VSD's particle
        generator, the variance-proxy moments). The particle model's weights and ``mu`` are ordinary
        state-dict entries; the optimiser state of both is in Lightning's checkpoint."""
        return {"generator": self.generator.get_state(), "distillation": self.distillation.resume_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state`; a checkpoint without one of its keys (an older version)
        still loads, with a warning naming the key, and that part starts afresh."""
        state = state or {}
        missing = [key for key in EXTRA_STATE_KEYS if key not in state]
        if missing:
            warnings.warn(
                f"guidance checkpoint: the extra state has no {missing} (saved by an older version?); that "
                "state starts afresh ('generator' from guidance.seed; 'distillation': VSD's particle "
                "generator from guidance.vsd_seed, the logged variance-proxy moments from zero), so the "
                "resumed run differs from an uninterrupted one",
                stacklevel=2,
            )
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        if "distillation" in state:
            self.distillation.load_resume_state(state["distillation"])

    # -- the step -------------------------------------------------------------------------------

    def condition(self, prompt_utils: Any, elevation, azimuth, camera_distances) -> Any:
        """The score model's ``cond`` for a batch of cameras: threestudio's ``[2B, 77, D]`` text
        embeddings (cond, uncond) for SD, caption ids ``[B]`` for an LCSS prior."""
        cfg = self.cfg
        if cfg.score_model == "stable-diffusion":
            if not isinstance(prompt_utils, PromptProcessorOutput):
                raise TypeError(
                    "score_model: stable-diffusion needs text embeddings from a threestudio prompt "
                    f"processor (e.g. stable-diffusion-prompt-processor), got {type(prompt_utils).__name__}"
                )
            return prompt_utils.get_text_embeddings(
                elevation, azimuth, camera_distances, cfg.view_dependent_prompting
            )
        if not isinstance(prompt_utils, PriorPromptProcessorOutput):
            raise TypeError(
                "score_model: lcss-prior needs system.prompt_processor_type: stein-prior-prompt-processor, "
                f"got {type(prompt_utils).__name__}"
            )
        if list(prompt_utils.captions) != list(self.score_model.captions):
            raise ValueError(
                "the prompt processor's prior (system.prompt_processor.prior_path) has other captions than "
                f"guidance.prior_path={cfg.prior_path!r}; point both at the same prior"
            )
        return prompt_utils.get_labels(elevation, azimuth, camera_distances, cfg.view_dependent_prompting).to(
            self.device
        )

    def forward(
        self,
        rgb: torch.Tensor,
        prompt_utils: Any,
        elevation: torch.Tensor,
        azimuth: torch.Tensor,
        camera_distances: torch.Tensor,
        depth: torch.Tensor | None = None,
        opacity: torch.Tensor | None = None,
        comp_normal: torch.Tensor | None = None,
        c2w: torch.Tensor | None = None,
        rgb_as_latents: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``rgb [B, H, W, 3]`` in ``[0, 1]`` (or ``[B, h, w, C]`` latents with ``rgb_as_latents``);
        ``depth``/``opacity`` ``[B, H, W, 1]`` and ``comp_normal`` ``[B, H, W, 3]`` as threestudio's
        renderers return them, ``c2w [B, 4, 4]`` and ``fovy`` (radians, in ``kwargs``) from the batch.
        Returns ``loss_ssd`` (the distillation loss of every estimator), ``loss_mu`` (SSD, learned
        ``mu``), ``loss_vsd_particle`` (VSD: the particle model's denoising loss), ``min_step`` /
        ``max_step`` (the ``t`` range: threestudio's integer timesteps for Stable Diffusion, the continuous
        ``t`` for a pixel prior) and the estimator's statistics (``grad_norm``,
        ``phi_mean/<baseline>``, ``depth_corr``, ``mu/...``, ``n_fallback``, ``var_proxy_ratio``, ...)."""
        self._check_unsupported(prompt_utils, kwargs)
        x = rgb.permute(0, 3, 1, 2).float()  # an autocast render may be fp16/bf16; the cast keeps its graph
        if not rgb_as_latents:
            self.check_render_resolution(x.shape[2], x.shape[3])
        self._check_camera(c2w)
        cond = self.condition(prompt_utils, elevation, azimuth, camera_distances)
        render = self._render_outputs(depth, opacity, comp_normal, c2w, kwargs.get("fovy"))
        with self._no_autocast():
            out = self.distillation(
                x,
                cond,
                render,
                t_range=(self.min_t, self.max_t),
                generator=self.generator,
                rgb_as_latents=rgb_as_latents,
                c2w=c2w if self.cfg.estimator == "vsd" else None,
            )
        result: dict[str, Any] = {
            "loss_ssd": out.loss,
            "min_step": self._as_step(self.min_t),
            "max_step": self._as_step(self.max_t),
        }
        result.update(out.stats)
        if out.loss_mu is not None:
            result["loss_mu"] = out.loss_mu
        # the tensor (with its graph to the particle model), not the float copy in the statistics
        if out.loss_vsd_particle is not None:
            result["loss_vsd_particle"] = out.loss_vsd_particle
        else:
            result.pop("loss_vsd_particle", None)
        return result

    def estimate_variance(
        self,
        rgb: torch.Tensor,
        prompt_utils: Any,
        elevation: torch.Tensor,
        azimuth: torch.Tensor,
        camera_distances: torch.Tensor,
        depth: torch.Tensor | None = None,
        opacity: torch.Tensor | None = None,
        comp_normal: torch.Tensor | None = None,
        c2w: torch.Tensor | None = None,
        n_draws: int = 16,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        rgb_as_latents: bool = False,
        **kwargs: Any,
    ) -> VarianceEstimate:
        """Gradient variance of the configured estimator and of SDS at the FIRST view of a batch
        (the same arguments as ``forward``): ``ScoreDistillation.estimate_variance`` with
        ``n_draws`` draws of ``(t, eps)``, ``t ~ U[min_step, max_step]``, from ``generator`` (never
        the guidance's own noise stream, which training continues undisturbed), the current ``mu``
        or particle model (not updated). ``Var = E||g - E g||^2`` (trace of the covariance)."""
        first = _first_view
        self._check_camera(c2w)
        x = rgb[:1].detach().permute(0, 3, 1, 2).float()
        cond = self.condition(prompt_utils, elevation[:1], azimuth[:1], camera_distances[:1])
        render = self._render_outputs(
            first(depth), first(opacity), first(comp_normal), first(c2w), first(kwargs.get("fovy"))
        )
        with self._no_autocast():
            return self.distillation.estimate_variance(
                x,
                cond,
                render,
                n_draws=n_draws,
                generator=generator,
                t_range=(self.min_t, self.max_t),
                batch_size=batch_size,
                rgb_as_latents=rgb_as_latents,
                c2w=first(c2w) if self.cfg.estimator == "vsd" else None,
            )

    def _as_step(self, t: float) -> int | float:
        """``t`` as threestudio logs ``min_step``/``max_step``: the discrete timestep
        ``int(num_train_timesteps * t)`` of a Stable Diffusion prior (its guidances' convention); the
        continuous ``t`` itself for a pixel prior, which has no timestep index."""
        steps = getattr(self.score_model, "num_train_timesteps", None)
        return int(steps * t) if steps is not None else t

    def _no_autocast(self):
        """The step runs in the models' own dtypes whatever the trainer's precision: under
        ``16-mixed`` autocast would run the prior/VAE/depth network and ``grad phi`` in half
        precision (threestudio's guidances disable it the same way)."""
        return torch.autocast(device_type=torch.device(self.device).type, enabled=False)

    def _render_outputs(self, depth, opacity, comp_normal, c2w, fovy) -> RenderOutputs | None:
        if not self.distillation.baselines:
            return None
        if depth is None or opacity is None:
            raise ValueError(
                f"guidance.baselines {list(self.cfg.baselines)} need the rendered depth and opacity, but the "
                "renderer gave none (nvdiff-rasterizer renders no depth: in mesh stages use renderer_type: "
                "stein-mesh-rasterizer, or baselines [constant])"
            )
        out = {
            key: None if value is None else value.float()
            for key, value in (("depth", depth), ("opacity", opacity), ("comp_normal", comp_normal))
        }
        return RenderOutputs.from_threestudio(out, {"c2w": c2w, "fovy": fovy})


#: ``DistillationConfig`` fields that are guidance keys of the same name and meaning (all the others
#: are in ``DERIVED_KEYS`` or ``ESTIMATOR_DEFAULTS``; tests/integration/test_guidance.py keeps the
#: three lists complete, so that a new estimator setting cannot be forgotten here)
SHARED_KEYS = tuple(
    f.name
    for f in dataclasses.fields(DistillationConfig)
    if f.name not in DERIVED_KEYS + ESTIMATOR_DEFAULTS
)
