"""One score-distillation step, framework-free: shared by the threestudio guidance, the 2-D
playground and the benchmarks (pure torch + our modules; no threestudio, no Lightning).
SDS, SSD and VSD differ in nothing but the term subtracted from ``eps_hat`` in step 3.

Per step, for a render ``rgb`` with gradient to the 3-D parameters (docs/ARCHITECTURE.md):

1. ``x0 = encode(rgb)``; ``t ~ U[t_min, t_max]`` and ``eps ~ N(0, I)`` per sample (from
   ``generator``); ``x_t = alpha_t x0 + sigma_t eps`` with ``x0`` detached;
   ``eps_hat = eps(x_t, t, cond, s)`` (classifier-free guided, no gradient); ``w(t)``.
2. Control variates: the constant baseline's ``h_0 = eps`` (``include_constant``) and, for SSD, one
   ``h_k = eps phi_k(x_t) - sigma_t grad_{x_t} phi_k(x_t)`` per baseline, all baselines evaluated on
   ONE decode of ``x_t`` (``baseline_value_and_grad``; ``baseline_decoder="preview"``: the score
   model's cheap ``decode_preview`` instead); invalid or non-finite samples fall back to ``eps`` and
   are counted.
3. ``grad = w (eps_hat - sum_k mu_k h_k)`` (``stein_gradient``) with ``mu`` from earlier steps
   (detached), so ``E[grad]`` is the SDS mean for every ``mu``; then ``mu`` is refit (``optimal``)
   or its loss returned (``learned``). SDS is the same path with ``h_0 = eps`` alone and ``mu = 1``:
   exactly ``w (eps_hat - eps)``. VSD (``estimator="vsd"``) is the same path with the particle
   model's camera-guided prediction in place of the control variates and ``mu = 1``:
   ``w (eps_hat - eps_hat_particle(x_t; y, c2w))`` (``threestudio_ssd.vsd``); then the particle
   model's denoising loss on the detached ``x0`` is returned (``loss_vsd_particle``). Unlike SSD,
   VSD does not have the SDS mean: ``E[eps_hat_particle] != 0`` (a learned, biased control variate).
4. ``nan_to_num``, optional element-wise clipping, and threestudio's target trick
   ``loss = 0.5 ||x0 - (x0 - grad).detach()||^2 / B`` (sum over elements), whose gradient with
   respect to ``x0`` is ``grad / B``.

The frozen score model and the baselines (which hold the depth network) are kept in a plain,
non-``Module`` container: they are neither in ``state_dict()`` nor in ``parameters()``, and
``.to(device)`` does not move them. The submodules are ``mu`` (``ControlVariateWeight``, SSD) and
``particle`` (``ParticleScoreModel``, VSD: it trains, so it is state and parameters).

Resuming. ``state_dict()`` holds ``mu`` (the ``learned`` parameter, or the ``optimal`` weights and
their running moments as buffers) and the particle model's weights; the optimiser state of both
belongs to the caller's optimiser. Two things carry over from step to step outside
``state_dict()``: VSD's particle generator (seeded ``vsd_seed``, advanced by every particle-training
draw) and the running second moments behind the logged ``var_proxy_*``. ``resume_state()`` returns
them and ``load_resume_state()`` restores them, so that a run restored from ``state_dict()``, the
optimiser, the caller's generator and ``resume_state()`` continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from lcss_prior.sde import draw, generator_device
from threestudio_ssd.baselines.base import Baseline, ConstantBaseline, RenderOutputs
from threestudio_ssd.score_models.base import ScoreModel
from threestudio_ssd.score_models.image import resize_image
from threestudio_ssd.stein import (
    WEIGHT_MODES,
    WEIGHT_SHAPES,
    ControlVariateWeight,
    LearnedWeights,
    OptimalWeights,
    baseline_value_and_grad,
    control_variates,
    gradient_variance,
    sds_gradient,
    stein_gradient,
)
from threestudio_ssd.vsd import ParticleScoreModel

ESTIMATORS = ("ssd", "sds", "vsd")
#: the keys of ``ScoreDistillation.resume_state()``
RESUME_STATE_KEYS = ("particle_generator", "moments", "schedule")
T_SAMPLINGS = ("uniform", "stratified", "golden")
ANTITHETIC = ("none", "pairs", "steps")
#: 1 / golden ratio: the additive recurrence ``u_k = frac(u_0 + k * GOLDEN)`` spreads ``u`` evenly
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: relative step ``d`` of the linearisation control variate's central difference
LINEAR_CV_STEP = 0.01
WEIGHTINGS = ("sds", "uniform")
RESIZE_RENDER = ("image", "render")
BASELINE_DECODERS = ("full", "preview")


@dataclass
class DistillationConfig:
    """Settings of :class:`ScoreDistillation`.

    Attributes:
        estimator: ``"ssd"`` (Stein score distillation), ``"sds"`` or ``"vsd"`` (variational score
            distillation with a camera-conditioned particle model, pixel priors only).
        include_constant: SSD also uses the constant baseline (``h_0 = eps``), each control variate
            with its own weight; ``False`` with one baseline is the paper's single-baseline form.
        mu_shape: ``"scalar"``, ``"channel"`` or ``"pixel"`` weights (``ControlVariateWeight``).
        mu_mode: ``"optimal"`` (least squares from running moments of earlier steps; needs no
            optimiser) or ``"learned"`` (the paper: ``loss_mu`` for the caller's optimiser).
        mu_init: initial weights: a number or one per control variate; default ``[1, 0, ..]``
            (SDS when the constant comes first).
        mu_t_bins: separate weights for this many equal-width bins of ``t`` (``None``: one set).
        mu_ema: decay of the ``optimal`` running moments per update of a bin.
        guidance_scale: ``s`` in ``eps_u + s (eps_c - eps_u)`` (threestudio's ``guidance_scale``
            is ``s - 1``).
        weighting: ``"sds"`` (``w = sigma^2 / (alpha^2 + sigma^2)``) or ``"uniform"`` (``w = 1``).
        grad_clip: clip ``grad`` element-wise to ``[-c, c]`` after ``nan_to_num`` (``None``: off).
        resize_render: ``"image"`` resizes the render outputs to the decoded image (default),
            ``"render"`` resizes the decoded image (differentiably) to the render's resolution.
        baseline_decoder: the image the baselines see: ``"full"`` (``score_model.decode``, the VAE
            decoder for latent priors; default) or ``"preview"`` (``score_model.decode_preview``:
            for Stable Diffusion a fitted per-pixel affine latent -> RGB map at latent resolution,
            far cheaper; still unbiased, the variance reduction must be measured). Pixel priors:
            the same.
        stats_ema: decay of the running second moments behind ``var_proxy_ratio``.
        vsd_guidance_scale: VSD: camera guidance ``s_c`` of the particle model (1: conditioned only).
        vsd_camera_dropout: VSD: share of particle-training samples that see the null camera.
        vsd_lora_rank: VSD: ``None`` fine-tunes a full copy of the prior's network, a number trains
            LoRA adapters of that rank (plus the camera embedding) instead.
        vsd_camera_hidden_dim: VSD: width of the camera-embedding MLP.
        vsd_seed: VSD: seed of the particle model's own generator (its training draws never consume
            the caller's generator, so SDS, SSD and VSD see the same ``t``/``eps`` stream).
        noise_draws: ``(t, eps)`` draws per render per step; the step's gradient is their mean (the
            render, its decode and its backward pass are shared; each draw costs a score-model call).
        t_sampling: how the draws' ``t`` are placed, each draw's ``t`` being ``U[t_min, t_max]``
            marginally (so every choice has the SDS mean): ``"uniform"`` (independent),
            ``"stratified"`` (one ``t`` per equal-width stratum among a render's draws, in random
            order) or ``"golden"`` (low discrepancy ACROSS steps: render slot ``b`` uses
            ``u_k = frac(u_0[b] + k / phi)`` at its ``k``-th step, ``u_0`` uniform, drawn once; a
            render's several draws sit at ``frac(u_k + j / m)``).
        antithetic: ``"none"``; ``"pairs"``: a render's draws come in pairs ``(t, eps)``,
            ``(t, -eps)`` (``noise_draws`` even), which cancels every part of the gradient that is
            odd in ``eps`` (``-eps`` itself included); ``"steps"``: every second step reuses the
            previous step's ``t`` and ``-eps`` (the optimiser's moving average sees the pair). With
            ``"steps"`` an ``optimal`` ``mu`` is refit after the second step of each pair only (a
            ``mu`` fitted on ``eps`` must not weight ``-eps``), and ``learned`` is refused.
        linear_cv: SSD: add the linearisation control variate ``h_lin = (eps_hat(alpha x0 + d sigma
            eps) - eps_hat(alpha x0 - d sigma eps)) / 2d`` (``~ sigma J(alpha x0) eps``, ``d =
            LINEAR_CV_STEP``) with its own weight: odd in ``eps``, so exactly zero-mean for any ``d``;
            two more score-model calls per draw (docs/ssd_math.md section 6).
    """

    estimator: str = "ssd"
    include_constant: bool = True
    mu_shape: str = "scalar"
    mu_mode: str = "optimal"
    mu_init: float | list[float] | None = None
    mu_t_bins: int | None = None
    mu_ema: float = 0.99
    guidance_scale: float = 7.5
    weighting: str = "sds"
    grad_clip: float | None = None
    resize_render: str = "image"
    baseline_decoder: str = "full"
    stats_ema: float = 0.98
    vsd_guidance_scale: float = 1.0
    vsd_camera_dropout: float = 0.1
    vsd_lora_rank: int | None = None
    vsd_camera_hidden_dim: int = 64
    vsd_seed: int = 0
    noise_draws: int = 1
    t_sampling: str = "uniform"
    antithetic: str = "none"
    linear_cv: bool = False

    def __post_init__(self) -> None:
        for key, allowed in (
            ("estimator", ESTIMATORS),
            ("weighting", WEIGHTINGS),
            ("resize_render", RESIZE_RENDER),
            ("baseline_decoder", BASELINE_DECODERS),
            ("mu_shape", WEIGHT_SHAPES),
            ("mu_mode", WEIGHT_MODES),
            ("t_sampling", T_SAMPLINGS),
            ("antithetic", ANTITHETIC),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(
                    f"DistillationConfig.{key} must be one of {allowed}, got {getattr(self, key)!r}"
                )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"DistillationConfig.grad_clip must be None or > 0, got {self.grad_clip!r}")
        if not 0.0 <= self.stats_ema < 1.0:
            raise ValueError(f"DistillationConfig.stats_ema must be in [0, 1), got {self.stats_ema!r}")
        if not 0.0 <= self.vsd_camera_dropout < 1.0:
            raise ValueError(
                f"DistillationConfig.vsd_camera_dropout must be in [0, 1), got {self.vsd_camera_dropout!r}"
            )
        if isinstance(self.noise_draws, bool) or not isinstance(self.noise_draws, int) or self.noise_draws < 1:
            raise ValueError(f"DistillationConfig.noise_draws must be an integer >= 1, got {self.noise_draws!r}")
        if self.antithetic == "pairs" and self.noise_draws % 2:
            raise ValueError(
                f"DistillationConfig.antithetic='pairs' needs an even noise_draws, got {self.noise_draws}"
            )
        if self.antithetic == "steps" and self.estimator == "ssd" and self.mu_mode == "learned":
            raise ValueError(
                "DistillationConfig.antithetic='steps' with mu_mode='learned': the optimiser would step mu "
                "on eps before mu weights -eps (biased); use mu_mode='optimal' or antithetic='pairs'"
            )
        if self.linear_cv and self.estimator != "ssd":
            raise ValueError(
                f"DistillationConfig.linear_cv is a control variate of estimator='ssd', got {self.estimator!r}"
            )
        if self.vsd_lora_rank is not None and not self.vsd_lora_rank >= 1:
            raise ValueError(
                f"DistillationConfig.vsd_lora_rank must be None or >= 1, got {self.vsd_lora_rank!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DistillationConfig:
        """Build from a mapping (e.g. a YAML section); an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DistillationConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(values))


@dataclass
class DistillationOutput:
    """One step's result.

    ``loss``: the target-trick loss to add to the 3-D model's loss (its gradient w.r.t. ``x0`` is
    ``grad / B``). ``loss_mu``: the ``learned`` weights' loss (``None`` otherwise), to be stepped by
    the optimiser that holds ``ScoreDistillation.parameters()``. ``grad``: ``[B, C, h, w]`` detached,
    after ``nan_to_num`` and clipping. ``t``: ``[B]`` (each render's first draw with
    ``noise_draws > 1``). ``stats``: python floats for logging.
    ``loss_vsd_particle``: VSD's particle-model denoising loss (batch mean; ``None`` otherwise), for
    the same optimiser; it reaches only the particle model.
    """

    loss: Float[Tensor, ""]
    loss_mu: Float[Tensor, ""] | None
    grad: Float[Tensor, "B C h w"]
    t: Float[Tensor, " B"]
    stats: dict[str, float] = field(default_factory=dict)
    loss_vsd_particle: Float[Tensor, ""] | None = None


@dataclass
class VarianceEstimate:
    """``K`` gradient draws at one render, SSD and SDS on the SAME ``(t, eps)`` draws.

    ``ssd``, ``sds``: ``[K, C, h, w]`` (unclipped, ``nan_to_num``); ``t``: ``[K]``;
    ``var_ssd``, ``var_sds``: ``gradient_variance`` (trace of the covariance); ``ratio``:
    ``var_ssd / var_sds``; ``n_fallback``: baseline evaluations that fell back to the constant.
    ``ssd``/``var_ssd`` hold the configured estimator's draws: for ``estimator="sds"`` the two sets
    of samples are identical, for ``"vsd"`` they are VSD's (whose mean is not SDS's).
    """

    ssd: Tensor
    sds: Tensor
    t: Tensor
    var_ssd: float
    var_sds: float
    ratio: float
    n_fallback: int


@dataclass(frozen=True)
class _Frozen:
    """Plain container: what it holds is invisible to ``nn.Module`` (state dict, parameters)."""

    score_model: ScoreModel
    baselines: tuple[Baseline, ...]
    names: tuple[str, ...]


@dataclass
class _Step:
    grad: Tensor  # raw stein_gradient
    sds: Tensor  # w (eps_hat - eps) on the same noise
    eps_hat: Tensor
    cvs: Tensor
    weight: Tensor
    phis: Tensor | None  # [B, K] (the evaluated values; placeholders where invalid)
    valid: Tensor | None  # [B, K] as the baselines reported
    fallback: Tensor | None  # [B, K] replaced by the constant (invalid or non-finite)


class ScoreDistillation(nn.Module):
    """SSD / SDS gradients for renders, from a frozen ``ScoreModel`` and a set of baselines.

    Args:
        score_model: the frozen prior (``StableDiffusionScoreModel``, ``LCSSPriorScoreModel``, ...).
        baselines: baseline functions ``phi(image, render)`` for SSD (``build_baseline``); ignored
            entries are not allowed: with ``estimator="sds"`` or ``"vsd"`` pass none.
        config: a :class:`DistillationConfig` or a mapping of its fields; ``overrides`` replace
            single fields.
    """

    def __init__(
        self,
        score_model: ScoreModel,
        baselines: Sequence[Baseline] | None = None,
        config: DistillationConfig | Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not isinstance(score_model, ScoreModel):
            raise TypeError(f"score_model must be a ScoreModel, got {type(score_model).__name__}")
        if config is None:
            config = DistillationConfig()
        elif isinstance(config, Mapping):
            config = DistillationConfig.from_dict(config)
        if overrides:
            config = DistillationConfig.from_dict({**dataclasses.asdict(config), **overrides})
        self.config = config
        baselines = tuple(baselines or ())
        for b in baselines:
            if not isinstance(b, Baseline):
                raise TypeError(
                    f"baselines must be Baseline instances (build_baseline), got {type(b).__name__}"
                )
        if config.estimator in ("sds", "vsd") and baselines:
            raise ValueError(
                f"estimator={config.estimator!r} uses no baselines, got {[b.name for b in baselines]}; "
                "use estimator='ssd'"
            )
        if config.estimator == "ssd":
            if not baselines and not config.include_constant and not config.linear_cv:
                raise ValueError(
                    "estimator='ssd' with include_constant=False needs at least one baseline (or linear_cv)"
                )
            if config.include_constant and any(isinstance(b, ConstantBaseline) for b in baselines):
                raise ValueError(
                    "the constant baseline is already included (include_constant=True); remove 'constant' "
                    "from the baselines or set include_constant=False"
                )
        names = _unique_names([b.name or type(b).__name__ for b in baselines])
        self._frozen = _Frozen(score_model, baselines, names)
        self.mu: LearnedWeights | OptimalWeights | None = None
        if config.estimator == "ssd":
            self.mu = ControlVariateWeight(
                n_cv=len(baselines) + int(config.include_constant) + int(config.linear_cv),
                shape=config.mu_shape,
                channels=score_model.channels,
                resolution=score_model.resolution,
                mode=config.mu_mode,
                init=config.mu_init,
                t_bins=config.mu_t_bins,
                ema=config.mu_ema,
            )
        self.particle: ParticleScoreModel | None = None
        if config.estimator == "vsd":
            self.particle = ParticleScoreModel(
                score_model,
                guidance_scale=config.vsd_guidance_scale,
                camera_dropout=config.vsd_camera_dropout,
                lora_rank=config.vsd_lora_rank,
                camera_hidden_dim=config.vsd_camera_hidden_dim,
            )
        self._particle_generator: torch.Generator | None = None
        self._moments = {"steps": 0, "grad_sq": 0.0, "sds_sq": 0.0}
        self._schedule = _fresh_schedule()

    # -- accessors -----------------------------------------------------------------------------

    @property
    def score_model(self) -> ScoreModel:
        return self._frozen.score_model

    @property
    def baselines(self) -> tuple[Baseline, ...]:
        return self._frozen.baselines

    @property
    def baseline_names(self) -> tuple[str, ...]:
        return self._frozen.names

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"estimator={c.estimator!r}, score_model={type(self.score_model).__name__}, "
            f"baselines={list(self.baseline_names)}, include_constant={c.include_constant}"
        )

    # -- resuming ------------------------------------------------------------------------------

    def resume_state(self) -> dict[str, Any]:
        """What carries over between steps outside ``state_dict()`` (module docstring), as plain
        python objects and CPU tensors: ``particle_generator`` (VSD: ``{"device", "state"}`` of the
        particle model's generator; ``None`` before its first draw and for SSD/SDS) and ``moments``
        (the running second moments behind ``var_proxy_*``) and ``schedule`` (``t_sampling="golden"``'s
        per-slot start and step count; ``antithetic="steps"``'s pending ``t``/``eps`` and the first
        step's data that the deferred ``mu`` refit folds in)."""
        gen = self._particle_generator
        return {
            "particle_generator": None
            if gen is None
            else {"device": str(gen.device), "state": gen.get_state().clone()},
            "moments": dict(self._moments),
            "schedule": {key: _to_cpu(value) for key, value in self._schedule.items()},
        }

    def load_resume_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`resume_state` returned. A key missing from ``state`` (a checkpoint of an
        older version) leaves that part fresh -- the particle generator restarts from ``vsd_seed``,
        the moments from zero -- with a warning naming the key: the run then continues, but is not
        the uninterrupted one. A generator saved on a device that does not exist here restarts
        likewise, with a warning."""
        missing = [key for key in RESUME_STATE_KEYS if key not in state]
        if missing:
            warnings.warn(
                f"ScoreDistillation.load_resume_state: no {missing} in the saved state (an older "
                "checkpoint?); the particle generator restarts from vsd_seed, the variance-proxy "
                "moments from zero and the t/eps schedule afresh where missing, so the resumed run "
                "differs from an uninterrupted one",
                stacklevel=2,
            )
        if "moments" in state:
            moments = state["moments"]
            absent = sorted(set(self._moments) - set(moments))
            if absent:
                raise ValueError(f"resume state 'moments' lacks {absent}, got keys {sorted(moments)}")
            self._moments = {
                "steps": int(moments["steps"]),
                "grad_sq": float(moments["grad_sq"]),
                "sds_sq": float(moments["sds_sq"]),
            }
        if "particle_generator" in state:
            self._particle_generator = self._restore_generator(state["particle_generator"])
        if "schedule" in state:
            schedule = state["schedule"]
            absent = sorted(set(self._schedule) - set(schedule))
            if absent:
                raise ValueError(f"resume state 'schedule' lacks {absent}, got keys {sorted(schedule)}")
            self._schedule = {key: schedule[key] for key in self._schedule}

    @staticmethod
    def _restore_generator(saved: Mapping[str, Any] | None) -> torch.Generator | None:
        """A generator on the saved device with the saved state (``None``: not drawn from yet)."""
        if saved is None:
            return None
        try:
            gen = torch.Generator(device=torch.device(saved["device"]))
        except (RuntimeError, AssertionError) as err:  # no such device (or a CPU-only build)
            warnings.warn(
                f"ScoreDistillation.load_resume_state: cannot restore the particle generator of device "
                f"{saved['device']!r} here ({err}); it restarts from vsd_seed",
                stacklevel=3,
            )
            return None
        gen.set_state(torch.as_tensor(saved["state"]).cpu())
        return gen

    # -- the step ------------------------------------------------------------------------------

    @staticmethod
    def _no_phase(name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    #: ``phase(name)`` is entered around each part of a step: ``encode``, ``score_model`` (noising
    #: and the guided prediction), ``baselines`` (their values and exact gradients; inside it
    #: ``decode`` and ``phi``). A no-op; a benchmark sets a timer here to split the real step
    #: (``benchmarks.harness.PhaseTimer``).
    phase: Callable[[str], contextlib.AbstractContextManager] = _no_phase

    def forward(
        self,
        rgb: Float[Tensor, "B 3 H W"],
        cond: Any,
        render: RenderOutputs | None = None,
        t_range: tuple[float, float] = (0.02, 0.98),
        generator: torch.Generator | None = None,
        rgb_as_latents: bool = False,
        update_mu: bool = True,
        c2w: Float[Tensor, "B 4 4"] | None = None,
    ) -> DistillationOutput:
        """One distillation step (module docstring). ``rgb`` in ``[0, 1]`` carries the gradient to
        the 3-D parameters; with ``rgb_as_latents`` it is already ``x0`` in model space (resized to
        the model's resolution). ``cond`` is the score model's conditioning for this batch;
        ``render`` (SSD with baselines) the rendered depth/opacity/... of the same views; ``c2w``
        (VSD) the cameras, by default ``render.c2w``. ``update_mu=False`` is evaluation: ``mu`` is
        left untouched and no particle loss is returned."""
        cfg = self.config
        with self.phase("encode"):
            x0 = self._model_input(rgb, rgb_as_latents, generator)
        batch, n = x0.shape[0], cfg.noise_draws
        camera = self._camera(c2w, render, batch)
        t, eps = self._draw(x0, t_range, generator)
        step = self._step(
            _repeat_draws(x0.detach(), n),
            t,
            eps,
            self._repeat_cond(cond, n),
            None if render is None else render.repeat(n) if render.batch_size == batch else render,
            None if camera is None else camera.repeat(n, 1, 1),
        )
        raw = torch.nan_to_num(_mean_over_draws(step.grad, n))
        grad = raw if cfg.grad_clip is None else raw.clamp(-cfg.grad_clip, cfg.grad_clip)
        loss_mu = None
        if self.mu is not None and update_mu:
            if cfg.mu_mode == "learned":
                loss_mu = self.mu.loss(step.eps_hat, step.cvs, step.weight, t)
            else:
                self._update_optimal_mu(step, t)
        loss_particle = None
        if self.particle is not None and update_mu:
            loss_particle = self.particle.loss(x0, cond, camera, self._particle_rng(x0)).mean()
        target = (x0 - grad).detach()
        loss = 0.5 * (x0 - target).pow(2).sum() / batch
        stats = self._stats(grad, raw, step, update_mu)
        if loss_particle is not None:
            stats["loss_vsd_particle"] = loss_particle.item()
        return DistillationOutput(
            loss=loss,
            loss_mu=loss_mu,
            grad=grad.detach(),
            t=t[:batch],
            stats=stats,
            loss_vsd_particle=loss_particle,
        )

    @torch.no_grad()
    def estimate_variance(
        self,
        rgb: Float[Tensor, "1 3 H W"],
        cond: Any,
        render: RenderOutputs | None = None,
        n_draws: int = 64,
        t: float | None = None,
        generator: torch.Generator | None = None,
        t_range: tuple[float, float] = (0.02, 0.98),
        batch_size: int = 8,
        rgb_as_latents: bool = False,
        c2w: Float[Tensor, "1 4 4"] | None = None,
    ) -> VarianceEstimate:
        """``n_draws`` independent ``(t, eps)`` at ONE render (``rgb`` of batch 1, its ``cond`` and
        ``render``; ``c2w`` for VSD), the estimator (SSD with the current ``mu``, never updated here;
        VSD with the current particle model, not trained here) and SDS on the same draws.

        Each sample is one step of the configured estimator: with ``noise_draws=n`` the mean of its
        ``n`` draws (placed by ``t_sampling``/``antithetic="pairs"``), so ``ratio`` is the per-step
        variance against single-draw SDS (its first draw, the same noise). Samples are independent:
        ``"golden"`` gives each its own random start and ``antithetic="steps"`` does not pair them
        (each is a step's marginal draw); ``t`` holds each sample's first ``t``.
        ``t=None`` draws ``t ~ U[t_range]``; a number fixes it. ``x0 = encode(rgb)`` is computed
        once (a sampling VAE draws its latent once: the render is fixed). Draws are evaluated
        ``batch_size`` at a time (``score_model.repeat_cond`` repeats ``cond``). The samples are not
        clipped: this is the variance of the estimator itself.
        """
        if n_draws < 2:
            raise ValueError(f"n_draws must be >= 2 to estimate a variance, got {n_draws}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x0 = self._model_input(rgb, rgb_as_latents, generator).detach()
        if x0.shape[0] != 1:
            raise ValueError(f"estimate_variance takes one render (batch 1), got a batch of {x0.shape[0]}")
        camera = self._camera(c2w, render, 1)
        if t is not None and not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"t must be None or in [0, 1], got {t}")
        # all draws up front, so that they do not depend on batch_size; sample k is one step of the
        # estimator at its own render slot (noise_draws draws, independent of every other sample)
        n = self.config.noise_draws
        ts, noise = self._draw(x0.expand(n_draws, *x0.shape[1:]), t_range, generator, independent=True)
        if t is not None:
            ts = torch.full_like(ts, float(t))
        ts, noise = ts.reshape(n, n_draws), noise.reshape(n, n_draws, *x0.shape[1:])
        ssd, sds, n_fallback = [], [], 0
        for start in range(0, n_draws, batch_size):
            tn = ts[:, start : start + batch_size].reshape(-1)
            eps = noise[:, start : start + batch_size].reshape(-1, *x0.shape[1:])
            size = tn.shape[0]
            cam = None if camera is None else camera.expand(size, 4, 4)
            step = self._step(x0.expand(size, *x0.shape[1:]), tn, eps, self._repeat_cond(cond, size), render, cam)
            ssd.append(torch.nan_to_num(_mean_over_draws(step.grad, n)))
            sds.append(torch.nan_to_num(step.sds[: size // n]))  # single-draw SDS: each sample's first draw
            n_fallback += 0 if step.fallback is None else int(step.fallback.sum())
        ssd_t, sds_t = torch.cat(ssd), torch.cat(sds)
        var_ssd, var_sds = gradient_variance(ssd_t).item(), gradient_variance(sds_t).item()
        return VarianceEstimate(
            ssd=ssd_t,
            sds=sds_t,
            t=ts[0],
            var_ssd=var_ssd,
            var_sds=var_sds,
            ratio=var_ssd / var_sds if var_sds > 0 else math.nan,
            n_fallback=n_fallback,
        )

    # -- internals -----------------------------------------------------------------------------

    def _model_input(self, rgb: Tensor, rgb_as_latents: bool, generator: torch.Generator | None) -> Tensor:
        sm = self.score_model
        if not rgb_as_latents:
            return sm.encode(rgb, generator=generator)
        if rgb.ndim != 4 or rgb.shape[1] != sm.channels:
            raise ValueError(
                f"rgb_as_latents expects x0 of shape [B, {sm.channels}, h, w] in model space, got {tuple(rgb.shape)}"
            )
        return resize_image(rgb, sm.resolution)

    def _draw(
        self,
        x0: Tensor,
        t_range: Sequence[float],
        generator: torch.Generator | None,
        advance: bool = True,
        independent: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The step's ``t [n B]`` and ``eps [n B, *x0.shape[1:]]`` for ``B`` renders with
        ``n = noise_draws`` draws each (draw ``j`` of render ``b`` at ``j B + b``, the order of
        ``x.repeat(n, ...)``), placed by ``t_sampling`` and ``antithetic``. ``advance=False`` leaves
        the schedule's state as it is; ``independent`` draws every render slot afresh (no golden
        sequence, no pairing across steps)."""
        cfg = self.config
        lo, hi = (float(v) for v in t_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"t_range must satisfy 0 <= min_t <= max_t <= 1, got {tuple(t_range)}")
        batch, n = x0.shape[0], cfg.noise_draws
        sched = self._schedule
        if cfg.antithetic == "steps" and not independent and sched["pending"] is not None:
            pending = sched["pending"]
            if advance:
                sched["pending"] = None
            # the partner of the previous step, unless the t range or the batch changed meanwhile
            if pending["t_range"] == [lo, hi] and tuple(pending["eps"].shape) == (n * batch, *x0.shape[1:]):
                return pending["t"].to(x0), -pending["eps"].to(x0)
        m = n // 2 if cfg.antithetic == "pairs" else n
        u = self._uniforms(m, batch, generator, x0, advance and not independent, independent)
        t = (lo + (hi - lo) * u).to(device=x0.device, dtype=x0.dtype)
        eps = draw("normal", (m * batch, *x0.shape[1:]), generator, like=x0, dtype=torch.float32)
        if cfg.antithetic == "pairs":
            t, eps = torch.cat([t, t]), torch.cat([eps, -eps])
        if cfg.antithetic == "steps" and advance and not independent:
            sched["pending"] = {"t": t.detach().cpu(), "eps": eps.detach().cpu(), "t_range": [lo, hi]}
        return t, eps

    def _uniforms(
        self,
        m: int,
        batch: int,
        generator: torch.Generator | None,
        like: Tensor,
        advance: bool,
        independent: bool,
    ) -> Tensor:
        """``u [m B]`` in ``[0, 1)``, each ``U[0, 1)`` marginally, by ``t_sampling``."""
        device = generator_device(generator, like)
        mode = self.config.t_sampling
        if mode == "uniform":
            return torch.rand(m * batch, generator=generator, device=device)
        if mode == "stratified":  # a random permutation of the strata per render, a uniform point in each
            order = torch.rand(m, batch, generator=generator, device=device).argsort(dim=0)
            return ((order + torch.rand(m, batch, generator=generator, device=device)) / m).reshape(-1)
        sched = self._schedule
        start = sched["golden_start"]
        if independent or start is None or start.numel() != batch:
            start = torch.rand(batch, generator=generator, device=device).double().cpu()
            step = 0
            if advance:
                sched["golden_start"], sched["golden_step"] = start, 0
        else:
            step = int(sched["golden_step"])
        base = (start + step * GOLDEN) % 1.0
        if advance:
            sched["golden_step"] = step + 1
        lattice = torch.arange(m, dtype=torch.float64)[:, None] / m
        return ((base[None, :] + lattice) % 1.0).reshape(-1).float().to(device)

    def _update_optimal_mu(self, step: _Step, t: Tensor) -> None:
        """Refit the ``optimal`` weights from this step. With ``antithetic="steps"`` the first step
        of a pair is held back and folded in with the second: a ``mu`` fitted on ``eps`` must not
        weight the ``-eps`` of the next step."""
        data = {"eps_hat": step.eps_hat, "cvs": step.cvs, "weight": step.weight, "t": t}
        if self.config.antithetic != "steps":
            self.mu.update(**data)
            return
        sched = self._schedule
        held = sched["deferred"]
        if sched["pending"] is not None:  # this step opened a pair
            if held is not None:  # a pair whose second step never came (the t range changed)
                self.mu.update(**{k: v.to(data[k].device) for k, v in held.items()})
            sched["deferred"] = {k: v.detach().cpu() for k, v in data.items()}
            return
        if held is not None:
            data = {k: torch.cat([held[k].to(v.device), v]) for k, v in data.items()}
        sched["deferred"] = None
        self.mu.update(**data)

    def _repeat_cond(self, cond: Any, n: int) -> Any:
        return cond if n == 1 else self.score_model.repeat_cond(cond, n)

    def _camera(self, c2w: Tensor | None, render: RenderOutputs | None, batch: int) -> Tensor | None:
        """VSD's cameras ``[B, 4, 4]`` (``c2w``, else ``render.c2w``; one camera is repeated);
        ``None`` for the other estimators."""
        if self.particle is None:
            return None
        if c2w is None and render is not None:
            c2w = render.c2w
        if c2w is None:
            raise ValueError("estimator='vsd' needs the cameras: pass c2w [B, 4, 4] (or render.c2w)")
        c2w = torch.as_tensor(c2w)
        if c2w.ndim != 3 or tuple(c2w.shape[1:]) != (4, 4) or c2w.shape[0] not in (1, batch):
            raise ValueError(f"c2w must be [B={batch}, 4, 4] (or [1, 4, 4]), got {tuple(c2w.shape)}")
        return c2w.detach().expand(batch, 4, 4)

    def _particle_rng(self, like: Tensor) -> torch.Generator:
        """The particle model's own generator (seeded ``vsd_seed``, on ``like``'s device)."""
        if self._particle_generator is None or self._particle_generator.device != like.device:
            self._particle_generator = torch.Generator(device=like.device).manual_seed(self.config.vsd_seed)
        return self._particle_generator

    def _step(
        self,
        x0: Tensor,
        t: Tensor,
        eps: Tensor,
        cond: Any,
        render: RenderOutputs | None,
        camera: Tensor | None = None,
    ) -> _Step:
        """Everything of a step that does not touch ``mu``'s or the particle model's state: returns
        the raw SSD (SDS, VSD) gradient, the SDS gradient on the same noise, and what ``mu`` is
        fitted from."""
        sm = self.score_model
        with torch.no_grad(), self.phase("score_model"):
            x_t = sm.add_noise(x0, eps, t)
            eps_hat = sm.eps(x_t, t, cond, self.config.guidance_scale)
            weight = sm.weight(t) if self.config.weighting == "sds" else torch.ones_like(t)
        phis = valid = fallback = None
        if self.particle is not None:
            # VSD: the particle prediction takes the place of the control variates, with weight 1
            cvs = self.particle.eps(x_t, t, cond, camera)[:, None]
        elif self.config.estimator == "sds" or not (self.baselines or self.config.linear_cv):
            cvs = eps[:, None]
        else:
            if self.baselines:
                phis, grads, valid = self._evaluate_baselines(x_t, render)
                cvs, fallback = control_variates(
                    eps, phis, grads, sm.sigma(t), self.config.include_constant, valid, return_fallback=True
                )
            else:
                cvs = eps[:, None] if self.config.include_constant else eps[:, None][:, :0]
            if self.config.linear_cv:
                cvs = torch.cat([cvs, self._linear_cv(x0, t, eps, cond)[:, None]], dim=1)
        mu = (
            self.mu(t)
            if self.mu is not None
            else torch.ones(t.shape[0], 1, dtype=eps.dtype, device=eps.device)
        )
        grad = stein_gradient(eps_hat, cvs, weight, mu)
        sds = sds_gradient(eps_hat, eps, weight)
        return _Step(grad, sds, eps_hat, cvs, weight, phis, valid, fallback)

    @torch.no_grad()
    def _linear_cv(self, x0: Tensor, t: Tensor, eps: Tensor, cond: Any) -> Tensor:
        """``(eps_hat(alpha x0 + d sigma eps) - eps_hat(alpha x0 - d sigma eps)) / 2d``, the central
        difference for ``sigma J(alpha x0) eps``: odd in ``eps``, hence zero-mean (``J`` taken at
        ``x_t`` instead would depend on ``eps`` and is not)."""
        sm, d, s = self.score_model, LINEAR_CV_STEP, self.config.guidance_scale
        ahead = sm.eps(sm.add_noise(x0, d * eps, t), t, cond, s)
        behind = sm.eps(sm.add_noise(x0, -d * eps, t), t, cond, s)
        return (ahead - behind) / (2 * d)

    def _evaluate_baselines(self, x_t: Tensor, render: RenderOutputs | None) -> tuple[Tensor, Tensor, Tensor]:
        """``phi_k(x_t)`` of every baseline on one shared decode, their exact gradients w.r.t.
        ``x_t`` and validity: ``([B, K], [B, K, *x_t.shape[1:]], [B, K] bool)``."""
        if render is None:
            raise ValueError(
                f"SSD with baselines {list(self.baseline_names)} needs the render outputs (render=None)"
            )
        batch = x_t.shape[0]
        render = render.detached().expand(batch) if render.batch_size != batch else render.detached()
        sm, baselines, policy = self.score_model, self.baselines, self.config.resize_render
        decode = sm.decode_preview if self.config.baseline_decoder == "preview" else sm.decode
        validity: list[Tensor] = []

        def phi_fn(x: Tensor) -> Tensor:
            with self.phase("decode"):
                image = decode(x)
            if policy == "image":
                r = render.resized(*image.shape[-2:])
            else:
                image, r = resize_image(image, render.resolution), render
            with self.phase("phi"):
                outs = [b(image, r) for b in baselines]
            validity.append(torch.stack([o.valid.to(torch.bool) for o in outs], dim=1))
            return torch.stack([o.phi for o in outs], dim=1)

        with self.phase("baselines"):
            phis, grads = baseline_value_and_grad(phi_fn, x_t, n_baselines=len(baselines))
        return phis, grads, validity[-1]

    def _stats(self, grad: Tensor, raw: Tensor, step: _Step, update: bool) -> dict[str, float]:
        """Logging numbers; the running second moments advance only when ``update``. ``raw``: the
        step's gradient before clipping (the mean over its draws)."""
        stats: dict[str, float] = {"grad_norm": grad.norm().item()}
        if step.phis is not None:
            ok = ~step.fallback
            for k, (name, baseline) in enumerate(zip(self.baseline_names, self.baselines, strict=True)):
                n_ok = ok[:, k].sum()
                mean = (step.phis[:, k] * ok[:, k]).sum() / n_ok if n_ok > 0 else torch.tensor(math.nan)
                stats[f"phi_mean/{name}"] = mean.item()
                stats[f"valid_frac/{name}"] = ok[:, k].float().mean().item()
                stats.update(baseline.statistics(mean.item()))
            stats["n_fallback"] = float(step.fallback.sum().item())
        else:
            stats["n_fallback"] = 0.0
        if self.mu is not None:
            stats.update({f"mu/{k}": v for k, v in self.mu.statistics().items()})
        # Online variance proxy: SSD and SDS have the same mean at every render, so
        # E||g||^2 - E||g_sds||^2 = Var(g) - Var(g_sds); the ratio of second moments lies between
        # the variance ratio and 1 (the squared mean is in both), so it understates any change.
        # The estimator's is that of the step's gradient (the mean of its draws), SDS's that of
        # single draws: with several draws per step the ratio includes what they remove.
        grad_sq = raw.flatten(1).pow(2).sum(1).mean().item()
        sds_sq = torch.nan_to_num(step.sds).flatten(1).pow(2).sum(1).mean().item()
        m = self._moments
        if update:
            decay = self.config.stats_ema
            m["steps"] += 1
            m["grad_sq"] = decay * m["grad_sq"] + (1 - decay) * grad_sq
            m["sds_sq"] = decay * m["sds_sq"] + (1 - decay) * sds_sq
        stats["grad_sq"], stats["grad_sq_sds"] = grad_sq, sds_sq
        if m["steps"] > 0:
            correction = 1 - self.config.stats_ema ** m["steps"]  # Adam-style bias correction
            ema_g, ema_s = m["grad_sq"] / correction, m["sds_sq"] / correction
            stats["var_proxy_diff"] = ema_g - ema_s
            stats["var_proxy_ratio"] = ema_g / ema_s if ema_s > 0 else math.nan
        return stats


def _unique_names(names: Sequence[str]) -> tuple[str, ...]:
    """Baseline names for logging, suffixed ``_1``, ``_2``, ... where one repeats."""
    out, seen = [], {}
    for name in names:
        if names.count(name) > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}_{seen[name]}"
        out.append(name)
    return tuple(out)


def _repeat_draws(x: Tensor, n: int) -> Tensor:
    """``[B, ...]`` to ``[n B, ...]`` in the order of ``x.repeat(n, ...)`` (``x`` itself when ``n = 1``)."""
    return x if n == 1 else x.repeat(n, *([1] * (x.ndim - 1)))


def _mean_over_draws(x: Tensor, n: int) -> Tensor:
    """``[n B, ...]`` (draw ``j`` of render ``b`` at ``j B + b``) to the mean over draws ``[B, ...]``."""
    return x if n == 1 else x.reshape(n, x.shape[0] // n, *x.shape[1:]).mean(0)


def _fresh_schedule() -> dict[str, Any]:
    """The ``t``/``eps`` schedule's state between steps (``resume_state()["schedule"]``)."""
    return {"golden_start": None, "golden_step": 0, "pending": None, "deferred": None}


def _to_cpu(value: Any) -> Any:
    """Tensors (also inside dicts) detached and on the CPU, for ``resume_state``."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
