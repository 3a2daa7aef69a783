"""``steindreamer-system`` with the Gaussian-splatting extension's interface (DSaurus/threestudio-3dgs).

The extension's CUDA rasteriser cannot run here, so a stand-in geometry and renderer implement
the interface the system uses, as the extension defines it: the geometry owns an Adam optimiser
with named parameter groups (``training_setup``), merges other modules' groups into it
(``merge_optimizer``), sets per-step learning rates (``update_learning_rate``), does density
control from the screen-space gradients after backward (``update_states``, here adding a Gaussian
at step 2) and is rebuilt at a checkpoint's size (``create_from_pcd``); the renderer's
``batch_forward`` returns ``comp_rgb``, the alpha-blended camera z-depth ``comp_depth``,
``comp_mask`` and per view ``viewspace_points``, ``visibility_filter``, ``radii``.

Checked: the extension's step order (learning rate, render, backward, density control with the
gradients present, optimiser step), the merged optimiser (the geometry's groups and the learned
mu's), the depth the guidance sees is the ray distance, and resuming after density control
changed the number of Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from threestudio_ssd.testing import make_tiny_depth_estimator, make_tiny_prior

from .conftest import REPO
from .tiny_models import DPT, PRIOR

pytestmark = pytest.mark.integration


def register_stand_ins(ts) -> None:
    from threestudio.models.geometry.base import BaseGeometry
    from threestudio.models.renderers.base import Renderer

    if "test-gaussians" in ts.__modules__:
        return

    @ts.register("test-gaussians")
    class Gaussians(BaseGeometry):
        @dataclass
        class Config(BaseGeometry.Config):
            init_num_pts: int = 24
            position_lr: Any = 0.01
            feature_lr: Any = 0.05

        cfg: Config

        def configure(self) -> None:
            super().configure()
            self.calls: list[tuple] = []
            g = torch.Generator().manual_seed(0)
            points = (0.3 * torch.randn(self.cfg.init_num_pts, 3, generator=g)).numpy()
            self.create_from_pcd(type("Cloud", (), {"points": points, "colors": points})(), 10)
            self.training_setup()

        def create_from_pcd(self, pcd, spatial_lr_scale: float) -> None:
            self.calls.append(("create_from_pcd", len(pcd.points)))
            self._xyz = nn.Parameter(torch.as_tensor(pcd.points, dtype=torch.float32))
            self._features_dc = nn.Parameter(torch.zeros(len(pcd.points), 3))

        @property
        def get_xyz(self) -> torch.Tensor:
            return self._xyz

        def training_setup(self) -> None:
            self.optimize_list = [
                {"params": [self._xyz], "lr": 0.0, "name": "xyz"},
                {"params": [self._features_dc], "lr": 0.0, "name": "f_dc"},
            ]
            self.optimizer = torch.optim.Adam(self.optimize_list, lr=0.0, eps=1e-15)

        def merge_optimizer(self, net_optimizer):
            groups = list(self.optimize_list)
            groups += [{"params": g["params"], "lr": g["lr"]} for g in net_optimizer.param_groups]
            self.optimizer = torch.optim.Adam(groups, lr=0.0)
            return self.optimizer

        def update_learning_rate(self, iteration: int) -> None:
            self.calls.append(("update_learning_rate", iteration))
            for group in self.optimizer.param_groups:
                if group.get("name") == "xyz":
                    group["lr"] = self.cfg.position_lr
                elif group.get("name") == "f_dc":
                    group["lr"] = self.cfg.feature_lr

        @torch.no_grad()
        def update_states(self, iteration, visibility_filter, radii, viewspace_point_tensor) -> None:
            grads = [
                float(v.grad.abs().sum()) if v.grad is not None else None for v in viewspace_point_tensor
            ]
            self.calls.append(("update_states", iteration, grads))
            if iteration == 2:  # densify: one more Gaussian, its optimiser state reset (as the extension)
                for group in self.optimizer.param_groups:
                    if group.get("name") in ("xyz", "f_dc"):
                        old = group["params"][0]
                        self.optimizer.state.pop(old, None)
                        new = nn.Parameter(torch.cat([old, old[:1]]))
                        group["params"][0] = new
                        setattr(self, "_xyz" if group["name"] == "xyz" else "_features_dc", new)

    @ts.register("test-gaussian-renderer")
    class Splats(Renderer):
        def batch_forward(self, batch: dict[str, Any]) -> dict[str, Any]:
            """Isotropic splats of the centres, projected orthographically along the camera."""
            xyz, colour = self.geometry._xyz, torch.sigmoid(self.geometry._features_dc)
            height, width = batch["height"], batch["width"]
            rows = torch.linspace(-1, 1, height)
            cols = torch.linspace(-1, 1, width)
            gy, gx = torch.meshgrid(rows, cols, indexing="ij")
            rgbs, depths, masks, viewspace = [], [], [], []
            for c2w in batch["c2w"]:
                w2c = torch.linalg.inv(c2w)
                cam = xyz @ w2c[:3, :3].T + w2c[:3, 3]
                screen = torch.zeros_like(cam, requires_grad=True)
                screen.retain_grad()
                uv = cam[:, :2] + screen[:, :2]
                weight = torch.exp(
                    -((gx[..., None] - uv[:, 0]) ** 2 + (gy[..., None] - uv[:, 1]) ** 2) / 0.02
                )
                alpha = 1 - torch.prod(1 - 0.5 * weight, dim=-1)
                norm = weight.sum(-1, keepdim=True) + 1e-8
                rgbs.append(alpha[..., None] * (weight @ colour) / norm + (1 - alpha[..., None]))
                depths.append(alpha[..., None] * (weight @ (-cam[:, 2:])) / norm)
                masks.append(alpha[..., None])
                viewspace.append(screen)
            n = xyz.shape[0]
            return {
                "comp_rgb": torch.stack(rgbs),
                "comp_depth": torch.stack(depths),
                "comp_mask": torch.stack(masks),
                "viewspace_points": viewspace,
                "visibility_filter": [torch.ones(n, dtype=torch.bool)] * len(viewspace),
                "radii": [torch.ones(n)] * len(viewspace),
            }


def gaussian_config(tmp_path, max_steps: int):
    from omegaconf import OmegaConf
    from threestudio.utils.config import load_config

    prior = make_tiny_prior(tmp_path / "prior", **PRIOR)
    dpt = make_tiny_depth_estimator(tmp_path / "dpt", **DPT)
    cfg = load_config(
        str(REPO / "configs" / "steindreamer-cpu-shapes.yaml"),
        cli_args=[
            f"system.guidance.prior_path={prior}",
            f"system.guidance.depth_estimator_path={dpt}",
            "data.width=16",
            "data.height=16",
            "data.batch_size=2",
        ],
    )
    cfg.system.geometry_type, cfg.system.renderer_type = "test-gaussians", "test-gaussian-renderer"
    cfg.system.geometry = OmegaConf.create({"init_num_pts": 24})
    cfg.system.renderer = OmegaConf.create({})
    cfg.system.optimizer = OmegaConf.create(
        {"name": "Adam", "args": {}, "params": {"guidance": {"lr": 0.05}}}
    )
    cfg.trainer.max_steps = max_steps
    return cfg


def fit(ts, cfg, ckpt_path=None):
    import pytorch_lightning as pl

    system = ts.find(cfg.system_type)(cfg.system, resumed=ckpt_path is not None)
    dm = ts.find(cfg.data_type)(cfg.data)
    trainer = pl.Trainer(
        max_steps=cfg.trainer.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(system, datamodule=dm, ckpt_path=ckpt_path)
    return system, trainer


@pytest.fixture
def first_run(threestudio_ts, tmp_path, monkeypatch):
    """``(cfg, fit(...))`` of a fresh run of ``max_steps`` steps with the stand-ins."""
    register_stand_ins(threestudio_ts)
    monkeypatch.chdir(tmp_path)

    def run(max_steps: int):
        cfg = gaussian_config(tmp_path, max_steps=max_steps)
        torch.manual_seed(0)
        return cfg, fit(threestudio_ts, cfg)

    return run


def test_gaussian_geometry_trains_in_the_extensions_step_order(first_run):
    _, (system, trainer) = first_run(4)
    assert system.gaussians and not system.automatic_optimization
    calls = [c for c in system.geometry.calls if c[0] != "create_from_pcd"]
    assert [c[:2] for c in calls] == [
        (name, k) for k in range(4) for name in ("update_learning_rate", "update_states")
    ]
    for call in calls[1::2]:  # density control sees the screen-space gradient of every view
        assert len(call[2]) == 2 and all(g is not None and g > 0 for g in call[2]), call
    optimizer = trainer.optimizers[0]
    names = [g.get("name") for g in optimizer.param_groups]
    assert names[:2] == ["xyz", "f_dc"] and len(names) == 3  # + the guidance's learned mu
    mu = system.guidance.distillation.mu.mu
    assert any(p is mu for p in optimizer.param_groups[2]["params"])
    assert not torch.equal(mu.detach(), torch.tensor([1.0, 0.0]).view_as(mu))  # mu was trained
    assert system.geometry.get_xyz.shape[0] == 25 and trainer.global_step == 4  # densified at step 2


def test_guidance_sees_the_ray_distance_of_the_splats(threestudio_ts):
    from threestudio_ssd.threestudio.system import render_geometry_for_guidance

    z = torch.full((1, 8, 8, 1), 2.0)
    out = {"comp_depth": z, "comp_mask": torch.ones_like(z)}
    batch = {"fovy": torch.tensor([math.radians(60.0)])}
    depth = render_geometry_for_guidance(out, batch)["depth"][0, ..., 0]
    # the corner pixel's ray leaves the optical axis at (x, y) = (3.5, 3.5) / f, f = 4 / tan(30 deg)
    f = 4 / math.tan(math.radians(30))
    assert depth[0, 0].item() == pytest.approx(2.0 * math.sqrt(1 + 2 * (3.5 / f) ** 2), rel=1e-5)
    assert depth.min().item() > 2.0 and depth.max().item() == depth[0, 0].item()
    with pytest.raises(ValueError, match="needs batch\\['fovy'\\]"):
        render_geometry_for_guidance(out, {})


def test_resume_rebuilds_the_densified_cloud(threestudio_ts, tmp_path, first_run):
    cfg, (_, trainer) = first_run(3)
    ckpt = tmp_path / "gs.ckpt"
    trainer.save_checkpoint(ckpt)
    cfg.trainer.max_steps = 4
    resumed, trainer = fit(threestudio_ts, cfg, ckpt_path=str(ckpt))
    assert ("create_from_pcd", 25) in resumed.geometry.calls  # rebuilt at the saved size, then loaded
    assert trainer.global_step == 4 and resumed.geometry.get_xyz.shape[0] == 25
