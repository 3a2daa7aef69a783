"""``steindreamer-system``: text-to-3D with Stein Score Distillation.

threestudio's systems hand the guidance only the rendered RGB; SSD's baselines also need what the
renderer knows about the scene (depth, opacity, normals, the camera). This system renders, hands
all of it to the guidance, and adds threestudio's usual regularisers. Stages follow
ProlificDreamer's:

* ``coarse``: a volume (``implicit-volume`` NeRF, ``implicit-sdf`` NeuS, or the Gaussian-splatting
  extension); orient, sparsity, opaque, z-variance and eikonal regularisers.
* ``geometry``: a mesh (``tetrahedra-sdf-grid`` + ``stein-mesh-rasterizer``, threestudio's
  ``nvdiff-rasterizer`` plus rendered depth) distilled through its normal map; normal-consistency
  and Laplacian regularisers. Every baseline runs here; with threestudio's ``nvdiff-rasterizer``
  (no depth) only ``constant`` does, and ``depth``/``normal`` raise naming the renderer.
* ``texture``: the mesh fixed, its texture distilled through the RGB render.

Renderer keys read: ``comp_rgb``, ``opacity`` (or the Gaussian-splatting extension's
``comp_mask``), ``depth`` (or ``comp_depth``), ``comp_normal``; ``c2w`` comes from the batch.
Resume: each training step seeds the global RNGs from the step (``data.seed_step``); with
``data_type: stein-random-camera-datamodule`` the cameras are the step's too, so ``resume=<ckpt>``
continues exactly as the uninterrupted run (parameters, optimiser, mu and the guidance's noise
stream are in the checkpoint).
Every scalar the guidance returns is logged as ``train/<name>``; each ``loss_<x>`` it returns is
weighted by ``system.loss.lambda_<x>``.

Variance monitor (``system.variance_monitor: {every: N, n_draws: K}``, off with ``every: 0``): every
``N`` steps, at the current render of the batch's first view, ``K`` independent draws of
``(t, eps)`` give the gradient variance ``E||g - E g||^2`` of the configured estimator and of SDS on
the SAME draws (``SteinScoreDistillationGuidance.estimate_variance``, i.e.
``ScoreDistillation.estimate_variance``), from a generator seeded with
``variance_monitor.seed * 1000003 + step`` (so every arm of a comparison sees the same draws at a
step, and training's own noise stream is untouched). Logged to every logger (TensorBoard, CSV) at
that step as ``variance/var_estimator``, ``variance/var_sds``, ``variance/ratio``; kept in the
checkpoint, and written at the end of training to ``<save>/variance_monitor.json`` and
``<save>/variance_monitor.png`` (both variances and their ratio against the step).
"""

from __future__ import annotations

import json
import math
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import threestudio
import torch
from threestudio.systems.base import BaseLift3DSystem
from threestudio.systems.utils import parse_optimizer
from threestudio.utils.ops import binary_cross_entropy, dot
from torch import Tensor

from threestudio_ssd.baselines.ops import ray_directions
from threestudio_ssd.threestudio.data import seed_step
from threestudio_ssd.threestudio.guidance import SteinScoreDistillationGuidance
from threestudio_ssd.threestudio.registry import register

STAGES = ("coarse", "geometry", "texture")
#: the monitor's generator at step ``k`` is seeded ``seed * MONITOR_SEED_STRIDE + k``
MONITOR_SEED_STRIDE = 1_000_003
#: checkpoint key of every data-parallel rank's guidance extra state (noise generators), rank order
PER_RANK_KEY = "guidance_extra_state_per_rank"
GUIDANCE_STATE_KEY = "guidance._extra_state"
#: the Gaussian-splatting extension's geometry methods this system calls (``is_gaussian_geometry``)
GAUSSIAN_HOOKS = (
    "merge_optimizer",
    "update_learning_rate",
    "update_states",
    "create_from_pcd",
    "training_setup",
)


def gather_per_rank(state: Any) -> list[Any] | None:
    """Every rank's ``state`` (``all_gather_object``), or None outside a multi-process run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def select_rank_state(checkpoint: dict[str, Any], rank: int) -> None:
    """Put ``rank``'s guidance extra state (:data:`PER_RANK_KEY`) where Lightning will load it from.
    Without one for this rank (a single-process checkpoint resumed by more processes, or more ranks
    than saved), rank 0 keeps the saved state and any other rank drops the saved noise generators
    with a warning: it starts its stream afresh from ``seed + rank`` instead of repeating rank 0's."""
    state_dict = checkpoint.get("state_dict", {})
    if GUIDANCE_STATE_KEY not in state_dict:
        return
    per_rank = checkpoint.get(PER_RANK_KEY)
    if per_rank is not None and rank < len(per_rank):
        state_dict[GUIDANCE_STATE_KEY] = per_rank[rank]
    elif rank != 0:
        warnings.warn(
            f"checkpoint has no guidance noise state for rank {rank} (saved by "
            f"{len(per_rank) if per_rank else 1} process(es)); this rank's (t, eps) stream restarts from "
            "guidance.seed + rank, so the resumed run differs from an uninterrupted one",
            stacklevel=2,
        )
        saved = dict(state_dict[GUIDANCE_STATE_KEY] or {})
        saved.pop("generator", None)
        saved.pop("distillation", None)
        state_dict[GUIDANCE_STATE_KEY] = saved


@dataclass
class VarianceMonitorConfig:
    """``system.variance_monitor`` (module docstring)."""

    every: int = 0  # steps between estimates; 0: off
    n_draws: int = 16  # (t, eps) draws per estimate
    batch_size: int = 8  # draws evaluated per call of the score model
    seed: int = 0


def parse_variance_monitor(values: Any) -> VarianceMonitorConfig:
    """``system.variance_monitor`` (a mapping, possibly empty) as a checked
    :class:`VarianceMonitorConfig`; unknown keys and bad values raise naming the key."""
    values = dict(values or {})
    known = set(VarianceMonitorConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"system.variance_monitor: unknown key(s) {unknown}; known: {sorted(known)}")
    numbers = {}
    for key, value in values.items():
        try:
            numbers[key] = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"system.variance_monitor.{key} must be an integer, got {value!r}") from None
    monitor = VarianceMonitorConfig(**numbers)
    for key, low in (("every", 0), ("n_draws", 2), ("batch_size", 1)):
        if getattr(monitor, key) < low:
            raise ValueError(f"system.variance_monitor.{key} must be >= {low}, got {getattr(monitor, key)}")
    return monitor


def is_gaussian_geometry(geometry: Any) -> bool:
    """Whether ``geometry`` is the Gaussian-splatting extension's (``gaussian-splatting`` of
    DSaurus/threestudio-3dgs): it owns an optimiser with per-parameter learning rates and adaptive
    density control (``merge_optimizer``, ``update_learning_rate``, ``update_states``)."""
    return all(callable(getattr(geometry, name, None)) for name in GAUSSIAN_HOOKS)


def render_geometry_for_guidance(
    out: dict[str, Any], batch: dict[str, Any] | None = None
) -> dict[str, Tensor | None]:
    """The renderer's ``depth``, ``opacity`` and ``comp_normal`` (``[B, H, W, 1|3]``, threestudio's
    encodings, ``None`` where the renderer has none), read under the volume renderers' names or the
    Gaussian-splatting extension's (``comp_depth``, ``comp_mask``). The guidance decodes them
    (``threestudio_ssd.baselines.RenderOutputs.from_threestudio``).

    The extension's ``comp_depth`` (``diff-gaussian-rasterizer-advanced``) is the alpha-blended
    camera z of the Gaussians' centres, not the distance along the ray that the baselines use: it
    is converted here, ``distance = z |d|`` for the pixel's ray direction ``d = (x, y, -1)`` in
    camera coordinates (needs ``batch["fovy"]``)."""
    depth, opacity = out.get("depth"), out.get("opacity")
    if depth is None and out.get("comp_depth") is not None:
        depth = out["comp_depth"]
        if batch is None or batch.get("fovy") is None:
            raise ValueError("converting the Gaussian splats' z-depth to ray distance needs batch['fovy']")
        fovy_deg = torch.as_tensor(batch["fovy"]).reshape(-1) * (180.0 / math.pi)
        ray_length = ray_directions(depth.shape[1], depth.shape[2], fovy_deg, normalize=False).norm(dim=-1)
        depth = depth * ray_length[..., None].to(depth)
    if opacity is None:
        opacity = out.get("comp_mask")
    return {"depth": depth, "opacity": opacity, "comp_normal": out.get("comp_normal")}


def video_format() -> str:
    """``mp4`` where imageio can write it (the ``imageio-ffmpeg`` package), else ``gif`` with a
    warning, so that a machine without ffmpeg still gets its test video after training."""
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        warnings.warn("imageio-ffmpeg is not installed: the test video is written as a GIF", stacklevel=2)
        return "gif"
    return "mp4"


@register("steindreamer-system")
class SteinDreamer(BaseLift3DSystem):
    """Renders, distills with the configured guidance (SSD, or SDS for ablations), regularises."""

    @dataclass
    class Config(BaseLift3DSystem.Config):
        # in ["coarse", "geometry", "texture"], as in prolificdreamer-system
        stage: str = "coarse"
        variance_monitor: dict = field(default_factory=dict)  # VarianceMonitorConfig's keys

    cfg: Config

    def configure(self) -> None:
        if self.cfg.stage not in STAGES:
            raise ValueError(f"system.stage={self.cfg.stage!r} is not one of {list(STAGES)}")
        self.monitor = parse_variance_monitor(self.cfg.variance_monitor)
        self.variance_history: list[dict[str, float]] = []
        super().configure()  # geometry, material, background, renderer
        # built here, not in on_fit_start, so that the guidance's learnable control-variate
        # weights exist when Lightning calls configure_optimizers (ProlificDreamer's pattern)
        self.guidance = threestudio.find(self.cfg.guidance_type)(self.cfg.guidance)
        self.prompt_processor = threestudio.find(self.cfg.prompt_processor_type)(self.cfg.prompt_processor)
        self.prompt_utils = self.prompt_processor()
        self.gaussians = is_gaussian_geometry(self.geometry)
        if self.gaussians:  # the extension's optimiser and density control run by hand, as its system does
            self.automatic_optimization = False
        if self.monitor.every > 0 and not isinstance(self.guidance, SteinScoreDistillationGuidance):
            raise ValueError(
                "system.variance_monitor needs guidance_type: stein-score-distillation-guidance, got "
                f"{self.cfg.guidance_type!r}"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # geometry.shape_init (e.g. a DMTet sphere for a mesh stage started from scratch), as
        # threestudio's mesh systems do; not on resume or when converted from a coarse stage
        if not (self.resumed or self.cfg.geometry_convert_from) and hasattr(
            self.geometry, "initialize_shape"
        ):
            self.geometry.initialize_shape()
        # the data module is known only now: refuse render sizes the prior cannot use, before step 1
        data_cfg = getattr(getattr(self.trainer, "datamodule", None), "cfg", None)
        if isinstance(self.guidance, SteinScoreDistillationGuidance) and data_cfg is not None:
            heights, widths = data_cfg.get("height"), data_cfg.get("width")
            heights = list(heights) if isinstance(heights, Sequence) else [heights]
            widths = list(widths) if isinstance(widths, Sequence) else [widths]
            for height, width in zip(heights, widths):
                if height is not None and width is not None:
                    self.guidance.check_render_resolution(int(height), int(width))

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int, unused: int = 0) -> None:
        # the step's global-RNG draws (ray jitter, ...) depend on the step only, so a resumed run
        # repeats the uninterrupted one (threestudio_ssd.threestudio.data)
        seed_step(self.true_global_step)
        super().on_train_batch_start(batch, batch_idx, unused)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        if hasattr(self.renderer, "batch_forward"):  # the Gaussian-splatting extension's renderers
            return self.renderer.batch_forward(batch)
        if self.cfg.stage == "geometry":
            return self.renderer(**batch, render_rgb=False)
        return self.renderer(**batch)

    def _lambda(self, name: str) -> float:
        """``system.loss.lambda_<name>`` at this step (0 when not configured)."""
        key = f"lambda_{name}"
        return self.C(self.cfg.loss[key]) if key in self.cfg.loss else 0.0

    def configure_optimizers(self) -> Any:
        if not self.gaussians:
            return super().configure_optimizers()
        # the geometry's optimiser (per-parameter learning rates, named groups that its density
        # control edits) merged with ours for everything else (the guidance's mu, ...)
        params = self.cfg.optimizer.get("params") if self.cfg.optimizer else None
        if not params:
            return [self.geometry.optimizer]
        if any(name == "geometry" or name.startswith("geometry.") for name in params):
            raise ValueError(
                "system.optimizer.params must not list geometry with a Gaussian-splatting geometry: "
                "its own optimiser has the learning rates (system.geometry.position_lr, ...)"
            )
        return [self.geometry.merge_optimizer(parse_optimizer(self.cfg.optimizer, self))]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        if self.gaussians:
            return self._gaussian_training_step(batch)
        return {"loss": self._loss(self(batch), batch)}

    def _gaussian_training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The extension's step order: learning rates for this step, render, loss, backward,
        density statistics and control from the screen-space gradients, optimiser step."""
        optimizer = self.optimizers()
        step = self.true_global_step
        self.geometry.update_learning_rate(step)
        out = self(batch)
        loss = self._loss(out, batch)
        self.manual_backward(loss)
        self.geometry.update_states(step, out["visibility_filter"], out["radii"], out["viewspace_points"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.log("train/n_gaussians", float(self.geometry.get_xyz.shape[0]))
        return {"loss": loss.detach()}

    def _loss(self, out: dict[str, Any], batch: dict[str, Any]) -> Tensor:
        """The guidance's weighted losses plus this stage's regularisers, logged."""
        guidance_inp = out["comp_normal"] if self.cfg.stage == "geometry" else out["comp_rgb"]
        guidance_kwargs = {**batch, **render_geometry_for_guidance(out, batch)}
        guidance_out = self.guidance(guidance_inp, self.prompt_utils, **guidance_kwargs, rgb_as_latents=False)
        if self.monitor.every > 0 and self.true_global_step % self.monitor.every == 0:
            self.monitor_variance(guidance_inp, guidance_kwargs)

        loss = 0.0
        for name, value in guidance_out.items():
            if not (isinstance(value, Tensor) and value.numel() > 1):
                self.log(f"train/{name}", value)
            if name.startswith("loss_"):
                key = name.replace("loss_", "lambda_")
                if key not in self.cfg.loss:
                    raise KeyError(
                        f"the guidance returned '{name}' but system.loss.{key} is not set in the config"
                    )
                loss = loss + value * self.C(self.cfg.loss[key])

        if self.cfg.stage == "coarse":
            loss = loss + self._coarse_regularizers(out)
        elif self.cfg.stage == "geometry":
            loss = loss + self._mesh_regularizers(out)

        for name, value in self.cfg.loss.items():
            self.log(f"train_params/{name}", self.C(value))
        return loss

    # -- variance monitor -------------------------------------------------------------------------

    def monitor_variance(self, guidance_inp: Tensor, guidance_kwargs: dict[str, Any]) -> dict[str, float]:
        """One variance estimate at this step (module docstring), logged and kept in
        ``variance_history``; returns the record."""
        step = self.true_global_step
        generator = torch.Generator().manual_seed(self.monitor.seed * MONITOR_SEED_STRIDE + step)
        start = time.perf_counter()
        est = self.guidance.estimate_variance(
            guidance_inp,
            self.prompt_utils,
            n_draws=self.monitor.n_draws,
            generator=generator,
            batch_size=self.monitor.batch_size,
            **guidance_kwargs,
        )
        record = {
            "step": int(step),
            "var_estimator": est.var_ssd,
            "var_sds": est.var_sds,
            "ratio": est.ratio,
            "n_fallback": float(est.n_fallback),
            "seconds": time.perf_counter() - start,
        }
        self.variance_history.append(record)
        metrics = {f"variance/{k}": v for k, v in record.items() if k != "step"}
        for logger in self.loggers:  # at this step, whatever trainer.log_every_n_steps is
            logger.log_metrics(metrics, step=step)
        return record

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["variance_monitor"] = list(self.variance_history)
        # Lightning dumps the checkpoint on every process and writes rank 0's: gather every rank's
        # noise state so that each resumes its own stream (collective: every rank is here)
        per_rank = gather_per_rank(self.guidance.get_extra_state())
        if per_rank is not None:
            checkpoint[PER_RANK_KEY] = per_rank

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.variance_history = list(checkpoint.get("variance_monitor", []))
        if self.gaussians and "geometry._xyz" in checkpoint.get("state_dict", {}):
            # the saved cloud's size (density control changed it): rebuild the parameters and the
            # optimiser at that size so that the state dict and the optimiser state load
            n = checkpoint["state_dict"]["geometry._xyz"].shape[0]
            zeros = torch.zeros(n, 3).numpy()
            self.geometry.create_from_pcd(
                types.SimpleNamespace(points=zeros, colors=zeros, normals=zeros), 10
            )
            self.geometry.training_setup()
        # runs before Lightning loads the state dict, so this rank's entry replaces rank 0's
        select_rank_state(checkpoint, self.guidance.rank)

    def on_train_end(self) -> None:
        if self.variance_history:
            self.save_variance_history()

    def save_variance_history(self) -> tuple[str, str]:
        """``<save>/variance_monitor.json`` and ``<save>/variance_monitor.png`` (both variances,
        log scale, and their ratio against the step); returns their paths."""
        from matplotlib.figure import Figure

        history = sorted(self.variance_history, key=lambda r: r["step"])
        json_path = self.get_save_path("variance_monitor.json")
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"estimator": self.guidance.cfg.estimator, "history": history}, f, indent=1)
        steps = [r["step"] for r in history]
        fig = Figure(figsize=(9, 3.5))
        ax_var, ax_ratio = fig.subplots(1, 2)
        name = self.guidance.cfg.estimator.upper()
        ax_var.plot(steps, [r["var_estimator"] for r in history], "o-", label=name)
        ax_var.plot(steps, [r["var_sds"] for r in history], "s--", label="SDS (same draws)")
        if all(r["var_estimator"] > 0 and r["var_sds"] > 0 for r in history):
            ax_var.set_yscale("log")
        ax_var.set(xlabel="step", ylabel="gradient variance (trace)", title="variance at the current view")
        ax_var.legend()
        ax_ratio.plot(steps, [r["ratio"] for r in history], "o-")
        ax_ratio.axhline(1.0, color="grey", lw=0.8)
        ax_ratio.set(xlabel="step", ylabel=f"Var {name} / Var SDS", title="variance ratio")
        ratios = [r["ratio"] for r in history if math.isfinite(r["ratio"])]
        if ratios:
            ax_ratio.set_title(f"variance ratio (mean {sum(ratios) / len(ratios):.3g})")
        fig.tight_layout()
        png_path = self.get_save_path("variance_monitor.png")
        fig.savefig(png_path, dpi=100)
        return json_path, png_path

    def _coarse_regularizers(self, out: dict[str, Any]) -> Tensor | float:
        loss: Tensor | float = 0.0
        if self._lambda("orient") > 0:
            if "normal" not in out:
                raise ValueError(
                    "system.loss.lambda_orient > 0 needs normals: set geometry.normal_type "
                    "(e.g. analytic) and a material that requires normals"
                )
            loss_orient = (
                out["weights"].detach() * dot(out["normal"], out["t_dirs"]).clamp_min(0.0) ** 2
            ).sum() / (out["opacity"] > 0).sum().clamp_min(1)
            self.log("train/loss_orient", loss_orient)
            loss = loss + loss_orient * self._lambda("orient")

        if "opacity" in out:
            loss_sparsity = (out["opacity"] ** 2 + 0.01).sqrt().mean()
            self.log("train/loss_sparsity", loss_sparsity)
            loss = loss + loss_sparsity * self._lambda("sparsity")

            opacity_clamped = out["opacity"].clamp(1.0e-3, 1.0 - 1.0e-3)
            loss_opaque = binary_cross_entropy(opacity_clamped, opacity_clamped)
            self.log("train/loss_opaque", loss_opaque)
            loss = loss + loss_opaque * self._lambda("opaque")

        if "z_variance" in out and self._lambda("z_variance") > 0:
            # HiFA's z-variance, on opaque pixels only
            opaque = out["opacity"] > 0.5
            if opaque.any():
                loss_z_variance = out["z_variance"][opaque].mean()
                self.log("train/loss_z_variance", loss_z_variance)
                loss = loss + loss_z_variance * self._lambda("z_variance")

        if "sdf_grad" in out:
            loss_eikonal = ((torch.linalg.norm(out["sdf_grad"], ord=2, dim=-1) - 1.0) ** 2).mean()
            self.log("train/loss_eikonal", loss_eikonal)
            loss = loss + loss_eikonal * self._lambda("eikonal")
        if "inv_std" in out:
            self.log("train/inv_std", out["inv_std"], prog_bar=True)
        return loss

    def _mesh_regularizers(self, out: dict[str, Any]) -> Tensor | float:
        if "mesh" not in out:
            raise ValueError(
                "system.stage=geometry needs a mesh renderer (stein-mesh-rasterizer or nvdiff-rasterizer)"
            )
        loss_normal_consistency = out["mesh"].normal_consistency()
        self.log("train/loss_normal_consistency", loss_normal_consistency)
        loss = loss_normal_consistency * self._lambda("normal_consistency")
        if self._lambda("laplacian_smoothness") > 0:
            loss_laplacian_smoothness = out["mesh"].laplacian()
            self.log("train/loss_laplacian_smoothness", loss_laplacian_smoothness)
            loss = loss + loss_laplacian_smoothness * self._lambda("laplacian_smoothness")
        return loss

    def _image_grid(self, out: dict[str, Any], batch: dict[str, Any]) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = []
        if "comp_rgb" in out:
            grid.append({"type": "rgb", "img": out["comp_rgb"][0], "kwargs": {"data_format": "HWC"}})
        if "comp_normal" in out:
            grid.append(
                {
                    "type": "rgb",
                    "img": out["comp_normal"][0],
                    "kwargs": {"data_format": "HWC", "data_range": (0, 1)},
                }
            )
        render = render_geometry_for_guidance(out, batch)
        if render["depth"] is not None:
            grid.append({"type": "grayscale", "img": render["depth"][0, :, :, 0], "kwargs": {}})
        if render["opacity"] is not None:
            grid.append(
                {
                    "type": "grayscale",
                    "img": render["opacity"][0, :, :, 0],
                    "kwargs": {"cmap": None, "data_range": (0, 1)},
                }
            )
        return grid

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        self.save_image_grid(
            f"it{self.true_global_step}-{batch['index'][0]}.png",
            self._image_grid(out, batch),
            name="validation_step",
            step=self.true_global_step,
        )

    def on_validation_epoch_end(self) -> None:
        pass

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        self.save_image_grid(
            f"it{self.true_global_step}-test/{batch['index'][0]}.png",
            self._image_grid(out, batch),
            name="test_step",
            step=self.true_global_step,
        )

    def on_test_epoch_end(self) -> None:
        self.save_img_sequence(
            f"it{self.true_global_step}-test",
            f"it{self.true_global_step}-test",
            r"(\d+)\.png",
            save_format=video_format(),
            fps=30,
            name="test",
            step=self.true_global_step,
        )
